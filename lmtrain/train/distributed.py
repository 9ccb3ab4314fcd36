"""Multi-process JAX: `initialize_from_env()` starts `jax.distributed` when the environment asks for it.

Called first thing by `lmtrain train` and `lmtrain check`, before anything touches a JAX backend.
Which case applies, first match wins (see docs/multihost.md):

1. Explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID` (0..N-1) all set -> `jax.distributed.initialize` with exactly those (JAX's own
   cluster detection is switched off). Setting only some of them is an error naming the missing ones.
   On CPU, cross-process collectives use gloo (unless `JAX_CPU_COLLECTIVES_IMPLEMENTATION` says
   otherwise).
2. SLURM: a job step (`srun`) with `SLURM_NTASKS` > 1 -> `jax.distributed.initialize()`; JAX reads
   the coordinator (first node of the step), process count and id from SLURM, and gives each process
   the GPU numbered by its `SLURM_LOCALID`.
3. Cloud TPU: a TPU VM whose slice (or multislice) has more than one host ->
   `jax.distributed.initialize()`; JAX reads the workers from the TPU metadata / GKE environment.
4. Otherwise a single process: nothing to do.

`JAX_LOCAL_DEVICE_IDS` (comma-separated) and `JAX_COORDINATOR_PORT` are read by JAX itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping

import jax

from lmtrain.configlib import ConfigError

log = logging.getLogger(__name__)

ADDRESS, NUM_PROCESSES, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
EXPLICIT_VARS = (ADDRESS, NUM_PROCESSES, PROCESS_ID)
# What JAX's SLURM detection needs; `srun` sets them all, a batch script alone lacks the step ones.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedEnvError(ConfigError):
    """The multi-process environment variables are incomplete or malformed."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process takes part in a run: `kind` is explicit | slurm | tpu | single."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int:
    text = environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise DistributedEnvError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise DistributedEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _explicit(environ: Mapping[str, str]) -> Launch:
    missing = [name for name in EXPLICIT_VARS if not environ.get(name, "").strip()]
    if missing:
        given = ", ".join(f"{n}={environ[n]}" for n in EXPLICIT_VARS if n not in missing)
        raise DistributedEnvError(
            f"multi-process environment is incomplete: {given} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. Set all of {', '.join(EXPLICIT_VARS)} (see "
            f"launch/local_multiprocess.sh), or none of them for a single process or JAX's SLURM/TPU "
            f"auto-detection")
    address = environ[ADDRESS].strip()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedEnvError(f"{ADDRESS}={address!r} must be host:port of process 0, e.g. 10.0.0.1:1234")
    count, index = _int_var(environ, NUM_PROCESSES, 1), _int_var(environ, PROCESS_ID, 0)
    if index >= count:
        raise DistributedEnvError(f"{PROCESS_ID}={index} must be < {NUM_PROCESSES}={count}")
    return Launch("explicit", address, count, index)


def _tpu_host_count() -> int:
    """Hosts in this Cloud TPU slice (times slices); 0 when not on a Cloud TPU VM.

    Uses JAX's own TPU cluster detection (private API; jax is pinned to 0.10.x), which reads the GKE
    environment or the GCE metadata server.
    """
    from jax._src import cloud_tpu_init
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return 0
    from jax._src.clusters import cloud_tpu_cluster as tpu
    for cluster in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
        if cluster.is_env_present():
            return len(cluster._get_worker_list_in_slice()) * cluster._get_num_slices()
    return 1


def detect(environ: Mapping[str, str] | None = None,
           tpu_host_count: Callable[[], int] = _tpu_host_count) -> Launch:
    """Which launch this is (see the module docstring); raises `DistributedEnvError` on partial env."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name, "").strip() for name in EXPLICIT_VARS):
        return _explicit(environ)
    if "SLURM_NTASKS" in environ and _int_var(environ, "SLURM_NTASKS", 1) > 1:
        if all(name in environ for name in SLURM_VARS):
            return Launch("slurm")
        log.warning("SLURM_NTASKS=%s but this is not a job step (no %s): running as a single process; "
                    "start lmtrain with srun to use every task", environ["SLURM_NTASKS"],
                    ", ".join(n for n in SLURM_VARS if n not in environ))
    if tpu_host_count() > 1:
        return Launch("tpu")
    return Launch("single")


def data_shard(batch_sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """`(index, count)`: this process reads block `index` of `count` equal blocks of the global batch.

    The blocks follow `batch_sharding` (the rows this process's devices hold), not the process
    number: processes that hold the same rows, because the batch is not split over them (e.g.
    tensor parallelism across hosts), get the same index and so read the same data, as
    `jax.make_array_from_process_local_data` requires. With the batch split over every process,
    this is `(jax.process_index(), jax.process_count())`.
    """
    spans = sorted({index[0].indices(global_batch)[:2] for device, index in
                    batch_sharding.devices_indices_map((global_batch,)).items()
                    if device.process_index == jax.process_index()})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    contiguous = all(start <= prev_stop for (_, prev_stop), (start, _) in zip(spans, spans[1:]))
    if not contiguous or global_batch % (hi - lo) or lo % (hi - lo):
        raise ConfigError(f"process {jax.process_index()} holds batch rows {spans} of {global_batch}, not one "
                          f"block of equal size; order the mesh so each process's devices are adjacent "
                          f"along the batch axes")
    return lo // (hi - lo), global_batch // (hi - lo)


def initialize_from_env() -> None:
    """Initializes `jax.distributed` as the environment says (or not at all) and logs the topology."""
    launch = detect()
    if launch.kind != "single":
        if jax.config.jax_cpu_collectives_implementation is None:
            # Without it, CPU processes cannot run computations that span processes.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if launch.kind == "explicit":
            log.info("jax.distributed: process %d of %d, coordinator %s", launch.process_id,
                     launch.num_processes, launch.coordinator_address)
            jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                       num_processes=launch.num_processes, process_id=launch.process_id,
                                       cluster_detection_method="deactivate")
        else:
            log.info("jax.distributed: auto-detecting the %s cluster", launch.kind)
            jax.distributed.initialize()
    local, devices = jax.local_devices(), jax.devices()
    log.info("process %d of %d (%s): %d local of %d global %s devices", jax.process_index(),
             jax.process_count(), launch.kind, len(local), len(devices), devices[0].platform)


__all__ = ["DistributedEnvError", "EXPLICIT_VARS", "Launch", "data_shard", "detect", "initialize_from_env"]
