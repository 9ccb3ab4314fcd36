"""grain pipelines: sources -> split -> shard -> shuffle -> tokenize -> pack -> mix -> batch.

Per source (training): the document indices of the training split, this process's shard
(`[process_index::process_count]`), a global index shuffle by seed (reshuffled each epoch), repeated
forever, read and tokenized, packed into rows. Sources are mixed by weight at the row level (so
weights count tokens), batched to [global_batch_size / process_count, seq_len], and optionally run in
`worker_count` grain worker processes. The iterator is grain's DatasetIterator: `get_state()` is a
small JSON-serialisable dict (it also carries the bad-data counters, see `data_stats`) and
`set_state()` resumes with exactly the same batches.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import absl.flags
import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.data import sources as sources_lib
from lmtrain.data.config import DataConfig
from lmtrain.data.packing import FIELDS, Packer
from lmtrain.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]


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
    """Packs (tokens, flags) documents into rows; counts bad data; state = (parent state, offset)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, max_doc_tokens: int,
                 name: str, patience: int):
        super().__init__(parent)
        self._packer = Packer(seq_len, pad_id, max_doc_tokens)
        self._doc_state: dict | None = None  # parent state just before the document being packed
        self._counts = collections.Counter(dict.fromkeys(sources_lib.COUNTERS, 0))
        self._name, self._patience = name, patience

    def _pull(self, count: bool = True) -> np.ndarray | None:
        self._doc_state = self._parent.get_state()
        try:
            tokens_N, flags = next(self._parent)
        except StopIteration:
            return None
        if count:
            self._counts.update(("documents",) + flags)
            self._counts["tokens"] += len(tokens_N)
            self._counts["split"] += len(tokens_N) - 1 > self._packer.max_doc_tokens
        c = self._counts
        if c["documents"] > self._patience and c["documents"] == c["malformed"] + c["empty"]:
            # An endless stream with nothing to pack would hang: fail with the counts instead.
            raise sources_lib.DataError(f"{self._name}: the first {c['documents']} documents read were all "
                                        f"empty or malformed ({dict(c)}); check the source's path and field")
        return tokens_N

    def __next__(self) -> Batch:
        row = self._packer.next_row(self._pull)
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        busy = self._packer.doc_N is not None
        return {"parent": self._doc_state if busy else self._parent.get_state(),
                "offset": self._packer.offset if busy else 0, "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = collections.Counter(state["counts"])
        self._packer.doc_N, self._packer.offset = None, 0
        if state["offset"]:  # re-read the partly packed document (already counted)
            self._packer.doc_N, self._packer.offset = self._pull(count=False), state["offset"]


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, max_doc_tokens: int,
                 name: str = "heldout", patience: int = 2**62):
        super().__init__(parent)
        self._args = (seq_len, pad_id, max_doc_tokens, name, patience)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), *self._args)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)


def _local_batch(cfg: DataConfig, process_count: int) -> int:
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    return cfg.global_batch_size // process_count


def _documents(cfg: DataConfig, heldout: bool, process_index: int, process_count: int,
               tokenizer: Tokenizer) -> list[grain.MapDataset]:
    """Per source: this process's shard of the split, as (tokens, flags) documents by index."""
    per_source = []
    for i, src_cfg in enumerate(cfg.sources):
        source = sources_lib.open_source(src_cfg)
        ids = sources_lib.split_indices(source, cfg.heldout_fraction, heldout)[process_index::process_count]
        if not heldout and len(ids) == 0:
            raise sources_lib.DataError(f"sources[{i}] ({src_cfg.kind} {src_cfg.path!r}) has no training "
                                        f"documents for process {process_index} of {process_count}")
        per_source.append(grain.MapDataset.source(ids).map(_Encode(source, tokenizer)))
    return per_source


def make_train_iterator(cfg: DataConfig, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of this process's batches: dict of int32 [global_batch / process_count, seq_len]."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    local_batch = _local_batch(cfg, process_count)
    rows = []
    for i, docs in enumerate(_documents(cfg, False, process_index, process_count, tokenizer)):
        name = f"sources[{i}] ({cfg.sources[i].kind} {cfg.sources[i].path!r})"
        patience = min(4 * len(docs) * max(1, cfg.worker_count), 10_000)  # reads without a usable doc
        docs = docs.shuffle(seed=_seed(cfg.seed, i)).repeat().to_iter_dataset(_read_options(cfg))
        rows.append(_PackIterDataset(docs, cfg.seq_len, tokenizer.pad_id, cfg.max_doc_tokens, name, patience))
    mixed = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [s.weight for s in cfg.sources])
    batches = mixed.batch(local_batch, drop_remainder=True)
    if cfg.worker_count:
        # grain 0.2.18 reads an absl flag before parsing (google/grain#1355): use the flag defaults.
        if not absl.flags.FLAGS.is_parsed():
            absl.flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(batches)


def make_eval_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                       num_batches: int | None = None) -> Iterator[Batch]:
    """Batches of this process's shard of the held-out split of every source, in file order.

    Finite and deterministic. The last batch is padded with empty rows (loss_mask 0). With
    `num_batches`, exactly that many batches come out (empty ones after the data runs out), which
    multi-process evaluation needs so every process runs the same number of steps.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    local_batch = _local_batch(cfg, process_count)
    docs = grain.MapDataset.concatenate(_documents(cfg, True, process_index, process_count, tokenizer))
    rows = _PackIterDataset(docs.to_iter_dataset(_read_options(cfg)), cfg.seq_len, tokenizer.pad_id, cfg.max_doc_tokens)
    empty = {k: np.full((local_batch, cfg.seq_len), tokenizer.pad_id if k in ("inputs", "targets") else 0,
                        np.int32) for k in FIELDS}
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
            if "counts" in node and "offset" in node:
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
