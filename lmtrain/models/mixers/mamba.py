"""Mamba-2 block (M), as in Samba's Mamba layers: selective state space over a [H, P, N] state per row.

With D the model width, I = expand * D the inner width, H = I / P heads of dim P, G groups of B/C,
N the state size:

    z, x = W_z u, W_x u                       [T, I]   (gate, input)
    B, C = W_bc u                             [T, G, N] each
    dt = softplus(W_dt u + dt_bias)           [T, H]
    x, (B, C) = silu(conv(x)), silu(conv(B, C))    causal depthwise Conv1D of width C, document-masked
    log a_t = -dt_t * exp(A_log)              per head (a scalar decay)
    h_t = a_t h_{t-1} + dt_t outer(x_t, B_t)  state [H, P, N], float32
    y_t = h_t C_t + D * x_t
    out = W_o RMSNorm(y * silu(z))

At a document start the state does not leak in (a_t = 0) and the conv does not look back across it.
Decays, dt and the state are float32 whatever the compute dtype. Training uses the chunked (SSD) form
of `lmtrain.models.ssd`, whose memory is linear in T (chunk states [B, T/Q, H, P, N] and [B, T/Q, H, Q, Q]
scores, never [B, T, H, P, N]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.configlib import ConfigError, field
from lmtrain.models.base_config import CoreConfig
from lmtrain.models.layers import Conv1D, Linear, RMSNorm, param
from lmtrain.models.mixers.base import Mixer
from lmtrain.models.ssd import ssd
from lmtrain.models.state import SeqContext
from lmtrain.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """M layers: the Mamba-2 selective state-space block, lmtrain/models/mixers/mamba.py."""

    expand: int = field(2, "Inner width I = expand * model width.")
    head_dim: int = field(64, "Head dim P; heads H = I / P, each with its own scalar decay.")
    state_size: int = field(64, "State size N per head and channel (the state of a layer is [H, P, N]).")
    num_groups: int = field(1, "Groups G of the B/C projections (heads in a group share B and C).")
    conv_width: int = field(4, "Temporal width of the causal depthwise Conv1D on x, B and C.")
    chunk: int = field(64, "Chunk length Q of the chunked (SSD) form.")
    backend: Literal["chunked", "linear"] = field(
        "chunked", "chunked: the SSD form (training); linear: a scan over time (a reference; its gradient keeps "
                   "every step's state).")
    dt_min: float = field(0.001, "Lower end of the initial dt range (log-uniform).")
    dt_max: float = field(0.1, "Upper end of the initial dt range.")
    a_init_min: float = field(1.0, "Lower end of the initial A = exp(A_log) range (uniform).")
    a_init_max: float = field(16.0, "Upper end of the initial A range.")

    def validate(self) -> None:
        for name in ("expand", "head_dim", "state_size", "num_groups", "conv_width", "chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ConfigError(f"need 0 < a_init_min <= a_init_max, got {self.a_init_min}, {self.a_init_max}")


class MambaState(NamedTuple):
    """State of one M layer: the SSM state (float32) and the last C-1 conv inputs of x and of (B, C)."""

    ssm_BxHxPxN: jax.Array
    conv_x_BxCxI: jax.Array
    conv_bc_BxCxS: jax.Array  # S = 2 * G * N


def dims(cfg: CoreConfig) -> tuple[int, int, int, int, int]:
    """(I, H, P, G, N) of a model config's M layers."""
    own = cfg.mamba
    inner = own.expand * cfg.width
    return inner, inner // own.head_dim, own.head_dim, own.num_groups, own.state_size


