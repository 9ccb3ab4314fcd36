"""Train-step throughput and MFU of the presets, and weak scaling over simulated CPU devices.

    python benchmarks/train_step.py                                    # both parts, defaults below
    python benchmarks/train_step.py --parts throughput --configs demo  # one config only
    python benchmarks/train_step.py --parts scaling --devices 1,2,4 --meshes fsdp --steps 3  # quick
    python benchmarks/train_step.py --parts throughput --configs griffin_400m,griffin_1b \
        --overrides data.seq_len=8192 data.global_batch_size=8      # on an accelerator
    python benchmarks/train_step.py --parts throughput --configs demo \
        --demo-overrides model.pattern=MA model.attention.block=0 model.mamba.chunk=32  # model.<section>.<key>

Part 1 (throughput): `lmtrain.train.step.Trainer(cfg, mesh).train_step` (forward + backward +
optimizer update, the state donated) for each config with the overrides printed next to it. The
first `--warmup` steps (compilation included) are excluded; each step is timed on its own up to
`jax.block_until_ready` and the median of `--steps` steps is reported. tokens/s = global batch x
seq_len / median step time. MFU = analytic FLOPs per step (`lmtrain.models.flops.
train_flops_per_token`: useful work, no remat recomputation) / (step time x devices x peak), the
peak per device coming from `lmtrain.train.metrics.device_peak_flops()` in the same process (on CPU:
the best jitted float32 N x N matmul rate, measured in this run). Griffin-100M runs on CPU at a
feasible shape: `--griffin-overrides` (default: global batch 1 x seq_len 1024, the shortest length
the preset's 1024-token attention window allows; float32 compute since bf16 matmuls are slow on
CPU; byte tokenizer so no tokenizer file is needed; vocab stays 32768 so the model keeps its preset
shape) and `--griffin-steps` timed steps.

Part 2 (scaling): weak scaling over N = 1, 2, 4, 8 simulated CPU devices, one subprocess per N with
` --xla_force_host_platform_device_count=N` appended to the existing XLA_FLAGS. Global batch = N x
`--per-device-batch`, mesh fsdp=N (and data=N), the tiny demo model. Efficiency = tokens/s at N /
(N x tokens/s at 1). Simulated devices share this machine's physical cores, so this measures the
overhead of the sharded program (collectives, partitioning, per-device dispatch), not a speedup:
the ideal here is constant tokens/s, i.e. efficiency 1/N (on N real devices the ideal is 1).

Before measuring, the script waits (up to `--max-wait-s`) for the 1-minute load average to drop
below `--max-load`, and prints the load average with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"demo": "configs/demo.yaml", "griffin_100m": "configs/griffin_100m.yaml"}
GRIFFIN_CPU_OVERRIDES = ("data.global_batch_size=1", "data.seq_len=1024", "model.dtype=float32",
                         "data.tokenizer.kind=byte")
RESULT_MARK = "RESULT_JSON "


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(max_load: float, max_wait_s: float) -> str:
    """Sleeps in 60 s steps while the 1-minute load average is above `max_load` (at most `max_wait_s`)."""
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < max_wait_s:
        print(f"load average {load_avg()} > {max_load}: waiting 60 s "
              f"({time.monotonic() - start:.0f} s waited so far)", flush=True)
        time.sleep(60)
    load = load_avg()
    if os.getloadavg()[0] > max_load:
        print(f"load average still {load} after {max_wait_s:.0f} s: measuring anyway (numbers may be "
              "polluted by other jobs)", flush=True)
    return load


def machine() -> str:
    import jax

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"nproc={os.cpu_count()}, CPU {cpu!r}, jax {jax.__version__} ({jax.default_backend()}), "
            f"Python {platform.python_version()}")


def measure(config: str, overrides: list[str], steps: int, warmup: int, peak: bool = True) -> dict:
    """Times `steps` train steps of `config` + `overrides` after `warmup` steps (in this process)."""
    import jax
    import numpy as np

    from lmtrain.config import load_config
    from lmtrain.models.flops import count_params, train_flops_per_token
    from lmtrain.train.mesh import describe_mesh, make_mesh
    from lmtrain.train.metrics import device_peak_flops, mfu
    from lmtrain.train.step import Trainer

    cfg = load_config(REPO / config, overrides)
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    b, t = cfg.data.global_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(b, t + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.int32)}
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
    state = jax.block_until_ready(trainer.init_state())
    start = time.perf_counter()
    for _ in range(warmup):
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    del state, metrics, batch
    step_s = statistics.median(times)
    flops = train_flops_per_token(cfg.model, t) * b * t
    devices = mesh.devices.size
    peak_flops = device_peak_flops() if peak else float("nan")
    m = cfg.model
    return {"config": config, "overrides": overrides, "mesh": describe_mesh(mesh), "devices": devices,
            "params": count_params(m), "batch": b, "seq_len": t, "dtype": m.dtype, "remat": m.remat,
            "scan_layers": m.scan_layers, "warmup_s": warmup_s, "step_times_s": times, "step_s": step_s,
            "tokens_per_s": b * t / step_s, "flops_per_step": flops, "achieved_flops": flops / step_s,
            "peak_flops": peak_flops, "mfu": mfu(flops, step_s, devices, peak_flops), "loss": loss}


def run_worker(n: int, config: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """`measure` in a fresh process that sees `n` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    spec = json.dumps({"devices": n, "config": config, "overrides": overrides, "steps": args.steps,
                       "warmup": args.warmup})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, cwd=REPO,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker N={n} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def worker_main(spec_json: str) -> None:
    import jax

    spec = json.loads(spec_json)
    if jax.device_count() != spec["devices"]:
        raise SystemExit(f"expected {spec['devices']} devices, got {jax.device_count()} "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    result = measure(spec["config"], spec["overrides"], spec["steps"], spec["warmup"], peak=False)
    print(RESULT_MARK + json.dumps(result), flush=True)


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.configs:
        overrides = list({"demo": args.demo_overrides, "griffin_100m": args.griffin_overrides}.get(name, []))
        overrides += args.overrides
        print(f"\n[throughput] {CONFIGS[name]} overrides: {' '.join(overrides) or '(none)'}", flush=True)
        steps = args.griffin_steps if name == "griffin_100m" else args.steps
        r = measure(CONFIGS[name], overrides, steps, args.warmup)
        r["load_after"] = load_avg()
        print(f"  {r['mesh']}; {r['params']:,} params; B={r['batch']} T={r['seq_len']} {r['dtype']} "
              f"remat={r['remat']}; warm-up {r['warmup_s']:.1f} s; steps (s): "
              + " ".join(f"{x:.3f}" for x in r["step_times_s"]) + f"; load after {r['load_after']}", flush=True)
        rows.append(r)
    print(f"\n### Train-step throughput and MFU (median of the timed steps after {args.warmup} warm-up)\n")
    print("| config | overrides | params | B x T | dtype | warm-up s | steps | step ms | tokens/s | GFLOP/step "
          "| achieved GFLOP/s | peak GFLOP/s | MFU |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['config']).stem} | {' '.join(f'`{o}`' for o in r['overrides']) or '(none)'} "
              f"| {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq_len']} | {r['dtype']} | {r['warmup_s']:.1f} "
              f"| {len(r['step_times_s'])} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} "
              f"| {r['flops_per_step'] / 1e9:.1f} "
              f"| {r['achieved_flops'] / 1e9:.1f} | {r['peak_flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% |")
    return rows


def scaling(args: argparse.Namespace) -> list[dict]:
    rows, one = [], None
    for kind in args.meshes:
        base = None
        for n in args.devices:
            mesh = ["mesh.data=1", f"mesh.fsdp={n}"] if kind == "fsdp" else [f"mesh.data={n}", "mesh.fsdp=1"]
            overrides = [f"data.global_batch_size={n * args.per_device_batch}",
                         f"data.seq_len={args.scaling_seq_len}", "mesh.tensor=1", *mesh]
            print(f"\n[scaling] {kind} N={n}: {args.scaling_config} {' '.join(overrides)}", flush=True)
            if n == 1 and one is not None:  # data=1 fsdp=1 either way: the same program, measured once
                r = dict(one)
                print("  same program as the first N=1 run: reusing it", flush=True)
            else:
                r = run_worker(n, args.scaling_config, overrides, args)
                r["load_after"] = load_avg()
            r.update(kind=kind, n=n)
            one = r if n == 1 else one
            base = base or r
            r["relative"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["efficiency"] = r["relative"] / n
            print(f"  {r['mesh']}; B={r['batch']} T={r['seq_len']}; warm-up {r['warmup_s']:.1f} s; steps (s): "
                  + " ".join(f"{x:.3f}" for x in r["step_times_s"]) + f"; load after {r['load_after']}",
                  flush=True)
            rows.append(r)
    print(f"\n### Weak scaling over simulated CPU devices ({args.scaling_config}, {args.per_device_batch} "
          f"x {args.scaling_seq_len} tokens per device, median of {args.steps} steps)\n")
    print("Simulated devices share the same physical cores: ideal here = constant tokens/s "
          "(tok/s ÷ tok/s@1 = 1, efficiency = 1/N); on N real devices the ideal efficiency is 1.\n")
    print("| mesh | N | global B x T | step ms | tokens/s | tok/s ÷ tok/s@1 | efficiency | ideal here (1/N) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']}={r['n']} | {r['n']} | {r['batch']} x {r['seq_len']} | {1e3 * r['step_s']:.1f} "
              f"| {r['tokens_per_s']:,.0f} | {r['relative']:.2f} | {r['efficiency']:.3f} | {1 / r['n']:.3f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="throughput,scaling", help="comma list of: throughput, scaling")
    p.add_argument("--configs", default="demo,griffin_100m",
                   help="throughput configs: names of configs/NAME.yaml or paths")
    p.add_argument("--demo-overrides", nargs="*", default=[], help="KEY=VALUE overrides for demo")
    p.add_argument("--griffin-overrides", nargs="*", default=list(GRIFFIN_CPU_OVERRIDES),
                   help="KEY=VALUE overrides for griffin_100m (default: %(default)s)")
    p.add_argument("--overrides", nargs="*", default=[], help="KEY=VALUE overrides for every throughput config")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--griffin-steps", type=int, default=5, help="timed steps for griffin_100m")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--devices", default="1,2,4,8", help="simulated device counts for scaling")
    p.add_argument("--meshes", default="fsdp,data", help="scaling mesh variants: fsdp, data")
    p.add_argument("--scaling-config", default=CONFIGS["demo"], help="the tiny model for scaling")
    p.add_argument("--per-device-batch", type=int, default=2)
    p.add_argument("--scaling-seq-len", type=int, default=256)
    p.add_argument("--max-load", type=float, default=2.5, help="wait while the 1-min load average is above")
    p.add_argument("--max-wait-s", type=float, default=600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args.worker)
    args.parts = [x for x in args.parts.split(",") if x]
    args.configs = [x for x in args.configs.split(",") if x]
    args.devices = [int(x) for x in args.devices.split(",") if x]
    args.meshes = [x for x in args.meshes.split(",") if x]
    for name in args.configs:
        if name not in CONFIGS:
            CONFIGS[name] = name if Path(name).suffix in (".yaml", ".yml") else f"configs/{name}.yaml"
        if not (REPO / CONFIGS[name]).is_file():
            p.error(f"config {name!r}: {REPO / CONFIGS[name]} does not exist")
    if not set(args.parts) <= {"throughput", "scaling"} or not set(args.meshes) <= {"fsdp", "data"}:
        p.error("--parts takes throughput,scaling; --meshes takes fsdp,data")

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine(), f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    loads = {}
    if "throughput" in args.parts:
        loads["throughput"] = wait_for_quiet(args.max_load, args.max_wait_s)
        print(f"load average before throughput: {loads['throughput']}")
        throughput(args)
    if "scaling" in args.parts:
        loads["scaling"] = wait_for_quiet(args.max_load, args.max_wait_s)
        print(f"\nload average before scaling: {loads['scaling']}")
        scaling(args)
    print("\nload average (1/5/15 min) before each part: "
          + "; ".join(f"{k}: {v}" for k, v in loads.items()) + f"; at the end: {load_avg()}")


if __name__ == "__main__":
    main()
