"""`CoreConfig`: the model fields every layer kind shares (width, depth, pattern, numerics, execution).

`ModelConfig` (lmtrain.models.config) is this plus one section per layer kind, each declared by its
mixer module (`model.rglru`, `model.attention`, `model.mamba`, ...). Mixers read the shared fields
from here and their own settings from their section.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lmtrain.configlib import ConfigError, field

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class CoreConfig:
    """Shape, numerics and execution switches shared by every layer of `LanguageModel`."""

    vocab_size: int = field(512, "Number of token ids; must be >= the tokenizer's vocabulary.")
    width: int = field(256, "Model (residual stream) width D.")
    num_layers: int = field(6, "Number of residual blocks; `pattern` is cycled over them.")
    pattern: str = field("RRA", "Mixer letters cycled over depth: R = RG-LRU recurrent block, "
                                "A = local (sliding-window) attention, G = global attention, M = Mamba-2. "
                                "'RRA' Griffin, 'R' Hawk, 'MA' Samba, 'A'/'G' Transformer baselines.")
    mlp_expansion: int = field(3, "Gated-GELU MLP hidden width = mlp_expansion * width.")
    logit_softcap: float = field(30.0, "tanh soft-cap on the logits (0 = off).")
    embed_scale: bool = field(True, "Multiply embeddings by sqrt(width) (tied input/output table).")
    norm_eps: float = field(1e-6, "RMSNorm epsilon.")
    scan_backend: Literal["auto", "associative", "linear", "chunked"] = field(
        "auto", "Linear-recurrence backend of the recurrent layers (see docs/performance.md for the "
                "measurements behind 'auto').")
    scan_chunk: int = field(128, "Chunk length of the 'chunked' scan backend.")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", "Compute dtype of matmuls and activations. Decays and recurrent state stay float32.")
    param_dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", "Storage dtype of parameters (decay parameters are always float32).")
    scan_layers: bool = field(False, "Run repeated pattern groups with a scan over layers (compile time "
                                     "independent of depth; set it for deep models). Unrolled runs faster.")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = field(
        "none", "Rematerialisation of each block in the backward pass: none, full, or save matmul outputs.")

    @property
    def mlp_width(self) -> int:
        return self.mlp_expansion * self.width

    @property
    def layer_kinds(self) -> str:
        """The mixer letter of each of the `num_layers` layers."""
        return "".join(self.pattern[i % len(self.pattern)] for i in range(self.num_layers))

    def check_core(self) -> None:
        """Checks of the shared fields (the layer kinds' own checks run in `ModelConfig.validate`)."""
        if not self.pattern:
            raise ConfigError("pattern must be a non-empty string of mixer letters, e.g. 'RRA'")
        for name in ("vocab_size", "width", "num_layers", "mlp_expansion", "scan_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.logit_softcap < 0:
            raise ConfigError(f"logit_softcap must be >= 0, got {self.logit_softcap}")
