"""The per-step training iterator: curriculum shapes, stages and replay, task sources, TBPTT stream mode,
exact resume in each, multi-process shards."""

import json
import math
import re

import numpy as np
import pytest

from lmtrain.configlib import ConfigError
from lmtrain.data import pipeline
from lmtrain.data.batch import BATCH_FIELDS
from lmtrain.data.config import CurriculumConfig, DataConfig, SourceConfig, StageConfig
from lmtrain.data.curriculum import Curriculum
from lmtrain.data.pipeline import check_data, data_stats, make_train_iterator, task_seed
from lmtrain.data.tasks import example, make_task, to_row
from lmtrain.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MARKER = re.compile(r"<(\d{4})>")


def _corpus(tmp_path, n=120, name="c"):
    """n text files; doc i is '<iiii>' repeated 1 + i % 7 times: its text names it and has its own length."""
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:04d}.txt").write_text(f"<{i:04d}>" * (1 + i % 7))
    return SourceConfig(kind="text", path=str(folder / "*.txt"))


def _letters(tmp_path, letter, n=30):
    """A jsonl source whose documents are runs of one letter (so every row names its source)."""
    path = tmp_path / f"{letter}.jsonl"
    path.write_text("".join(json.dumps({"text": letter * (5 + i)}) + "\n" for i in range(n)))
    return SourceConfig(kind="jsonl", path=str(path))


def _doc_tokens(i):
    return np.array([TOK.bos_id, *TOK.encode(f"<{i:04d}>" * (1 + i % 7)), TOK.eos_id])


def _cfg(*srcs, **kw):
    base = dict(sources=srcs, seq_len=32, global_batch_size=4, heldout_fraction=0.0, read_threads=1)
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _resumes(cfg, before, after, **kw):
    """Batches after a restore (through JSON) equal the uninterrupted run's."""
    it = make_train_iterator(cfg, **kw)
    _take(it, before)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, after)
    fresh = make_train_iterator(cfg, **kw)
    fresh.set_state(state)
    np.testing.assert_equal(_take(fresh, after), expected)
    assert json.loads(json.dumps(fresh.get_state())) == json.loads(json.dumps(it.get_state()))
    return expected


# Lengths 8, 8, 16, 16, 24, 24, 32, ...; all divide 6 x 32 tokens, so use global_batch_size=6 with constant tokens.
WARMUP = CurriculumConfig(kind="warmup", start_length=8, increment=8, warmup_steps=6, bucket=8)
STREAM_CUR = CurriculumConfig(**{**vars(WARMUP), "batch_mode": "fixed_batch"})  # stream mode needs fixed rows


def test_batches_have_the_scheduled_shapes(tmp_path):
    cfg = _cfg(_corpus(tmp_path), curriculum=WARMUP, global_batch_size=6)
    batches = _take(make_train_iterator(cfg), 8)
    expected = [(24, 8)] * 2 + [(12, 16)] * 2 + [(8, 24)] * 2 + [(6, 32)] * 2
    assert [b["inputs"].shape for b in batches] == expected
    for b in batches:
        assert {v.dtype for v in b.values()} == {np.dtype(np.int32)} and set(b) == set(BATCH_FIELDS)
        assert all(v.shape == b["inputs"].shape for v in b.values())
        assert b["loss_mask"].sum() == 6 * 32  # constant tokens, no padding
    cur = Curriculum(cfg)
    assert [(cur.rows_at(k), cur.length_at(k)) for k in range(8)] == expected
    assert cur.shapes() == tuple(dict.fromkeys(expected))
    fixed = _cfg(_corpus(tmp_path, name="d"), curriculum=STREAM_CUR)  # fixed_batch
    assert [b["inputs"].shape for b in _take(make_train_iterator(fixed), 8)] == [(4, n) for _, n in expected]


def test_resume_mid_curriculum(tmp_path):
    cfg = _cfg(_corpus(tmp_path), _letters(tmp_path, "z"), max_doc_tokens=20,
               curriculum=CurriculumConfig(kind="mixture", lengths=(8, 16, 32), bucket=8))
    batches = _resumes(cfg, 5, 9)
    assert len({b["inputs"].shape for b in batches}) > 1


