"""Checkpoints: orbax `CheckpointManager` with the train state, the data-iterator state and metadata.

Each step directory `<dir>/<step>/` holds three items:
- `state`: the train-state pytree of arrays (params, optimizer state, step, rng), restored onto the
  shardings of an abstract target, so a checkpoint written on one mesh restores onto another;
- `data`: the data-iterator state as JSON (a JSON value, or bytes holding JSON as grain's
  `DataLoader` iterator returns), one file per process (`process_<i>-of-<n>.json`): each process
  reads its own shard of the data, so each has its own iterator state;
- `meta`: free-form JSON metadata (step, wall time, whatever the caller adds).

`restore_params` reads one entry of `state` alone (the parameters or their EMA, for evaluation),
never the optimizer state.

A checkpoint that cannot be restored (a missing or truncated file) or was never finalized (an orbax
`*.orbax-checkpoint-tmp*` directory left by a crash) is never deleted: `restore_latest` falls back
to the newest checkpoint that restores, and moves every newer unusable directory aside to
`<dir>/corrupt-<name>`, logging a warning that names it. If no checkpoint restores, it raises and
moves nothing (that is a config/code mismatch, not corruption).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.errors import LmtrainError

log = logging.getLogger(__name__)

_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save, how many checkpoints to keep, and where."""

    dir: str = configlib.field("checkpoints", help="Checkpoint directory; relative paths are under the "
                                                   "run's workdir.")
    every_steps: int = configlib.field(1000, help="Save when step % every_steps == 0 (0: off).")
    every_minutes: float = configlib.field(30.0, help="Save when this many minutes have passed since the "
                                                      "last save (0: off).")
    keep: int = configlib.field(3, help="Keep the last K checkpoints (0: keep all).")
    keep_period: int = configlib.field(0, help="Also keep every checkpoint whose step is a multiple of "
                                               "this, permanently (0: off).")
    async_save: bool = configlib.field(True, help="Write checkpoints in a background thread; training "
                                                  "continues once arrays are copied to host.")

    def validate(self) -> None:
        for name in ("every_steps", "keep", "keep_period"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.every_minutes < 0:
            raise ConfigError(f"every_minutes={self.every_minutes} must be >= 0")

    def path(self, workdir: str | Path) -> Path:
        """The checkpoint directory for a run in `workdir`."""
        return Path(workdir) / self.dir


class CheckpointRestoreError(LmtrainError, RuntimeError):
    """No checkpoint in the directory could be restored onto the given target."""


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) for a tree of arrays, as a restore target."""
    def to_abstract(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(to_abstract, tree)


def _leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """The leaves' key paths, keys as strings (as orbax's metadata spells them); empty for None."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths}


def _encode_data_state(data_state: Any) -> dict[str, Any]:
    if isinstance(data_state, bytes):
        return {"format": "bytes", "value": data_state.decode("utf-8")}
    return {"format": "json", "value": data_state}


def _decode_data_state(stored: Mapping[str, Any]) -> Any:
    if stored.get("format") == "bytes":
        return stored["value"].encode("utf-8")
    return stored.get("value")


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _PerProcessJsonHandler(ocp.JsonCheckpointHandler):
    """orbax's JSON item, but every process writes its own `process_<i>-of-<n>.json` (as grain's
    handler does) instead of process 0 alone. Restoring with a different process count gives None."""

    async def _save_fn(self, x, directory):
        (directory / _process_file()).write_text(json.dumps(x))

    def restore(self, directory, item=None, args=None) -> Any:
        path = directory / _process_file()
        if path.exists():
            return json.loads(path.read_text())
        if not any(directory.glob("process_*-of-*.json")):
            raise FileNotFoundError(f"{path} not found")
        return None  # written by a different number of processes


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any = None


