"""Optimizer, learning-rate schedules, EMA and gradient-norm diagnostics.

`make_optimizer` builds clip-by-global-norm + AdamW. Weight decay applies only to parameters whose
leaf name is in `OptimizerConfig.decay_params` (default: matrices named `kernel`), so norm scales,
biases, embeddings and the RG-LRU `a_param` are not decayed. The mask works on `nnx.State` trees and
on the pure dicts of `nnx.to_pure_dict` alike: a leaf's name is the last key of its path.

Schedules are closed-form functions of the step, built by a registry keyed by `ScheduleConfig.kind`.
Warmup is linear from 0 at step 0 to `lr` at `warmup_steps`; decays end at `lr * min_lr_ratio`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from lmtrain import configlib
from lmtrain.configlib import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping, masked weight decay and optional EMA of the parameters."""

    lr: float = configlib.field(3e-4, help="Peak learning rate.")
    b1: float = configlib.field(0.9, help="Adam first-moment decay.")
    b2: float = configlib.field(0.95, help="Adam second-moment decay.")
    eps: float = configlib.field(1e-8, help="Adam epsilon.")
    weight_decay: float = configlib.field(0.1, help="Decoupled weight decay (multiplied by the current lr).")
    grad_clip_norm: float = configlib.field(1.0, help="Clip gradients to this global norm (0: no clipping).")
    decay_params: tuple[str, ...] = configlib.field(
        ("kernel",), help="Leaf names of parameters that get weight decay (e.g. add 'embedding').")
    ema_decay: float = configlib.field(0.0, help="EMA of parameters with this decay per step (0: off).")

    def validate(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ConfigError("lr, weight_decay and grad_clip_norm must be >= 0")
        for name in ("b1", "b2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then a decay shape chosen by `kind`."""

    kind: Literal["warmup_cosine", "warmup_linear", "wsd", "constant"] = configlib.field(
        "warmup_cosine", help="warmup_cosine | warmup_linear | wsd (warmup-stable-decay) | constant.")
    warmup_steps: int = configlib.field(1000, help="Steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = configlib.field(0.1, help="Final lr as a fraction of lr (cosine, linear, wsd).")
    decay_fraction: float = configlib.field(0.2, help="wsd: fraction of total steps spent decaying at "
                                                      "the end.")
    decay_shape: Literal["linear", "cosine", "sqrt"] = configlib.field(
        "sqrt", help="wsd: decay shape; 'sqrt' is 1 - sqrt(progress) (Hägele et al. 2024).")

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in [0, 1]")


# --- schedules -----------------------------------------------------------------------------------

DECAY_SHAPES: dict[str, Callable[[jax.Array], jax.Array]] = {
    # progress p in [0, 1] -> multiplier going from 1 to 0
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + jnp.cos(math.pi * p)),
    "sqrt": lambda p: 1.0 - jnp.sqrt(p),
}


def _warmup_then(lr: float, warmup: int, after: Callable[[jax.Array], jax.Array],
                 start_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup start_lr -> lr over `warmup` steps, then `after(step)`."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = start_lr + (lr - start_lr) * step / max(warmup, 1)
        return jnp.where(step < warmup, ramp, after(step))

    return schedule


def _decay(lr: float, min_ratio: float, start: int, end: int, shape: str) -> Callable[[jax.Array], jax.Array]:
    """lr * (min + (1 - min) * shape(progress)), progress going 0 -> 1 from `start` to `end`."""

    def after(step):
        progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
        return lr * (min_ratio + (1.0 - min_ratio) * DECAY_SHAPES[shape](progress))

    return after


def _warmup_cosine(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, start_lr: float) -> optax.Schedule:
    return _warmup_then(opt.lr, sched.warmup_steps,
                        _decay(opt.lr, sched.min_lr_ratio, sched.warmup_steps, total_steps, "cosine"), start_lr)


def _warmup_linear(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, start_lr: float) -> optax.Schedule:
    return _warmup_then(opt.lr, sched.warmup_steps,
                        _decay(opt.lr, sched.min_lr_ratio, sched.warmup_steps, total_steps, "linear"), start_lr)


def _wsd(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, start_lr: float) -> optax.Schedule:
    decay_start = max(sched.warmup_steps, total_steps - round(sched.decay_fraction * total_steps))
    decay = _decay(opt.lr, sched.min_lr_ratio, decay_start, total_steps, sched.decay_shape)
    return _warmup_then(opt.lr, sched.warmup_steps,
                        lambda step: jnp.where(step < decay_start, opt.lr, decay(step)), start_lr)


def _constant(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, start_lr: float) -> optax.Schedule:
    return _warmup_then(opt.lr, sched.warmup_steps, lambda step: jnp.full_like(step, opt.lr), start_lr)


SCHEDULES: dict[str, Callable[[OptimizerConfig, ScheduleConfig, int, float], optax.Schedule]] = {
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "wsd": _wsd,
    "constant": _constant,
}


def make_schedule(opt_cfg: OptimizerConfig, sched_cfg: ScheduleConfig, total_steps: int,
                  stages: Sequence[Any] = ()) -> optax.Schedule:
    """The learning rate as a function of the (0-based) optimizer step.

    With continual-pretraining `stages` (`StageConfig`s: start_step, lr, warmup_steps, min_lr_ratio),
    the schedule restarts at each stage's start: the first piece decays by the end of stage 0 (the
    first start_step); each stage re-warms linearly from the lr the previous stage ended at to its own
    peak (`lr`, 0 = optimizer.lr) over its `warmup_steps`, then re-decays with `schedule.kind` to
    `min_lr_ratio` (-1 = schedule.min_lr_ratio) at the end of the stage.
    """
    if sched_cfg.kind not in SCHEDULES:
        raise ConfigError(f"schedule.kind: unknown '{sched_cfg.kind}'"
                          f"{configlib.did_you_mean(sched_cfg.kind, list(SCHEDULES))}")
    stages = [s for s in stages if s.start_step < total_steps]  # a later stage is never reached
    bounds = [0, *(s.start_step for s in stages), total_steps]
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"stages: start steps {bounds[1:-1]} must increase and lie inside the "
                          f"{total_steps} training steps")
    pieces, start_lr = [], 0.0
    for i, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        opt, sched = opt_cfg, sched_cfg
        if i:
            stage = stages[i - 1]
            opt = dataclasses.replace(opt_cfg, lr=stage.lr or opt_cfg.lr)
            sched = dataclasses.replace(sched_cfg, warmup_steps=stage.warmup_steps, min_lr_ratio=(
                stage.min_lr_ratio if stage.min_lr_ratio >= 0 else sched_cfg.min_lr_ratio))
        if end - begin < sched.warmup_steps:
            if not i:  # e.g. a smoke test with few steps: warm up over all of them
                log.warning("schedule.warmup_steps=%d is longer than the first %d steps (train.steps or the first "
                            "stage's start): warming up over %d steps instead", sched.warmup_steps, end - begin,
                            end - begin)
                sched = dataclasses.replace(sched, warmup_steps=end - begin)
            else:
                raise ConfigError(f"stages[{i - 1}] lasts {end - begin} steps, shorter than its warmup_steps="
                                  f"{sched.warmup_steps}")
        pieces.append(SCHEDULES[sched.kind](opt, sched, end - begin, start_lr))
        start_lr = float(pieces[-1](end - begin))
    if len(pieces) == 1:
        return pieces[0]

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = pieces[0](step)
        for begin, piece in zip(bounds[1:-1], pieces[1:]):
            lr = jnp.where(step >= begin, piece(step - begin), lr)
        return lr

    return schedule


# --- optimizer -----------------------------------------------------------------------------------

def key_name(key: Any) -> Any:
    """The name in one path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def leaf_name(path: tuple[Any, ...]) -> str:
    """Name of the parameter at `path`: its last key, skipping an `nnx.Variable`'s `.value`."""
    names = [key_name(k) for k in path]
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return str(names[-1]) if names else ""


def decay_mask(params: Any, decay_params: tuple[str, ...] | list[str]) -> Any:
    """Tree of bools, True where the leaf's name is in `decay_params`."""
    wanted = frozenset(decay_params)
    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) in wanted, params)


