"""Device mesh and parameter shardings from config.

The mesh has named axes `data`, `fsdp` and `tensor`, sized by `MeshConfig` (one size may be -1:
it takes whatever devices are left). Parameters carry logical axis names in their `logical_axes`
metadata; `MeshConfig.rules` maps each logical name to mesh axes, so changing the parallelism
strategy is a config change. A dimension that is not divisible by the mesh axes it maps to keeps
the longest prefix of those axes that divides it (replicated if none does), with a warning;
`strict=True` raises instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.sharding import LOGICAL_AXES, Rules, logical_to_spec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis / axes / None (replicated). Activations' `batch` is split over both
# data-parallel axes; parameters are split over `fsdp` along `embed` (ZeRO-3 style) and over `tensor`
# along their wide dimension (Megatron style). Everything else is replicated.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "head_dim": None,
    "vocab": "tensor",
    "lru": "tensor",
    "layers": None,
    "conv": None,
    "cache_length": None,
    "state": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes and the logical-axis rules table."""

    data: int = configlib.field(1, help="Pure data-parallel axis size (-1: all remaining devices).")
    fsdp: int = configlib.field(-1, help="Fully-sharded data-parallel axis size: batch and parameters "
                                         "(along `embed`) are split over it (-1: all remaining devices).")
    tensor: int = configlib.field(1, help="Tensor-parallel axis size (-1: all remaining devices).")
    rules: dict[str, str | tuple[str, ...] | None] = configlib.field(
        {}, help="Logical axis name -> mesh axis, list of mesh axes, or null (replicated). Entries given "
                 "here override the defaults (see docs/sharding.md); the stored config holds the full table.")

    def __post_init__(self):
        object.__setattr__(self, "rules", {**DEFAULT_RULES, **self.rules})

    @property
    def sizes(self) -> dict[str, int]:
        """The configured size of every mesh axis, -1 included."""
        return {name: getattr(self, name) for name in MESH_AXES}

    def validate(self) -> None:
        sizes = self.sizes
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"{name}={size}: a mesh axis size must be a positive integer or -1")
        fills = [name for name, size in sizes.items() if size == -1]
        if len(fills) > 1:
            raise ConfigError(f"only one mesh axis may be -1 (fill the remaining devices), got "
                              f"{' and '.join(fills)}; give the others explicit sizes")
        for logical, target in self.rules.items():
            if logical not in LOGICAL_AXES:
                raise ConfigError(f"rules: unknown logical axis '{logical}'"
                                  f"{configlib.did_you_mean(logical, LOGICAL_AXES)}")
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            for axis in targets:
                if axis not in MESH_AXES:
                    raise ConfigError(f"rules.{logical}: unknown mesh axis '{axis}'"
                                      f"{configlib.did_you_mean(axis, MESH_AXES)}")


def resolve_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 filled in; raises `ConfigError` if they don't cover `num_devices`."""
    cfg.validate()
    sizes = cfg.sizes
    shown = " x ".join(f"{name}={size}" for name, size in sizes.items())
    fixed = math.prod(size for size in sizes.values() if size != -1)
    fills = [name for name, size in sizes.items() if size == -1]
    if fills:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {shown}: cannot fill {fills[0]}=-1 because {num_devices} devices are not divisible "
                f"by the other axes' product {fixed}; choose sizes whose product divides {num_devices}")
        sizes[fills[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {shown} needs {fixed} devices but {num_devices} are available; make the sizes multiply "
            f"to {num_devices}, or set one of them to -1 to take the remaining devices "
            f"(e.g. mesh.fsdp=-1)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh for `cfg` over `devices` (default: all devices of all processes).

    Axes are `AxisType.Auto`: shardings are given to `jit` and `constrain`, not carried in types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(cfg, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    axes = variable.get_metadata("logical_axes", None)
    if axes is None:
        return None
    return tuple(axes)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, *, name: str = "?",
             strict: bool = False) -> PartitionSpec:
    """`spec` with each dimension's mesh axes cut to the longest prefix whose size product divides it.

    Logs a warning for every dimension it changes; with `strict=True` raises `ValueError` instead.
    """
    fitted = []
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    for dim, entry in zip(shape, entries, strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        keep = axes
        while keep and dim % math.prod(mesh.shape[a] for a in keep):
            keep = keep[:-1]
        if keep != axes:
            total = math.prod(mesh.shape[a] for a in axes)
            message = (f"{name}: dimension of size {dim} is not divisible by mesh axes {axes} "
                       f"(size {total})")
            if strict:
                raise ValueError(message + "; change the mesh sizes or the sharding rules")
            log.warning("%s; sharding it over %s instead", message, keep or "nothing (replicated)")
        fitted.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*fitted)


def param_specs(tree: Any, rules: Rules, mesh: Mesh | None = None, *, strict: bool = False) -> Any:
    """PartitionSpecs for the `nnx.Variable`s in `tree` (an `nnx.State` or any pytree of Variables).

    Each Variable is replaced by a copy holding its spec (the tree keeps its structure, so it can be
    passed to `jit` as shardings of `tree`, or through `nnx.to_pure_dict`). Variables without
    `logical_axes` metadata and plain leaves (arrays, scalars) are replicated. With `mesh`, every dimension is
    checked for divisibility (see `fit_spec`).
    """
    warned: set[str] = set()

    def spec_for(path, leaf):
        name = _path_str(path)
        if not _is_variable(leaf):
            return PartitionSpec()
        axes = _logical_axes(leaf)
        if axes is None:
            return leaf.replace(PartitionSpec())
        shape = np.shape(leaf.get_value())
        if len(axes) != len(shape):
            raise ValueError(f"{name}: {len(axes)} logical axes {axes} for a parameter of shape {shape}")
        for axis in axes:
            if axis is not None and axis not in rules and axis not in warned:
                warned.add(axis)
                log.warning("%s: logical axis '%s' has no sharding rule%s; replicating it", name, axis,
                            configlib.did_you_mean(axis, list(rules)))
        spec = logical_to_spec(axes, rules)
        if mesh is not None:
            spec = fit_spec(spec, shape, mesh, name=name, strict=strict)
        return leaf.replace(spec)

    return jax.tree_util.tree_map_with_path(spec_for, tree, is_leaf=_is_variable)


def shardings(tree: Any, mesh: Mesh, rules: Rules, *, strict: bool = False) -> Any:
    """`NamedSharding`s on `mesh` for `tree`, structured like `param_specs(tree, rules, mesh)`."""
    specs = param_specs(tree, rules, mesh, strict=strict)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def describe_mesh(mesh: Mesh) -> str:
    """One line such as 'mesh data=2 fsdp=2 tensor=2 over 8 cpu devices'."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh {axes} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"


def rules_table(rules: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(logical name, mesh axes) rows, for logs and docs."""
    def show(target):
        if target is None or target == ():
            return "replicated"
        return target if isinstance(target, str) else ", ".join(target)

    return [(name, show(rules.get(name))) for name in LOGICAL_AXES]
