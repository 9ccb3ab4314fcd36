"""Train-step throughput of our Griffin vs recurrentgemma's (the peer), same config and weights.

    python benchmarks/peer.py                                   # width 256, 6 layers RRA, T=2048, B=4
    python benchmarks/peer.py --seq-len 256 --batch 2 --steps 3 # quick run
    python benchmarks/peer.py --scan-backends linear,chunked    # our model once per RG-LRU backend

One step = forward + backward + AdamW (optax) update of all parameters, next-token cross-entropy,
float32, jitted with parameters and optimizer state donated. The peer is
`recurrentgemma.jax.griffin.Griffin` as shipped (gradient_checkpointing=True: every residual block
rematerialised) and with gradient_checkpointing=False. All models start from the same weights
(Griffin's initializer, loaded into ours with lmtrain.export.recurrentgemma). After `--warmup`
steps each, the models are timed in interleaved rounds (one step of each per round, so load from
other processes hits all alike); the median of `--steps` rounds is reported.

Achieved FLOP/s = analytic useful FLOPs per step / step time, where FLOPs per token come from
`lmtrain.models.flops.train_flops_per_token` (matmuls + windowed attention, 3x forward; masked work
and recomputation not counted, the same numerator for both models), as a fraction of the matmul
peak measured in the same run (best of `--peak-runs` jitted f32 N x N matmuls).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmtrain.export.recurrentgemma import load_recurrentgemma, model_config_to_griffin_config
from lmtrain.models import LanguageModel, ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    try:
        from lmtrain.models.flops import train_flops_per_token as shared
    except ImportError:  # fallback: 6 x matmul params + causal-window attention scores/mixing
        n_heads_dims = cfg.num_heads * cfg.resolved_head_dim
        full = min(seq_len, cfg.window + 1)
        ctx = (full * (full + 1) / 2 + (seq_len - full) * (cfg.window + 1)) / seq_len
        matmul = (cfg.num_layers * 3 * cfg.width * cfg.mlp_width + cfg.width * cfg.vocab_size
                  + sum(3 * cfg.width * cfg.resolved_lru_width + 2 * cfg.resolved_lru_width ** 2 / cfg.num_heads
                        if k == "R" else 2 * cfg.width * n_heads_dims + 2 * cfg.width * cfg.resolved_head_dim
                        for k in cfg.layer_kinds))
        attention = 4 * n_heads_dims * ctx * cfg.layer_kinds.count("A")
        return 3 * (2 * matmul + attention)
    return shared(cfg, seq_len)


def matmul_peak(n: int, runs: int) -> float:
    """Best FLOP/s of a jitted float32 [n, n] @ [n, n]."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def make_step(loss_fn: Callable, opt: optax.GradientTransformation) -> Callable:
    """Jitted (params, opt_state, tokens_Bx(T+1)) -> (params, opt_state, loss), params/state donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens[:, :-1], tokens[:, 1:])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class Runner:
    """One model's train step with its own parameter and optimizer buffers (donated each step)."""

    def __init__(self, name: str, loss_fn: Callable, params, opt: optax.GradientTransformation):
        self.name, self.step = name, make_step(loss_fn, opt)
        self.params = jax.tree.map(jnp.array, params)  # private copy: buffers are donated
        self.opt_state = opt.init(self.params)
        self.times: list[float] = []
        self.compile_s = 0.0

    def run(self, tokens: jax.Array, timed: bool = True) -> float:
        start = time.perf_counter()
        self.params, self.opt_state, loss = self.step(self.params, self.opt_state, tokens)
        loss = float(loss)  # blocks
        if timed:
            self.times.append(time.perf_counter() - start)
        return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--pattern", default="RRA")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compiling")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (median reported)")
    p.add_argument("--scan-backends", default="auto",
                   help="comma-separated ModelConfig.scan_backend values; our model runs once per backend")
    p.add_argument("--remat", default="none", help="ModelConfig.remat of our model")
    p.add_argument("--no-peer-remat", action="store_true", help="skip the peer with gradient_checkpointing=True")
    p.add_argument("--no-peer", action="store_true", help="only our model(s)")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--peak-runs", type=int, default=10)
    args = p.parse_args()

    from recurrentgemma.jax import griffin

    backends = args.scan_backends.split(",")
    cfg = ModelConfig(vocab_size=args.vocab, width=args.width, num_layers=args.layers, pattern=args.pattern,
                      num_heads=args.heads, num_kv_heads=1, window=args.window, mlp_expansion=3,
                      logit_softcap=30.0, rope_fraction=0.5, rope_base=10_000.0, remat=args.remat)
    gcfg = model_config_to_griffin_config(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, args.vocab)
    segment_pos = jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), (args.batch, args.seq_len))
    peer = griffin.Griffin(gcfg)
    params = jax.jit(peer.init)(jax.random.key(0), tokens[:1, :1], segment_pos[:1, :1])["params"]
    opt = optax.adamw(1e-4, weight_decay=0.1)

    runners = []
    for backend in backends:
        model = load_recurrentgemma(
            nnx.eval_shape(lambda b=backend: LanguageModel(ModelConfig(**{**vars(cfg), "scan_backend": b}),
                                                           rngs=nnx.Rngs(0))), params)
        graphdef, state = nnx.split(model)

        def ours_loss(state, x, y, graphdef=graphdef):
            return cross_entropy(nnx.merge(graphdef, state)(x)[0], y)

        runners.append(Runner(f"lmtrain scan={backend} remat={args.remat}", ours_loss, state, opt))
    if not args.no_peer:
        for remat in ([False] if args.no_peer_remat else [True, False]):
            g = griffin.Griffin(gcfg, gradient_checkpointing=remat)

            def peer_loss(p, x, y, g=g):
                return cross_entropy(g.apply({"params": p}, x, segment_pos, return_cache=False)[0], y)

            runners.append(Runner(f"recurrentgemma gradient_checkpointing={remat}", peer_loss, params, opt))

    first_loss = {}
    for r in runners:
        start = time.perf_counter()
        first_loss[r.name] = r.run(tokens, timed=False)
        r.compile_s = time.perf_counter() - start
        for _ in range(args.warmup):
            r.run(tokens, timed=False)
    for _ in range(args.steps):
        for r in runners:
            r.run(tokens)

    peak = matmul_peak(args.peak_size, args.peak_runs)
    flops_step = train_flops_per_token(cfg, args.seq_len) * args.batch * args.seq_len
    n_tok = args.batch * args.seq_len
    print(f"# {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, jax {jax.__version__} "
          f"({jax.default_backend()}), B={args.batch} T={args.seq_len} width={args.width} layers={args.layers} "
          f"pattern={args.pattern} heads={args.heads} window={args.window} vocab={args.vocab} f32")
    print(f"# matmul peak ({args.peak_size}^2 f32, best of {args.peak_runs}): {peak / 1e9:.1f} GFLOP/s; "
          f"analytic train FLOPs/step: {flops_step / 1e9:.1f} G")
    print(f"{'model':48s} {'step s':>8s} {'min s':>7s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of peak':>7s} "
          f"{'compile s':>9s} {'loss0':>7s}")
    medians = {}
    for r in runners:
        med = statistics.median(r.times)
        medians[r.name] = med
        print(f"{r.name:48s} {med:8.3f} {min(r.times):7.3f} {n_tok / med:9.0f} {flops_step / med / 1e9:8.1f} "
              f"{flops_step / med / peak:7.1%} {r.compile_s:9.1f} {first_loss[r.name]:7.4f}")
    ours = [r.name for r in runners if r.name.startswith("lmtrain")]
    peers = [r.name for r in runners if r.name.startswith("recurrentgemma")]
    for o in ours:
        for q in peers:
            print(f"speedup {o} vs {q}: {medians[q] / medians[o]:.2f}x")
    if not np.allclose([first_loss[n] for n in ours + peers], first_loss[runners[0].name], rtol=1e-3):
        print("WARNING: first-step losses differ: the models do not compute the same function")


if __name__ == "__main__":
    main()
