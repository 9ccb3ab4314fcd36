"""Train step: sharded (data x fsdp x tensor on 8 CPU devices) == single device, gradient accumulation
== one big batch, the EMA, skipped non-finite steps, and the loss function's masking and z-loss."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lmtrain.config import load_config
from lmtrain.models.loss import cross_entropy
from lmtrain.train.mesh import make_mesh
from lmtrain.train.step import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tiny model every trainer test uses (the same shapes and optimizer, so compiled steps are shared
# through the persistent compilation cache). V=260 and widths divide the 2x2x2 mesh. Adam's first
# updates are ~ g / (|g| + eps): eps=1e-6 keeps float reduction-order noise in tiny gradients from
# being amplified by lr/eps beyond the 1e-5 tolerance of the equivalence tests.
TINY = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
        "model.attention.window=16", "model.vocab_size=260",
        "data.seq_len=32", "data.global_batch_size=8", "schedule.kind=constant", "schedule.warmup_steps=4",
        "optimizer.lr=3e-3", "optimizer.eps=1e-6", "optimizer.ema_decay=0.9",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py


def make_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, 1-3 documents per row, and padding (loss_mask 0) of different lengths per row,
    so microbatches hold different numbers of real tokens."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, seq_len), np.int32) for k in ("segment_ids", "positions", "loss_mask")}
    out["inputs"] = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
    out["targets"] = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
    for b in range(batch):
        real = seq_len - (7 * b) % 11
        cuts = sorted(rng.choice(np.arange(1, real), size=b % 3, replace=False).tolist())
        for seg, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, real]), start=1):
            out["segment_ids"][b, lo:hi] = seg
            out["positions"][b, lo:hi] = np.arange(hi - lo)
        out["loss_mask"][b, :real] = 1
    return out


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- single device

@pytest.fixture(scope="module")
def trainers():
    """Single-device trainers for grad_accum 1 and 2, and their common initial state (on the host)."""
    out = {}
    for accum in (1, 2):
        cfg = load_config("configs/demo.yaml", [*TINY, f"train.grad_accum={accum}"])
        out[accum] = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    return out, host(out[1].init_state())


def run(trainer, state, batches):
    """Host copies of the state after training on `batches`, and each step's metrics."""
    state, history = jax.device_put(state, trainer.state_sharding), []
    for batch in batches:
        state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
        history.append(host(metrics))
    return host(state), history


def two_batches(trainer) -> list[dict[str, np.ndarray]]:
    cfg = trainer.cfg
    return [make_batch(cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size, seed) for seed in (1, 2)]


def test_grad_accum_equals_full_batch(trainers):
    by_accum, init = trainers
    batches = two_batches(by_accum[1])
    for b in batches:  # microbatches of different token counts (however the rows are split)
        assert b["loss_mask"][0::2].sum() != b["loss_mask"][1::2].sum()
        assert b["loss_mask"][:4].sum() != b["loss_mask"][4:].sum()
    s1, m1 = run(by_accum[1], init, batches)
    s2, m2 = run(by_accum[2], init, batches)
    for a, b, batch in zip(m1, m2, batches):
        assert a["tokens"] == b["tokens"] == batch["loss_mask"].sum()
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    assert max_diff(init.params, s1.params) > 1e-4  # the second step (lr > 0 after warmup step 0) moved them
    assert max_diff(s1.params, s2.params) < 1e-5
    assert max_diff(s1.opt_state, s2.opt_state) < 1e-6  # Adam moments: the gradients themselves
    assert max_diff(s1.ema, s2.ema) < 1e-5
    assert int(s1.step) == int(s2.step) == 2


def test_ema_follows_params(trainers):
    by_accum, init = trainers
    trainer = by_accum[1]
    one, _ = run(trainer, init, two_batches(trainer)[:1])
    two, _ = run(trainer, one, two_batches(trainer)[1:])
    d = trainer.cfg.optimizer.ema_decay
    expected = jax.tree.map(lambda p0, p1, p2: d * (d * p0 + (1 - d) * p1) + (1 - d) * p2,
                            init.params, one.params, two.params)
    assert max_diff(two.ema, expected) < 1e-6 and max_diff(two.ema, two.params) > 1e-5


