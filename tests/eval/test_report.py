"""`lmtrain eval`: loading runs, clear errors for bad workdirs and options, and the CLI end to end
(JSON, PNG and the comparison report of two runs)."""

import json
import shutil

import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.configlib import ConfigError
from lmtrain.eval.load import RunError, load_run
from lmtrain.eval.longctx import ChunkRunner, heldout_rows
from lmtrain.eval.report import parse_options, plan

FAST = ["length=4x", "sequences=2", "batch=2", "task_lengths=1x,4x", "samples=2"]


def test_load_run_latest_and_given_step(tiny_run):
    cfg, model, step = load_run(tiny_run)
    assert step == 2 and cfg.data.seq_len == 32 and model.cfg.num_layers == 4
    assert load_run(tiny_run, step=1)[2] == 1
    with pytest.raises(RunError, match="no checkpoint of step 5; it has steps 1, 2"):
        load_run(tiny_run, step=5)


def test_workdir_without_checkpoints_or_config(tiny_run, tmp_path, capsys):
    no_ckpt = tmp_path / "fresh"
    no_ckpt.mkdir()
    shutil.copy(tiny_run / "config.yaml", no_ckpt / "config.yaml")
    with pytest.raises(RunError, match=f"{no_ckpt} has no checkpoint in {no_ckpt}/checkpoints; train the run "
                                       r"first \(`lmtrain train"):
        load_run(no_ckpt)
    with pytest.raises(RunError, match=f"{tmp_path} is not a training run: it has no config.yaml; create one "
                                       r"with `lmtrain train CONFIG workdir="):
        load_run(tmp_path)
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "missing")
    assert main(["eval", str(no_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint" in err and "lmtrain train" in err and "Traceback" not in err


def test_options_are_checked_before_evaluating(tiny_run):
    with pytest.raises(ConfigError, match="did you mean 'length'"):
        parse_options(["lenght=8x"])
    with pytest.raises(ConfigError, match="unknown task 'mqr'"):
        parse_options(["tasks=passkey,mqr"])
    opts = parse_options(["tasks=mqar", "mqar.num_pairs=4", "buckets=1,8,64", "step=all"])
    assert opts.task_names == ["mqar"] and opts.task_options == {"mqar": {"num_pairs": 4}}
    with pytest.raises(ConfigError, match=r"\(T=32\): eval length 100 is not a multiple of the chunk size 32"):
        plan([tiny_run], parse_options(["length=100"]))
    with pytest.raises(ConfigError, match="not a multiple of the chunk size 24"):
        plan([tiny_run], parse_options(["chunk=24", "length=4x", "tasks=none"]))
    with pytest.raises(ConfigError, match="is not a positive multiple like 64x"):
        plan([tiny_run], parse_options(["length=ax"]))
    assert [p.length for p in plan([tiny_run], parse_options(["length=2x", "tasks=none"]))] == [64]
    assert [p.step for p in plan([tiny_run], parse_options(["step=all", "tasks=none"]))] == [1, 2]


def test_cli_single_run_writes_json_png_and_table(tiny_run, capsys):
    assert main(["eval", str(tiny_run), *FAST, "buckets=1,2", "mqar.num_pairs=4"]) == 0
    out = capsys.readouterr().out
    assert "| run | step | T | tokens | all | [0, 1T) | [1T, 2T) | [2T, 4T) |" in out
    assert "### Context beyond T" in out
    assert "| griffin | mqar |" in out and "— (needs at least" in out  # passkey does not fit in 32 tokens
    longctx = json.loads((tiny_run / "eval" / "longctx.json").read_text())
    assert longctx["step"] == 2 and longctx["length"] == 128 and longctx["chunk"] == 32
    assert [(b["start"], b["end"]) for b in longctx["buckets"]] == [(0, 32), (32, 64), (64, 128)]
    assert all(b["tokens"] == 2 * (b["end"] - b["start"]) for b in longctx["buckets"])
    first = longctx["buckets"][0]
    assert first["loss_restart"] == pytest.approx(first["loss"], abs=1e-6)  # [0, T) has no context beyond T
    # the restart baseline, recomputed: every T-window of the same held-out rows as its own sequence
    cfg, model, _ = load_run(tiny_run)
    rows = heldout_rows(cfg, 128, 2)
    windows = {k: rows[k].reshape(-1, 2, 32) for k in ("inputs", "targets")}
    runner = ChunkRunner(model, 32)
    nll = np.stack([runner.run(x, y).nll_BxL for x, y in zip(windows["inputs"], windows["targets"])])
    nll = nll.reshape(2, 128)
    for b in longctx["buckets"]:
        assert b["loss_restart"] == pytest.approx(nll[:, b["start"]:b["end"]].mean(), rel=1e-5)
    norms = longctx["state_norms"]
    assert norms["positions"] == [32, 64, 96, 128]
    assert list(norms["layers"]) == ["layer 0 (R)", "layer 1 (R)", "layer 3 (R)"]
    tasks = json.loads((tiny_run / "eval" / "tasks.json").read_text())
    assert tasks["options"]["mqar"]["num_pairs"] == 4
    mqar = tasks["tasks"]["mqar"]
    assert [r["length"] for r in mqar] == [32, 128] and all(0 <= r["accuracy"] <= 1 for r in mqar)
    assert (tiny_run / "eval" / "longctx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tiny_run / "eval" / "report.md").read_text().startswith("### Held-out loss by position")


def test_cli_compares_runs(tiny_run, tmp_path, capsys):
    other = tmp_path / "griffin_copy"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("eval"))
    out_dir = tmp_path / "cmp"
    assert main(["eval", str(tiny_run), str(other), *FAST, "tasks=induction", f"out={out_dir}"]) == 0
    out = capsys.readouterr().out
    assert "| griffin | 2 | 32 |" in out and "| griffin_copy | 2 | 32 |" in out
    compare = json.loads((out_dir / "compare.json").read_text())
    assert [r["name"] for r in compare["runs"]] == ["griffin", "griffin_copy"]
    a, b = (r["longctx"]["buckets"] for r in compare["runs"])
    assert a == b  # same parameters, same held-out data: identical numbers
    assert (out_dir / "longctx.png").read_bytes()[:4] == b"\x89PNG"
    assert "griffin_copy" in (out_dir / "report.md").read_text()
    assert (other / "eval" / "longctx.json").exists() and (other / "eval" / "tasks.json").exists()
