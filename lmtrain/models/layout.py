"""`StateLayout`: generic views of a model's state, derived from what each layer kind declares.

    layout = StateLayout(cfg)                     # cfg: ModelConfig
    hs = layout.recurrent(state)                  # every layer kind's "recurrent state" leaves
    state = layout.with_recurrent(state, new_hs)  # the same leaves replaced
    layout.depths                                 # per leaf: the depth of each layer it holds
    rows = layout.batch_axes(state_or_like)       # per state leaf: the axis of its rows

Leaves are in a fixed order (groups, then tail). A stacked group's leaf holds one layer per repeat on
its leading `layers` axis; its rows are on the `batch` axis of its logical axes. Interventions,
statistics, state norms, gradient-accumulation row splits and state shardings use only this.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmtrain.models.base_config import CoreConfig
from lmtrain.models.mixers import MIXERS
from lmtrain.models.state import ModelState, batch_axis, is_axes, layer_slots, map_with_axes


class RecurrentLeaf(NamedTuple):
    """One recurrent-state leaf: `state.<part>[index].<field>`, holding the layers at `depths`."""

    part: str  # "groups" or "tail"
    index: int
    field: str
    kind: str
    depths: tuple[int, ...]  # one per repeat for groups (along the `layers` axis), one for tail
    axes: tuple[str, ...]  # logical axes of the leaf


class StateLayout:
    """Where each layer's state lives and which leaves are recurrent states, for one model config."""

    def __init__(self, cfg: CoreConfig):
        self.cfg = cfg
        repeats, n_tail = divmod(cfg.num_layers, len(cfg.pattern))
        stack = lambda axes: ("layers", *axes)
        group_axes = tuple(jax.tree.map(stack, MIXERS[k].state_axes(cfg), is_leaf=is_axes)
                           for k in (cfg.pattern if repeats else ""))
        tail_axes = tuple(MIXERS[k].state_axes(cfg) for k in cfg.pattern[:n_tail])
        self.axes = ModelState(("batch",), ("batch",), group_axes, tail_axes)
        slots = layer_slots(cfg.pattern, cfg.num_layers)
        leaves = []
        for part, kinds in (("groups", cfg.pattern if repeats else ""), ("tail", cfg.pattern[:n_tail])):
            for index, kind in enumerate(kinds):
                name = MIXERS[kind].recurrent_field
                if name is None:
                    continue
                depths = tuple(s.depth for s in slots if s.part == part and s.index == index)
                axes = getattr(getattr(self.axes, part)[index], name)
                leaves.append(RecurrentLeaf(part, index, name, kind, depths, axes))
        self.leaves = leaves
        # layer kinds whose state grows with the context (cannot be carried across training steps)
        self.unbounded = [f"{MIXERS[k].__name__} ({k})" for k in dict.fromkeys(cfg.pattern)
                          if not MIXERS[k].bounded_state]

    @property
    def depths(self) -> list[tuple[int, ...]]:
        return [leaf.depths for leaf in self.leaves]

    def recurrent(self, state: ModelState) -> list[jax.Array]:
        """The recurrent-state leaves of `state`, in `self.leaves` order."""
        return [getattr(getattr(state, leaf.part)[leaf.index], leaf.field) for leaf in self.leaves]

    def with_recurrent(self, state: ModelState, new: list[jax.Array]) -> ModelState:
        """`state` with its recurrent-state leaves replaced by `new` (same order and shapes)."""
        parts = {"groups": list(state.groups), "tail": list(state.tail)}
        for leaf, h in zip(self.leaves, new, strict=True):
            parts[leaf.part][leaf.index] = parts[leaf.part][leaf.index]._replace(**{leaf.field: h})
        return state._replace(groups=tuple(parts["groups"]), tail=tuple(parts["tail"]))

    def only_recurrent_layers(self, state: ModelState, fresh: ModelState) -> ModelState:
        """`state` for layers whose kind has a recurrent state, `fresh` for the others (e.g. attention)."""
        keep = lambda kind, s, f: s if MIXERS[kind].recurrent_field is not None else f
        return state._replace(  # groups and tail both follow the pattern's letters from its start
            groups=tuple(keep(k, s, f) for k, s, f in zip(self.cfg.pattern, state.groups, fresh.groups)),
            tail=tuple(keep(k, s, f) for k, s, f in zip(self.cfg.pattern, state.tail, fresh.tail)))

    def layers(self, state: ModelState) -> list[tuple[int, str, jax.Array]]:
        """(depth, kind, recurrent state [B, ...]) of every layer with one, in depth order."""
        out = []
        for leaf, h in zip(self.leaves, self.recurrent(state)):
            if leaf.part == "groups":
                out += [(d, leaf.kind, h[r]) for r, d in enumerate(leaf.depths)]
            else:
                out.append((leaf.depths[0], leaf.kind, h))
        return sorted(out, key=lambda x: x[0])

    def map_rows(self, fn: Any, *states: Any) -> Any:
        """`fn(rows_axis, *leaves)` over every leaf of ModelState-shaped trees."""
        return map_with_axes(lambda axes, *xs: fn(batch_axis(axes), *xs), self.axes, *states)

    def select_rows(self, chosen_B: jax.Array, new: ModelState, old: ModelState) -> ModelState:
        """`new` on the chosen rows, `old` elsewhere, leaf by leaf."""
        def pick(axis: int, n: jax.Array, o: jax.Array) -> jax.Array:
            shape = [1] * n.ndim
            shape[axis] = -1
            return jnp.where(chosen_B.reshape(shape), n, o)

        return self.map_rows(pick, new, old)


__all__ = ["RecurrentLeaf", "StateLayout"]