def _dt_bias_init(dt_min: float, dt_max: float) -> jax.nn.initializers.Initializer:
    """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(lo: float, hi: float) -> jax.nn.initializers.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

    return init


class Mamba2(Mixer):
    """Mamba-2 temporal-mixing block (letter M)."""

    section = "mamba"
    Config = MambaConfig
    recurrent_field = "ssm_BxHxPxN"

    def __init__(self, cfg: CoreConfig, *, rngs: nnx.Rngs):
        own = cfg.mamba
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, (i, h, p, g, n) = cfg.width, dims(cfg)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_z = Linear(d, i, ("embed", "heads"), use_bias=False, **kw)
        self.linear_x = Linear(d, i, ("embed", "heads"), use_bias=False, **kw)
        self.linear_bc = Linear(d, 2 * g * n, ("embed", "state"), use_bias=False, **kw)
        self.linear_dt = Linear(d, h, ("embed", "heads"), use_bias=False, **kw)
        self.conv_x = Conv1D(i, own.conv_width, channel_axis="heads", **kw)
        self.conv_bc = Conv1D(2 * g * n, own.conv_width, channel_axis="state", **kw)
        # decay parameters are always float32
        self.dt_bias = param(rngs, _dt_bias_init(own.dt_min, own.dt_max), (h,), jnp.float32, ("heads",))
        self.a_log = param(rngs, _a_log_init(own.a_init_min, own.a_init_max), (h,), jnp.float32, ("heads",))
        self.d_skip = param(rngs, jax.nn.initializers.ones, (h,), jnp.float32, ("heads",))
        self.norm = RMSNorm(i, eps=cfg.norm_eps, **kw)
        self.linear_out = Linear(i, d, ("heads", "embed"), init_scale=2.0 / cfg.num_layers, **kw)
        self.shape = (h, p, g, n)
        self.chunk, self.backend, self.scan_backend, self.dtype = own.chunk, own.backend, cfg.scan_backend, dtype

    def __call__(self, u_BxTxD: jax.Array, ctx: SeqContext,
                 state: MambaState | None) -> tuple[jax.Array, MambaState]:
        (b, t, _), (h, p, g, n) = u_BxTxD.shape, self.shape
        z_BxTxI = self.linear_z(u_BxTxD)
        x_BxTxI, tail_x = self.conv_x(self.linear_x(u_BxTxD), ctx.reset_BxT,
                                      None if state is None else state.conv_x_BxCxI)
        bc_BxTxS, tail_bc = self.conv_bc(self.linear_bc(u_BxTxD), ctx.reset_BxT,
                                         None if state is None else state.conv_bc_BxCxS)
        x_BxTxHxP = constrain(jax.nn.silu(x_BxTxI).reshape(b, t, h, p), ("batch", "length", "heads", "head_dim"))
        b_BxTxGxN, c_BxTxGxN = jnp.split(jax.nn.silu(bc_BxTxS).reshape(b, t, 2 * g, n), 2, axis=2)
        dt_BxTxH = jax.nn.softplus(self.linear_dt(u_BxTxD).astype(jnp.float32) + self.dt_bias[...])
        log_a_BxTxH = -dt_BxTxH * jnp.exp(self.a_log[...])
        y_BxTxHxP, hT = ssd(x_BxTxHxP, dt_BxTxH, log_a_BxTxH, b_BxTxGxN, c_BxTxGxN, ctx.reset_BxT,
                            None if state is None else state.ssm_BxHxPxN, chunk=self.chunk, backend=self.backend,
                            scan_backend=self.scan_backend)
        y_BxTxHxP = y_BxTxHxP + self.d_skip[...][:, None] * x_BxTxHxP.astype(jnp.float32)
        y_BxTxI = y_BxTxHxP.astype(self.dtype).reshape(b, t, h * p) * jax.nn.silu(z_BxTxI)
        out_BxTxD = self.linear_out(self.norm(constrain(y_BxTxI, ("batch", "length", "heads"))))
        return out_BxTxD, MambaState(hT, tail_x, tail_bc)

    @classmethod
    def init_state(cls, cfg: CoreConfig, batch_size: int) -> MambaState:
        (i, h, p, g, n), c, dt = dims(cfg), cfg.mamba.conv_width, jnp.dtype(cfg.dtype)
        return MambaState(jnp.zeros((batch_size, h, p, n), jnp.float32), jnp.zeros((batch_size, c - 1, i), dt),
                          jnp.zeros((batch_size, c - 1, 2 * g * n), dt))

    @classmethod
    def state_axes(cls, cfg: CoreConfig) -> MambaState:
        return MambaState(("batch", "heads", "head_dim", "state"), ("batch", "conv", "heads"),
                          ("batch", "conv", "state"))

    @classmethod
    def flops_per_token(cls, cfg: CoreConfig, seq_len: int) -> float:
        """Projections 2 * D * (2I + 2GN + H) + 2 * I * D; convs 2 * C * (I + 2GN); the recurrence as
        written in its recurrent form: state update and readout 2 * 2 * H * P * N; skip and gate 4 * I."""
        (i, h, p, g, n), d, c = dims(cfg), cfg.width, cfg.mamba.conv_width
        return 2 * d * (2 * i + 2 * g * n + h) + 2 * i * d + 2 * c * (i + 2 * g * n) + 4 * h * p * n + 4 * i

    @classmethod
    def check_config(cls, cfg: CoreConfig) -> None:
        i, h, p, g, _ = dims(cfg)
        if i % p:
            raise ConfigError(f"the Mamba inner width {i} (mamba.expand x width) is not divisible by mamba.head_dim "
                              f"{p}")
        if h % g:
            raise ConfigError(f"the Mamba heads {h} (inner width / head_dim) are not divisible by mamba.num_groups {g}")
