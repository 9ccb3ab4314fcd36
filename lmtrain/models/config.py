"""`ModelConfig`: the architecture of a hybrid recurrent/attention language model."""

from __future__ import annotations

import dataclasses
from typing import Literal

from lmtrain.configlib import ConfigError, field

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, numerics and execution switches of `LanguageModel`."""

    vocab_size: int = field(512, "Number of token ids; must be >= the tokenizer's vocabulary.")
    width: int = field(256, "Model (residual stream) width D.")
    num_layers: int = field(6, "Number of residual blocks; `pattern` is cycled over them.")
    pattern: str = field("RRA", "Mixer letters cycled over depth: R = RG-LRU recurrent block, "
                                "A = local (sliding-window) attention, G = global attention. "
                                "'RRA' Griffin, 'R' Hawk, 'A'/'G' Transformer baselines.")
    num_heads: int = field(4, "Attention query heads; also the number of diagonal blocks of the RG-LRU gates.")
    num_kv_heads: int = field(1, "Key/value heads (1 = multi-query, num_heads = multi-head, else grouped).")
    head_dim: int = field(0, "Attention head dim; 0 means width // num_heads.")
    window: int = field(256, "Local attention window W: a query attends to itself and the W tokens before it.")
    attn_block: int = field(128, "Query block size of blockwise attention (at most the window): each block "
                                 "of this many queries scores window + attn_block keys; 0 means `window`.")
    max_len: int = field(8192, "Context (KV-cache size) of global-attention (G) layers.")
    rope_base: float = field(10_000.0, "RoPE maximum wavelength.")
    rope_fraction: float = field(0.5, "Fraction of each head's dims rotated by RoPE (recurrentgemma: 0.5).")
    lru_width: int = field(0, "RG-LRU width; 0 means `width`.")
    conv_width: int = field(4, "Temporal width of the causal Conv1D before the RG-LRU.")
    lru_c: float = field(8.0, "Constant c in log a_t = -c * softplus(Lambda) * r_t.")
    lru_min_rad: float = field(0.9, "Lower end of the initial decay range a = exp(-softplus(Lambda)).")
    lru_max_rad: float = field(0.999, "Upper end of the initial decay range.")
    lru_sqrt_max_grad: float = field(1000.0, "Clip on d sqrt(1-a^2)/d(1-a^2) near a -> 1 (gradient guard).")
    mlp_expansion: int = field(3, "Gated-GELU MLP hidden width = mlp_expansion * width.")
    logit_softcap: float = field(30.0, "tanh soft-cap on the logits (0 = off).")
    embed_scale: bool = field(True, "Multiply embeddings by sqrt(width) (tied input/output table).")
    norm_eps: float = field(1e-6, "RMSNorm epsilon.")
    scan_backend: Literal["auto", "associative", "linear", "chunked"] = field(
        "auto", "Linear-recurrence backend (see docs/performance.md for the measurements behind 'auto').")
    scan_chunk: int = field(128, "Chunk length of the 'chunked' scan backend.")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", "Compute dtype of matmuls and activations. Decays and recurrent state stay float32.")
    param_dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", "Storage dtype of parameters (the RG-LRU decay parameter is always float32).")
    scan_layers: bool = field(False, "Run repeated pattern groups with a scan over layers (compile time "
                                     "independent of depth; set it for deep models). Unrolled runs faster.")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = field(
        "none", "Rematerialisation of each block in the backward pass: none, full, or save matmul outputs.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def resolved_lru_width(self) -> int:
        return self.lru_width or self.width

    @property
    def mlp_width(self) -> int:
        return self.mlp_expansion * self.width

    @property
    def layer_kinds(self) -> str:
        """The mixer letter of each of the `num_layers` layers."""
        return "".join(self.pattern[i % len(self.pattern)] for i in range(self.num_layers))

    def validate(self) -> None:
        from lmtrain.models.blocks import MIXERS  # the registry of mixer letters

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(bool(self.pattern), "pattern must be a non-empty string of mixer letters, e.g. 'RRA'")
        unknown = sorted(set(self.pattern) - set(MIXERS))
        need(not unknown, f"pattern {self.pattern!r} has unknown letter(s) {unknown}; "
                          f"known: {', '.join(f'{k} ({v.__name__})' for k, v in MIXERS.items())}")
        for name in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "window", "max_len",
                     "conv_width", "mlp_expansion", "scan_chunk"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.head_dim > 0 or self.width % self.num_heads == 0,
             f"width {self.width} is not divisible by num_heads {self.num_heads}; change one or set head_dim")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.resolved_lru_width % self.num_heads == 0,
             f"lru_width {self.resolved_lru_width} is not divisible by num_heads {self.num_heads} "
             "(the RG-LRU gates are block-diagonal with num_heads blocks)")
        rot = int(self.resolved_head_dim * self.rope_fraction)
        need(0 <= self.rope_fraction <= 1 and rot % 2 == 0,
             f"rope_fraction {self.rope_fraction} of head_dim {self.resolved_head_dim} must give an even "
             "number of rotated dims")
        need(0 < self.lru_min_rad < self.lru_max_rad < 1,
             f"need 0 < lru_min_rad < lru_max_rad < 1, got {self.lru_min_rad}, {self.lru_max_rad}")
        need(self.attn_block >= 0 and self.head_dim >= 0 and self.lru_width >= 0,
             "attn_block, head_dim and lru_width must be >= 0 (0 = derived default)")
        need(self.logit_softcap >= 0, f"logit_softcap must be >= 0, got {self.logit_softcap}")
