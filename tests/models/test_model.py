"""LanguageModel: the state contract (docs/models.md) for every layer kind, packing, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.models.state import batch_axis, is_axes
from lmtrain.sharding import LOGICAL_AXES

PATTERNS = ["R", "A", "G", "RAG", "M", "MA", "MRA"]


def tiny(pattern: str, **kw) -> LanguageModel:
    base = {"vocab_size": 50, "width": 32, "num_layers": 4, "pattern": pattern, "mlp_expansion": 2,
            "rglru.num_heads": 4, "rglru.width": 24, "attention.num_heads": 4, "attention.num_kv_heads": 2,
            "attention.window": 6, "attention.max_len": 64, "mamba.head_dim": 8, "mamba.state_size": 8,
            "mamba.chunk": 8}
    return LanguageModel(updated(ModelConfig(), {**base, **kw}), rngs=nnx.Rngs(0))


def tokens(b: int = 2, t: int = 24, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 50)


@nnx.jit
def call(model, tok, segment_ids=None, state=None):
    return model(tok, segment_ids=segment_ids, state=state)


def run_pieces(model, tok, cuts, segment_ids=None):
    state, outs = model.init_state(tok.shape[0]), []
    bounds = [0, *cuts, tok.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = None if segment_ids is None else segment_ids[:, a:b]
        out, state = call(model, tok[:, a:b], seg, state)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), state


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pieces_and_decoding_equal_full_sequence(pattern):
    model, tok = tiny(pattern), tokens()
    full, full_state = call(model, tok)
    pieces, piece_state = run_pieces(model, tok, [8, 16])  # window 6: pieces longer and shorter
    np.testing.assert_allclose(pieces, full, atol=1e-4, rtol=1e-4)
    decoded, _ = run_pieces(model, tok, list(range(1, tok.shape[1])))
    np.testing.assert_allclose(decoded, full, atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(piece_state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_packed_documents_equal_separate_runs(pattern):
    model = tiny(pattern)
    lengths = [8, 8, 8]
    docs = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    seg = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    packed, _ = call(model, jnp.concatenate(docs, axis=1), seg)
    start = 0
    for doc in docs:
        alone, _ = call(model, doc)
        np.testing.assert_allclose(packed[:, start:start + doc.shape[1]], alone, atol=1e-4, rtol=1e-4)
        start += doc.shape[1]
    # A document boundary that falls exactly on a piece boundary also resets.
    pieces, _ = run_pieces(model, jnp.concatenate(docs, axis=1), [8, 16], segment_ids=seg)
    np.testing.assert_allclose(pieces, packed, atol=1e-4, rtol=1e-4)


def test_scan_layers_and_remat_do_not_change_outputs():
    tok = tokens()
    ref, _ = call(tiny("RRA", num_layers=5, scan_layers=True), tok)
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        out, _ = call(tiny("RRA", num_layers=5, **kw), tok)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_scanned_layers_and_state():
    model, tok = tiny("RRA", num_layers=5), tokens()
    state = model.init_state(2)
    state = state._replace(segment_B=state.segment_B * 0, groups=tuple(
        s._replace(h_BxL=s.h_BxL + 0.5) if hasattr(s, "h_BxL") else s for s in state.groups))

    def loss(model, h0):
        st = state._replace(groups=(state.groups[0]._replace(h_BxL=h0), *state.groups[1:]))
        logits, _ = model(tok, state=st)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    g_model, g_h0 = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(model, state.groups[0].h_BxL)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g_model))
    assert float(jnp.abs(g_h0).sum()) > 0  # the initial recurrent state matters
    # every stacked layer of every group receives gradient
    for group in nnx.to_pure_dict(g_model)["groups"].values():
        k = group["mlp"]["down"]["kernel"]
        assert bool(jnp.all(jnp.abs(k).sum(axis=(1, 2)) > 0))


def test_fabricated_history_is_used_only_when_declared():
    model, tok = tiny("R"), tokens()
    zero, _ = call(model, tok, None, model.init_state(2))
    noisy_state = model.init_state(2)
    noisy_state = noisy_state._replace(groups=tuple(s._replace(h_BxL=s.h_BxL + 1.0) for s in noisy_state.groups))
    fresh, _ = call(model, tok, None, noisy_state)  # segment_B = -1: the first token starts a document
    np.testing.assert_allclose(fresh, zero, atol=1e-5)
    continued, _ = call(model, tok, None, noisy_state._replace(segment_B=noisy_state.segment_B * 0))
    assert float(jnp.abs(continued[:, 0] - zero[:, 0]).max()) > 1e-3


def test_bf16_compute_keeps_state_float32_and_tracks_f32():
    tok = tokens()
    ref, _ = call(tiny("RRA"), tok)
    out, state = call(tiny("RRA", dtype="bfloat16"), tok)
    assert out.dtype == jnp.float32
    assert state.groups[0].h_BxL.dtype == jnp.float32
    assert state.groups[0].conv_BxCxL.dtype == jnp.bfloat16
    p_ref, p = jax.nn.softmax(ref), jax.nn.softmax(out)
    assert float(jnp.abs(p - p_ref).max()) < 0.05
    pieces, _ = run_pieces(tiny("RRA", dtype="bfloat16"), tok, [9, 20])
    np.testing.assert_allclose(pieces, out, atol=0.15)  # same math in pieces, bf16 rounding only


def test_state_axes_name_every_leaf():
    model = tiny("RAGM", num_layers=6)  # one full repeat (stacked) and a tail
    state, axes = model.init_state(3), model.state_axes()
    leaves, axis_leaves = jax.tree.leaves(state), jax.tree.leaves(axes, is_leaf=is_axes)
    assert len(leaves) == len(axis_leaves) and jax.tree.structure(state) == jax.tree.structure(
        jax.tree.map(lambda _: 0, axes, is_leaf=is_axes))
    for x, names in zip(leaves, axis_leaves):
        assert len(names) == x.ndim and x.shape[batch_axis(names)] == 3, (names, x.shape)
        assert all(n in LOGICAL_AXES for n in names)


def test_bf16_compute_keeps_mamba_state_float32():
    tok = tokens()
    ref, _ = call(tiny("MA"), tok)
    out, state = call(tiny("MA", dtype="bfloat16"), tok)
    assert state.groups[0].ssm_BxHxPxN.dtype == jnp.float32 and state.groups[0].conv_x_BxCxI.dtype == jnp.bfloat16
    assert float(jnp.abs(jax.nn.softmax(out) - jax.nn.softmax(ref)).max()) < 0.05


def test_param_logical_axes_and_layer_stacking():
    model = tiny("RRA", num_layers=7)  # 2 repeats + 1 tail layer
    assert model.repeats == 2 and len(model.tail) == 1
    params = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Param))[0]:
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var[...].ndim, (path, axes)
        if jax.tree_util.keystr(path).startswith("['groups']"):
            assert axes[0] == "layers" and var[...].shape[0] == 2
    assert model.groups[0].mixer.rg_lru.a_param[...].dtype == jnp.float32
    assert tiny("R", param_dtype="bfloat16").groups[0].mixer.rg_lru.a_param[...].dtype == jnp.float32


def test_bad_inputs_give_clear_errors():
    model, tok = tiny("RRA"), tokens()
    with pytest.raises(TypeError, match="integer"):
        model(tok.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        model(tok + 49)
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(tok, segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="batch 3"):
        model(tokens(3), state=model.init_state(2))
    with pytest.raises(ValueError, match="layer structure"):
        model(tok, state=tiny("R").init_state(2))
    bad = model.init_state(2)
    bad = bad._replace(groups=(bad.groups[0]._replace(h_BxL=bad.groups[0].h_BxL.astype(jnp.bfloat16)),
                               *bad.groups[1:]))
    with pytest.raises(ValueError, match="float32"):
        model(tok, state=bad)
    with pytest.raises(ValueError, match="max_len"):
        call(tiny("G", **{"attention.max_len": 16}), tokens(t=20))
    # under jit the range can't be checked eagerly: a bad id surfaces as NaN, never silently
    logits = nnx.jit(lambda m, t: m(t)[0])(model, tok.at[0, 3].set(60))
    assert bool(jnp.isnan(logits[0, 3]).all()) and bool(jnp.isfinite(logits[1]).all())
