"""Blockwise windowed attention vs a dense T x T reference; RoPE vs its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.models.mixers.attention import rope, windowed_attention


def dense_reference(q, k, v, qseg, kseg, kvalid, window):
    """Naive: materialise all scores, mask by 0 <= (P + t) - s <= window, same segment, valid."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    p = s - t
    k_rep = np.repeat(np.asarray(k, np.float64), n // kv, axis=2)
    v_rep = np.repeat(np.asarray(v, np.float64), n // kv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), k_rep) / np.sqrt(h)
    qi, ki = np.arange(t)[:, None] + p, np.arange(s)[None]
    mask = (qi - ki >= 0) & (qi - ki <= window)
    mask = mask[None] & (np.asarray(qseg)[:, :, None] == np.asarray(kseg)[:, None]) & np.asarray(kvalid)[:, None]
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v_rep)


@pytest.mark.parametrize("t,prefix,window,block,kv", [
    (37, 0, 8, 8, 1),      # several blocks, ragged tail, MQA
    (37, 8, 8, 8, 2),      # with a cached prefix, GQA
    (1, 8, 8, 8, 4),       # decoding one token, MHA
    (16, 0, 40, 40, 1),    # window longer than the sequence (global)
    (24, 5, 5, 3, 2),      # block smaller than the window
])
def test_blockwise_matches_dense(t, prefix, window, block, kv):
    rng = np.random.default_rng(0)
    b, n, h = 2, 4, 8
    s = prefix + t
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, s, kv, h)).astype(np.float32)
    v = rng.normal(size=(b, s, kv, h)).astype(np.float32)
    kseg = np.sort(rng.integers(1, 4, size=(b, s)), axis=1)
    kvalid = np.ones((b, s), bool)
    kvalid[:, : prefix // 2] = False  # part of the cache is still empty
    qseg = kseg[:, prefix:]
    out = windowed_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(qseg),
                             jnp.asarray(kseg), jnp.asarray(kvalid), window=window, block=block)
    np.testing.assert_allclose(out, dense_reference(q, k, v, qseg, kseg, kvalid, window), atol=2e-5)


def test_memory_is_linear_in_length():
    """Compiled temp memory of blockwise attention grows ~linearly with T (no T x T scores)."""
    def temp_bytes(t):
        q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
        fn = jax.jit(lambda *a: windowed_attention(*a, window=128, block=128))
        return fn.lower(q, kv, kv, ids, ids, valid).compile().memory_analysis().temp_size_in_bytes

    small, big = temp_bytes(1024), temp_bytes(8192)
    assert big < 10 * small, (small, big)  # 8x longer; quadratic would be 64x


def test_rope_rotates_first_half_by_position():
    x = jnp.ones((1, 3, 1, 8))
    pos = jnp.array([[0, 1, 5]])
    out = np.asarray(rope(x, pos, base=10_000.0, fraction=0.5))
    np.testing.assert_allclose(out[0, 0, 0], np.ones(8), atol=1e-6)  # position 0: identity
    np.testing.assert_allclose(out[..., 4:], 1.0)  # second half untouched
    inv = 1.0 / 10_000 ** (np.arange(2) * 2 / 4)
    angle = 5 * inv
    np.testing.assert_allclose(out[0, 2, 0, :2], np.cos(angle) - np.sin(angle), atol=1e-5)
    np.testing.assert_allclose(out[0, 2, 0, 2:4], np.cos(angle) + np.sin(angle), atol=1e-5)
    # relative property: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
    dot = lambda m, n: float(jnp.sum(rope(q, jnp.array([[m]]), 1e4, 0.5) * rope(k, jnp.array([[n]]), 1e4, 0.5)))
    assert abs(dot(7, 3) - dot(104, 100)) < 1e-4
