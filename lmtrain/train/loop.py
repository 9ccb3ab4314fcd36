"""The training loop: workdir, mesh, data, resume, steps, evaluation, logging, checkpoints.

    summary = train(load_config("configs/demo.yaml", ["train.steps=100"]))

A run restarted with the same workdir resumes from its latest good checkpoint (parameters,
optimizer, step, RNG, data-iterator position), so the resumed loss curve equals the uninterrupted
one. SIGTERM saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import jax

from lmtrain import configlib
from lmtrain.config import Config, ConfigError, check_runtime, save_config
from lmtrain.data.pipeline import data_stats, make_eval_iterator, make_train_iterator, to_global_batch
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.models.flops import count_params, train_flops_per_token
from lmtrain.train.checkpoint import Checkpointer, PreemptionGuard
from lmtrain.train.distributed import data_shard
from lmtrain.train.interventions import tbptt_start
from lmtrain.train.mesh import describe_mesh, make_mesh
from lmtrain.train.metrics import MetricsWriter, device_peak_flops, mfu
from lmtrain.train.optimizer import nonfinite_groups
from lmtrain.train.step import Trainer, TrainState

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


def prepare_workdir(cfg: Config) -> Path:
    """Creates the workdir and writes `config.yaml`; a differing earlier config is kept, never lost.

    Resuming with a different model section is refused (the checkpoints would not fit).
    """
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, old, new = workdir / "config.yaml", None, configlib.to_dict(cfg)
    if path.exists():
        import yaml
        old = yaml.safe_load(path.read_text()) or {}
        has_ckpt = any(cfg.checkpoint.path(workdir).glob("[0-9]*"))
        if has_ckpt and old.get("model") != new["model"]:
            raise ConfigError(f"{workdir} holds checkpoints of a different model config; resume with the "
                              f"original model settings (see {path}) or choose a new workdir")
    if jax.process_count() > 1:  # every process has read config.yaml before process 0 replaces it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("lmtrain_prepare_workdir")
    if jax.process_index() == 0:
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


def evaluate(trainer: Trainer, params: Any, cfg: Config) -> dict[str, float]:
    """Mean loss and perplexity over `cfg.eval.batches` held-out batches."""
    nll, tokens = 0.0, 0.0
    index, count = data_shard(trainer.batch_sharding, cfg.data.global_batch_size)
    batches = make_eval_iterator(cfg.data, process_index=index, process_count=count, num_batches=cfg.eval.batches)
    for batch in batches:
        out = trainer.eval_step(params, to_global_batch(batch, trainer.mesh, trainer.batch_sharding))
        nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the training run described by `cfg`; returns a summary dict."""
    workdir = prepare_workdir(cfg)
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    check_runtime(cfg, mesh.devices.size, batch_axes_size(trainer), load_tokenizer(cfg.data.tokenizer).vocab_size)
    log.info("mesh %s; %s parameters", describe_mesh(mesh), f"{count_params(cfg.model):,}")
    index, count = data_shard(trainer.batch_sharding, cfg.data.global_batch_size)  # the rows this process holds
    data = make_train_iterator(cfg.data, stages=cfg.stages, stream_from=tbptt_start(cfg.train.interventions),
                               process_index=index, process_count=count)
    ckpt = Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint)
    restored = restore_train_state(ckpt, trainer)
    if restored is None:
        step, state = 0, trainer.init_state()
    else:
        step, state, data_state = restored
        if data_state is not None:  # None: written by another process count (see Checkpointer)
            data.set_state(data_state)
        log.info("resumed from step %d", step)
    peak = device_peak_flops(override=cfg.log.peak_flops)
    writer = MetricsWriter(workdir, cfg.log, cfg.train.steps, start_step=step)
    summary: dict[str, Any] = {"start_step": step, "preempted": False}
    start, window_t0, window_steps, compile_s = time.perf_counter(), time.perf_counter(), 0, None
    window_tokens = window_flops = 0.0  # the curriculum may change the batch shape from step to step
    try:
        with PreemptionGuard() as guard:
            while step < cfg.train.steps:
                batch = to_global_batch(next(data), mesh, trainer.batch_sharding)
                t0 = time.perf_counter()
                state, metrics = trainer.train_step(state, batch)
                step += 1
                skipped = int(state.skipped)  # one scalar per step: the non-finite check
                rows, length = batch["inputs"].shape
                if compile_s is None:
                    compile_s, window_t0 = time.perf_counter() - t0, time.perf_counter()
                else:
                    window_steps += 1
                    window_tokens += rows * length
                    window_flops += train_flops_per_token(cfg.model, length) * rows * length
                if skipped:
                    _on_nonfinite(step, skipped, metrics, cfg)
                if writer.should_log(step):
                    elapsed = time.perf_counter() - window_t0 if window_steps else compile_s
                    if not window_steps:  # only the compiling step so far
                        window_tokens = rows * length
                        window_flops = train_flops_per_token(cfg.model, length) * rows * length
                    record = {k: float(v) for k, v in metrics.items() if k != "group_norms"}
                    record.update(tokens_per_sec=window_tokens / elapsed, step_time_s=elapsed / max(window_steps, 1),
                                  seq_len=length, rows=rows,
                                  mfu=mfu(window_flops, elapsed, mesh.devices.size, peak),
                                  **{f"data/{k}": v for k, v in data_stats(data.get_state()).items()})
                    summary["train"] = writer.write(step, record)
                    window_t0, window_steps, window_tokens, window_flops = time.perf_counter(), 0, 0.0, 0.0
                if step == cfg.train.steps or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0):
                    summary["eval"] = writer.write(step, {f"eval/{k}": v for k, v in
                                                          evaluate(trainer, state.params, cfg).items()})
                    window_t0 = time.perf_counter()
                ckpt.maybe_save(step, state, data.get_state(), force=step == cfg.train.steps,
                                metadata=state_fields(state))
                if guard.should_stop():
                    log.warning("preempted at step %d: saving a checkpoint and stopping", step)
                    ckpt.maybe_save(step, state, data.get_state(), force=True, metadata=state_fields(state))
                    summary["preempted"] = True
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    summary.update(step=step, seconds=time.perf_counter() - start, compile_seconds=compile_s)
    summary["state"] = state
    return summary


def _on_nonfinite(step: int, skipped: int, metrics: dict, cfg: Config) -> None:
    groups = nonfinite_groups({k: float(v) for k, v in metrics["group_norms"].items()})
    where = f"parameter group(s) {', '.join(groups)}" if groups else "the loss"
    log.warning("step %d: non-finite loss or gradients in %s; update skipped (%d in a row)", step, where, skipped)
    if skipped > cfg.train.max_skipped_steps:
        raise TrainingDiverged(
            f"{skipped} consecutive non-finite steps (limit train.max_skipped_steps={cfg.train.max_skipped_steps}); "
            f"last at step {step}, non-finite gradients in {where}. Lower optimizer.lr, raise "
            f"schedule.warmup_steps, or check the data; the last good checkpoint is in "
            f"{cfg.checkpoint.path(cfg.workdir)}")


__all__ = ["TrainState", "TrainingDiverged", "evaluate", "prepare_workdir", "train"]

