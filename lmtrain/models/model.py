"""`LanguageModel`: embeddings, layers from a cycled pattern string, tied output projection.

    logits_BxTxV, state = model(tokens_BxT, segment_ids=None, positions=None, state=None)
    hidden_BxTxD, state = model.hidden(tokens_BxT, ...)   # final normed hidden states; same args
    logits_BxTxV = model.logits(hidden_BxTxD)
    state = model.init_state(batch_size)
    axes = model.state_axes()            # the same tree, each leaf a tuple of logical axis names

For training, `lmtrain.models.loss.chunked_cross_entropy(hidden_BxTxD, model.embedder.embedding[...],
...)` computes the loss from `hidden` without materialising the [B, T, V] logits.

Running a sequence in one call equals running it in pieces with the state passed along, and
equals token-by-token decoding. `segment_ids` mark documents: every layer resets where the id
changes, also between calls (the state remembers the last id). A fresh state (`None` or
`init_state`) has segment -1: the first token starts a document (a = 0, input multiplier 1, as in
recurrentgemma). To start from a fabricated history instead (noise, another sequence's final
state), set `segment_B` to the first segment id of the next call (0 when `segment_ids` is None):
then the first token continues from the given state. Positions default to the position within the
document, continuing across calls.

Layers are grouped by pattern repeats: `groups[i]` stacks (leading axis `layers`) the parameters
of every layer with letter `pattern[i]` in the full repeats; the remaining layers are `tail`.
With `scan_layers` the repeats run under `jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.models.blocks import ResidualBlock
from lmtrain.models.config import ModelConfig
from lmtrain.models.layers import Embedder, RMSNorm
from lmtrain.models.layout import StateLayout
from lmtrain.models.mixers import MIXERS
from lmtrain.models.state import ModelState, SeqContext
from lmtrain.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _stacked_blocks(cfg: ModelConfig, kind: str, repeats: int, rngs: nnx.Rngs) -> ResidualBlock:
    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make(rngs: nnx.Rngs) -> ResidualBlock:
        return ResidualBlock(cfg, kind, rngs=rngs)

    return make(rngs)


class LanguageModel(nnx.Module):
    """Hybrid recurrent/attention language model (Griffin, Hawk, Transformer baselines)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embedder = Embedder(cfg.vocab_size, cfg.width, rngs=rngs, scale_by_sqrt_width=cfg.embed_scale,
                                 dtype=dtype, param_dtype=param_dtype)
        self.repeats, n_tail = divmod(cfg.num_layers, len(cfg.pattern))
        self.groups = nnx.List([_stacked_blocks(cfg, kind, self.repeats, rngs)
                                for kind in (cfg.pattern if self.repeats else "")])
        self.tail = nnx.List([ResidualBlock(cfg, kind, rngs=rngs) for kind in cfg.pattern[:n_tail]])
        self.final_norm = RMSNorm(cfg.width, rngs=rngs, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)

    # ----------------------------------------------------------------------------------- state
    def init_state(self, batch_size: int) -> ModelState:
        """The state at the start of a document (zeros; empty attention buffers)."""
        cfg = self.cfg

        def stacked(kind: str) -> Any:
            one = MIXERS[kind].init_state(cfg, batch_size)
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.repeats, *x.shape)), one)

        return ModelState(jnp.zeros((batch_size,), jnp.int32), jnp.full((batch_size,), -1, jnp.int32),
                          tuple(stacked(k) for k in (cfg.pattern if self.repeats else "")),
                          tuple(MIXERS[k].init_state(cfg, batch_size) for k in cfg.pattern[:len(self.tail)]))

    def state_axes(self) -> ModelState:
        """Logical axis names of every leaf of `init_state(...)` (stacked groups lead with `layers`)."""
        return StateLayout(self.cfg).axes

    def _check_state(self, state: ModelState, batch_size: int) -> None:
        want = jax.eval_shape(lambda: self.init_state(batch_size))
        got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(state)
        if got_tree != jax.tree.structure(want):
            raise ValueError("state does not match this model's layer structure (pattern/num_layers); "
                             "build it with model.init_state(batch_size) of the same config")
        for (path, got), w in zip(got_leaves, jax.tree.leaves(want)):
            if got.shape != w.shape or got.dtype != w.dtype:
                raise ValueError(f"state leaf {jax.tree_util.keystr(path)} has {got.dtype}{list(got.shape)}, "
                                 f"this model (batch {batch_size}) expects {w.dtype}{list(w.shape)}; "
                                 "a state from another config or batch size cannot be used")

    # ---------------------------------------------------------------------------------- inputs
    def _context(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
                 state: ModelState | None) -> tuple[SeqContext, jax.Array, jax.Array]:
        b, t = tokens_BxT.shape
        prev_seg_B = jnp.full((b,), -1, jnp.int32) if state is None else state.segment_B
        start_pos_B = jnp.zeros((b,), jnp.int32) if state is None else state.position_B
        if segment_ids is None:
            seg_BxT = jnp.broadcast_to(jnp.maximum(prev_seg_B, 0)[:, None], (b, t))
        else:
            seg_BxT = jnp.asarray(segment_ids, jnp.int32)
        before_BxT = jnp.concatenate([prev_seg_B[:, None], seg_BxT[:, :-1]], axis=1)
        reset_BxT = seg_BxT != before_BxT
        if positions is None:
            idx_T = jnp.arange(t, dtype=jnp.int32)
            last_reset_BxT = jax.lax.cummax(jnp.where(reset_BxT, idx_T, -1), axis=1)
            positions = jnp.where(last_reset_BxT >= 0, idx_T - last_reset_BxT, start_pos_B[:, None] + idx_T)
        positions = jnp.asarray(positions, jnp.int32)
        return SeqContext(reset_BxT, positions, seg_BxT), positions[:, -1] + 1, seg_BxT[:, -1]

    def _check_inputs(self, tokens_BxT: Any, segment_ids: Any, positions: Any) -> None:
        if not hasattr(tokens_BxT, "dtype") or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
            raise TypeError(f"tokens must be an integer array [batch, length], got "
                            f"{getattr(tokens_BxT, 'dtype', type(tokens_BxT))}")
        if tokens_BxT.ndim != 2 or tokens_BxT.shape[1] == 0:
            raise ValueError(f"tokens must have shape [batch, length>0], got {tokens_BxT.shape}")
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and tuple(arr.shape) != tuple(tokens_BxT.shape):
                raise ValueError(f"{name} shape {tuple(arr.shape)} != tokens shape {tuple(tokens_BxT.shape)}")
        if not isinstance(tokens_BxT, jax.core.Tracer):  # concrete ids: check the range eagerly
            ids = np.asarray(tokens_BxT)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{lo}, {hi}]; "
                                 "the tokenizer's vocabulary must fit model.vocab_size")
        for kind in dict.fromkeys(self.cfg.pattern):
            limit = MIXERS[kind].max_call_len(self.cfg)
            if limit is not None and tokens_BxT.shape[1] > limit:
                mixer = MIXERS[kind]
                raise ValueError(f"sequence length {tokens_BxT.shape[1]} exceeds {limit}, the longest call the "
                                 f"{mixer.__name__} ({kind}) layers take; raise model.{mixer.limit_field}")

    # --------------------------------------------------------------------------------- forward
    def __call__(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 state: ModelState | None = None) -> tuple[jax.Array, ModelState]:
        """tokens_BxT int -> logits_BxTxV float32 and the state after the last token."""
        hidden_BxTxD, state = self.hidden(tokens_BxT, segment_ids, positions, state)
        return self.logits(hidden_BxTxD), state

    def hidden(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None,
               state: ModelState | None = None) -> tuple[jax.Array, ModelState]:
        """tokens_BxT int -> final normed hidden states hidden_BxTxD (compute dtype) and the state."""
        self._check_inputs(tokens_BxT, segment_ids, positions)
        if state is not None:
            self._check_state(state, tokens_BxT.shape[0])
        ctx, next_pos_B, last_seg_B = self._context(tokens_BxT, segment_ids, positions, state)
        x_BxTxD = constrain(self.embedder.encode(tokens_BxT), ("batch", "length", "embed"))
        group_states = None if state is None else state.groups
        tail_states = (None,) * len(self.tail) if state is None else state.tail
        if self.repeats:
            x_BxTxD, group_states = self._run_groups(x_BxTxD, ctx, group_states)
        new_tail = []
        for block, s in zip(self.tail, tail_states):
            x_BxTxD, s = self._apply(nnx.split(block), x_BxTxD, ctx, s)
            new_tail.append(s)
        hidden_BxTxD = constrain(self.final_norm(x_BxTxD), ("batch", "length", "embed"))
        return hidden_BxTxD, ModelState(next_pos_B, last_seg_B, tuple(group_states), tuple(new_tail))

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """hidden_BxTxD -> logits_BxTxV float32 (tied output projection, tanh soft-cap)."""
        logits_BxTxV = self.embedder.decode(hidden_BxTxD)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits_BxTxV = jnp.tanh(logits_BxTxV / cap) * cap
        return constrain(logits_BxTxV, ("batch", "length", "vocab"))

    def _apply(self, split_block: tuple, x_BxTxD: jax.Array, ctx: SeqContext, state: Any) -> tuple:
        """One residual block from its (graphdef, params), rematerialised as configured."""
        graphdef, params = split_block

        def run(params: Any, x_BxTxD: jax.Array, ctx: SeqContext, state: Any) -> tuple:
            x_BxTxD, state = nnx.merge(graphdef, params)(x_BxTxD, ctx, state)
            return constrain(x_BxTxD, ("batch", "length", "embed")), state

        if self.cfg.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.cfg.remat])
        return run(params, x_BxTxD, ctx, state)

    def _run_groups(self, x_BxTxD: jax.Array, ctx: SeqContext, states: tuple | None) -> tuple:
        """Runs the `repeats` full pattern groups (scanned or unrolled)."""
        graphdefs, params = zip(*(nnx.split(g) for g in self.groups))
        if states is None:
            states = (None,) * len(graphdefs)

        def one_repeat(x_BxTxD: jax.Array, xs: tuple) -> tuple:
            params_r, states_r = xs
            new_states = []
            for graphdef, p, s in zip(graphdefs, params_r, states_r):
                x_BxTxD, s = self._apply((graphdef, p), x_BxTxD, ctx, s)
                new_states.append(s)
            return x_BxTxD, tuple(new_states)

        if self.cfg.scan_layers:
            return jax.lax.scan(one_repeat, x_BxTxD, (params, states))
        outs = []
        for r in range(self.repeats):
            x_BxTxD, out = one_repeat(x_BxTxD, jax.tree.map(lambda a, r=r: a[r], (params, states)))
            outs.append(out)
        return x_BxTxD, jax.tree.map(lambda *a: jnp.stack(a), *outs)
