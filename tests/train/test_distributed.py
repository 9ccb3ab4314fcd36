"""Multi-process launch: environment parsing (no real initialization) and `lmtrain train` as two CPU
processes on localhost, checked against a single-process run on the same global batches."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lmtrain.cli import main
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


# --------------------------------------------------------------------------- two processes end to end

TINY = ["model.width=32", "model.num_layers=3", "model.num_heads=2", "model.window=16", "data.seq_len=32",
        "data.global_batch_size=4", "train.steps=4", "schedule.warmup_steps=1", "eval.every_steps=0",
        "eval.batches=1", "checkpoint.every_steps=2", "checkpoint.async_save=false", "log.progress=false",
        "log.tensorboard=false", "log.every_steps=1", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Processes:
    """`lmtrain train` as `count` processes on localhost (what launch/local_multiprocess.sh does)."""

    def __init__(self, workdir: Path, count: int, devices_per_process: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS"))}
        # Less LLVM optimization: compiling dominates these few tiny steps (about half the time).
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
                   XLA_FLAGS="--xla_backend_optimization_level=0",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(count))
        self.logs = [workdir.parent / f"process_{i}.log" for i in range(count)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with log.open("w") as out:  # files, not pipes: a full pipe would stall one process and so all
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lmtrain.cli", "train", "configs/demo.yaml", *TINY, f"workdir={workdir}"],
                    cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=out, stderr=subprocess.STDOUT))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait(self, timeout: float) -> list[str]:
        """Waits for all; asserts they exited 0; returns their output."""
        try:
            for p in self.procs:
                p.wait(timeout=timeout)
        finally:
            self.kill()
        texts = [log.read_text() for log in self.logs]
        assert [p.returncode for p in self.procs] == [0] * len(self.procs), "\n\n".join(t[-3000:] for t in texts)
        return texts


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
    processes = Processes(workdir, count=2, devices_per_process=1)
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
    logs = processes.wait(timeout=400)
    assert "process 1 of 2 (explicit): 1 local of 2 global cpu devices" in logs[1]
    assert "fsdp=2" in logs[0]
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
