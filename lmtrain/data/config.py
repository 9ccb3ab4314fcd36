"""Config sections for the data pipeline: sources, tokenizer, packing, batching, length curricula and
continual-pretraining stages."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from lmtrain import configlib
from lmtrain.configlib import ConfigError

SourceKind = Literal["stdlib", "text", "jsonl", "parquet", "arrayrecord", "task"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One document source; several sources form a weighted mixture."""

    kind: SourceKind = configlib.field(
        "stdlib", help="stdlib: this interpreter's standard-library .py files (built in, no download); "
        "text: one document per file; jsonl: one document per line; parquet: one per row; "
        "arrayrecord: one UTF-8 document per record; task: a synthetic task (lmtrain/data/tasks), one "
        "example per row at the step's length")
    path: str = configlib.field(
        "", help="glob of input files, e.g. 'data/*.jsonl' or 'data/**/*.txt' (** recurses); "
        "ignored for stdlib and task")
    field: str = configlib.field("text", help="jsonl: key holding the text; parquet: column holding the text")
    weight: float = configlib.field(
        1.0, help="mixture weight; sources are mixed in proportion to weight, counted in rows (so, in tokens)")
    task: str = configlib.field("", help="task: the task's name (passkey, mqar, induction, selective_copy)")
    task_options: dict[str, Any] = configlib.field(
        {}, help="task: options of the task (its dataclass fields, e.g. {num_pairs: 16} for mqar); passkey "
        "encodes its text with data.tokenizer")
    loss_on: Literal["answer", "all"] = configlib.field(
        "answer", help="task: put the loss on the answer tokens only, or on every token")

    def validate(self) -> None:
        if self.kind not in ("stdlib", "task") and not self.path:
            raise ConfigError(f"path: a '{self.kind}' source needs a file glob, e.g. path: data/*.{self.kind}")
        if self.weight <= 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")
        if self.kind in ("jsonl", "parquet") and not self.field:
            raise ConfigError(f"field: a '{self.kind}' source needs the name of its text field")
        if self.kind == "task":
            self.make_task()
        elif self.task or self.task_options:
            raise ConfigError(f"task, task_options: only for kind: task (this source is kind: {self.kind})")

    def make_task(self, **extra: Any) -> Any:
        """The task of a `kind: task` source (its options plus `extra`, e.g. a tokenizer)."""
        from lmtrain.data import tasks  # tasks -> tokenizer -> this module: import when needed

        if self.task not in tasks.TASKS:
            raise ConfigError(f"task: unknown task {self.task!r}{configlib.did_you_mean(self.task, list(tasks.TASKS))}"
                              if self.task else f"task: a task source needs a task name ({', '.join(tasks.TASKS)})")
        try:
            return tasks.make_task(self.task, **self.task_options, **extra)
        except (TypeError, ValueError) as e:
            fields = [f.name for f in dataclasses.fields(tasks.TASKS[self.task]) if f.name not in ("name", "tokenizer")]
            raise ConfigError(f"task_options: {e} (options of {self.task}: {', '.join(fields)})") from None


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
class CurriculumConfig:
    """The length (and number of rows) of each step's batch: a sequence-length curriculum."""

    kind: Literal["constant", "staged", "warmup", "mixture"] = configlib.field(
        "constant", help="constant: always data.seq_len; staged: `stages` of [until_step, length]; warmup: "
        "linear from start_length to data.seq_len over warmup_steps, in steps of `increment`; mixture: each "
        "step a random length from `lengths` with `weights`")
    batch_mode: Literal["constant_tokens", "fixed_batch"] = configlib.field(
        "constant_tokens", help="constant_tokens: rows = global_batch_size * seq_len / length, so every step "
        "has the same tokens; fixed_batch: rows = global_batch_size")
    bucket: int = configlib.field(
        64, help="lengths are rounded up to a multiple of this (at most data.seq_len), so a run compiles one "
        "step per distinct length; 1 keeps lengths as given")
    stages: tuple[tuple[int, ...], ...] = configlib.field(
        (), help="staged: [[until_step, length], ...], until_step increasing; stage i runs to its until_step "
        "(exclusive), the last one to the end of training")
    start_length: int = configlib.field(64, help="warmup: the length at step 0")
    increment: int = configlib.field(64, help="warmup: lengths grow in steps of this many tokens")
    warmup_steps: int = configlib.field(1000, help="warmup: steps to reach data.seq_len")
    lengths: tuple[int, ...] = configlib.field((), help="mixture: the lengths to draw from")
    weights: tuple[float, ...] = configlib.field(
        (), help="mixture: their probabilities (normalised; empty = uniform); drawn per step from (seed, step)")

    def validate(self) -> None:
        if self.bucket < 1:
            raise ConfigError(f"bucket: must be >= 1, got {self.bucket}")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A continual-pretraining stage: from `start_step` on, a new mixture (with replay) and an LR re-warm."""

    start_step: int = configlib.field(0, help="first step of the stage; > 0, increasing across stages "
                                      "(steps before the first stage use data.sources)")
    sources: tuple[SourceConfig, ...] = configlib.field(
        (), help="the stage's sources (a mixture, as data.sources); empty = keep the previous stage's")
    replay: float = configlib.field(
        0.0, help="fraction of rows drawn from the previous stage's sources (by their weights), in [0, 1)")
    lr: float = configlib.field(0.0, help="peak learning rate of the stage's re-warm; 0 = optimizer.lr")
    warmup_steps: int = configlib.field(0, help="steps of the linear re-warm from the lr the previous "
                                      "stage ended at to this stage's lr")
    min_lr_ratio: float = configlib.field(-1.0, help="the stage's final lr as a fraction of its peak; "
                                          "-1 = schedule.min_lr_ratio")

    def validate(self) -> None:
        rules = {  # field: (ok, requirement)
            "start_step": (self.start_step > 0, "> 0 (the stage's first step)"),
            "replay": (0.0 <= self.replay < 1.0, "in [0, 1)"),
            "lr": (self.lr >= 0, ">= 0 (0 = optimizer.lr)"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "min_lr_ratio": (self.min_lr_ratio == -1.0 or 0.0 <= self.min_lr_ratio <= 1.0,
                             "in [0, 1], or -1 for schedule.min_lr_ratio"),
        }
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise ConfigError(f"{name}: must be {requirement}, got {getattr(self, name)!r}")


def check_stages(stages: tuple[StageConfig, ...] | list[StageConfig]) -> None:
    """Cross-stage checks: each stage valid, start steps strictly increasing."""
    for i, stage in enumerate(stages):
        try:
            stage.validate()
        except ConfigError as e:
            raise ConfigError(f"stages[{i}].{e}") from None
        if i and stage.start_step <= stages[i - 1].start_step:
            raise ConfigError(f"stages[{i}].start_step: must be > stages[{i - 1}].start_step "
                              f"({stages[i - 1].start_step}), got {stage.start_step}; list stages in order")


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
        from lmtrain.data import curriculum  # it imports this module

        curriculum.check(self)
