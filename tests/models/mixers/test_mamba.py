"""Mamba-2 block (M) against a naive float64 numpy implementation of its equations, with document
resets and an incoming state; initial decay/dt ranges; config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.configlib import ConfigError, updated
from lmtrain.models import ModelConfig, SeqContext
from lmtrain.models.mixers.mamba import Mamba2

CFG = updated(ModelConfig(), {"width": 16, "num_layers": 2, "pattern": "M", "mamba.expand": 2, "mamba.head_dim": 8,
                              "mamba.state_size": 4, "mamba.num_groups": 2, "mamba.chunk": 5})


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def naive_block(p: dict, u, reset, state):
    """One M layer, token by token in float64: projections, masked causal conv, SSM, gate, norm, out."""
    h_state, tail_x, tail_bc = (np.asarray(s, np.float64) for s in state)
    b, t, _ = u.shape
    heads, hd, groups, n = 4, 8, 2, 4
    lin = lambda name, x: x @ np.asarray(p[name]["kernel"], np.float64)

    def conv(name, x_BxTxC, tail):
        k, bias = np.asarray(p[name]["kernel"], np.float64), np.asarray(p[name]["bias"], np.float64)
        width = k.shape[0]
        hist = np.concatenate([tail, x_BxTxC], axis=1)  # [B, C-1+T, ch]
        out = np.zeros_like(x_BxTxC)
        for i in range(b):
            start = -(width - 1)  # stream index of the oldest tail entry
            for j in range(t):
                if reset[i, j]:
                    start = j
                for s in range(width):  # x_{j-s}, kernel row width-1-s
                    if j - s >= start:
                        out[i, j] += hist[i, j - s + width - 1] * k[width - 1 - s]
                out[i, j] += bias
        return out

    z = lin("linear_z", u)
    x = silu(conv("conv_x", lin("linear_x", u), tail_x)).reshape(b, t, heads, hd)
    bc = silu(conv("conv_bc", lin("linear_bc", u), tail_bc)).reshape(b, t, 2 * groups, n)
    bmat, cmat = bc[:, :, :groups], bc[:, :, groups:]
    dt = softplus(lin("linear_dt", u) + np.asarray(p["dt_bias"], np.float64))
    a_pos = np.exp(np.asarray(p["a_log"], np.float64))
    y = np.zeros((b, t, heads, hd))
    h = h_state.copy()
    for i in range(b):
        for j in range(t):
            for hh in range(heads):
                g = hh // (heads // groups)
                a = 0.0 if reset[i, j] else np.exp(-dt[i, j, hh] * a_pos[hh])
                h[i, hh] = a * h[i, hh] + dt[i, j, hh] * np.outer(x[i, j, hh], bmat[i, j, g])
                y[i, j, hh] = h[i, hh] @ cmat[i, j, g] + np.asarray(p["d_skip"])[hh] * x[i, j, hh]
    y = y.reshape(b, t, heads * hd) * silu(z)
    y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + 1e-6) * (1 + np.asarray(p["norm"]["scale"], np.float64))
    return lin("linear_out", y) + np.asarray(p["linear_out"]["bias"], np.float64), h


def test_block_matches_naive_equations_with_resets_and_state():
    block = Mamba2(CFG, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    rng = np.random.default_rng(0)
    b, t = 2, 13
    u = rng.normal(size=(b, t, 16)).astype(np.float32)
    reset = np.zeros((b, t), bool)
    reset[0, 4] = reset[1, 0] = reset[1, 9] = True
    state = Mamba2.init_state(CFG, b)
    state = state._replace(ssm_BxHxPxN=jnp.asarray(rng.normal(size=state.ssm_BxHxPxN.shape), jnp.float32),
                           conv_x_BxCxI=jnp.asarray(rng.normal(size=state.conv_x_BxCxI.shape), jnp.float32),
                           conv_bc_BxCxS=jnp.asarray(rng.normal(size=state.conv_bc_BxCxS.shape), jnp.float32))
    ctx = SeqContext(jnp.asarray(reset), jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32))
    out, new_state = block(jnp.asarray(u), ctx, state)
    want, want_h = naive_block(params, u.astype(np.float64), reset, state)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(new_state.ssm_BxHxPxN), want_h, rtol=1e-4, atol=1e-4)
    assert new_state.ssm_BxHxPxN.dtype == jnp.float32


def test_initial_decays_and_dt_in_their_ranges():
    block = Mamba2(CFG, rngs=nnx.Rngs(0))
    dt = np.asarray(jax.nn.softplus(block.dt_bias[...]))
    a = np.exp(np.asarray(block.a_log[...]))
    assert block.dt_bias[...].dtype == jnp.float32 and block.a_log[...].dtype == jnp.float32
    assert np.all((dt >= 0.001 * 0.999) & (dt <= 0.1 * 1.001)) and np.all((a >= 1) & (a <= 16))


@pytest.mark.parametrize("changes, match", [
    ({"mamba.head_dim": 7}, "not divisible by mamba.head_dim"),
    ({"mamba.num_groups": 3}, "not divisible by mamba.num_groups"),
    ({"mamba.state_size": 0}, "state_size must be positive"),
    ({"mamba.dt_min": 0.5}, "dt_min <= dt_max"),
])
def test_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        updated(CFG, changes)
