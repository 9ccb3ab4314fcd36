"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention").

    [intro] <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...>
    What is the pass key? The pass key is 48213
                                          '---' answer

A random `digits`-digit number hidden at `depth` (fraction of the filler before it; None: uniform)
in filler text: the fixed sentence of the paper repeated, or any text (`filler_text`, e.g. the
held-out corpus), taken from a random offset. The text pieces are encoded with `tokenizer` (default:
the byte tokenizer), so the task works with any tokenizer; the sequence is cut to the exact length
by the amount of filler. `intro=True` prepends the paper's instruction (about 150 more bytes);
without it the task fits in about 105 byte tokens, so it can be posed at short training lengths.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lmtrain.data.tasks.base import Example
from lmtrain.data.tokenizer import ByteTokenizer, Tokenizer

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "


@dataclasses.dataclass(frozen=True)
class Passkey:
    digits: int = 5
    depth: float | None = None
    intro: bool = False
    filler_text: str | None = dataclasses.field(default=None, repr=False)  # None: the fixed FILLER
    tokenizer: Tokenizer = dataclasses.field(default_factory=ByteTokenizer, repr=False, compare=False)
    name: str = "passkey"

    def __post_init__(self):
        if not 1 <= self.digits <= 18:
            raise ValueError(f"passkey: digits must be in [1, 18], got {self.digits}")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"passkey: depth must be in [0, 1], got {self.depth}")
        if self.filler_text is not None and not self.filler_text.strip():
            raise ValueError("passkey: filler_text is empty")

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), np.int32)

    @functools.cached_property
    def _filler_ids(self) -> np.ndarray:
        return self._encode(FILLER if self.filler_text is None else self.filler_text)

    def _fixed_tokens(self) -> int:
        key = "9" * self.digits  # all keys of `digits` digits: the longest encoding is what matters
        parts = (INTRO if self.intro else "", NEEDLE.format(key=key), QUESTION, key)
        return sum(len(self._encode(t)) for t in parts)

    def min_length(self) -> int:
        return self._fixed_tokens() - 1

    def sample(self, rng: np.random.Generator, length: int) -> Example:
        key = str(int(rng.integers(10 ** (self.digits - 1), 10**self.digits)))
        intro, needle = self._encode(INTRO if self.intro else ""), self._encode(NEEDLE.format(key=key))
        question, answer = self._encode(QUESTION), self._encode(key)
        n_filler = length + 1 - len(intro) - len(needle) - len(question) - len(answer)
        if n_filler < 0:
            raise ValueError(f"passkey: length {length} is too short; need at least {self.min_length()}")
        filler = self._filler_ids
        start = int(rng.integers(0, len(filler)))
        filler = np.take(filler, np.arange(start, start + n_filler), mode="wrap")
        depth = rng.uniform() if self.depth is None else self.depth
        cut = round(depth * n_filler)
        tokens = np.concatenate([intro, filler[:cut], needle, filler[cut:], question, answer]).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[length - len(answer):] = True
        return Example(tokens, mask)
