"""`lmtrain` end to end in subprocesses: train writes every output, check reports, mistakes exit 2."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain.cli import main
from lmtrain.config import load_config
from lmtrain.models.flops import count_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lmtrain"
LMTRAIN = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lmtrain.cli"]
# The tiny model of tests/train/test_step.py (same shapes and optimizer: compiled steps are shared).
TINY = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "model.vocab_size=260",
        "data.seq_len=32", "data.global_batch_size=8", "schedule.kind=constant", "schedule.warmup_steps=4",
        "optimizer.lr=3e-3", "optimizer.eps=1e-6", "optimizer.ema_decay=0.9",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def env(compilation_cache):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def lmtrain(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*LMTRAIN, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_train_end_to_end(env, tmp_path, capsys, monkeypatch):
    overrides = [*TINY, "train.steps=6", "log.every_steps=2", "log.tensorboard=true", "log.progress=false",
                 "checkpoint.every_steps=3", "eval.every_steps=3", "eval.batches=1", f"workdir={tmp_path}"]
    proc = lmtrain(env, "train", "configs/demo.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"done: step 6 .*train loss \d+\.\d+, eval loss \d+\.\d+", proc.stdout), proc.stdout
    assert load_config(tmp_path / "config.yaml") == load_config(ROOT / "configs/demo.yaml", overrides)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    for record in train:
        for key in ("loss", "lr", "tokens_per_sec", "mfu", "grad_norm", "step_time_s"):
            assert isinstance(record[key], float) and math.isfinite(record[key]), (key, record)
        assert 0 < record["mfu"] < 1 and record["tokens_per_sec"] > 0 and record["tokens"] == 8 * 32
        assert 0 < record["loss"] < 2 * math.log(260)
    assert all(r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"])) for r in evals)

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    data = b"".join(p.read_bytes() for p in events)
    assert b"loss" in data and b"eval/loss" in data and b"tokens_per_sec" in data
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["3", "6"]
    assert (ckpts / "6" / "state").is_dir() and (ckpts / "6" / "data").is_dir()

    # The same command again: the run is complete, so it resumes at step 6 and does nothing.
    before = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    monkeypatch.chdir(ROOT)
    assert main(["train", "configs/demo.yaml", *overrides]) == 0
    assert "already complete: step 6 " in capsys.readouterr().out  # a rerun of a finished run trains nothing
    assert (tmp_path / "metrics.jsonl").read_text() == before and not list(tmp_path.glob("config.prev-*"))


def test_check_reports_size_flops_mesh_memory(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["check", "configs/demo.yaml", *TINY]) == 0
    out = capsys.readouterr().out
    cfg = load_config(ROOT / "configs/demo.yaml", TINY)
    assert f"parameters: {count_params(cfg.model):,}\n" in out
    assert re.search(r"training FLOPs per token: [\d.e+]+ \([\d.e+]+ per step\)", out)
    assert re.search(r"mesh: mesh data=1 fsdp=1 tensor=1 over 1 \w+ devices?", out)
    assert re.search(r"compiled train step \[8 rows x 32 tokens\] memory per device: temp [\d.]+ GiB, "
                     r"arguments [\d.]+ GiB", out)
    assert out.rstrip().endswith("config OK")
    assert "width: 32" in out  # the resolved config is printed
    curriculum = "data.curriculum={kind: staged, bucket: 16, stages: [[5, 16], [10, 32]]}"
    assert main(["check", "configs/demo.yaml", *TINY, curriculum]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"compiled train step \[(\d+) rows x (\d+) tokens\]", out) == [("16", "16"), ("8", "32")]


def test_bad_key_exits_2_with_did_you_mean(env, tmp_path):
    proc = lmtrain(env, "train", "configs/demo.yaml", "optimizer.lrr=3e-4", f"workdir={tmp_path / 'run'}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "lmtrain: error: unknown config key 'optimizer.lrr' (did you mean 'lr'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["check", "configs/demo.yaml", "model.width=abc"], r"model\.width: expected an integer"),
    (["train", "configs/nope.yaml"], r"config file 'configs/nope\.yaml' does not exist"),
    (["check", "configs/demo.yaml", "mesh.data=3", "mesh.fsdp=1"], r"needs 3 devices but \d+ are available"),
    (["check", "configs/demo.yaml", "model.vocab_size=100"], r"tokenizer has 259 ids but model\.vocab_size is 100"),
])
def test_mistakes_exit_2_with_message(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search("^lmtrain: error: .*" + message, err), err


def test_divergence_is_one_line_with_its_own_exit_code(tmp_path, capsys):
    """lr 1e39 overflows float32: every update is non-finite, the run stops (exit 3) with one line; --debug
    shows the traceback instead."""
    args = ["train", "configs/demo.yaml", *TINY, "optimizer.lr=1e39", "train.max_skipped_steps=1",
            "train.steps=10", "log.progress=false", "log.tensorboard=false", "checkpoint.every_steps=2"]
    assert main([*args, f"workdir={tmp_path / 'a'}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmtrain: error: 2 consecutive non-finite steps") and "Traceback" not in "".join(err)
    assert not list((tmp_path / "a" / "checkpoints").glob("[0-9]*"))  # nothing non-finite was saved as good
    from lmtrain.run import TrainingDiverged
    with pytest.raises(TrainingDiverged):
        main(["--debug", *args, f"workdir={tmp_path / 'b'}"])


def test_rerun_of_a_finished_run_reports_its_last_metrics(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    args = ["train", "configs/demo.yaml", *TINY, "train.steps=4", "log.every_steps=2", "log.progress=false",
            "log.tensorboard=false", "eval.every_steps=2", "eval.batches=1", f"workdir={tmp_path}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert re.search(r"done: step 4 .*train loss \d+\.\d+, eval loss \d+\.\d+, [\d,]+ tokens/s \(run average\)", first)
    assert "step 2/4: loss=" in caplog.text and "eval/loss=" in caplog.text  # a line per log step without a bar
    losses = re.search(r"train loss (\S+), eval loss (\S+),", first).groups()
    assert main(args) == 0  # nothing left to do
    again = capsys.readouterr().out
    assert again.startswith("already complete: step 4 of train.steps=4") and "nan" not in again
    assert f"train loss {losses[0]}, eval loss {losses[1].rstrip(',')}" in again
    caplog.clear()
    assert main([*args[:-1], "train.steps=6", f"workdir={tmp_path}"]) == 0  # extended: warned, then trained on
    assert "train.steps changed from 4 to 6" in caplog.text and "done: step 6 " in capsys.readouterr().out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_start_leaves_the_run_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "configs/demo.yaml", *TINY, "train.steps=2", "log.progress=false", "log.tensorboard=false",
            "eval.batches=1"]
    assert main([*base, f"workdir={run}"]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    for bad in (["mesh.data=3"], ["data.sources=[{kind: text, path: /nonexistent/*.txt}]"],
                ["data.tokenizer.kind=sentencepiece", "data.tokenizer.path=/nonexistent.model"]):
        assert main([*base, *bad, f"workdir={run}"]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmtrain: error: "), (bad, err)
        assert _snapshot(run) == before, bad  # no config.yaml rewrite, no config.prev-N.yaml
    afile = tmp_path / "file"
    afile.write_text("not a directory")
    assert main([*base, f"workdir={afile}"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_check_opens_the_data(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text("hello world " * (i + 1))
    base = ["check", "configs/demo.yaml", *TINY, "data.heldout_fraction=0.3"]
    assert main([*base, f"data.sources=[{{kind: text, path: '{docs}/*.txt'}}]"]) == 0
    out = capsys.readouterr().out
    got = re.search(r"data: data\.sources\[0\] \(text .*\): (\d+) training documents \(~([\d,]+) tokens, estimated\), "
                    r"(\d+) held out", out)
    assert got and int(got.group(1)) + int(got.group(3)) == 40 and int(got.group(3)) > 0
    # every training document is sampled (< 32): the estimate is their byte count + bos/eos each
    sizes, train = sorted(12 * (i + 1) + 2 for i in range(40)), int(got.group(1))
    assert sum(sizes[:train]) <= int(got.group(2).replace(",", "")) <= sum(sizes[-train:])
    assert main([*base, f"data.sources=[{{kind: text, path: '{tmp_path}/none/*.txt'}}]"]) == 2
    assert "matched no files" in capsys.readouterr().err
