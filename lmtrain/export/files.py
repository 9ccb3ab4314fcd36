"""What every export format shares: the error type, the output directory, flat parameter names, the tokenizer.

    with OutputDir(out, force=False) as staging:     # refuses a non-empty `out` before anything is written
        (staging / "config.json").write_text(...)    # files go to a hidden staging folder next to `out` ...
    # ... and move into `out` together on success; on an exception `out` is left as it was

`--force` overwrites only the entries the export writes (files, and the folders a format owns such as
recurrentgemma's `params/`); every other entry of `out` is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmtrain.data.tokenizer import TokenizerConfig
from lmtrain.errors import LmtrainError

CONFIG_FILE = "config.json"


class ExportError(LmtrainError, ValueError):
    """An export is refused (bad input, or an architecture the format cannot represent); one line, naming why.
    The CLI prints it as `lmtrain: error: ...` and exits with status 2."""


# -------------------------------------------------------------------------------------- output folder
def check_out(out: str | Path, force: bool) -> Path:
    """`out` as a Path, if an export may write there (raises ExportError otherwise); writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        n = sum(1 for _ in out.iterdir())
        raise ExportError(f"--out {out} exists and is not empty ({n} entries); choose a new directory, or pass "
                          "--force to overwrite the files this export writes (other files are kept)")
    return out


class OutputDir:
    """Context manager: a staging folder whose entries replace those of `out` when the block succeeds."""

    def __init__(self, out: str | Path, *, force: bool = False):
        self.out, self.force = check_out(out, force), force
        self.staging: Path | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.staging is not None
        try:
            if exc_type is None:
                check_out(self.out, self.force)  # nothing appeared meanwhile
                self.out.mkdir(exist_ok=True)
                umask = os.umask(0)
                os.umask(umask)
                for entry in sorted(self.staging.iterdir()):
                    if entry.is_file():  # writers may create 0600 temporaries (safetensors does)
                        entry.chmod(0o666 & ~umask)
                    dest = self.out / entry.name
                    if dest.is_dir() and not dest.is_symlink():
                        shutil.rmtree(dest)  # only ever an entry this export writes (e.g. params/)
                    elif dest.exists() or dest.is_symlink():
                        dest.unlink()
                    os.replace(entry, dest)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------ flat parameters
def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested pure dict -> {"groups.0.mixer.linear_x.kernel": leaf, ...} (int keys written as digits)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of `flatten` for our parameter names: digit parts become int keys (nnx.List indices)."""
    out: dict = {}
    for name, value in flat.items():
        *path, leaf = (int(p) if p.isdigit() else p for p in name.split("."))
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def to_numpy(tree: Mapping) -> dict[str, np.ndarray]:
    """Flat numpy copies (host memory) of a pure dict of arrays, keeping each dtype (bfloat16 included)."""
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(tree).items()}


# ----------------------------------------------------------------------------------------- tokenizer
def tokenizer_source(tok: TokenizerConfig, workdir: Path) -> Path | None:
    """The sentencepiece .model file of a run (None for the byte tokenizer); ExportError if it is missing.

    A relative `data.tokenizer.path` is looked up from the current directory (as training did), then from
    the run directory.
    """
    if tok.kind == "byte":
        return None
    path = Path(tok.path)
    for candidate in (path, workdir / path):
        if candidate.is_file():
            return candidate
    raise ExportError(f"tokenizer model {tok.path!r} (data.tokenizer.path of {workdir / 'config.yaml'}) not "
                      f"found from {Path.cwd()} nor from {workdir}; run the export from the directory the run was "
                      "trained in")


def tokenizer_record(tok: TokenizerConfig, source: Path | None) -> dict[str, Any]:
    """What config.json records about the tokenizer: its kind, and the file copied into the export."""
    from lmtrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

    t = ByteTokenizer() if source is None else SentencePieceTokenizer(source)
    record: dict[str, Any] = {"kind": tok.kind, "vocab_size": t.vocab_size, "pad_id": t.pad_id,
                              "bos_id": t.bos_id, "eos_id": t.eos_id}
    if source is not None:
        record["path"] = "tokenizer.model"
    return record


__all__ = ["CONFIG_FILE", "ExportError", "OutputDir", "check_out", "flatten", "read_json", "to_numpy",
           "tokenizer_record", "tokenizer_source", "unflatten", "write_json"]
