"""Next-token cross-entropy: from whole logits (`cross_entropy`, `token_nll`) and from the final hidden
states, chunked over the sequence (`chunked_cross_entropy`).

    total, nll = chunked_cross_entropy(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT,
                                       softcap=30.0, chunk=256, z_loss=0.0)

equals `cross_entropy(softcap(hidden @ embedding.T), targets, mask, z_loss)` (the sums over masked
tokens of the loss incl. z-loss and of the NLL, float32) without materialising the float32
[B, T, V] logits: positions are processed in chunks of C (a `lax.scan`). Under differentiation
(`custom_vjp`) each chunk's logit gradient is formed right after its loss and multiplied out at
once, so the forward pass already yields d/d hidden and d/d embedding (the backward pass only scales
them by the incoming cotangents): three [B*C, D] x [D, V]-sized matmuls per chunk, none recomputed.
The embedding gradient is accumulated as hidden^T @ dlogits in [D, V] (XLA:CPU would otherwise
transpose the [B*C, V] dlogits). With z_loss > 0 the gradients of total and NLL differ and both are
formed (two more matmuls).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_nll(logits_NxV: jax.Array, targets_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log p(target), log Z) of every position, float32; N stands for any leading dims."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    log_z_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    return log_z_N - jnp.take_along_axis(logits_NxV, targets_N[..., None], axis=-1)[..., 0], log_z_N


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses incl. z-loss, sum of masked token NLL) from whole logits; float32."""
    nll_BxT, log_z_BxT = token_nll(logits_BxTxV, targets_BxT)
    mask_BxT = mask_BxT.astype(jnp.float32)
    return jnp.sum((nll_BxT + z_loss * jnp.square(log_z_BxT)) * mask_BxT), jnp.sum(nll_BxT * mask_BxT)


def _logits(hidden_MxD: jax.Array, embedding_VxD: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array]:
    """(soft-capped float32 logits, their derivative w.r.t. the raw logits)."""
    raw_MxV = jnp.einsum("md,vd->mv", hidden_MxD, embedding_VxD, preferred_element_type=jnp.float32)
    if not softcap:
        return raw_MxV, jnp.ones((), jnp.float32)
    tanh_MxV = jnp.tanh(raw_MxV * (1.0 / softcap))
    return tanh_MxV * softcap, 1.0 - jnp.square(tanh_MxV)


