"""Initial-state interventions for length generalization (DESIGN.md §3).

Training only ever from `h0 = 0` visits a narrow set of recurrent states; these replace the
initial state of the batch's rows before the forward pass (a registry keyed by `kind`):

- `noise`: h0 ~ N(0, σ²) in every recurrent (R) layer; σ global or per layer;
- `fitted_noise`: h0 ~ N(mean, std²) per layer and channel, from running statistics of the final
  states seen in training (`StateStats`, part of the train state, tracked from step 0);
- `state_passing`: h0 = the final state of a different sequence (the previous step's rows, rolled
  by one row), with stop-gradient;
- `tbptt`: truncated BPTT — the data loader streams (row r of step k+1 continues row r of step k)
  and the whole final state of step k (recurrence, conv tail, and the attention window when
  `carry_attention`) is the initial state of step k+1; documents still reset where segment ids change.

Each applies to a row with probability `prob`, for steps in [start_step, end_step); several
interventions compose in list order (a later one overrides an earlier one on the rows it picks).
Noise and state passing mark a row as continuing (`segment_B` = the row's first segment id), so the
first token uses the state instead of resetting (see the state contract in docs/models.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lmtrain.configlib import ConfigError, field
from lmtrain.models.attention import AttentionState
from lmtrain.models.model import ModelState
from lmtrain.models.rglru import RecurrentState

NEEDS_RECURRENT = ("noise", "fitted_noise", "state_passing")


@dataclasses.dataclass(frozen=True)
class InterventionConfig:
    """One initial-state intervention: what, how often, and when."""

    kind: Literal["noise", "fitted_noise", "state_passing", "tbptt"] = field(
        "noise", "noise (N(0, noise_std^2)), fitted_noise (N(mean, std^2) of running final-state statistics), "
                 "state_passing (another row's final state from the previous step), tbptt (streaming rows; "
                 "the final state is carried to the next step).")
    prob: float = field(1.0, "Probability that a row gets the intervention at a step.")
    start_step: int = field(0, "First step (inclusive) at which the intervention is applied.")
    end_step: int = field(-1, "Step (exclusive) after which it stops; -1 = until the end.")
    noise_std: float = field(1.0, "noise: standard deviation, all recurrent layers.")
    layer_noise_std: tuple[float, ...] = field(
        (), "noise: one standard deviation per recurrent layer in depth order (overrides noise_std).")
    stats_decay: float = field(0.99, "fitted_noise: EMA decay of the running mean / mean-square of final states.")
    carry_attention: bool = field(True, "tbptt: also carry the local-attention window (else only the "
                                        "recurrence and conv tail).")

    def validate(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"prob must be in [0, 1], got {self.prob}")
        if self.noise_std < 0 or any(s < 0 for s in self.layer_noise_std):
            raise ConfigError("noise_std and layer_noise_std must be >= 0")
        if not 0.0 <= self.stats_decay < 1.0:
            raise ConfigError(f"stats_decay must be in [0, 1), got {self.stats_decay}")
        if self.start_step < 0 or (self.end_step != -1 and self.end_step <= self.start_step):
            raise ConfigError(f"need 0 <= start_step < end_step (or end_step -1), got {self.start_step}, "
                              f"{self.end_step}")


def check_interventions(cfgs: Sequence[InterventionConfig], model: Any) -> None:
    """Config-time checks that need the model config (`ModelConfig`) and each other."""
    pattern = model.pattern
    num_r = sum(pattern[i % len(pattern)] == "R" for i in range(model.num_layers))
    for i, c in enumerate(cfgs):
        if c.kind in NEEDS_RECURRENT and "R" not in pattern:
            raise ConfigError(f"train.interventions[{i}].kind={c.kind} sets the recurrent state, but "
                              f"model.pattern {pattern!r} has no recurrent (R) layer; use a pattern with R")
        if c.kind == "tbptt" and "G" in pattern:
            raise ConfigError(f"train.interventions[{i}].kind=tbptt cannot carry global attention (G) "
                              f"across steps; use local attention (A) in model.pattern")
        if c.layer_noise_std and len(c.layer_noise_std) != num_r:
            raise ConfigError(f"train.interventions[{i}].layer_noise_std has {len(c.layer_noise_std)} values; "
                              f"the model has {num_r} recurrent layers (one value each, in depth order)")
    if sum(c.kind == "tbptt" for c in cfgs) > 1:
        raise ConfigError("train.interventions: at most one tbptt entry (the data loader streams from its start_step)")


def tbptt_start(cfgs: Sequence[InterventionConfig]) -> int | None:
    """First step of streaming data (the tbptt intervention's start), or None."""
    return next((c.start_step for c in cfgs if c.kind == "tbptt"), None)


def needs_carry(cfgs: Sequence[InterventionConfig]) -> bool:
    return any(c.kind in ("state_passing", "tbptt") for c in cfgs)


def needs_stats(cfgs: Sequence[InterventionConfig]) -> bool:
    return any(c.kind == "fitted_noise" for c in cfgs)


# --- the recurrent leaves of a ModelState --------------------------------------------------------

class StateStats(NamedTuple):
    """Running per-layer, per-channel statistics of final recurrent states (float32)."""

    mean: tuple  # per recurrent state in ModelState order: [..., L] (stacked groups keep the layer axis)
    mean_sq: tuple
    count: jax.Array  # number of updates (for bias correction)


def _recurrent_leaves(state: ModelState) -> list[jax.Array]:
    """The h arrays of every R layer, in a fixed order (groups, then tail)."""
    return [s.h_BxL for s in (*state.groups, *state.tail) if isinstance(s, RecurrentState)]


def _recurrent_depths(state: ModelState) -> list[list[int]]:
    """Per recurrent leaf, the depth (layer index) of each layer it holds (groups: one per repeat)."""
    period = len(state.groups)
    repeats = jax.tree.leaves(state.groups[0])[0].shape[0] if period else 0  # groups stack over repeats
    depths = [[r * period + i for r in range(repeats)]
              for i, s in enumerate(state.groups) if isinstance(s, RecurrentState)]
    depths += [[repeats * period + j] for j, s in enumerate(state.tail) if isinstance(s, RecurrentState)]
    return depths


def _replace_recurrent(state: ModelState, new_h: list[jax.Array]) -> ModelState:
    it = iter(new_h)
    swap = lambda s: s._replace(h_BxL=next(it)) if isinstance(s, RecurrentState) else s
    return state._replace(groups=tuple(swap(s) for s in state.groups), tail=tuple(swap(s) for s in state.tail))


def init_stats(state: ModelState) -> StateStats:
    """Zero statistics shaped like the per-channel state of each R layer (batch axis dropped)."""
    zeros = tuple(jnp.zeros(h.shape[:-2] + h.shape[-1:], jnp.float32) for h in _recurrent_leaves(state))
    return StateStats(zeros, zeros, jnp.zeros((), jnp.int32))


def update_stats(stats: StateStats, final: ModelState, decay: float) -> StateStats:
    """EMA of mean and mean-square over the batch of final states (bias-corrected when read)."""
    hs = [jnp.asarray(h, jnp.float32) for h in _recurrent_leaves(final)]
    mean = tuple(decay * m + (1 - decay) * jnp.mean(h, axis=-2) for m, h in zip(stats.mean, hs))
    mean_sq = tuple(decay * m + (1 - decay) * jnp.mean(jnp.square(h), axis=-2) for m, h in zip(stats.mean_sq, hs))
    return StateStats(mean, mean_sq, stats.count + 1)


def fitted_moments(stats: StateStats, decay: float) -> tuple[list[jax.Array], list[jax.Array]]:
    """Bias-corrected (mean, std) per layer and channel."""
    correction = 1.0 - decay ** jnp.maximum(stats.count, 1).astype(jnp.float32)
    means = [m / correction for m in stats.mean]
    stds = [jnp.sqrt(jnp.maximum(s / correction - jnp.square(m), 0.0)) for m, s in zip(means, stats.mean_sq)]
    return means, stds


def batch_axis(path: tuple) -> int:
    """Axis of the rows in a ModelState leaf: 1 under `groups` (stacked over repeats), else 0."""
    return 1 if path and getattr(path[0], "name", None) == "groups" else 0


def select_rows(chosen_B: jax.Array, new: ModelState, old: ModelState) -> ModelState:
    """`new` on the chosen rows, `old` elsewhere, leaf by leaf."""
    def pick(path, n, o):
        shape = [1] * n.ndim
        shape[batch_axis(path)] = -1
        return jnp.where(chosen_B.reshape(shape), n, o)

    return jax.tree_util.tree_map_with_path(pick, new, old)


# --- the interventions ---------------------------------------------------------------------------

class Inputs(NamedTuple):
    """What an intervention may draw on at one step."""

    fresh: ModelState  # init_state of the batch
    first_segment_B: jax.Array  # int32: the segment id of each row's first token
    carry: ModelState | None  # the previous step's final state (state_passing, tbptt)
    stats: StateStats | None  # running final-state statistics (fitted_noise)


def _continuing(inp: Inputs, hs: list[jax.Array]) -> ModelState:
    """The fresh state with recurrent states `hs`, marked as continuing into the row's first segment."""
    return _replace_recurrent(inp.fresh, hs)._replace(segment_B=inp.first_segment_B)


def _noise(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    hs, depths = _recurrent_leaves(inp.fresh), _recurrent_depths(inp.fresh)
    if cfg.layer_noise_std:
        order = sorted(d for ds in depths for d in ds)
        if len(order) != len(cfg.layer_noise_std):
            raise ConfigError(f"layer_noise_std has {len(cfg.layer_noise_std)} values; the model has "
                              f"{len(order)} recurrent layers")
        std_of = {d: cfg.layer_noise_std[k] for k, d in enumerate(order)}
    else:
        std_of = {d: cfg.noise_std for ds in depths for d in ds}
    out = []
    for key, h, ds in zip(jax.random.split(rng, len(hs)), hs, depths):
        std = jnp.asarray([std_of[d] for d in ds], jnp.float32).reshape((-1,) + (1,) * 2)  # [layers, 1, 1]
        std = std if h.ndim == 3 else std[0]
        out.append(std * jax.random.normal(key, h.shape, jnp.float32))
    return _continuing(inp, out)


def _fitted_noise(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    hs = _recurrent_leaves(inp.fresh)
    means, stds = fitted_moments(inp.stats, cfg.stats_decay)
    out = [jnp.expand_dims(m, -2) + jnp.expand_dims(s, -2) * jax.random.normal(k, h.shape, jnp.float32)
           for k, h, m, s in zip(jax.random.split(rng, len(hs)), hs, means, stds)]
    return _continuing(inp, out)


def _state_passing(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    del cfg, rng
    rolled = [jax.lax.stop_gradient(jnp.roll(h, 1, axis=-2)) for h in _recurrent_leaves(inp.carry)]
    return _continuing(inp, rolled)


def _tbptt(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    del rng
    carry = jax.lax.stop_gradient(inp.carry)
    if cfg.carry_attention:
        return carry
    fresh_attn = lambda c, f: f if isinstance(f, AttentionState) else c
    return carry._replace(groups=tuple(map(fresh_attn, carry.groups, inp.fresh.groups)),
                          tail=tuple(map(fresh_attn, carry.tail, inp.fresh.tail)))


INTERVENTIONS: dict[str, Callable[[InterventionConfig, Inputs, jax.Array], ModelState]] = {
    "noise": _noise,
    "fitted_noise": _fitted_noise,
    "state_passing": _state_passing,
    "tbptt": _tbptt,
}


def _active(cfg: InterventionConfig, step: jax.Array) -> jax.Array:
    # tbptt: the carry is a streamed row's state only from the step after streaming starts.
    first = cfg.start_step + (cfg.kind == "tbptt")
    active = step >= first
    return active if cfg.end_step == -1 else active & (step < cfg.end_step)


def initial_state(cfgs: Sequence[InterventionConfig], inp: Inputs, step: jax.Array, rng: jax.Array
                  ) -> tuple[ModelState, jax.Array]:
    """(initial state of this step's batch, [B] bool: rows that got any intervention)."""
    state = inp.fresh
    touched_B = jnp.zeros(inp.first_segment_B.shape, bool)
    for i, cfg in enumerate(cfgs):
        pick_key, kind_key = jax.random.split(jax.random.fold_in(rng, i))
        chosen_B = _active(cfg, step) & (jax.random.uniform(pick_key, touched_B.shape) < cfg.prob)
        state = select_rows(chosen_B, INTERVENTIONS[cfg.kind](cfg, inp, kind_key), state)
        touched_B = touched_B | chosen_B
    return state, touched_B


def state_rms(state: ModelState) -> jax.Array:
    """Root-mean-square of all recurrent states (a scalar diagnostic; 0 without R layers)."""
    hs = _recurrent_leaves(state)
    if not hs:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(jnp.square(jnp.asarray(h, jnp.float32))) for h in hs)
    return jnp.sqrt(total / sum(h.size for h in hs))


__all__ = ["INTERVENTIONS", "InterventionConfig", "Inputs", "StateStats", "batch_axis", "check_interventions",
           "fitted_moments", "init_stats", "initial_state", "needs_carry", "needs_stats",
           "select_rows", "state_rms", "tbptt_start", "update_stats"]
