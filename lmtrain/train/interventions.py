"""Initial-state interventions for length generalization (docs/length_generalization.md).

Training only ever from `h0 = 0` visits a narrow set of recurrent states; these replace the
initial state of the batch's rows before the forward pass (a registry keyed by `kind`):

- `noise`: h0 ~ N(0, σ²) in every recurrent layer; σ global or per layer;
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
from lmtrain.models.layout import RecurrentLeaf, StateLayout
from lmtrain.models.state import ModelState, batch_axis

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
    layout = StateLayout(model)
    num_recurrent = sum(len(leaf.depths) for leaf in layout.leaves)
    for i, c in enumerate(cfgs):
        if c.kind in NEEDS_RECURRENT and not num_recurrent:
            raise ConfigError(f"train.interventions[{i}].kind={c.kind} sets the recurrent state, but "
                              f"model.pattern {model.pattern!r} has no recurrent layer (a layer kind with a recurrent "
                              "state, e.g. R or M); use a pattern with one")
        if c.kind == "tbptt" and layout.unbounded:
            raise ConfigError(f"train.interventions[{i}].kind=tbptt cannot carry the state of layers whose state grows "
                              f"with the context ({', '.join(layout.unbounded)}) across steps; use local attention (A)")
        if c.layer_noise_std and len(c.layer_noise_std) != num_recurrent:
            raise ConfigError(f"train.interventions[{i}].layer_noise_std has {len(c.layer_noise_std)} values; "
                              f"the model has {num_recurrent} recurrent layers (one value each, in depth order)")
    if sum(c.kind == "tbptt" for c in cfgs) > 1:
        raise ConfigError("train.interventions: at most one tbptt entry (the data loader streams from its start_step)")
    decays = {c.stats_decay for c in cfgs if c.kind == "fitted_noise"}
    if len(decays) > 1:
        raise ConfigError(f"train.interventions: fitted_noise entries share one running statistic, so they need "
                          f"one stats_decay; got {sorted(decays)}")


def tbptt_start(cfgs: Sequence[InterventionConfig]) -> int | None:
    """First step of streaming data (the tbptt intervention's start), or None."""
    return next((c.start_step for c in cfgs if c.kind == "tbptt"), None)


def needs_carry(cfgs: Sequence[InterventionConfig]) -> bool:
    return any(c.kind in ("state_passing", "tbptt") for c in cfgs)


def needs_stats(cfgs: Sequence[InterventionConfig]) -> bool:
    return any(c.kind == "fitted_noise" for c in cfgs)


def stats_decay(cfgs: Sequence[InterventionConfig]) -> float:
    """The EMA decay of the running final-state statistics (shared by every fitted_noise entry)."""
    return next(c.stats_decay for c in cfgs if c.kind == "fitted_noise")


# --- statistics of the recurrent leaves ----------------------------------------------------------

class StateStats(NamedTuple):
    """Running per-layer, per-channel statistics of final recurrent states (float32)."""

    mean: tuple  # per recurrent leaf (StateLayout order): the leaf without its rows axis
    mean_sq: tuple
    count: jax.Array  # number of updates (for bias correction)


def _rows(layout: StateLayout) -> list[int]:
    """The rows axis of each recurrent leaf."""
    return [batch_axis(leaf.axes) for leaf in layout.leaves]


def init_stats(layout: StateLayout, state: ModelState) -> StateStats:
    """Zero statistics shaped like each recurrent leaf of `state` without its rows axis."""
    zeros = tuple(jnp.zeros(h.shape[:ax] + h.shape[ax + 1:], jnp.float32)
                  for h, ax in zip(layout.recurrent(state), _rows(layout)))
    return StateStats(zeros, zeros, jnp.zeros((), jnp.int32))


def update_stats(layout: StateLayout, stats: StateStats, final: ModelState, decay: float) -> StateStats:
    """EMA of mean and mean-square over the batch of final states (bias-corrected when read)."""
    hs = [jnp.asarray(h, jnp.float32) for h in layout.recurrent(final)]
    axes = _rows(layout)
    mean = tuple(decay * m + (1 - decay) * jnp.mean(h, axis=ax) for m, h, ax in zip(stats.mean, hs, axes))
    mean_sq = tuple(decay * m + (1 - decay) * jnp.mean(jnp.square(h), axis=ax)
                    for m, h, ax in zip(stats.mean_sq, hs, axes))
    return StateStats(mean, mean_sq, stats.count + 1)


def fitted_moments(stats: StateStats, decay: float) -> tuple[list[jax.Array], list[jax.Array]]:
    """Bias-corrected (mean, std) per layer and channel."""
    correction = 1.0 - decay ** jnp.maximum(stats.count, 1).astype(jnp.float32)
    means = [m / correction for m in stats.mean]
    stds = [jnp.sqrt(jnp.maximum(s / correction - jnp.square(m), 0.0)) for m, s in zip(means, stats.mean_sq)]
    return means, stds


# --- the interventions ---------------------------------------------------------------------------

class Inputs(NamedTuple):
    """What an intervention may draw on at one step."""

    layout: StateLayout  # the model's state layout (which leaves are recurrent, where the rows are)
    fresh: ModelState  # init_state of the batch
    first_segment_B: jax.Array  # int32: the segment id of each row's first token
    carry: ModelState | None  # the previous step's final state (state_passing, tbptt)
    stats: StateStats | None  # running final-state statistics (fitted_noise)


def _continuing(inp: Inputs, hs: list[jax.Array]) -> ModelState:
    """The fresh state with recurrent states `hs`, marked as continuing into the row's first segment."""
    return inp.layout.with_recurrent(inp.fresh, hs)._replace(segment_B=inp.first_segment_B)


def _per_layer(values: list[float], leaf: RecurrentLeaf, ndim: int) -> jax.Array:
    """One value per layer of `leaf`, shaped to broadcast against it (along `layers` when stacked)."""
    if leaf.part == "groups":
        return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * (ndim - 1))
    return jnp.asarray(values[0], jnp.float32)


