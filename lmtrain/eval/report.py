"""`lmtrain eval`: evaluate one or more runs and write the (comparison) report.

    report = run_eval(["runs/hawk", "runs/hawk_sp"], ["length=64x", "tasks=passkey,mqar"])

Options are flat `KEY=VALUE` pairs (values parsed as YAML, like training overrides); task options
are dotted under the task's name, e.g. `mqar.num_pairs=16 passkey.depth=0.5 passkey.filler=corpus`.
Lengths are token counts or multiples of each run's training length `T` (`64x`), so one command
compares runs trained at different lengths position-for-multiple. Per run the results go to
`WORKDIR/eval/` (`longctx.json`, `longctx.png`, `tasks.json`, `report.md`; `-stepN` is appended to
the names when a step is chosen); with several runs (or steps) a comparison (`report.md`,
`compare.json`, `longctx.png`) goes to `out` (default: `eval-compare/` beside the runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtrain import configlib
from lmtrain.configlib import ConfigError, field
from lmtrain.data import sources as sources_lib
from lmtrain.data.tasks import TASKS, Task, make_task
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.eval.load import checkpoint_steps, load_run, load_run_config
from lmtrain.eval.longctx import ChunkRunner, check_chunking, evaluate_longctx
from lmtrain.eval.plots import plot_longctx
from lmtrain.eval.tasks import evaluate_tasks
from lmtrain.models.mixers import MIXERS

log = logging.getLogger(__name__)

ALL_TASKS = ",".join(TASKS)
CORPUS_FILLER_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `lmtrain eval` measures (KEY=VALUE on the command line)."""

    length: int | str = field("64x", "Loss-vs-position sequence length: tokens, or a multiple of the run's "
                                     "training length T written like 64x.")
    chunk: int | str | None = field(None, "Tokens fed per call, the state passed between calls (bounds the "
                                          "memory); tokens or a multiple of T (1x). Default: T. Every length "
                                          "must be a multiple of it.")
    sequences: int = field(4, "Held-out sequences (rows of `length` tokens) for loss vs position.")
    batch: int = field(4, "Rows run together (memory grows with batch x chunk).")
    buckets: str | tuple[float, ...] = field("doubling", "Loss buckets: doubling ([0,T), [T,2T), [2T,4T) ...) "
                                                         "or increasing multiples of T, e.g. 1,8,64 for "
                                                         "[0,T), [T,8T), [8T,64T).")
    longctx: bool = field(True, "Run the loss-vs-position evaluation.")
    restart: bool = field(True, "Also score the same tokens with the state restarted every T tokens (the "
                                "baseline that isolates the effect of context beyond T; doubles the cost).")
    tasks: str | tuple[str, ...] = field(ALL_TASKS, "Synthetic tasks to score, comma-separated, or none.")
    task_lengths: str | tuple[int | str, ...] = field("1x,8x,32x", "Context lengths of the tasks: tokens or "
                                                                    "multiples of T.")
    samples: int = field(32, "Examples per task and length.")
    seed: int = field(1000, "Seed of the task examples (use another one for training on the tasks).")
    step: int | str | None = field(None, "Checkpoint step to evaluate; all: every checkpoint; "
                                         "default: the latest.")
    ema: bool = field(False, "Evaluate the EMA parameters (runs trained with optimizer.ema_decay).")
    out: str | None = field(None, "Directory of the comparison report (several runs or steps); default: "
                                  "eval-compare/ in the runs' common parent directory.")
    task_options: dict[str, dict[str, Any]] = field({}, "Per-task options, given as TASK.OPTION=VALUE "
                                                        "(e.g. mqar.num_pairs=16).")

    def validate(self) -> None:
        for name in ("sequences", "batch", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.step, str) and self.step != "all":
            raise ConfigError(f"step: an integer or 'all', got {self.step!r}")
        unknown = [t for t in self.task_names if t not in TASKS]
        if unknown:
            raise ConfigError(f"tasks: unknown task {unknown[0]!r}{configlib.did_you_mean(unknown[0], list(TASKS))}")

    @property
    def task_names(self) -> list[str]:
        return _split(self.tasks) if self.tasks not in ("none", "") else []


