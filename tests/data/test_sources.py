"""Each source kind reads files it writes; errors name the path; bad data is flagged; the split."""

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from lmtrain import configlib
from lmtrain.data import sources
from lmtrain.data.config import DataConfig, SourceConfig


def _read_all(source):
    return [source.read(i) for i in range(len(source))]


def test_stdlib_corpus_is_sorted_and_excludes_packages_and_tests():
    paths, root = sources.stdlib_files()
    assert paths == sorted(paths) and len(paths) > 100
    rel = [p.relative_to(root).parts for p in paths]
    assert not any(set(parts[:-1]) & sources.STDLIB_EXCLUDE for parts in rel)
    source = sources.open_source(SourceConfig())
    assert source.key(0) == paths[0].relative_to(root).as_posix()
    assert "import" in "".join(source.read(i).text for i in range(20))


def test_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.txt").write_text("beta")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    source = sources.open_source(SourceConfig(kind="text", path=str(tmp_path / "**" / "*.txt")))
    assert [source.key(i) for i in range(len(source))] == ["a.txt", "bad.txt", "sub/b.txt"]
    docs = _read_all(source)
    assert [d.text for d in docs] == ["alpha", "ok \ufffd\ufffd end", "beta"]
    assert [d.undecodable for d in docs] == [False, True, False]


def test_jsonl_field_blank_and_malformed_lines(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", "{not json", json.dumps({"other": "x"}),
             json.dumps({"text": 5}), json.dumps({"text": "two"}), json.dumps([1])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(json.dumps({"text": "three"}).encode() + b"\n")
    source = sources.open_source(SourceConfig(kind="jsonl", path=str(tmp_path / "*.jsonl")))
    docs = _read_all(source)
    assert len(source) == 7  # the blank line is not a record
    assert [d.text for d in docs if not d.malformed] == ["one", "two", "three"]
    assert sum(d.malformed for d in docs) == 4
    assert source.key(6) == "b.jsonl:0"


def test_parquet_row_groups_nulls_and_bytes(tmp_path):
    texts = [f"row {i}" for i in range(25)] + [None]
    pq.write_table(pa.table({"body": texts, "n": list(range(26))}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"body": pa.array([b"raw \xff"], pa.binary())}), tmp_path / "b.parquet")
    source = sources.open_source(SourceConfig(kind="parquet", path=str(tmp_path / "*.parquet"), field="body"))
    docs = _read_all(source)
    assert [d.text for d in docs[:25]] == texts[:25]
    assert docs[25].malformed and docs[26].undecodable and docs[26].text == "raw \ufffd"
    assert source.read(3).text == "row 3"  # random access after the cache moved on
    with pytest.raises(sources.DataError, match="no column 'txt'.*body"):
        sources.open_source(SourceConfig(kind="parquet", path=str(tmp_path / "a.parquet"), field="txt"))
    with pytest.raises(sources.DataError, match="expected string"):
        sources.open_source(SourceConfig(kind="parquet", path=str(tmp_path / "a.parquet"), field="n"))


def test_arrayrecord_records(tmp_path):
    writer = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
    for text in ["first", "second", "third"]:
        writer.write(text.encode())
    writer.close()
    source = sources.open_source(SourceConfig(kind="arrayrecord", path=str(tmp_path / "*.array_record")))
    assert [source.read(i).text for i in (2, 0, 1)] == ["third", "first", "second"]
    assert source.key(1) == "a.array_record:1"


def test_empty_glob_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(sources.DataError, match="matched no files") as err:
        sources.open_source(SourceConfig(kind="jsonl", path=pattern))
    assert pattern in str(err.value)


@pytest.mark.parametrize("kind,name", [("text", "a.txt"), ("parquet", "a.parquet"),
                                       ("arrayrecord", "a.array_record")])
def test_unreadable_file_names_the_path(tmp_path, kind, name):
    path = tmp_path / name
    if kind == "text":
        os.symlink(tmp_path / "gone", path)  # a dangling link: matched by the glob, cannot be read
    else:
        path.write_bytes(b"this is not a " + kind.encode() + b" file" * 10)
    with pytest.raises(sources.DataError, match="cannot read") as err:
        sources.open_source(SourceConfig(kind=kind, path=str(tmp_path / "*")))
    assert str(path) in str(err.value)


def test_heldout_split_is_disjoint_deterministic_and_sized(tmp_path):
    for i in range(400):
        (tmp_path / f"{i:03d}.txt").write_text(f"doc {i}")
    source = sources.open_source(SourceConfig(kind="text", path=str(tmp_path / "*.txt")))
    train = sources.split_indices(source, 0.1, heldout=False)
    heldout = sources.split_indices(source, 0.1, heldout=True)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 400
    assert 20 <= len(heldout) <= 60
    np.testing.assert_array_equal(heldout, sources.split_indices(source, 0.1, heldout=True))
    # The split depends on the document's key only: a larger fraction keeps the old held-out docs.
    assert set(heldout) <= set(sources.split_indices(source, 0.2, heldout=True))


def test_iter_texts_counts_bad_data(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_text(" \n\t")
    (tmp_path / "c.txt").write_bytes(b"\xc3(")
    counts = collections.Counter()
    texts = list(sources.iter_texts(SourceConfig(kind="text", path=str(tmp_path / "*")), 0.0, counts))
    assert texts == ["fine", "\ufffd("]
    assert counts == {"documents": 3, "empty": 1, "undecodable": 1}


def test_config_validation_and_typos():
    cfg = configlib.from_dict(DataConfig, {"sources": [{"kind": "jsonl", "path": "d/*.jsonl", "weight": 2}]})
    assert cfg.sources[0] == SourceConfig(kind="jsonl", path="d/*.jsonl", field="text", weight=2.0)
    with pytest.raises(configlib.ConfigError, match="sources\\[0\\].*needs a file glob"):
        configlib.from_dict(DataConfig, {"sources": [{"kind": "parquet"}]})
    with pytest.raises(configlib.ConfigError, match="did you mean 'seq_len'"):
        configlib.from_dict(DataConfig, {"seqlen": 5})
    with pytest.raises(configlib.ConfigError, match="heldout_fraction: must be in"):
        configlib.from_dict(DataConfig, {"heldout_fraction": 1.0})
    assert {row[0] for row in configlib.describe(DataConfig)} >= {"tokenizer.kind", "seq_len", "worker_count"}
