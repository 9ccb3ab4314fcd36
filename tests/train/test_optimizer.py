"""Schedules against closed forms, the weight-decay mask, EMA, optimizer-state specs, grad norms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.train import optimizer as opt_lib
from lmtrain.train.optimizer import OptimizerConfig, ScheduleConfig

LR, WARMUP, TOTAL, MIN = 2.0, 10, 110, 0.1


def closed_form(kind: str, t: int, decay_fraction: float = 0.2, shape: str = "sqrt") -> float:
    if t < WARMUP:
        return LR * t / WARMUP
    if kind == "constant":
        return LR
    if kind == "wsd":
        start = TOTAL - round(decay_fraction * TOTAL)
        if t < start:
            return LR
        p = min((t - start) / (TOTAL - start), 1.0)
        f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "sqrt": 1 - math.sqrt(p)}[shape]
        return LR * (MIN + (1 - MIN) * f)
    p = min((t - WARMUP) / (TOTAL - WARMUP), 1.0)
    f = 0.5 * (1 + math.cos(math.pi * p)) if kind == "warmup_cosine" else 1 - p
    return LR * (MIN + (1 - MIN) * f)


STEPS = (0, 1, 5, 9, 10, 11, 35, 60, 87, 88, 95, 100, 109, 110, 200)


@pytest.mark.parametrize("kind", ["warmup_cosine", "warmup_linear", "wsd", "constant"])
def test_schedule_matches_closed_form(kind):
    schedule = opt_lib.make_schedule(OptimizerConfig(lr=LR),
                                     ScheduleConfig(kind=kind, warmup_steps=WARMUP, min_lr_ratio=MIN), TOTAL)
    got = [float(schedule(t)) for t in STEPS]
    np.testing.assert_allclose(got, [closed_form(kind, t) for t in STEPS], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_decay_shapes(shape):
    sched = ScheduleConfig(kind="wsd", warmup_steps=WARMUP, min_lr_ratio=MIN, decay_fraction=0.5,
                           decay_shape=shape)
    schedule = jax.jit(opt_lib.make_schedule(OptimizerConfig(lr=LR), sched, TOTAL))
    got = [float(schedule(t)) for t in STEPS]
    np.testing.assert_allclose(got, [closed_form("wsd", t, 0.5, shape) for t in STEPS], rtol=1e-6, atol=1e-7)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'wsd'"):
        configlib.from_dict(ScheduleConfig, {"kind": "wds"})



def test_warmup_longer_than_the_run_warns_and_clips(caplog):
    """A smoke test with fewer steps than the warmup warms up over all of them (linear to lr at the end)."""
    f = opt_lib.make_schedule(OptimizerConfig(lr=1.0), ScheduleConfig(kind="constant", warmup_steps=100), 50)
    assert "warming up over 50 steps instead" in caplog.text
    np.testing.assert_allclose([float(f(t)) for t in (0, 25, 50)], [0.0, 0.5, 1.0], atol=1e-6)


def params_tree():
    return {
        "embed": {"embedding": jnp.full((4, 3), 2.0)},
        "blocks": {"mlp": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)},
                   "lru": {"a_param": jnp.full((3,), 2.0), "conv": {"kernel": jnp.full((4, 3), -1.0)}}},
        "final_norm": {"scale": jnp.full((3,), 2.0)},
    }


def one_zero_grad_step(cfg: OptimizerConfig, params):
    tx = opt_lib.make_optimizer(cfg, ScheduleConfig(kind="constant", warmup_steps=0), 10)
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    return optax.apply_updates(params, updates)


def test_weight_decay_only_on_kernels():
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5)
    params = params_tree()
    new = one_zero_grad_step(cfg, params)
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        name = opt_lib.leaf_name(path)
        expected = old * (1 - 0.1 * 0.5) if name == "kernel" else old
        np.testing.assert_allclose(_get(new, path), expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_decay_params_configurable():
    cfg = configlib.from_dict(OptimizerConfig, {"lr": 0.1, "weight_decay": 0.5,
                                                "decay_params": ["kernel", "embedding"]})
    new = one_zero_grad_step(cfg, params_tree())
    np.testing.assert_allclose(new["embed"]["embedding"], 2.0 * 0.95, rtol=1e-6)
    np.testing.assert_allclose(new["final_norm"]["scale"], 2.0)


def test_decay_mask_on_nnx_state_and_pure_dict():
    class Block(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((2, 2)))
            self.scale = nnx.Param(jnp.ones((2,)))

    state = nnx.state(Block(), nnx.Param)
    mask = opt_lib.decay_mask(state, ("kernel",))
    assert nnx.to_pure_dict(mask) == {"kernel": True, "scale": False}
    assert opt_lib.decay_mask(nnx.to_pure_dict(state), ("kernel",)) == {"kernel": True, "scale": False}
    new = one_zero_grad_step(OptimizerConfig(lr=0.1, weight_decay=0.5), state)
    np.testing.assert_allclose(new["kernel"].get_value(), 0.95)
    np.testing.assert_allclose(new["scale"].get_value(), 1.0)


@pytest.mark.parametrize("clip, expected_g", [(1.0, [0.6, 0.8]), (0.0, [30.0, 40.0])])
def test_grad_clip(clip, expected_g):
    # With b1 = b2 = 0 the Adam update is -lr * g / (|g| + eps); a large eps exposes g's scale.
    cfg = OptimizerConfig(lr=1.0, b1=0.0, b2=0.0, eps=1e3, weight_decay=0.0, grad_clip_norm=clip)
    tx = opt_lib.make_optimizer(cfg, ScheduleConfig(kind="constant", warmup_steps=0), 10)
    params = {"kernel": jnp.zeros(2)}
    update = tx.update({"kernel": jnp.array([30.0, 40.0])}, tx.init(params), params)[0]["kernel"]
    g = np.array(expected_g)
    np.testing.assert_allclose(update, -g / (np.abs(g) + 1e3), rtol=1e-5)


def test_ema_update():
    ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.0], jnp.bfloat16)}
    params = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0], jnp.bfloat16)}
    new = opt_lib.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(new["w"], [1.5, 2.5])
    assert new["b"].dtype == jnp.bfloat16 and float(new["b"][0]) == 0.25


def test_grad_norms_and_nonfinite_group():
    grads = params_tree()
    total, groups = jax.jit(opt_lib.grad_norms)(grads)
    np.testing.assert_allclose(total, optax.tree.norm(grads), rtol=1e-6)
    np.testing.assert_allclose(groups["embed"], math.sqrt(12 * 4.0), rtol=1e-6)
    assert set(groups) == {"embed", "blocks", "final_norm"}
    assert opt_lib.nonfinite_groups(groups) == []
    grads["blocks"]["lru"]["a_param"] = jnp.array([1.0, jnp.nan, 0.0])
    _, groups = opt_lib.grad_norms(grads)
    assert opt_lib.nonfinite_groups(groups) == ["blocks"]
    _, deeper = opt_lib.grad_norms(grads, depth=2)
    assert opt_lib.nonfinite_groups(deeper) == ["blocks/lru"]


def test_opt_state_specs_follow_params():
    params = params_tree()
    specs = jax.tree.map(lambda x: PartitionSpec("fsdp", *([None] * (x.ndim - 1))), params)
    tx = opt_lib.make_optimizer(OptimizerConfig(), ScheduleConfig(kind="constant", warmup_steps=0), 10)
    state_specs = opt_lib.opt_state_specs(tx, params, specs, PartitionSpec())
    adam = state_specs[1][0]
    assert adam.mu == specs and adam.nu == specs and adam.count == PartitionSpec()
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(
        state_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _get(tree, path):
    for key in path:
        tree = tree[opt_lib.key_name(key)]
    return tree


def test_stages_rewarm_from_the_last_lr_and_redecay():
    from lmtrain.data.config import StageConfig

    stages = (StageConfig(start_step=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.0),
              StageConfig(start_step=500))  # after the end: never reached
    sched = ScheduleConfig(kind="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = jax.jit(opt_lib.make_schedule(OptimizerConfig(lr=2e-3), sched, 200, stages))
    cos = lambda p: 0.5 * (1 + np.cos(np.pi * p))

    def expected(t):
        if t < 10:
            return 2e-3 * t / 10
        if t < 100:
            return 2e-3 * (0.1 + 0.9 * cos((t - 10) / 90))
        if t < 110:
            return 2e-4 + (1e-3 - 2e-4) * (t - 100) / 10
        return 1e-3 * cos((t - 110) / 90)

    for t in (0, 5, 10, 50, 99, 100, 105, 110, 150, 200):
        np.testing.assert_allclose(float(f(t)), expected(t), rtol=1e-5, atol=1e-9, err_msg=str(t))
    with pytest.raises(ConfigError, match=r"stages\[0\] lasts 100 steps, shorter than its warmup_steps=150"):
        opt_lib.make_schedule(OptimizerConfig(), sched, 200, (StageConfig(start_step=100, warmup_steps=150),))
