"""Multi-process launch: environment parsing (no real initialization) and `lmtrain train` as two CPU
processes on localhost, checked against a single-process run on the same global batches."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.configlib import ConfigError
from lmtrain.train import distributed
from lmtrain.train.distributed import DistributedEnvError, Launch, detect

REPO = Path(__file__).resolve().parents[2]
FULL = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
         "SLURM_LOCALID": "1"}
no_tpu = lambda: 0


# --------------------------------------------------------------------------- environment parsing

def test_explicit_env():
    assert detect(FULL, no_tpu) == Launch("explicit", "10.0.0.1:1234", 4, 3)
    assert detect({**FULL, **SLURM}, no_tpu).kind == "explicit"  # explicit wins over auto-detection


@pytest.mark.parametrize("missing", [["JAX_PROCESS_ID"], ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"],
                                     ["JAX_COORDINATOR_ADDRESS"]])
def test_partial_env_names_the_missing_variables(missing):
    env = {k: v for k, v in FULL.items() if k not in missing}
    with pytest.raises(DistributedEnvError) as e:
        detect(env, no_tpu)
    for name in FULL:
        assert (name in str(e.value).split(" is set but ")[1].split(".")[0]) == (name in missing), str(e.value)


@pytest.mark.parametrize("change, words", [
    ({"JAX_PROCESS_ID": "4"}, "JAX_PROCESS_ID=4 must be < JAX_NUM_PROCESSES=4"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0 must be >= 1"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "must be host:port"),
])
def test_malformed_env(change, words):
    with pytest.raises(DistributedEnvError, match=words):
        detect({**FULL, **change}, no_tpu)


def test_cluster_auto_detection():
    assert detect({}, no_tpu) == Launch("single")
    assert detect(SLURM, no_tpu) == Launch("slurm")
    assert detect({**SLURM, "SLURM_NTASKS": "1"}, no_tpu).kind == "single"
    batch_script = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # sbatch without srun
    assert detect(batch_script, no_tpu).kind == "single"
    assert detect({}, lambda: 4) == Launch("tpu")
    assert detect({}, lambda: 1).kind == "single"  # a single-host TPU VM
    assert distributed._tpu_host_count() == 0  # this machine is no TPU VM


def test_initialize_from_env(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(kw))
    for name in [*FULL, *SLURM]:
        monkeypatch.delenv(name, raising=False)
    distributed.initialize_from_env()
    assert calls == []
    for name, value in FULL.items():
        monkeypatch.setenv(name, value)
    distributed.initialize_from_env()
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                          cluster_detection_method="deactivate")]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_cli_reports_partial_env(monkeypatch, capsys):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert main(["check", str(REPO / "configs/demo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "lmtrain: error:" in err and "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not" in err


# --------------------------------------------------------------------------- which rows a process reads

class FakeSharding:
    """Rows held per (process, device), like `Sharding.devices_indices_map` reports them."""

    def __init__(self, rows_by_process: dict[int, list[tuple[int, int]]]):
        self.rows = rows_by_process

    def devices_indices_map(self, shape):
        class Device:
            def __init__(self, process_index):
                self.process_index = process_index
        return {Device(p): (slice(lo, hi),) for p, spans in self.rows.items() for lo, hi in spans}


@pytest.mark.parametrize("rows, expected", [
    ({0: [(0, 2), (2, 4)], 1: [(4, 6), (6, 8)]}, {0: (0, 2), 1: (1, 2)}),      # batch split over processes
    ({0: [(0, 8)], 1: [(0, 8)]}, {0: (0, 1), 1: (0, 1)}),                      # tensor parallel across them
    ({0: [(0, 4)], 1: [(0, 4)], 2: [(4, 8)], 3: [(4, 8)]}, {1: (0, 2), 2: (1, 2)}),  # pairs of replicas
])
def test_data_shard_follows_the_batch_sharding(monkeypatch, rows, expected):
    for process, shard in expected.items():
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        assert distributed.data_shard(FakeSharding(rows), 8) == shard


def test_data_shard_refuses_scattered_rows(monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(ConfigError, match="not one block"):
        distributed.data_shard(FakeSharding({0: [(0, 2), (4, 6)], 1: [(2, 4), (6, 8)]}), 8)


def test_data_shard_single_process():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("fsdp",)), PartitionSpec("fsdp"))
    assert distributed.data_shard(sharding, 4 * len(jax.devices())) == (0, 1)


# --------------------------------------------------------------------------- per-process data state

def test_data_state_per_process_and_other_process_count(tmp_path, monkeypatch, caplog):
    from lmtrain.train import checkpoint as ckpt_lib
    from lmtrain.train.checkpoint import CheckpointConfig, Checkpointer

    state = {"w": jax.numpy.arange(3.0)}
    with Checkpointer(tmp_path, CheckpointConfig(async_save=False)) as ck:
        assert ck.maybe_save(1, state, {"position": 1}, force=True)
        assert [p.name for p in (tmp_path / "1/data").glob("process_*")] == ["process_0-of-1.json"]
        assert ck.restore_latest(state)[2] == {"position": 1}
        # As if written by 2 processes: the state restores, the data iterator starts again.
        monkeypatch.setattr(ckpt_lib, "_process_file", lambda: "process_1-of-2.json")
        assert ck.maybe_save(2, state, {"position": 2}, force=True)
        monkeypatch.undo()
        assert ckpt_lib._process_file() == "process_0-of-1.json"
        step, restored, data_state = ck.restore_latest(state)
    assert (step, data_state) == (2, None) and "different number of processes" in caplog.text
    np.testing.assert_array_equal(restored["w"], state["w"])


# --------------------------------------------------------------------------- two processes end to end

TINY = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "data.seq_len=32",
        "data.global_batch_size=4", "train.steps=4", "schedule.warmup_steps=1", "eval.every_steps=0",
        "eval.batches=1", "checkpoint.every_steps=2", "checkpoint.async_save=false", "log.progress=false",
        "log.tensorboard=false", "log.every_steps=1", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class LocalRun:
    """`launch/local_multiprocess.sh` running `lmtrain train` as `count` CPU processes on localhost."""

    def __init__(self, workdir: Path, count: int, devices_per_process: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS"))}
        # Less LLVM optimization: compiling dominates these few tiny steps (about half the time).
        env.update(NUM_PROCESSES=str(count), DEVICES_PER_PROCESS=str(devices_per_process), PYTHON=sys.executable,
                   PORT=str(free_port()), XLA_FLAGS="--xla_backend_optimization_level=0")
        self.log = workdir.parent / "processes.log"
        with self.log.open("w") as out:  # a file, not a pipe: a full pipe would stall every process
            self.proc = subprocess.Popen(
                ["bash", str(REPO / "launch/local_multiprocess.sh"), "configs/demo.yaml", *TINY, f"workdir={workdir}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the script and the processes it started
            self.proc.wait()

    def wait(self, timeout: float) -> str:
        """Waits for the script; asserts it exited 0; returns the output (lines prefixed `[i] `)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        text = self.log.read_text()
        assert self.proc.returncode == 0, text[-6000:]
        return text


