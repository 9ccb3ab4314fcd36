"""Weights to and from recurrentgemma's JAX Griffin (`recurrentgemma.jax.griffin.Griffin`, v1.0.1).

    cfg = griffin_config_to_model_config(griffin_cfg)        # or ModelConfig(...) by hand
    model = load_recurrentgemma(LanguageModel(cfg, rngs=nnx.Rngs(0)), params)
    logits_BxTxV, _ = model(tokens_BxT, **inputs_from_segment_pos(model, segment_pos_BxT))
    params = to_recurrentgemma(model)                         # the inverse: Griffin's "params" tree
    griffin_cfg = model_config_to_griffin_config(cfg)         # ... and its config

`params` is the tree `Griffin(griffin_cfg).init(...)["params"]` (a `{"params": ...}` variables dict is
accepted too). Griffin layer i ("blocks.i") is our `groups[i % P]` at repeat `i // P` (P =
len(pattern)) while i < repeats * P, else `tail[i - repeats * P]`. Per layer (`_LEAVES`):
temporal_pre_norm -> mixer_norm, channel_pre_norm -> mlp_norm, recurrent_block.{linear_x, linear_y,
linear_out, conv_1d (w, b), rg_lru} -> mixer.{linear_x, linear_y, linear_out, conv (kernel, bias),
rg_lru}, attention_block.proj_{q,k,v,final} -> mixer.{q,k,v,out}, mlp_block.ffw_up w[0]/w[1] (b
[2,1,1,F]) -> mlp.gate/mlp.up, ffw_down -> mlp.down. All layouts are identical; nothing is transposed.

Two behaviours differ and are bridged here (tests: tests/export/test_recurrentgemma.py):
- Embedding scale: recurrentgemma multiplies embeddings by sqrt(width) *rounded to bfloat16*
  (exact for perfect-square widths: 64, 256, 1024, 4096; 2560 gives 50.5 instead of 50.596).
  `load_recurrentgemma` sets `model.embedder.scale` to that rounded value (`match_embed_scale`);
  a model built afresh from the config uses the exact sqrt again.
- Document starts: recurrentgemma resets the RG-LRU (a = 0, input multiplier 1) wherever
  segment_pos == 0, *including the first token*, and uses segment_pos as the RoPE position.
  `inputs_from_segment_pos` turns segment_pos into our segment_ids (cumsum(segment_pos == 0)),
  positions (= segment_pos) and a fresh state whose last segment id makes token 0 a document start
  exactly when its segment_pos is 0. Since commit 6f27cc5 a plain call with state=None and those
  segment_ids matches too (tested); at c001aca state=None made token 0 continue a zero state
  (multiplier sqrt(1 - a^2) instead of 1, logits off by up to 5% of their range).

`lmtrain export WORKDIR --format recurrentgemma --out DIR` writes (`write_recurrentgemma`):

    DIR/params/        Griffin's "params" tree as an orbax PyTree checkpoint, the format of the released
                       RecurrentGemma checkpoints (`load_griffin_params`; recurrentgemma 1.0.1's own
                       `load_parameters` fails on orbax-checkpoint 0.12's metadata, see there)
    DIR/config.json    {"format": "recurrentgemma-griffin", "griffin_config": GriffinConfig fields (block_types
                       by name), "tokenizer": ..., "source": ...}
    DIR/tokenizer.model  the sentencepiece model (sentencepiece runs only)

    griffin_cfg, params = load_recurrentgemma_export(DIR)    # GriffinConfig, params
    logits, _ = recurrentgemma.jax.Griffin(griffin_cfg).apply({"params": params}, tokens, segment_pos)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.models.blocks import ResidualBlock
from lmtrain.models.config import ModelConfig
from lmtrain.models.mixers.rglru import lru_width
from lmtrain.models.model import LanguageModel
from lmtrain.models.state import layer_slots

# Griffin's block-type names <-> our pattern letters, and the sub-module holding the mixer.
_LETTER = {"RECURRENT": "R", "ATTENTION": "A"}
_MIXER_MODULE = {"R": "recurrent_block", "A": "attention_block"}

# Per-layer leaves: our dotted path -> Griffin dotted path (same shape and layout). ffw_up is special.
_COMMON_LEAVES = {
    "mixer_norm.scale": "temporal_pre_norm.scale",
    "mlp_norm.scale": "channel_pre_norm.scale",
    "mlp.down.kernel": "mlp_block.ffw_down.kernel",
    "mlp.down.bias": "mlp_block.ffw_down.bias",
}
_LEAVES = {
    "R": {
        **{f"mixer.{lin}.{p}": f"recurrent_block.{lin}.{p}"
           for lin in ("linear_x", "linear_y", "linear_out") for p in ("kernel", "bias")},
        "mixer.conv.kernel": "recurrent_block.conv_1d.w",
        "mixer.conv.bias": "recurrent_block.conv_1d.b",
        "mixer.rg_lru.a_param": "recurrent_block.rg_lru.a_param",
        **{f"mixer.rg_lru.{g}.{ours}": f"recurrent_block.rg_lru.{g}.{theirs}"
           for g in ("input_gate", "a_gate") for ours, theirs in (("kernel", "w"), ("bias", "b"))},
        **_COMMON_LEAVES,
    },
    "A": {
        "mixer.q.kernel": "attention_block.proj_q.kernel",
        "mixer.k.kernel": "attention_block.proj_k.kernel",
        "mixer.v.kernel": "attention_block.proj_v.kernel",
        "mixer.out.kernel": "attention_block.proj_final.kernel",
        "mixer.out.bias": "attention_block.proj_final.bias",
        **_COMMON_LEAVES,
    },
}
_FFW_UP_W, _FFW_UP_B = "mlp_block.ffw_up.w", "mlp_block.ffw_up.b"

# Architecture constants hard-coded in recurrentgemma 1.0.1, as (dotted) ModelConfig values.
_FIXED = {"attention.num_kv_heads": 1, "attention.rope_fraction": 0.5, "attention.rope_base": 10_000.0,
          "attention.head_dim": 0, "rglru.conv_width": 4, "rglru.c": 8.0, "rglru.min_rad": 0.9,
          "rglru.max_rad": 0.999, "rglru.sqrt_max_grad": 1000.0, "norm_eps": 1e-6}


def _get(cfg: ModelConfig, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _num_heads(cfg: ModelConfig) -> int:
    """Griffin's one `num_heads`: the RG-LRU gate blocks and the attention heads."""
    return cfg.rglru.num_heads if "R" in cfg.pattern else cfg.attention.num_heads


