"""Attention blocks: local sliding-window (A) and global (G) multi-/grouped-query attention.

A query at stream index t attends to keys at indices t-w .. t of its own document (w = window).
`windowed_attention` is blockwise: queries in blocks of Bq attend only to the w + Bq keys that
can reach them, so memory and FLOPs are O(T * (w + Bq)) and T x T scores are never formed.
The state is a buffer of the last `cache_len` keys/values (after RoPE) with their segment ids.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.configlib import ConfigError, field
from lmtrain.models.base_config import CoreConfig
from lmtrain.models.layers import Linear
from lmtrain.models.mixers.base import Mixer
from lmtrain.models.state import SeqContext
from lmtrain.sharding import constrain

_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """A and G layers: multi-/grouped-query attention, local (A, sliding window) or global (G)."""

    num_heads: int = field(4, "Query heads.")
    num_kv_heads: int = field(1, "Key/value heads (1 = multi-query, num_heads = multi-head, else grouped).")
    head_dim: int = field(0, "Head dim; 0 means model width // num_heads.")
    window: int = field(256, "Local attention window W: a query attends to itself and the W tokens before it.")
    block: int = field(128, "Query block size of blockwise attention (at most the window): each block of this "
                            "many queries scores window + block keys; 0 means `window`.")
    max_len: int = field(8192, "Context (KV-cache size) of global-attention (G) layers.")
    rope_base: float = field(10_000.0, "RoPE maximum wavelength.")
    rope_fraction: float = field(0.5, "Fraction of each head's dims rotated by RoPE (recurrentgemma: 0.5).")

    def validate(self) -> None:
        for name in ("num_heads", "num_kv_heads", "window", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.block < 0 or self.head_dim < 0:
            raise ConfigError("block and head_dim must be >= 0 (0 = derived default)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 0 <= self.rope_fraction <= 1 or self.rope_base <= 0:
            raise ConfigError(f"need rope_fraction in [0, 1] and rope_base > 0, got {self.rope_fraction}, "
                              f"{self.rope_base}")


def head_dim(cfg: CoreConfig) -> int:
    """The attention head dim of a model config."""
    return cfg.attention.head_dim or cfg.width // cfg.attention.num_heads


class AttentionState(NamedTuple):
    """Last S = cache_len keys/values in order (oldest first), their segment ids and validity."""

    k_BxSxKxH: jax.Array
    v_BxSxKxH: jax.Array
    segment_BxS: jax.Array
    valid_BxS: jax.Array


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, base: float, fraction: float) -> jax.Array:
    """Rotary embedding of the first `fraction` of each head's dims (rotate-half convention)."""
    rot = int(x_BxTxNxH.shape[-1] * fraction)
    if rot == 0:
        return x_BxTxNxH
    x_rot, x_pass = x_BxTxNxH[..., :rot], x_BxTxNxH[..., rot:]
    inv_freq = 1.0 / base ** (2 * jnp.arange(rot // 2) / rot)
    angle_BxTx1xR = positions_BxT[:, :, None, None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angle_BxTx1xR).astype(x_rot.dtype), jnp.cos(angle_BxTx1xR).astype(x_rot.dtype)
    first, second = jnp.split(x_rot, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, x_pass], axis=-1)


def windowed_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                       qseg_BxT: jax.Array, kseg_BxS: jax.Array, kvalid_BxS: jax.Array, *,
                       window: int, block: int) -> jax.Array:
    """Causal windowed attention of T queries over S = P + T keys (P cached ones first).

    Query t (stream index P + t among the keys) sees keys s with 0 <= P + t - s <= window, valid,
    and of the same segment. Softmax in float32. Returns [B, T, N, H].
    """
    b, t, n, h = q_BxTxNxH.shape
    s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    p = s - t
    w = min(window, s - 1)  # look-back that can matter; >= p since cache_len <= window
    bq = min(block, t)
    nb = -(-t // bq)
    tp = nb * bq
    pad_k = ((0, 0), (w - p, tp - t))  # left: missing look-back, right: query padding
    k_pad = jnp.pad(k_BxSxKxH, pad_k + ((0, 0), (0, 0)))
    v_pad = jnp.pad(v_BxSxKxH, pad_k + ((0, 0), (0, 0)))
    kseg = jnp.pad(kseg_BxS, pad_k, constant_values=-2)
    kvalid = jnp.pad(kvalid_BxS, pad_k)
    idx_nBxS = jnp.arange(nb)[:, None] * bq + jnp.arange(w + bq)[None]  # key span of each block
    kb = k_pad[:, idx_nBxS]  # [B, nB, w+Bq, K, H]
    vb = v_pad[:, idx_nBxS]
    qb = jnp.pad(q_BxTxNxH, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nb, bq, kv, n // kv, h)
    qseg = jnp.pad(qseg_BxT, ((0, 0), (0, tp - t)), constant_values=-3).reshape(b, nb, bq)
    logits = jnp.einsum("bnqkgh,bnskh->bnkgqs", qb, kb, preferred_element_type=jnp.float32) * h**-0.5
    i, u = jnp.arange(bq)[:, None], jnp.arange(w + bq)[None]
    rel_QxS = (i + w - u >= 0) & (i + w - u <= w)
    mask = rel_QxS & kvalid[:, idx_nBxS][:, :, None, :] & (qseg[..., None] == kseg[:, idx_nBxS][:, :, None, :])
    logits = jnp.where(mask[:, :, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(vb.dtype)
    out = jnp.einsum("bnkgqs,bnskh->bnqkgh", probs, vb)
    return out.reshape(b, tp, n, h)[:, :t]


class Attention(Mixer):
    """MQA/GQA attention over the last `cache_len(cfg)` tokens; subclasses pick the span."""

    section = "attention"
    Config = AttentionConfig

    def __init__(self, cfg: CoreConfig, *, rngs: nnx.Rngs):
        own = cfg.attention
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, n, kv, h = cfg.width, own.num_heads, own.num_kv_heads, head_dim(cfg)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Linear(d, n * h, ("embed", "heads"), use_bias=False, **kw)
        self.k = Linear(d, kv * h, ("embed", "kv"), use_bias=False, **kw)
        self.v = Linear(d, kv * h, ("embed", "kv"), use_bias=False, **kw)
        self.out = Linear(n * h, d, ("heads", "embed"), init_scale=2.0 / cfg.num_layers, **kw)
        self.n, self.kv, self.h = n, kv, h
        self.span = self.cache_len(cfg)
        self.block = min(own.block or self.span, self.span)
        self.rope_base, self.rope_fraction = own.rope_base, own.rope_fraction

    @staticmethod
    def cache_len(cfg: CoreConfig) -> int:
        raise NotImplementedError

    def __call__(self, x_BxTxD: jax.Array, ctx: SeqContext,
                 state: AttentionState | None) -> tuple[jax.Array, AttentionState]:
        b, t, _ = x_BxTxD.shape
        q = self.q(x_BxTxD).reshape(b, t, self.n, self.h)
        k = self.k(x_BxTxD).reshape(b, t, self.kv, self.h)
        v = self.v(x_BxTxD).reshape(b, t, self.kv, self.h)
        q = constrain(rope(q, ctx.positions_BxT, self.rope_base, self.rope_fraction),
                      ("batch", "length", "heads", "head_dim"))
        k = rope(k, ctx.positions_BxT, self.rope_base, self.rope_fraction)
        seg, valid = ctx.segment_ids_BxT, jnp.ones((b, t), bool)
        if state is not None:  # prepend the cached keys
            k = jnp.concatenate([state.k_BxSxKxH.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([state.v_BxSxKxH.astype(v.dtype), v], axis=1)
            seg = jnp.concatenate([state.segment_BxS, seg], axis=1)
            valid = jnp.concatenate([state.valid_BxS, valid], axis=1)
        out = windowed_attention(q, k, v, ctx.segment_ids_BxT, seg, valid, window=self.span,
                                 block=self.block)
        y_BxTxD = self.out(out.reshape(b, t, self.n * self.h))
        return y_BxTxD, self._keep_last(k, v, seg, valid)

    def _keep_last(self, k, v, seg, valid) -> AttentionState:
        s, keep = k.shape[1], self.span
        if s < keep:  # left-pad with invalid entries
            pad = ((0, 0), (keep - s, 0))
            k, v = (jnp.pad(a, pad + ((0, 0), (0, 0))) for a in (k, v))
            seg, valid = jnp.pad(seg, pad, constant_values=-1), jnp.pad(valid, pad)
        return AttentionState(k[:, -keep:], v[:, -keep:], seg[:, -keep:], valid[:, -keep:])

    @classmethod
    def init_state(cls, cfg: CoreConfig, batch_size: int) -> AttentionState:
        s, kv, h, dt = cls.cache_len(cfg), cfg.attention.num_kv_heads, head_dim(cfg), jnp.dtype(cfg.dtype)
        return AttentionState(jnp.zeros((batch_size, s, kv, h), dt), jnp.zeros((batch_size, s, kv, h), dt),
                              jnp.full((batch_size, s), -1, jnp.int32), jnp.zeros((batch_size, s), bool))

    @classmethod
    def state_axes(cls, cfg: CoreConfig) -> AttentionState:
        kv = ("batch", "cache_length", "kv", "head_dim")
        return AttentionState(kv, kv, ("batch", "cache_length"), ("batch", "cache_length"))

    @classmethod
    def flops_per_token(cls, cfg: CoreConfig, seq_len: int) -> float:
        """Projections 2 * (D*N*H + 2*D*K*H + N*H*D); scores and mixing 2 * 2 * N * H * ctx, with ctx the
        mean number of keys a query sees (masked-out blockwise work is not useful work, not counted)."""
        d, n, kv, h = cfg.width, cfg.attention.num_heads, cfg.attention.num_kv_heads, head_dim(cfg)
        proj = 2 * (d * n * h + 2 * d * kv * h + n * h * d)
        return proj + 2 * 2 * n * h * mean_context(seq_len, cls.cache_len(cfg))

    @classmethod
    def check_config(cls, cfg: CoreConfig) -> None:
        own = cfg.attention
        if not own.head_dim and cfg.width % own.num_heads:
            raise ConfigError(f"width {cfg.width} is not divisible by attention.num_heads {own.num_heads}; change "
                              "one or set attention.head_dim")
        if int(head_dim(cfg) * own.rope_fraction) % 2:
            raise ConfigError(f"attention.rope_fraction {own.rope_fraction} of head_dim {head_dim(cfg)} must give "
                              "an even number of rotated dims")


def mean_context(seq_len: int, span: int) -> float:
    """Average number of keys a query attends to: mean over t < seq_len of min(t, span) + 1."""
    full = min(seq_len, span + 1)  # positions t <= span see t + 1 keys
    return (full * (full + 1) / 2 + (seq_len - full) * (span + 1)) / seq_len


class LocalAttention(Attention):
    """Sliding-window attention (letter A): span = window."""

    @staticmethod
    def cache_len(cfg: CoreConfig) -> int:
        return cfg.attention.window

    @classmethod
    def check_length(cls, cfg: CoreConfig, seq_len: int) -> None:
        if cfg.attention.window > seq_len:
            raise ConfigError(f"model.attention.window {cfg.attention.window} exceeds data.seq_len {seq_len}: "
                              "lower model.attention.window or raise data.seq_len")


class GlobalAttention(Attention):
    """Full causal attention (letter G) over up to `max_len` tokens: the Transformer baseline."""

    bounded_state = False  # its KV cache grows with the context, up to max_len
    limit_field = "attention.max_len"

    @staticmethod
    def cache_len(cfg: CoreConfig) -> int:
        return cfg.attention.max_len

    @classmethod
    def check_length(cls, cfg: CoreConfig, seq_len: int) -> None:
        if cfg.attention.max_len < seq_len:
            raise ConfigError(f"model.attention.max_len {cfg.attention.max_len} < data.seq_len {seq_len}: "
                              "raise model.attention.max_len")

    @classmethod
    def max_call_len(cls, cfg: CoreConfig) -> int | None:
        return cfg.attention.max_len