def test_nonfinite_step_is_skipped(trainers):
    by_accum, init = trainers
    trainer = by_accum[1]
    batch = two_batches(trainer)[0]
    up = init.params["groups"][0]["mlp"]["up"]["kernel"].copy()
    up[0, 0, 0] = np.nan
    bad = init._replace(skipped=np.int32(2), params=jax.tree.map(np.copy, init.params))
    bad.params["groups"][0]["mlp"]["up"]["kernel"] = up
    new, (metrics,) = run(trainer, bad, [batch])
    assert not metrics["finite"] and not np.isfinite(metrics["loss"])
    assert int(new.skipped) == 3 and int(new.step) == 1  # counted; the schedule moves on
    np.testing.assert_array_equal(new.params["groups"][0]["mlp"]["up"]["kernel"], up)  # no update anywhere
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state, new.ema)),
                    jax.tree.leaves((bad.params, bad.opt_state, bad.ema)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.isfinite(metrics["group_norms"]["groups/0/mlp"])
    good, (metrics,) = run(trainer, init._replace(skipped=np.int32(2)), [batch])
    assert metrics["finite"] and int(good.skipped) == 0  # a finite step resets the count


# --------------------------------------------------------------------------- sharded == single device

SHARDED = textwrap.dedent("""
    import json, pickle, re, sys
    import jax, optax
    from lmtrain.config import load_config
    from lmtrain.train.mesh import make_mesh
    from lmtrain.train.step import Trainer

    overrides, path = json.loads(sys.argv[1]), sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    with open(path, "rb") as f:
        init, batches = pickle.load(f)
    results, report = {}, {}
    for accum in (1, 2):
        cfg = load_config("configs/demo.yaml", overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                                            f"train.grad_accum={accum}"])
        trainer = Trainer(cfg, make_mesh(cfg.mesh))
        state, losses = jax.device_put(init, trainer.state_sharding), []
        hlo = trainer._train_step.lower(state, jax.device_put(batches[0], trainer.batch_sharding)).compile().as_text()
        for batch in batches:
            state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
            losses.append(float(metrics["loss"]))
        results[accum] = (jax.device_get(state), losses)
        report[f"permutes{accum}"] = len(re.findall(r" collective-permute\\(", hlo))
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # Adam first moments
    arrays = {"up": state.params["groups"][0]["mlp"]["up"]["kernel"],
              "down": state.params["groups"][0]["mlp"]["down"]["kernel"],
              "q": state.params["groups"][2]["mixer"]["q"]["kernel"],
              "embedding": state.params["embedder"]["embedding"],
              "norm": state.params["final_norm"]["scale"],
              "mu_up": mu["groups"][0]["mlp"]["up"]["kernel"],
              "ema_up": state.ema["groups"][0]["mlp"]["up"]["kernel"]}
    with open(path, "wb") as f:
        pickle.dump(results, f)
    report["specs"] = {k: [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec] for k, v in arrays.items()}
    report["shards"] = {k: list(v.addressable_shards[0].data.shape) for k, v in arrays.items()}
    report["devices"] = {k: len(v.sharding.device_set) for k, v in arrays.items()}
    print("RESULT" + json.dumps(report))
""")


def test_nonfinite_update_with_finite_gradients_is_skipped(trainers):
    """lr = 1e39 is a finite Python float but inf in float32: loss and gradients are finite, the update is
    not. The step must be skipped like a non-finite gradient (params and optimizer state unchanged)."""
    _, init = trainers
    cfg = load_config("configs/demo.yaml", [*TINY, "optimizer.lr=1e39", "optimizer.ema_decay=0.0"])
    trainer = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = host(trainer.init_state())
    new, (metrics,) = run(trainer, state, two_batches(trainer)[:1])
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and not metrics["finite"]
    assert int(new.skipped) == 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_step_equals_single_device(trainers, tmp_path):
    """Two steps on mesh data=2 x fsdp=2 x tensor=2 (8 simulated CPU devices, in a subprocess), without and
    with gradient accumulation, give the single-device losses, parameters, optimizer state and EMA, with
    parameters sharded as the rules say."""
    by_accum, init = trainers
    batches = two_batches(by_accum[1])
    single, metrics = run(by_accum[1], init, batches)
    path = tmp_path / "io.pkl"
    path.write_bytes(pickle.dumps((init, batches)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-c", SHARDED, json.dumps(TINY), str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert max_diff(init.params, single.params) > 1e-4
    for accum, (sharded, losses) in pickle.loads(path.read_bytes()).items():
        np.testing.assert_allclose(losses, [float(m["loss"]) for m in metrics], rtol=0, atol=1e-5)
        assert max_diff(single.params, sharded.params) < 1e-5, accum
        assert max_diff(single.ema, sharded.ema) < 1e-5, accum
        assert max_diff(single.opt_state, sharded.opt_state) < 1e-6, accum
    # embed -> fsdp; mlp, heads, vocab -> tensor; the scanned `layers` axis is not split.
    assert out["specs"] == {"up": [None, "fsdp", "tensor"], "down": [None, "tensor", "fsdp"],
                            "q": [None, "fsdp", "tensor"], "embedding": ["tensor", "fsdp"], "norm": ["fsdp"],
                            "mu_up": [None, "fsdp", "tensor"], "ema_up": [None, "fsdp", "tensor"]}
    assert out["shards"]["up"] == [1, 16, 48] and out["shards"]["embedding"] == [130, 16]
    assert out["devices"] == dict.fromkeys(out["specs"], 8)
    # Microbatches stay where their rows are: accumulation adds no batch resharding between devices.
    assert out["permutes2"] <= out["permutes1"], out




def test_cross_entropy_masks_and_z_loss():
    logits = np.array([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]], np.float32)
    targets, mask = np.array([[2, 0, 1]]), np.array([[1, 0, 1]])
    log_z = np.log(np.exp(logits[0]).sum(-1))
    nll = log_z - np.array([2.0, 3.0, 1.0])
    total, nll_sum = jax.jit(cross_entropy)(logits, targets, mask, 0.5)
    np.testing.assert_allclose(nll_sum, nll[0] + nll[2], rtol=1e-6)
    np.testing.assert_allclose(total, nll[0] + nll[2] + 0.5 * (log_z[0] ** 2 + log_z[2] ** 2), rtol=1e-6)
