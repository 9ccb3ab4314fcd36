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

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.configlib import ConfigError, field
from lmtrain.models.base_config import CoreConfig
from lmtrain.models.layers import BlockDiagonal, Conv1D, Linear, param
from lmtrain.models.mixers.base import Mixer
from lmtrain.models.scan import linear_recurrence
from lmtrain.models.state import SeqContext
from lmtrain.sharding import constrain


@dataclasses.dataclass(frozen=True)
class RGLRUConfig:
    """R layers: the Griffin/Hawk recurrent block (conv + RG-LRU), lmtrain/models/mixers/rglru.py."""

    width: int = field(0, "RG-LRU width L; 0 means the model width.")
    num_heads: int = field(4, "Diagonal blocks of the block-diagonal input and recurrence gates "
                              "(recurrentgemma uses the attention head count).")
    conv_width: int = field(4, "Temporal width of the causal Conv1D before the RG-LRU.")
    c: float = field(8.0, "Constant c in log a_t = -c * softplus(Lambda) * r_t.")
    min_rad: float = field(0.9, "Lower end of the initial decay range a = exp(-softplus(Lambda)).")
    max_rad: float = field(0.999, "Upper end of the initial decay range.")
    sqrt_max_grad: float = field(1000.0, "Clip on d sqrt(1-a^2)/d(1-a^2) near a -> 1 (gradient guard).")

    def validate(self) -> None:
        for name in ("num_heads", "conv_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width < 0:
            raise ConfigError(f"width must be >= 0 (0 = the model width), got {self.width}")
        if not 0 < self.min_rad < self.max_rad < 1:
            raise ConfigError(f"need 0 < min_rad < max_rad < 1, got {self.min_rad}, {self.max_rad}")
        if self.c <= 0 or self.sqrt_max_grad <= 0:
            raise ConfigError(f"c and sqrt_max_grad must be positive, got {self.c}, {self.sqrt_max_grad}")


def lru_width(cfg: CoreConfig) -> int:
    """The RG-LRU width L of a model config."""
    return cfg.rglru.width or cfg.width


class RecurrentState(NamedTuple):
    """State of one R layer: RG-LRU state (float32) and the last C-1 Conv1D inputs."""

    h_BxL: jax.Array
    conv_BxCxL: jax.Array


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


class RGLRU(nnx.Module):
    """Real-gated linear recurrent unit: u_BxTxL, h0_BxL -> y_BxTxL, hT_BxL (float32 state)."""

    def __init__(self, cfg: CoreConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        own, width = cfg.rglru, lru_width(cfg)
        init = decay_param_init(own.min_rad, own.max_rad)
        self.a_param = param(rngs, init, (width,), jnp.float32, ("lru",))  # always float32
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_gate = BlockDiagonal(width, own.num_heads, **kw)
        self.a_gate = BlockDiagonal(width, own.num_heads, **kw)
        self.c, self.max_grad, self.dtype = own.c, own.sqrt_max_grad, dtype
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


class RecurrentBlock(Mixer):
    """Griffin/Hawk temporal-mixing block (letter R)."""

    section = "rglru"
    Config = RGLRUConfig
    recurrent_field = "h_BxL"

    def __init__(self, cfg: CoreConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, lw = cfg.width, lru_width(cfg)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_y = Linear(d, lw, ("embed", "lru"), **kw)
        self.linear_x = Linear(d, lw, ("embed", "lru"), **kw)
        self.linear_out = Linear(lw, d, ("lru", "embed"), init_scale=2.0 / cfg.num_layers, **kw)
        self.conv = Conv1D(lw, cfg.rglru.conv_width, **kw)
        self.rg_lru = RGLRU(cfg, **kw)

    def __call__(self, x_BxTxD: jax.Array, ctx: SeqContext,
                 state: RecurrentState | None) -> tuple[jax.Array, RecurrentState]:
        y_BxTxL = jax.nn.gelu(self.linear_y(x_BxTxD))
        u_BxTxL = constrain(self.linear_x(x_BxTxD), ("batch", "length", "lru"))
        u_BxTxL, conv_tail = self.conv(u_BxTxL, ctx.reset_BxT, None if state is None else state.conv_BxCxL)
        h_BxTxL, hT_BxL = self.rg_lru(u_BxTxL, ctx.reset_BxT, None if state is None else state.h_BxL)
        out_BxTxD = self.linear_out(constrain(h_BxTxL * y_BxTxL, ("batch", "length", "lru")))
        return out_BxTxD, RecurrentState(hT_BxL, conv_tail)

    @classmethod
    def init_state(cls, cfg: CoreConfig, batch_size: int) -> RecurrentState:
        lw = lru_width(cfg)
        return RecurrentState(jnp.zeros((batch_size, lw), jnp.float32),
                              jnp.zeros((batch_size, cfg.rglru.conv_width - 1, lw), jnp.dtype(cfg.dtype)))

    @classmethod
    def state_axes(cls, cfg: CoreConfig) -> RecurrentState:
        return RecurrentState(("batch", "lru"), ("batch", "conv", "lru"))

    @classmethod
    def flops_per_token(cls, cfg: CoreConfig, seq_len: int) -> float:
        """Projections 2 * 3 * D * L; gates 2 * 2 * L * L / heads; conv 2 * C * L; scan 2 * L."""
        d, lw, own = cfg.width, lru_width(cfg), cfg.rglru
        return 2 * (3 * d * lw) + 2 * 2 * lw * lw / own.num_heads + 2 * own.conv_width * lw + 2 * lw

    @classmethod
    def check_config(cls, cfg: CoreConfig) -> None:
        if lru_width(cfg) % cfg.rglru.num_heads:
            raise ConfigError(f"rglru.width {lru_width(cfg)} is not divisible by rglru.num_heads "
                              f"{cfg.rglru.num_heads} (the RG-LRU gates are block-diagonal with num_heads blocks)")