class Checkpointer:
    """Saves and restores `(step, train state, data-iterator state)` under `directory`."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        preserve: list[Any] = [policies.LatestN(cfg.keep or None)]
        if cfg.keep_period:
            preserve.append(policies.EveryNSteps(cfg.keep_period))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            cleanup_tmp_directories=False,  # unfinished saves are moved aside by restore_latest instead
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_save_time = time.monotonic()

    # --- saving ----------------------------------------------------------------------------------

    def should_save(self, step: int, force: bool = False) -> bool:
        """Whether `maybe_save(step)` would write: forced, every_steps, or every_minutes elapsed.

        Never for a step that is already saved, nor for step 0 unless forced. With several
        processes, the time-based decision is taken on process 0 and broadcast.
        """
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        if force:
            return True
        if step == 0:
            return False
        due = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        if self.cfg.every_minutes > 0 and not due:
            elapsed_min = (time.monotonic() - self._last_save_time) / 60.0
            due = elapsed_min >= self.cfg.every_minutes
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def maybe_save(self, step: int, state: Any, data_state: Any, force: bool = False,
                   metadata: Mapping[str, Any] | None = None) -> bool:
        """Saves `state` (arrays), `data_state` (JSON) and `metadata` (JSON) if `should_save`.

        Returns whether a save was started (asynchronous saves finish in the background; call
        `wait()` before reading the files).
        """
        if not self.should_save(step, force):
            return False
        meta = {"step": int(step), "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
                **(metadata or {})}
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=_DataSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        ))
        self._last_save_time = time.monotonic()
        log.info("checkpoint: saving step %d to %s%s", step, self.directory,
                 " (async)" if self.cfg.async_save else "")
        return True

    # --- restoring -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
        """`(step, state, data_state)` from the newest checkpoint that restores, or None if there is none.

        `data_state` is None (with a warning) when the checkpoint was written by a different number
        of processes: the data shards differ, so the data iterator cannot continue where it was.

        `abstract_state` is the target: a tree of `jax.ShapeDtypeStruct`s carrying the shardings to
        restore onto (e.g. `jax.eval_shape` output with shardings attached, or `abstract_like(state)`),
        or a function of the step returning one.
        Unusable checkpoints newer than the one restored are moved aside (see the module docstring).
        """
        return self._latest(lambda step: self._restore(step, abstract_state))

    def restore_params(self, target: Any, step: int | None = None, *, key: str = "params"
                       ) -> tuple[int, Any] | None:
        """`(step, tree)`: the `key` entry of the saved state alone (a train state's "params" or "ema"),
        restored onto `target` (its structure, as `jax.ShapeDtypeStruct`s with shardings); nothing else of
        the state (the optimizer's) is read.

        From `step`, or else from the newest checkpoint that restores, as `restore_latest` (None if there
        is none).
        """
        read = lambda s: (s, self._restore_entry(s, key, target))
        return read(step) if step is not None else self._latest(read)

    def _latest(self, restore: Callable[[int], T]) -> T | None:
        """`restore(step)` of the newest step for which it succeeds (see `restore_latest`)."""
        self.wait()
        steps = self.all_steps()
        unfinished = self._unfinished_dirs()
        if not steps:
            if unfinished:
                log.warning("checkpoint: no finalized checkpoint in %s; ignoring unfinished %s",
                            self.directory, ", ".join(p.name for p in unfinished))
            return None
        failures: list[tuple[int, Exception]] = []
        for step in reversed(steps):
            try:
                restored = restore(step)
            except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one"
                log.warning("checkpoint: step %d in %s does not restore (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
                failures.append((step, e))
                continue
            bad = [self.directory / str(s) for s, _ in failures]
            bad += [p for p in unfinished if int(_TMP_STEP.match(p.name).group(1)) > step]
            self._move_aside(bad)
            log.info("checkpoint: restored step %d from %s", step, self.directory)
            return restored
        details = "; ".join(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            for s, e in failures)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} restores onto the given target ({details}). If the model "
            f"or optimizer config changed since they were written, restore with the original config or "
            f"start a new run directory; nothing was moved or deleted.") from failures[0][1]

    def restore_step(self, step: int, abstract_state: Any) -> tuple[int, Any, Any]:
        """`(step, state, data_state)` of the given step (see `restore_latest`); nothing is moved aside."""
        return self._restore(step, abstract_state)

    def _restore(self, step: int, abstract_state: Any) -> tuple[int, Any, Any]:
        if callable(abstract_state):  # a target per step (e.g. from the step's metadata)
            abstract_state = abstract_state(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(abstract_state)),
            data=_DataRestore(),
        ))
        if restored.data is None:
            log.warning("checkpoint: step %d was written by a different number of processes than %d; the "
                        "data iterator starts again from the beginning of this process's shard",
                        step, jax.process_count())
            return step, restored.state, None
        return step, restored.state, _decode_data_state(restored.data)

    def _restore_entry(self, step: int, key: str, target: Any) -> Any:
        path = self.directory / str(step) / "state"
        # A reader of its own: the manager's handler for `state` is StandardSave's, which restores it whole.
        with ocp.PyTreeCheckpointer() as reader:
            stored = reader.metadata(path).item_metadata.tree
            if not isinstance(stored, Mapping) or _leaf_paths(stored.get(key)) != _leaf_paths(target):
                raise ValueError(f"the state of step {step} has no {key!r} of the target's structure")
            item = {key: abstract_like(target)}
            restored = reader.restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        return restored[key]

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with `step` (default: the latest step)."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def _unfinished_dirs(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.iterdir() if _TMP_STEP.match(p.name))

    def _move_aside(self, paths: Sequence[Path]) -> None:
        if not paths:
            return
        if jax.process_index() == 0:
            for path in paths:
                target = self.directory / f"corrupt-{path.name}"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"corrupt-{path.name}.{n}"
                path.rename(target)
                log.warning("checkpoint: %s is unusable (corrupt or unfinished); moved it to %s",
                            path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("lmtrain_checkpoint_move_aside")
        self._manager.reload()

    # --- lifecycle -------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished and been finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """Within `with PreemptionGuard() as guard:`, SIGTERM and the first SIGINT (Ctrl-C) set
    `guard.requested` instead of killing the process, so the training loop can save a checkpoint and
    exit cleanly (multi-process loops ask `guard.should_stop()`, which every process answers alike); a
    second SIGINT aborts at once (KeyboardInterrupt). The previous handlers are restored on exit. Must
    be entered on the main thread (a Python signal-handling rule).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}

    def should_stop(self) -> bool:
        """Whether any process has received a signal. With several processes this is agreed on by
        all of them (one small collective), so they all stop and save at the same step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt("second interrupt: stopped without saving")
        if signum == signal.SIGINT:
            log.warning("interrupted: saving a checkpoint and stopping (Ctrl-C again aborts without saving)")
        self.requested = True
        self.signal_received = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread (signal handlers can "
                               "only be installed there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.requested:
            log.warning("preemption: received %s", signal.Signals(self.signal_received).name)
