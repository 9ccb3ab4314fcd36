"""`lmtrain eval WORKDIR [WORKDIR ...] [KEY=VALUE ...]`: long-context and task evaluation of runs."""

from __future__ import annotations

import argparse

from lmtrain.configlib import describe

EPILOG = """examples:
  lmtrain eval runs/demo
  lmtrain eval runs/hawk runs/hawk_sp runs/hawk_tbptt length=64x buckets=1,8,64 tasks=passkey
  lmtrain eval runs/demo length=32768 chunk=512 tasks=none
  lmtrain eval runs/demo step=all tasks=mqar mqar.num_pairs=16 task_lengths=1x,4x

options (KEY=VALUE; values are YAML; lengths are tokens or multiples of the run's training length T):
"""


def cmd_eval(args: argparse.Namespace) -> int:
    from lmtrain.eval.report import run_eval

    workdirs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    report = run_eval(workdirs, overrides)
    print(report["markdown"])
    for r in report["runs"]:
        print(f"{r['name']}: step {r['step']}, {r['seconds']:.0f}s; outputs in {r['run']}/eval/")
    if "out" in report:
        print(f"comparison report in {report['out']}/")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lmtrain.eval.report import EvalOptions

    rows = [(name, default.strip("'"), help_) for name, _, default, help_ in describe(EvalOptions)]
    epilog = EPILOG + "\n".join(f"  {name}={default}\n      {help_}" for name, default, help_ in rows
                                 if name != "task_options")
    epilog += ("\n  TASK.OPTION=VALUE\n      Task options, e.g. mqar.num_pairs=16 passkey.depth=0.5 "
               "passkey.filler=corpus.")
    parser = sub.add_parser("eval", help="loss vs position, state norms and synthetic tasks of one or more runs",
                            description=__doc__, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="WORKDIR | KEY=VALUE",
                        help="run directories (holding config.yaml and checkpoints), then options")
    parser.set_defaults(func=cmd_eval)
