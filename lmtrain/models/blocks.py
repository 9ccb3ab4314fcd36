"""Residual block `x + mixer(norm(x))`, then `x + MLP(norm(x))`; the mixer comes from the registry."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models.base_config import CoreConfig
from lmtrain.models.layers import MLP, RMSNorm
from lmtrain.models.mixers import MIXERS
from lmtrain.models.state import SeqContext


class ResidualBlock(nnx.Module):
    """One layer: temporal mixer of kind `kind` and a gated-GELU MLP, each pre-normed."""

    def __init__(self, cfg: CoreConfig, kind: str, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm_kw = dict(rngs=rngs, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer_norm = RMSNorm(cfg.width, **norm_kw)
        self.mixer = MIXERS[kind](cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.width, **norm_kw)
        self.mlp = MLP(cfg.width, cfg.mlp_width, rngs=rngs, out_init_scale=2.0 / cfg.num_layers,
                       dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x_BxTxD: jax.Array, ctx: SeqContext, state: Any) -> tuple[jax.Array, Any]:
        y_BxTxD, state = self.mixer(self.mixer_norm(x_BxTxD), ctx, state)
        x_BxTxD = x_BxTxD + y_BxTxD
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), state
