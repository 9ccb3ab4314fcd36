"""`--format hf`: a directory `transformers.AutoModelForCausalLM.from_pretrained` loads as RecurrentGemmaForCausalLM.

    DIR/config.json            `transformers.RecurrentGemmaConfig(...).save_pretrained` (model_type recurrent_gemma)
    DIR/model.safetensors      float32 weights under HF's names and layouts (the table below); lm_head is tied
    DIR/generation_config.json bos/eos/pad ids
    DIR/tokenizer.json, tokenizer_config.json   what `AutoTokenizer.from_pretrained(DIR)` loads (see
                               `write_hf_tokenizer`: byte tokenizer or the run's sentencepiece model)

Names (transformers 5.x `models/recurrent_gemma/modeling_recurrent_gemma.py`); ours are per-layer leaves of
`layer_slots` (groups[i] at repeat r, or tail[j]); HF layer i is `model.layers.i`. Torch Linear weights are
[out, in] (ours [in, out]: transposed); conv_1d.weight is [C, 1, K] (ours [K, C]); everything else is copied:

    embedder.embedding               model.embed_tokens.weight           (lm_head.weight is tied to it)
    final_norm.scale                 model.final_norm.weight
    mixer_norm.scale / mlp_norm.scale  temporal_pre_norm.weight / channel_pre_norm.weight
    mlp.{gate,up,down}.{kernel,bias} mlp_block.{gate_proj,up_proj,down_proj}.{weight,bias}
  R mixer.{linear_x,linear_y,linear_out}.{kernel,bias}  temporal_block.{same}.{weight,bias}
    mixer.conv.{kernel,bias}         temporal_block.conv_1d.{weight,bias}
    mixer.rg_lru.a_param             temporal_block.rg_lru.recurrent_param
    mixer.rg_lru.input_gate.{kernel,bias}  temporal_block.rg_lru.input_gate_{weight,bias}   ([H, b, b], [H, b])
    mixer.rg_lru.a_gate.{kernel,bias}      temporal_block.rg_lru.recurrent_gate_{weight,bias}
  A mixer.{q,k,v}.kernel             temporal_block.{q,k,v}_proj.weight  (no bias, attention_bias=False)
    mixer.out.{kernel,bias}          temporal_block.o_proj.{weight,bias}

Differences from our model, and how the export bridges them (docs/export.md lists them all):
- MLP width: HF builds `intermediate_size // 2` hidden units, so intermediate_size = 2 * our mlp_width.
- Window: HF's sliding window holds `attention_window_size` keys including the query's own; ours (and
  recurrentgemma's JAX Griffin) holds the query plus `window` earlier ones: attention_window_size = window + 1.
- Embedding scale: HF always multiplies by sqrt(width) rounded to bfloat16; exact only for widths whose sqrt is
  a bfloat16 number (64, 256, 1024, 4096, ...). Other widths export with a warning (logits differ slightly).
- HF always soft-caps the logits and scales the embeddings: logit_softcap 0 (tanh(x/0) = NaN) and
  embed_scale off are refused.
- Documents: HF resets the RG-LRU where position_ids == 0 but its conv has no document masking, and its
  attention masks documents only through an attention mask: packed rows do not match; one document per row does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lmtrain.export.files import ExportError, flatten
from lmtrain.export.recurrentgemma import recurrentgemma_embed_scale
from lmtrain.models.config import ModelConfig
from lmtrain.models.mixers.attention import head_dim
from lmtrain.models.mixers.rglru import lru_width
from lmtrain.models.model import LanguageModel
from lmtrain.models.state import layer_slots

WEIGHTS_FILE = "model.safetensors"
HF_RGLRU_C = 8.0  # hard-coded in RecurrentGemmaRglru: log a = -8 * softplus(recurrent_param) * r

# Leaf layouts: how our array becomes HF's tensor.
_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "linear": lambda a: a.T,  # ours [in, out] -> torch nn.Linear [out, in]
    "conv": lambda a: a.T[:, None, :],  # ours [K, C] -> torch depthwise nn.Conv1d [C, 1, K]
}


def _linear(ours: str, theirs: str, bias: bool = True) -> dict[str, tuple[str, str]]:
    leaves = {f"{ours}.kernel": (f"{theirs}.weight", "linear")}
    if bias:
        leaves[f"{ours}.bias"] = (f"{theirs}.bias", "copy")
    return leaves


_COMMON = {
    "mixer_norm.scale": ("temporal_pre_norm.weight", "copy"),
    "mlp_norm.scale": ("channel_pre_norm.weight", "copy"),
    **_linear("mlp.gate", "mlp_block.gate_proj"),
    **_linear("mlp.up", "mlp_block.up_proj"),
    **_linear("mlp.down", "mlp_block.down_proj"),
}


def _check_r(cfg: ModelConfig) -> list[str]:
    problems = []
    if cfg.rglru.c != HF_RGLRU_C:
        problems.append(f"rglru.c={cfg.rglru.c} (HF hard-codes c={HF_RGLRU_C})")
    if "A" in cfg.pattern and cfg.rglru.num_heads != cfg.attention.num_heads:
        problems.append(f"rglru.num_heads={cfg.rglru.num_heads} != attention.num_heads={cfg.attention.num_heads} "
                        "(HF has one num_attention_heads for the RG-LRU gate blocks and the attention heads)")
    return problems


def _check_a(cfg: ModelConfig) -> list[str]:
    att = cfg.attention
    problems = []
    if cfg.width % att.num_heads or head_dim(cfg) != cfg.width // att.num_heads:
        problems.append(f"attention head_dim={head_dim(cfg)} with width={cfg.width} and num_heads={att.num_heads} "
                        "(HF derives head_dim = width // num_heads)")
    return problems


@dataclasses.dataclass(frozen=True)
class HFKind:
    """How one of our layer kinds maps onto a RecurrentGemma decoder layer (or why it cannot)."""

    block_type: str | None  # RecurrentGemmaConfig.block_types entry; None = not representable
    leaves: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # ours -> (HF name, layout)
    check: Callable[[ModelConfig], list[str]] = lambda cfg: []
    refusal: str = ""  # why the kind cannot be exported (block_type None)


# The one table: pattern letter -> mapping or refusal. A letter missing here is refused too (never guessed).
HF_KINDS: dict[str, HFKind] = {
    "R": HFKind("recurrent", {
        **_linear("mixer.linear_x", "temporal_block.linear_x"),
        **_linear("mixer.linear_y", "temporal_block.linear_y"),
        **_linear("mixer.linear_out", "temporal_block.linear_out"),
        "mixer.conv.kernel": ("temporal_block.conv_1d.weight", "conv"),
        "mixer.conv.bias": ("temporal_block.conv_1d.bias", "copy"),
        "mixer.rg_lru.a_param": ("temporal_block.rg_lru.recurrent_param", "copy"),
        "mixer.rg_lru.input_gate.kernel": ("temporal_block.rg_lru.input_gate_weight", "copy"),
        "mixer.rg_lru.input_gate.bias": ("temporal_block.rg_lru.input_gate_bias", "copy"),
        "mixer.rg_lru.a_gate.kernel": ("temporal_block.rg_lru.recurrent_gate_weight", "copy"),
        "mixer.rg_lru.a_gate.bias": ("temporal_block.rg_lru.recurrent_gate_bias", "copy"),
        **_COMMON}, _check_r),
    "A": HFKind("attention", {
        **_linear("mixer.q", "temporal_block.q_proj", bias=False),
        **_linear("mixer.k", "temporal_block.k_proj", bias=False),
        **_linear("mixer.v", "temporal_block.v_proj", bias=False),
        **_linear("mixer.out", "temporal_block.o_proj"),
        **_COMMON}, _check_a),
    "G": HFKind(None, refusal="G (global attention) layers: RecurrentGemma has only sliding-window attention"),
    "M": HFKind(None, refusal="M (Mamba-2) layers: RecurrentGemma has no state-space layer"),
}


def hf_problems(cfg: ModelConfig) -> list[str]:
    """Every reason `cfg` cannot be exported as RecurrentGemmaForCausalLM (empty: it can)."""
    problems = []
    for kind in dict.fromkeys(cfg.pattern):
        entry = HF_KINDS.get(kind)
        if entry is None:
            problems.append(f"{kind} layers: no RecurrentGemma mapping for this layer kind")
        elif entry.block_type is None:
            problems.append(entry.refusal)
        else:
            problems += entry.check(cfg)
    if not cfg.embed_scale:
        problems.append("embed_scale=false (HF always multiplies the embeddings by sqrt(width))")
    if not cfg.logit_softcap:
        problems.append("logit_softcap=0 (HF always applies tanh(logits / cap) * cap: cap 0 gives NaN)")
    return problems


def check_hf(cfg: ModelConfig) -> None:
    """ExportError, in one line naming every reason, if `cfg` cannot be exported as RecurrentGemma."""
    problems = hf_problems(cfg)
    if problems:
        raise ExportError("cannot export as Hugging Face RecurrentGemma: " + "; ".join(problems))


def _num_heads(cfg: ModelConfig) -> int:
    return cfg.attention.num_heads if "A" in cfg.pattern else cfg.rglru.num_heads


def hf_config_kwargs(cfg: ModelConfig, *, tokenizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of `transformers.RecurrentGemmaConfig` computing what `LanguageModel(cfg)` computes."""
    check_hf(cfg)
    kinds = {k: HF_KINDS[k].block_type for k in cfg.pattern}
    att = cfg.attention
    kw: dict[str, Any] = dict(
        num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size, hidden_size=cfg.width,
        intermediate_size=2 * cfg.mlp_width,  # HF's MLP is intermediate_size // 2 wide
        num_attention_heads=_num_heads(cfg), lru_width=lru_width(cfg),
        attention_window_size=att.window + 1,  # HF counts the query itself
        conv1d_width=cfg.rglru.conv_width, logits_soft_cap=float(cfg.logit_softcap), rms_norm_eps=cfg.norm_eps,
        hidden_activation="gelu_pytorch_tanh",  # jax.nn.gelu's default (approximate=True)
        rope_parameters={"rope_type": "default", "rope_theta": float(att.rope_base),
                         "partial_rotary_factor": float(att.rope_fraction)},
        # Every layer listed: HF cycles block_types only 100 times.
        block_types=[kinds[k] for k in cfg.layer_kinds],
        num_key_value_heads=att.num_kv_heads if "A" in cfg.pattern else _num_heads(cfg),
        attention_bias=False, tie_word_embeddings=True, architectures=["RecurrentGemmaForCausalLM"])
    if tokenizer is not None:
        kw.update(pad_token_id=tokenizer["pad_id"], bos_token_id=tokenizer["bos_id"], eos_token_id=tokenizer["eos_id"])
    return kw


