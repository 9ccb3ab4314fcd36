"""Linear recurrence `h_t = a_t * h_{t-1} + x_t` over the time axis, with interchangeable backends.

Shapes: B batch, T time, D channels (any trailing shape after T; it is flattened to one axis).

    h_BxTxD, hT_BxD = linear_recurrence(a_BxTxD, x_BxTxD, h0_BxD)

    h_t = a_t * h_{t-1} + x_t,  t = 1..T,  h_0 = h0 (zeros when None),  hT = h_T

Everything is computed and returned in float32 whatever the input dtype: bf16 cannot represent a
decay in (0.99609, 1) and would silently turn 0.999 into 1.0. `a_t = 0` (a document reset) is fine
for every backend (no logarithms, no division).

Backends (`BACKENDS`, all with the `Backend` signature; `reverse` runs t = T..1):
  linear       `jax.lax.scan` over t, reading and writing step t in place along axis 1 (no
               time-major transposes); `unroll` steps per loop iteration. The reference.
  associative  `jax.lax.associative_scan` over T: parallel, O(log T) depth, ~2 log T array passes.
  chunked      associative scans inside all chunks of `chunk_size` at once, a sequential scan over
               the T/C chunk-boundary states, one fix-up pass (T need not be a multiple of C: the
               tail is padded with the identity step a=1, x=0).
  auto         `AUTO_BACKEND[jax.default_backend()]`: linear on CPU (measured: 4-9x faster than the
               others forward, 2.4-4x forward+backward); associative on GPU and chunked on TPU (reasoned,
               unmeasured). See docs/performance.md.

Gradients: every backend shares one `jax.custom_vjp` whose backward pass is the reverse recurrence
run by the same backend,

    dh_t = g_t + a_{t+1} dh_{t+1}   (dh_T = g_T + ghT),   dx_t = dh_t,   da_t = dh_t h_{t-1},
    dh0 = a_1 dh_1,

where g_t and ghT are the incoming cotangents of h_t and hT. It keeps only a, h0 (inputs) and h from
forward to backward. Measured against plain autodiff of each backend (benchmarks/scan.py
--autodiff): autodiff keeps 2 (linear), 5 (associative) and 6.8 (chunked) [B,T,D] f32 arrays
instead of 1, and for the in-place linear loop takes time quadratic in T (~100x slower at T=2048);
associative/chunked times are within noise. So the custom_vjp is used for every backend.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from lmtrain.configlib import did_you_mean


class Backend(Protocol):
    """(a, x, h0) -> (h, final state), all float32 [B,T,D] / [B,D]; with `reverse` the recurrence runs
    from t=T down to 1 and the final state is h_1."""

    def __call__(self, a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, *, reverse: bool,
                 chunk_size: int, unroll: int) -> tuple[jax.Array, jax.Array]: ...


def _linear(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, *, reverse: bool, chunk_size: int,
            unroll: int) -> tuple[jax.Array, jax.Array]:
    """Sequential `lax.scan` over t; with `reverse` it runs from t=T down to 1 (hT is then h_1).

    The loop reads and writes step t in place along axis 1 rather than scanning a time-major copy:
    on CPU the two [B,T,D] <-> [T,B,D] transposes cost more than the recurrence itself.
    """
    del chunk_size

    def step(carry: tuple[jax.Array, jax.Array], t: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        h_BxD, h_BxTxD = carry
        a_t_BxD = jax.lax.dynamic_index_in_dim(a_BxTxD, t, axis=1, keepdims=False)
        x_t_BxD = jax.lax.dynamic_index_in_dim(x_BxTxD, t, axis=1, keepdims=False)
        h_BxD = a_t_BxD * h_BxD + x_t_BxD
        return (h_BxD, jax.lax.dynamic_update_index_in_dim(h_BxTxD, h_BxD, t, axis=1)), None

    ts = jnp.arange(a_BxTxD.shape[1])
    (hT_BxD, h_BxTxD), _ = jax.lax.scan(step, (h0_BxD, jnp.zeros_like(x_BxTxD)), ts, reverse=reverse,
                                        unroll=unroll)
    return h_BxTxD, hT_BxD


def _combine(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
    """Composes two affine maps h -> a h + x: first `left`, then `right`."""
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, a_r * x_l + x_r


def _associative(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, *, reverse: bool,
                 chunk_size: int, unroll: int) -> tuple[jax.Array, jax.Array]:
    """`lax.associative_scan` over T, with h0 folded into the first step's input."""
    del chunk_size, unroll
    first = -1 if reverse else 0
    x_BxTxD = x_BxTxD.at[:, first].add(a_BxTxD[:, first] * h0_BxD)
    _, h_BxTxD = jax.lax.associative_scan(_combine, (a_BxTxD, x_BxTxD), reverse=reverse, axis=1)
    return h_BxTxD, h_BxTxD[:, -1 - first]


