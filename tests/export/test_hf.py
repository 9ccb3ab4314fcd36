"""`--format hf`: transformers' RecurrentGemmaForCausalLM (PyTorch, CPU, float32) loads the export with no
missing/unexpected/mismatched weight and computes our logits; tokenizers encode like ours; refusals."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import logits, random_model, tokens  # noqa: E402

from lmtrain.configlib import updated  # noqa: E402
from lmtrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, TokenizerConfig  # noqa: E402
from lmtrain.export import hf  # noqa: E402
from lmtrain.export.files import ExportError, tokenizer_record  # noqa: E402
from lmtrain.models import ModelConfig  # noqa: E402

# RRA: a stacked RRA group + an R tail, grouped-query attention (2 kv heads), an RG-LRU wider than the
# model, RoPE base/fraction and norm eps off their defaults. R (Hawk): conv width 3, 2 gate blocks.
MODELS = {
    "RRA": {"vocab_size": 259, "width": 64, "num_layers": 4, "pattern": "RRA", "mlp_expansion": 2,
            "attention.num_heads": 4, "rglru.num_heads": 4, "attention.num_kv_heads": 2, "attention.window": 8,
            "rglru.width": 96, "attention.rope_base": 500.0, "attention.rope_fraction": 0.25, "norm_eps": 1e-5},
    "R": {"vocab_size": 259, "width": 64, "num_layers": 2, "pattern": "R", "rglru.num_heads": 2,
          "rglru.conv_width": 3},
}
WINDOW = 8  # T = 20 tokens: positions 0..8 see their whole past, later ones a sliding window
TEXTS = ["def foo(x):\n    return x  +  1\n\n", "  two leading spaces", "héllo wörld 日本語 🙂", "",
         "a\tb\r\nc", "trailing   "]


def export(model, tmp_path):
    hf.write_hf(model, tmp_path, tokenizer=tokenizer_record(TokenizerConfig(), None), tokenizer_file=None)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    return loaded.eval(), info


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_computes_our_logits(name, tmp_path):
    model = random_model(MODELS[name])
    theirs, info = export(model, tmp_path)
    assert type(theirs).__name__ == "RecurrentGemmaForCausalLM" and theirs.dtype == torch.float32
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()  # tied
    ids = tokens()
    ours = logits(model, ids)
    with torch.no_grad():
        out = theirs(torch.tensor(ids, dtype=torch.long), use_cache=False).logits.numpy()
    scale = np.abs(ours).max()
    short = slice(0, WINDOW + 1)  # shorter than the window
    np.testing.assert_allclose(out[:, short], ours[:, short], rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(out, ours, rtol=0, atol=2e-6 * scale)  # beyond it: window = ours + 1 in HF
    if "A" in model.cfg.pattern:  # without attention HF's cache fails (hf_notes says so)
        with torch.no_grad():  # the cache-filling (prefill) path
            prefill = theirs(torch.tensor(ids, dtype=torch.long), use_cache=True).logits.numpy()
        np.testing.assert_allclose(prefill, out, rtol=0, atol=1e-6 * scale)
    assert any("use_cache=False" in n for n in hf.hf_notes(model)) == ("A" not in model.cfg.pattern)


def test_greedy_generation_past_the_window_matches(tmp_path):
    """HF's decode loop (its RG-LRU/conv caches and sliding-window KV cache) continues our argmax."""
    model = random_model(MODELS["RRA"], seed=1)
    theirs, _ = export(model, tmp_path)
    prompt = tokens(length=14, seed=1)
    with torch.no_grad():
        out = theirs.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=256).numpy()
    assert out.shape == (2, 20)
    np.testing.assert_array_equal(out[:, 14:], logits(model, out)[:, 13:-1].argmax(-1))


def test_names_and_layouts_follow_the_table():
    model = random_model(MODELS["RRA"])
    sd = hf.to_hf_state_dict(model)
    cfg = transformers.RecurrentGemmaConfig(**hf.hf_config_kwargs(model.cfg))
    want = {k: tuple(v.shape) for k, v in transformers.RecurrentGemmaForCausalLM(cfg).state_dict().items()
            if k != "lm_head.weight"}
    assert {k: v.shape for k, v in sd.items()} == want
    assert cfg.layers_block_type == ["linear_attention", "linear_attention", "sliding_attention", "linear_attention"]
    assert (cfg.intermediate_size, cfg.attention_window_size, cfg.head_dim) == (2 * 128, WINDOW + 1, 16)


def test_refusals_name_the_reason():
    base = updated(ModelConfig(), {"pattern": "RRA"})
    cases = {
        "MA": ({"pattern": "MA"}, r"M \(Mamba-2\) layers"),
        "RG": ({"pattern": "RG"}, r"G \(global attention\) layers"),
        "heads": ({"rglru.num_heads": 2}, "rglru.num_heads=2 != attention.num_heads=4"),
        "head_dim": ({"attention.head_dim": 32}, "head_dim=32"),
        "embed": ({"embed_scale": False}, "embed_scale=false"),
        "cap": ({"logit_softcap": 0.0}, "logit_softcap=0 .*NaN"),
        "c": ({"rglru.c": 4.0}, "rglru.c=4.0"),
    }
    for changes, match in cases.values():
        with pytest.raises(ExportError, match=match) as e:
            hf.check_hf(updated(base, changes))
        assert "\n" not in str(e.value)
    assert hf.hf_problems(updated(base, {"pattern": "R", "rglru.num_heads": 2})) == []  # no A: heads are free


def test_a_kind_without_a_mapping_is_refused(monkeypatch):
    monkeypatch.delitem(hf.HF_KINDS, "A")
    with pytest.raises(ExportError, match="A layers: no RecurrentGemma mapping"):
        hf.check_hf(ModelConfig())


def test_embed_scale_difference_is_reported():
    model = random_model({"width": 48, "num_layers": 1, "pattern": "R"})
    assert "6.9375" in hf.embed_scale_warning(model)  # sqrt(48) = 6.928 in bfloat16
    assert hf.embed_scale_warning(random_model({"width": 64, "num_layers": 1, "pattern": "R"})) is None


def test_byte_tokenizer(tmp_path):
    hf.write_hf_tokenizer(tmp_path, None)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (256, 257, 258, 259)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [ours.bos_id, *ours.encode(text)]
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_tokenizer(kind, tmp_path):
    from lmtrain.data.tokenizer import train_sentencepiece

    corpus = [open(hf.__file__).read()] + TEXTS * 20  # ASCII code and the test texts
    path = train_sentencepiece(corpus, tmp_path / "sp", 480, model_type=kind, num_threads=1)
    hf.write_hf_tokenizer(tmp_path / "hf", path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = SentencePieceTokenizer(path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [ours.bos_id, *ours.encode(text)], text
        assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ours.encode(text))
