"""Document sources: files -> documents, by index (random access, so grain can shuffle and shard).

A source is built once (it lists its files and indexes their records) and then reads any document by
index. Each document has a stable `key` (file path relative to the glob root, plus the record number)
that decides the held-out split. Bad data is handled, never fatal:

- undecodable bytes: decoded with U+FFFD replacement, kept, flagged `undecodable`;
- unparsable records (bad JSON, missing field, null): flagged `malformed`, skipped downstream;
- empty (whitespace-only) documents: skipped downstream, counted as `empty`;
- over-long documents: split downstream (`max_doc_tokens`), counted as `split`.

Missing or unreadable files are fatal: `DataError` names the path and the fix.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordReader

from lmtrain.data.source_config import SourceConfig
from lmtrain.errors import LmtrainError

# Bad-data counters; the pipeline keeps these in its iterator state (see pipeline.data_stats).
COUNTERS = ("documents", "tokens", "undecodable", "malformed", "empty", "split")

# stdlib directories left out of the built-in corpus: installed packages and test suites.
STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(LmtrainError, ValueError):
    """A source cannot be read; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    undecodable: bool = False  # had invalid UTF-8, replaced by U+FFFD
    malformed: bool = False  # record could not be parsed; text is ""


def decode(raw: bytes) -> Document:
    """UTF-8 text of `raw`; invalid bytes become U+FFFD and flag the document."""
    try:
        return Document(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Document(raw.decode("utf-8", errors="replace"), undecodable=True)


class Source(Protocol):
    def __len__(self) -> int: ...
    def key(self, index: int) -> str: ...
    def read(self, index: int) -> Document: ...


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def expand_glob(pattern: str) -> tuple[list[Path], Path]:
    """Sorted files matching `pattern` and the glob's root (its leading non-wildcard directories)."""
    pattern = os.path.expanduser(pattern)
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
    if not paths:
        raise DataError(f"source path {pattern!r} matched no files (cwd: {os.getcwd()}); fix the path or "
                        "glob, e.g. 'data/*.jsonl' or 'data/**/*.txt'")
    parts = Path(pattern).parts
    n = next((i for i, part in enumerate(parts) if _has_magic(part)), len(parts) - 1)
    return paths, Path(*parts[:n]) if n else Path(".")


def _cannot_read(path: Path, err: Exception) -> DataError:
    return DataError(f"cannot read {path}: {err}. Check that it exists, is readable and is of the "
                     "source's kind, or narrow the source's path glob to exclude it")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


class _Records:
    """Maps a global record index to (file number, record number within the file)."""

    def __init__(self, paths: Sequence[Path], root: Path, counts: Sequence[int]):
        self.paths, self.root = list(paths), root
        self.ends = np.cumsum(np.asarray(counts, np.int64))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.ends, index, side="right"))
        return f, index - (int(self.ends[f - 1]) if f else 0)

    def key(self, index: int) -> str:
        f, r = self.locate(index)
        return f"{_rel(self.paths[f], self.root)}:{r}"


class _RecordSource:
    """A source whose documents are records of files, indexed by `self.records` (a `_Records`)."""

    records: _Records

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        return self.records.key(index)


class FileSource:
    """One document per file (the `text` and `stdlib` kinds)."""

    def __init__(self, paths: Sequence[Path], root: Path):
        for p in paths:
            if not (p.is_file() and os.access(p, os.R_OK)):
                raise _cannot_read(p, OSError("not a readable file"))
        self.paths, self.root = list(paths), root

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return _rel(self.paths[index], self.root)

    def read(self, index: int) -> Document:
        try:
            return decode(self.paths[index].read_bytes())
        except OSError as e:
            raise _cannot_read(self.paths[index], e) from e


def _line_offsets(path: Path, chunk: int = 1 << 26) -> np.ndarray:
    """[n, 2] (start, end) byte offsets of the non-empty lines of `path`."""
    newlines, size = [], 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + size)
            size += len(block)
    nl = np.concatenate(newlines + [np.zeros(0, np.int64)]).astype(np.int64)
    spans = np.stack([np.concatenate([[0], nl + 1]), np.concatenate([nl, [size]])], axis=1)
    return spans[spans[:, 1] > spans[:, 0]]


class JsonlSource(_RecordSource):
    """One document per non-empty line: `json.loads(line)[field]`."""

    def __init__(self, paths: Sequence[Path], root: Path, field: str):
        try:
            self.spans = [_line_offsets(p) for p in paths]
        except OSError as e:
            raise _cannot_read(Path(e.filename or paths[0]), e) from e
        self.records = _Records(paths, root, [len(s) for s in self.spans])
        self.field = field

    def read(self, index: int) -> Document:
        f, r = self.records.locate(index)
        start, end = self.spans[f][r]
        path = self.records.paths[f]
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                doc = decode(fh.read(end - start))
        except OSError as e:
            raise _cannot_read(path, e) from e
        try:
            text = json.loads(doc.text)[self.field]
        except (json.JSONDecodeError, TypeError, KeyError):
            return Document("", malformed=True)
        if not isinstance(text, str):
            return Document("", malformed=True)
        return Document(text, undecodable=doc.undecodable)


