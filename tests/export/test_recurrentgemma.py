"""recurrentgemma export: same weights give Griffin's logits; params round-trip; clear errors."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("recurrentgemma")
from recurrentgemma import common  # noqa: E402
from recurrentgemma.jax import griffin  # noqa: E402

from lmtrain.configlib import updated  # noqa: E402
from lmtrain.export.recurrentgemma import (  # noqa: E402
    from_recurrentgemma,
    griffin_config_to_model_config,
    inputs_from_segment_pos,
    load_recurrentgemma,
    model_config_to_griffin_config,
    recurrentgemma_embed_scale,
    to_recurrentgemma,
)
from lmtrain.models import LanguageModel, ModelConfig  # noqa: E402

R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
T, WINDOW, VOCAB = 40, 8, 64
# Griffin: 5 layers of RRA (one full repeat + a 2-layer tail); Hawk: 3 layers of R.
BLOCKS = {"griffin": (R, R, A, R, R), "hawk": (R, R, R)}


def griffin_config(name: str, width: int = 64) -> common.GriffinConfig:
    return common.GriffinConfig(vocab_size=VOCAB, width=width, mlp_expanded_width=3 * width, num_heads=4,
                                block_types=BLOCKS[name], embeddings_scale_by_sqrt_dim=True,
                                attention_window_size=WINDOW, logits_soft_cap=30.0)


def reference_model(name: str, width: int = 64) -> griffin.Griffin:
    """Griffin with its associative scan: the same recurrence as its CPU default (a linear scan with
    unroll=128), which takes ~3x longer to compile at T=40."""
    cfg = griffin_config(name, width)._replace(scan_type=common.ScanType.ASSOCIATIVE_NATIVE)
    return griffin.Griffin(cfg, gradient_checkpointing=False)


def segment_pos() -> jax.Array:
    """Row 0: one document of T tokens; row 1: three packed documents (15 + 12 + 13)."""
    packed = np.concatenate([np.arange(15), np.arange(12), np.arange(13)])
    return jnp.asarray(np.stack([np.arange(T), packed]), jnp.int32)


def perturbed(params: dict, seed: int = 0) -> dict:
    """Griffin's own init, with the zero/one-like leaves (biases, norm scales) and a_param moved and
    the tiny conv kernel enlarged, so a mis-mapped leaf cannot hide behind an initial value."""
    rng = np.random.default_rng(seed)

    def move(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        scale = 0.3 if "conv_1d" in name else 0.2 if name.rsplit("/", 1)[-1] in ("b", "bias", "scale", "a_param") else 0
        return jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(move, params)


@functools.cache
def griffin_params(width: int) -> dict:
    """Perturbed parameters of the 5-layer Griffin, from Griffin's own initializer."""
    model = reference_model("griffin", width)
    init = jax.jit(model.init)  # one token suffices (parameters do not depend on T); rbg keys compile faster
    tokens, pos = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    return perturbed(init(jax.random.key(0, impl="unsafe_rbg"), tokens, pos)["params"])


@functools.cache
def reference(name: str, width: int = 64) -> tuple[dict, jax.Array, jax.Array]:
    """(perturbed Griffin params, tokens, Griffin's f32 logits) for config `name`.

    Hawk's three R layers are layers 0, 1, 3 of the Griffin parameters (one initialisation for both)."""
    params = griffin_params(width)
    if name == "hawk":
        params = {**{k: params[k] for k in ("embedder", "final_norm")},
                  **{f"blocks.{i}": params[f"blocks.{j}"] for i, j in enumerate((0, 1, 3))}}
    model = reference_model(name, width)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
    logits, _ = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, return_cache=False))(
        params, tokens, segment_pos())
    return params, tokens, logits


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens, kwargs):
    return nnx.merge(graphdef, state)(tokens, **kwargs)[0]


def load(cfg: ModelConfig, params: dict) -> LanguageModel:
    """Our model holding Griffin's `params` (built abstract: no random init to overwrite)."""
    return load_recurrentgemma(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))), params)


def our_logits(model: LanguageModel, tokens: jax.Array) -> jax.Array:
    return forward(*nnx.split(model), tokens, inputs_from_segment_pos(model, segment_pos()))


def assert_close(ours: jax.Array, ref: jax.Array) -> None:
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", ["griffin", "hawk"])
def test_logits_equal_griffin(name, scan_layers):
    """T = 5 windows, and a packed row: sliding window, document resets and RoPE positions all match."""
    params, tokens, ref = reference(name)
    cfg = griffin_config_to_model_config(griffin_config(name), scan_layers=scan_layers)
    model = load(cfg, params)
    assert_close(our_logits(model, tokens), ref)