def _split(value: str | Sequence[Any]) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_options(overrides: Sequence[str]) -> EvalOptions:
    """EvalOptions from KEY=VALUE strings; TASK.OPTION=VALUE keys become task options."""
    data = configlib.apply_overrides({}, overrides)
    task_options = {name: data.pop(name) for name in list(data) if name in TASKS}
    for name, opts in task_options.items():
        if not isinstance(opts, dict):
            raise ConfigError(f"{name}: give task options as {name}.OPTION=VALUE, got {name}={opts!r}")
    return configlib.from_dict(EvalOptions, {**data, "task_options": task_options})


def parse_length(value: int | str, train_length: int, what: str = "length") -> int:
    """Tokens from `1024` or a multiple of the training length (`64x`, `0.5x`)."""
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        try:
            mult = float(value.strip()[:-1])
        except ValueError:
            mult = -1.0
        if mult <= 0:
            raise ConfigError(f"{what}: {value!r} is not a positive multiple like 64x")
        return max(1, round(mult * train_length))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: {value!r} must be a positive token count or a multiple of T like 8x")
    return value


def bucket_multiples(opts: EvalOptions) -> list[float] | None:
    if opts.buckets == "doubling":
        return None
    try:
        return [float(m) for m in _split(opts.buckets)]
    except ValueError:
        raise ConfigError(f"buckets: 'doubling' or multiples of T like 1,8,64, got {opts.buckets!r}") from None


# ------------------------------------------------------------------------------------------ tasks
def corpus_text(cfg: Any, chars: int = CORPUS_FILLER_CHARS) -> str:
    """Up to `chars` characters of the run's held-out text (first text source), as passkey filler."""
    src_cfg = next((s for s in cfg.data.sources if s.kind != "task"), None)
    if src_cfg is None:
        raise ConfigError("passkey.filler=corpus: the run has no text source (only tasks); use passkey.filler=fixed")
    source = sources_lib.open_source(src_cfg)
    parts, n = [], 0
    for i in sources_lib.split_indices(source, cfg.data.heldout_fraction, heldout=True):
        doc = source.read(int(i))
        if doc.text.strip() and not doc.malformed:
            parts.append(doc.text)
            n += len(doc.text)
            if n >= chars:
                break
    if not parts:
        raise ConfigError("passkey.filler=corpus: the run's held-out split is empty; use passkey.filler=fixed")
    return "\n".join(parts)[:chars]


def build_tasks(opts: EvalOptions, cfg: Any) -> dict[str, Task]:
    """The tasks for one run: a task with a `tokenizer` field gets the run's tokenizer (as in training), one
    with a `filler_text` field takes the option `filler` (fixed, or corpus: the run's held-out text)."""
    tasks = {}
    for name in opts.task_names:
        options = dict(opts.task_options.get(name, {}))
        fields = {f.name for f in dataclasses.fields(TASKS[name])}
        if "filler_text" in fields:
            filler = options.pop("filler", "fixed")
            if filler not in ("fixed", "corpus"):
                raise ConfigError(f"{name}.filler: 'fixed' or 'corpus', got {filler!r}")
            if filler == "corpus":
                options["filler_text"] = corpus_text(cfg)
        if "tokenizer" in fields:
            options["tokenizer"] = load_tokenizer(cfg.data.tokenizer)
        try:
            tasks[name] = make_task(name, **options)
        except (TypeError, ValueError) as e:
            fields = [f.name for f in dataclasses.fields(TASKS[name]) if f.name not in ("name", "tokenizer")]
            raise ConfigError(f"{name} options {options}: {e} (options: {', '.join(fields)})") from None
    return tasks


# ---------------------------------------------------------------------------------------- running
@dataclasses.dataclass
class Plan:
    """One (run, step) to evaluate, resolved and checked before anything heavy runs."""

    workdir: Path
    step: int | None
    name: str
    suffix: str  # appended to the per-run file names when a step was chosen
    train_length: int
    chunk: int
    length: int
    task_lengths: list[int]


