"""The length-generalization experiments of docs/length_generalization.md (CPU, minutes each).

    python experiments/length_generalization.py interventions --model hawk     # pretrain + 4 post-trainings + eval
    python experiments/length_generalization.py interventions --model griffin
    python experiments/length_generalization.py passkey --model hawk --variant state_passing
    python experiments/length_generalization.py curriculum                     # staged vs final length

`interventions`: one run of `--pretrain + --post` steps at T = 128 with no intervention (it also
tracks the final-state statistics, `fitted_noise` with prob 0, which does not change training); its
checkpoint at step `--pretrain` is copied into one run directory per intervention, and each resumes
with that intervention switched on for the last `--post` steps (same schedule, same data order up to
the switch). All runs are then evaluated with `lmtrain eval` (loss vs position up to 64T in buckets
[0,T), [T,8T), [8T,64T), restart baseline, passkey at 1x/8x/32x). The `noise` variant's sigma is the
RMS of the final recurrent states the baseline logged at the switch step (`state_rms` metric).

`passkey`: the same, with 25% of the training rows passkey examples (a `task` source, loss on the
answer; `--text-weight 0`: only passkey), for no intervention and `--variant`; evaluated on passkey at
1x, 8x, 32x.

`curriculum`: Griffin at T = 512, equal tokens: a staged curriculum (128 for the first half of the
steps, constant tokens per step) vs 512 from the start; final held-out loss at 512 and wall-clock.

Runs go to `--out` (default runs/lengthgen); a finished run is reused, so the script resumes. Each
command prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lmtrain.config import load_config
from lmtrain.eval.report import run_eval
from lmtrain.run import train

ROOT = Path(__file__).resolve().parents[1]
TRACK_STATS = "{kind: fitted_noise, prob: 0.0}"  # statistics only: lets the fitted_noise variant start from them
VARIANTS = {  # name -> interventions from the switch step S (noise: sigma filled in from the baseline)
    "none": "[" + TRACK_STATS + "]",
    "noise": "[{{kind: noise, start_step: {S}, noise_std: {sigma:.4g}}}]",
    "fitted_noise": "[{{kind: fitted_noise, start_step: {S}}}]",
    "state_passing": "[{{kind: state_passing, start_step: {S}}}]",
    "tbptt": "[{{kind: tbptt, start_step: {S}}}]",
}
PASSKEY = "{kind: task, task: passkey, loss_on: answer, weight: 1.0}"


def finished(workdir: Path, steps: int) -> bool:
    return (workdir / "checkpoints" / str(steps)).is_dir()


def run(config: Path, workdir: Path, overrides: list[str]) -> dict:
    """Trains (or resumes) a run; returns the last metrics and the wall-clock of this call."""
    cfg = load_config(config, [f"workdir={workdir}", *overrides])
    if not finished(workdir, cfg.train.steps):
        t0 = time.perf_counter()
        summary = train(cfg)
        (workdir / "wallclock.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                            "compile_seconds": summary["compile_seconds"],
                                                            "start_step": summary["start_step"]}))
    return json.loads((workdir / "wallclock.json").read_text())


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def state_rms_at(workdir: Path, step: int) -> float:
    """The baseline's logged RMS of final recurrent states at the last log step <= `step`."""
    logged = [m for m in metrics(workdir) if "state_rms" in m and m["step"] <= step]
    return logged[-1]["state_rms"]


def post_train(config: Path, base: Path, workdir: Path, switch: int, overrides: list[str]) -> dict:
    """A copy of `base`'s checkpoint at `switch`, resumed in `workdir` with `overrides`."""
    if not (workdir / "checkpoints").exists():
        (workdir / "checkpoints").mkdir(parents=True)
        shutil.copytree(base / "checkpoints" / str(switch), workdir / "checkpoints" / str(switch))
    return run(config, workdir, overrides)


def intervention_runs(model: str, pretrain: int, post: int, out: Path, variants: list[str],
                      extra: list[str]) -> dict[str, Path]:
    config = ROOT / f"configs/lengthgen/{model}.yaml"
    total = pretrain + post
    common = [f"train.steps={total}", f"checkpoint.every_steps={pretrain}", "checkpoint.keep=0",
              f"schedule.warmup_steps={min(50, pretrain)}", f"log.every_steps={min(50, pretrain)}", *extra]
    base = out / model / "none"
    run(config, base, [*common, f"train.interventions={VARIANTS['none']}"])
    sigma = state_rms_at(base, pretrain)
    dirs = {"none": base}
    for name in variants:
        if name == "none":
            continue
        dirs[name] = out / model / name
        spec = VARIANTS[name].format(S=pretrain, sigma=sigma)
        post_train(config, base, dirs[name], pretrain, [*common, f"train.interventions={spec}"])
    print(f"{model}: noise sigma = {sigma:.4g} (baseline state_rms at step {pretrain})")
    return dirs