def _chunked(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, *, reverse: bool,
             chunk_size: int, unroll: int) -> tuple[jax.Array, jax.Array]:
    """Associative scans inside all chunks of C steps at once, a sequential scan (`_linear`) of the
    N chunk-boundary states, then one pass `h = A * h_in + X`."""
    B, T, D = a_BxTxD.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = ((0, 0), (0, N * C - T), (0, 0))  # identity steps a=1, x=0 leave the state unchanged
    a_BxNxCxD = jnp.pad(a_BxTxD, pad, constant_values=1.0).reshape(B, N, C, D)
    x_BxNxCxD = jnp.pad(x_BxTxD, pad).reshape(B, N, C, D)
    # Inside a chunk, the state after step c is A_c * (state entering the chunk) + X_c.
    A_BxNxCxD, X_BxNxCxD = jax.lax.associative_scan(_combine, (a_BxNxCxD, x_BxNxCxD), reverse=reverse,
                                                    axis=2)
    last = 0 if reverse else -1
    hout_BxNxD, hT_BxD = _linear(A_BxNxCxD[:, :, last], X_BxNxCxD[:, :, last], h0_BxD, reverse=reverse,
                                 chunk_size=chunk_size, unroll=unroll)
    h0_Bx1xD = h0_BxD[:, None]
    if reverse:
        hin_BxNxD = jnp.concatenate([hout_BxNxD[:, 1:], h0_Bx1xD], axis=1)
    else:
        hin_BxNxD = jnp.concatenate([h0_Bx1xD, hout_BxNxD[:, :-1]], axis=1)
    h_BxNxCxD = A_BxNxCxD * hin_BxNxD[:, :, None] + X_BxNxCxD
    return h_BxNxCxD.reshape(B, N * C, D)[:, :T], hT_BxD


BACKENDS: dict[str, Backend] = {"linear": _linear, "associative": _associative, "chunked": _chunked}

# backend="auto" by `jax.default_backend()`; the reasons and numbers are in docs/performance.md.
# cpu: measured (linear is 4-9x faster than associative/chunked forward, 2.4-4x forward+backward).
# gpu, tpu: reasoned, NOT measured (no accelerator was available): both avoid T sequential loop steps.
AUTO_BACKEND: dict[str, str] = {"cpu": "linear", "gpu": "associative", "tpu": "chunked"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _recurrence(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, backend: str, chunk_size: int,
                unroll: int) -> tuple[jax.Array, jax.Array]:
    return BACKENDS[backend](a_BxTxD, x_BxTxD, h0_BxD, reverse=False, chunk_size=chunk_size, unroll=unroll)


def _recurrence_fwd(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array, backend: str,
                    chunk_size: int, unroll: int):
    h_BxTxD, hT_BxD = _recurrence(a_BxTxD, x_BxTxD, h0_BxD, backend, chunk_size, unroll)
    return (h_BxTxD, hT_BxD), (a_BxTxD, h_BxTxD, h0_BxD)


def _recurrence_bwd(backend: str, chunk_size: int, unroll: int, residuals, cotangents):
    a_BxTxD, h_BxTxD, h0_BxD = residuals
    g_BxTxD, ghT_BxD = cotangents
    # dh_t = a_{t+1} dh_{t+1} + g_t run from t=T down; ghT enters as the state "after" T with a_{T+1}=1.
    anext_BxTxD = jnp.concatenate([a_BxTxD[:, 1:], jnp.ones_like(a_BxTxD[:, :1])], axis=1)
    dh_BxTxD, dh1_BxD = BACKENDS[backend](anext_BxTxD, g_BxTxD, ghT_BxD, reverse=True,
                                          chunk_size=chunk_size, unroll=unroll)
    hprev_BxTxD = jnp.concatenate([h0_BxD[:, None], h_BxTxD[:, :-1]], axis=1)
    return dh_BxTxD * hprev_BxTxD, dh_BxTxD, a_BxTxD[:, 0] * dh1_BxD


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def resolve_backend(backend: str) -> str:
    """The concrete backend name for `backend` ("auto" -> this platform's choice); ValueError if unknown."""
    if backend == "auto":
        return AUTO_BACKEND.get(jax.default_backend(), "linear")
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear-recurrence backend {backend!r}"
                         f"{did_you_mean(backend, [*BACKENDS, 'auto'])}")
    return backend


def linear_recurrence(a_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array | None = None, *,
                      backend: str = "auto", chunk_size: int = 128, unroll: int = 1
                      ) -> tuple[jax.Array, jax.Array]:
    """`h_t = a_t * h_{t-1} + x_t` along axis 1, in float32. Returns (h_BxTxD, hT_BxD).

    `a` and `x` have the same shape [B, T, *D]; `h0` is [B, *D] or None (zeros). `chunk_size` is
    the chunk length of the chunked backend; `unroll` the steps per loop iteration of the
    sequential loops (linear: time steps; chunked: chunks).
    """
    name = resolve_backend(backend)
    if a_BxTxD.shape != x_BxTxD.shape or a_BxTxD.ndim < 2:
        raise ValueError(f"a and x must have the same shape [B, T, ...]; got a {a_BxTxD.shape}, "
                         f"x {x_BxTxD.shape}")
    B, T, *dims = a_BxTxD.shape
    if h0_BxD is not None and h0_BxD.shape != (B, *dims):
        raise ValueError(f"h0 must have shape {(B, *dims)} (a without its time axis); got {h0_BxD.shape}")
    if T < 1:
        raise ValueError(f"the time axis (axis 1) must be non-empty; got a {a_BxTxD.shape}")
    if chunk_size < 1 or unroll < 1:
        raise ValueError(f"chunk_size and unroll must be positive; got chunk_size={chunk_size}, "
                         f"unroll={unroll}")
    D = math.prod(dims)
    a_BxTxD = jnp.asarray(a_BxTxD, jnp.float32).reshape(B, T, D)
    x_BxTxD = jnp.asarray(x_BxTxD, jnp.float32).reshape(B, T, D)
    h0_BxD = jnp.zeros((B, D)) if h0_BxD is None else h0_BxD
    h0_BxD = jnp.asarray(h0_BxD, jnp.float32).reshape(B, D)
    h_BxTxD, hT_BxD = _recurrence(a_BxTxD, x_BxTxD, h0_BxD, name, chunk_size, unroll)
    return h_BxTxD.reshape(B, T, *dims), hT_BxD.reshape(B, *dims)


__all__ = ["AUTO_BACKEND", "BACKENDS", "Backend", "linear_recurrence", "resolve_backend"]
