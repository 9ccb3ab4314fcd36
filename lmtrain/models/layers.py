"""Basic layers: parameters with logical axes, Linear, BlockDiagonal, causal Conv1D, RMSNorm, gated MLP,
Embedder.

Shape legend used across lmtrain.models: B batch, T time (length), D model width, F MLP width,
L channels of a recurrent layer (RG-LRU width, Mamba conv width), V vocab, N query heads, K key/value
heads, H head dim, W window, C conv width, S cache length; Mamba-2: H heads, P head dim, N state size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Init = jax.nn.initializers.Initializer


def fan_in_init(scale: float = 1.0, in_axis: int | Sequence[int] = -2, out_axis: int = -1) -> Init:
    """Variance-scaling (fan-in, truncated normal) initializer, as in recurrentgemma."""
    return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                                in_axis=in_axis, out_axis=out_axis)


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], dtype: jnp.dtype,
          axes: Sequence[str | None]) -> nnx.Param:
    """A parameter whose `logical_axes` metadata names each dim (mapped to a mesh by rules)."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y_NxO = x_NxI @ kernel_IxO (+ bias_O), computed in `dtype`; N stands for any leading dims."""

    def __init__(self, in_dim: int, out_dim: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                 use_bias: bool = True, init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        self.kernel = param(rngs, fan_in_init(init_scale), (in_dim, out_dim), param_dtype, axes)
        self.bias = (param(rngs, jax.nn.initializers.zeros, (out_dim,), param_dtype, axes[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        # As a 2-D [rows, I] @ [I, O]: XLA:CPU then computes the kernel gradient x^T @ dy without first
        # writing a transposed copy of dy, as it does for a [B, T, I] operand (docs/performance.md).
        x_MxI = x_NxI.reshape(-1, x_NxI.shape[-1]).astype(self.dtype)
        y_MxO = jnp.dot(x_MxI, self.kernel[...].astype(self.dtype))
        y_NxO = y_MxO.reshape(*x_NxI.shape[:-1], y_MxO.shape[-1])
        return y_NxO if self.bias is None else y_NxO + self.bias[...].astype(self.dtype)


class BlockDiagonal(nnx.Module):
    """Block-diagonal linear map with `blocks` square blocks: [..., L] -> [..., L]."""

    def __init__(self, width: int, blocks: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        size = width // blocks
        self.kernel = param(rngs, fan_in_init(), (blocks, size, size), param_dtype, ("heads", None, None))
        self.bias = param(rngs, jax.nn.initializers.zeros, (blocks, size), param_dtype, ("heads", None))
        self.blocks, self.dtype = blocks, dtype

    def __call__(self, x_NxL: jax.Array) -> jax.Array:
        # One 2-D matmul per block on a column slice: a batched einsum over a [..., H, I] view makes
        # XLA:CPU transpose the block axis to the front and back (docs/performance.md).
        x_MxL = x_NxL.reshape(-1, x_NxL.shape[-1]).astype(self.dtype)
        kernel_HxIxI, size = self.kernel[...].astype(self.dtype), x_NxL.shape[-1] // self.blocks
        y_MxL = jnp.concatenate([x_MxL[:, h * size:(h + 1) * size] @ kernel_HxIxI[h] for h in range(self.blocks)],
                                axis=1)
        return (y_MxL + self.bias[...].reshape(-1).astype(self.dtype)).reshape(x_NxL.shape)


class Conv1D(nnx.Module):
    """Causal depthwise temporal convolution of width C that never looks across a document start."""

    def __init__(self, width: int, conv_width: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, channel_axis: str = "lru"):
        self.kernel = param(rngs, fan_in_init(0.01), (conv_width, width), param_dtype, ("conv", channel_axis))
        self.bias = param(rngs, jax.nn.initializers.zeros, (width,), param_dtype, (channel_axis,))
        self.conv_width, self.dtype = conv_width, dtype

    def __call__(self, x_BxTxL: jax.Array, reset_BxT: jax.Array,
                 tail_BxCxL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Returns y_BxTxL and the new tail (last C-1 inputs, zeroed if before a document start)."""
        c, (b, t, width) = self.conv_width, x_BxTxL.shape
        x_BxTxL = x_BxTxL.astype(self.dtype)
        if tail_BxCxL is None:
            tail_BxCxL = jnp.zeros((b, c - 1, width), self.dtype)
        x_ext = jnp.concatenate([tail_BxCxL.astype(self.dtype), x_BxTxL], axis=1)  # [B, C-1+T, L]
        reset_ext = jnp.concatenate([jnp.zeros((b, c - 1), bool), reset_BxT], axis=1)
        kernel_CxL = self.kernel[...].astype(self.dtype)
        keep_BxT = jnp.ones((b, t), self.dtype)
        y_BxTxL = jnp.zeros_like(x_BxTxL) + self.bias[...].astype(self.dtype)
        for shift in range(c):  # x_{t-shift} contributes unless a document starts in (t-shift, t]
            if shift:
                keep_BxT = keep_BxT * (1 - reset_ext[:, c - shift: c - shift + t]).astype(self.dtype)
            window = x_ext[:, c - 1 - shift: c - 1 - shift + t]
            y_BxTxL = y_BxTxL + window * keep_BxT[..., None] * kernel_CxL[c - 1 - shift]
        # Tail entries followed by a document start must not reach the next call.
        valid, keeps = jnp.ones((b,), bool), []
        for p in range(x_ext.shape[1] - 1, x_ext.shape[1] - c, -1):
            keeps.append(valid)
            valid = valid & ~reset_ext[:, p]
        keep_BxC = jnp.stack(keeps[::-1], axis=1)[..., None]
        return y_BxTxL, jnp.where(keep_BxC, x_ext[:, x_ext.shape[1] - (c - 1):], 0)


class RMSNorm(nnx.Module):
    """x / rms(x) * (1 + scale), scale initialised at 0; statistics in float32."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32):
        self.scale = param(rngs, jax.nn.initializers.zeros, (width,), param_dtype, ("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x32 = x_BxTxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class MLP(nnx.Module):
    """Gated GELU MLP: down(gelu(gate(x)) * up(x)), hidden width F."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, out_init_scale: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = Linear(width, hidden, ("embed", "mlp"), **kw)
        self.up = Linear(width, hidden, ("embed", "mlp"), **kw)
        self.down = Linear(hidden, width, ("mlp", "embed"), init_scale=out_init_scale, **kw)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.gate(x_BxTxD)) * self.up(x_BxTxD))


class Embedder(nnx.Module):
    """Tied embedding table [V, D]: `encode` looks tokens up, `decode` projects to logits."""

    def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs, scale_by_sqrt_width: bool,
                 dtype: jnp.dtype, param_dtype: jnp.dtype):
        init = fan_in_init(in_axis=1, out_axis=0)
        self.embedding = param(rngs, init, (vocab_size, width), param_dtype, ("vocab", "embed"))
        self.scale = float(width) ** 0.5 if scale_by_sqrt_width else 1.0
        self.dtype = dtype

    def encode(self, tokens_BxT: jax.Array) -> jax.Array:
        """Out-of-range ids give NaN rows (so a bad id surfaces as a NaN loss, never silently)."""
        table_VxD = self.embedding[...]
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0, mode="fill", fill_value=jnp.nan)
        return x_BxTxD.astype(self.dtype) * jnp.asarray(self.scale, self.dtype)

    def decode(self, x_BxTxD: jax.Array) -> jax.Array:
        return jnp.einsum("btd,vd->btv", x_BxTxD.astype(self.dtype), self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
