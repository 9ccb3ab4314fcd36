"""Initial-state interventions: sampling statistics, step ranges, row selection, state passing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.configlib import ConfigError, from_dict, updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.models.layout import StateLayout
from lmtrain.train.interventions import Inputs, InterventionConfig, fitted_moments, init_stats, update_stats
from lmtrain.train.interventions import initial_state as apply_all

CFG = updated(ModelConfig(), {"vocab_size": 50, "width": 16, "num_layers": 4, "pattern": "RRA", "rglru.num_heads": 2,
                              "attention.num_heads": 2, "attention.window": 4, "rglru.width": 32})
LAYOUT = StateLayout(CFG)
B = 512


@pytest.fixture(scope="module")
def fresh():
    return LanguageModel(CFG, rngs=nnx.Rngs(0)).init_state(B)


def initial_state(cfg, fresh, step, rng, first_seg, stats=None, previous=None):
    return apply_all([cfg], Inputs(LAYOUT, fresh, first_seg, previous, stats), step, rng)[0]


def hs(state):
    return [state.groups[0].h_BxL, state.groups[1].h_BxL, state.tail[0].h_BxL]


def test_noise_statistics_rows_and_continuation(fresh):
    cfg = InterventionConfig(kind="noise", prob=0.5, noise_std=0.3)
    first_seg = jnp.arange(B, dtype=jnp.int32) + 7
    out = initial_state(cfg, fresh, jnp.int32(0), jax.random.key(1), first_seg)
    chosen = np.asarray(out.segment_B) >= 0
    assert abs(chosen.mean() - 0.5) < 0.07
    np.testing.assert_array_equal(np.asarray(out.segment_B)[chosen], np.asarray(first_seg)[chosen])
    for h in hs(out):
        h = np.asarray(h).swapaxes(0, -2) if h.ndim == 3 else np.asarray(h)  # rows first
        assert np.all(h[~chosen] == 0)
        assert abs(h[chosen].std() - 0.3) < 0.01 and abs(h[chosen].mean()) < 0.01
    assert out.groups[2] is fresh.groups[2] or np.all(np.asarray(out.groups[2].valid_BxS) == 0)  # attention untouched


def test_step_range(fresh):
    cfg = InterventionConfig(kind="noise", start_step=10, end_step=20)
    seg = jnp.zeros((B,), jnp.int32)
    for step, applied in ((9, False), (10, True), (19, True), (20, False)):
        out = initial_state(cfg, fresh, jnp.int32(step), jax.random.key(0), seg)
        assert bool(jnp.any(out.tail[0].h_BxL != 0)) == applied, step


def test_fitted_noise_recovers_running_moments(fresh):
    cfg = InterventionConfig(kind="fitted_noise", stats_decay=0.9)
    stats = init_stats(LAYOUT, fresh)
    mu, sigma = 0.5, 0.2
    for i in range(60):
        noisy = [mu + sigma * jax.random.normal(jax.random.key(i * 3 + j), h.shape) for j, h in enumerate(hs(fresh))]
        final = fresh._replace(groups=(fresh.groups[0]._replace(h_BxL=noisy[0]),
                                       fresh.groups[1]._replace(h_BxL=noisy[1]), fresh.groups[2]),
                               tail=(fresh.tail[0]._replace(h_BxL=noisy[2]),))
        stats = update_stats(LAYOUT, stats, final, cfg.stats_decay)
    means, stds = fitted_moments(stats, cfg.stats_decay)
    for m, s in zip(means, stds):
        np.testing.assert_allclose(m, mu, atol=0.03)
        np.testing.assert_allclose(s, sigma, atol=0.03)
    out = initial_state(cfg, fresh, jnp.int32(0), jax.random.key(5), jnp.zeros((B,), jnp.int32), stats=stats)
    h = np.asarray(out.tail[0].h_BxL)
    assert abs(h.mean() - mu) < 0.02 and abs(h.std() - sigma) < 0.02


def test_state_passing_uses_previous_rows_without_gradient(fresh):
    cfg = InterventionConfig(kind="state_passing")
    prev = fresh._replace(tail=(fresh.tail[0]._replace(h_BxL=jnp.arange(B, dtype=jnp.float32)[:, None]
                                                        * jnp.ones((1, 32))),))
    out = initial_state(cfg, fresh, jnp.int32(0), jax.random.key(0), jnp.zeros((B,), jnp.int32), previous=prev)
    np.testing.assert_array_equal(np.asarray(out.tail[0].h_BxL[:, 0]), np.roll(np.arange(B), 1))

    def f(x):
        p = prev._replace(tail=(prev.tail[0]._replace(h_BxL=x),))
        return jnp.sum(initial_state(cfg, fresh, jnp.int32(0), jax.random.key(0), jnp.zeros((B,), jnp.int32),
                                     previous=p).tail[0].h_BxL)
    assert float(jnp.abs(jax.grad(f)(prev.tail[0].h_BxL)).sum()) == 0.0


def test_config_validation():
    with pytest.raises(ConfigError, match="prob"):
        from_dict(InterventionConfig, {"prob": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'noise'"):
        from_dict(InterventionConfig, {"kind": "nois"})


def test_layer_noise_std_in_depth_order(fresh):
    # RRA over 4 layers: R layers at depths 0, 1, 3 -> groups[0] (repeat 0), groups[1] (repeat 0), tail[0]
    cfg = InterventionConfig(kind="noise", layer_noise_std=(0.1, 0.5, 2.0))
    out = initial_state(cfg, fresh, jnp.int32(0), jax.random.key(3), jnp.zeros((B,), jnp.int32))
    for h, std in zip(hs(out), (0.1, 0.5, 2.0)):
        assert abs(float(jnp.std(h)) / std - 1) < 0.05


def test_interventions_compose_later_wins(fresh):
    seg = jnp.zeros((B,), jnp.int32)
    cfgs = [InterventionConfig(kind="noise", noise_std=1.0), InterventionConfig(kind="noise", noise_std=0.01,
                                                                                prob=0.5)]
    out, touched = apply_all(cfgs, Inputs(LAYOUT, fresh, seg, None, None), jnp.int32(0), jax.random.key(0))
    assert bool(jnp.all(touched))
    row_std = np.asarray(jnp.std(out.tail[0].h_BxL, axis=-1))
    small = row_std < 0.1
    assert 0.4 < small.mean() < 0.6 and np.all(row_std[~small] > 0.5)
