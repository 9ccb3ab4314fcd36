"""Tokenizers: UTF-8 bytes (no file needed) or a trained sentencepiece model, and their config section."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, Protocol

import sentencepiece as spm

from lmtrain import configlib
from lmtrain.configlib import ConfigError

TRAIN_COMMAND = "lmtrain tokenizer train --source stdlib --vocab-size 4096 --type bpe --out tokenizers/stdlib4k"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    kind: Literal["byte", "sentencepiece"] = configlib.field(
        "byte", help="byte: UTF-8 bytes 0..255 plus pad=256, bos=257, eos=258 (vocab 259); "
        "sentencepiece: a trained .model file (see `lmtrain tokenizer train`)")
    path: str = configlib.field("", help="sentencepiece: path of the .model file")

    def validate(self) -> None:
        if self.kind == "sentencepiece" and not self.path:
            raise ConfigError("path: a sentencepiece tokenizer needs its .model file "
                              "(create one with `lmtrain tokenizer train`)")


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad=256, bos=257, eos=258; vocab_size=259.

    decode drops special ids and replaces invalid UTF-8 with U+FFFD.
    """

    vocab_size, pad_id, bos_id, eos_id = 259, 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece .model file. A model without a pad id pads with id 0 (padding is masked)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = max(self._sp.pad_id(), 0)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path} has no bos/eos piece; train one with `{TRAIN_COMMAND}`")

    def __getstate__(self) -> dict:  # the processor is not picklable; reload it from the path
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _sentencepiece(cfg: TokenizerConfig) -> SentencePieceTokenizer:
    if not Path(cfg.path).is_file():
        raise FileNotFoundError(f"tokenizer model {cfg.path!r} not found; create one with `{TRAIN_COMMAND}` "
                                "and set tokenizer.path to the .model file it writes")
    return SentencePieceTokenizer(cfg.path)


TOKENIZERS = {"byte": lambda cfg: ByteTokenizer(), "sentencepiece": _sentencepiece}


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    return TOKENIZERS[cfg.kind](cfg)


def _lines(texts: Iterable[str], max_lines: int, max_chars: int) -> Iterator[str]:
    n = 0
    for text in texts:
        for line in text.splitlines():
            if line.strip() and len(line) <= max_chars:
                yield line
                n += 1
                if n >= max_lines:
                    return


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: Literal["unigram", "bpe"] = "unigram",
    byte_fallback: bool = True,
    max_lines: int = 2_000_000,
    max_line_chars: int = 4096,
    num_threads: int = os.cpu_count() or 1,
) -> Path:
    """Trains a sentencepiece model on the lines of `texts`; returns the path of `{model_prefix}.model`.

    Text is kept verbatim (identity normalization, no dummy prefix, whitespace-only pieces allowed) so
    code and indentation round-trip; with byte_fallback, characters outside the vocabulary (newline
    included, since training sees lines) encode as byte pieces, so decode(encode(s)) == s for any s.
    Ids: pad=0, eos=1, bos=2, unk=3. `vocab_size` is an upper bound on small corpora.
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, max_lines, max_line_chars),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=0.9995 if byte_fallback else 1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=max_line_chars * 4,  # bytes
        hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        num_threads=num_threads,
        minloglevel=2,
    )
    return prefix.with_name(prefix.name + ".model")
