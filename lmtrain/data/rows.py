"""Row sources for the training iterator: rows at any length, from documents or synthetic tasks.

    Documents   one source's endless shuffled document order on this process (grain reads and tokenizes)
    TextRows    packs a Documents into rows, one lane per row of a step; `next_row(length)` may change length
    TaskRows    one synthetic-task example per row, generated at the requested length
    Streams     truncated-BPTT streams: row r of each call continues row r of the previous call

Every object has a small JSON state (`get_state`/`set_state`) from which it resumes exactly. A
document is identified by its index in its source's order, so a partly used document is re-read by
index on restore.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import absl.flags
import grain
import numpy as np

from lmtrain.data import sources as sources_lib
from lmtrain.data.packing import Packer, StreamPacker
from lmtrain.data.tasks import Task, example, to_row

Row = dict[str, np.ndarray]


class Documents:
    """One source's documents on this process, endlessly: element i of `order` is always the same one.

    `order` is a grain MapDataset of (tokens, flags) (shuffled, repeated); it is read in order by a grain
    iterator with `read_options` threads (or `worker_count` processes), started lazily at `next_index`.
    Documents with fewer than 2 tokens are skipped; all reads are counted (see sources.COUNTERS).
    """

    def __init__(self, order: grain.MapDataset, name: str, patience: int, max_doc_tokens: int,
                 read_options: grain.ReadOptions, worker_count: int):
        self.order, self.name, self.patience, self.max_doc_tokens = order, name, patience, max_doc_tokens
        self.read_options, self.worker_count = read_options, worker_count
        self.next_index = 0
        self.counts = collections.Counter(dict.fromkeys(sources_lib.COUNTERS, 0))
        self._it: grain.DatasetIterator | None = None

    def _iterator(self) -> grain.DatasetIterator:
        if self._it is None:
            ds = self.order[self.next_index:].to_iter_dataset(self.read_options)
            if self.worker_count:
                # grain 0.2.18 reads an absl flag before parsing (google/grain#1355): use the flag defaults.
                if not absl.flags.FLAGS.is_parsed():
                    absl.flags.FLAGS.mark_as_parsed()
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
            self._it = iter(ds)
        return self._it

    def pull(self) -> tuple[int, np.ndarray]:
        """(index, tokens) of the next document with at least 2 tokens."""
        while True:
            index = self.next_index
            tokens_N, flags = next(self._iterator())
            self.next_index += 1
            c = self.counts
            c.update(("documents",) + flags)
            c["tokens"] += len(tokens_N)
            c["split"] += len(tokens_N) - 1 > self.max_doc_tokens
            if len(tokens_N) >= 2:
                return index, tokens_N
            if c["documents"] > self.patience and c["documents"] == c["malformed"] + c["empty"]:
                # An endless stream with nothing to pack would hang: fail with the counts instead.
                raise sources_lib.DataError(f"{self.name}: the first {c['documents']} documents read were all "
                                            f"empty or malformed ({dict(c)}); check the source's path and field")

    def read(self, index: int) -> np.ndarray:
        """Tokens of document `index` (random access; not counted)."""
        return self.order[index][0]

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self.next_index, "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.next_index = int(state["next_index"])
        self.counts = collections.Counter(state["counts"])

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


class TextRows:
    """Rows packed from a Documents by `lanes` packers in turn (see packing.Packer).

    Each lane packs its own documents (dealt from the shared order as lanes need them), so the rows of
    one step come from `lanes` different documents instead of consecutive pieces of one long
    document. State adds each lane's partly packed document and whose turn it is.
    """

    def __init__(self, documents: Documents, pad_id: int, max_doc_tokens: int, lanes: int = 1):
        self.documents = documents
        self.packers = [Packer(1, pad_id, max_doc_tokens) for _ in range(lanes)]
        self.doc_index = [0] * lanes
        self.turn = 0

    def next_row(self, length: int) -> Row:
        lane = self.turn
        self.turn = (self.turn + 1) % len(self.packers)

        def pull() -> np.ndarray:
            self.doc_index[lane], tokens_N = self.documents.pull()
            return tokens_N

        return self.packers[lane].next_row(pull, length)

    def get_state(self) -> dict[str, Any]:
        lanes = [{"doc": i if p.doc_N is not None else None, "offset": p.offset if p.doc_N is not None else 0}
                 for p, i in zip(self.packers, self.doc_index)]
        return {**self.documents.get_state(), "turn": self.turn, "lanes": lanes}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state.get("lanes", ())) != len(self.packers):
            raise ValueError(f"the data state packs {len(state.get('lanes', ()))} rows per source at a time, this "
                             f"iterator {len(self.packers)}; resume with the same global_batch_size and process count")
        self.documents.set_state(state)
        self.turn = int(state["turn"])
        for lane, (p, s) in enumerate(zip(self.packers, state["lanes"])):
            p.doc_N, p.offset = None, 0
            if s["doc"] is not None:
                self.doc_index[lane] = int(s["doc"])
                p.doc_N, p.offset = self.documents.read(self.doc_index[lane]), int(s["offset"])

    def close(self) -> None:
        self.documents.close()


class TaskRows:
    """Example `n * process_count + process_index` of (task, seed) as this process's n-th row of the source."""

    def __init__(self, task: Task, seed: int, loss_on: str, process_index: int, process_count: int):
        self.task, self.seed, self.loss_on = task, seed, loss_on
        self.process_index, self.process_count = process_index, process_count
        self.examples = 0

    def next_row(self, length: int) -> Row:
        index = self.examples * self.process_count + self.process_index
        self.examples += 1
        return to_row(example(self.task, self.seed, index, length), self.loss_on)

    def get_state(self) -> dict[str, Any]:
        return {"examples": self.examples}

    def set_state(self, state: dict[str, Any]) -> None:
        self.examples = int(state["examples"])

    def close(self) -> None:
        pass