def _noise(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    layout = inp.layout
    hs, depths = layout.recurrent(inp.fresh), layout.depths
    if cfg.layer_noise_std:
        order = sorted(d for ds in depths for d in ds)
        if len(order) != len(cfg.layer_noise_std):
            raise ConfigError(f"layer_noise_std has {len(cfg.layer_noise_std)} values; the model has "
                              f"{len(order)} recurrent layers")
        std_of = {d: cfg.layer_noise_std[k] for k, d in enumerate(order)}
    else:
        std_of = {d: cfg.noise_std for ds in depths for d in ds}
    out = []
    for key, h, leaf in zip(jax.random.split(rng, len(hs)), hs, layout.leaves):
        std = _per_layer([std_of[d] for d in leaf.depths], leaf, h.ndim)
        out.append(std * jax.random.normal(key, h.shape, jnp.float32))
    return _continuing(inp, out)


def _fitted_noise(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    hs = inp.layout.recurrent(inp.fresh)
    means, stds = fitted_moments(inp.stats, cfg.stats_decay)
    out = [jnp.expand_dims(m, ax) + jnp.expand_dims(s, ax) * jax.random.normal(k, h.shape, jnp.float32)
           for k, h, m, s, ax in zip(jax.random.split(rng, len(hs)), hs, means, stds, _rows(inp.layout))]
    return _continuing(inp, out)


def _state_passing(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    del cfg, rng
    rolled = [jax.lax.stop_gradient(jnp.roll(h, 1, axis=ax))
              for h, ax in zip(inp.layout.recurrent(inp.carry), _rows(inp.layout))]
    return _continuing(inp, rolled)


def _tbptt(cfg: InterventionConfig, inp: Inputs, rng: jax.Array) -> ModelState:
    del rng
    carry = jax.lax.stop_gradient(inp.carry)
    return carry if cfg.carry_attention else inp.layout.only_recurrent_layers(carry, inp.fresh)


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
        state = inp.layout.select_rows(chosen_B, INTERVENTIONS[cfg.kind](cfg, inp, kind_key), state)
        touched_B = touched_B | chosen_B
    return state, touched_B


def state_rms(layout: StateLayout, state: ModelState) -> jax.Array:
    """Root-mean-square of all recurrent states (a scalar diagnostic; 0 without recurrent layers)."""
    hs = layout.recurrent(state)
    if not hs:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(jnp.square(jnp.asarray(h, jnp.float32))) for h in hs)
    return jnp.sqrt(total / sum(h.size for h in hs))


__all__ = ["INTERVENTIONS", "InterventionConfig", "Inputs", "StateStats", "check_interventions", "fitted_moments",
           "init_stats", "initial_state", "needs_carry", "needs_stats", "state_rms", "stats_decay", "tbptt_start",
           "update_stats"]