# ------------------------------------------------------------------------------------------ configs
def griffin_config_to_model_config(griffin_cfg: Any, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` computing what `Griffin(griffin_cfg)` computes.

    `overrides` set execution fields (dtype, scan_backend, scan_layers, remat, ...); overriding an
    architecture field so that the model no longer matches Griffin raises ValueError.
    """
    letters = "".join(_LETTER[t.name] for t in griffin_cfg.block_types)
    expansion, rest = divmod(griffin_cfg.mlp_expanded_width, griffin_cfg.width)
    if rest:
        raise ValueError(f"Griffin mlp_expanded_width {griffin_cfg.mlp_expanded_width} is not a multiple of "
                         f"width {griffin_cfg.width}; ModelConfig.mlp_expansion must be an integer")
    kw: dict[str, Any] = {
        "vocab_size": griffin_cfg.vocab_size, "width": griffin_cfg.width, "num_layers": len(letters),
        "pattern": _shortest_period(letters), "attention.num_heads": griffin_cfg.num_heads,
        "rglru.num_heads": griffin_cfg.num_heads, "attention.window": griffin_cfg.attention_window_size,
        "rglru.width": griffin_cfg.lru_width or 0, "mlp_expansion": expansion,
        "logit_softcap": float(griffin_cfg.logits_soft_cap),
        "embed_scale": bool(griffin_cfg.embeddings_scale_by_sqrt_dim), **_FIXED}
    kw.update(overrides)
    cfg = updated(ModelConfig(), kw)
    check_compatible(cfg)
    return cfg


def model_config_to_griffin_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The `recurrentgemma.common.GriffinConfig` of `cfg` (overrides: e.g. scan_type)."""
    from recurrentgemma import common

    check_compatible(cfg)
    kinds = {"R": common.TemporalBlockType.RECURRENT, "A": common.TemporalBlockType.ATTENTION}
    kw = dict(vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_width,
              num_heads=_num_heads(cfg), block_types=tuple(kinds[k] for k in cfg.layer_kinds),
              embeddings_scale_by_sqrt_dim=cfg.embed_scale, attention_window_size=cfg.attention.window,
              logits_soft_cap=cfg.logit_softcap, lru_width=lru_width(cfg))
    kw.update(overrides)
    return common.GriffinConfig(**kw)


def check_compatible(cfg: ModelConfig) -> None:
    """ValueError naming every field of `cfg` that recurrentgemma's Griffin cannot express."""
    other = sorted(set(cfg.pattern) - set(_MIXER_MODULE))
    problems = [f"pattern {cfg.pattern!r} has letter(s) {other}; Griffin only has R (recurrent) and "
                "A (local attention)"] if other else []
    problems += [f"{name}={_get(cfg, name)!r} (Griffin: {want!r})" for name, want in _FIXED.items()
                 if _get(cfg, name) != want]
    if "R" in cfg.pattern and "A" in cfg.pattern and cfg.rglru.num_heads != cfg.attention.num_heads:
        problems.append(f"rglru.num_heads={cfg.rglru.num_heads} != attention.num_heads={cfg.attention.num_heads} "
                        "(Griffin has one num_heads for both)")
    if lru_width(cfg) % 2:
        problems.append(f"rglru.width={lru_width(cfg)} (Griffin asserts an even RG-LRU width)")
    if problems:
        raise ValueError("ModelConfig does not match recurrentgemma's Griffin: " + "; ".join(problems))


def recurrentgemma_embed_scale(width: int) -> float:
    """sqrt(width) rounded to bfloat16, as `recurrentgemma.jax.modules.Embedder.encode` applies it."""
    return float(jnp.asarray(np.sqrt(np.float32(width)), jnp.float32).astype(jnp.bfloat16))


def inputs_from_segment_pos(model: LanguageModel, segment_pos_BxT: jax.Array) -> dict[str, Any]:
    """Keyword arguments making `model(tokens, **kw)` equal `Griffin(tokens, segment_pos)` (no cache).

    Griffin starts a document wherever segment_pos == 0 (also at token 0) and uses segment_pos as the
    RoPE position; the fresh state with last segment id 0 makes token 0 a document start too.
    """
    segment_pos_BxT = jnp.asarray(segment_pos_BxT, jnp.int32)
    state = model.init_state(segment_pos_BxT.shape[0])
    return dict(segment_ids=jnp.cumsum(segment_pos_BxT == 0, axis=1, dtype=jnp.int32),
                positions=segment_pos_BxT,
                state=state._replace(segment_B=jnp.zeros_like(state.segment_B)))


# ------------------------------------------------------------------------------------------ weights
def from_recurrentgemma(params: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """Griffin's params -> our parameters as a pure dict (the shape of
    `nnx.to_pure_dict(nnx.state(model, nnx.Param))`), cast to `cfg.param_dtype` (a_param: float32).

    ValueError, naming the Griffin parameter, on a missing/unexpected leaf, a wrong shape, a layer
    count or a layer kind that does not match `cfg`.
    """
    check_compatible(cfg)
    params = params["params"] if "params" in params and "embedder" not in params else params
    blocks = sorted((k for k in params if k.startswith("blocks.")), key=lambda k: int(k.split(".")[1]))
    if blocks != [f"blocks.{i}" for i in range(len(blocks))]:
        raise ValueError(f"Griffin params have non-contiguous layers {blocks}")
    if len(blocks) != cfg.num_layers:
        raise ValueError(f"Griffin params have {len(blocks)} layers (blocks.0 .. blocks.{len(blocks) - 1}), "
                         f"the ModelConfig has num_layers={cfg.num_layers}")
    unknown = set(params) - {*blocks, "embedder", "final_norm"}
    if unknown:
        raise ValueError(f"unexpected top-level Griffin parameter(s) {sorted(unknown)}")
    shapes = _layer_shapes(cfg)
    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        name = f"blocks.{i}"
        layers.append(_layer_from_griffin(_flatten(params[name]), kind, shapes[kind], name, cfg))

    dtype = jnp.dtype(cfg.param_dtype)
    groups: dict[int, list] = {}
    for slot in layer_slots(cfg.pattern, cfg.num_layers):
        if slot.part == "groups":
            groups.setdefault(slot.index, []).append(layers[slot.depth])  # slots come in depth order
    out = {
        "embedder": {"embedding": _take(_flatten(params.get("embedder", {})), "input_embedding",
                                        (cfg.vocab_size, cfg.width), dtype, "embedder")},
        "final_norm": {"scale": _take(_flatten(params.get("final_norm", {})), "scale", (cfg.width,), dtype,
                                      "final_norm")},
        "groups": {i: _unflatten(jax.tree.map(lambda *a: jnp.stack(a), *stack)) for i, stack in groups.items()},
        "tail": {s.index: _unflatten(layers[s.depth]) for s in layer_slots(cfg.pattern, cfg.num_layers)
                 if s.part == "tail"},
    }
    return {k: v for k, v in out.items() if v}  # like nnx.to_pure_dict: no empty groups/tail


def load_recurrentgemma(model: LanguageModel, params: Mapping[str, Any], *,
                        match_embed_scale: bool = True) -> LanguageModel:
    """Loads Griffin's params into `model` in place (keeping each parameter's sharding); returns it.

    `model` may be abstract (`nnx.eval_shape(lambda: LanguageModel(cfg, rngs=...))`), which skips the
    random initialisation of parameters that are overwritten anyway.

    With `match_embed_scale` (and `embed_scale` on), `model.embedder.scale` becomes recurrentgemma's
    bfloat16-rounded sqrt(width), so logits match Griffin's for every width.
    """
    pure = from_recurrentgemma(params, model.cfg)
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(_place_like, pure, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    if match_embed_scale and model.cfg.embed_scale:
        model.embedder.scale = recurrentgemma_embed_scale(model.cfg.width)
    return model


def to_recurrentgemma(model: LanguageModel) -> dict:
    """Our parameters -> Griffin's "params" tree (`Griffin(model_config_to_griffin_config(cfg))`).

    Warns when the model's embedding scale is not recurrentgemma's bfloat16-rounded sqrt(width)
    (logits then differ slightly in Griffin).
    """
    cfg = model.cfg
    check_compatible(cfg)
    if cfg.embed_scale and model.embedder.scale != recurrentgemma_embed_scale(cfg.width):
        warnings.warn(f"recurrentgemma scales embeddings by {recurrentgemma_embed_scale(cfg.width)} "
                      f"(sqrt({cfg.width}) in bfloat16), this model by {model.embedder.scale}; Griffin's "
                      "logits will differ slightly. Perfect-square widths (64, 256, 1024, 4096) avoid this.",
                      stacklevel=2)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out: dict[str, Any] = {"embedder": {"input_embedding": pure["embedder"]["embedding"]},
                           "final_norm": {"scale": pure["final_norm"]["scale"]}}
    for slot in layer_slots(cfg.pattern, cfg.num_layers):
        layer = pure[slot.part][slot.index]
        ours = _flatten(layer if slot.repeat is None else jax.tree.map(lambda a, r=slot.repeat: a[r], layer))
        theirs = {g: ours[o] for o, g in _LEAVES[slot.kind].items()}
        theirs[_FFW_UP_W] = jnp.stack([ours["mlp.gate.kernel"], ours["mlp.up.kernel"]])
        theirs[_FFW_UP_B] = jnp.stack([ours["mlp.gate.bias"], ours["mlp.up.bias"]])[:, None, None, :]
        out[f"blocks.{slot.depth}"] = _unflatten(theirs)
    return out


# ------------------------------------------------------------------------------------------ helpers
def _layer_from_griffin(flat: dict, kind: str, shapes: dict, name: str, cfg: ModelConfig) -> dict:
    """One Griffin layer's flat leaves -> our flat leaves, checking kind, names and shapes."""
    present = {k.split(".")[0] for k in flat} & set(_MIXER_MODULE.values())
    if present != {_MIXER_MODULE[kind]}:
        letters = {v: k for k, v in _MIXER_MODULE.items()}
        found = "/".join(sorted(letters[m] for m in present)) or "no mixer"
        raise ValueError(f"Griffin {name} is {found}, but layer {name.split('.')[1]} of pattern "
                         f"{cfg.pattern!r} (layers {cfg.layer_kinds!r}) is {kind}")
    expected = set(_LEAVES[kind].values()) | {_FFW_UP_W, _FFW_UP_B}
    if set(flat) != expected:
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(f"Griffin {name}: missing parameter(s) {[f'{name}.{k}' for k in missing]}, "
                         f"unexpected {[f'{name}.{k}' for k in extra]}")
    ours = {o: _take(flat, g, shapes[o].shape, shapes[o].dtype, name) for o, g in _LEAVES[kind].items()}
    f = shapes["mlp.gate.kernel"].shape[1]
    w = _take(flat, _FFW_UP_W, (2, cfg.width, f), shapes["mlp.gate.kernel"].dtype, name)
    b = _take(flat, _FFW_UP_B, (2, 1, 1, f), shapes["mlp.gate.bias"].dtype, name)
    ours.update({"mlp.gate.kernel": w[0], "mlp.up.kernel": w[1], "mlp.gate.bias": b[0, 0, 0],
                 "mlp.up.bias": b[1, 0, 0]})
    return ours


def _place_like(new: jax.Array, old: Any) -> jax.Array:
    """`new` on the sharding of `old` (a jax.Array, or an abstract ShapeDtypeStruct with or without one)."""
    sharding = getattr(old, "sharding", None)
    return new if sharding is None else jax.device_put(new, sharding)


def _take(flat: Mapping[str, Any], key: str, shape: tuple, dtype: Any, where: str) -> jax.Array:
    if key not in flat:
        raise ValueError(f"Griffin parameter {where}.{key} is missing")
    value = flat[key]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"Griffin parameter {where}.{key} has shape {tuple(value.shape)}, the ModelConfig "
                         f"expects {tuple(shape)} (check width/rglru.width/num_heads/mlp_expansion/vocab_size)")
    return jnp.asarray(value, dtype)


def _layer_shapes(cfg: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Per layer kind: our flat leaf name -> abstract array of one (unstacked) layer."""
    shapes = {}
    for kind in sorted(set(cfg.pattern)):
        block = nnx.eval_shape(lambda kind=kind: ResidualBlock(cfg, kind, rngs=nnx.Rngs(0)))
        shapes[kind] = _flatten(nnx.to_pure_dict(nnx.state(block, nnx.Param)))
    return shapes


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = v
    return out


def _shortest_period(letters: str) -> str:
    """The shortest string whose cycle gives `letters` ('RRARRARR' -> 'RRA')."""
    return next(letters[:p] for p in range(1, len(letters) + 1)
                if all(c == letters[i % p] for i, c in enumerate(letters)))


# ------------------------------------------------------------------------------------------ export files
EXPORT_FORMAT = "recurrentgemma-griffin"
PARAMS_DIR = "params"
_CONFIG_FILE = "config.json"


def griffin_config_to_json(griffin_cfg: Any) -> dict[str, Any]:
    """A GriffinConfig as JSON data (block types by name; scan_type is an execution choice, left out)."""
    data = {k: v for k, v in griffin_cfg._asdict().items() if k != "scan_type"}
    data["block_types"] = [t.name for t in griffin_cfg.block_types]
    return data


def griffin_config_from_json(data: Mapping[str, Any], **overrides: Any) -> Any:
    """The inverse of `griffin_config_to_json` (overrides: e.g. scan_type)."""
    from recurrentgemma import common

    kw = dict(data, block_types=tuple(common.TemporalBlockType[n] for n in data["block_types"]))
    kw.update(overrides)
    return common.GriffinConfig(**kw)


def write_recurrentgemma(model: LanguageModel, staging: Any, *, tokenizer: Mapping[str, Any],
                         source: Mapping[str, Any]) -> list[str]:
    """Writes params/ (orbax) and config.json for `recurrentgemma.jax.Griffin` into the folder `staging`."""
    import json
    from pathlib import Path

    import orbax.checkpoint as ocp

    staging = Path(staging).absolute()
    griffin_cfg = model_config_to_griffin_config(model.cfg)
    params = to_recurrentgemma(model)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, params)
    checkpointer.close()
    meta = {"format": EXPORT_FORMAT, "version": 1, "griffin_config": griffin_config_to_json(griffin_cfg),
            "tokenizer": dict(tokenizer), "source": dict(source)}
    (staging / _CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return [PARAMS_DIR, _CONFIG_FILE]


def load_griffin_params(path: Any, device: Any = None) -> dict:
    """Griffin's params from an orbax PyTree checkpoint (an export's params/, or a released RecurrentGemma
    checkpoint) onto one device.

    This is `recurrentgemma.jax.load_parameters(path, "single_device")` for orbax-checkpoint 0.12, whose
    `metadata()` returns a StepMetadata: recurrentgemma 1.0.1's own loader then fails with "pytree structure
    error: different types at key path".
    """
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding), tree)
        return checkpointer.restore(path, restore_args=args)
    finally:
        checkpointer.close()


def load_recurrentgemma_export(path: Any, **overrides: Any) -> tuple[Any, dict]:
    """(GriffinConfig, params) of a `--format recurrentgemma` export (`load_griffin_params`, one device).
    `overrides` go to the GriffinConfig (e.g. scan_type)."""
    import json
    from pathlib import Path

    path = Path(path).absolute()
    meta = json.loads((path / _CONFIG_FILE).read_text()) if (path / _CONFIG_FILE).is_file() else {}
    if meta.get("format") != EXPORT_FORMAT or not (path / PARAMS_DIR).is_dir():
        raise ValueError(f"{path} is not an `lmtrain export --format recurrentgemma` directory (it needs "
                         f"{_CONFIG_FILE} with format {EXPORT_FORMAT!r} and {PARAMS_DIR}/)")
    return griffin_config_from_json(meta["griffin_config"], **overrides), load_griffin_params(path / PARAMS_DIR)


__all__ = ["EXPORT_FORMAT", "PARAMS_DIR", "check_compatible", "from_recurrentgemma", "griffin_config_from_json",
           "griffin_config_to_json", "griffin_config_to_model_config", "inputs_from_segment_pos",
           "load_griffin_params", "load_recurrentgemma", "load_recurrentgemma_export", "model_config_to_griffin_config",
           "recurrentgemma_embed_scale", "to_recurrentgemma", "write_recurrentgemma"]
