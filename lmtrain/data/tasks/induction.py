"""Induction heads (Olsson et al. 2022; the Mamba paper's synthetic).

    r r r r # t r r r r r r r r # t
            '-'               '-- answer: the token that followed the trigger before

Random tokens (ASCII letters and digits, 62) with a trigger token (`#`, never drawn as noise)
placed once at a chosen or random depth, followed by a target token; the sequence ends with the
trigger again, and the answer is that target.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmtrain.data.tasks.base import DIGITS, LETTERS, Example

ALPHABET = np.concatenate([LETTERS, DIGITS])


@dataclasses.dataclass(frozen=True)
class Induction:
    depth: float | None = None  # where the first trigger sits, as a fraction of the sequence; None: uniform
    trigger_id: int = ord("#")
    name: str = "induction"

    def __post_init__(self):
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"induction: depth must be in [0, 1], got {self.depth}")

    def min_length(self) -> int:
        return 3

    def sample(self, rng: np.random.Generator, length: int) -> Example:
        tokens = rng.choice(ALPHABET, size=length + 1).astype(np.int32)
        last = length - 3  # latest start of the first (trigger, target) before the final trigger
        at = int(rng.integers(0, last + 1)) if self.depth is None else round(self.depth * last)
        tokens[at] = tokens[length - 1] = self.trigger_id
        tokens[length] = tokens[at + 1]
        answer = np.zeros(length, bool)
        answer[length - 1] = True
        return Example(tokens, answer)
