"""Accounting: parameter count and analytic training FLOPs per token (for tokens/s -> MFU).

Forward FLOPs per token (a multiply-add = 2 FLOPs), D width, F MLP width, V vocab:
  every layer     its mixer's `flops_per_token(cfg, seq_len)` (declared by the layer kind, see
                  lmtrain/models/mixers/) + the MLP 2 * 3 * D * F
  output          2 * D * V
Training = 3 x forward (backward = 2 x forward). Masked-out work (e.g. of blockwise attention) is
not counted: this is useful work, the numerator of MFU.
"""

from __future__ import annotations

import jax
from flax import nnx

from lmtrain.models.base_config import CoreConfig
from lmtrain.models.mixers import MIXERS
from lmtrain.models.model import LanguageModel


def count_params(cfg: CoreConfig) -> int:
    """Number of parameters of `LanguageModel(cfg)` (computed abstractly, nothing allocated)."""
    shapes = jax.eval_shape(lambda: nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def forward_flops_per_token(cfg: CoreConfig, seq_len: int) -> float:
    """Analytic forward FLOPs per token at training length `seq_len`."""
    mlp = 2 * 3 * cfg.width * cfg.mlp_width
    layers = sum(MIXERS[kind].flops_per_token(cfg, seq_len) + mlp for kind in cfg.layer_kinds)
    return layers + 2 * cfg.width * cfg.vocab_size


def train_flops_per_token(cfg: CoreConfig, seq_len: int) -> float:
    """Analytic forward + backward FLOPs per token."""
    return 3 * forward_flops_per_token(cfg, seq_len)