def _split(x_BxT: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/C, B*C, ...]: chunk n holds positions n*C..(n+1)*C-1 of every row, flattened
    (T is padded to a multiple of C with zeros, i.e. masked out)."""
    b, t = x_BxT.shape[:2]
    x_BxT = jnp.pad(x_BxT, ((0, 0), (0, -t % chunk)) + ((0, 0),) * (x_BxT.ndim - 2))
    x_NxBxC = jnp.moveaxis(x_BxT.reshape(b, -1, chunk, *x_BxT.shape[2:]), 1, 0)
    return x_NxBxC.reshape(x_NxBxC.shape[0], b * chunk, *x_BxT.shape[2:])


def _merge(x_NxM: jax.Array, b: int, t: int) -> jax.Array:
    """Inverse of `_split`: [T/C, B*C, ...] -> [B, T, ...]."""
    x_NxBxC = x_NxM.reshape(x_NxM.shape[0], b, -1, *x_NxM.shape[2:])
    x_BxNxC = jnp.moveaxis(x_NxBxC, 0, 1)
    return x_BxNxC.reshape(b, -1, *x_NxM.shape[2:])[:, :t]


def _chunk_terms(hidden_MxD, embedding_VxD, targets_M, mask_M, softcap, z_loss, grads):
    """One chunk of M = B*C rows: (loss incl. z-loss, NLL) sums and, with `grads`, their logit gradients."""
    logits_MxV, dcap_MxV = _logits(hidden_MxD, embedding_VxD, softcap)
    nll_M, log_z_M = token_nll(logits_MxV, targets_M)
    sums = (jnp.sum((nll_M + z_loss * jnp.square(log_z_M)) * mask_M), jnp.sum(nll_M * mask_M))
    if not grads:
        return sums, ()
    # d nll / d logits = probs - onehot; d (z log_z^2) / d logits = 2 z log_z probs; then the soft-cap's
    # derivative. Rows of the NLL part and (if z_loss) of the total follow each other: [M or 2M, V].
    probs_MxV = jnp.exp(logits_MxV - log_z_M[:, None]) * dcap_MxV
    onehot_MxV = jax.nn.one_hot(targets_M, logits_MxV.shape[-1], dtype=jnp.float32) * dcap_MxV
    d_nll_MxV = (probs_MxV - onehot_MxV) * mask_M[:, None]
    d_logits = [d_nll_MxV] + ([d_nll_MxV + probs_MxV * (2.0 * z_loss * log_z_M * mask_M)[:, None]] if z_loss else [])
    return sums, jnp.concatenate(d_logits).astype(hidden_MxD.dtype)


def _scan_chunks(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, chunk, z_loss, grads):
    """Sums over all chunks; with `grads` also d/d hidden [K, B, T, D] and d/d embedding^T [K, D, V] of
    (NLL, total) (K = 2) or of both at once (K = 1, when z_loss = 0 they are equal)."""
    (b, t, d), v = hidden_BxTxD.shape, embedding_VxD.shape[0]
    k = 2 if z_loss else 1
    embedding_VxD = embedding_VxD.astype(hidden_BxTxD.dtype)

    def body(carry: tuple, xs: tuple) -> tuple:
        hidden_MxD, targets_M, mask_M = xs
        sums, d_logits_KMxV = _chunk_terms(hidden_MxD, embedding_VxD, targets_M, mask_M, softcap, z_loss, grads)
        carry = (carry[0] + sums[0], carry[1] + sums[1], *carry[2:])
        if not grads:
            return carry, ()
        d_hidden_KMxD = jnp.dot(d_logits_KMxV, embedding_VxD, preferred_element_type=jnp.float32)
        d_logits_KxMxV = d_logits_KMxV.reshape(k, -1, v)
        d_embedding_KxDxV = carry[2] + jnp.stack(
            [jnp.einsum("md,mv->dv", hidden_MxD, d, preferred_element_type=jnp.float32) for d in d_logits_KxMxV])
        return (*carry[:2], d_embedding_KxDxV), d_hidden_KMxD.astype(hidden_MxD.dtype).reshape(k, -1, d)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero) + ((jnp.zeros((k, d, v), jnp.float32),) if grads else ())
    xs = (_split(hidden_BxTxD, chunk), _split(targets_BxT, chunk), _split(mask_BxT, chunk))
    carry, d_hidden_NxKxMxD = jax.lax.scan(body, init, xs)
    if not grads:
        return carry
    d_hidden_KxBxTxD = jnp.stack([_merge(d_hidden_NxKxMxD[:, i], b, t) for i in range(k)])
    return carry[:2], (d_hidden_KxBxTxD, carry[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cross_entropy(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, chunk, z_loss):
    return _scan_chunks(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, chunk, z_loss, False)


def _forward(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, chunk, z_loss):
    return _scan_chunks(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, chunk, z_loss, True)


def _backward(softcap, chunk, z_loss, residuals, cotangents):
    d_hidden_KxBxTxD, d_embedding_KxDxV = residuals
    g_total, g_nll = cotangents
    # K = 2: rows are (NLL, total); K = 1: both outputs have the same gradient.
    g_K = jnp.stack([g_nll, g_total]) if z_loss else jnp.stack([g_nll + g_total])
    d_hidden = jnp.einsum("k,k...->...", g_K.astype(d_hidden_KxBxTxD.dtype), d_hidden_KxBxTxD)
    return d_hidden, jnp.einsum("k,kdv->vd", g_K, d_embedding_KxDxV), None, None


_cross_entropy.defvjp(_forward, _backward)


def chunked_cross_entropy(hidden_BxTxD: jax.Array, embedding_VxD: jax.Array, targets_BxT: jax.Array,
                          mask_BxT: jax.Array, *, softcap: float = 0.0, chunk: int = 256,
                          z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses incl. z-loss, sum of masked token NLL), float32.

    Logits = hidden_BxTxD @ embedding_VxD.T in hidden's dtype with float32 accumulation (as
    `Embedder.decode`), then `softcap * tanh(logits / softcap)` if softcap > 0; log-softmax and the
    loss are float32. Gradients flow to hidden and embedding.
    """
    return _cross_entropy(hidden_BxTxD, embedding_VxD.astype(jnp.float32), targets_BxT,
                          mask_BxT.astype(jnp.float32), float(softcap), min(chunk, hidden_BxTxD.shape[1]),
                          float(z_loss))
