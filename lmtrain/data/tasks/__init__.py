"""Synthetic long-context tasks, shared by training (as a data source) and evaluation.

    task = make_task("mqar", num_pairs=16)
    ex = example(task, seed=0, index=3, length=1024)        # Example(tokens_N, answer_T)
    batch = make_batch(task, seed=0, start=0, batch_size=8, length=1024)   # a batch.Batch (evaluation)

Training reads a task as a `kind: task` data source (rows.TaskRows, one example per row).

Tasks: `passkey`, `mqar`, `induction`, `selective_copy` (one module each; a new task is one module
plus one entry in TASKS). See docs/evaluation.md for their definitions.
"""

from __future__ import annotations

from typing import Any

from lmtrain.data.tasks.base import Example, Task, example, make_batch, to_row
from lmtrain.data.tasks.induction import Induction
from lmtrain.data.tasks.mqar import MQAR
from lmtrain.data.tasks.passkey import Passkey
from lmtrain.data.tasks.selective_copy import SelectiveCopy

TASKS: dict[str, type] = {"passkey": Passkey, "mqar": MQAR, "induction": Induction,
                          "selective_copy": SelectiveCopy}


def make_task(name: str, **options: Any) -> Task:
    """The task registered as `name`, built with `options` (its dataclass fields)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Example", "Induction", "MQAR", "Passkey", "SelectiveCopy", "Task", "example", "make_batch",
           "make_task", "to_row"]
