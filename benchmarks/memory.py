"""Train-step activation memory vs sequence length: ours (RRA, G) and recurrentgemma's Griffin.

    python benchmarks/memory.py                                # T = 2k, 8k, 32k
    python benchmarks/memory.py --seq-lens 1024,4096 --no-peer # quick

For each model and T the train step of benchmarks/peer.py (forward + backward + AdamW, f32; the
loss on full logits for every model, i.e. our model's `loss_chunk=0` variant there) is
lowered on abstract inputs and compiled — nothing is run or allocated — and the compiled program's
`memory_analysis().temp_size_in_bytes` (everything but the arguments and outputs: activations
kept for the backward pass, gradients in flight, workspace) is reported with its ratio to the
shortest T. Linear growth gives ratio T / T0 (16x from 2k to 32k); the DESIGN target for R/A
patterns is <= 17x. G (global attention, max_len = T) and recurrentgemma's attention, which
materialises T x T logits, grow quadratically.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from peer import cross_entropy, make_step, parse_overrides  # sibling script: the same train step

from lmtrain.export.recurrentgemma import model_config_to_griffin_config
from lmtrain.models import LanguageModel, ModelConfig


def temp_bytes(loss_fn, params, tokens: jax.ShapeDtypeStruct) -> tuple[int, float]:
    """(temp bytes, compile seconds) of one jitted train step on abstract `params` and `tokens`."""
    opt = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = jax.eval_shape(opt.init, params)
    start = time.perf_counter()
    compiled = make_step(loss_fn, opt).lower(params, opt_state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def ours(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def loss(state, x, y):
        return cross_entropy(nnx.merge(graphdef, state)(x)[0], y)

    return loss, state


def peer(cfg: ModelConfig, seq_len: int, batch: int, remat: bool):
    from recurrentgemma.jax import griffin

    g = griffin.Griffin(model_config_to_griffin_config(cfg), gradient_checkpointing=remat)
    segment_pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    one = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(g.init, jax.random.key(0), one, one)["params"]

    def loss(p, x, y):
        return cross_entropy(g.apply({"params": p}, x, segment_pos, return_cache=False)[0], y)

    return loss, params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="2048,8192,32768")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--patterns", default="RRA,G", help="our model's patterns (G runs with max_len = T)")
    p.add_argument("--overrides", default="", help="ModelConfig overrides of our model, e.g. 'attn_block=128'")
    p.add_argument("--no-peer", action="store_true", help="skip recurrentgemma")
    p.add_argument("--peer-no-remat", action="store_true",
                   help="also recurrentgemma with gradient_checkpointing=False (as shipped: True)")
    args = p.parse_args()

    lens = [int(t) for t in args.seq_lens.split(",")]
    base = ModelConfig(vocab_size=args.vocab, width=args.width, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=1, window=args.window, **parse_overrides(args.overrides))
    rows: list[tuple[str, list[tuple[int, float]]]] = []
    for pattern in args.patterns.split(","):
        results = []
        for t in lens:
            cfg = ModelConfig(**{**vars(base), "pattern": pattern, "max_len": max(t, base.max_len)})
            tokens = jax.ShapeDtypeStruct((args.batch, t + 1), jnp.int32)
            results.append(temp_bytes(*ours(cfg), tokens))
            print(f"lmtrain {pattern} T={t}: {results[-1][0] / 2**20:.1f} MiB (compile {results[-1][1]:.1f}s)",
                  flush=True)
        rows.append((f"lmtrain {pattern} {args.overrides}".strip(), results))
    if not args.no_peer:
        for remat in [True, False] if args.peer_no_remat else [True]:
            results = []
            for t in lens:
                tokens = jax.ShapeDtypeStruct((args.batch, t + 1), jnp.int32)
                results.append(temp_bytes(*peer(ModelConfig(**{**vars(base), "pattern": "RRA"}), t, args.batch,
                                                 remat), tokens))
                print(f"recurrentgemma remat={remat} T={t}: {results[-1][0] / 2**20:.1f} MiB "
                      f"(compile {results[-1][1]:.1f}s)", flush=True)
            rows.append((f"recurrentgemma RRA gradient_checkpointing={remat}", results))

    print(f"\n# {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, jax {jax.__version__} "
          f"({jax.default_backend()}); B={args.batch} width={args.width} layers={args.layers} heads={args.heads} "
          f"window={args.window} vocab={args.vocab} f32; train-step temp memory, MiB (ratio to T={lens[0]})")
    print(f"{'model':50s} " + " ".join(f"{'T=' + str(t):>18s}" for t in lens))
    for name, results in rows:
        first = results[0][0]
        print(f"{name:50s} " + " ".join(f"{b / 2**20:10.1f} ({b / first:4.1f}x)" for b, _ in results))


if __name__ == "__main__":
    main()