def to_hf_state_dict(model: LanguageModel) -> dict[str, np.ndarray]:
    """Our parameters -> {HF name: float32 array in HF's layout} (no lm_head: it is tied to embed_tokens)."""
    cfg = model.cfg
    check_hf(cfg)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    f32 = lambda a: np.asarray(a, np.float32)
    out = {"model.embed_tokens.weight": f32(pure["embedder"]["embedding"]),
           "model.final_norm.weight": f32(pure["final_norm"]["scale"])}
    for slot in layer_slots(cfg.pattern, cfg.num_layers):
        layer = flatten(pure[slot.part][slot.index])
        if slot.repeat is not None:
            layer = {k: v[slot.repeat] for k, v in layer.items()}
        leaves = HF_KINDS[slot.kind].leaves
        if set(layer) != set(leaves):  # a layer kind whose parameters changed without this table
            raise ExportError(f"layer {slot.depth} ({slot.kind}): parameters {sorted(set(layer) ^ set(leaves))} "
                              "are not in the HF mapping table (lmtrain/export/hf.py HF_KINDS)")
        for ours, (theirs, layout) in leaves.items():
            out[f"model.layers.{slot.depth}.{theirs}"] = np.ascontiguousarray(_LAYOUTS[layout](f32(layer[ours])))
    return out


