"""Fixtures: tiny run directories (config.yaml + checkpoints of freshly initialised parameters).

Nothing is trained: evaluation plumbing only needs a model with the run's shapes, and making a run
this way takes seconds where `lmtrain train` would spend most of a minute compiling a train step.
"""

from collections.abc import Callable
from pathlib import Path

import jax
import pytest

from lmtrain.config import load_config
from lmtrain.run import prepare_workdir, state_fields
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.mesh import make_mesh
from lmtrain.train.step import Trainer, TrainState

CONFIG = Path(__file__).parents[2] / "configs" / "demo.yaml"
TINY = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "model.rglru.width=32",
        "data.seq_len=32", "data.global_batch_size=4", "train.steps=2", "schedule.warmup_steps=1",
        "checkpoint.async_save=false", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


def make_run(workdir: Path, overrides=(), steps=(2,), edit: Callable[[TrainState], TrainState] | None = None) -> Path:
    """Writes WORKDIR/config.yaml and a checkpoint of the initial parameters (changed by `edit`) at each of
    `steps`."""
    cfg = load_config(CONFIG, [*TINY, *overrides, f"workdir={workdir}"])
    prepare_workdir(cfg)
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.init_state()
    state = edit(state) if edit else state
    with Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint) as ckpt:
        for step in steps:
            ckpt.maybe_save(step, state, {}, force=True, metadata=state_fields(state))
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A Griffin-pattern run "trained" at T=32 (window 16), checkpoints at steps 1 and 2. Four layers:
    a scanned RRA group plus an R tail, so recurrent layers sit both in a stacked group and the tail."""
    return make_run(tmp_path_factory.mktemp("runs") / "griffin", ["model.num_layers=4"], steps=(1, 2))


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
    """A run with EMA parameters that differ from the parameters, checkpoints at steps 1 and 2."""
    edit = lambda state: state._replace(ema=jax.tree.map(lambda x: 0.5 * x + 1.0, state.params))
    return make_run(tmp_path_factory.mktemp("runs") / "ema", ["optimizer.ema_decay=0.9"], steps=(1, 2), edit=edit)


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    """The tiny run's model, loaded from its latest checkpoint."""
    from lmtrain.eval.load import load_run

    return load_run(tiny_run)[1]
