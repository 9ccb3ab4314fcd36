"""Packing against a naive reference built pair by pair."""

import numpy as np
import pytest

from lmtrain.data.batch import BATCH_FIELDS
from lmtrain.data.packing import StreamPacker, pack_documents

PAD = -1


def _docs(rng, n, max_len):
    """Doc d has tokens d*100000 + [0, 1, ...]: a target is valid iff it is its input + 1."""
    return [d * 100_000 + np.arange(rng.integers(0, max_len), dtype=np.int32) for d in range(1, n + 1)]


def _reference(docs, seq_len, max_doc_tokens):
    """Rows built from a flat list of (piece id, input, target) pairs."""
    pairs = []
    for d, doc in enumerate(docs):
        for i in range(len(doc) - 1):
            pairs.append(((d, i // max_doc_tokens), doc[i], doc[i + 1]))
    rows = []
    for start in range(0, len(pairs), seq_len):
        chunk = pairs[start:start + seq_len]
        row = {k: np.zeros(seq_len, np.int32) for k in BATCH_FIELDS}
        row["inputs"][:] = row["targets"][:] = PAD
        segment, position, prev = 0, 0, None
        for j, (piece, x, y) in enumerate(chunk):
            if piece != prev:
                segment, position, prev = segment + 1, 0, piece
            row["inputs"][j], row["targets"][j] = x, y
            row["segment_ids"][j], row["positions"][j], row["loss_mask"][j] = segment, position, 1
            position += 1
        rows.append(row)
    return rows


@pytest.mark.parametrize("seq_len,max_doc_tokens,max_len", [(8, 1000, 12), (16, 5, 40), (7, 3, 4), (64, 64, 200)])
def test_matches_naive_reference(seq_len, max_doc_tokens, max_len):
    rng = np.random.default_rng(seq_len)
    docs = _docs(rng, 60, max_len)
    rows = pack_documents(docs, seq_len, PAD, max_doc_tokens)
    expected = _reference(docs, seq_len, max_doc_tokens)
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert set(row) == set(BATCH_FIELDS)
        for k in BATCH_FIELDS:
            assert row[k].dtype == np.int32 and row[k].shape == (seq_len,)
            np.testing.assert_array_equal(row[k], ref[k], err_msg=k)


def test_loss_mask_never_crosses_documents_or_padding():
    rng = np.random.default_rng(0)
    docs = _docs(rng, 200, 30)
    rows = pack_documents(docs, 24, PAD, max_doc_tokens=10)
    targets_seen = []
    for row in rows:
        m = row["loss_mask"] == 1
        np.testing.assert_array_equal(row["targets"][m], row["inputs"][m] + 1)  # same doc, next token
        assert (row["segment_ids"][~m] == 0).all() and (row["inputs"][~m] == PAD).all()
        assert (row["targets"][~m] == PAD).all()
        seg = row["segment_ids"]
        starts = np.flatnonzero(m & np.r_[True, seg[1:] != seg[:-1]])
        assert (row["positions"][starts] == 0).all()
        cont = m & ~np.isin(np.arange(len(seg)), starts)
        np.testing.assert_array_equal(row["positions"][cont], row["positions"][np.flatnonzero(cont) - 1] + 1)
        targets_seen.extend(row["targets"][m].tolist())
    # Every token but a document's first is a target exactly once; only the last row is padded.
    assert sorted(targets_seen) == sorted(t for d in docs for t in d[1:].tolist())
    assert all(r["loss_mask"].all() for r in rows[:-1])


def test_worked_example_from_docs():
    rows = pack_documents([np.array([1, 10, 11, 12, 2]), np.array([1, 20, 21, 2])], seq_len=5, pad_id=0)
    assert [r["inputs"].tolist() for r in rows] == [[1, 10, 11, 12, 1], [20, 21, 0, 0, 0]]
    assert [r["targets"].tolist() for r in rows] == [[10, 11, 12, 2, 20], [21, 2, 0, 0, 0]]
    assert [r["segment_ids"].tolist() for r in rows] == [[1, 1, 1, 1, 2], [1, 1, 0, 0, 0]]
    assert [r["positions"].tolist() for r in rows] == [[0, 1, 2, 3, 0], [0, 1, 0, 0, 0]]
    assert [r["loss_mask"].tolist() for r in rows] == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_short_documents_are_skipped():
    assert pack_documents([np.array([], np.int32), np.array([5], np.int32)], 4, PAD) == []


@pytest.mark.parametrize("max_doc_tokens", [1000, 5])
def test_stream_packer_matches_flat_pair_stream(max_doc_tokens):
    """Rows of varying length cut one flat stream of pairs; segment ids number pieces across rows."""
    rng = np.random.default_rng(max_doc_tokens)
    docs = [d for d in _docs(rng, 80, 30) if len(d) >= 2]  # the pipeline never pulls shorter documents
    pairs = []  # (input, target, piece number from 1, position in piece)
    for d in docs:
        for i in range(len(d) - 1):
            piece = len({p[2] for p in pairs}) + (i % max_doc_tokens == 0)
            position = i % max_doc_tokens
            pairs.append((d[i], d[i + 1], piece if pairs else 1, position))
    it = iter(docs)
    packer = StreamPacker(PAD, max_doc_tokens)
    at = 0
    for length in rng.integers(1, 40, size=25):
        row = packer.next_row(lambda: next(it), int(length))
        ref = np.array(pairs[at:at + length]).T
        at += length
        assert row["loss_mask"].all()
        for key, expected in zip(("inputs", "targets", "segment_ids", "positions"), ref):
            np.testing.assert_array_equal(row[key], expected, err_msg=key)
