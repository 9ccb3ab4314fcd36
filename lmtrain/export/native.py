"""`--format safetensors`: our parameters under our names, loadable without the training run.

    DIR/model.safetensors   every parameter (no optimizer state), named by its flattened pure-dict path
                            (`embedder.embedding`, `groups.0.mixer.linear_x.kernel`, `tail.0.mlp.up.bias`, ...),
                            in its stored dtype; stacked groups keep their leading `layers` axis
    DIR/config.json         {"format": "lmtrain-safetensors", "model": <ModelConfig as a dict>,
                             "tokenizer": {"kind": ..., "path": "tokenizer.model" for sentencepiece, ids},
                             "embedder_scale": the embedding multiplier, "source": run, step, ema,
                             "run_config": the run's whole resolved config, for reference}
    DIR/tokenizer.model     the sentencepiece model (sentencepiece runs only)

    cfg, model = load_exported("exports/demo")          # ModelConfig, LanguageModel
    cfg, model = load_model("exports/demo")             # ... or a run directory (its latest checkpoint)
    tokenizer = load_exported_tokenizer("exports/demo")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

from lmtrain import configlib
from lmtrain.data.tokenizer import TokenizerConfig, load_tokenizer
from lmtrain.export.files import CONFIG_FILE, ExportError, flatten, read_json, to_numpy, unflatten, write_json
from lmtrain.models.config import ModelConfig
from lmtrain.models.model import LanguageModel

FORMAT = "lmtrain-safetensors"
WEIGHTS_FILE = "model.safetensors"


def write_safetensors(model: LanguageModel, staging: Path, *, tokenizer: dict[str, Any],
                      source: dict[str, Any], run_config: dict[str, Any] | None = None) -> list[str]:
    """Writes model.safetensors and config.json into `staging` (the tokenizer file is copied by the caller).

    `run_config`: the run's whole resolved config (`configlib.to_dict(cfg)`), kept for reference (training
    length, data, optimizer); loading needs only "model" and "tokenizer"."""
    flat = to_numpy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    save_file(flat, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": 1, "model": configlib.to_dict(model.cfg), "tokenizer": tokenizer,
            "embedder_scale": float(model.embedder.scale), "source": source}
    if run_config is not None:
        meta["run_config"] = run_config
    write_json(staging / CONFIG_FILE, meta)
    return [WEIGHTS_FILE, CONFIG_FILE]


def is_exported(path: str | Path) -> bool:
    """True for a directory written by `lmtrain export --format safetensors`."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        return False
    try:
        return read_json(config).get("format") == FORMAT
    except ValueError:
        return False


def _read_config(path: Path) -> dict[str, Any]:
    if not is_exported(path):
        raise ExportError(f"{path} is not an `lmtrain export --format safetensors` directory (it needs "
                          f"{CONFIG_FILE} with format {FORMAT!r} and {WEIGHTS_FILE})")
    return read_json(path / CONFIG_FILE)


def load_exported(path: str | Path) -> tuple[ModelConfig, LanguageModel]:
    """(ModelConfig, LanguageModel) of an exported directory, parameters on the default device.

    ExportError if a parameter is missing, unexpected, or of another shape than the config gives.
    """
    path = Path(path)
    meta = _read_config(path)
    cfg = configlib.from_dict(ModelConfig, meta["model"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
    want = flatten(nnx.to_pure_dict(abstract))  # name -> ShapeDtypeStruct
    flat = load_file(str(path / WEIGHTS_FILE))
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or extra:
        raise ExportError(f"{path / WEIGHTS_FILE} does not match its config.json: missing {missing}, "
                          f"unexpected {extra}")
    for name, w in want.items():
        if tuple(flat[name].shape) != tuple(w.shape):
            raise ExportError(f"{path / WEIGHTS_FILE}: {name} has shape {flat[name].shape}, config.json gives "
                              f"{w.shape}")
    params = unflatten({name: jnp.asarray(flat[name], w.dtype) for name, w in want.items()})
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    model.embedder.scale = float(meta.get("embedder_scale", model.embedder.scale))
    return cfg, model


def exported_tokenizer_config(path: str | Path) -> TokenizerConfig:
    """The TokenizerConfig of an exported directory (a sentencepiece path points into the directory)."""
    path = Path(path)
    tok = _read_config(path)["tokenizer"]
    if tok["kind"] == "byte":
        return TokenizerConfig(kind="byte")
    return TokenizerConfig(kind="sentencepiece", path=str(path / tok["path"]))


def load_exported_tokenizer(path: str | Path):
    """The tokenizer of an exported directory (`lmtrain.data.tokenizer` object)."""
    return load_tokenizer(exported_tokenizer_config(path))


def load_model(path: str | Path, *, step: int | None = None, ema: bool = False) -> tuple[ModelConfig, LanguageModel]:
    """(ModelConfig, LanguageModel) of an exported directory or of a training run directory.

    An exported directory holds one set of parameters: `step` and `ema` must then be left unset. A run
    directory is read with `lmtrain.eval.load.load_run(path, step, ema=ema)`.
    """
    path = Path(path)
    if is_exported(path):
        if step is not None or ema:
            raise ExportError(f"{path} is an exported model (one set of parameters): step and ema do not apply")
        return load_exported(path)
    if (path / "config.yaml").is_file():
        from lmtrain.eval.load import load_run

        cfg, model, _ = load_run(path, step, ema=ema)
        return cfg.model, model
    raise ExportError(f"{path} is neither an exported model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a training run "
                      "(config.yaml)")


__all__ = ["FORMAT", "WEIGHTS_FILE", "exported_tokenizer_config", "is_exported", "load_exported",
           "load_exported_tokenizer", "load_model", "write_safetensors"]
