"""grain pipeline: batch layout, split, sharding, mixtures, bad-data counters, exact resume, global arrays."""

import dataclasses
import json
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from lmtrain.data import sources
from lmtrain.data.batch import BATCH_FIELDS
from lmtrain.data.config import DataConfig, SourceConfig
from lmtrain.data.pipeline import data_stats, make_eval_iterator, make_train_iterator, to_global_batch
from lmtrain.data.tokenizer import ByteTokenizer

MARKER = re.compile(r"<(\d{4})>")


def _corpus(tmp_path, n=200):
    """n text files; doc i is '<iiii>' five times, so any piece of it longer than 10 bytes names it."""
    for i in range(n):
        (tmp_path / f"{i:04d}.txt").write_text(f"<{i:04d}>" * 5)
    return SourceConfig(kind="text", path=str(tmp_path / "*.txt"))


def _cfg(*srcs, **kw):
    base = dict(sources=srcs, seq_len=32, global_batch_size=4, heldout_fraction=0.0, read_threads=1)
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _doc_ids(batches):
    """Ids of the documents named in each segment of each row."""
    ids, tok = set(), ByteTokenizer()
    for batch in batches:
        for inputs, targets, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
            for s in set(seg[seg > 0].tolist()):
                text = tok.decode([*inputs[seg == s], targets[seg == s][-1]])
                ids.update(int(m) for m in MARKER.findall(text))
    return ids


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_on_builtin_corpus():
    cfg = DataConfig(seq_len=64, global_batch_size=4)
    batch = next(make_train_iterator(cfg, process_index=1, process_count=2))
    assert set(batch) == set(BATCH_FIELDS)
    for v in batch.values():
        assert v.shape == (2, 64) and v.dtype == np.int32
    assert batch["loss_mask"].all()  # endless training stream: no padding
    assert batch["inputs"][:, 0].tolist() != batch["inputs"][:, 1].tolist()
    with pytest.raises(ValueError, match="not divisible"):
        make_train_iterator(cfg, process_count=3)


def test_resume_gives_identical_batches(tmp_path):
    (tmp_path / "b").mkdir()
    other = SourceConfig(kind="jsonl", path=str(tmp_path / "b" / "*.jsonl"), weight=0.5)
    (tmp_path / "b" / "x.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(50)))
    cfg = _cfg(_corpus(tmp_path), other, max_doc_tokens=20)
    it = make_train_iterator(cfg)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = _take(it, 9)
    fresh = make_train_iterator(cfg)
    fresh.set_state(state)
    _assert_same(_take(fresh, 9), expected)
    assert json.loads(json.dumps(fresh.get_state())) == json.loads(json.dumps(it.get_state()))
    _assert_same(_take(make_train_iterator(cfg), 3), _take(make_train_iterator(cfg), 3))  # deterministic
    other_seed = make_train_iterator(dataclasses.replace(cfg, seed=1))
    assert not all(np.array_equal(a["inputs"], b["inputs"])
                   for a, b in zip(_take(other_seed, 3), _take(make_train_iterator(cfg), 3)))


def test_processes_read_disjoint_shards(tmp_path):
    cfg = _cfg(_corpus(tmp_path))
    # One epoch of a shard: 100 docs x 31 pairs / (2 rows x 32) is under 50 batches.
    seen = [_doc_ids(_take(make_train_iterator(cfg, process_index=p, process_count=2), 50)) for p in (0, 1)]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(200))


def test_heldout_documents_never_reach_training(tmp_path):
    cfg = _cfg(_corpus(tmp_path), heldout_fraction=0.2)
    source = sources.open_source(cfg.sources[0])
    heldout = set(sources.split_indices(source, 0.2, heldout=True).tolist())
    train_ids = _doc_ids(_take(make_train_iterator(cfg), 200))  # several epochs
    eval_batches = list(make_eval_iterator(cfg))
    assert _doc_ids(eval_batches) == heldout and 20 < len(heldout) < 60
    assert train_ids == set(range(200)) - heldout
    _assert_same(eval_batches, list(make_eval_iterator(cfg)))
    assert eval_batches[-1]["loss_mask"][-1].sum() < cfg.seq_len  # the stream's end is padded


def test_eval_num_batches_pads_with_empty_batches(tmp_path):
    cfg = _cfg(_corpus(tmp_path, 40), heldout_fraction=0.5)
    natural = list(make_eval_iterator(cfg, process_index=0, process_count=2))
    fixed = list(make_eval_iterator(cfg, process_index=0, process_count=2, num_batches=len(natural) + 2))
    _assert_same(fixed[:len(natural)], natural)
    assert all(b["loss_mask"].sum() == 0 and b["segment_ids"].sum() == 0 for b in fixed[len(natural):])
    assert all(b["inputs"].shape == (2, 32) for b in fixed)
    assert len(list(make_eval_iterator(cfg, num_batches=1))) == 1


