"""Exports of trained parameters, for other code to load (docs/export.md).

    lmtrain export WORKDIR --format safetensors|hf|recurrentgemma --out DIR [--step N] [--ema] [--force]

    from lmtrain.export import export_run, load_exported, load_model
    cfg, model = load_exported("exports/demo")   # --format safetensors: ModelConfig, LanguageModel
    cfg, model = load_model(path)                # an exported directory or a run directory

Modules: `run` (export_run, the checks before writing), `files` (output folder, flat names, tokenizer),
`native` (safetensors with our names), `hf` (transformers' RecurrentGemma: the name/layout table and the
refusals), `recurrentgemma` (recurrentgemma's JAX Griffin, both directions).
"""

from lmtrain.export.files import ExportError
from lmtrain.export.native import is_exported, load_exported, load_exported_tokenizer, load_model
from lmtrain.export.run import FORMATS, export_run

__all__ = ["FORMATS", "ExportError", "export_run", "is_exported", "load_exported", "load_exported_tokenizer",
           "load_model"]
