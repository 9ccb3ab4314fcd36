"""Train-step activation memory vs sequence length: ours (RRA, G, ...) and recurrentgemma's Griffin.

    python benchmarks/memory.py                                # T = 2k, 8k, 32k
    python benchmarks/memory.py --seq-lens 1024,4096 --no-peer # quick
    python benchmarks/memory.py --patterns RRA,MA,G --no-peer  # + Samba-style (Mamba-2 + local attention)

For each model and T the train step of benchmarks/peer.py (forward + backward + AdamW, f32; the
loss on full logits for every model, i.e. our model's `loss_chunk=0` variant there) is
lowered on abstract inputs and compiled — nothing is run or allocated — and the compiled program's
`memory_analysis().temp_size_in_bytes` (everything but the arguments and outputs: activations
kept for the backward pass, gradients in flight, workspace) is reported with its ratio to the
shortest T. Linear growth gives ratio T / T0 (16x from 2k to 32k); the DESIGN target for R/A
patterns is <= 17x. G (global attention, attention.max_len = T) and recurrentgemma's attention,
which materialises T x T logits, grow quadratically.

For patterns with Mamba-2 (M) layers it also prints what one float32 [B, T, H, P, N] array per M
layer (every step's SSM state, what a scan over time would keep for the backward pass) would take,
B*T*H*P*N*4*(M layers), next to the measured temp bytes: the chunked SSD form keeps only chunk
states [B, T/Q, H, P, N], so the measured bytes should be a small fraction of it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from peer import cross_entropy, make_step, parse_overrides  # sibling script: the same train step

from lmtrain.configlib import updated
from lmtrain.export.recurrentgemma import model_config_to_griffin_config
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.models.mixers.mamba import dims as mamba_dims


def compile_step(loss_fn, params, tokens: jax.ShapeDtypeStruct):
    """(compiled program, compile seconds) of one jitted train step on abstract `params` and `tokens`."""
    opt = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = jax.eval_shape(opt.init, params)
    start = time.perf_counter()
    compiled = make_step(loss_fn, opt).lower(params, opt_state, tokens).compile()
    return compiled, time.perf_counter() - start


def temp_bytes(loss_fn, params, tokens: jax.ShapeDtypeStruct) -> tuple[int, float]:
    """(temp bytes, compile seconds) of one jitted train step on abstract `params` and `tokens`."""
    compiled, seconds = compile_step(loss_fn, params, tokens)
    return compiled.memory_analysis().temp_size_in_bytes, seconds


def largest_f32_array(hlo: str) -> tuple[int, str]:
    """(elements, shape) of the largest float32 array any instruction of the optimized HLO text produces."""
    best = (0, "")
    for dims in re.findall(r"\bf32\[([\d,]+)\]", hlo):
        best = max(best, (math.prod(int(d) for d in dims.split(",")), f"f32[{dims}]"))
    return best


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
    p.add_argument("--patterns", default="RRA,G",
                   help="our model's patterns, e.g. RRA,MA,G (G runs with attention.max_len = T)")
    p.add_argument("--overrides", default="",
                   help="ModelConfig overrides of our model, e.g. 'attention.block=0,mamba.chunk=128' (the former "
                        "flat keys such as attn_block still work)")
    p.add_argument("--no-peer", action="store_true", help="skip recurrentgemma")
    p.add_argument("--peer-no-remat", action="store_true",
                   help="also recurrentgemma with gradient_checkpointing=False (as shipped: True)")
    args = p.parse_args()

    lens = [int(t) for t in args.seq_lens.split(",")]
    base = updated(ModelConfig(), {"vocab_size": args.vocab, "width": args.width, "num_layers": args.layers,
                                   "attention.num_heads": args.heads, "rglru.num_heads": args.heads,
                                   "attention.num_kv_heads": 1, "attention.window": args.window,
                                   **parse_overrides(args.overrides)})
    rows: list[tuple[str, list[tuple[int, float]]]] = []
    # (T, measured, B*T*H*P*N*4*layers, largest f32 array / (B*T*H*P*N), its shape)
    per_step_state: list[tuple[str, list[tuple[int, int, int, float, str]]]] = []
    for pattern in args.patterns.split(","):
        results, states = [], []
        for t in lens:
            cfg = updated(base, {"pattern": pattern, "attention.max_len": max(t, base.attention.max_len)})
            tokens = jax.ShapeDtypeStruct((args.batch, t + 1), jnp.int32)
            compiled, seconds = compile_step(*ours(cfg), tokens)
            results.append((compiled.memory_analysis().temp_size_in_bytes, seconds))
            note = ""
            if "M" in cfg.layer_kinds:
                _, h, p_, _, n = mamba_dims(cfg)
                one = args.batch * t * h * p_ * n  # elements of one [B, T, H, P, N] array
                largest, shape = largest_f32_array(compiled.as_text())
                states.append((t, results[-1][0], one * 4 * cfg.layer_kinds.count("M"), largest / one, shape))
                note = (f"; one f32 [B,T,H,P,N] per M layer would be {states[-1][2] / 2**20:.1f} MiB; largest f32 "
                        f"array in the program {shape} = {largest / one:.3f} x [B,T,H,P,N]")
            del compiled
            print(f"lmtrain {pattern} T={t}: {results[-1][0] / 2**20:.1f} MiB (compile {results[-1][1]:.1f}s){note}",
                  flush=True)
        rows.append((f"lmtrain {pattern} {args.overrides}".strip(), results))
        if states:
            per_step_state.append((f"lmtrain {pattern} {args.overrides}".strip(), states))
    if not args.no_peer:
        for remat in [True, False] if args.peer_no_remat else [True]:
            results = []
            for t in lens:
                tokens = jax.ShapeDtypeStruct((args.batch, t + 1), jnp.int32)
                results.append(temp_bytes(*peer(updated(base, {"pattern": "RRA"}), t, args.batch, remat), tokens))
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
    if per_step_state:
        print("\n# M layers: measured temp MiB / one f32 [B,T,H,P,N] array per M layer (B*T*H*P*N*4*layers) MiB "
              "(ratio); largest f32 array of the compiled step in units of B*T*H*P*N elements (its shape)")
        for name, states in per_step_state:
            for t, m, f, largest, shape in states:
                print(f"{name:40s} T={t:<6d} {m / 2**20:9.1f} / {f / 2**20:9.1f} MiB ({m / f:5.1%}); "
                      f"largest array {largest:.4f} x ({shape})")


if __name__ == "__main__":
    main()
