"""The data section of the run config, composed of the sections that live with the code they configure
(sources, tokenizer, curriculum); re-exports those and the continual-pretraining stages."""

from __future__ import annotations

import dataclasses

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.data.curriculum import CurriculumConfig
from lmtrain.data.curriculum import check as check_curriculum
from lmtrain.data.source_config import SourceConfig, SourceKind
from lmtrain.data.stages import StageConfig, check_stages
from lmtrain.data.tokenizer import TokenizerConfig

__all__ = ["CurriculumConfig", "DataConfig", "SourceConfig", "SourceKind", "StageConfig", "TokenizerConfig",
           "check_stages"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Files to global training batches: sources, split, tokenizer, packing, batching."""

    sources: tuple[SourceConfig, ...] = configlib.field(
        (SourceConfig(),), help="document sources (a list); more than one forms a weighted mixture")
    tokenizer: TokenizerConfig = configlib.field(TokenizerConfig(), help="tokenizer settings")
    seq_len: int = configlib.field(
        512, help="tokens per packed row (the model's training length T); with a curriculum, the longest "
        "(and final) length")
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
        0, help="grain worker processes reading and tokenizing documents, per source; 0 reads in-process "
        "(with read_threads threads). Does not change the batches")
    read_threads: int = configlib.field(
        2, help="threads reading and tokenizing documents per source (grain ReadOptions.num_threads)")
    curriculum: CurriculumConfig = configlib.field(
        CurriculumConfig(), help="sequence-length curriculum (default: every step at seq_len)")

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: need at least one source (e.g. [{kind: stdlib}])")
        rules = {  # field: (ok, requirement)
            "seq_len": (self.seq_len >= 1, ">= 1"),
            "global_batch_size": (self.global_batch_size >= 1, ">= 1"),
            "seed": (self.seed >= 0, ">= 0 (it seeds numpy generators)"),
            "max_doc_tokens": (self.max_doc_tokens >= 1, ">= 1"),
            "worker_count": (self.worker_count >= 0, ">= 0"),
            "read_threads": (self.read_threads >= 1, ">= 1"),
            "heldout_fraction": (0.0 <= self.heldout_fraction < 1.0, "in [0, 1)"),
        }
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise ConfigError(f"{name}: must be {requirement}, got {getattr(self, name)!r}")
        check_curriculum(self)
