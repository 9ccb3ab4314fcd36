"""Logical axis names -> mesh axes.

Parameters carry logical axis names in their `logical_axes` metadata (e.g. `("embed", "mlp")`),
activations are annotated with `constrain(x, ("batch", "length", "embed"))`, and every leaf of a
model state has logical axes too (`LanguageModel.state_axes()`, e.g. `("batch", "cache_length",
"kv", "head_dim")` for an attention KV cache). A rules table
maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated). Outside a
`use_rules(mesh, rules)` context `constrain` is the identity, so models run unsharded as-is.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, str | tuple[str, ...] | None]

# Logical names used by the models (parameters, activations, states); the trainer's default rules map
# each of them. `length` is the activations' sequence axis, `cache_length` a state's (KV cache) one.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "head_dim", "vocab", "lru", "layers",
                "conv", "cache_length", "state")

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("lmtrain_rules",
                                                                                    default=None)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (later uses replicate)."""
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context `constrain` applies sharding constraints on `mesh` via `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for activation `x` with logical `axes` (identity without rules)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
