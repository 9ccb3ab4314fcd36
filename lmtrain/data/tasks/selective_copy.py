"""Selective copying (Gu & Dao 2023, the Mamba paper's synthetic).

    . . a . . . 7 . Q . . . . z . . | a 7 Q z
    '----- content among noise -----' '-answer-'

`num_tokens` content tokens (ASCII letters and digits) at random positions among noise tokens
(`.`), then a separator (`|`); the answer is the content tokens in order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmtrain.data.tasks.base import DIGITS, LETTERS, Example, sorted_slots

ALPHABET = np.concatenate([LETTERS, DIGITS])


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
    num_tokens: int = 8  # content tokens to copy
    noise_id: int = ord(".")
    separator_id: int = ord("|")
    name: str = "selective_copy"

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"selective_copy: num_tokens must be >= 1, got {self.num_tokens}")

    def min_length(self) -> int:
        return 2 * self.num_tokens  # body of num_tokens, separator, copy of num_tokens, minus one

    def sample(self, rng: np.random.Generator, length: int) -> Example:
        m = self.num_tokens
        body = length - m  # tokens before the separator
        content = rng.choice(ALPHABET, size=m).astype(np.int32)
        tokens = np.full(length + 1, self.noise_id, np.int32)
        tokens[sorted_slots(rng, body, m, 1)] = content
        tokens[body] = self.separator_id
        tokens[body + 1:] = content
        answer = np.zeros(length, bool)
        answer[body:] = True
        return Example(tokens, answer)
