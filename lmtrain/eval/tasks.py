"""Accuracy of a model on the synthetic tasks (lmtrain/data/tasks) at several context lengths.

Teacher-forced greedy accuracy: the whole example is fed (in chunks, state passed along, like the
long-context evaluation) and the argmax prediction is compared with every answer token.
`accuracy` is the fraction of examples whose answer tokens are all right (exact match);
`token_accuracy` the fraction of answer tokens that are right. A length shorter than a task
needs is reported as skipped, not an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmtrain.data.tasks import Task, make_batch
from lmtrain.eval.longctx import ChunkRunner, check_chunking


def task_accuracy(runner: ChunkRunner, task: Task, length: int, samples: int, seed: int,
                  batch: int) -> dict[str, Any]:
    """Exact-match and per-token accuracy over examples 0..samples-1 of `task` at `length`."""
    if length < task.min_length():
        return {"length": length, "skipped": f"needs at least {task.min_length()} tokens"}
    check_chunking(length, runner.chunk)
    exact, right, total = 0, 0, 0
    for start in range(0, math.ceil(samples / batch) * batch, batch):
        rows = make_batch(task, seed, start, batch, length)  # always `batch` rows: one compiled shape
        pred_BxL = runner.run(rows["inputs"], rows["targets"]).pred_BxL
        n = min(batch, samples - start)
        mask, ok = rows["loss_mask"][:n].astype(bool), (pred_BxL == rows["targets"])[:n]
        exact += int(np.all(ok | ~mask, axis=1).sum())
        right, total = right + int((ok & mask).sum()), total + int(mask.sum())
    return {"length": length, "samples": samples, "accuracy": exact / samples,
            "token_accuracy": right / max(total, 1), "answer_tokens": total}


def evaluate_tasks(runner: ChunkRunner, tasks: dict[str, Task], lengths: Sequence[int], samples: int,
                   seed: int, batch: int) -> dict[str, list[dict[str, Any]]]:
    """{task name: [result per length]} (see `task_accuracy`)."""
    return {name: [task_accuracy(runner, task, n, samples, seed, batch) for n in lengths]
            for name, task in tasks.items()}
