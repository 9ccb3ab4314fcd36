"""Recurrent block (R): gelu(W_y x) * RG-LRU(Conv1D(W_x x)), then W_o.

RG-LRU, per channel (L = lru_width), with block-diagonal gates over `num_heads` blocks:

    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_i u_t + b_i)
    log a_t = -c * softplus(Lambda) * r_t
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)

At a document start (`reset_t`) a_t = 0 and the input multiplier is 1. `log a`, `a`,
`sqrt(1 - a^2)` and the carried state are float32 whatever the compute dtype: bf16 cannot
represent decays in (0.99609, 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models.config import ModelConfig
from lmtrain.models.layers import BlockDiagonal, Linear, fan_in_init, param
from lmtrain.models.scan import linear_recurrence
from lmtrain.sharding import constrain


class RecurrentState(NamedTuple):
    """State of one R layer: RG-LRU state (float32) and the last C-1 Conv1D inputs."""

    h_BxL: jax.Array
    conv_BxCxL: jax.Array


class SeqContext(NamedTuple):
    """Per-token bookkeeping shared by all layers of one call."""

    reset_BxT: jax.Array  # bool: token t starts a new document (state must not leak in)
    positions_BxT: jax.Array  # int32: position within the document (RoPE)
    segment_ids_BxT: jax.Array  # int32: document id (attention masking)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_grad(x: jax.Array, max_grad: float) -> jax.Array:
    """sqrt(x) whose derivative is clipped at `max_grad` (it diverges as x -> 0, i.e. a -> 1)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x: jax.Array, max_grad: float) -> tuple[jax.Array, jax.Array]:
    return jnp.sqrt(x), x


def _sqrt_bwd(max_grad: float, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # d sqrt(x)/dx = 1 / (2 sqrt(x)) <= max_grad  <=>  x >= 1 / (4 max_grad^2)
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, 1.0 / (4.0 * max_grad**2))),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def decay_param_init(min_rad: float, max_rad: float) -> jax.nn.initializers.Initializer:
    """Lambda such that a = exp(-softplus(Lambda)) is uniform in a^2 over [min_rad^2, max_rad^2]."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        u = jax.random.uniform(key, shape, jnp.float32)
        log_a = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2)
        return jnp.log(jnp.expm1(-log_a)).astype(dtype)  # inverse softplus of -log a

    return init


class Conv1D(nnx.Module):
    """Causal depthwise temporal convolution of width C that never looks across a document start."""

    def __init__(self, width: int, conv_width: int, *, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        self.kernel = param(rngs, fan_in_init(0.01), (conv_width, width), param_dtype, ("conv", "lru"))
        self.bias = param(rngs, jax.nn.initializers.zeros, (width,), param_dtype, ("lru",))
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


class RGLRU(nnx.Module):
    """Real-gated linear recurrent unit: u_BxTxL, h0_BxL -> y_BxTxL, hT_BxL (float32 state)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        width = cfg.resolved_lru_width
        init = decay_param_init(cfg.lru_min_rad, cfg.lru_max_rad)
        self.a_param = param(rngs, init, (width,), jnp.float32, ("lru",))  # always float32
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_gate = BlockDiagonal(width, cfg.num_heads, **kw)
        self.a_gate = BlockDiagonal(width, cfg.num_heads, **kw)
        self.c, self.max_grad, self.dtype = cfg.lru_c, cfg.lru_sqrt_max_grad, dtype
        self.backend, self.chunk = cfg.scan_backend, cfg.scan_chunk

    def __call__(self, u_BxTxL: jax.Array, reset_BxT: jax.Array,
                 h0_BxL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        gate_x = jax.nn.sigmoid(self.input_gate(u_BxTxL).astype(jnp.float32))
        gate_a = jax.nn.sigmoid(self.a_gate(u_BxTxL).astype(jnp.float32))
        log_a = -self.c * gate_a * jax.nn.softplus(self.a_param[...].astype(jnp.float32))
        a_BxTxL, a_sq = jnp.exp(log_a), jnp.exp(2.0 * log_a)
        reset = reset_BxT[..., None]
        multiplier = jnp.where(reset, 1.0, sqrt_bounded_grad(1.0 - a_sq, self.max_grad))
        x_BxTxL = u_BxTxL.astype(jnp.float32) * gate_x * multiplier
        a_BxTxL = jnp.where(reset, 0.0, a_BxTxL)
        h_BxTxL, hT_BxL = linear_recurrence(a_BxTxL, x_BxTxL, h0_BxL, backend=self.backend,
                                            chunk_size=self.chunk)
        return h_BxTxL.astype(self.dtype), hT_BxL


class RecurrentBlock(nnx.Module):
    """Griffin/Hawk temporal-mixing block (letter R)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, lw = cfg.width, cfg.resolved_lru_width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_y = Linear(d, lw, ("embed", "lru"), **kw)
        self.linear_x = Linear(d, lw, ("embed", "lru"), **kw)
        self.linear_out = Linear(lw, d, ("lru", "embed"), init_scale=2.0 / cfg.num_layers, **kw)
        self.conv = Conv1D(lw, cfg.conv_width, **kw)
        self.rg_lru = RGLRU(cfg, **kw)

    def __call__(self, x_BxTxD: jax.Array, ctx: SeqContext,
                 state: RecurrentState | None) -> tuple[jax.Array, RecurrentState]:
        y_BxTxL = jax.nn.gelu(self.linear_y(x_BxTxD))
        u_BxTxL = constrain(self.linear_x(x_BxTxD), ("batch", "length", "lru"))
        u_BxTxL, conv_tail = self.conv(u_BxTxL, ctx.reset_BxT, None if state is None else state.conv_BxCxL)
        h_BxTxL, hT_BxL = self.rg_lru(u_BxTxL, ctx.reset_BxT, None if state is None else state.h_BxL)
        out_BxTxD = self.linear_out(constrain(h_BxTxL * y_BxTxL, ("batch", "length", "lru")))
        return out_BxTxD, RecurrentState(hT_BxL, conv_tail)

    @staticmethod
    def init_state(cfg: ModelConfig, batch_size: int) -> RecurrentState:
        lw = cfg.resolved_lru_width
        return RecurrentState(jnp.zeros((batch_size, lw), jnp.float32),
                              jnp.zeros((batch_size, cfg.conv_width - 1, lw), jnp.dtype(cfg.dtype)))
