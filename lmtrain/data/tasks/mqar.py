"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023).

    k1 v1 k2 v2 ... kN vN  _ _ k3 v3 _ _ _ k1 v1 _ k2 v2 _ ...
    '------ pairs -------'  '---- queries among noise ----'

N distinct keys with random values, then every key once more (random order, at random
non-overlapping positions among noise tokens, or all at the end); the answer is the value that
followed that key in the pairs. Keys are ASCII letters (52), values the other printable characters
(42), the noise token a space, so a byte-tokenizer sequence reads e.g. `a7Q%z0   Q% ...`.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Literal

import numpy as np

from lmtrain.data.tasks.base import LETTERS, Example, ids, sorted_slots

VALUES = ids("".join(c for c in string.printable[:94] if c not in string.ascii_letters))


@dataclasses.dataclass(frozen=True)
class MQAR:
    num_pairs: int = 8  # key-value pairs (<= 52); every key is queried once
    placement: Literal["uniform", "end"] = "uniform"  # queries spread over the rest, or packed at the end
    noise_id: int = ord(" ")
    name: str = "mqar"

    def __post_init__(self):
        if not 1 <= self.num_pairs <= len(LETTERS):
            raise ValueError(f"mqar: num_pairs must be in [1, {len(LETTERS)}], got {self.num_pairs}")

    def min_length(self) -> int:
        return 4 * self.num_pairs - 1

    def sample(self, rng: np.random.Generator, length: int) -> Example:
        n = self.num_pairs
        keys = rng.choice(LETTERS, size=n, replace=False)
        values = rng.choice(VALUES, size=n, replace=True)
        tokens = np.full(length + 1, self.noise_id, np.int32)
        tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
        rest = length + 1 - 2 * n
        if self.placement == "end":
            starts = rest - 2 * n + 2 * np.arange(n)
        else:
            starts = sorted_slots(rng, rest, n, 2)
        starts = 2 * n + starts
        order = rng.permutation(n)
        tokens[starts], tokens[starts + 1] = keys[order], values[order]
        answer = np.zeros(length, bool)
        answer[starts] = True  # target index t predicts token t + 1: the value after the query key
        return Example(tokens, answer)