def plan(workdirs: Sequence[str | os.PathLike], opts: EvalOptions) -> list[Plan]:
    """Checks every run (config, checkpoints, lengths vs chunk) before any evaluation starts."""
    if not workdirs:
        raise ConfigError("give at least one run directory: lmtrain eval WORKDIR [WORKDIR ...] [KEY=VALUE ...]")
    paths = [Path(w) for w in workdirs]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    plans = []
    for path, name in zip(paths, names):
        cfg = load_run_config(path)
        steps = checkpoint_steps(path, cfg)
        if not steps:
            raise ConfigError(f"{path} has no checkpoint in {cfg.checkpoint.path(path)}; train the run first "
                              f"(`lmtrain train {path / 'config.yaml'} workdir={path}`)")
        t = cfg.data.seq_len
        chunk = t if opts.chunk is None else parse_length(opts.chunk, t, "chunk")
        length = parse_length(opts.length, t)
        task_lengths = [parse_length(v, t, "task_lengths") for v in _split(opts.task_lengths)]
        try:
            if opts.longctx:
                check_chunking(length, chunk)
            for n in task_lengths if opts.task_names else []:
                check_chunking(n, chunk)
        except ValueError as e:
            raise ConfigError(f"{path} (T={t}): {e}") from None
        if opts.step == "all":
            chosen = steps
        elif opts.step is None:
            chosen = [None]
        else:
            if opts.step not in steps:
                raise ConfigError(f"{path} has no checkpoint of step {opts.step}; it has "
                                  f"{', '.join(map(str, steps))}")
            chosen = [opts.step]
        for step in chosen:
            plans.append(Plan(path, step, name if step is None else f"{name}@{step}",
                              "" if step is None else f"-step{step}", t, chunk, length, task_lengths))
    return plans


def evaluate_plan(p: Plan, opts: EvalOptions) -> dict[str, Any]:
    """Evaluates one (run, step) and writes its files under WORKDIR/eval/."""
    t0 = time.perf_counter()
    cfg, model, step = load_run(p.workdir, p.step, ema=opts.ema)
    runner = ChunkRunner(model, p.chunk)
    longest = max([p.length] * opts.longctx + p.task_lengths * bool(opts.task_names), default=0)
    for kind in dict.fromkeys(cfg.model.pattern):
        limit = MIXERS[kind].max_call_len(cfg.model)
        if limit is not None and longest > limit:
            log.warning("%s: sequences of %d tokens exceed %d, the context of the %s (%s) layers: they see only the "
                        "last %d tokens there (a sliding window)", p.name, longest, limit, MIXERS[kind].__name__,
                        kind, limit)
    tasks = build_tasks(opts, cfg)
    out_dir = p.workdir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {"run": str(p.workdir), "name": p.name, "step": step, "pattern": cfg.model.pattern,
            "train_length": p.train_length, "chunk": p.chunk, "ema": opts.ema}
    result: dict[str, Any] = dict(head)
    if opts.longctx:
        log.info("eval %s: loss vs position over %d x %d tokens in chunks of %d", p.name, opts.sequences,
                 p.length, p.chunk)
        result["longctx"] = evaluate_longctx(cfg, runner, p.length, opts.sequences, opts.batch,
                                             bucket_multiples(opts), opts.restart)
        _write_json(out_dir / f"longctx{p.suffix}.json", {**head, **result["longctx"]})
        plot_longctx([result], out_dir / f"longctx{p.suffix}.png")
    if tasks:
        log.info("eval %s: tasks %s at lengths %s", p.name, ", ".join(tasks), p.task_lengths)
        labels = [str(v) for v in _split(opts.task_lengths)]
        scores = evaluate_tasks(runner, tasks, p.task_lengths, opts.samples, opts.seed, opts.batch)
        for rows in scores.values():
            for row, label in zip(rows, labels):
                row["label"] = label
        result["tasks"] = scores
        _write_json(out_dir / f"tasks{p.suffix}.json",
                    {**head, "samples": opts.samples, "seed": opts.seed, "options": _task_opts(tasks),
                     "tasks": scores})
    result["seconds"] = time.perf_counter() - t0
    (out_dir / f"report{p.suffix}.md").write_text(markdown_report([result]))
    return result


def _task_opts(tasks: dict[str, Task]) -> dict[str, dict[str, Any]]:
    skip = ("name", "tokenizer", "filler_text")
    out = {}
    for name, task in tasks.items():
        out[name] = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name not in skip}
        if hasattr(task, "filler_text"):
            out[name]["filler"] = "fixed" if task.filler_text is None else "corpus"
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def compare_dir(workdirs: Sequence[str | os.PathLike], opts: EvalOptions) -> Path:
    if opts.out:
        return Path(opts.out)
    return Path(os.path.commonpath([str(Path(w).absolute().parent) for w in workdirs])) / "eval-compare"


