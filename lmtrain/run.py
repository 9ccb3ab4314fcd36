"""A training run: workdir, mesh, data, resume, the loop, evaluation, logging, checkpoints.

    summary = train(load_config("configs/demo.yaml", ["train.steps=100"]))

A run restarted with the same workdir resumes from its latest good checkpoint (parameters,
optimizer, step, RNG, data-iterator position), so the resumed loss curve equals the uninterrupted
one. SIGTERM saves a checkpoint and returns cleanly.

The loop runs one step ahead of the device: it dispatches step k + 1 and prepares the batch of
step k + 2 before it reads the metrics of step k (the non-finite check included). Before any
evaluation, checkpoint, preemption stop or the end of the run it reads the pending step, so
nothing is saved from a state whose check has not been read. This is the top layer:
`lmtrain.config` builds on `lmtrain.train`, and this module on both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from lmtrain import configlib
from lmtrain.config import Config, ConfigError, check_runtime, save_config
from lmtrain.data.pipeline import data_stats, make_eval_iterator, make_train_iterator, to_global_batch
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.models.flops import count_params, train_flops_per_token
from lmtrain.train.checkpoint import Checkpointer, PreemptionGuard
from lmtrain.train.distributed import data_shard
from lmtrain.train.interventions import tbptt_start
from lmtrain.train.mesh import describe_mesh, make_mesh
from lmtrain.train.metrics import MetricsWriter, device_peak_flops, mfu
from lmtrain.train.optimizer import nonfinite_groups
from lmtrain.train.step import Trainer, TrainState

log = logging.getLogger(__name__)


class TrainingDiverged(LmtrainError, RuntimeError):
    """Too many consecutive non-finite steps (the CLI exits with code 3)."""

    exit_code = 3


def check_workdir(cfg: Config) -> dict[str, Any] | None:
    """Read-only checks of the workdir before anything is written; returns its stored config (resolved by
    this version) or None. Refuses a workdir that is a file, is not writable, or holds checkpoints of a
    different model (they would not fit)."""
    workdir = Path(cfg.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file, not a directory; choose another workdir=...")
    existing = next((p for p in (workdir, *workdir.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} cannot be created or written ({existing} is not writable); choose "
                          "another workdir=...")
    path = workdir / "config.yaml"
    if not path.exists():
        return None
    old = yaml.safe_load(path.read_text()) or {}
    try:  # the stored config resolved by this version (sections added since then take their defaults)
        old = configlib.to_dict(configlib.from_dict(type(cfg), old))
    except configlib.ConfigError:
        pass  # compared as stored
    has_ckpt = any(cfg.checkpoint.path(workdir).glob("[0-9]*"))
    if has_ckpt and old.get("model") != configlib.to_dict(cfg.model):
        raise ConfigError(f"{workdir} holds checkpoints of a different model config; resume with the "
                          f"original model settings (see {path}) or choose a new workdir")
    old_steps = (old.get("train") or {}).get("steps")
    if has_ckpt and old_steps is not None and old_steps != cfg.train.steps:
        log.warning("train.steps changed from %s to %d: the learning-rate schedule is recomputed for %d steps, "
                    "so the resumed run continues on a stretched (or shortened) decay; to continue after a "
                    "finished schedule use stages (docs/training.md)", old_steps, cfg.train.steps, cfg.train.steps)
    return old


def prepare_workdir(cfg: Config, old: dict[str, Any] | None = None) -> Path:
    """Creates the workdir and writes `config.yaml` (after `check_workdir`, whose result is `old`); a
    differing earlier config is kept as config.prev-N.yaml, never lost."""
    workdir = Path(cfg.workdir)
    if old is None:
        old = check_workdir(cfg)
    new = configlib.to_dict(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:  # every process has read config.yaml before process 0 replaces it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("lmtrain_prepare_workdir")
    if jax.process_index() == 0:
        path = workdir / "config.yaml"
        moved_only = old is not None and {**old, "workdir": new["workdir"]} == new  # a moved run dir
        if old is not None and old != new and not moved_only:
            n = 1
            while (workdir / f"config.prev-{n}.yaml").exists():
                n += 1
            path.rename(workdir / f"config.prev-{n}.yaml")
            log.warning("config differs from the one in %s; previous kept as config.prev-%d.yaml", workdir, n)
        save_config(cfg, path)
    return workdir


def state_fields(state: TrainState) -> dict[str, list[str]]:
    """Checkpoint metadata naming the optional parts of the train state it holds (its layout)."""
    return {"state_fields": [name for name in ("carry", "stats") if getattr(state, name) is not None]}


def restore_train_state(ckpt: Checkpointer, trainer: Trainer, step: int | None = None
                        ) -> tuple[int, TrainState, Any] | None:
    """`Checkpointer.restore_latest` (or the given `step`) onto the trainer's state, each step read with
    its own layout.

    A checkpoint holding a carried state / state statistics the config no longer uses restores without
    them; one written before the config added them (an intervention switched on at resume) restores
    the rest, and they start fresh.
    """
    def target(step: int) -> TrainState:
        fields = ckpt.metadata(step).get("state_fields", [])
        return trainer.restore_target("carry" in fields, "stats" in fields)

    restored = ckpt.restore_latest(target) if step is None else ckpt.restore_step(step, target)
    if restored is None:
        return None
    step, state, data_state = restored
    names = ("carry", "stats")
    parts = {n: getattr(state, n) if on else None for n, on in zip(names, trainer.extras_configured)}
    missing = [n for n, on in zip(names, trainer.extras_configured) if on and parts[n] is None]
    if missing:
        log.warning("checkpoint of step %d has no %s (written before the interventions that need it were "
                    "configured); starting it fresh", step, " / ".join(missing))
        fresh = dict(zip(names, trainer.fresh_extras()))
        parts.update({n: fresh[n] for n in missing})
    return step, state._replace(**parts), data_state


def batch_axes_size(trainer: Trainer) -> int:
    """Number of data-parallel shards of the batch (mesh axes the `batch` rule maps to)."""
    spec = trainer.batch_sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(trainer.mesh.shape[a] for a in axes)


class HeldOut:
    """The held-out batches of a run: read at the first evaluation, kept on the host, reused after."""

    def __init__(self, trainer: Trainer, cfg: Config):
        self.trainer, self.cfg = trainer, cfg
        self._batches: list[dict[str, np.ndarray]] | None = None

    def batches(self) -> list[dict[str, np.ndarray]]:
        """This process's `cfg.eval.batches` local batches (built once)."""
        if self._batches is None:
            index, count = data_shard(self.trainer.batch_sharding, self.cfg.data.global_batch_size)
            self._batches = list(make_eval_iterator(self.cfg.data, process_index=index, process_count=count,
                                                    num_batches=self.cfg.eval.batches))
        return self._batches

    def evaluate(self, params: Any) -> dict[str, float]:
        """Mean loss and perplexity of `params` over the held-out batches."""
        trainer, outs = self.trainer, []
        for batch in self.batches():
            outs.append(trainer.eval_step(params, to_global_batch(batch, trainer.mesh, trainer.batch_sharding)))
            if len(outs) > 1:  # the previous batch's result, read while this one computes
                outs[-2] = jax.device_get(outs[-2])
        nll, tokens = (sum((float(out[k]) for out in outs), 0.0) for k in ("nll_sum", "tokens"))
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


