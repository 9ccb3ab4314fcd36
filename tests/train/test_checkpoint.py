"""Checkpointer: round trip, retention, save cadence, corruption fallback, preemption, other meshes."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import configlib
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.checkpoint import CheckpointConfig, Checkpointer, PreemptionGuard, abstract_like
from lmtrain.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer


def train_state(step: int):
    params = {"embed": {"embedding": jnp.arange(12.0).reshape(4, 3) + step},
              "mlp": {"kernel": jnp.ones((3, 3)) * step, "bias": jnp.zeros(3)}}
    tx = make_optimizer(OptimizerConfig(), ScheduleConfig(kind="constant", warmup_steps=0), 100)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(step),
            "rng": jax.random.key(step)}


def assert_trees_equal(a, b):
    a = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, a)
    b = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def config(**kw) -> CheckpointConfig:
    kw = {"every_steps": 1, "every_minutes": 0.0, "keep": 0, "async_save": False, **kw}
    return configlib.from_dict(CheckpointConfig, kw)


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip(tmp_path, async_save):
    state = train_state(7)
    data_state = {"epoch": 1, "position": 12345, "shards": ["a", "b"]}
    with Checkpointer(tmp_path, config(async_save=async_save)) as ck:
        assert ck.maybe_save(7, state, data_state, metadata={"loss": 2.5})
        ck.wait()
        assert ck.metadata(7)["loss"] == 2.5 and ck.metadata()["step"] == 7
    with Checkpointer(tmp_path, config()) as ck:
        step, restored, restored_data = ck.restore_latest(abstract_like(train_state(0)))
    assert step == 7 and restored_data == data_state
    assert_trees_equal(restored, state)


def test_bytes_data_state_and_empty_dir(tmp_path):
    with Checkpointer(tmp_path, config()) as ck:
        assert ck.restore_latest(train_state(0)) is None
        ck.maybe_save(3, train_state(3), b'{"next_index": 9}')
        assert ck.restore_latest(train_state(0))[2] == b'{"next_index": 9}'


def test_keep_last_k(tmp_path):
    with Checkpointer(tmp_path, config(keep=2)) as ck:
        for step in range(1, 6):
            ck.maybe_save(step, train_state(step), {})
    assert saved_steps(tmp_path) == [4, 5]


def test_keep_period_is_permanent(tmp_path):
    with Checkpointer(tmp_path, config(keep=1, keep_period=2)) as ck:
        for step in range(1, 6):
            ck.maybe_save(step, train_state(step), {})
    assert saved_steps(tmp_path) == [2, 4, 5]


def test_every_steps_force_and_no_duplicates(tmp_path):
    with Checkpointer(tmp_path, config(every_steps=3)) as ck:
        saved = [step for step in range(0, 8) if ck.maybe_save(step, train_state(step), {})]
        assert saved == [3, 6]
        assert ck.maybe_save(7, train_state(7), {}, force=True)
        assert not ck.maybe_save(7, train_state(7), {}, force=True)  # already saved
    assert saved_steps(tmp_path) == [3, 6, 7]


def test_every_minutes(tmp_path):
    with Checkpointer(tmp_path, config(every_steps=0, every_minutes=5.0)) as ck:
        assert not ck.maybe_save(1, train_state(1), {})
        ck._last_save_time -= 5 * 60  # pretend five minutes passed
        assert ck.maybe_save(2, train_state(2), {})
        assert not ck.maybe_save(3, train_state(3), {})


def corrupt(step_dir: Path) -> list[Path]:
    """Truncates the array data files of a saved step; returns the files."""
    files = sorted((step_dir / "state" / "d").iterdir())
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(5)
    return files


# A failed tensorstore read can leave a callback for orbax's closed event loop ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_falls_back_and_moves_aside(tmp_path, caplog):
    with Checkpointer(tmp_path, config()) as ck:
        ck.maybe_save(1, train_state(1), {"pos": 1})
        ck.maybe_save(2, train_state(2), {"pos": 2})
    files = corrupt(tmp_path / "2")
    unfinished = tmp_path / "3.orbax-checkpoint-tmp-1234"  # what a crash during a save leaves
    unfinished.mkdir()
    with Checkpointer(tmp_path, config()) as ck, caplog.at_level(logging.WARNING):
        step, state, data_state = ck.restore_latest(abstract_like(train_state(0)))
        assert (step, data_state) == (1, {"pos": 1})
        assert_trees_equal(state, train_state(1))
        assert "step 2" in caplog.text and "does not restore" in caplog.text
        # Nothing deleted: the bad checkpoint and the unfinished save are kept, moved aside.
        moved = tmp_path / "corrupt-2"
        assert sorted(p.name for p in (moved / "state" / "d").iterdir()) == [f.name for f in files]
        assert (tmp_path / "corrupt-3.orbax-checkpoint-tmp-1234").is_dir()
        assert saved_steps(tmp_path) == [1]
        # Training resumes and writes step 2 again.
        assert ck.maybe_save(2, train_state(2), {"pos": 2})
    assert saved_steps(tmp_path) == [1, 2]


def test_nothing_restores_raises_and_moves_nothing(tmp_path):
    with Checkpointer(tmp_path, config()) as ck:
        ck.maybe_save(1, train_state(1), {})
        ck.maybe_save(2, train_state(2), {})
    wrong_target = {"params": {"other": jax.ShapeDtypeStruct((5,), jnp.float32)}}
    with Checkpointer(tmp_path, config()) as ck:
        with pytest.raises(ckpt_lib.CheckpointRestoreError, match="nothing was moved"):
            ck.restore_latest(wrong_target)
    assert saved_steps(tmp_path) == [1, 2] and not list(tmp_path.glob("corrupt-*"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_restore_params_reads_one_entry(tmp_path):
    """The parameters alone, from a given step or the newest that restores (moving a corrupt one aside)."""
    with Checkpointer(tmp_path, config()) as ck:
        for step in (1, 2, 3):
            ck.maybe_save(step, train_state(step), {})
    corrupt(tmp_path / "3")
    target = abstract_like(train_state(0)["params"])
    with Checkpointer(tmp_path, config()) as ck:
        step, params = ck.restore_params(target, 1)
        assert step == 1
        assert_trees_equal(params, train_state(1)["params"])
        step, params = ck.restore_params(target)
        assert step == 2 and saved_steps(tmp_path) == [1, 2] and (tmp_path / "corrupt-3").is_dir()
        assert_trees_equal(params, train_state(2)["params"])
        other = {"embed": target["embed"]}  # not the saved structure: refused, not partly filled in
        for key, tree in (("ema", target), ("params", other)):
            with pytest.raises(ckpt_lib.CheckpointRestoreError, match="nothing was moved"):
                ck.restore_params(tree, key=key)
    assert saved_steps(tmp_path) == [1, 2]


def test_guard_restores_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from lmtrain.train.checkpoint import CheckpointConfig, Checkpointer, PreemptionGuard

    cfg = CheckpointConfig(every_steps=1000, every_minutes=0, async_save=True)
    with Checkpointer(sys.argv[1], cfg) as ck, PreemptionGuard() as guard:
        for step in range(1, 1000):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the scheduler preempts us
            time.sleep(0.01)
            if guard.requested:
                ck.maybe_save(step, {"w": jnp.full((3,), float(step))}, {"step": step}, force=True)
                print(f"saved step {step} after SIGTERM", flush=True)
                break
    sys.exit(0)
""")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert "saved step 5 after SIGTERM" in out.stdout
    with Checkpointer(tmp_path, config()) as ck:
        step, state, data_state = ck.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 5 and data_state == {"step": 5}
    np.testing.assert_array_equal(state["w"], [5.0, 5.0, 5.0])


