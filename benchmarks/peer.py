"""Train-step throughput of our Griffin vs recurrentgemma's (the peer), same config and weights.

    python benchmarks/peer.py                                    # width 256, 6 layers RRA, T=2048, B=4
    python benchmarks/peer.py --seq-len 256 --batch 2 --steps 3  # quick run
    python benchmarks/peer.py --ours "" --ours "scan_layers=True" --ours "loss_chunk=0"  # our variants
    python benchmarks/peer.py --ours "" --ours "pattern=M" --ours "pattern=MA"  # + ours-only Mamba-2 / Samba rows
    python benchmarks/peer.py --profile 25                       # + where each step's time goes
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/peer.py  # transparent huge pages

One step = forward + backward + AdamW (optax) update of all parameters, next-token cross-entropy,
float32, jitted with parameters and optimizer state donated. The peer is
`recurrentgemma.jax.griffin.Griffin` as shipped (gradient_checkpointing=True: every residual block
rematerialised) and with gradient_checkpointing=False. Each `--ours` is a comma-separated list of
ModelConfig overrides of our model ("" = the shipped defaults), keys dotted into the config's
sections (`attention.block=0`, `rglru.width=512`, `mamba.chunk=128`; the former flat keys such as
`attn_block` or `window` still work, see `LEGACY_KEYS`); our loss is
`lmtrain.models.loss.chunked_cross_entropy` on `model.hidden(...)` (the key `loss_chunk` sets its
chunk; `loss_chunk=0` computes full logits with `model(...)` instead). The models with the peer's
layer kinds start from the same weights (Griffin's initializer, loaded into ours with
lmtrain.export.recurrentgemma), so their first losses agree. A variant with other layer kinds
(`pattern=M`: Mamba-2, `pattern=MA`: Samba-style; recurrentgemma has neither) starts from our own
initializer and is an ours-only row, "(own init)", timed in the same rounds. After `--warmup` steps
each, the models are timed in interleaved rounds (one step of each per round, so load from other
processes hits all alike); medians over `--steps` rounds are reported, with the fastest step, the
process CPU time per step (all threads; less sensitive to other processes than wall time) and the
memory page-faulted per step (JAX CPU maps fresh memory for each step's temporaries; on a VM a
fault costs microseconds).

Achieved FLOP/s = analytic useful FLOPs per step / median step time, where FLOPs per token come
from `lmtrain.models.flops.train_flops_per_token` of each row's config (each mixer's declared count,
3x forward; masked work and recomputation not counted: the same numerator for our Griffin and the
peer's), as a fraction of the matmul peak measured in the same run (best of `--peak-runs` jitted f32
N x N matmuls).

`--profile N` traces two steps of each model with `jax.profiler` and prints the N source lines
(of lmtrain, recurrentgemma, optax) whose XLA ops took the most thread time, exclusive of nested
ops and summed over threads.
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import glob
import gzip
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmtrain.configlib import updated
from lmtrain.export.recurrentgemma import load_recurrentgemma, model_config_to_griffin_config
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.models.flops import train_flops_per_token
from lmtrain.models.loss import chunked_cross_entropy

LOSS_CHUNK = 256  # positions per chunk of our loss (`--ours loss_chunk=0`: the plain logits path)


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

    def __init__(self, name: str, loss_fn: Callable, params, opt: optax.GradientTransformation,
                 flops_per_token: float, shared_weights: bool = True):
        self.name, self.step = name, make_step(loss_fn, opt)
        self.flops_per_token, self.shared_weights = flops_per_token, shared_weights
        self.params = jax.tree.map(jnp.array, params)  # private copy: buffers are donated
        self.opt_state = opt.init(self.params)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.faulted: list[int] = []
        self.compile_s = self.loss0 = 0.0

    def compile(self, tokens: jax.Array) -> None:
        start = time.perf_counter()
        self.compiled = self.step.lower(self.params, self.opt_state, tokens).compile()
        self.compile_s = time.perf_counter() - start

    def run(self, tokens: jax.Array, timed: bool = True) -> float:
        usage, cpu, start = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, tokens)
        loss = float(loss)  # blocks
        if timed:
            self.wall.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - cpu)
            self.faulted.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt)
        return loss

    def profile(self, tokens: jax.Array, top: int) -> None:
        """Prints the `top` source lines whose XLA ops took most thread time in two traced steps."""
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(2):
                    self.run(tokens, timed=False)
            (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
            events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
        hlo = self.compiled.as_text()
        per_line, ops = collections.Counter(), collections.defaultdict(collections.Counter)
        where = _hlo_source_lines(hlo)
        for e, exclusive in _exclusive_times(events):
            if e["name"] in where:
                line, op = where[e["name"]]
                per_line[line] += exclusive / 2e6  # seconds per step
                ops[line][op] += exclusive / 2e6
        total = sum(per_line.values())
        print(f"\n## profile: {self.name}: {total:.3f} s of XLA op time per step (summed over threads)")
        for line, s in per_line.most_common(top):
            top_ops = ", ".join(f"{op} {t:.3f}" for op, t in ops[line].most_common(3))
            print(f"{s:7.3f} s {s / total:6.1%}  {line:38s} {top_ops}")


def _hlo_source_lines(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (innermost lmtrain/recurrentgemma/optax source line, op name)."""
    files = dict(re.findall(r'^(\d+) "(.*)"$', hlo.split("FunctionNames")[0], re.M))
    locs = {i: (files[f], ln) for i, f, ln in
            re.findall(r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)", hlo, re.M)}
    frames = {i: (loc, parent) for i, loc, parent in
              re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", hlo, re.M)}

    def source(frame: str) -> str:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            (file, line), frame = locs[frames[frame][0]], frames[frame][1]
            if any(k in file for k in ("lmtrain/", "recurrentgemma/", "optax/")):
                return "/".join(file.split("/")[-2:]) + f":{line}"
        return "other (jax/einops internals)"

    pattern = r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"(?: stack_frame_id=(\d+))?'
    return {name: (source(frame) if frame else "other (jax/einops internals)", op.split("/")[-1])
            for name, op, frame in re.findall(pattern, hlo, re.M)}


def _exclusive_times(events: list[dict]):
    """(event, duration minus the durations of events nested in it on the same thread)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack, child = [], collections.Counter()
        for e in thread_events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                child[id(stack[-1])] += e["dur"]
            stack.append(e)
        for e in thread_events:
            yield e, e["dur"] - child[id(e)]


# The flat ModelConfig keys before the per-mixer sections (commit 26f1d39 and earlier) -> their dotted keys now
LEGACY_KEYS = {
    "num_heads": ("attention.num_heads", "rglru.num_heads"),  # Griffin's one head count: both
    "num_kv_heads": ("attention.num_kv_heads",), "head_dim": ("attention.head_dim",),
    "window": ("attention.window",), "attn_block": ("attention.block",), "max_len": ("attention.max_len",),
    "rope_base": ("attention.rope_base",), "rope_fraction": ("attention.rope_fraction",),
    "lru_width": ("rglru.width",), "conv_width": ("rglru.conv_width",), "lru_c": ("rglru.c",),
    "lru_min_rad": ("rglru.min_rad",), "lru_max_rad": ("rglru.max_rad",),
    "lru_sqrt_max_grad": ("rglru.sqrt_max_grad",),
}


def parse_overrides(spec: str) -> dict:
    """'scan_layers=False,attention.block=128' -> {'scan_layers': False, 'attention.block': 128}.

    Keys are ModelConfig fields, dotted into sections (`attention.window`, `rglru.width`, `mamba.chunk`);
    the former flat keys (`attn_block`, `window`, `num_heads`, ...) are translated (`LEGACY_KEYS`).
    """
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        for k in LEGACY_KEYS.get(key.strip(), (key.strip(),)):
            out[k] = parsed
    return out


def wait_for_quiet(max_load: float, max_wait_s: float) -> None:
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < max_wait_s:
        print(f"load average {os.getloadavg()[0]:.1f} > {max_load}: waiting 30 s", flush=True)
        time.sleep(30)


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
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model after the compiling one")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (medians reported)")
    p.add_argument("--ours", action="append", default=None,
                   help="ModelConfig overrides of one variant of our model, e.g. 'scan_backend=linear', "
                        "'attention.block=0', 'pattern=MA'; repeat for several (default: one variant, the "
                        "shipped defaults)")
    p.add_argument("--peer-remat", default="True,False",
                   help="recurrentgemma gradient_checkpointing values to run ('' = no peer)")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--peak-runs", type=int, default=10)
    p.add_argument("--profile", type=int, default=0, help="print the top N source lines of each model's step")
    p.add_argument("--max-load", type=float, default=2.5, help="wait for the 1-min load average to drop below")
    p.add_argument("--max-wait-s", type=float, default=0.0, help="... for at most this long (0: do not wait)")
    args = p.parse_args()

    from recurrentgemma.jax import griffin

    cfg = updated(ModelConfig(), {
        "vocab_size": args.vocab, "width": args.width, "num_layers": args.layers, "pattern": args.pattern,
        "attention.num_heads": args.heads, "rglru.num_heads": args.heads, "attention.num_kv_heads": 1,
        "attention.window": args.window, "mlp_expansion": 3, "logit_softcap": 30.0,
        "attention.rope_fraction": 0.5, "attention.rope_base": 10_000.0})
    gcfg = model_config_to_griffin_config(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, args.vocab)
    segment_pos = jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), (args.batch, args.seq_len))
    one = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(griffin.Griffin(gcfg).init)(jax.random.key(0), one, one)["params"]
    opt = optax.adamw(1e-4, weight_decay=0.1)

    runners = []
    for spec in args.ours or [""]:
        overrides = parse_overrides(spec)
        loss_chunk = overrides.pop("loss_chunk", LOSS_CHUNK)
        variant = updated(cfg, overrides)
        abstract = nnx.eval_shape(lambda v=variant: LanguageModel(v, rngs=nnx.Rngs(0)))
        # Griffin's weights fit a variant with the peer's layer kinds; any other (M, MA, G, ...) starts from
        # our own initializer: an ours-only row, timed alongside but not computing the peer's function
        shared = variant.layer_kinds == cfg.layer_kinds and set(variant.pattern) <= set("RA")
        if shared:
            model = load_recurrentgemma(abstract, params)
        else:
            model = LanguageModel(variant, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def ours_loss(state, x, y, graphdef=graphdef, loss_chunk=loss_chunk):
            model = nnx.merge(graphdef, state)
            if not loss_chunk:  # the plain path: full [B, T, V] logits
                return cross_entropy(model(x)[0], y)
            total, _ = chunked_cross_entropy(model.hidden(x)[0], model.embedder.embedding[...], y,
                                             jnp.ones(y.shape, bool), softcap=model.cfg.logit_softcap,
                                             chunk=loss_chunk)
            return total / y.size

        name = f"lmtrain {spec or 'defaults'}" + ("" if shared else " (own init)")
        runners.append(Runner(name, ours_loss, state, opt, train_flops_per_token(variant, args.seq_len),
                              shared_weights=shared))
    for remat in filter(None, args.peer_remat.split(",")):
        g = griffin.Griffin(gcfg, gradient_checkpointing=ast.literal_eval(remat))

        def peer_loss(p, x, y, g=g):
            return cross_entropy(g.apply({"params": p}, x, segment_pos, return_cache=False)[0], y)

        runners.append(Runner(f"recurrentgemma gradient_checkpointing={remat}", peer_loss, params, opt,
                              train_flops_per_token(cfg, args.seq_len)))

    for r in runners:
        r.compile(tokens)
        r.loss0 = r.run(tokens, timed=False)
        print(f"compiled {r.name} in {r.compile_s:.0f} s", flush=True)
        for _ in range(args.warmup):
            r.run(tokens, timed=False)
    wait_for_quiet(args.max_load, args.max_wait_s)
    load_before = os.getloadavg()[0]
    for _ in range(args.steps):
        for r in runners:
            r.run(tokens)
    peak = matmul_peak(args.peak_size, args.peak_runs)
    load_after = os.getloadavg()[0]

    n_tok = args.batch * args.seq_len
    print(f"\n# {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, jax {jax.__version__} "
          f"({jax.default_backend()}), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"load average {load_before:.1f} before / {load_after:.1f} after timing "
          f"(1/5/15 min at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"# B={args.batch} T={args.seq_len} width={args.width} layers={args.layers} pattern={args.pattern} "
          f"heads={args.heads} window={args.window} vocab={args.vocab} f32; {args.steps} interleaved rounds")
    print(f"# matmul peak ({args.peak_size}^2 f32, best of {args.peak_runs}): {peak / 1e9:.1f} GFLOP/s; "
          f"analytic train FLOPs/step of the peer's config: "
          f"{train_flops_per_token(cfg, args.seq_len) * n_tok / 1e9:.1f} G")
    print(f"{'model':52s} {'step s':>7s} {'min s':>6s} {'cpu s':>6s} {'fault MiB':>9s} {'tokens/s':>8s} "
          f"{'GFLOP':>6s} {'GFLOP/s':>7s} {'of peak':>7s} {'compile s':>9s} {'loss0':>7s}")
    for r in runners:
        med, flops_step = statistics.median(r.wall), r.flops_per_token * n_tok
        print(f"{r.name:52s} {med:7.3f} {min(r.wall):6.3f} {statistics.median(r.cpu):6.2f} "
              f"{statistics.median(r.faulted) * resource.getpagesize() / 2**20:9.0f} {n_tok / med:8.0f} "
              f"{flops_step / 1e9:6.1f} {flops_step / med / 1e9:7.1f} {flops_step / med / peak:7.1%} "
              f"{r.compile_s:9.0f} {r.loss0:7.4f}")
    ours = [r for r in runners if r.name.startswith("lmtrain")]
    for o in ours:
        for q in runners[len(ours):]:
            print(f"ours ({o.name}) vs {q.name}: {statistics.median(q.wall) / statistics.median(o.wall):.2f}x "
                  f"(median wall), {min(q.wall) / min(o.wall):.2f}x (min wall), "
                  f"{statistics.median(q.cpu) / statistics.median(o.cpu):.2f}x (cpu)")
    same = [r.loss0 for r in runners if r.shared_weights]
    if same and not np.allclose(same, same[0], rtol=1e-3):
        print("WARNING: first-step losses differ: the models do not compute the same function")
    if args.profile:
        for r in runners:
            r.profile(tokens, args.profile)


if __name__ == "__main__":
    main()
