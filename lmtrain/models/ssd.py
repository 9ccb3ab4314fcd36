"""Selective state-space recurrence (Mamba-2 / SSD) with document resets, with interchangeable backends.

Shapes: B batch, T time, H heads, P head dim, G groups of B/C (H % G == 0; head h reads group
g = h // (H // G)), N state size, K = T/Q chunks of Q steps, E = H // G heads per group.

    y_BxTxHxP, hT_BxHxPxN = ssd(x_BxTxHxP, dt_BxTxH, log_a_BxTxH, b_BxTxGxN, c_BxTxGxN, reset_BxT, h0_BxHxPxN)

per head, with the state h_t of shape [P, N] (h_0 = h0, zeros when None; hT = h_T):

    a_t = exp(log_a_t), and a_t = 0 where reset_t (a document start: no earlier state leaks in)
    h_t = a_t h_{t-1} + dt_t outer(x_t, B_t)
    y_t = h_t C_t

Everything (decays, cumulative sums, states, accumulation) is float32 whatever the input dtype, and
y and hT are returned in float32 (the caller casts y): bf16 cannot hold a decay in (0.99609, 1).
`log_a` at reset positions is ignored (replaced by 0 before any sum, so it cannot produce nan).

Backends (`BACKENDS`, all with the `Backend` signature):
  chunked  the SSD form (training). T is padded to a multiple of Q with identity steps (log_a = 0,
           dt = 0, no reset). Inside each chunk, a masked [Q, Q] "attention" per head,
               y_t += sum_{s <= t, same document} exp(sum_{s < i <= t} log_a_i) (C_t . B_s) dt_s x_s,
           with the document mask r_s == r_t on a within-chunk cumulative count r of resets (no -inf
           log decays); chunk states S_k (the chunk's contribution to its end state, last document
           only); h_k = A_k h_{k-1} + S_k over the K chunk boundaries by `linear_recurrence`; then
           y_t += [no reset in the chunk up to t] exp(sum_{start <= i <= t} log_a_i) h_{k-1} C_t.
           Largest arrays: [B, K, H, Q, Q] scores and [B, K, H, P, N] chunk states (memory linear in
           T, never [B, T, H, P, N]). Q = min(chunk, T).
  linear   `lax.scan` over t carrying only the [B, H, P, N] state: the reference and the decode path
           (T = 1). Its forward pass never builds [B, T, H, P, N]; its autodiff keeps the per-step
           states, so it is not for training.

Gradients are plain autodiff (the chunk-boundary recurrence has `linear_recurrence`'s custom_vjp).
Matmuls run at `PRECISION` (HIGHEST: true float32 also on GPUs/TPUs, whose default is TF32/bf16 passes).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from lmtrain.configlib import did_you_mean
from lmtrain.models.scan import linear_recurrence

PRECISION = jax.lax.Precision.HIGHEST


class Backend(Protocol):
    """(x*dt, log_a, b, c, reset, h0) -> (y, hT), float32, heads split into groups: x_BxTxGxExP,
    log_a_BxTxGxE (0 at resets), b/c_BxTxGxN, reset_BxT bool, h0_BxGxExPxN."""

    def __call__(self, xdt_BxTxGxExP: jax.Array, log_a_BxTxGxE: jax.Array, b_BxTxGxN: jax.Array,
                 c_BxTxGxN: jax.Array, reset_BxT: jax.Array, h0_BxGxExPxN: jax.Array, *, chunk: int,
                 scan_backend: str) -> tuple[jax.Array, jax.Array]: ...


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *operands, precision=PRECISION, preferred_element_type=jnp.float32)


def _linear(xdt_BxTxGxExP: jax.Array, log_a_BxTxGxE: jax.Array, b_BxTxGxN: jax.Array, c_BxTxGxN: jax.Array,
            reset_BxT: jax.Array, h0_BxGxExPxN: jax.Array, *, chunk: int, scan_backend: str
            ) -> tuple[jax.Array, jax.Array]:
    """Sequential `lax.scan` over t carrying the [B, G, E, P, N] state; y_t is read out at each step."""
    del chunk, scan_backend
    a_BxTxGxE = jnp.where(reset_BxT[:, :, None, None], 0.0, jnp.exp(log_a_BxTxGxE))

    def step(h_BxGxExPxN: jax.Array, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        a_BxGxE, xdt_BxGxExP, b_BxGxN, c_BxGxN = inputs
        h_BxGxExPxN = (a_BxGxE[..., None, None] * h_BxGxExPxN
                       + xdt_BxGxExP[..., None] * b_BxGxN[:, :, None, None, :])
        return h_BxGxExPxN, _einsum("bgepn,bgn->bgep", h_BxGxExPxN, c_BxGxN)

    time_major = [jnp.moveaxis(v, 1, 0) for v in (a_BxTxGxE, xdt_BxTxGxExP, b_BxTxGxN, c_BxTxGxN)]
    hT_BxGxExPxN, y_TxBxGxExP = jax.lax.scan(step, h0_BxGxExPxN, time_major)
    return jnp.moveaxis(y_TxBxGxExP, 0, 1), hT_BxGxExPxN


def _to_chunks(v_BxTx: jax.Array, Q: int) -> jax.Array:
    """[B, T, ...] -> [B, K, Q, ...], zero-padding T up to K*Q (zero x*dt, log_a and reset: identity steps)."""
    B, T, *rest = v_BxTx.shape
    K = -(-T // Q)
    v_BxTx = jnp.pad(v_BxTx, [(0, 0), (0, K * Q - T)] + [(0, 0)] * len(rest))
    return v_BxTx.reshape(B, K, Q, *rest)


def _segment_sums(log_a_BxKxQxGxE: jax.Array) -> jax.Array:
    """seg[..., t, s] = sum_{s < i <= t} log_a_i (0 for s >= t) as [B, K, G, E, Q(t), Q(s)]: a direct
    masked sum, so no precision is lost to a difference of two long cumulative sums."""
    Q = log_a_BxKxQxGxE.shape[2]
    la_BxKxGxExQ = jnp.moveaxis(log_a_BxKxQxGxE, 2, -1)
    after_QxQ = jnp.arange(Q)[:, None] > jnp.arange(Q)[None, :]  # i > s, i on the first axis
    terms = jnp.where(after_QxQ, la_BxKxGxExQ[..., :, None], 0.0)
    return jnp.cumsum(terms, axis=-2)


def _intra_chunk(x_BxKxQxGxExP: jax.Array, la_BxKxQxGxE: jax.Array, b_BxKxQxGxN: jax.Array,
                 c_BxKxQxGxN: jax.Array, r_BxKxQ: jax.Array) -> jax.Array:
    """y_t = sum_s [s <= t, r_s == r_t] exp(seg[t, s]) (C_t . B_s) (dt_s x_s) inside each chunk, through
    [B, K, G, E, Q, Q] scores; r counts the resets so far in the chunk (equal r: same document)."""
    Q = x_BxKxQxGxExP.shape[2]
    causal_QxQ = jnp.arange(Q)[:, None] >= jnp.arange(Q)[None, :]
    mask_BxKx1x1xQxQ = (causal_QxQ & (r_BxKxQ[:, :, :, None] == r_BxKxQ[:, :, None, :]))[:, :, None, None]
    seg_BxKxGxExQxQ = _segment_sums(la_BxKxQxGxE)
    decay_BxKxGxExQxQ = jnp.where(mask_BxKx1x1xQxQ, jnp.exp(jnp.where(mask_BxKx1x1xQxQ, seg_BxKxGxExQxQ, 0.0)),
                                  0.0)
    cb_BxKxGxQxQ = _einsum("bktgn,bksgn->bkgts", c_BxKxQxGxN, b_BxKxQxGxN)
    scores_BxKxGxExQxQ = decay_BxKxGxExQxQ * cb_BxKxGxQxQ[:, :, :, None]
    return _einsum("bkgets,bksgep->bktgep", scores_BxKxGxExQxQ, x_BxKxQxGxExP)


def _chunked(xdt_BxTxGxExP: jax.Array, log_a_BxTxGxE: jax.Array, b_BxTxGxN: jax.Array, c_BxTxGxN: jax.Array,
             reset_BxT: jax.Array, h0_BxGxExPxN: jax.Array, *, chunk: int, scan_backend: str
             ) -> tuple[jax.Array, jax.Array]:
    """The SSD chunked form: intra-chunk masked scores, chunk states, a recurrence over chunk boundaries."""
    B, T, G, E, P = xdt_BxTxGxExP.shape
    N = b_BxTxGxN.shape[-1]
    Q = min(chunk, T)
    x_BxKxQxGxExP = _to_chunks(xdt_BxTxGxExP, Q)
    la_BxKxQxGxE = _to_chunks(log_a_BxTxGxE, Q)
    b_BxKxQxGxN, c_BxKxQxGxN = _to_chunks(b_BxTxGxN, Q), _to_chunks(c_BxTxGxN, Q)
    r_BxKxQ = jnp.cumsum(_to_chunks(reset_BxT, Q).astype(jnp.int32), axis=2)  # resets so far in the chunk
    K = x_BxKxQxGxExP.shape[1]
    y_BxKxQxGxExP = _intra_chunk(x_BxKxQxGxExP, la_BxKxQxGxE, b_BxKxQxGxN, c_BxKxQxGxN, r_BxKxQ)

    # Chunk states: the chunk's own contribution to its end state (its last document only).
    in_last_doc_BxKxQ = r_BxKxQ == r_BxKxQ[:, :, -1:]
    tail_BxKxQxGxE = jnp.cumsum(la_BxKxQxGxE[:, :, ::-1], axis=2)[:, :, ::-1]  # sum_{i >= s} log_a_i
    tail_BxKxQxGxE = jnp.concatenate([tail_BxKxQxGxE[:, :, 1:], jnp.zeros_like(tail_BxKxQxGxE[:, :, :1])], 2)
    w_BxKxQxGxE = jnp.where(in_last_doc_BxKxQ[..., None, None], jnp.exp(tail_BxKxQxGxE), 0.0)
    s_BxKxGxExPxN = _einsum("bksgep,bksgn->bkgepn", x_BxKxQxGxExP * w_BxKxQxGxE[..., None], b_BxKxQxGxN)

    # Chunk boundaries: h_k = A_k h_{k-1} + S_k, A_k = 0 if the chunk holds a reset.
    l_BxKxQxGxE = jnp.cumsum(la_BxKxQxGxE, axis=2)  # sum_{start <= i <= t} log_a_i
    a_BxKxGxE = jnp.where(r_BxKxQ[:, :, -1, None, None] == 0, jnp.exp(l_BxKxQxGxE[:, :, -1]), 0.0)
    D = G * E * P * N
    a_BxKxD = jnp.broadcast_to(a_BxKxGxE[..., None, None], (B, K, G, E, P, N)).reshape(B, K, D)
    h_BxKxD, hT_BxD = linear_recurrence(a_BxKxD, s_BxKxGxExPxN.reshape(B, K, D), h0_BxGxExPxN.reshape(B, D),
                                        backend=scan_backend)
    hprev_BxKxGxExPxN = jnp.concatenate([h0_BxGxExPxN.reshape(B, 1, D), h_BxKxD[:, :-1]], axis=1
                                        ).reshape(B, K, G, E, P, N)

    # Inter-chunk: y_t += [r_t == 0] exp(l_t) h_{k-1} C_t.
    carry_BxKxQxGxE = jnp.where(r_BxKxQ[..., None, None] == 0, jnp.exp(l_BxKxQxGxE), 0.0)
    y_BxKxQxGxExP += _einsum("bktgn,bkgepn->bktgep", c_BxKxQxGxN, hprev_BxKxGxExPxN) * carry_BxKxQxGxE[..., None]
    return y_BxKxQxGxExP.reshape(B, K * Q, G, E, P)[:, :T], hT_BxD.reshape(B, G, E, P, N)


BACKENDS: dict[str, Backend] = {"chunked": _chunked, "linear": _linear}


def ssd(x_BxTxHxP: jax.Array, dt_BxTxH: jax.Array, log_a_BxTxH: jax.Array, b_BxTxGxN: jax.Array,
        c_BxTxGxN: jax.Array, reset_BxT: jax.Array, h0_BxHxPxN: jax.Array | None = None, *, chunk: int = 64,
        backend: str = "chunked", scan_backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """The SSD recurrence (module docstring), in float32. Returns (y_BxTxHxP, hT_BxHxPxN).

    `reset_BxT` (bool) marks document starts; `h0` None means zeros. `chunk` is Q of the chunked
    backend; `scan_backend` the `linear_recurrence` backend of its chunk-boundary recurrence.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown ssd backend {backend!r}{did_you_mean(backend, list(BACKENDS))}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive; got {chunk}")
    B, T, H, P = x_BxTxHxP.shape
    G, N = b_BxTxGxN.shape[2:]
    shapes = {"dt": (dt_BxTxH.shape, (B, T, H)), "log_a": (log_a_BxTxH.shape, (B, T, H)),
              "b": (b_BxTxGxN.shape, (B, T, G, N)), "c": (c_BxTxGxN.shape, (B, T, G, N)),
              "reset": (reset_BxT.shape, (B, T))}
    if h0_BxHxPxN is not None:
        shapes["h0"] = (h0_BxHxPxN.shape, (B, H, P, N))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(f"{name} must have shape {want} (x is {x_BxTxHxP.shape}, b {b_BxTxGxN.shape}); got {got}")
    if T < 1 or H % G:
        raise ValueError(f"need T >= 1 and heads divisible by groups; got T={T}, H={H}, G={G}")
    E = H // G
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    reset_BxT = jnp.asarray(reset_BxT, bool)
    xdt_BxTxGxExP = (f32(x_BxTxHxP) * f32(dt_BxTxH)[..., None]).reshape(B, T, G, E, P)
    log_a_BxTxGxE = jnp.where(reset_BxT[..., None], 0.0, f32(log_a_BxTxH)).reshape(B, T, G, E)
    h0_BxGxExPxN = (jnp.zeros((B, G, E, P, N), jnp.float32) if h0_BxHxPxN is None
                    else f32(h0_BxHxPxN).reshape(B, G, E, P, N))
    y_BxTxGxExP, hT_BxGxExPxN = BACKENDS[backend](xdt_BxTxGxExP, log_a_BxTxGxE, f32(b_BxTxGxN), f32(c_BxTxGxN),
                                                  reset_BxT, h0_BxGxExPxN, chunk=chunk, scan_backend=scan_backend)
    return y_BxTxGxExP.reshape(B, T, H, P), hT_BxGxExPxN.reshape(B, H, P, N)


__all__ = ["BACKENDS", "PRECISION", "Backend", "ssd"]
