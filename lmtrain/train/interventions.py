"""Initial-state interventions for length generalization (DESIGN.md §3).

Training only ever from `h0 = 0` visits a narrow set of recurrent states; these replace the
initial state of every recurrent (R) layer, per row, before the forward pass:

- `noise`: h0 ~ N(0, noise_std^2);
- `fitted_noise`: h0 ~ N(mean, std^2), per layer and channel, from running statistics of the final
  states seen in training (`StateStats`, saved with the train state);
- `state_passing`: h0 = the final state of a different sequence (the previous step's rows, rolled
  by one row), with stop-gradient.

Each applies to a row with probability `prob`, and only for steps in [start_step, end_step).
A row that gets an intervention is marked as continuing (`segment_B` = its first segment id), so
the first token uses the state instead of resetting (see the state contract in docs/models.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lmtrain.configlib import ConfigError, field
from lmtrain.models.model import ModelState
from lmtrain.models.rglru import RecurrentState

KINDS = ("none", "noise", "fitted_noise", "state_passing")


@dataclasses.dataclass(frozen=True)
class InterventionConfig:
    """Which initial-state intervention to apply, how often, and when."""

    kind: Literal["none", "noise", "fitted_noise", "state_passing"] = field(
        "none", "Initial recurrent state per row: none (zeros), noise (N(0, noise_std^2)), fitted_noise "
                "(N(mean, std^2) from running final-state statistics), state_passing (another row's final "
                "state from the previous step).")
    prob: float = field(1.0, "Probability that a row gets the intervention at a step.")
    start_step: int = field(0, "First step (inclusive) at which the intervention is applied.")
    end_step: int = field(-1, "Step (exclusive) after which it stops; -1 = until the end.")
    noise_std: float = field(1.0, "Standard deviation of the `noise` intervention.")
    stats_decay: float = field(0.99, "EMA decay of the running mean / mean-square of final states "
                                     "(used by fitted_noise; always tracked).")

    def validate(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"prob must be in [0, 1], got {self.prob}")
        if self.noise_std < 0 or not 0.0 <= self.stats_decay < 1.0:
            raise ConfigError("noise_std must be >= 0 and stats_decay in [0, 1)")
        if self.end_step != -1 and self.end_step <= self.start_step:
            raise ConfigError(f"end_step {self.end_step} must be > start_step {self.start_step} (or -1)")


class StateStats(NamedTuple):
    """Running per-layer, per-channel statistics of final recurrent states (float32)."""

    mean: tuple  # per recurrent state in ModelState order: [..., L] (stacked groups keep the layer axis)
    mean_sq: tuple
    count: jax.Array  # number of updates (for bias correction)


def _recurrent_leaves(state: ModelState) -> list[jax.Array]:
    """The h arrays of every R layer, in a fixed order (groups, then tail)."""
    return [s.h_BxL for s in (*state.groups, *state.tail) if isinstance(s, RecurrentState)]


def _replace_recurrent(state: ModelState, new_h: list[jax.Array]) -> ModelState:
    it = iter(new_h)
    swap = lambda s: s._replace(h_BxL=next(it)) if isinstance(s, RecurrentState) else s
    return state._replace(groups=tuple(swap(s) for s in state.groups), tail=tuple(swap(s) for s in state.tail))


def has_recurrent_layers(state: ModelState) -> bool:
    return bool(_recurrent_leaves(state))


def init_stats(state: ModelState) -> StateStats:
    """Zero statistics shaped like the per-channel state of each R layer (batch axis dropped)."""
    zeros = tuple(jnp.zeros(h.shape[:-2] + h.shape[-1:], jnp.float32) for h in _recurrent_leaves(state))
    return StateStats(zeros, zeros, jnp.zeros((), jnp.int32))


def update_stats(stats: StateStats, final: ModelState, decay: float) -> StateStats:
    """EMA of mean and mean-square over the batch of final states (bias-corrected when read)."""
    hs = _recurrent_leaves(final)
    mean = tuple(decay * m + (1 - decay) * jnp.mean(h, axis=-2) for m, h in zip(stats.mean, hs))
    mean_sq = tuple(decay * m + (1 - decay) * jnp.mean(jnp.square(h), axis=-2) for m, h in zip(stats.mean_sq, hs))
    return StateStats(mean, mean_sq, stats.count + 1)


def fitted_moments(stats: StateStats, decay: float) -> tuple[list[jax.Array], list[jax.Array]]:
    """Bias-corrected (mean, std) per layer and channel."""
    correction = 1.0 - decay ** jnp.maximum(stats.count, 1).astype(jnp.float32)
    means = [m / correction for m in stats.mean]
    stds = [jnp.sqrt(jnp.maximum(s / correction - jnp.square(m), 0.0)) for m, s in zip(means, stats.mean_sq)]
    return means, stds


def initial_state(cfg: InterventionConfig, fresh: ModelState, step: jax.Array, rng: jax.Array,
                  first_segment_B: jax.Array, stats: StateStats | None = None,
                  previous: ModelState | None = None) -> ModelState:
    """The initial state for this step's batch: `fresh` with the intervention applied to chosen rows."""
    if cfg.kind == "none":
        return fresh
    active = step >= cfg.start_step
    if cfg.end_step != -1:
        active = active & (step < cfg.end_step)
    hs = _recurrent_leaves(fresh)
    batch = fresh.segment_B.shape[0]
    pick_key, *noise_keys = jax.random.split(rng, len(hs) + 1)
    chosen_B = active & (jax.random.uniform(pick_key, (batch,)) < cfg.prob)
    if cfg.kind == "noise":
        new = [cfg.noise_std * jax.random.normal(k, h.shape, jnp.float32) for k, h in zip(noise_keys, hs)]
    elif cfg.kind == "fitted_noise":
        means, stds = fitted_moments(stats, cfg.stats_decay)
        new = [jnp.expand_dims(m, -2) + jnp.expand_dims(s, -2) * jax.random.normal(k, h.shape, jnp.float32)
               for k, h, m, s in zip(noise_keys, hs, means, stds)]
    else:  # state_passing: another row's final state from the previous step
        new = [jax.lax.stop_gradient(jnp.roll(h, 1, axis=-2)) for h in _recurrent_leaves(previous)]
    mix = lambda n, h: jnp.where(chosen_B[:, None], n, h)
    out = _replace_recurrent(fresh, [mix(n, h) for n, h in zip(new, hs)])
    return out._replace(segment_B=jnp.where(chosen_B, first_segment_B, fresh.segment_B))


__all__ = ["InterventionConfig", "StateStats", "fitted_moments", "has_recurrent_layers",
           "init_stats", "initial_state", "update_stats"]