def test_mixture_hits_its_weights(tmp_path):
    srcs = []
    for name, weight in (("a", 3.0), ("b", 1.0), ("c", 0.5)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": name * (5 + i)}) + "\n" for i in range(30)))
        srcs.append(SourceConfig(kind="jsonl", path=str(tmp_path / f"{name}.jsonl"), weight=weight))
    rows = np.concatenate([b["inputs"] for b in _take(make_train_iterator(_cfg(*srcs)), 150)])
    fractions = [np.mean([(ord(name) == row).any() for row in rows]) for name in "abc"]
    np.testing.assert_allclose(fractions, [3 / 4.5, 1 / 4.5, 0.5 / 4.5], atol=0.02)


def test_bad_data_is_counted(tmp_path):
    (tmp_path / "good.txt").write_text("good document")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "undecodable.txt").write_bytes(b"bad \xff bytes")
    (tmp_path / "long.txt").write_text("x" * 100)
    lines = ["{broken", json.dumps({"text": None}), json.dumps({"text": "fine line"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    srcs = (SourceConfig(kind="text", path=str(tmp_path / "*.txt")),
            SourceConfig(kind="jsonl", path=str(tmp_path / "*.jsonl")))
    it = make_train_iterator(_cfg(*srcs, max_doc_tokens=40, seq_len=16, global_batch_size=1))
    per_epoch = [{"documents": 4, "empty": 1, "undecodable": 1, "split": 1, "malformed": 0},
                 {"documents": 3, "empty": 0, "undecodable": 0, "split": 0, "malformed": 2}]
    while min(data_stats(s)["documents"] for s in it.get_state()["mixtures"][0]) < 8:
        next(it)
    # Both sources were read whole at least twice; each count lies between whole epochs' counts.
    for state, per in zip(it.get_state()["mixtures"][0], per_epoch):
        counts = data_stats(state)
        epochs = counts["documents"] / per["documents"]
        assert counts["tokens"] > 0
        for name, n in per.items():
            assert np.floor(epochs) * n <= counts[name] <= np.ceil(epochs) * n, (name, counts)
    assert data_stats(it.get_state())["malformed"] >= 4  # the total sums the sources


def test_source_with_nothing_usable_fails_instead_of_hanging(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(20)))
    cfg = _cfg(SourceConfig(kind="jsonl", path=str(tmp_path / "a.jsonl"), field="text"))  # wrong field
    with pytest.raises(sources.DataError, match=r"sources\[0\].*all empty or malformed.*field"):
        next(make_train_iterator(cfg))


def test_worker_processes_resume_exactly(tmp_path):
    cfg = _cfg(_corpus(tmp_path, 60), worker_count=2)
    it = make_train_iterator(cfg)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    it.close()
    fresh = make_train_iterator(cfg)
    fresh.set_state(json.loads(json.dumps(state)))
    _assert_same(_take(fresh, 4), expected)
    fresh.close()
    assert data_stats(state)["documents"] > 0
    # Workers only read and tokenize: the batches are those of the in-process pipeline.
    _assert_same(_take(make_train_iterator(dataclasses.replace(cfg, worker_count=0)), 7)[3:], expected)


def test_to_global_batch_single_process():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = {"inputs": np.arange(4 * len(jax.devices()) * 3, dtype=np.int32).reshape(-1, 3)}
    out = to_global_batch(local, mesh, PartitionSpec("data"))
    assert out["inputs"].shape == local["inputs"].shape
    np.testing.assert_array_equal(np.asarray(out["inputs"]), local["inputs"])


_MULTIPROCESS = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from lmtrain.data.pipeline import to_global_batch
    local = lambda p: {"inputs": np.arange(6 * 5, dtype=np.int32).reshape(6, 5) + 1000 * p}
    full = np.concatenate([local(p)["inputs"] for p in range(2)])
    for shape, axes, spec in (((4,), ("data",), P("data")), ((2, 2), ("data", "tensor"), P("data"))):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
        out = to_global_batch(local(pid), mesh, spec)["inputs"]
        assert out.shape == (12, 5), out.shape
        for shard in out.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    print("ok")
""")


def test_to_global_batch_two_processes():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _MULTIPROCESS, str(p), port], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 and "ok" in out for p, out in zip(procs, outputs)), outputs