def test_two_processes_train_like_one(tmp_path):
    """Two processes x 1 CPU device (mesh fsdp=2) train, evaluate and checkpoint together.

    A single-process `lmtrain train` run would read different rows: each process reads its own
    shard of the documents (`[process_index::process_count]`), so the global batch depends on the
    process count. Instead the reference is one process training the same model on the global
    batches the two processes build (process 0's rows, then process 1's): its losses must match
    at every step, which checks the global arrays, the cross-process gradient reduction and the
    optimizer update, not just the initialization.
    """
    from lmtrain.config import load_config
    from lmtrain.data.pipeline import make_train_iterator
    from lmtrain.train.mesh import make_mesh
    from lmtrain.train.step import Trainer

    workdir = tmp_path / "run"
    processes = LocalRun(workdir, count=2, devices_per_process=1)
    try:
        # The reference, computed while they run: one process, one device, the same global batches.
        cfg = load_config(str(REPO / "configs/demo.yaml"), TINY + [f"workdir={tmp_path / 'ref'}"])
        trainer = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        shards = [make_train_iterator(cfg.data, process_index=p, process_count=2) for p in (0, 1)]
        state, ref = trainer.init_state(), []
        for _ in range(4):
            rows = [next(it) for it in shards]
            batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
            ref.append(float(metrics["loss"]))
    except BaseException:
        processes.kill()
        raise
    log = processes.wait(timeout=400)
    assert re.search(r"^\[1\] .*process 1 of 2 \(explicit\): 1 local of 2 global cpu devices", log, re.M), log
    assert re.search(r"^\[0\] .*mesh data=1 fsdp=2 tensor=1 over 2 cpu devices", log, re.M), log
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), records
    assert any("eval/loss" in r for r in records)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert not list(workdir.glob("config.prev-*"))
    np.testing.assert_allclose(losses, ref, atol=1e-4)
    assert abs(ref[0] - math.log(cfg.model.vocab_size)) < 1.0

    # Every process saved its own data-iterator state, so each resumes its own shard exactly.
    for p, it in enumerate(shards):
        saved = json.loads((workdir / "checkpoints/4/data" / f"process_{p}-of-2.json").read_text())
        assert saved["value"] == it.get_state()