DocKey = tuple[int, ...]  # identifies a document for re-reading, e.g. (mixture, source, index)


class Streams:
    """`count` truncated-BPTT streams (packing.StreamPacker each).

    `pull(stream, n)` gives the key and tokens of stream's n-th document (the caller picks its source);
    `read(key)` re-reads a document on restore. State per stream: the current document's key, offset
    and last segment id, and how many documents it has pulled.
    """

    def __init__(self, count: int, pad_id: int, max_doc_tokens: int):
        self.packers = [StreamPacker(pad_id, max_doc_tokens) for _ in range(count)]
        self.keys: list[DocKey | None] = [None] * count
        self.pulled = [0] * count

    def next_rows(self, length: int, pull: Callable[[int, int], tuple[DocKey, np.ndarray]]) -> list[Row]:
        def pull_for(r: int) -> Callable[[], np.ndarray]:
            def pull_doc() -> np.ndarray:
                self.keys[r], tokens_N = pull(r, self.pulled[r])
                self.pulled[r] += 1
                return tokens_N
            return pull_doc

        return [packer.next_row(pull_for(r), length) for r, packer in enumerate(self.packers)]

    def get_state(self) -> list[dict[str, Any]]:
        return [{"doc": list(key) if p.doc_N is not None else None, "offset": p.offset, "segment": p.segment,
                 "pulled": n} for p, key, n in zip(self.packers, self.keys, self.pulled)]

    def set_state(self, state: list[dict[str, Any]], read: Callable[[DocKey], np.ndarray]) -> None:
        if len(state) != len(self.packers):
            raise ValueError(f"the data state has {len(state)} streams but this process makes {len(self.packers)} "
                             "rows per step; resume with the same global_batch_size and process count")
        for r, (p, s) in enumerate(zip(self.packers, state)):
            self.keys[r] = tuple(s["doc"]) if s["doc"] is not None else None
            p.doc_N = read(self.keys[r]) if self.keys[r] is not None else None
            p.offset, p.segment, self.pulled[r] = int(s["offset"]), int(s["segment"]), int(s["pulled"])