def test_stages_switch_sources_and_replay_at_their_rate(tmp_path):
    a, b, c = (_letters(tmp_path, x) for x in "abc")
    stages = [StageConfig(start_step=5, sources=(b,), replay=0.25), StageConfig(start_step=65, sources=(c,))]
    cfg = _cfg(a, seq_len=16, global_batch_size=8)
    it = make_train_iterator(cfg, stages=stages)

    def letters(batch):
        return [set(TOK.decode(row).replace(" ", "")) for row in batch["inputs"]]

    for _ in range(5):
        assert all(s == {"a"} for s in letters(next(it)))
    rows = [s for _ in range(60) for s in letters(next(it))]
    assert all(s in ({"a"}, {"b"}) for s in rows)  # every row from one source
    replayed, n = sum(s == {"a"} for s in rows) / len(rows), len(rows)
    assert abs(replayed - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), replayed
    assert all(s == {"c"} for _ in range(3) for s in letters(next(it)))  # no replay in the last stage


def test_resume_across_a_stage_switch(tmp_path):
    stages = [StageConfig(start_step=4, sources=(_letters(tmp_path, "b"),), replay=0.3),
              StageConfig(start_step=7, replay=0.5)]  # keeps stage 1's sources
    cfg = _cfg(_corpus(tmp_path), curriculum=WARMUP, global_batch_size=6)
    _resumes(cfg, 3, 6, stages=stages)  # stages 0 -> 1 -> 2 after the restore
    _resumes(cfg, 5, 4, stages=stages)


def test_stage_without_sources_continues_the_same_reading(tmp_path):
    cfg = _cfg(_corpus(tmp_path))
    plain = _take(make_train_iterator(cfg), 8)
    np.testing.assert_equal(_take(make_train_iterator(cfg, stages=[StageConfig(start_step=3, lr=1e-4)]), 8), plain)


def _expected_task_rows(task, seed, indices, length, loss_on="answer"):
    return [to_row(example(task, seed, i, length), loss_on) for i in indices]


def test_task_source_rows_are_the_tasks_examples(tmp_path):
    src = SourceConfig(kind="task", task="mqar", task_options={"num_pairs": 2})
    cfg = _cfg(src, curriculum=WARMUP, global_batch_size=6)
    task = make_task("mqar", num_pairs=2)
    seed = task_seed(cfg.seed, 0, 0)
    index = 0
    for batch in _take(make_train_iterator(cfg), 6):
        rows, length = batch["inputs"].shape
        for r, ref in enumerate(_expected_task_rows(task, seed, range(index, index + rows), length)):
            for k, v in ref.items():
                np.testing.assert_array_equal(batch[k][r], v, err_msg=k)
        index += rows
    for p in (0, 1):  # two processes: process p takes examples p, p + 2, ...
        batch = next(make_train_iterator(cfg, process_index=p, process_count=2))
        ref = _expected_task_rows(task, seed, range(p, 24, 2), 8)
        np.testing.assert_array_equal(batch["inputs"], np.stack([r["inputs"] for r in ref]))


def test_task_source_in_a_mixture_with_text(tmp_path):
    task_src = SourceConfig(kind="task", task="passkey", weight=1.0, loss_on="all")
    cfg = _cfg(_corpus(tmp_path), task_src, seq_len=128, global_batch_size=4)
    task = make_task("passkey")
    refs = iter(_expected_task_rows(task, task_seed(cfg.seed, 0, 1), range(100), 128, "all"))
    kinds = []
    for batch in _take(make_train_iterator(cfg), 10):
        for r in range(4):
            if "pass key" in TOK.decode(batch["inputs"][r]):
                ref = next(refs)
                for k, v in ref.items():
                    np.testing.assert_array_equal(batch[k][r], v, err_msg=k)
                kinds.append("task")
            else:
                assert MARKER.search(TOK.decode(batch["inputs"][r]))
                kinds.append("text")
    assert 10 <= kinds.count("task") <= 30
    _resumes(cfg, 3, 4)


def test_passkey_source_encodes_with_the_configured_tokenizer(monkeypatch):
    class Shifted(ByteTokenizer):  # ids are bytes + 3
        def encode(self, s):
            return [b + 3 for b in s.encode()]

    monkeypatch.setattr(pipeline, "load_tokenizer", lambda cfg: Shifted())
    batch = next(make_train_iterator(_cfg(SourceConfig(kind="task", task="passkey"), seq_len=128)))
    text = bytes(int(i) - 3 for i in batch["inputs"][0]).decode()
    assert "The pass key is" in text and "What is the pass key?" in text


def test_task_source_needs_rows_long_enough():
    cfg = _cfg(SourceConfig(kind="task", task="mqar", task_options={"num_pairs": 4}), curriculum=WARMUP,
               global_batch_size=6)
    with pytest.raises(ValueError, match=r"sources\[0\] \(task mqar\): the task needs rows of at least 15 tokens.*8"):
        make_train_iterator(cfg)