def test_plain_call_with_segment_ids_equals_griffin():
    """Without the helper: state=None starts a document at token 0 and positions restart at each
    segment id change, which is what Griffin does where segment_pos == 0."""
    params, tokens, ref = reference("griffin")
    model = load(griffin_config_to_model_config(griffin_config("griffin")), params)
    segment_ids = jnp.cumsum(segment_pos() == 0, axis=1)
    assert_close(forward(*nnx.split(model), tokens, {"segment_ids": segment_ids}), ref)


def test_segment_pos_means_segment_ids_from_zeros():
    """Griffin starts a document where segment_pos == 0, token 0 included; our equivalent call."""
    cfg = griffin_config_to_model_config(griffin_config("hawk"))
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    kw = inputs_from_segment_pos(model, segment_pos())
    np.testing.assert_array_equal(kw["segment_ids"][1], np.repeat([1, 2, 3], [15, 12, 13]))
    np.testing.assert_array_equal(kw["positions"], segment_pos())
    assert (kw["state"].segment_B != kw["segment_ids"][:, 0]).all()  # token 0 resets, like Griffin's


def test_embed_scale_rounded_like_recurrentgemma():
    assert recurrentgemma_embed_scale(256) == 16.0
    assert recurrentgemma_embed_scale(2560) == 50.5  # sqrt(2560) = 50.596 in bfloat16
    width = 48  # sqrt(48) = 6.928 -> 6.9375 in bfloat16
    params, tokens, ref = reference("hawk", width)
    cfg = griffin_config_to_model_config(griffin_config("hawk", width))
    model = load(cfg, params)
    assert model.embedder.scale == 6.9375
    assert_close(our_logits(model, tokens), ref)
    model.embedder.scale = 48**0.5  # what a model built from the config uses
    with pytest.warns(UserWarning, match="bfloat16"):
        to_recurrentgemma(model)


@pytest.mark.parametrize("name", ["griffin", "hawk"])
def test_round_trip_is_exact(name):
    params, _, _ = reference(name)
    cfg = griffin_config_to_model_config(griffin_config(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = to_recurrentgemma(load(cfg, params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert model_config_to_griffin_config(cfg) == griffin_config(name)._replace(lru_width=64)


def test_config_mapping():
    cfg = griffin_config_to_model_config(griffin_config("griffin"))
    att = cfg.attention
    assert (cfg.pattern, cfg.num_layers, att.num_kv_heads, att.window, cfg.mlp_expansion) == ("RRA", 5, 1, 8, 3)
    assert (att.rope_fraction, att.rope_base, cfg.logit_softcap, cfg.embed_scale) == (0.5, 10_000.0, 30.0, True)
    gemma_2b = common.GriffinConfig.from_preset(common.Preset.RECURRENT_GEMMA_2B_V1)
    big = griffin_config_to_model_config(gemma_2b)
    assert (big.pattern, big.num_layers, big.width, big.attention.window) == ("RRA", 26, 2560, 2048)


def test_errors_name_the_parameter():
    params, _, _ = reference("griffin")
    cfg = griffin_config_to_model_config(griffin_config("griffin"))
    with pytest.raises(ValueError, match=r"blocks\.1 is R, but layer 1 of pattern 'RAR' .layers 'RARRA'. is A"):
        from_recurrentgemma(params, updated(cfg, {"pattern": "RAR"}))
    with pytest.raises(ValueError, match="have 5 layers.*num_layers=6"):
        from_recurrentgemma(params, updated(cfg, {"num_layers": 6}))
    with pytest.raises(ValueError, match=r"blocks\.0\.recurrent_block\.rg_lru\.input_gate\.w has shape \(4, 16, 16\)"):
        from_recurrentgemma(params, updated(cfg, {"rglru.num_heads": 2, "attention.num_heads": 2}))
    broken = {**params, "blocks.3": {**params["blocks.3"], "extra": {"w": jnp.zeros(3)}}}
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.3\.extra\.w'\]"):
        from_recurrentgemma(broken, cfg)
    with pytest.raises(ValueError, match="num_kv_heads=2.*rope_fraction=1.0"):
        from_recurrentgemma(params, updated(cfg, {"attention.num_kv_heads": 2, "attention.rope_fraction": 1.0}))
    with pytest.raises(ValueError, match="letter.*'G'"):
        griffin_config_to_model_config(griffin_config("griffin"), pattern="RRG")
