"""What a model carries between calls (`ModelState`), per-call bookkeeping (`SeqContext`), and where
each layer's state lives.

    slots = layer_slots("RRA", num_layers=5)   # depth -> (kind, part, index, repeat)
    axis = batch_axis(("layers", "batch", "lru"))   # 1: the rows of a state leaf, from its logical axes

Layers are grouped by pattern repeats (see `LanguageModel`): `state.groups[i]` holds the state of
every layer with letter `pattern[i]` in the full repeats, stacked on a leading `layers` axis;
`state.tail[j]` holds the state of one of the remaining layers. Every leaf of a state has logical
axis names (`LanguageModel.state_axes()`), and generic code finds rows, layers and channels from
those names, never from field names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax


class SeqContext(NamedTuple):
    """Per-token bookkeeping shared by all layers of one call."""

    reset_BxT: jax.Array  # bool: token t starts a new document (state must not leak in)
    positions_BxT: jax.Array  # int32: position within the document (RoPE)
    segment_ids_BxT: jax.Array  # int32: document id (attention masking)


class ModelState(NamedTuple):
    """Everything a model carries between calls (a pytree of arrays)."""

    position_B: jax.Array  # int32: position of the next token within its document
    segment_B: jax.Array  # int32: segment id of the last token seen; -1 = fresh (next token starts a doc)
    groups: tuple  # per pattern letter: that mixer's state stacked over repeats (leading `layers` axis)
    tail: tuple  # per remaining layer: its mixer state


class LayerSlot(NamedTuple):
    """Where layer `depth` lives: `state.<part>[index]`, at `repeat` along the stacked axis (groups)."""

    depth: int
    kind: str  # the mixer letter
    part: str  # "groups" or "tail"
    index: int
    repeat: int | None  # None for tail layers (not stacked)


def layer_slots(pattern: str, num_layers: int) -> list[LayerSlot]:
    """The slot of every layer, in depth order (the one mapping from layer index to state/params)."""
    period = len(pattern)
    repeats, n_tail = divmod(num_layers, period)
    slots = [LayerSlot(r * period + i, pattern[i], "groups", i, r) for r in range(repeats) for i in range(period)]
    slots += [LayerSlot(repeats * period + j, pattern[j], "tail", j, None) for j in range(n_tail)]
    return sorted(slots)


def batch_axis(axes: Sequence[str | None]) -> int:
    """The axis holding the rows in a state leaf with logical `axes`."""
    return list(axes).index("batch")


def is_axes(x: Any) -> bool:
    """A leaf of a logical-axes tree: a non-empty tuple of axis names (every state leaf has `batch`)."""
    return isinstance(x, tuple) and bool(x) and all(isinstance(a, str) or a is None for a in x)


def map_with_axes(fn: Any, axes_tree: Any, *trees: Any) -> Any:
    """`fn(axes, *leaves)` over state trees, with each leaf's logical axes (an `axes_tree` of tuples)."""
    return jax.tree.map(fn, axes_tree, *trees, is_leaf=is_axes)


__all__ = ["LayerSlot", "ModelState", "SeqContext", "batch_axis", "is_axes", "layer_slots", "map_with_axes"]
