"""The config section of one document source (read by sources.open_source) or synthetic task (tasks)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.data import tasks

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

    def make_task(self, **extra: Any) -> tasks.Task:
        """The task of a `kind: task` source (its options plus `extra`, e.g. a tokenizer)."""
        if self.task not in tasks.TASKS:
            raise ConfigError(f"task: unknown task {self.task!r}{configlib.did_you_mean(self.task, list(tasks.TASKS))}"
                              if self.task else f"task: a task source needs a task name ({', '.join(tasks.TASKS)})")
        try:
            return tasks.make_task(self.task, **self.task_options, **extra)
        except (TypeError, ValueError) as e:
            fields = [f.name for f in dataclasses.fields(tasks.TASKS[self.task]) if f.name not in ("name", "tokenizer")]
            raise ConfigError(f"task_options: {e} (options of {self.task}: {', '.join(fields)})") from None
