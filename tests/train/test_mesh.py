"""Mesh sizes, config errors, logical-axis -> PartitionSpec mapping, and an 8-device CPU mesh."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.train import mesh as mesh_lib
from lmtrain.train.mesh import DEFAULT_RULES, MeshConfig


def cfg(**kw) -> MeshConfig:
    return configlib.from_dict(MeshConfig, kw)


@pytest.mark.parametrize("kw, devices, expected", [
    ({"data": 2, "fsdp": -1, "tensor": 1}, 8, {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"data": 1, "fsdp": 2, "tensor": -1}, 8, {"data": 1, "fsdp": 2, "tensor": 4}),
    ({"data": -1, "fsdp": 1, "tensor": 1}, 3, {"data": 3, "fsdp": 1, "tensor": 1}),
    ({}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
])
def test_resolve_sizes_fills_minus_one(kw, devices, expected):
    assert mesh_lib.resolve_sizes(cfg(**kw), devices) == expected


def test_wrong_device_count_names_count_and_fix():
    with pytest.raises(ConfigError, match=r"needs 4 devices but 8 are available.*-1"):
        mesh_lib.resolve_sizes(cfg(data=2, fsdp=2, tensor=1), 8)


def test_fill_that_does_not_divide():
    with pytest.raises(ConfigError, match=r"cannot fill fsdp=-1 because 8 devices are not divisible by .* 3"):
        mesh_lib.resolve_sizes(cfg(data=3, fsdp=-1), 8)


def test_at_most_one_fill():
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        cfg(data=-1, fsdp=-1)


@pytest.mark.parametrize("size", [0, -2])
def test_bad_size(size):
    with pytest.raises(ConfigError, match="positive integer or -1"):
        cfg(tensor=size)


def test_unknown_logical_name_suggests():
    with pytest.raises(ConfigError, match=r"unknown logical axis 'embd' \(did you mean 'embed'\?\)"):
        cfg(rules={"embd": "fsdp"})


def test_unknown_mesh_axis_suggests():
    with pytest.raises(ConfigError, match=r"rules.mlp: unknown mesh axis 'tensr' \(did you mean 'tensor'\?\)"):
        cfg(rules={"mlp": ["tensr"]})


def test_rules_override_defaults_and_round_trip():
    c = cfg(rules={"vocab": None, "layers": ["data"]})
    assert c.rules["vocab"] is None and c.rules["layers"] == ("data",)
    assert c.rules["embed"] == DEFAULT_RULES["embed"] and c.rules["batch"] == ("data", "fsdp")
    assert configlib.from_dict(MeshConfig, configlib.to_dict(c)) == c


def test_make_mesh_single_device():
    mesh = mesh_lib.make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 1


class Tiny(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.zeros((8, 6)), logical_axes=("embed", "mlp"))
        self.stacked = nnx.Param(jnp.zeros((3, 8, 4)), logical_axes=("layers", "embed", "lru"))
        self.scale = nnx.Param(jnp.zeros((8,)))


def test_param_specs_from_metadata():
    state = nnx.state(Tiny(), nnx.Param)
    specs = nnx.to_pure_dict(mesh_lib.param_specs(state, MeshConfig().rules))
    assert specs == {"kernel": PartitionSpec("fsdp", "tensor"),
                     "stacked": PartitionSpec(None, "fsdp", "tensor"),
                     "scale": PartitionSpec()}


def test_param_specs_plain_leaves_replicated_and_rank_mismatch():
    assert mesh_lib.param_specs({"a": jnp.zeros(3)}, DEFAULT_RULES) == {"a": PartitionSpec()}
    bad = {"w": nnx.Param(jnp.zeros((2, 2)), logical_axes=("embed",))}
    with pytest.raises(ValueError, match=r"w: 1 logical axes \('embed',\) for a parameter of shape \(2, 2\)"):
        mesh_lib.param_specs(bad, DEFAULT_RULES)


def test_fit_spec_keeps_divisible_prefix_or_raises(caplog):
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    spec = PartitionSpec(("data", "fsdp"), "tensor")
    assert mesh_lib.fit_spec(spec, (8, 4), mesh) == spec
    assert mesh_lib.fit_spec(spec, (6, 3), mesh, name="w") == PartitionSpec("data", None)
    assert "w: dimension of size 6 is not divisible" in caplog.text
    with pytest.raises(ValueError, match="size 3 is not divisible by mesh axes"):
        mesh_lib.fit_spec(spec, (8, 3), mesh, strict=True)


EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from flax import nnx
    from lmtrain import configlib
    from lmtrain.train import mesh as mesh_lib

    cfg = configlib.from_dict(mesh_lib.MeshConfig, {"data": 2, "fsdp": 2, "tensor": 2})
    mesh = mesh_lib.make_mesh(cfg)
    state = {"w": nnx.Param(jnp.ones((8, 6)), logical_axes=("embed", "mlp"))}
    specs = mesh_lib.param_specs(state, cfg.rules, mesh)
    shard = mesh_lib.shardings(state, mesh, cfg.rules)["w"].get_value()
    placed = jax.device_put(state["w"].get_value(), shard)
    try:
        mesh_lib.make_mesh(configlib.from_dict(mesh_lib.MeshConfig, {"data": 3, "fsdp": 1, "tensor": 1}))
        error = None
    except configlib.ConfigError as e:
        error = str(e)
    print(json.dumps({"devices": len(jax.devices()), "shape": dict(mesh.shape),
                      "spec": list(specs["w"].get_value()), "shard_shape": list(placed.sharding.shard_shape((8, 6))),
                      "error": error}))
""")


def test_eight_simulated_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert result["spec"] == ["fsdp", "tensor"]
    assert result["shard_shape"] == [4, 3]
    assert "needs 3 devices but 8 are available" in result["error"]
