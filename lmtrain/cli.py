"""`lmtrain` command line: train | check | eval | tokenizer.

    lmtrain train CONFIG [KEY=VALUE ...]    train (or resume) a run; outputs go to `workdir`
    lmtrain check CONFIG [KEY=VALUE ...]    validate: resolved config, params, FLOPs, mesh, compiled memory
    lmtrain eval WORKDIR [WORKDIR ...] [KEY=VALUE ...]    loss vs position, state norms, synthetic tasks
    lmtrain tokenizer train ...             train a SentencePiece model
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmtrain.configlib import ConfigError, to_dict
from lmtrain.errors import LmtrainError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optimizer.lr=3e-4 model.pattern=RRA workdir=runs/x")


def cmd_train(args: argparse.Namespace) -> int:
    from lmtrain.config import load_config
    from lmtrain.run import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    train_rec, eval_rec = summary.get("train", {}), summary.get("eval", {})
    print(f"done: step {summary['step']} in {summary['seconds']:.0f}s "
          f"(compile {summary['compile_seconds'] or 0:.0f}s); train loss {train_rec.get('loss', float('nan')):.4f}, "
          f"eval loss {eval_rec.get('eval/loss', float('nan')):.4f}, "
          f"{train_rec.get('tokens_per_sec', 0):,.0f} tokens/s; outputs in {cfg.workdir}"
          + (" (preempted: rerun the same command to resume)" if summary["preempted"] else ""))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import yaml

    from lmtrain.config import check_runtime, load_config
    from lmtrain.data.batch import BATCH_FIELDS
    from lmtrain.data.curriculum import Curriculum
    from lmtrain.data.tokenizer import load_tokenizer
    from lmtrain.models.flops import count_params, train_flops_per_token
    from lmtrain.run import batch_axes_size
    from lmtrain.train.mesh import describe_mesh, make_mesh
    from lmtrain.train.step import Trainer

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    check_runtime(cfg, mesh.devices.size, batch_axes_size(trainer), load_tokenizer(cfg.data.tokenizer).vocab_size,
                  jax.process_count())
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
