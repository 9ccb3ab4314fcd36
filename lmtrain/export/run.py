"""`export_run`: a training run's checkpoint -> a directory in one of `FORMATS` (what `lmtrain export` calls).

    result = export_run("runs/demo", "hf", "exports/demo-hf")        # latest checkpoint
    result = export_run("runs/demo", "safetensors", "exports/demo", step=200, ema=True, force=True)
    result.files, result.step, result.warnings

Every check runs before anything is written: the format, `out` (must be new or empty unless `force`),
the run (config, checkpoints, the step, EMA), the format's architecture checks, the tokenizer file and the
format's packages. A refused export raises ExportError (or RunError, a FileNotFoundError, for the run) and
leaves the file system as it was; a failure while writing leaves `out` as it was too (files are staged).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtrain import configlib
from lmtrain.configlib import did_you_mean
from lmtrain.export.files import ExportError, OutputDir, check_out, tokenizer_record, tokenizer_source
from lmtrain.models.config import ModelConfig


def _check_recurrentgemma(cfg: ModelConfig) -> None:
    from lmtrain.export.recurrentgemma import check_compatible

    try:
        check_compatible(cfg)
    except ValueError as e:
        raise ExportError(f"cannot export for recurrentgemma's Griffin: {e}") from None


def _check_hf(cfg: ModelConfig) -> None:
    from lmtrain.export.hf import check_hf

    check_hf(cfg)


@dataclasses.dataclass(frozen=True)
class Format:
    """One export format: its architecture check, the packages it needs, and its writer."""

    help: str
    check: Callable[[ModelConfig], None]
    packages: tuple[str, ...]
    write: str  # "module:function"(model, staging, tokenizer=..., source=..., tokenizer_file=...)


FORMATS: dict[str, Format] = {
    "safetensors": Format("our parameter names in model.safetensors + config.json; load_exported()",
                          lambda cfg: None, ("safetensors",), "native"),
    "hf": Format("Hugging Face transformers RecurrentGemmaForCausalLM (R/A layers only)", _check_hf,
                 ("transformers", "tokenizers", "safetensors"), "hf"),
    "recurrentgemma": Format("recurrentgemma.jax.Griffin params (orbax) + GriffinConfig (R/A layers only)",
                             _check_recurrentgemma, ("recurrentgemma", "orbax.checkpoint"), "recurrentgemma"),
}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    step: int
    files: list[str]
    warnings: list[str]


def check_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        hint = did_you_mean(fmt, list(FORMATS)).replace("valid keys", "formats")
        raise ExportError(f"unknown export format {fmt!r}{hint}")
    return FORMATS[fmt]


def _check_packages(fmt: str, packages: tuple[str, ...]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p.split(".")[0]) is None]
    if missing:
        extra = {"hf": " (pip install 'lmtrain[hf]')", "recurrentgemma": " (pip install 'lmtrain[bench]')"}
        raise ExportError(f"--format {fmt} needs the package(s) {', '.join(missing)}{extra.get(fmt, '')}")


def export_run(workdir: str | Path, fmt: str, out: str | Path, *, step: int | None = None, ema: bool = False,
               force: bool = False) -> ExportResult:
    """Exports the checkpoint `step` (default: the latest) of the run in `workdir` as `fmt` into `out`."""
    from lmtrain.eval.load import RunError, checkpoint_steps, load_run, load_run_config

    spec = check_format(fmt)
    workdir, out = Path(workdir), check_out(out, force)
    cfg = load_run_config(workdir)
    steps = checkpoint_steps(workdir, cfg)
    if not steps:
        raise RunError(f"{workdir} has no checkpoint in {cfg.checkpoint.path(workdir)}; train the run first "
                       f"(`lmtrain train {workdir / 'config.yaml'} workdir={workdir}`)")
    if step is not None and step not in steps:
        raise RunError(f"{workdir} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}")
    if ema and not cfg.optimizer.ema_decay:
        raise ExportError(f"{workdir} was trained without optimizer.ema_decay: it has no EMA parameters "
                          "(drop --ema)")
    if out.exists() and out.resolve() == workdir.resolve():
        raise ExportError(f"--out {out} is the run directory; export into a directory of its own")
    spec.check(cfg.model)
    _check_packages(fmt, spec.packages)
    sp_model = tokenizer_source(cfg.data.tokenizer, workdir)
    tokenizer = tokenizer_record(cfg.data.tokenizer, sp_model)

    _, model, step = load_run(workdir, step, ema=ema)
    source = {"workdir": str(workdir), "step": step, "ema": ema}
    notes = []
    if fmt in ("hf", "recurrentgemma"):
        from lmtrain.export.hf import embed_scale_warning, hf_notes

        notes = hf_notes(model) if fmt == "hf" else [w for w in [embed_scale_warning(model, "recurrentgemma")] if w]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scales embeddings by", category=UserWarning)  # in `notes`
        with OutputDir(out, force=force) as staging:
            files = _write(spec.write, model, staging, tokenizer=tokenizer, source=source, sp_model=sp_model,
                           run_config=configlib.to_dict(cfg))
    return ExportResult(out, fmt, step, sorted(files), notes)


def _write(kind: str, model: Any, staging: Path, *, tokenizer: dict, source: dict, sp_model: Path | None,
           run_config: dict) -> list:
    if kind == "native":
        from lmtrain.export.native import write_safetensors

        files = write_safetensors(model, staging, tokenizer=tokenizer, source=source, run_config=run_config)
    elif kind == "hf":
        from lmtrain.export.hf import write_hf

        files = write_hf(model, staging, tokenizer=tokenizer, tokenizer_file=sp_model)
        return files  # the HF tokenizer files replace tokenizer.model
    else:
        from lmtrain.export.recurrentgemma import write_recurrentgemma

        files = write_recurrentgemma(model, staging, tokenizer=tokenizer, source=source)
    if sp_model is not None:
        shutil.copyfile(sp_model, staging / "tokenizer.model")
        files.append("tokenizer.model")
    return files


__all__ = ["FORMATS", "ExportResult", "Format", "check_format", "export_run"]