def make_optimizer(opt_cfg: OptimizerConfig, sched_cfg: ScheduleConfig, total_steps: int,
                   stages: Sequence[Any] = ()) -> optax.GradientTransformation:
    """clip_by_global_norm (if grad_clip_norm > 0) + AdamW with decay only on `decay_params` leaves."""
    schedule = make_schedule(opt_cfg, sched_cfg, total_steps, stages)
    adamw = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                        weight_decay=opt_cfg.weight_decay,
                        mask=lambda params: decay_mask(params, opt_cfg.decay_params))
    if opt_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), adamw)
    return adamw


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_params: Any, param_specs: Any,
                    replicated: Any) -> Any:
    """Shardings (or specs) for `optimizer.init(abstract_params)`: each parameter-shaped subtree of
    the optimizer state (Adam moments) gets `param_specs`; other leaves (counts) get `replicated`."""
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_state, param_specs,
                                 transform_non_params=lambda _: replicated)


# --- EMA -----------------------------------------------------------------------------------------

def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """decay * ema + (1 - decay) * params, leaf by leaf (computed in f32, stored in ema's dtype)."""
    def update(e, p):
        e32 = jnp.asarray(e, jnp.float32)
        return (decay * e32 + (1.0 - decay) * jnp.asarray(p, jnp.float32)).astype(jnp.result_type(e))

    return jax.tree.map(update, ema, params)


# --- gradient diagnostics ------------------------------------------------------------------------

def group_norms(tree: Any, depth: int = 1) -> dict[str, jax.Array]:
    """L2 norm (f32) of each group of leaves sharing the first `depth` path names, e.g. 'embed'."""
    squares: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(key_name(k)) for k in path[:depth]] or ["<root>"]
        group = "/".join(names)
        sq = jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)))
        squares[group] = squares[group] + sq if group in squares else sq
    return {group: jnp.sqrt(sq) for group, sq in squares.items()}


def grad_norms(grads: Any, depth: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(global L2 norm, per-group norms) of `grads`; both usable inside `jit`."""
    groups = group_norms(grads, depth)
    total = jnp.sqrt(sum((n * n for n in groups.values()), jnp.zeros((), jnp.float32)))
    return total, groups


def nonfinite_groups(norms: Mapping[str, Any]) -> list[str]:
    """Names of the groups whose norm is NaN or infinite (host-side, after the step)."""
    return [name for name, value in norms.items() if not math.isfinite(float(value))]