def _streams(batches):
    """Per row: its inputs, targets, segment ids and positions concatenated over the batches."""
    return [{k: np.concatenate([b[k][r] for b in batches]) for k in ("inputs", "targets", "segment_ids", "positions")}
            for r in range(len(batches[0]["inputs"]))]


@pytest.mark.parametrize("max_doc_tokens", [10_000, 9])
def test_stream_mode_rows_continue_across_steps(tmp_path, max_doc_tokens):
    cfg = _cfg(_corpus(tmp_path), curriculum=STREAM_CUR, max_doc_tokens=max_doc_tokens)
    batches = _take(make_train_iterator(cfg, stream_from=0), 12)  # about 1000 of one epoch's ~2700 pairs
    seen = []
    for s in _streams(batches):
        seg, pos, x, y = s["segment_ids"], s["positions"], s["inputs"], s["targets"]
        same = seg[1:] == seg[:-1]
        np.testing.assert_array_equal(y[:-1][same], x[1:][same])  # target t is input t + 1 in a document
        np.testing.assert_array_equal(pos[1:][same], pos[:-1][same] + 1)
        assert (pos[1:][~same] == 0).all() and (seg[1:][~same] == seg[:-1][~same] + 1).all()
        assert seg[0] == 1 and pos[0] == 0
        # Segments are documents (or pieces of max_doc_tokens pairs), whole and in order.
        starts = np.flatnonzero(np.r_[True, ~same])
        ends = np.r_[starts[1:], len(seg)]
        doc = []
        for a, b in zip(starts, ends):
            assert b - a <= max_doc_tokens
            doc.append(np.r_[x[a:b], y[b - 1]])
            if doc[-1][-1] == TOK.eos_id or b == len(seg):  # a whole document (or the stream's last one)
                tokens, doc = np.concatenate([doc[0]] + [d[1:] for d in doc[1:]]), []
                marker = MARKER.search(TOK.decode(tokens))
                if marker is None:  # the stream's last document, cut before its first marker
                    assert b == len(seg)
                    continue
                i = int(marker.group(1))
                ref = _doc_tokens(i)
                np.testing.assert_array_equal(tokens, ref[:len(tokens)])  # the last one may be cut
                assert len(tokens) == len(ref) or b == len(seg)
                seen.append(i)
    assert len(seen) == len(set(seen)) > 30  # each document in one stream only, once


def test_stream_mode_starts_fresh_at_stream_from_and_resumes(tmp_path):
    cfg = _cfg(_corpus(tmp_path), _letters(tmp_path, "q"), curriculum=STREAM_CUR)
    batches = _take(make_train_iterator(cfg, stream_from=3), 8)
    for b in batches[:3]:  # packed rows: positions restart in every row
        assert (b["positions"][:, 0] == 0).all()
    assert (batches[3]["segment_ids"][:, 0] == 1).all() and (batches[3]["positions"][:, 0] == 0).all()
    continued = [(b1["segment_ids"][:, 0] == b0["segment_ids"][:, -1]) for b0, b1 in zip(batches[3:], batches[4:])]
    assert np.any(continued)  # some documents run across steps
    np.testing.assert_equal(batches, _resumes(cfg, 0, 8, stream_from=3))
    _resumes(cfg, 2, 5, stream_from=3)  # restored before the switch
    _resumes(cfg, 5, 5, stream_from=3)  # mid stream, across a length change
    stages = [StageConfig(start_step=6, sources=(_letters(tmp_path, "r"),), replay=0.5)]
    _resumes(cfg, 5, 4, stream_from=3, stages=stages)


def test_stream_mode_errors(tmp_path):
    with pytest.raises(ValueError, match="stream mode needs the same rows every step.*fixed_batch"):
        make_train_iterator(_cfg(_corpus(tmp_path), curriculum=WARMUP, global_batch_size=6), stream_from=0)
    with pytest.raises(ValueError, match=r"task mqar\) is a task source"):
        make_train_iterator(_cfg(SourceConfig(kind="task", task="mqar")), stream_from=5)


def test_check_data_raises_config_errors_without_reading(tmp_path):
    """The iterator's checks, callable at config time (no file is opened)."""
    missing = SourceConfig(kind="text", path=str(tmp_path / "none" / "*.txt"))
    check_data(_cfg(missing), [StageConfig(start_step=3)], stream_from=0, process_count=2)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.start_step: must be > 0"):
        check_data(_cfg(missing), [StageConfig()])
    with pytest.raises(ConfigError, match="global_batch_size=4 is not divisible by process_count=3"):
        check_data(_cfg(missing), process_count=3)
    with pytest.raises(ConfigError, match="gives 8 rows at length 24, which is not divisible by process_count=3"):
        check_data(_cfg(missing, curriculum=WARMUP, global_batch_size=6), process_count=3)
    with pytest.raises(ConfigError, match="stream mode needs the same rows every step"):
        check_data(_cfg(missing, curriculum=WARMUP, global_batch_size=6), stream_from=0)
    stages = [StageConfig(start_step=3, sources=(SourceConfig(kind="task", task="mqar"),))]
    with pytest.raises(ConfigError, match=r"mixture 1 sources\[0\] \(task mqar\) is a task source"):
        check_data(_cfg(missing), stages, stream_from=5)