class ParquetSource(_RecordSource):
    """One document per row of a string (or binary) column; row groups are read whole and cached."""

    CACHED_ROW_GROUPS = 4

    def __init__(self, paths: Sequence[Path], root: Path, column: str):
        self.column, self.groups = column, []  # groups: per file, row-group end offsets
        for p in paths:
            try:
                pf = pq.ParquetFile(p)
            except (OSError, pa.ArrowException) as e:
                raise _cannot_read(p, e) from e
            schema = pf.schema_arrow
            if column not in schema.names:
                raise DataError(f"{p}: no column {column!r} (columns: {', '.join(schema.names)}); "
                                "set the source's `field` to the text column")
            tp = schema.field(column).type
            if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp)
                    or pa.types.is_large_binary(tp)):
                raise DataError(f"{p}: column {column!r} has type {tp}, expected string or binary")
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self.groups.append(np.cumsum(np.asarray(sizes, np.int64)))
        self.records = _Records(paths, root, [int(g[-1]) if len(g) else 0 for g in self.groups])
        self._cache = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict()}

    def _row_group(self, f: int, g: int) -> list:
        rows = self._cache.get((f, g))
        if rows is None:
            path = self.records.paths[f]
            try:
                rows = pq.ParquetFile(path).read_row_group(g, columns=[self.column]).column(0).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise _cannot_read(path, e) from e
            self._cache[(f, g)] = rows
            while len(self._cache) > self.CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return rows

    def read(self, index: int) -> Document:
        f, r = self.records.locate(index)
        g = int(np.searchsorted(self.groups[f], r, side="right"))
        value = self._row_group(f, g)[r - (int(self.groups[f][g - 1]) if g else 0)]
        if value is None:
            return Document("", malformed=True)
        return decode(value) if isinstance(value, bytes) else Document(value)


class ArrayRecordSource(_RecordSource):
    """One UTF-8 document per record. Write files with group_size:1 for fast random access."""

    def __init__(self, paths: Sequence[Path], root: Path):
        counts = []
        for p in paths:
            reader = self._open(p)
            counts.append(reader.num_records())
            reader.close()
        self.records = _Records(paths, root, counts)
        self._readers: dict[int, ArrayRecordReader] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    @staticmethod
    def _open(path: Path) -> ArrayRecordReader:
        if not (path.is_file() and os.access(path, os.R_OK)):
            raise _cannot_read(path, OSError("not a readable file"))
        reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
        if not reader.ok():
            raise _cannot_read(path, OSError("not a valid ArrayRecord file"))
        return reader

    def read(self, index: int) -> Document:
        f, r = self.records.locate(index)
        if f not in self._readers:
            self._readers[f] = self._open(self.records.paths[f])
        return decode(self._readers[f].read([r])[0])


def stdlib_files() -> tuple[list[Path], Path]:
    """The running interpreter's standard-library .py files (sorted) and the stdlib directory."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDE]
        paths.extend(Path(folder, f) for f in files if f.endswith(".py"))
    paths.sort()
    if not paths:
        raise DataError(f"no standard-library .py files under {root}; use a text/jsonl/parquet source instead")
    return paths, root


SOURCES = {
    "stdlib": lambda cfg: FileSource(*stdlib_files()),
    "text": lambda cfg: FileSource(*expand_glob(cfg.path)),
    "jsonl": lambda cfg: JsonlSource(*expand_glob(cfg.path), cfg.field),
    "parquet": lambda cfg: ParquetSource(*expand_glob(cfg.path), cfg.field),
    "arrayrecord": lambda cfg: ArrayRecordSource(*expand_glob(cfg.path)),
}


def open_source(cfg: SourceConfig) -> Source:
    """Lists and indexes the files of one source."""
    if cfg.kind not in SOURCES:
        raise DataError(f"a '{cfg.kind}' source has no documents to read; use a text, jsonl, parquet, "
                        "arrayrecord or stdlib source here")
    return SOURCES[cfg.kind](cfg)


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the document with identity `key` is in the held-out split (a fixed hash, no seed)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def split_indices(source: Source, heldout_fraction: float, heldout: bool) -> np.ndarray:
    """Indices of the documents of `source` in the training (heldout=False) or held-out split."""
    keep = [i for i in range(len(source)) if is_heldout(source.key(i), heldout_fraction) == heldout]
    return np.asarray(keep, np.int64)


def iter_texts(cfg: SourceConfig, heldout_fraction: float = 0.0, counts: collections.Counter | None = None,
               ) -> Iterator[str]:
    """Texts of the training split in file order, skipping empty and malformed documents (counted)."""
    counts = collections.Counter() if counts is None else counts
    source = open_source(cfg)
    for i in split_indices(source, heldout_fraction, heldout=False):
        doc = source.read(int(i))
        counts["documents"] += 1
        counts["undecodable"] += doc.undecodable
        bad = "malformed" if doc.malformed else "empty" if not doc.text.strip() else None
        if bad:
            counts[bad] += 1
            continue
        yield doc.text