def embed_scale_warning(model: LanguageModel, consumer: str = "HF") -> str | None:
    """A warning if the bfloat16-rounded sqrt(width) that HF and recurrentgemma apply differs from this model's
    embedding scale."""
    theirs = recurrentgemma_embed_scale(model.cfg.width)
    if model.cfg.embed_scale and model.embedder.scale != theirs:
        return (f"{consumer} scales embeddings by {theirs} (sqrt({model.cfg.width}) in bfloat16), this model by "
                f"{model.embedder.scale:.6g}: {consumer}'s logits will differ slightly (widths whose sqrt is a "
                "bfloat16 number, e.g. 64, 256, 1024, 4096, match exactly)")
    return None


def hf_notes(model: LanguageModel) -> list[str]:
    """What the exported model computes differently, or cannot do, in transformers 5.x (empty: nothing)."""
    cfg, notes = model.cfg, []
    scale = embed_scale_warning(model)
    if scale:
        notes.append(scale)
    if "A" not in cfg.pattern:
        notes.append("no attention layer: transformers 5.x runs this RecurrentGemma only with use_cache=False "
                     "(its cache raises `get_seq_length can only be called on Attention layers`), so generate() "
                     "fails; score sequences with model(ids, use_cache=False)")
    if lru_width(cfg) != cfg.width:
        notes.append(f"rglru.width={lru_width(cfg)} != width={cfg.width}: transformers 5.x sizes its conv cache by "
                     "the width, so generate() from a one-token prompt fails (longer prompts work)")
    return notes