SAVE_ON_EIGHT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lmtrain import configlib
    from lmtrain.train import mesh as mesh_lib
    from lmtrain.train.checkpoint import CheckpointConfig, Checkpointer, abstract_like

    def on(mesh, spec):
        return NamedSharding(mesh, spec)

    mesh_a = mesh_lib.make_mesh(configlib.from_dict(mesh_lib.MeshConfig, {"fsdp": 8}))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), on(mesh_a, P("fsdp", None)))
    cfg = CheckpointConfig(every_steps=1, every_minutes=0, async_save=False)
    with Checkpointer(sys.argv[1], cfg) as ck:
        ck.maybe_save(1, {"w": w}, {})
        # A different mesh in the same process: tensor=2 x fsdp=4, sharded along the other dim.
        mesh_b = mesh_lib.make_mesh(configlib.from_dict(mesh_lib.MeshConfig, {"fsdp": 4, "tensor": 2}))
        target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=on(mesh_b, P("tensor", "fsdp")))}
        _, state, _ = ck.restore_latest(target)
    assert state["w"].sharding.spec == P("tensor", "fsdp"), state["w"].sharding
    assert state["w"].sharding.shard_shape((8, 8)) == (4, 2)
    assert (state["w"] == jnp.arange(64.0).reshape(8, 8)).all()
    print("ok")
""")


def test_restore_onto_a_different_mesh(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run([sys.executable, "-c", SAVE_ON_EIGHT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
    # ...and onto this process's single device.
    with Checkpointer(tmp_path, config()) as ck:
        step, state, _ = ck.restore_latest({"w": jax.ShapeDtypeStruct(
            (8, 8), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))})
    assert step == 1 and len(state["w"].sharding.device_set) == 1
    np.testing.assert_array_equal(state["w"], np.arange(64.0).reshape(8, 8))


def test_config_path_and_validation(tmp_path):
    assert CheckpointConfig().path(tmp_path) == tmp_path / "checkpoints"
    assert CheckpointConfig(dir="/abs/ckpt").path(tmp_path) == Path("/abs/ckpt")
    with pytest.raises(configlib.ConfigError, match="keep=-1 must be >= 0"):
        configlib.from_dict(CheckpointConfig, {"keep": -1})
    assert json.loads(json.dumps(configlib.to_dict(CheckpointConfig())))["every_steps"] == 1000


def test_first_ctrl_c_requests_a_save_second_aborts():
    import os
    import signal
    import time

    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs on the main thread between bytecodes
        assert guard.requested and guard.signal_received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
