"""Packing tokenized documents into fixed-length rows (greedy concatenate-and-split, numpy only).

A document of n tokens `[bos, t1, ..., eos]` gives n-1 (input, target) pairs: input token i predicts
token i+1. Pairs of consecutive documents are concatenated and cut into rows of `seq_len` pairs, so
no position is padded except at the end of a finite stream. Each row has the fields of batch.Batch,
int32 [seq_len] (loss_mask is 1 on every real pair, 0 on padding).

A document cut by a row boundary continues in the next row as a new piece whose positions restart at
0 (the model sees it as a fresh context, exactly as it will at evaluation). Documents longer than
`max_doc_tokens` pairs are cut into pieces of that many pairs. No pair crosses a document, so every
target with loss_mask=1 belongs to the same document as its input, and every token but a document's
first is a target exactly once.

`StreamPacker` packs one stream for truncated BPTT instead: each row continues the previous one, so
segment ids count the stream's document pieces across rows and positions continue across rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from lmtrain.data.batch import BATCH_FIELDS


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(seq_len, np.int32) for k in BATCH_FIELDS}
    row["inputs"][:] = row["targets"][:] = pad_id
    return row


def place(row: dict[str, np.ndarray], at: int, doc_N: np.ndarray, a: int, b: int, segment: int,
          position: int) -> None:
    """Writes pairs a..b-1 of doc_N at row[at:], as `segment`, positions from `position`."""
    n = b - a
    row["inputs"][at:at + n] = doc_N[a:b]
    row["targets"][at:at + n] = doc_N[a + 1:b + 1]
    row["segment_ids"][at:at + n] = segment
    row["positions"][at:at + n] = np.arange(position, position + n)
    row["loss_mask"][at:at + n] = 1


def make_row(parts: list[tuple[np.ndarray, int, int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Row from pieces (doc_tokens_N, first_pair, end_pair), padded to seq_len."""
    row, at = empty_row(seq_len, pad_id), 0
    for segment, (doc_N, a, b) in enumerate(parts, start=1):
        place(row, at, doc_N, a, b, segment, 0)
        at += b - a
    return row


class Packer:
    """Builds rows from documents pulled one at a time; holds the partly used document between rows.

    The state between rows is just (current document, offset in pairs), which lets the pipeline
    checkpoint it as (its source's state before that document, offset).
    """

    def __init__(self, seq_len: int, pad_id: int, max_doc_tokens: int):
        self.seq_len, self.pad_id, self.max_doc_tokens = seq_len, pad_id, max_doc_tokens
        self.doc_N: np.ndarray | None = None  # the document being packed
        self.offset = 0  # its pairs already packed

    def next_row(self, pull: Callable[[], np.ndarray | None], seq_len: int | None = None,
                 ) -> dict[str, np.ndarray] | None:
        """Next row of `seq_len` pairs (default: the packer's); `pull()` returns the next document's tokens
        or None at the end (last row padded)."""
        seq_len = seq_len or self.seq_len
        parts, filled = [], 0
        while filled < seq_len:
            if self.doc_N is None:
                doc_N = pull()
                if doc_N is None:
                    break
                if len(doc_N) < 2:
                    continue
                self.doc_N, self.offset = doc_N, 0
            pairs = len(self.doc_N) - 1
            piece_end = (self.offset // self.max_doc_tokens + 1) * self.max_doc_tokens
            end = min(pairs, piece_end, self.offset + seq_len - filled)
            parts.append((self.doc_N, self.offset, end))
            filled += end - self.offset
            self.offset = end
            if end == pairs:
                self.doc_N, self.offset = None, 0
        return make_row(parts, seq_len, self.pad_id) if parts else None


SEGMENT_IDS = 2**30  # a stream's segment ids cycle through 1..SEGMENT_IDS


class StreamPacker:
    """One truncated-BPTT stream: documents back to back, each row continuing the previous one.

    Segment ids number the stream's document pieces (a new id per document, or per `max_doc_tokens`
    piece, cycling through 1..2**30) and positions count pairs within the piece, both across rows: the
    first pair of a row continues the previous row's last segment iff they share an id. The state
    between rows is (current document, offset in pairs, last segment id).
    """

    def __init__(self, pad_id: int, max_doc_tokens: int):
        self.pad_id, self.max_doc_tokens = pad_id, max_doc_tokens
        self.doc_N: np.ndarray | None = None
        self.offset = 0
        self.segment = 0  # id of the latest piece begun

    def next_row(self, pull: Callable[[], np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
        """Next row of `seq_len` pairs; `pull()` returns the next document (>= 2 tokens; never ends)."""
        row, at, m = empty_row(seq_len, self.pad_id), 0, self.max_doc_tokens
        while at < seq_len:
            if self.doc_N is None:
                self.doc_N, self.offset = pull(), 0
            if self.offset % m == 0:  # a piece begins
                self.segment = self.segment % SEGMENT_IDS + 1
            pairs, piece_start = len(self.doc_N) - 1, self.offset // m * m
            end = min(pairs, piece_start + m, self.offset + seq_len - at)
            place(row, at, self.doc_N, self.offset, end, self.segment, self.offset - piece_start)
            at, self.offset = at + end - self.offset, end
            if end == pairs:
                self.doc_N, self.offset = None, 0
        return row


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, pad_id: int,
                   max_doc_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """All rows of a finite list of tokenized documents (the last row padded)."""
    packer = Packer(seq_len, pad_id, max_doc_tokens or 2**62)
    it = iter(docs)
    pull = lambda: next(it, None)
    rows = []
    while (row := packer.next_row(pull)) is not None:
        rows.append(row)
    return rows
