"""Training and evaluation iterators: sources -> split -> shard -> shuffle -> tokenize -> pack -> mix -> batch.

Per source (training): the document indices of the training split, this process's shard
(`[process_index::process_count]`), a global index shuffle by seed (reshuffled each epoch), repeated
forever, read and tokenized by grain (rows.Documents), packed into rows at the step's length. Each
`next()` is one optimizer step k: its length and rows come from the curriculum, its rows from the
mixture of the continual-pretraining stage that step k is in (sources mixed by weight at the row
level, so weights count tokens; each row's source drawn by an RNG seeded by (seed, stage, k)), and
from step `stream_from` on, row r continues row r of the previous step (truncated BPTT). `get_state()`
is a small JSON-serialisable dict (it also carries the bad-data counters, see `data_stats`) and
`set_state()` resumes with exactly the same batches. See docs/data.md.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.configlib import ConfigError
from lmtrain.data import sources as sources_lib
from lmtrain.data.batch import BATCH_FIELDS, Batch
from lmtrain.data.config import DataConfig, SourceConfig, StageConfig, check_stages
from lmtrain.data.curriculum import Curriculum
from lmtrain.data.packing import Packer
from lmtrain.data.rows import Documents, Row, Streams, TaskRows, TextRows
from lmtrain.data.tasks import TASKS
from lmtrain.data.tokenizer import Tokenizer, load_tokenizer

_ROW_TAG, _STREAM_TAG = 0x726F77, 0x737472  # separate the row-source and stream-document draws


class _Encode:
    """Document index -> (tokens [bos, ..., eos] or empty, bad-data flags)."""

    def __init__(self, source: sources_lib.Source, tokenizer: Tokenizer):
        self.source, self.tokenizer = source, tokenizer

    def __call__(self, index: Any) -> tuple[np.ndarray, tuple[str, ...]]:
        doc = self.source.read(int(index))
        flags = ("undecodable",) * doc.undecodable
        if doc.malformed or not doc.text.strip():
            return np.zeros(0, np.int32), flags + ("malformed" if doc.malformed else "empty",)
        tok = self.tokenizer
        return np.asarray([tok.bos_id, *tok.encode(doc.text), tok.eos_id], np.int32), flags


class _PackIterator(grain.DatasetIterator):
    """Packs a finite stream of (tokens, flags) documents into rows (evaluation)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, max_doc_tokens: int):
        super().__init__(parent)
        self._packer = Packer(seq_len, pad_id, max_doc_tokens)

    def _pull(self) -> np.ndarray | None:
        try:
            return next(self._parent)[0]
        except StopIteration:
            return None

    def __next__(self) -> Row:
        row = self._packer.next_row(self._pull)
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        raise NotImplementedError("the evaluation iterator is not resumable; restart it")

    def set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("the evaluation iterator is not resumable; restart it")


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, max_doc_tokens: int):
        super().__init__(parent)
        self._args = (seq_len, pad_id, max_doc_tokens)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), *self._args)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def task_seed(data_seed: int, mixture: int, source: int) -> int:
    """The example seed of task source `source` of mixture `mixture` (0: data.sources; see TrainIterator)."""
    return _seed(data_seed, "task", mixture, source)


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)


def _local_batch(cfg: DataConfig, process_count: int) -> int:
    """This process's rows of a global_batch_size batch (the one check evaluation needs)."""
    if cfg.global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                          f"process_count={process_count}")
    return cfg.global_batch_size // process_count


def _source_name(where: str, src: SourceConfig) -> str:
    return f"{where} (task {src.task})" if src.kind == "task" else f"{where} ({src.kind} {src.path!r})"


def _mixtures(cfg: DataConfig, stages: Sequence[StageConfig]) -> tuple[list[tuple[SourceConfig, ...]], list[int]]:
    """The mixtures (data.sources, then each stage's own sources) and the mixture of each stage (0: before
    the first stage); a stage without sources keeps the previous stage's mixture."""
    mixtures, stage_mixture = [cfg.sources], [0]
    for stage in stages:
        if stage.sources:
            mixtures.append(stage.sources)
        stage_mixture.append(len(mixtures) - 1)
    return mixtures, stage_mixture


def check_data(cfg: DataConfig, stages: Sequence[StageConfig] = (), stream_from: int | None = None,
               process_count: int = 1) -> None:
    """The data layer's checks of a run (raises ConfigError): valid stages; global_batch_size and every
    curriculum step's rows divisible by `process_count`; with `stream_from` (TBPTT streams), the same rows
    every step and no task source in any mixture."""
    check_stages(stages)
    _local_batch(cfg, process_count)
    curriculum = Curriculum(cfg)
    curriculum.check_processes(process_count)
    if stream_from is None:
        return
    if len({rows for rows, _ in curriculum.shapes()}) > 1:
        raise ConfigError("stream mode needs the same rows every step, but the curriculum's batch_mode "
                          "constant_tokens changes them with the length; set curriculum.batch_mode: "
                          "fixed_batch (or use a constant curriculum)")
    tasks = [_source_name(f"mixture {m} sources[{j}]", src) for m, srcs in enumerate(_mixtures(cfg, stages)[0])
             for j, src in enumerate(srcs) if src.kind == "task"]
    if tasks:
        raise ConfigError(f"stream mode reads documents, but {tasks[0]} is a task source; remove task "
                          "sources or don't stream")


