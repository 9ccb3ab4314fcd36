"""linear_recurrence: every backend against a naive loop (values and gradients), state passing,
float32 compute for bf16 inputs, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.models.scan import AUTO_BACKEND, BACKENDS, linear_recurrence, resolve_backend

NAMES = [*BACKENDS, "auto"]
CHUNK = 8  # T=37 below is not a multiple of it, T=16 is
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decays in (0, 1) with some exact zeros (document resets) and some 0.999; inputs ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, 1.0, shape)
    a[rng.uniform(size=shape) < 0.1] = 0.0
    a[rng.uniform(size=shape) < 0.2] = 0.999
    x = rng.normal(size=shape)
    h0 = rng.normal(size=(shape[0], *shape[2:]))
    return a.astype(np.float32), x.astype(np.float32), h0.astype(np.float32)


def _naive(a, x, h0):
    """The definition, one step at a time, in float64 numpy."""
    a, x = np.float64(a), np.float64(x)
    h = np.zeros_like(a[:, 0]) if h0 is None else np.float64(h0)
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + x[:, t]
        hs.append(h)
    return np.stack(hs, axis=1), h


def _naive_grads(a, x, h0, w_h, w_hT):
    """Gradients of sum(w_h * h) + sum(w_hT * hT) w.r.t. (a, x, h0), by stepping backwards in time."""
    h, _ = _naive(a, x, h0)
    h_prev = np.concatenate([np.zeros_like(h[:, :1]) if h0 is None else np.float64(h0)[:, None], h[:, :-1]], 1)
    da, dx = np.zeros_like(h), np.zeros_like(h)
    dh = np.float64(w_hT)
    for t in reversed(range(a.shape[1])):
        dh = dh + w_h[:, t]
        dx[:, t] = dh
        da[:, t] = dh * h_prev[:, t]
        dh = a[:, t] * dh
    return da, dx, dh


def _weights(shape, seed=1):
    """Weights of a random linear functional of both outputs (h, hT): gradients see every path."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=(shape[0], *shape[2:])).astype(np.float32)


def _loss(fn, w_h, w_hT):
    def loss(a, x, h0):
        h, hT = fn(a, x, h0)
        return jnp.sum(w_h * h) + jnp.sum(w_hT * hT)

    return loss


def _recurrence(backend: str, chunk_size: int = CHUNK):
    """Jitted linear_recurrence (eager associative scans compile op by op, which is slow)."""
    return jax.jit(lambda a, x, h0=None: linear_recurrence(a, x, h0, backend=backend, chunk_size=chunk_size))


def test_naive_gradients_match_autodiff_of_a_plain_scan():
    def plain(a, x, h0):
        def step(h, ax):
            h = ax[0] * h + ax[1]
            return h, h

        hT, h = jax.lax.scan(step, h0, (a.swapaxes(0, 1), x.swapaxes(0, 1)))
        return h.swapaxes(0, 1), hT

    a, x, h0 = _inputs((2, 11, 3))
    w_h, w_hT = _weights(a.shape)
    grads = jax.grad(_loss(plain, w_h, w_hT), argnums=(0, 1, 2))(a, x, h0)
    for g, g_ref in zip(grads, _naive_grads(a, x, h0, w_h, w_hT), strict=True):
        np.testing.assert_allclose(g, g_ref, **TOL)


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("shape", [(3, 37, 5), (2, 1, 4), (2, 16, 2, 3)], ids=["T37", "T1", "T16xDx2x3"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
def test_matches_naive_loop_values_and_grads(backend, shape, with_h0):
    a, x, h0 = _inputs(shape)
    h0 = h0 if with_h0 else None
    ours = _recurrence(backend)
    h, hT = ours(a, x, h0)
    h_ref, hT_ref = _naive(a, x, h0)
    assert h.dtype == hT.dtype == jnp.float32 and h.shape == shape and hT.shape == h_ref.shape[:1] + shape[2:]
    np.testing.assert_allclose(h, h_ref, **TOL)
    np.testing.assert_allclose(hT, hT_ref, **TOL)

    w_h, w_hT = _weights(shape)
    argnums = (0, 1, 2) if with_h0 else (0, 1)
    grads = jax.jit(jax.grad(_loss(ours, w_h, w_hT), argnums=argnums))(a, x, h0)
    for g, g_ref in zip(grads, _naive_grads(a, x, h0, w_h, w_hT), strict=False):
        np.testing.assert_allclose(g, g_ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_run_with_state_passing_equals_full_run(backend):
    a, x, h0 = _inputs((2, 37, 4), seed=3)
    T1 = 13
    ours = _recurrence(backend)
    h, hT = ours(a, x, h0)
    h_1, hT_1 = ours(a[:, :T1], x[:, :T1], h0)
    h_2, hT_2 = ours(a[:, T1:], x[:, T1:], hT_1)
    np.testing.assert_allclose(jnp.concatenate([h_1, h_2], axis=1), h, **TOL)
    np.testing.assert_allclose(hT_2, hT, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_compute_in_float32(backend):
    steps = 1000
    # x is bf16 (an impulse at t=0, exact in bf16); the decay 0.999 (f32) must not be rounded to 1.
    a = jnp.full((1, steps, 2), 0.999, jnp.float32)
    x = jnp.zeros((1, steps, 2), jnp.bfloat16).at[:, 0].set(1)
    ours = _recurrence(backend, chunk_size=64)
    h, hT = ours(a, x, jnp.zeros((1, 2), jnp.bfloat16))
    assert h.dtype == hT.dtype == jnp.float32
    expected = 0.999 ** np.arange(steps)
    np.testing.assert_allclose(h[0, :, 0], expected, rtol=1e-4)
    np.testing.assert_allclose(hT[0, 0], 0.999 ** (steps - 1), rtol=1e-4)  # ~0.37, not 1.0

    h_bf16, hT_bf16 = ours(a.astype(jnp.bfloat16), x)
    assert h_bf16.dtype == hT_bf16.dtype == jnp.float32


def test_auto_picks_a_registered_backend():
    assert resolve_backend("auto") == AUTO_BACKEND[jax.default_backend()]
    assert set(AUTO_BACKEND.values()) <= set(BACKENDS)
    assert {"linear", "associative", "chunked"} <= set(BACKENDS)


def test_errors():
    a = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="same shape"):
        linear_recurrence(a, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="h0 must have shape"):
        linear_recurrence(a, a, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="did you mean 'associative'"):
        linear_recurrence(a, a, backend="asociative")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_recurrence(a, a, chunk_size=0)
    with pytest.raises(ValueError, match="unroll"):
        linear_recurrence(a, a, unroll=-1)
    with pytest.raises(ValueError, match="time axis"):
        linear_recurrence(jnp.ones((2, 0, 3)), jnp.ones((2, 0, 3)))
