"""Config sections for the data pipeline: sources, tokenizer, packing and batching."""

from __future__ import annotations

import dataclasses
from typing import Literal

from lmtrain import configlib
from lmtrain.configlib import ConfigError

SourceKind = Literal["stdlib", "text", "jsonl", "parquet", "arrayrecord"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One document source; several sources form a weighted mixture."""

    kind: SourceKind = configlib.field(
        "stdlib", help="stdlib: this interpreter's standard-library .py files (built in, no download); "
        "text: one document per file; jsonl: one document per line; parquet: one per row; "
        "arrayrecord: one UTF-8 document per record")
    path: str = configlib.field(
        "", help="glob of input files, e.g. 'data/*.jsonl' or 'data/**/*.txt' (** recurses); "
        "ignored for stdlib")
    field: str = configlib.field("text", help="jsonl: key holding the text; parquet: column holding the text")
    weight: float = configlib.field(
        1.0, help="mixture weight; sources are mixed in proportion to weight, counted in packed rows "
        "(so, in tokens)")

    def validate(self) -> None:
        if self.kind != "stdlib" and not self.path:
            raise ConfigError(f"path: a '{self.kind}' source needs a file glob, e.g. path: data/*.{self.kind}")
        if self.weight <= 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")
        if self.kind in ("jsonl", "parquet") and not self.field:
            raise ConfigError(f"field: a '{self.kind}' source needs the name of its text field")


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Files to global training batches: sources, split, tokenizer, packing, batching."""

    sources: tuple[SourceConfig, ...] = configlib.field(
        (SourceConfig(),), help="document sources (a list); more than one forms a weighted mixture")
    tokenizer: TokenizerConfig = configlib.field(TokenizerConfig(), help="tokenizer settings")
    seq_len: int = configlib.field(512, help="tokens per packed row (the model's training length T)")
    global_batch_size: int = configlib.field(
        8, help="rows per step over all processes; each process makes global_batch_size / process_count")
    seed: int = configlib.field(
        0, help="seed of the document order: each source is globally shuffled by index (no shuffle "
        "buffer), differently in each epoch")
    heldout_fraction: float = configlib.field(
        0.01, help="fraction of documents held out for evaluation, chosen by a hash of each document's "
        "identity (file path relative to the glob root + record number); independent of seed")
    max_doc_tokens: int = configlib.field(
        65536, help="documents with more predicted tokens than this are split into pieces of at most "
        "this many; each piece is packed as its own document")
    worker_count: int = configlib.field(
        0, help="grain worker processes for the training pipeline; 0 runs it in-process. Changing it "
        "changes the batch order (still deterministic)")
    read_threads: int = configlib.field(
        2, help="threads reading and tokenizing documents per source (grain ReadOptions.num_threads)")

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: need at least one source (e.g. [{kind: stdlib}])")
        rules = {  # field: (ok, requirement)
            "seq_len": (self.seq_len >= 1, ">= 1"),
            "global_batch_size": (self.global_batch_size >= 1, ">= 1"),
            "max_doc_tokens": (self.max_doc_tokens >= 1, ">= 1"),
            "worker_count": (self.worker_count >= 0, ">= 0"),
            "read_threads": (self.read_threads >= 1, ">= 1"),
            "heldout_fraction": (0.0 <= self.heldout_fraction < 1.0, "in [0, 1)"),
        }
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise ConfigError(f"{name}: must be {requirement}, got {getattr(self, name)!r}")