def _doc_ids(batches, stream, lanes=1):
    """Documents named in the pair streams: each row across steps (streams), or each packing lane's rows in
    order (packed: a source's rows come from `lanes` packers in turn)."""
    if stream:
        texts = [TOK.decode(s["inputs"]) for s in _streams(batches)]
    else:
        rows = [row for b in batches for row in b["inputs"]]
        texts = [TOK.decode(np.concatenate(rows[lane::lanes])) for lane in range(lanes)]
    return {int(m) for text in texts for m in MARKER.findall(text)}


@pytest.mark.parametrize("stream_from", [None, 0])
def test_processes_read_disjoint_shards_with_a_curriculum(tmp_path, stream_from):
    cur = STREAM_CUR if stream_from is not None else WARMUP
    cfg = _cfg(_corpus(tmp_path), curriculum=CurriculumConfig(**{**vars(cur), "warmup_steps": 2}), seq_len=16)
    per_process = []
    for p in (0, 1):
        batches = _take(make_train_iterator(cfg, stream_from=stream_from, process_index=p, process_count=2), 100)
        rows = Curriculum(cfg).rows_at(0) // 2
        assert batches[0]["inputs"].shape == (rows, 8)
        lanes = max(r for r, _ in Curriculum(cfg).shapes()) // 2
        per_process.append(_doc_ids(batches, stream_from is not None, lanes))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == set(range(120))


def test_bad_data_counters_in_the_state(tmp_path):
    (tmp_path / "e.jsonl").write_text("{broken\n" + json.dumps({"text": "fine"}) + "\n")
    cfg = _cfg(_corpus(tmp_path), SourceConfig(kind="jsonl", path=str(tmp_path / "e.jsonl")))
    it = make_train_iterator(cfg, stages=[StageConfig(start_step=2, sources=(_letters(tmp_path, "x"),))],
                             stream_from=3)
    _take(it, 6)
    stats = data_stats(it.get_state())
    assert stats["documents"] > 0 and stats["malformed"] >= 1 and stats["tokens"] > 0


def test_state_of_another_config_is_refused(tmp_path):
    it = make_train_iterator(_cfg(_corpus(tmp_path)))
    state = it.get_state()
    other = make_train_iterator(_cfg(_corpus(tmp_path, name="x")), stages=[StageConfig(start_step=3, sources=(
        _letters(tmp_path, "y"),))])
    with pytest.raises(ValueError, match="does not match this data config"):
        other.set_state(state)
    with pytest.raises(ValueError, match="does not match this data config"):
        it.set_state({"parent": {"next_index": 3}, "offset": 0, "counts": {}})  # the old grain layout


def test_stream_mode_switched_on_at_resume(tmp_path):
    """A plain run's state resumed with stream_from = its step (TBPTT post-training from a plain
    checkpoint) continues exactly as a run that had stream_from from the start."""
    cfg = _cfg(_corpus(tmp_path))
    plain = make_train_iterator(cfg)
    _take(plain, 2)
    resumed = make_train_iterator(cfg, stream_from=2)
    resumed.set_state(json.loads(json.dumps(plain.get_state())))
    straight = make_train_iterator(cfg, stream_from=2)
    expected = _take(straight, 5)[2:]
    for got, want in zip(_take(resumed, 3), expected, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_rows_of_a_step_come_from_different_documents(tmp_path):
    """Each row of a step is packed by its own lane: long documents do not fill whole batches."""
    folder = tmp_path / "long"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:04d}.txt").write_text(f"<{i:04d}>" * 30)  # 180 bytes: several rows of 16
    cfg = _cfg(SourceConfig(kind="text", path=str(folder / "*.txt")), seq_len=16, global_batch_size=8)
    it = make_train_iterator(cfg)
    for batch in _take(it, 3):
        firsts = [MARKER.search(TOK.decode(row)) for row in batch["inputs"]]
        named = [m.group(1) for m in firsts if m]
        assert len(named) >= 6 and len(set(named)) == len(named)  # 8 rows, 8 documents
