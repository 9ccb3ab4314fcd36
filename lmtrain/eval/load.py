"""Load a trained run for evaluation: its config, a model holding its parameters, the step.

    cfg, model, step = load_run("runs/demo")            # latest checkpoint
    cfg, model, step = load_run("runs/demo", step=200)  # a given one

Only the parameters (or their EMA) are read, onto one device whatever mesh the run was trained on
(the optimizer state stays on disk): evaluation here is single-device and memory-bounded by
chunking, not by sharding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from lmtrain.config import Config, load_config
from lmtrain.models import LanguageModel
from lmtrain.train.checkpoint import Checkpointer


class RunError(FileNotFoundError):
    """A workdir cannot be evaluated (no config, no checkpoint); the message names the path and the fix."""


def _train_hint(workdir: Path) -> str:
    return f"create one with `lmtrain train CONFIG workdir={workdir}`"


def load_run_config(workdir: str | Path) -> Config:
    """The resolved config a run wrote to WORKDIR/config.yaml."""
    workdir = Path(workdir)
    path = workdir / "config.yaml"
    if not workdir.is_dir():
        raise RunError(f"run directory {workdir} does not exist; {_train_hint(workdir)}")
    if not path.is_file():
        raise RunError(f"{workdir} is not a training run: it has no config.yaml; {_train_hint(workdir)}")
    return load_config(path)


def checkpoint_steps(workdir: str | Path, cfg: Config) -> list[int]:
    """The finalized checkpoint steps of a run (oldest first); empty if there are none."""
    directory = cfg.checkpoint.path(workdir)
    if not directory.is_dir():
        return []
    ckpt = Checkpointer(directory, cfg.checkpoint)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def load_run(workdir: str | Path, step: int | None = None, *, ema: bool = False,
             ) -> tuple[Config, LanguageModel, int]:
    """`(cfg, model, step)` of the run in `workdir`, from its latest checkpoint or from `step`.

    With `ema=True` the model holds the exponential moving average of the parameters (the run
    must have been trained with `optimizer.ema_decay`).
    """
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    directory = cfg.checkpoint.path(workdir)
    steps = checkpoint_steps(workdir, cfg)
    if not steps:
        raise RunError(f"{workdir} has no checkpoint in {directory}; train the run first "
                       f"(`lmtrain train {workdir / 'config.yaml'} workdir={workdir}` resumes or starts it)")
    if step is not None and step not in steps:
        raise RunError(f"{directory} has no checkpoint of step {step}; it has steps "
                       f"{', '.join(map(str, steps))}")
    if ema and not cfg.optimizer.ema_decay:
        raise ValueError(f"{workdir} was trained without optimizer.ema_decay: it has no EMA parameters")
    graphdef, variables = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0))))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                          nnx.to_pure_dict(variables))
    # Restore only the chosen step: a checkpointer whose retention keeps everything, read-only use.
    keep_all = dataclasses.replace(cfg.checkpoint, keep=0, keep_period=0, async_save=False)
    ckpt = Checkpointer(directory, keep_all)
    try:
        restored = ckpt.restore_params(target, step, key="ema" if ema else "params")
        assert restored is not None  # steps is not empty
        step, params = restored
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(variables, params)
    return cfg, nnx.merge(graphdef, variables), int(step)


__all__ = ["RunError", "checkpoint_steps", "load_run", "load_run_config"]
