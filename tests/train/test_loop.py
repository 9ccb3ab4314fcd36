"""Training loop: exact resume, corrupt-checkpoint fallback, SIGTERM, divergence, workdir config guard."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lmtrain.config import ConfigError, load_config
from lmtrain.run import TrainingDiverged, prepare_workdir, train
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.step import Trainer

ROOT = Path(__file__).resolve().parents[2]
# The tiny model of tests/train/test_step.py (keep in sync: identical shapes and optimizer share compiled
# steps through the persistent compilation cache), checkpoints every N=4 steps, every step logged.
TINY = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "model.vocab_size=260",
        "data.seq_len=32", "data.global_batch_size=8", "schedule.kind=constant", "schedule.warmup_steps=4",
        "optimizer.lr=3e-3", "optimizer.eps=1e-6", "optimizer.ema_decay=0.9",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
N = 4
BASE = [*TINY, "log.every_steps=1", "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e12",
        f"checkpoint.every_steps={N}", "checkpoint.every_minutes=0", "checkpoint.async_save=false",
        "eval.every_steps=0", "eval.batches=1", "data.read_threads=1"]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def config(workdir, *extra):
    return load_config(ROOT / "configs/demo.yaml", [*BASE, f"workdir={workdir}", *extra])


def records(workdir) -> dict[int, dict]:
    """The last training record of each step in metrics.jsonl (a resumed run appends)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "grad_norm" in record:
            out[record["step"]] = record
    return out


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_curve(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 2N steps (checkpoints at N and 2N)."""
    workdir = tmp_path_factory.mktemp("straight")
    summary = train(config(workdir, f"train.steps={2 * N}"))
    assert summary["start_step"] == 0 and summary["step"] == 2 * N
    assert checkpoint_steps(workdir) == [N, 2 * N]
    return workdir, jax.device_get(summary["state"].params)


def test_resume_equals_uninterrupted(straight, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = train(config(tmp_path, f"train.steps={N}"))
    assert first["step"] == N and checkpoint_steps(tmp_path) == [N]
    second = train(config(tmp_path, f"train.steps={2 * N}"))
    assert second["start_step"] == N and second["step"] == 2 * N
    assert f"resumed from step {N}" in caplog.text
    expected, got = records(straight[0]), records(tmp_path)
    assert sorted(got) == list(range(1, 2 * N + 1))
    assert expected[N]["lr"] != expected[N + 1]["lr"]  # still warming up across the resume point
    assert_same_curve(expected, got, range(1, 2 * N + 1))
    for a, b in zip(jax.tree.leaves(straight[1]), jax.tree.leaves(jax.device_get(second["state"].params)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # Only the run length changed: the first run's config is kept beside the new one.
    assert yaml.safe_load((tmp_path / "config.prev-1.yaml").read_text())["train"]["steps"] == N


def test_corrupt_checkpoint_falls_back_and_is_kept(straight, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    bad = workdir / "checkpoints" / str(2 * N)
    manifest = bad / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])  # truncated
    summary = train(config(workdir, f"train.steps={2 * N + 2}"))
    assert summary["start_step"] == N and summary["step"] == 2 * N + 2
    assert f"step {2 * N} in" in caplog.text and "does not restore" in caplog.text
    moved = workdir / "checkpoints" / f"corrupt-{2 * N}"
    assert f"moved it to {moved}" in caplog.text
    assert (moved / "state" / "manifest.ocdbt").stat().st_size == 10  # kept, untouched
    assert checkpoint_steps(workdir) == [N, 2 * N, 2 * N + 2]
    assert_same_curve(records(straight[0]), records(workdir), range(N + 1, 2 * N + 1))  # retrained identically


def test_sigterm_saves_and_resumes(tmp_path, caplog, compilation_cache):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "lmtrain.cli", "train", "configs/demo.yaml", *BASE, "train.steps=100000",
           "checkpoint.async_save=true", f"workdir={tmp_path}"]  # the final save must finish before exit
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        try:
            metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no training progress"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert returncode == 0, stderr[-3000:]
    assert "preempted" in stdout and "preempted at step" in stderr
    step = int(re.search(r"done: step (\d+)", stdout).group(1))
    assert step >= 3 and checkpoint_steps(tmp_path)[-1] == step
    assert max(records(tmp_path)) == step
    caplog.set_level(logging.INFO)
    summary = train(config(tmp_path, f"train.steps={step + 2}"))
    assert summary["start_step"] == step and summary["step"] == step + 2
    assert f"resumed from step {step}" in caplog.text


def test_nonfinite_steps_skip_then_diverge(tmp_path, caplog, monkeypatch):
    """A NaN weight appears before step 2 (as after a blow-up); skipped updates keep it, so every later step
    is non-finite too, and the run stops after train.max_skipped_steps skips in a row."""
    train_step = Trainer.train_step

    def poisoned(self, state, batch):
        if int(state.step) == 1:
            params = jax.tree.map(lambda x: x, state.params)  # new containers, same arrays
            kernel = params["groups"][0]["mlp"]["up"]["kernel"]
            params["groups"][0]["mlp"]["up"]["kernel"] = kernel.at[0, 0, 0].set(np.nan)
            state = state._replace(params=params)
        return train_step(self, state, batch)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite steps .*last at step 4, non-finite "
                                               r"gradients in parameter group\(s\) .*groups/0/mlp"):
        train(config(tmp_path, "train.steps=50", "train.max_skipped_steps=2"))
    got = records(tmp_path)
    assert sorted(got) == [1, 2, 3]  # step 4 raised before logging
    assert not (tmp_path / "checkpoints").exists() or checkpoint_steps(tmp_path) == []  # nor saved step 4
    assert got[1]["finite"] == 1.0 and got[1]["loss"] is not None
    for step in (2, 3):
        assert got[step]["finite"] == 0.0 and got[step]["loss"] is None and "loss" in got[step]["nonfinite"]
    assert "update skipped (2 in a row)" in caplog.text


class _Probe:
    """A step's `finite` metric that records when the loop reads it."""

    def __init__(self, value, step, events):
        self.value, self.step, self.events = value, step, events

    def __bool__(self):
        self.events.append(("read", self.step))
        return bool(self.value)

    def __float__(self):
        return float(self.value)


def test_metrics_are_read_one_step_late(tmp_path, monkeypatch):
    """Step k's metrics are read after step k + 1 is dispatched, except where a checkpoint (or the end)
    needs them first: every save comes after the read of its step, and the records are complete."""
    events, train_step, save = [], Trainer.train_step, Checkpointer.maybe_save

    def dispatch(self, state, batch):
        events.append(("dispatch", len([e for e in events if e[0] == "dispatch"]) + 1))
        state, metrics = train_step(self, state, batch)
        return state, {**metrics, "finite": _Probe(metrics["finite"], events[-1][1], events)}

    def saving(self, step, *args, **kwargs):
        events.append(("save", step))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", dispatch)
    monkeypatch.setattr(Checkpointer, "maybe_save", saving)
    train(config(tmp_path, f"train.steps={2 * N}"))
    at = {e: i for i, e in reversed(list(enumerate(events)))}  # first occurrence
    for k in range(1, 2 * N + 1):
        if k not in (1, N, 2 * N):  # the compiling first step, and the checkpointed ones, are read at once
            assert at[("dispatch", k + 1)] < at[("read", k)], events
    assert all(at[("read", k)] < at[("save", k)] for k in (N, 2 * N)), events
    assert sorted(records(tmp_path)) == list(range(1, 2 * N + 1)) and checkpoint_steps(tmp_path) == [N, 2 * N]


def test_workdir_refuses_other_model_and_keeps_old_configs(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    original = (workdir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="checkpoints of a different model config"):
        train(config(workdir, f"train.steps={2 * N}", "model.mlp_expansion=2"))
    assert (workdir / "config.yaml").read_text() == original and not list(workdir.glob("config.prev-*"))
    same = config(workdir, f"train.steps={2 * N}")
    prepare_workdir(same)  # adopts the copied run (its workdir differs)
    for path in workdir.glob("config.prev-*"):
        path.unlink()
    prepare_workdir(same)  # the same config again: nothing to keep
    assert not list(workdir.glob("config.prev-*"))
    for n, lr in enumerate(("1e-3", "2e-3"), start=1):
        previous = (workdir / "config.yaml").read_text()
        prepare_workdir(config(workdir, f"train.steps={2 * N}", f"optimizer.lr={lr}"))
        assert (workdir / f"config.prev-{n}.yaml").read_text() == previous
        assert yaml.safe_load((workdir / "config.yaml").read_text())["optimizer"]["lr"] == float(lr)
    shutil.rmtree(workdir / "checkpoints")  # without checkpoints a new model is fine
    prepare_workdir(config(workdir, "model.mlp_expansion=2"))
    assert (workdir / "config.prev-3.yaml").exists()