def write_hf(model: LanguageModel, staging: Path, *, tokenizer: Mapping[str, Any],
             tokenizer_file: Path | None) -> list[str]:
    """Writes config.json, generation_config.json, model.safetensors and the tokenizer files into `staging`.

    `hf_notes(model)` says what transformers then computes differently or cannot do."""
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, RecurrentGemmaConfig

    kw = hf_config_kwargs(model.cfg, tokenizer=tokenizer)
    config = RecurrentGemmaConfig(**kw)
    config.save_pretrained(staging)
    GenerationConfig(bos_token_id=kw["bos_token_id"], eos_token_id=kw["eos_token_id"],
                     pad_token_id=kw["pad_token_id"]).save_pretrained(staging)
    save_file(to_hf_state_dict(model), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    write_hf_tokenizer(staging, tokenizer_file)
    return sorted(p.name for p in staging.iterdir())


def write_hf_tokenizer(staging: Path, sentencepiece_model: Path | None) -> None:
    """tokenizer.json + tokenizer_config.json for `AutoTokenizer.from_pretrained`.

    sentencepiece: transformers' own conversion of the .model file (`TokenizersBackend`, which reads the
    model's normalizer, byte fallback and merges); byte: a byte-level BPE with no merges whose ids are the
    UTF-8 byte values 0..255, plus <pad>=256, <bos>=257, <eos>=258. Both add <bos> in front, as training
    does (documents are [bos, text..., eos]).
    """
    import tempfile

    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if sentencepiece_model is not None:
        import shutil

        with tempfile.TemporaryDirectory() as src:
            shutil.copy(sentencepiece_model, Path(src) / "tokenizer.model")
            tok = TokenizersBackend.from_pretrained(src, add_bos_token=True, add_eos_token=False)
            _set_pad(tok, sentencepiece_model)
            tok.save_pretrained(staging)
        return
    tok = TokenizersBackend(tokenizer_object=byte_tokenizer_object(), bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>")
    tok.save_pretrained(staging)


def _set_pad(tok: Any, sentencepiece_model: Path) -> None:
    """Our sentencepiece tokenizer pads with the model's pad id, or id 0 without one."""
    from lmtrain.data.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(sentencepiece_model)
    if tok.pad_token_id != ours.pad_id:
        tok.pad_token = tok.convert_ids_to_tokens(ours.pad_id)


def byte_tokenizer_object() -> Any:
    """A `tokenizers.Tokenizer` encoding exactly like `lmtrain.data.tokenizer.ByteTokenizer` (plus <bos>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from lmtrain.data.tokenizer import ByteTokenizer

    chars = bytes_to_unicode()  # byte -> the printable character ByteLevel stands it for
    tk = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    b = ByteTokenizer
    specials = {"<pad>": b.pad_id, "<bos>": b.bos_id, "<eos>": b.eos_id}
    tk.add_special_tokens([AddedToken(name, special=True) for name in specials])
    assert all(tk.token_to_id(name) == i for name, i in specials.items()), "byte special ids moved"
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", b.bos_id)])
    return tk


__all__ = ["HF_KINDS", "HFKind", "check_hf", "embed_scale_warning", "hf_config_kwargs", "hf_notes", "hf_problems",
           "to_hf_state_dict", "write_hf", "write_hf_tokenizer"]
