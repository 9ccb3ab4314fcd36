"""`load_run` reads the parameters (or the EMA) alone: the same arrays a full train-state restore gives,
falling back from a corrupt newest checkpoint as training does."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lmtrain.eval.load import load_run, load_run_config
from lmtrain.run import restore_train_state
from lmtrain.train.checkpoint import Checkpointer
from lmtrain.train.mesh import make_mesh
from lmtrain.train.step import Trainer


def assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def full_restore(workdir, step=None):
    """The train state as the loader used to get it: a whole `Trainer` state, optimizer included."""
    cfg = load_run_config(workdir)
    trainer = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    with Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint) as ckpt:
        return restore_train_state(ckpt, trainer, step)[1]


@pytest.mark.parametrize("ema", [False, True])
def test_load_run_equals_the_full_restore(ema_run, ema):
    state = full_restore(ema_run)
    cfg, model, step = load_run(ema_run, ema=ema)
    assert step == 2 and cfg.optimizer.ema_decay == 0.9
    assert_same(nnx.to_pure_dict(nnx.state(model)), state.ema if ema else state.params)
    params = jax.tree.leaves(nnx.state(model))
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in params)
    other = load_run(ema_run, ema=not ema)[1]
    assert not np.array_equal(np.asarray(jax.tree.leaves(nnx.state(other))[0]), np.asarray(params[0]))


# A failed tensorstore read can leave a callback for orbax's closed event loop ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_falls_back(ema_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(ema_run, workdir)
    for f in (workdir / "checkpoints" / "2" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:5])
    _, model, step = load_run(workdir, ema=True)
    assert step == 1 and (workdir / "checkpoints" / "corrupt-2").is_dir()
    assert_same(nnx.to_pure_dict(nnx.state(model)), full_restore(ema_run, 1).ema)