@dataclasses.dataclass
class _Step:
    """A dispatched train step whose metrics may not have been read yet."""

    step: int
    metrics: dict[str, Any]  # device arrays: outputs of the step, never donated to the next one
    shape: tuple[int, int]  # batch rows, length
    data_state: Any  # the data iterator's state after this step's batch
    t0: float  # when it was dispatched


class _Reader:
    """Reads train steps' metrics one step late: the non-finite check, and the logged records with their
    tokens/s and MFU window (steps read since the last record, or the compiling first step alone)."""

    def __init__(self, cfg: Config, writer: MetricsWriter, num_devices: int, skipped: int):
        self.cfg, self.writer, self.num_devices = cfg, writer, num_devices
        self.peak = device_peak_flops(override=cfg.log.peak_flops)
        self.skipped = skipped  # consecutive non-finite steps, as the train state counts them
        self.pending: _Step | None = None
        self.compile_s: float | None = None
        self.run_tokens, self.run_t0, self.paused = 0.0, 0.0, 0.0  # for the run-average tokens/s
        self.record: dict[str, Any] | None = None
        self.reset_window()

    def average_tokens_per_sec(self) -> float | None:
        """Tokens/s over this session's steps after the compiling one, evaluations excluded."""
        elapsed = time.perf_counter() - self.run_t0 - self.paused
        return self.run_tokens / elapsed if self.run_tokens and elapsed > 0 else None

    def reset_window(self) -> None:
        self.t0, self.steps, self.tokens, self.flops = time.perf_counter(), 0, 0.0, 0.0

    def push(self, step: _Step) -> None:
        """Reads the pending step, then holds `step` (the first, compiling step is read at once)."""
        self.flush()
        self.pending = step
        if self.compile_s is None:
            self.flush()

    def flush(self) -> None:
        """Reads the pending step, if any."""
        if self.pending is not None:
            step, self.pending = self.pending, None
            self._read(step)

    def _read(self, s: _Step) -> None:
        finite = bool(s.metrics["finite"])  # waits for step s only; the next step is queued behind it
        rows, length = s.shape
        tokens, flops = rows * length, train_flops_per_token(self.cfg.model, length) * rows * length
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - s.t0
            self.reset_window()
            self.run_t0 = self.t0
        else:
            self.steps, self.tokens, self.flops = self.steps + 1, self.tokens + tokens, self.flops + flops
            self.run_tokens += tokens
        # The train state's count (`jnp.where(finite, 0, skipped + 1)`), kept here: that state is donated.
        self.skipped = 0 if finite else self.skipped + 1
        if self.skipped:
            _on_nonfinite(s.step, self.skipped, s.metrics, self.cfg)
        if self.writer.should_log(s.step):
            if self.steps:
                elapsed, steps, tokens, flops = time.perf_counter() - self.t0, self.steps, self.tokens, self.flops
            else:  # only the compiling step so far
                elapsed, steps = self.compile_s, 1
            values = jax.device_get({k: v for k, v in s.metrics.items() if k != "group_norms"})
            record = {k: float(v) for k, v in values.items()}
            record.update(tokens_per_sec=tokens / elapsed, step_time_s=elapsed / steps, seq_len=length,
                          rows=rows, mfu=mfu(flops, elapsed, self.num_devices, self.peak),
                          **{f"data/{k}": v for k, v in data_stats(s.data_state).items()})
            self.record = self.writer.write(s.step, record)
            self.reset_window()


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the training run described by `cfg`; returns a summary dict.

    Every check (workdir, mesh, tokenizer, runtime sizes, data sources) runs before anything is written:
    a refused start leaves an existing run directory untouched."""
    old = check_workdir(cfg)
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    check_runtime(cfg, mesh.devices.size, batch_axes_size(trainer), load_tokenizer(cfg.data.tokenizer).vocab_size,
                  jax.process_count())
    index, count = data_shard(trainer.batch_sharding, cfg.data.global_batch_size)  # the rows this process holds
    data = make_train_iterator(cfg.data, stages=cfg.stages, stream_from=tbptt_start(cfg.train.interventions),
                               process_index=index, process_count=count)
    workdir = prepare_workdir(cfg, old)
    log.info("mesh %s; %s parameters", describe_mesh(mesh), f"{count_params(cfg.model):,}")
    ckpt = Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint)
    restored = restore_train_state(ckpt, trainer)
    if restored is None:
        step, state = 0, trainer.init_state()
    else:
        step, state, data_state = restored
        if data_state is not None:  # None: written by another process count (see Checkpointer)
            data.set_state(data_state)
        log.info("resumed from step %d", step)
    writer = MetricsWriter(workdir, cfg.log, cfg.train.steps, start_step=step)
    reader = _Reader(cfg, writer, mesh.devices.size, skipped=int(state.skipped))
    heldout = HeldOut(trainer, cfg)
    next_batch = lambda: to_global_batch(next(data), mesh, trainer.batch_sharding)
    summary: dict[str, Any] = {"start_step": step, "preempted": False}
    start = time.perf_counter()
    try:
        with PreemptionGuard() as guard:
            batch = next_batch() if step < cfg.train.steps else None
            while step < cfg.train.steps:
                t0 = time.perf_counter()
                state, metrics = trainer.train_step(state, batch)  # dispatched: the device runs it from here
                step, last = step + 1, step + 1 == cfg.train.steps
                done = _Step(step, metrics, batch["inputs"].shape, data.get_state(), t0)
                reader.push(done)  # reads step - 1 while this step runs
                if not last:
                    batch = next_batch()  # prepared while the device computes
                if last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0):
                    reader.flush()
                    t_eval = time.perf_counter()
                    summary["eval"] = writer.write(step, {f"eval/{k}": v for k, v in
                                                          heldout.evaluate(state.params).items()})
                    reader.paused += time.perf_counter() - t_eval
                    reader.reset_window()
                if ckpt.should_save(step, force=last):
                    reader.flush()
                    ckpt.maybe_save(step, state, done.data_state, force=True, metadata=state_fields(state))
                if guard.should_stop():
                    reader.flush()
                    log.warning("preempted at step %d: saving a checkpoint and stopping", step)
                    ckpt.maybe_save(step, state, done.data_state, force=True, metadata=state_fields(state))
                    summary["preempted"] = True
                    break
            reader.flush()
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    if reader.record is not None:
        summary["train"] = reader.record
    if summary["start_step"] >= cfg.train.steps:  # nothing to do: report the run's own last records
        summary["complete"] = True
        summary.update(last_records(workdir / "metrics.jsonl"))
    summary.update(step=step, seconds=time.perf_counter() - start, compile_seconds=reader.compile_s,
                   tokens_per_sec=reader.average_tokens_per_sec())
    summary["state"] = state
    return summary


def last_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last training record ("train") and evaluation record ("eval") of a metrics.jsonl."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out["train"] = record
            if "eval/loss" in record:
                out["eval"] = record
    return out


def _on_nonfinite(step: int, skipped: int, metrics: dict, cfg: Config) -> None:
    groups = nonfinite_groups({k: float(v) for k, v in jax.device_get(metrics["group_norms"]).items()})
    where = f"parameter group(s) {', '.join(groups)}" if groups else "the loss"
    log.warning("step %d: non-finite loss or gradients in %s; update skipped (%d in a row)", step, where, skipped)
    if skipped > cfg.train.max_skipped_steps:
        raise TrainingDiverged(
            f"{skipped} consecutive non-finite steps (limit train.max_skipped_steps={cfg.train.max_skipped_steps}); "
            f"last at step {step}, non-finite gradients in {where}. Lower optimizer.lr, raise "
            f"schedule.warmup_steps, or check the data; the last good checkpoint is in "
            f"{cfg.checkpoint.path(cfg.workdir)}")


__all__ = ["HeldOut", "TrainState", "TrainingDiverged", "batch_axes_size", "check_workdir", "last_records",
           "prepare_workdir", "restore_train_state", "train"]
