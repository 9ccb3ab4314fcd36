"""Decode memory vs context length, and prefill / decode throughput, of `lmtrain.sample`.

    python benchmarks/decode.py                                   # RRA, MA, G at 1k, 16k, 128k; RRA throughput
    python benchmarks/decode.py --contexts 1024,4096 --patterns RRA,G --throughput none   # quick
    python benchmarks/decode.py --throughput RRA,MA,G --batches 1,8 --new-tokens 256

Part 1 (memory), for each pattern and context C (G layers get attention.max_len = C, the KV cache a
context of C needs; R, A and M layers have no such field: their configs are the same at every C):
  state      bytes of the decode state, sum of leaf nbytes of `jax.eval_shape(model.init_state, B)`
  step temp  `memory_analysis().temp_size_in_bytes` of the compiled decode step (one token per row
             through the model with the state, then sampling; the state donated), lowered on abstract
             inputs: nothing is allocated
  step total arguments (params + state) + outputs - aliased (the donated state) + temp: what the step
             holds at its peak
  step ms    median wall time of that step on this machine (zero state; attention over a fixed-size
             buffer costs the same at any fill level, so this is the cost at a full context)
R/A/M state is independent of C (a recurrent state, a window-sized cache); G's grows linearly.

Part 2 (throughput), `--throughput` patterns at context `--prefill-len`: prefill tokens/s of one jitted
`model(tokens)` call on [B, prefill_len] (median of `--repeats` after a warm-up call), and decode
tokens/s of `lmtrain.sample.generate` (a 16-token prompt, `--new-tokens` new tokens per row, plain
temperature sampling, timed after a compiling warm-up call; B x new tokens / wall time, prefill of
the 16 tokens included).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.sample import SamplingParams, decode_step, generate, row_keys, sample_logits

MIB = 2.0**20


def model_config(pattern: str, context: int, args: argparse.Namespace) -> ModelConfig:
    changes = {"vocab_size": args.vocab, "width": args.width, "num_layers": args.layers, "pattern": pattern,
               "attention.num_heads": args.heads, "attention.num_kv_heads": 1, "rglru.num_heads": args.heads,
               "attention.window": args.window}
    if "G" in pattern:
        changes["attention.max_len"] = context
    return updated(ModelConfig(), changes)


def step_program(graphdef, batch: int):
    """The jitted decode step: token per row + state -> next token per row + state (state donated)."""
    def step(params, state, tokens_B, key, sp):
        logits_BxV, state = decode_step(nnx.merge(graphdef, params), state, tokens_B)
        return sample_logits(logits_BxV, row_keys(key, jnp.arange(batch), jnp.int32(0)), sp), state

    return jax.jit(step, donate_argnums=(1,))


def memory_row(pattern: str, context: int, args: argparse.Namespace) -> dict:
    cfg = model_config(pattern, context, args)
    b = args.batch
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    state = jax.eval_shape(lambda: abstract.init_state(b))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    program = step_program(graphdef, b)
    sp = jax.eval_shape(lambda: SamplingParams().arrays())
    start = time.perf_counter()
    compiled = program.lower(params, state, jax.ShapeDtypeStruct((b,), jnp.int32), jax.eval_shape(
        lambda: jax.random.key(0)), sp).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    # time the step on real (zero) inputs
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    params = nnx.split(model)[1]
    state = model.init_state(b)
    tokens, key, sp = jnp.zeros((b,), jnp.int32), jax.random.key(0), SamplingParams().arrays()
    times = []
    for _ in range(args.step_repeats + 1):
        t0 = time.perf_counter()
        tokens, state = compiled(params, state, tokens, key, sp)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t0)
    return {"pattern": pattern, "context": context, "state": state_bytes, "temp": mem.temp_size_in_bytes,
            "total": total, "step_ms": 1e3 * statistics.median(times[1:]), "compile_s": compile_s}


def throughput_rows(pattern: str, args: argparse.Namespace) -> list[dict]:
    cfg = model_config(pattern, max(args.prefill_len, 16 + args.new_tokens), args)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0][:, -1])
    rows = []
    for b in args.batches:
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, args.prefill_len)), jnp.int32)
        jax.block_until_ready(forward(params, tokens))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(params, tokens))
            times.append(time.perf_counter() - t0)
        prefill = b * args.prefill_len / statistics.median(times)
        prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, 16)).tolist()
        t0 = time.perf_counter()
        generate(model, prompts, max_new_tokens=args.new_tokens, seed=0)  # compiles
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=args.new_tokens, seed=1)
        seconds = time.perf_counter() - t0
        new = sum(len(g.tokens) for g in out)
        rows.append({"pattern": pattern, "batch": b, "prefill": prefill, "decode": new / seconds,
                     "first_s": first})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", default="RRA,MA,G")
    p.add_argument("--contexts", default="1024,16384,131072")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="rows of the memory part")
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--throughput", default="RRA", help="patterns of the throughput part, or 'none'")
    p.add_argument("--batches", default="1,8", help="batch sizes of the throughput part")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    print(f"# {platform.node()} {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; width {args.width}, {args.layers} layers, "
          f"{args.heads} heads (1 kv head), window {args.window}, vocab {args.vocab}, batch {args.batch}, float32",
          flush=True)
    print("\n| pattern | context | state MiB | step temp MiB | step total MiB | step ms |\n|---|---|---|---|---|---|")
    for pattern in args.patterns.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            r = memory_row(pattern, context, args)
            print(f"| {pattern} | {context:,} | {r['state'] / MIB:.2f} | {r['temp'] / MIB:.2f} | "
                  f"{r['total'] / MIB:.2f} | {r['step_ms']:.2f} |", flush=True)
    if args.throughput != "none":
        print(f"\n| pattern | batch | prefill tokens/s (T={args.prefill_len}) | decode tokens/s "
              f"({args.new_tokens} new) | first call s (compile) |\n|---|---|---|---|---|")
        for pattern in args.throughput.split(","):
            for r in throughput_rows(pattern, args):
                print(f"| {pattern} | {r['batch']} | {r['prefill']:,.0f} | {r['decode']:,.0f} | {r['first_s']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
