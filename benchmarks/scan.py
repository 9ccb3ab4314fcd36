"""Benchmark of the linear-recurrence backends (lmtrain.models.scan) against streaming-copy bandwidth.

    python benchmarks/scan.py                       # default shapes, every backend
    python benchmarks/scan.py --shapes 8x2048x256 --autodiff

For each (B, T, D) and backend it times the forward pass and forward+backward (`jax.vjp` with a
cotangent for h), median of `--runs` calls after `--warmup`, and reports the effective bandwidth:
the bytes a minimal implementation must move (f32) divided by the time,

    forward:          read a, x; write h                      3 * B*T*D * 4 bytes
    forward+backward: forward + read a, h, dh; write da, dx   8 * B*T*D * 4 bytes

next to a streaming-copy bandwidth (`v + 1` on a large f32 array: read + write, in place and into a
fresh output) measured in the same run. The recurrence is memory-bound, so bandwidth / copy
bandwidth is its figure of merit.
`temp MiB` is the compiled program's temporary memory; `saved` is what autodiff keeps from forward
to backward besides the inputs, in [B,T,D] f32 arrays (in a deep network these residuals of every
layer are alive at once, so this is the column that sets training memory).
`--autodiff` adds fwd+bwd rows that differentiate the backend by plain JAX autodiff instead of the
shared custom_vjp (beware: for the in-place `linear` backend that is quadratic in T).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from lmtrain.models.scan import BACKENDS, linear_recurrence, resolve_backend

F32 = 4


def median_seconds(fn: Callable[..., object], args: tuple, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(mib: int, warmup: int, runs: int) -> tuple[float, float]:
    """GB/s of a jitted streaming `v + 1` (one read, one write) over `mib` MiB of float32: in place
    (input donated; the memory-system limit) and into a fresh output (what an op pays on JAX CPU,
    where every large new buffer is freshly mapped memory and page-faults on first touch)."""
    v = jnp.ones((mib * 2**20 // F32,), jnp.float32)
    fresh = 2 * v.nbytes / median_seconds(jax.jit(lambda v: v + 1.0), (v,), warmup, runs) / 1e9
    add_one_in_place = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    box = [v]

    def in_place() -> jax.Array:
        box[0] = add_one_in_place(box[0])
        return box[0]

    return 2 * v.nbytes / median_seconds(in_place, (), warmup, runs) / 1e9, fresh


def saved_residual_bytes(fn: Callable[..., object], *args: jax.Array) -> int:
    """Bytes that reverse-mode autodiff of `fn` keeps from forward to backward, excluding the inputs
    (which the caller holds anyway); parsed from `jax.ad_checkpoint.print_saved_residuals`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    total = 0
    for line in out.getvalue().splitlines():
        match = re.match(r"(bf16|pred|[fsu]\d+)\[([\d,]*)\]", line)
        if match and "from the argument" not in line:
            dtype, dims = match.groups()
            bits = {"bf16": 16, "pred": 8}.get(dtype) or int(dtype[1:])
            total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_shape(text: str) -> tuple[int, int, int]:
    B, T, D = (int(v) for v in text.lower().split("x"))
    return B, T, D


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x2048x256,4x8192x512,1x32768x1024",
                        help="comma-separated BxTxD")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backend names")
    parser.add_argument("--chunk-size", type=int, default=128, help="chunk length of the chunked backend")
    parser.add_argument("--unroll", type=int, default=1, help="loop unroll of the sequential loops")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--runs", type=int, default=5, help="timed calls; the median is reported")
    parser.add_argument("--copy-mib", type=int, default=256, help="array size of the copy-bandwidth probe")
    parser.add_argument("--autodiff", action="store_true",
                        help="also time fwd+bwd by plain autodiff of each backend (no custom_vjp)")
    args = parser.parse_args()
    backends = args.backends.split(",")
    for name in backends:
        resolve_backend(name)  # fails early with a suggestion

    print(f"jax {jax.__version__} on {jax.default_backend()}; nproc {os.cpu_count()}; CPU {cpu_model()}; "
          f"auto -> {resolve_backend('auto')}; chunk_size {args.chunk_size}; unroll {args.unroll}; "
          f"median of {args.runs} after {args.warmup} warm-up")
    copy_gbs, fresh_gbs = copy_bandwidth(args.copy_mib, args.warmup, args.runs)
    print(f"streaming copy (v + 1 over {args.copy_mib} MiB f32): {copy_gbs:.2f} GB/s in place, "
          f"{fresh_gbs:.2f} GB/s into a fresh output; '/ copy' below divides by the in-place figure\n")
    print("| B x T x D | backend | pass | time ms | GB/s | / copy | temp MiB | saved |")
    print("|---|---|---|---:|---:|---:|---:|---:|")

    rng = np.random.default_rng(0)
    for B, T, D in map(parse_shape, args.shapes.split(",")):
        a = jnp.asarray(rng.uniform(0.9, 1.0, (B, T, D)), jnp.float32)
        x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
        h0 = jnp.zeros((B, D), jnp.float32)
        g = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
        array_bytes = B * T * D * F32
        for name in backends:
            kw = {"chunk_size": args.chunk_size, "unroll": args.unroll}

            def ours(a, x, h0, name=name, kw=kw):
                return linear_recurrence(a, x, h0, backend=name, **kw)

            def plain(a, x, h0, name=name, kw=kw):
                return BACKENDS[resolve_backend(name)](a, x, h0, reverse=False, **kw)

            rows = [("fwd", ours, False, 3), ("fwd+bwd", ours, True, 8)]
            if args.autodiff:
                rows.append(("fwd+bwd autodiff", plain, True, 8))
            for label, fn, backward, arrays in rows:
                if backward:
                    def step(a, x, h0, g, fn=fn):
                        (h, hT), vjp = jax.vjp(fn, a, x, h0)
                        return vjp((g, jnp.zeros_like(hT)))
                else:
                    def step(a, x, h0, g, fn=fn):
                        return fn(a, x, h0)
                compiled = jax.jit(step).lower(a, x, h0, g).compile()
                temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
                seconds = median_seconds(compiled, (a, x, h0, g), args.warmup, args.runs)
                gbs = arrays * array_bytes / seconds / 1e9
                saved = f"{saved_residual_bytes(fn, a, x, h0) / array_bytes:.1f}" if backward else ""
                print(f"| {B}x{T}x{D} | {name} | {label} | {seconds * 1e3:.1f} | {gbs:.2f} | "
                      f"{gbs / copy_gbs:.2f} | {temp_mib:.0f} | {saved} |", flush=True)

    copy_end, fresh_end = copy_bandwidth(args.copy_mib, args.warmup, args.runs)
    print(f"\nstreaming copy again at the end: {copy_end:.2f} GB/s in place, {fresh_end:.2f} GB/s fresh "
          "(ratios above use the first)")


if __name__ == "__main__":
    main()
