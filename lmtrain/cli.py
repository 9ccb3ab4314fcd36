"""`lmtrain` command line: train | check | eval | tokenizer.

    lmtrain train CONFIG [KEY=VALUE ...]    train (or resume) a run; outputs go to `workdir`
    lmtrain check CONFIG [KEY=VALUE ...]    validate: resolved config, params, FLOPs, mesh, compiled memory
    lmtrain eval WORKDIR [WORKDIR ...] [KEY=VALUE ...]    loss vs position, state norms, synthetic tasks
    lmtrain sample WORKDIR --prompt TEXT [...]    generate text from a trained run
    lmtrain export WORKDIR --format F --out DIR    a checkpoint as safetensors, Hugging Face or recurrentgemma
    lmtrain tokenizer train ...             train a SentencePiece model
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from lmtrain.configlib import ConfigError, to_dict
from lmtrain.errors import LmtrainError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optimizer.lr=3e-4 model.pattern=RRA workdir=runs/x")


@contextlib.contextmanager
def _quiet_restore() -> Iterator[None]:
    """Quieter logs while a command restores a checkpoint (orbax's metadata chatter on a params-only restore;
    the command's summary names the step; fallbacks still warn), restored afterwards: main() may run
    in-process (tests, notebooks)."""
    quiet = {"absl": logging.ERROR, "lmtrain.train.checkpoint": logging.WARNING}
    before = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def cmd_train(args: argparse.Namespace) -> int:
    from lmtrain.config import load_config
    from lmtrain.run import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    train_rec, eval_rec = summary.get("train") or {}, summary.get("eval") or {}
    losses = (f"train loss {_num(train_rec.get('loss'), '.4f')}, eval loss {_num(eval_rec.get('eval/loss'), '.4f')}")
    if summary.get("complete"):
        print(f"already complete: step {summary['step']} of train.steps={cfg.train.steps} was reached earlier; last "
              f"logged {losses} (metrics.jsonl); raise train.steps to continue; outputs in {cfg.workdir}")
        return 0
    rate = summary.get("tokens_per_sec")
    print(f"done: step {summary['step']} in {summary['seconds']:.0f}s "
          f"(compile {summary['compile_seconds'] or 0:.0f}s); {losses}, "
          f"{_num(rate, ',.0f')} tokens/s (run average); outputs in {cfg.workdir}"
          + (" (preempted: rerun the same command to resume)" if summary["preempted"] else ""))
    return 0


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def cmd_check(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import yaml

    from lmtrain.config import check_runtime, load_config
    from lmtrain.data.batch import BATCH_FIELDS
    from lmtrain.data.curriculum import Curriculum
    from lmtrain.data.survey import survey
    from lmtrain.data.tokenizer import load_tokenizer
    from lmtrain.models.flops import count_params, train_flops_per_token
    from lmtrain.run import batch_axes_size
    from lmtrain.train.mesh import describe_mesh, make_mesh
    from lmtrain.train.step import Trainer

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_runtime(cfg, mesh.devices.size, batch_axes_size(trainer), tokenizer.vocab_size, jax.process_count())
    heldout = 0
    for row in survey(cfg.data, tokenizer, cfg.stages):  # opens every source, fails like training would
        if row.train_docs is None:
            print(f"data: {row.name}: synthetic, generated per step")
            continue
        heldout += row.heldout_docs
        print(f"data: {row.name}: {row.train_docs:,} training documents (~{row.est_train_tokens:,.0f} tokens, "
              f"estimated), {row.heldout_docs:,} held out")
    print(f"held-out split: {heldout:,} documents (data.heldout_fraction={cfg.data.heldout_fraction})")
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len)
    print(f"parameters: {count_params(cfg.model):,}")
    print(f"training FLOPs per token: {flops:.4g} ({flops * cfg.data.seq_len * cfg.data.global_batch_size:.4g} "
          "per step)")
    print(f"mesh: {describe_mesh(mesh)}")
    gib = 2.0**30
    for shape in Curriculum(cfg.data).shapes():  # one compilation per batch shape of the curriculum
        mem = trainer.compiled_memory({k: np.zeros(shape, np.int32) for k in BATCH_FIELDS})
        print(f"compiled train step [{shape[0]} rows x {shape[1]} tokens] memory per device: temp "
              f"{mem.temp_size_in_bytes / gib:.3f} GiB, arguments {mem.argument_size_in_bytes / gib:.3f} GiB, "
              f"output {mem.output_size_in_bytes / gib:.3f} GiB")
    print("config OK")
    return 0


SAMPLE_EPILOG = """examples:
  lmtrain sample runs/demo --prompt "def " --max-new-tokens 40
  lmtrain sample runs/demo --prompt "import " "class " --temperature 0.8 --top-p 0.95 --seed 1
  lmtrain sample runs/demo --prompt-file prompts.txt --greedy --stop '\\n\\n' --no-stream

--prompt-file: one prompt per non-empty line, or with a .jsonl name one JSON string (or {"prompt": ...})
per line. --stop understands the escapes \\n, \\t and \\\\. See docs/sampling.md.
"""


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _read_prompts(path: str) -> list[str]:
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg}); a .jsonl prompt file holds one JSON string "
                              'or {"prompt": ...} per line') from None
        item = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(item, str):
            raise ConfigError(f'{path}:{n}: expected a JSON string or {{"prompt": "..."}}, got {line[:60]}')
        prompts.append(item)
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    from lmtrain.sample import SampleError, SamplingParams

    settings = SamplingParams(args.temperature, args.top_k, args.top_p, args.greedy)
    settings.check()  # before loading anything
    if args.max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise SampleError(f"--batch-size must be >= 1, got {args.batch_size}")
    if bool(args.prompt) == bool(args.prompt_file):
        raise ConfigError("give prompts with --prompt TEXT [TEXT ...] or --prompt-file FILE (one of the two)")
    prompts = args.prompt or _read_prompts(args.prompt_file)
    if not prompts:
        raise ConfigError(f"prompt file {args.prompt_file} holds no prompt (it is empty or blank)")

    from lmtrain.data.tokenizer import load_tokenizer
    from lmtrain.eval.load import load_run
    from lmtrain.sample import sample

    try:
        with _quiet_restore():
            cfg, model, step = load_run(args.workdir, args.step, ema=args.ema)
    except ValueError as e:  # e.g. --ema on a run without EMA parameters
        raise ConfigError(str(e)) from e
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stream = not args.no_stream

    def show(i: int, text: str) -> None:
        if text == "":  # prompt i starts
            sys.stdout.write(("\n----\n" if i else "") + prompts[i])
        else:
            sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    done = sample(model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                  seed=args.seed, stop=[_unescape(s) for s in args.stop], add_bos=not args.no_bos,
                  batch_size=1 if stream else args.batch_size, stream=show if stream else None)
    seconds = time.perf_counter() - start
    if stream:
        print()
    else:
        print("\n----\n".join(c.prompt + c.text for c in done))
    sys.stdout.flush()  # the completions before the summary line on stderr
    tokens = sum(len(c.tokens) for c in done)
    print(f"{args.workdir} step {step}: {len(done)} prompt(s), {tokens} new tokens in {seconds:.1f}s "
          f"({tokens / seconds:.0f} tokens/s, compilation included)", file=sys.stderr)
    return 0


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sample", help="generate text from a trained run",
                            description="Generate text from a trained run: prefill each batch of prompts in one "
                                        "call, then decode with the model state in a jitted loop.",
                            epilog=SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="run directory (holding config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--ema", action="store_true", help="use the EMA parameters (runs with optimizer.ema_decay)")
    parser.add_argument("--prompt", nargs="+", action="extend", default=[], metavar="TEXT",
                        help="prompt(s); each is continued separately")
    parser.add_argument("--prompt-file", metavar="FILE",
                        help="prompts: one per line (.jsonl: one JSON string per line)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per completion (64)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus: the likeliest tokens holding probability P, in (0, 1] (1 = off)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest token")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                        help="stop string(s): a completion ends before the first one (escapes \\n \\t)")
    parser.add_argument("--no-stream", action="store_true",
                        help="print completions when all are done (prompts run batched) instead of as generated")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts per batch with --no-stream")
    parser.add_argument("--no-bos", action="store_true", help="do not start prompts with the bos token")
    parser.set_defaults(func=cmd_sample)


EXPORT_EPILOG = """formats:
  safetensors     our parameter names + config.json + tokenizer; lmtrain.export.load_exported(DIR)
  hf              transformers.AutoModelForCausalLM.from_pretrained(DIR) (RecurrentGemmaForCausalLM; R/A only)
  recurrentgemma  recurrentgemma.jax.Griffin params (orbax) + config.json (R/A only)

examples:
  lmtrain export runs/demo --format hf --out exports/demo-hf
  lmtrain export runs/demo --format safetensors --out exports/demo --step 200 --ema

See docs/export.md (file layouts, name mapping, what HF differs in, what is refused and why).
"""


def cmd_export(args: argparse.Namespace) -> int:
    from lmtrain.export.run import export_run

    with _quiet_restore():
        result = export_run(args.workdir, args.format, args.out, step=args.step, ema=args.ema, force=args.force)
    for note in result.warnings:
        print(f"lmtrain: warning: {note}", file=sys.stderr)
    print(f"exported {args.workdir} step {result.step}{' (EMA)' if args.ema else ''} as {result.format} to "
          f"{result.out}: {', '.join(result.files)}")
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="write a checkpoint as safetensors, Hugging Face or recurrentgemma files",
                            description="Export the parameters of a run's checkpoint (no optimizer state).",
                            epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="run directory (holding config.yaml and checkpoints/)")
    parser.add_argument("--format", required=True, metavar="F", help="safetensors | hf | recurrentgemma")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--ema", action="store_true", help="export the EMA parameters (runs with optimizer.ema_decay)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, overwriting only the files this export writes")
    parser.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    from lmtrain.data import tokenizer_cli
    from lmtrain.eval import cli as eval_cli

    parser = argparse.ArgumentParser(prog="lmtrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: LMTRAIN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or resume a run")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)
    check = sub.add_parser("check", help="validate a config and report size, FLOPs, mesh and memory")
    _add_config_args(check)
    check.set_defaults(func=cmd_check)
    eval_cli.add_parser(sub)
    _add_sample_parser(sub)
    _add_export_parser(sub)
    tokenizer_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LMTRAIN_DEBUG", "") not in ("", "0")
    try:
        if args.command in ("train", "check"):  # first, before anything touches a JAX backend
            from lmtrain.train.distributed import initialize_from_env
            initialize_from_env()
        return args.func(args)
    except (ConfigError, FileNotFoundError, LmtrainError) as e:
        if debug:
            raise
        print(f"lmtrain: error: {' '.join(str(e).split())}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