def _documents(src: SourceConfig, name: str, heldout_fraction: float, heldout: bool, process_index: int,
               process_count: int, tokenizer: Tokenizer) -> grain.MapDataset:
    """This process's shard of one source's split, as (tokens, flags) documents by index."""
    source = sources_lib.open_source(src)
    ids = sources_lib.split_indices(source, heldout_fraction, heldout)[process_index::process_count]
    if not heldout and len(ids) == 0:
        raise sources_lib.DataError(f"{name} has no training documents for process {process_index} of "
                                    f"{process_count}")
    return grain.MapDataset.source(ids).map(_Encode(source, tokenizer))


class TrainIterator:
    """Endless training batches, one per optimizer step; see the module docstring and docs/data.md.

    Mixture m is a list of sources: m = 0 is data.sources, then one per stage that sets `sources` (a
    stage without sources reuses the previous stage's mixture and its reading positions). Every source
    of every mixture has its own row source (TextRows or TaskRows), opened at construction and read
    from when a step first draws a row from it.
    """

    def __init__(self, cfg: DataConfig, stages: Sequence[StageConfig] = (), stream_from: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        check_data(cfg, stages, stream_from, process_count)
        self.cfg, self.curriculum = cfg, Curriculum(cfg)
        self.process_index, self.process_count = process_index, process_count
        tokenizer = load_tokenizer(cfg.tokenizer)
        self._pad_id = tokenizer.pad_id

        mixtures, self._stage_mixture = _mixtures(cfg, stages)
        self._mixtures = [[self._row_source(m, j, src, tokenizer) for j, src in enumerate(srcs)]
                          for m, srcs in enumerate(mixtures)]
        self._starts = [0] + [stage.start_step for stage in stages]
        self._plans = []  # per stage: ([(mixture, source)], probabilities)
        for i, stage in enumerate((None, *stages)):
            own = self._weighted(mixtures, self._stage_mixture[i], 1.0 - (stage.replay if stage else 0.0))
            replay = self._weighted(mixtures, self._stage_mixture[i - 1], stage.replay) if stage else []
            keys, weights = zip(*(own + replay))
            self._plans.append((list(keys), np.asarray(weights) / sum(weights)))

        self.stream_from = stream_from
        self._streams = None
        if stream_from is not None:
            self._streams = Streams(cfg.global_batch_size // process_count, self._pad_id, cfg.max_doc_tokens)
        self.step = 0

    def _row_source(self, m: int, j: int, src: SourceConfig, tokenizer: Tokenizer) -> TextRows | TaskRows:
        cfg = self.cfg
        name = _source_name(f"sources[{j}]" if m == 0 else f"stages (mixture {m}) sources[{j}]", src)
        if src.kind == "task":
            takes_tokenizer = "tokenizer" in {f.name for f in dataclasses.fields(TASKS[src.task])}  # passkey
            task = src.make_task(**({"tokenizer": tokenizer} if takes_tokenizer else {}))
            shortest = self.curriculum.buckets()[0]
            if shortest < task.min_length():
                raise ValueError(f"{name}: the task needs rows of at least {task.min_length()} tokens, but the "
                                 f"curriculum makes rows of {shortest}; lengthen the curriculum or change the task")
            return TaskRows(task, task_seed(cfg.seed, m, j), src.loss_on, self.process_index, self.process_count)
        docs = _documents(src, name, cfg.heldout_fraction, False, self.process_index, self.process_count, tokenizer)
        patience = min(4 * len(docs) * max(1, cfg.worker_count), 10_000)  # reads without a usable doc
        order = docs.shuffle(seed=_seed(cfg.seed, j) if m == 0 else _seed(cfg.seed, m, j)).repeat()
        documents = Documents(order, name, patience, cfg.max_doc_tokens, _read_options(cfg), cfg.worker_count)
        lanes = max(rows for rows, _ in self.curriculum.shapes()) // self.process_count  # one per row of a step
        return TextRows(documents, self._pad_id, cfg.max_doc_tokens, lanes)

    @staticmethod
    def _weighted(mixtures: list, m: int, share: float) -> list[tuple[tuple[int, int], float]]:
        if share <= 0:
            return []
        total = sum(src.weight for src in mixtures[m])
        return [((m, j), share * src.weight / total) for j, src in enumerate(mixtures[m])]

    def stage_at(self, step: int) -> int:
        """The stage of `step` (0: before the first stage's start_step)."""
        return bisect.bisect_right(self._starts, step) - 1

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        k, stage = self.step, self.stage_at(self.step)
        length = self.curriculum.length_at(k)
        local = self.curriculum.rows_at(k) // self.process_count
        keys, p = self._plans[stage]
        if self._streams is not None and k >= self.stream_from:
            def pull(r: int, n: int) -> tuple[tuple[int, ...], np.ndarray]:
                stream = self.process_index * local + r
                pick = 0 if len(keys) == 1 else np.random.default_rng(
                    [self.cfg.seed, _STREAM_TAG, stage, stream, n]).choice(len(keys), p=p)
                m, j = keys[pick]
                index, tokens_N = self._mixtures[m][j].documents.pull()
                return (m, j, index), tokens_N

            rows = self._streams.next_rows(length, pull)
        else:
            picks = np.zeros(local, np.int64)
            if len(keys) > 1:
                every = np.random.default_rng([self.cfg.seed, _ROW_TAG, stage, k]).choice(
                    len(keys), size=local * self.process_count, p=p)
                picks = every[self.process_index * local:(self.process_index + 1) * local]
            rows = [self._mixtures[keys[i][0]][keys[i][1]].next_row(length) for i in picks]
        self.step += 1
        return _stack(rows)

    def get_state(self) -> dict[str, Any]:
        """{"step": next step, "mixtures": [[source state, ...] per mixture], "streams": [...] or None}."""
        return {"step": self.step,
                "mixtures": [[src.get_state() for src in srcs] for srcs in self._mixtures],
                "streams": self._streams.get_state() if self._streams is not None else None}

    def set_state(self, state: Mapping[str, Any]) -> None:
        shape = [len(srcs) for srcs in self._mixtures]
        if "mixtures" not in state or [len(srcs) for srcs in state["mixtures"]] != shape:
            raise ValueError(f"the data state does not match this data config (sources per mixture {shape}; the "
                             f"state has keys {sorted(state)}): resume with the same data.sources and stages")
        self.step = int(state["step"])
        for srcs, states in zip(self._mixtures, state["mixtures"]):
            for src, src_state in zip(srcs, states):
                src.set_state(src_state)
        # Stream mode switched on at resume (e.g. TBPTT post-training from a plain checkpoint): the streams
        # start fresh; switched off: rows are packed again from the mixtures' positions.
        if self._streams is not None and state["streams"] is not None:
            self._streams.set_state(state["streams"], lambda key: self._mixtures[key[0]][key[1]].documents.read(key[2]))

    def close(self) -> None:
        for srcs in self._mixtures:
            for src in srcs:
                src.close()


def _stack(rows: list[Row]) -> Batch:
    return {k: np.stack([row[k] for row in rows]) for k in BATCH_FIELDS}


def make_train_iterator(cfg: DataConfig, *, stages: Sequence[StageConfig] = (), stream_from: int | None = None,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Endless iterator of this process's batches, one per optimizer step k: dict of int32
    [curriculum.rows_at(k) / process_count, curriculum.length_at(k)] (default [global_batch / process_count,
    seq_len]). `stages`: continual-pretraining stages (mixtures with replay from their start_step);
    `stream_from`: from this step on, row r of each batch continues row r of the previous one (None: never)."""
    return TrainIterator(cfg, stages, stream_from, process_index, process_count)


def make_eval_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int | None = None) -> Iterator[Batch]:
    """Batches of this process's shard of the held-out split of every text source, in file order.

    Finite and deterministic. The last batch is padded with empty rows (loss_mask 0). With
    `num_batches`, exactly that many batches come out (empty ones after the data runs out), which
    multi-process evaluation needs so every process runs the same number of steps.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    local_batch = _local_batch(cfg, process_count)
    per_source = [_documents(src, _source_name(f"sources[{i}]", src), cfg.heldout_fraction, True, process_index,
                             process_count, tokenizer) for i, src in enumerate(cfg.sources) if src.kind != "task"]
    docs = grain.MapDataset.concatenate(per_source) if per_source else grain.MapDataset.source([])
    rows = _PackIterDataset(docs.to_iter_dataset(_read_options(cfg)), cfg.seq_len, tokenizer.pad_id, cfg.max_doc_tokens)
    empty = {k: np.full((local_batch, cfg.seq_len), tokenizer.pad_id if k in ("inputs", "targets") else 0,
                        np.int32) for k in BATCH_FIELDS}
    count = 0
    for batch in rows.batch(local_batch, drop_remainder=False):
        if num_batches is not None and count >= num_batches:
            return
        n = len(batch["inputs"])
        yield {k: np.concatenate([v, empty[k][n:]]) for k, v in batch.items()}
        count += 1
    while num_batches is not None and count < num_batches:
        yield {k: v.copy() for k, v in empty.items()}
        count += 1


def data_stats(state: Mapping[str, Any]) -> dict[str, int]:
    """Bad-data counters summed over all sources (and workers) of an iterator's `get_state()`."""
    totals = collections.Counter(dict.fromkeys(sources_lib.COUNTERS, 0))

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("counts"), Mapping):
                totals.update(node["counts"])
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(state)
    return dict(totals)


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                    sharding: jax.sharding.Sharding | PartitionSpec) -> dict[str, jax.Array]:
    """Global jax Arrays from each process's local rows (leading axis split across processes).

    `sharding` is a Sharding or a PartitionSpec on `mesh`, e.g. P(("data", "fsdp")). Processes whose
    devices hold the same rows (replicas) must pass identical local batches.
    """
    if isinstance(sharding, PartitionSpec):
        sharding = NamedSharding(mesh, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
