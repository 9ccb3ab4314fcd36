"""RG-LRU and Conv1D vs naive per-step loops; the sqrt gradient guard; decay init range; dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.models import ModelConfig
from lmtrain.models.layers import Conv1D
from lmtrain.models.mixers.rglru import RGLRU, decay_param_init, sqrt_bounded_grad


def naive_rglru(layer: RGLRU, u, reset, h0):
    """Per-step float64 loop of the RG-LRU equations."""
    lam = np.asarray(layer.a_param[...], np.float64)
    gx = 1 / (1 + np.exp(-np.asarray(layer.input_gate(jnp.asarray(u)), np.float64)))
    ga = 1 / (1 + np.exp(-np.asarray(layer.a_gate(jnp.asarray(u)), np.float64)))
    log_a = -8.0 * ga * np.log1p(np.exp(lam))
    h, ys = np.asarray(h0, np.float64), []
    for t in range(u.shape[1]):
        a = np.exp(log_a[:, t])
        mult = np.where(reset[:, t, None], 1.0, np.sqrt(1 - a**2))
        a = np.where(reset[:, t, None], 0.0, a)
        h = a * h + mult * gx[:, t] * u[:, t]
        ys.append(h)
    return np.stack(ys, 1), h


def test_rglru_matches_naive_loop_with_resets():
    cfg = updated(ModelConfig(), {"width": 16, "rglru.width": 16, "rglru.num_heads": 4})
    layer = RGLRU(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 19, 16)).astype(np.float32)
    reset = np.zeros((2, 19), bool)
    reset[0, 7] = reset[1, 0] = True
    h0 = rng.normal(size=(2, 16)).astype(np.float32)
    y, h_last = layer(jnp.asarray(u), jnp.asarray(reset), jnp.asarray(h0))
    y_ref, h_ref = naive_rglru(layer, u, reset, h0)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(h_last, h_ref, atol=1e-5)


def test_rglru_bf16_compute_keeps_decay_and_state_float32():
    cfg = updated(ModelConfig(), {"width": 16, "rglru.width": 16, "rglru.num_heads": 4, "rglru.min_rad": 0.998,
                                  "rglru.max_rad": 0.999})
    f32 = RGLRU(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    bf16 = RGLRU(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    u = jnp.ones((1, 2000, 16))
    reset = jnp.zeros((1, 2000), bool)
    y32, h32 = f32(u, reset, None)
    y16, h16 = bf16(u.astype(jnp.bfloat16), reset, None)
    assert h16.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    assert RGLRU(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).a_param[...].dtype == jnp.float32
    # long memory survives bf16 compute: the state after 2000 steps tracks the f32 one closely
    np.testing.assert_allclose(h16, h32, rtol=0.05)


def test_sqrt_gradient_is_bounded():
    g = jax.grad(lambda x: sqrt_bounded_grad(x, 1000.0))(jnp.float32(1e-12))
    assert float(g) == np.float32(1000.0)
    g_far = jax.grad(lambda x: sqrt_bounded_grad(x, 1000.0))(jnp.float32(0.25))
    np.testing.assert_allclose(g_far, 1.0, rtol=1e-6)


def test_decay_init_range_uniform_in_a_squared():
    lam = decay_param_init(0.9, 0.999)(jax.random.key(0), (20000,))
    a = np.exp(-np.log1p(np.exp(np.asarray(lam, np.float64))))
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    a2 = a**2
    np.testing.assert_allclose(np.mean(a2), (0.81 + 0.998001) / 2, atol=2e-3)  # uniform in a^2


def test_conv_matches_naive_and_respects_documents():
    conv = Conv1D(6, 4, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 11, 6)).astype(np.float32)
    reset = np.zeros((2, 11), bool)
    reset[0, 5] = True
    tail = rng.normal(size=(2, 3, 6)).astype(np.float32)
    y, new_tail = conv(jnp.asarray(x), jnp.asarray(reset), jnp.asarray(tail))
    ext = np.concatenate([tail, x], 1)
    seg = np.concatenate([np.zeros((2, 3), int), np.cumsum(reset, 1)], 1)
    ref = np.zeros_like(x) + b
    for bi in range(2):
        for t in range(11):
            for shift in range(4):
                src = t + 3 - shift
                if seg[bi, src] == seg[bi, t + 3]:
                    ref[bi, t] += w[3 - shift] * ext[bi, src]
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(new_tail, x[:, -3:], atol=0)
    # a document start inside the last C-1 inputs blanks the entries before it in the tail
    reset2 = np.zeros((1, 11), bool)
    reset2[0, 9] = True
    _, tail2 = conv(jnp.asarray(x[:1]), jnp.asarray(reset2), None)
    np.testing.assert_allclose(tail2[0, 0], 0.0)
    np.testing.assert_allclose(tail2[0, 1:], x[0, 9:])