def run_eval(workdirs: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluates every run (and step), writes the per-run and comparison files; returns the report."""
    opts = parse_options(overrides)
    plans = plan(workdirs, opts)
    results = [evaluate_plan(p, opts) for p in plans]
    report = {"options": configlib.to_dict(opts), "runs": results, "markdown": markdown_report(results)}
    if len(results) > 1 or opts.out:
        out = compare_dir(workdirs, opts)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "compare.json", {"options": report["options"], "runs": results})
        (out / "report.md").write_text(report["markdown"])
        if any("longctx" in r for r in results):
            plot_longctx([r for r in results if "longctx" in r], out / "longctx.png")
        report["out"] = str(out)
    return report


# --------------------------------------------------------------------------------------- markdown
def _mult(tokens: int, t: int) -> str:
    m = tokens / t
    return "0" if tokens == 0 else f"{m:g}T"


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    return "—" if x is None else f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def markdown_report(results: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: loss per position bucket, state-norm growth, task accuracy."""
    parts = []
    with_loss = [r for r in results if "longctx" in r]
    if with_loss:
        labels: list[str] = []
        for r in with_loss:
            for b in r["longctx"]["buckets"]:
                label = f"[{_mult(b['start'], r['train_length'])}, {_mult(b['end'], r['train_length'])})"
                if label not in labels:
                    labels.append(label)
        lines = ["### Held-out loss by position (nats/token; T = training length)", "",
                 "| run | step | T | tokens | all | " + " | ".join(labels) + " |",
                 "|---|---:|---:|---:|---:|" + "---:|" * len(labels)]
        for r in with_loss:
            res, t = r["longctx"], r["train_length"]
            by_label = {f"[{_mult(b['start'], t)}, {_mult(b['end'], t)})": b["loss"] for b in res["buckets"]}
            cells = [_fmt(by_label.get(label)) for label in labels]
            lines.append(f"| {r['name']} | {r['step']} | {t} | {res['tokens']} | {_fmt(res['mean_loss'])} | "
                         + " | ".join(cells) + " |")
        with_restart = [r for r in with_loss if "loss_restart" in r["longctx"]["buckets"][0]]
        if with_restart:
            lines += ["", "### Context beyond T: loss minus the same tokens' loss with the state restarted every T "
                      "(negative: the longer context helps)", "",
                      "| run | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
            for r in with_restart:
                t = r["train_length"]
                delta = {f"[{_mult(b['start'], t)}, {_mult(b['end'], t)})":
                         None if b["loss"] is None else b["loss"] - b["loss_restart"] for b in r["longctx"]["buckets"]}
                lines.append(f"| {r['name']} | " + " | ".join(_fmt(delta.get(label), signed=True)
                                                             for label in labels) + " |")
        lines += ["", "### Recurrent state norm |h| (mean over sequences)", "",
                  "| run | layer | at T | at end | end / T |", "|---|---|---:|---:|---:|"]
        for r in with_loss:
            norms = r["longctx"]["state_norms"]
            at = norms["positions"].index(norms["norm_at"])
            for layer, v in norms["layers"].items():
                lines.append(f"| {r['name']} | {layer} | {v['mean'][at]:.3g} | {v['mean'][-1]:.3g} | "
                             f"{v['end_over_train_length']:.3g} |")
            if not norms["layers"]:
                lines.append(f"| {r['name']} | (no recurrent layers) | | | |")
        parts.append("\n".join(lines))
    with_tasks = [r for r in results if r.get("tasks")]
    if with_tasks:
        labels = []
        for r in with_tasks:
            for rows in r["tasks"].values():
                labels += [row["label"] for row in rows if row["label"] not in labels]
        lines = ["### Task accuracy: exact match % (answer-token accuracy %), teacher-forced greedy", "",
                 "| run | task | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
        for r in with_tasks:
            for task, rows in r["tasks"].items():
                by_label = {row["label"]: row for row in rows}
                cells = []
                for label in labels:
                    row = by_label.get(label)
                    if row is None or "skipped" in row:
                        cells.append("—" if row is None else f"— ({row['skipped']})")
                    else:
                        cells.append(f"{100 * row['accuracy']:.1f} ({100 * row['token_accuracy']:.1f})")
                lines.append(f"| {r['name']} | {task} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
