"""chunked_cross_entropy vs the plain logits path: values and gradients, f32 and bf16, via the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.models.loss import chunked_cross_entropy


def plain_cross_entropy(hidden_BxTxD, embedding_VxD, targets_BxT, mask_BxT, softcap, z_loss):
    """The reference: full [B, T, V] float32 logits, soft-cap, log-softmax."""
    logits = jnp.einsum("btd,vd->btv", hidden_BxTxD, embedding_VxD.astype(hidden_BxTxD.dtype),
                        preferred_element_type=jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum((nll + z_loss * jnp.square(log_z)) * mask), jnp.sum(nll * mask)


def inputs(dtype, b=3, t=19, d=16, v=40):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = (3.0 * jax.random.normal(keys[0], (b, t, d))).astype(dtype)
    embedding = jax.random.normal(keys[1], (v, d))
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    mask = jax.random.bernoulli(keys[3], 0.8, (b, t))
    return hidden, embedding, targets, mask


def value_and_grads(fn, hidden, embedding, targets, mask):
    """Both sums, and the gradients of total + 0.3 * nll (both cotangents nonzero)."""
    def objective(h, e):
        total, nll = fn(h, e, targets, mask)
        return total + 0.3 * nll, (total, nll)

    (_, sums), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(hidden, embedding)
    return sums, grads


@pytest.mark.parametrize("softcap,z_loss,chunk", [(30.0, 0.0, 8), (5.0, 1e-2, 4), (0.0, 1e-2, 19), (30.0, 0.0, 64)])
def test_matches_plain_logits_path_f32(softcap, z_loss, chunk):
    args = inputs(jnp.float32)
    got, got_grads = value_and_grads(
        lambda *a: chunked_cross_entropy(*a, softcap=softcap, chunk=chunk, z_loss=z_loss), *args)
    want, want_grads = value_and_grads(lambda *a: plain_cross_entropy(*a, softcap, z_loss), *args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


def test_bf16_hidden_tracks_plain_path():
    args = inputs(jnp.bfloat16)
    got, (g_hidden, g_embedding) = value_and_grads(
        lambda *a: chunked_cross_entropy(*a, softcap=30.0, chunk=8, z_loss=1e-3), *args)
    want, (w_hidden, w_embedding) = value_and_grads(lambda *a: plain_cross_entropy(*a, 30.0, 1e-3), *args)
    assert all(x.dtype == jnp.float32 for x in got) and g_hidden.dtype == jnp.bfloat16
    assert g_embedding.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)  # same bf16 matmul, f32 from there on
    for g, w in ((g_hidden, w_hidden), (g_embedding, w_embedding)):  # bf16 rounding of dlogits only
        assert rel_err(g, w) < 1e-2


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_hidden_path_equals_logits_path(dtype):
    cfg = updated(ModelConfig(), {"vocab_size": 50, "width": 32, "num_layers": 3, "pattern": "RRA",
                                  "attention.window": 6, "rglru.width": 24, "mlp_expansion": 2, "logit_softcap": 30.0,
                                  "dtype": dtype})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(1), (2, 21), 0, 50)
    targets, mask = jnp.roll(tok, -1, axis=1), jnp.ones((2, 21), bool).at[:, -1].set(False)

    def via_logits(model):
        return plain_cross_entropy(*_as_hidden(model(tok)[0]), targets, mask, 0.0, 0.0)[0]

    def via_hidden(model):
        hidden, _ = model.hidden(tok)
        return chunked_cross_entropy(hidden, model.embedder.embedding[...], targets, mask,
                                     softcap=cfg.logit_softcap, chunk=8)[0]

    want, w_grads = nnx.jit(nnx.value_and_grad(via_logits))(model)
    got, g_grads = nnx.jit(nnx.value_and_grad(via_hidden))(model)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got, want, rtol=tol)
    for g, w in zip(jax.tree.leaves(g_grads), jax.tree.leaves(w_grads)):
        assert rel_err(g, w) < 10 * tol
    logits, _ = model(tok)
    np.testing.assert_array_equal(model.logits(model.hidden(tok)[0]), logits)


def _as_hidden(logits_BxTxV):
    """Logits as 'hidden states' of an identity output projection (softcap already applied)."""
    return logits_BxTxV, jnp.eye(logits_BxTxV.shape[-1])
