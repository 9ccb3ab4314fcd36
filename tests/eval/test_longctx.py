"""Chunked evaluation equals one full forward; buckets against a naive computation; chunk errors;
one compiled chunk step serves every length (memory bounded by the chunk)."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmtrain.eval.longctx import ChunkRunner, _chunk_step, bucket_edges, bucket_means, check_chunking, log_bins

LENGTH = 96  # 3x the tiny run's training length


def rows(b, length, seed=0, vocab=259):
    tok = np.random.default_rng(seed).integers(0, vocab, (b, length + 1)).astype(np.int32)
    return tok[:, :-1], tok[:, 1:]


@pytest.fixture(scope="module")
def runners(tiny_model):
    """Chunks shorter (8) and longer (32) than the attention window (16)."""
    return {chunk: ChunkRunner(tiny_model, chunk) for chunk in (8, 32)}


def test_chunked_equals_full_forward(tiny_model, runners):
    inputs, targets = rows(2, LENGTH)
    logits, state = nnx.jit(lambda m, x: m(x))(tiny_model, inputs)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    full_nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    outs = {chunk: runner.run(inputs, targets) for chunk, runner in runners.items()}
    for chunk, out in outs.items():
        np.testing.assert_allclose(out.nll_BxL, full_nll, atol=1e-4, rtol=1e-4)
        agree = out.pred_BxL == np.argmax(logp, -1)
        assert agree.mean() > 0.99  # argmax may flip only on (near-)ties within round-off
        assert out.state_norm_KxRxB.shape == (LENGTH // chunk, 3, 2)
        assert runners[chunk].layers == ["layer 0 (R)", "layer 1 (R)", "layer 3 (R)"]
    # the last chunk's norms are those of the full forward's final state, in depth order
    h = [state.groups[0].h_BxL[0], state.groups[1].h_BxL[0], state.tail[0].h_BxL]
    want = np.stack([np.linalg.norm(np.asarray(x), axis=-1) for x in h])
    np.testing.assert_allclose(outs[32].state_norm_KxRxB[-1], want, rtol=1e-4)
    # norms at the common chunk ends (32, 64, 96) agree between the two chunkings
    np.testing.assert_allclose(outs[8].state_norm_KxRxB[3::4], outs[32].state_norm_KxRxB, rtol=1e-4)


def test_one_compiled_step_for_every_length(runners):
    runner, before = runners[8], _chunk_step._cache_size()
    runner.run(*rows(3, 8))  # a new batch size: compiled once, then reused
    for length in (8, 64, 256):
        inputs, targets = rows(3, length, seed=length)
        assert runner.run(inputs, targets).nll_BxL.shape == (3, length)
    assert _chunk_step._cache_size() == before + 1  # only [batch, chunk] shapes are ever compiled


def test_length_not_multiple_of_chunk(runners):
    with pytest.raises(ValueError, match=r"eval length 100 is not a multiple of the chunk size 32: .*128 \(4 x 32\)"
                                         r".*96 \(3 x 32\)"):
        check_chunking(100, 32)
    with pytest.raises(ValueError, match="not a multiple of the chunk size 32"):
        runners[32].run(*rows(2, 40))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        check_chunking(64, 0)


def test_bucket_means_against_naive():
    rng = np.random.default_rng(0)
    n, length, t = 3, 100, 8
    nll = rng.exponential(size=(n, length)).astype(np.float32)
    mask = rng.uniform(size=(n, length)) > 0.2
    mask[:, 70:] = False  # padding at the end, as for the last held-out row
    edges = bucket_edges(t, length)
    assert edges == [0, 8, 16, 32, 64, 100]
    assert bucket_edges(t, 64) == [0, 8, 16, 32, 64]
    assert bucket_edges(t, length, [1, 8]) == [0, 8, 64, 100]
    assert bucket_edges(t, 64, [1, 8, 64]) == [0, 8, 64]
    for got, lo, hi in zip(bucket_means(nll, mask, edges), edges[:-1], edges[1:]):
        values = [nll[i, p] for i in range(n) for p in range(lo, hi) if mask[i, p]]
        assert (got["start"], got["end"], got["tokens"]) == (lo, hi, len(values))
        assert got["loss"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    empty = bucket_means(nll, np.zeros_like(mask), edges)
    assert all(b["loss"] is None and b["tokens"] == 0 for b in empty)
    with pytest.raises(ValueError, match="increasing"):
        bucket_edges(t, length, [8, 1])


def test_log_bins_cover_every_position():
    for length in (1, 2, 37, 4096):
        edges = log_bins(length)
        assert edges[0] == 0 and edges[-1] == length and edges == sorted(set(edges))


def test_state_norms_of_a_mamba_hybrid():
    """MRA: Mamba ([H, P, N] state) and RG-LRU layers are both diagnosed, in depth order, without any
    code for the kinds in the evaluation."""
    from lmtrain.configlib import updated
    from lmtrain.models import LanguageModel, ModelConfig

    cfg = updated(ModelConfig(), {"vocab_size": 259, "width": 32, "num_layers": 4, "pattern": "MRA",
                                  "mamba.head_dim": 8, "mamba.state_size": 8, "mamba.chunk": 8,
                                  "attention.window": 8, "rglru.num_heads": 2, "attention.num_heads": 2})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    runner = ChunkRunner(model, 16)
    assert runner.layers == ["layer 0 (M)", "layer 1 (R)", "layer 3 (M)"]
    inputs, targets = rows(2, 48)
    out = runner.run(inputs, targets)
    _, state = nnx.jit(lambda m, x: m(x))(model, inputs)
    hs = [state.groups[0].ssm_BxHxPxN[0], state.groups[1].h_BxL[0], state.tail[0].ssm_BxHxPxN]
    want = np.stack([np.linalg.norm(np.asarray(h).reshape(2, -1), axis=-1) for h in hs])
    np.testing.assert_allclose(out.state_norm_KxRxB[-1], want, rtol=1e-4)
