"""What every synthetic task shares: the example layout, seeding, rows, batches.

A task is a frozen dataclass with `min_length()` and `sample(rng, length) -> Example`. An example has
`length + 1` tokens: the model reads `tokens[:-1]` and predicts `tokens[1:]`, and `answer_T` marks the
targets that are answer tokens. Example `index` of seed `seed` is always the same sequence
(`example(task, seed, index, length)`), whatever the batch layout, process count or resume point.

Token ids are raw ids. The alphabets below are printable ASCII byte values, so with the byte
tokenizer (vocab 259) every sequence decodes to readable text; with any other tokenizer they are
just ids below 127 (every vocabulary of >= 127 ids works). Passkey encodes its text with a tokenizer.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Literal, Protocol

import numpy as np

from lmtrain.data.batch import BATCH_FIELDS, Batch

LossOn = Literal["answer", "all"]

LETTERS = np.frombuffer(string.ascii_letters.encode(), np.uint8).astype(np.int32)  # 52 ids
DIGITS = np.frombuffer(string.digits.encode(), np.uint8).astype(np.int32)  # 10 ids


def ids(chars: str) -> np.ndarray:
    """Byte ids of ASCII `chars` (int32)."""
    return np.frombuffer(chars.encode("ascii"), np.uint8).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence: `tokens_N` (N = length + 1) and the answer mask over its `length` targets."""

    tokens_N: np.ndarray  # int32 [length + 1]
    answer_T: np.ndarray  # bool [length]: target tokens_N[t + 1] is an answer token


class Task(Protocol):
    name: str

    def min_length(self) -> int: ...
    def sample(self, rng: np.random.Generator, length: int) -> Example: ...


def check_length(task: Task, length: int) -> None:
    if length < task.min_length():
        raise ValueError(f"{task.name}: length {length} is too short; this task needs at least "
                         f"{task.min_length()} tokens with these settings")


def example(task: Task, seed: int, index: int, length: int) -> Example:
    """Example `index` of the stream `seed` at `length` (deterministic)."""
    check_length(task, length)
    ex = task.sample(np.random.default_rng([seed, index, length]), length)
    assert ex.tokens_N.shape == (length + 1,) and ex.answer_T.shape == (length,), task.name
    return ex


def to_row(ex: Example, loss_on: LossOn = "answer") -> dict[str, np.ndarray]:
    """The trainer's row layout (see lmtrain/data/packing.py): one document per row."""
    length = len(ex.answer_T)
    mask = ex.answer_T if loss_on == "answer" else np.ones(length, bool)
    return {"inputs": ex.tokens_N[:-1].astype(np.int32), "targets": ex.tokens_N[1:].astype(np.int32),
            "segment_ids": np.ones(length, np.int32), "positions": np.arange(length, dtype=np.int32),
            "loss_mask": mask.astype(np.int32)}


def make_batch(task: Task, seed: int, start: int, batch_size: int, length: int,
               loss_on: LossOn = "answer") -> Batch:
    """Examples `start .. start + batch_size - 1` as a batch of int32 [batch_size, length] (evaluation;
    training draws a task source's rows through rows.TaskRows)."""
    rows = [to_row(example(task, seed, start + i, length), loss_on) for i in range(batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_FIELDS}


def sorted_slots(rng: np.random.Generator, span: int, count: int, width: int) -> np.ndarray:
    """`count` sorted start positions in [0, span) of non-overlapping items `width` tokens wide."""
    free = span - count * (width - 1)
    if free < count:
        raise ValueError(f"cannot place {count} items of {width} tokens in {span} tokens")
    picks = np.sort(rng.choice(free, size=count, replace=False))
    return picks + np.arange(count) * (width - 1)
