"""`lmtrain export`: the safetensors round trip (identical parameters and logits), the recurrentgemma export
run by recurrentgemma's own Griffin, the HF export of a run, and every refusal (one line, exit 2, nothing
written)."""

import json
import shutil

import jax
import numpy as np
import pytest
import yaml
from conftest import logits, params_of, tokens

from lmtrain.cli import main
from lmtrain.eval.load import load_run
from lmtrain.export import ExportError, is_exported, load_exported, load_exported_tokenizer, load_model
from lmtrain.export.recurrentgemma import load_recurrentgemma_export, model_config_to_griffin_config


def export(capsys, *args) -> tuple[int, str, str]:
    rc = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safetensors_round_trip(run_dir, tmp_path, capsys):
    out = tmp_path / "st"
    rc, stdout, _ = export(capsys, run_dir, "--format", "safetensors", "--out", out)
    assert rc == 0 and f"step 2 as safetensors to {out}: config.json, model.safetensors" in stdout
    cfg, model = load_exported(out)
    run_cfg, run_model, _ = load_run(run_dir)
    assert cfg == run_cfg.model and is_exported(out) and not is_exported(run_dir)
    assert_same_params(params_of(model), params_of(run_model))
    ids = tokens()
    np.testing.assert_array_equal(logits(model, ids), logits(run_model, ids))
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 259, "pad_id": 256, "bos_id": 257, "eos_id": 258}
    assert meta["source"] == {"workdir": str(run_dir), "step": 2, "ema": False}
    assert meta["run_config"]["data"]["seq_len"] == run_cfg.data.seq_len  # the training length, for reference
    assert load_exported_tokenizer(out).encode("hi") == [104, 105]
    assert load_model(out)[0] == cfg and load_model(run_dir)[0] == cfg
    with pytest.raises(ExportError, match="step and ema do not apply"):
        load_model(out, step=1)


def test_ema_and_step(run_dir, tmp_path, capsys):
    out = tmp_path / "ema"
    rc, stdout, _ = export(capsys, run_dir, "--format", "safetensors", "--out", out, "--step", 1, "--ema")
    assert rc == 0 and "step 1 (EMA)" in stdout
    assert_same_params(params_of(load_exported(out)[1]), params_of(load_run(run_dir, 1, ema=True)[1]))


def test_recurrentgemma_export_runs_in_griffin(run_dir, tmp_path, capsys):
    from recurrentgemma import common
    from recurrentgemma.jax import griffin

    out = tmp_path / "rg"
    rc, stdout, _ = export(capsys, run_dir, "--format", "recurrentgemma", "--out", out)
    assert rc == 0 and "config.json, params" in stdout
    griffin_cfg, params = load_recurrentgemma_export(out, scan_type=common.ScanType.ASSOCIATIVE_NATIVE)
    run_cfg, run_model, _ = load_run(run_dir)
    assert griffin_cfg == model_config_to_griffin_config(run_cfg.model, scan_type=common.ScanType.ASSOCIATIVE_NATIVE)
    ids = tokens()
    segment_pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    model = griffin.Griffin(griffin_cfg, gradient_checkpointing=False)
    theirs = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, return_cache=False)[0])(params, ids, segment_pos)
    ours = logits(run_model, ids)
    np.testing.assert_allclose(np.asarray(theirs), ours, rtol=0, atol=2e-6 * np.abs(ours).max())


def test_hf_export_of_a_run(run_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    rc, stdout, err = export(capsys, run_dir, "--format", "hf", "--out", out)
    assert rc == 0 and "model.safetensors, tokenizer.json, tokenizer_config.json" in stdout
    assert "warning" not in err  # width 64: the embedding scale is exact in bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["def main(): return\n", "import os, sys\nos.\n"], return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 20) and ids[0, :5].tolist() == [257, 100, 101, 102, 32]  # T=20: compiled already
    with torch.no_grad():
        theirs = model(ids, use_cache=False).logits.numpy()
    ours = logits(load_run(run_dir)[1], ids.numpy())
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-6 * np.abs(ours).max())


def edited_run(run_dir, tmp_path, changes: dict):
    """A copy of the run whose config.yaml has `changes` (dotted keys); its checkpoints stay as they were."""
    copy = shutil.copytree(run_dir, tmp_path / "edited")
    data = yaml.safe_load((copy / "config.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    data["workdir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(data))
    return copy


@pytest.mark.parametrize("case", ["no run", "no checkpoint", "format typo", "format unknown", "step", "ema", "hf G",
                                  "recurrentgemma kv heads", "out is a file"])
def test_refusals(case, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [run_dir, "--format", "safetensors", "--out", out]
    if case == "no run":
        args[0], match = tmp_path / "nope", "does not exist; create one with `lmtrain train CONFIG"
    elif case == "no checkpoint":
        (tmp_path / "fresh").mkdir()
        shutil.copy(run_dir / "config.yaml", tmp_path / "fresh" / "config.yaml")
        args[0], match = tmp_path / "fresh", "has no checkpoint in .*; train the run first"
    elif case == "format typo":
        args[2], match = "safetensor", "unknown export format 'safetensor' \\(did you mean 'safetensors'\\?\\)"
    elif case == "format unknown":
        args[2], match = "onnx", "unknown export format 'onnx' \\(formats: hf, recurrentgemma, safetensors\\)"
    elif case == "step":
        args, match = [*args, "--step", 7], "has no checkpoint of step 7; it has steps 1, 2"
    elif case == "ema":
        args[0] = edited_run(run_dir, tmp_path, {"optimizer.ema_decay": 0.0})
        args, match = [*args, "--ema"], "trained without optimizer.ema_decay"
    elif case == "hf G":
        args[0] = edited_run(run_dir, tmp_path, {"model.pattern": "RG"})
        args[2], match = "hf", "cannot export as Hugging Face RecurrentGemma: G \\(global attention\\) layers"
    elif case == "recurrentgemma kv heads":
        args[0] = edited_run(run_dir, tmp_path, {"model.attention.num_kv_heads": 2})
        args[2], match = "recurrentgemma", "cannot export for recurrentgemma's Griffin: .*num_kv_heads=2"
    else:
        out.write_text("mine")
        match = "exists and is not a directory"
    rc, stdout, err = export(capsys, *args)
    assert rc == 2 and stdout == ""
    assert err.startswith("lmtrain: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err
    assert (out.read_text() == "mine") if case == "out is a file" else not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_non_empty_out_needs_force_and_keeps_other_files(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    rc, _, err = export(capsys, run_dir, "--format", "safetensors", "--out", out)
    assert rc == 2 and "exists and is not empty (2 entries)" in err and "--force" in err
    assert (out / "config.json").read_text() == "{}" and not (out / "model.safetensors").exists()
    rc, _, _ = export(capsys, run_dir, "--format", "safetensors", "--out", out, "--force")
    assert rc == 0 and (out / "notes.txt").read_text() == "mine" and is_exported(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable like the other files, not 0600
