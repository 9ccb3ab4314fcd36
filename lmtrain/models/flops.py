"""Accounting: parameter count and analytic training FLOPs per token (for tokens/s -> MFU).

Forward FLOPs per token (a multiply-add = 2 FLOPs), D width, F MLP width, L lru width, H heads
of dim Hd, K kv heads, C conv width, V vocab:
  MLP (every layer)        2 * 3 * D * F
  R  projections           2 * (2 * D * L + L * D) ; gates 2 * 2 * L * L / H ; conv 2 * C * L ; scan 2 * L
  A/G projections          2 * (D * H * Hd + 2 * D * K * Hd + H * Hd * D)
  A/G scores and mixing    2 * 2 * H * Hd * ctx,  ctx = mean over positions t < T of min(t, W) + 1
  output projection        2 * D * V
Training = 3 x forward (backward = 2 x forward). Masked-out work done by blockwise attention is not
counted: this is useful work, the numerator of MFU.
"""

from __future__ import annotations

import jax
from flax import nnx

from lmtrain.models.config import ModelConfig


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of `LanguageModel(cfg)` (computed abstractly, nothing allocated)."""
    from lmtrain.models.model import LanguageModel

    shapes = jax.eval_shape(lambda: nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def mean_context(seq_len: int, span: int) -> float:
    """Average number of keys a query attends to: mean over t < seq_len of min(t, span) + 1."""
    full = min(seq_len, span + 1)  # positions t <= span see t + 1 keys
    return (full * (full + 1) / 2 + (seq_len - full) * (span + 1)) / seq_len


def _mixer_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    d, lw, h, hd, kv = cfg.width, cfg.resolved_lru_width, cfg.num_heads, cfg.resolved_head_dim, cfg.num_kv_heads
    if kind == "R":
        return 2 * (3 * d * lw) + 2 * 2 * lw * lw / h + 2 * cfg.conv_width * lw + 2 * lw
    span = cfg.window if kind == "A" else cfg.max_len
    proj = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d)
    return proj + 2 * 2 * h * hd * mean_context(seq_len, span)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Analytic forward FLOPs per token at training length `seq_len`."""
    mlp = 2 * 3 * cfg.width * cfg.mlp_width
    layers = sum(_mixer_flops(cfg, kind, seq_len) + mlp for kind in cfg.layer_kinds)
    return layers + 2 * cfg.width * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Analytic forward + backward FLOPs per token."""
    return 3 * forward_flops_per_token(cfg, seq_len)
