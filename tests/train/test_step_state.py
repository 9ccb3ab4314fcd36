"""The train step's carried model state: TBPTT == one long forward, state passing uses the previous
step's rolled final states, fitted-noise statistics follow the final states, and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import load_config
from lmtrain.configlib import ConfigError
from lmtrain.models.loss import cross_entropy
from lmtrain.models.mixers.attention import AttentionState
from lmtrain.train.mesh import make_mesh
from lmtrain.train.step import Trainer

# lr = 0: the parameters never change, so every step's loss can be checked against a plain forward.
BASE = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "model.vocab_size=260",
        "data.seq_len=32", "data.global_batch_size=8", "schedule.kind=constant", "schedule.warmup_steps=0",
        "optimizer.lr=0.0", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
MAMBA = ["model.mamba.head_dim=8", "model.mamba.state_size=8", "model.mamba.chunk=8"]
B, T, K = 8, 32, 4

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def trainer(*extra: str) -> Trainer:
    cfg = load_config(None, [*BASE, *extra])
    return Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def streams(seed: int = 0) -> dict[str, np.ndarray]:
    """B rows of K*T tokens, each a stream of 2-4 documents: stream-mode segment ids and positions."""
    rng = np.random.default_rng(seed)
    n = K * T
    out = {"inputs": rng.integers(0, 259, (B, n), dtype=np.int32),
           "targets": rng.integers(0, 259, (B, n), dtype=np.int32),
           "segment_ids": np.zeros((B, n), np.int32), "positions": np.zeros((B, n), np.int32),
           "loss_mask": np.ones((B, n), np.int32)}
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(1, n), size=1 + b % 3, replace=False).tolist())
        for seg, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, n]), start=5 + b):
            out["segment_ids"][b, lo:hi] = seg
            out["positions"][b, lo:hi] = np.arange(hi - lo)
    return out


def chunk(batch: dict, k: int) -> dict:
    return {key: v[:, k * T:(k + 1) * T] for key, v in batch.items()}


def token_nll(tr: Trainer, params, batch: dict, state=None) -> np.ndarray:
    logits, _ = tr.model(params)(batch["inputs"], segment_ids=batch["segment_ids"],
                                 positions=batch["positions"], state=state)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0])


@pytest.mark.parametrize("accum, pattern", [(1, "RRA"), (2, "RRA"), (2, "MA"), (1, "MRA")])
def test_tbptt_steps_equal_one_long_forward(accum, pattern):
    tr = trainer("train.interventions=[{kind: tbptt}]", f"train.grad_accum={accum}", f"model.pattern={pattern}", *MAMBA)
    state = tr.init_state()
    data = streams()
    nll_BxN = token_nll(tr, state.params, data)
    fresh_losses = []
    for k in range(K):
        state, metrics = tr.train_step(state, chunk(data, k))
        expected = nll_BxN[:, k * T:(k + 1) * T].mean()
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5, err_msg=f"step {k}")
        assert float(metrics["intervened_rows"]) == (0.0 if k == 0 else 1.0)
        fresh_losses.append(token_nll(tr, state.params, chunk(data, k)).mean())
    assert not np.allclose(fresh_losses[1:], nll_BxN[:, T:].reshape(B, K - 1, T).mean(axis=(0, 2)), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(state.carry.segment_B), data["segment_ids"][:, -1])


def test_tbptt_without_attention_carry_resets_only_the_window():
    tr = trainer("train.interventions=[{kind: tbptt, carry_attention: false}]")
    state = tr.init_state()
    data = streams(1)
    state, _ = tr.train_step(state, chunk(data, 0))
    prev, params = jax.tree.map(np.array, (state.carry, state.params))  # copies: the step donates `state`
    fresh = tr.model(params).init_state(B)
    keep_attn = lambda p, f: f if isinstance(f, AttentionState) else p
    manual = prev._replace(groups=tuple(map(keep_attn, prev.groups, fresh.groups)),
                           tail=tuple(map(keep_attn, prev.tail, fresh.tail)))
    expected = token_nll(tr, params, chunk(data, 1), manual).mean()
    full = token_nll(tr, params, data)[:, T:2 * T].mean()
    assert abs(expected - full) > 1e-4  # the attention window mattered
    _, metrics = tr.train_step(state, chunk(data, 1))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)


@pytest.mark.parametrize("pattern", ["RRA", "MRA"])
def test_state_passing_uses_previous_final_states_rolled(pattern):
    tr = trainer("train.interventions=[{kind: state_passing, start_step: 1}]", f"model.pattern={pattern}", *MAMBA)
    state = tr.init_state()
    data = streams(2)
    first, second = chunk(data, 0), chunk(data, 1)
    second["segment_ids"] = second["segment_ids"] + 100  # unrelated rows: state passing must not reset them
    second["loss_mask"][:, 2:] = 0  # the loss where the initial state matters most
    state, m0 = tr.train_step(state, first)
    np.testing.assert_allclose(float(m0["loss"]), token_nll(tr, state.params, first).mean(), rtol=2e-5)
    _, final = tr.model(state.params)(first["inputs"], segment_ids=first["segment_ids"],
                                      positions=first["positions"])
    rows = [leaf.axes.index("batch") for leaf in tr.layout.leaves]  # [layers, B, ...] stacked, [B, ...] tail
    rolled = [jnp.roll(h, 1, axis=ax) for h, ax in zip(tr.layout.recurrent(final), rows)]
    state0 = tr.layout.with_recurrent(tr.model(state.params).init_state(B), rolled)
    state0 = state0._replace(segment_B=jnp.asarray(second["segment_ids"][:, 0]))
    expected = token_nll(tr, state.params, second, state0)[:, :2].mean()
    without = token_nll(tr, state.params, second)[:, :2].mean()
    _, m1 = tr.train_step(state, second)
    np.testing.assert_allclose(float(m1["loss"]), expected, rtol=2e-5)
    assert abs(float(m1["loss"]) - without) > 1e-4


def test_fitted_noise_statistics_follow_final_states():
    decay = 0.5
    tr = trainer(f"train.interventions=[{{kind: fitted_noise, start_step: 100, stats_decay: {decay}}}]")
    state = tr.init_state()
    data = streams(3)
    mean = None
    for k in range(3):
        batch = chunk(data, k)
        _, final = tr.model(state.params)(batch["inputs"], segment_ids=batch["segment_ids"],
                                          positions=batch["positions"])
        h = np.asarray(final.tail[0].h_BxL if final.tail else final.groups[0].h_BxL)
        m = h.mean(axis=-2)
        mean = m * (1 - decay) if mean is None else decay * mean + (1 - decay) * m
        state, metrics = tr.train_step(state, batch)
        assert float(metrics["intervened_rows"]) == 0.0  # before start_step: statistics only
    got = np.asarray(state.stats.mean[-1] if final.tail else state.stats.mean[0])
    np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-7)
    assert int(state.stats.count) == 3


@pytest.mark.parametrize("kind", ["noise", "fitted_noise"])
def test_noise_interventions_reach_mamba_states(kind):
    tr = trainer(f"train.interventions=[{{kind: {kind}, noise_std: 0.5}}]", "model.pattern=MA", *MAMBA)
    state = tr.init_state()
    batch = chunk(streams(5), 0)
    state, metrics = tr.train_step(state, batch)
    assert float(metrics["intervened_rows"]) == 1.0 and float(metrics["state_rms"]) > 0
    if kind == "noise":  # the first tokens continue from a random Mamba state: their loss moves
        assert abs(float(metrics["loss"]) - token_nll(tr, state.params, batch).mean()) > 1e-5
    else:  # statistics per layer and channel of each [(layers,) H, P, N] state (rows averaged out)
        fresh = tr.layout.recurrent(tr.model(state.params).init_state(1))
        rows = [leaf.axes.index("batch") for leaf in tr.layout.leaves]
        assert [m.shape for m in state.stats.mean] == [h.shape[:ax] + h.shape[ax + 1:] for h, ax in zip(fresh, rows)]
        assert all(float(jnp.abs(m).sum()) > 0 for m in state.stats.mean)


def test_state_rms_metric_and_plain_loss():
    tr = trainer()
    state = tr.init_state()
    batch = chunk(streams(4), 0)
    _, final = tr.model(state.params)(batch["inputs"], segment_ids=batch["segment_ids"],
                                      positions=batch["positions"])
    hs = [np.asarray(h) for h in tr.layout.recurrent(final)]
    expected = np.sqrt(sum((h ** 2).sum() for h in hs) / sum(h.size for h in hs))
    _, metrics = tr.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["state_rms"]), expected, rtol=1e-5)
    total, nll = cross_entropy(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
    assert float(total) == pytest.approx(2 * np.log(3))


@pytest.mark.parametrize("extra, match", [
    (["model.pattern=A", "train.interventions=[{kind: noise}]"], "has no recurrent layer"),
    (["model.pattern=RG", "train.interventions=[{kind: tbptt}]"], "cannot carry the state of layers whose state grows"),
    (["train.interventions=[{kind: noise, layer_noise_std: [1.0]}]"], "has 1 values; the model has 2"),
    (["train.interventions=[{kind: nosie}]"], "did you mean 'noise'"),
    (["train.interventions=[{kind: noise, prob: 2}]"], "train.interventions\\[0\\]: prob must be in"),
])
def test_bad_intervention_configs(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*BASE, *extra])