def table(dirs: dict[str, Path]) -> str:
    """Markdown: per run, its training call's wall-clock, bucket losses (minus restart), passkey accuracy."""
    lines = []
    for name, workdir in dirs.items():
        longctx = json.loads((workdir / "eval" / "longctx.json").read_text())
        tasks_path = workdir / "eval" / "tasks.json"
        tasks = json.loads(tasks_path.read_text()) if tasks_path.exists() else {}
        cells = [f"{b['loss']:.3f} ({b['loss'] - b['loss_restart']:+.3f})" if b.get("loss_restart") is not None
                 else f"{b['loss']:.3f}" for b in longctx["buckets"]]
        passkey = " / ".join(f"{x['accuracy']:.2f}" if "accuracy" in x else "—"
                             for x in tasks.get("tasks", {}).get("passkey", []))
        wall = json.loads((workdir / "wallclock.json").read_text())["seconds"]
        lines.append(f"| {name} | {wall:.0f} | " + " | ".join(cells) + f" | {passkey} |")
    header = ("| run | wall-clock of its training call (s) | loss [0,T) | [T,8T) | [8T,64T) | passkey 1x / 8x / 32x |\n"
              "|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(lines)


def evaluate(dirs: dict[str, Path], out: Path, longctx: bool = True) -> dict:
    options = ["length=64x", "buckets=1,8,64", "sequences=8", "batch=8", "tasks=passkey",
               "task_lengths=1x,8x,32x", "samples=32", f"out={out}", f"longctx={str(longctx).lower()}"]
    return run_eval([str(d) for d in dirs.values()], options)


def cmd_interventions(args: argparse.Namespace) -> None:
    dirs = intervention_runs(args.model, args.pretrain, args.post, args.out, args.variants, [])
    report = evaluate(dirs, args.out / args.model / "compare")
    print(report["markdown"])
    print(table(dirs))


def cmd_passkey(args: argparse.Namespace) -> None:
    text = f"{{kind: stdlib, weight: {args.text_weight}}}, " if args.text_weight else ""
    out = args.out / ("passkey" if args.text_weight else "passkey_only")
    extra = [f"data.sources=[{text}{PASSKEY}]"]
    dirs = intervention_runs(args.model, args.pretrain, args.post, out, ["none", args.variant], extra)
    report = evaluate(dirs, out / args.model / "compare", longctx=bool(args.text_weight))
    print(report["markdown"])
    if args.text_weight:
        print(table(dirs))


def cmd_curriculum(args: argparse.Namespace) -> None:
    config = ROOT / "configs/lengthgen/griffin.yaml"
    steps = args.pretrain + args.post
    common = [f"train.steps={steps}", f"checkpoint.every_steps={steps}", "data.seq_len=512",
              "data.global_batch_size=4", "eval.batches=32", "model.attention.window=64"]
    staged = f"{{kind: staged, batch_mode: constant_tokens, stages: [[{steps // 2}, 128], [{steps}, 512]]}}"
    runs = {"final length (512) from the start": args.out / "curriculum" / "final",
            f"staged: 128 for {steps // 2} steps, then 512": args.out / "curriculum" / "staged"}
    walls = {name: run(config, d, common + ([f"data.curriculum={staged}"] if "staged" in name else []))
             for name, d in runs.items()}
    print("| run | tokens | wall-clock (s) | of which compile (s) | final held-out loss at T=512 |")
    print("|---|---|---|---|---|")
    for name, d in runs.items():
        evals = [m for m in metrics(d) if "eval/loss" in m]
        print(f"| {name} | {steps * 4 * 512:,} | {walls[name]['seconds']:.0f} | "
              f"{walls[name]['compile_seconds']:.0f} | {evals[-1]['eval/loss']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn in (("interventions", cmd_interventions), ("passkey", cmd_passkey), ("curriculum", cmd_curriculum)):
        p = sub.add_parser(name)
        p.add_argument("--model", default="hawk", choices=["hawk", "griffin"])
        p.add_argument("--pretrain", type=int, default=800, help="steps before the switch")
        p.add_argument("--post", type=int, default=200, help="post-training steps with the intervention")
        p.add_argument("--variants", nargs="+", default=list(VARIANTS))
        p.add_argument("--variant", default="state_passing", help="passkey: the intervention compared with none")
        p.add_argument("--text-weight", type=float, default=3.0,
                       help="passkey: weight of the built-in corpus next to passkey's 1 (0: passkey only)")
        p.add_argument("--out", type=Path, default=Path("runs/lengthgen"))
        p.set_defaults(func=fn)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
