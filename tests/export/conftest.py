"""Fixtures: tiny run directories and models with random parameters (every leaf moved off its initial value:
no zero biases, no unit norm scales, so a mis-mapped or transposed leaf shows in the logits)."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.config import load_config
from lmtrain.configlib import updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.run import prepare_workdir
from lmtrain.train.checkpoint import Checkpointer

CONFIG = Path(__file__).parents[2] / "configs" / "demo.yaml"
# Width 64: sqrt(64) = 8 is exact in bfloat16, the embedding scale HF and recurrentgemma apply. Four layers:
# one RRA group (stacked) plus an R tail. Window 8 < the 20-token test sequences.
TINY = ["model.width=64", "model.num_layers=4", "model.rglru.num_heads=4", "model.attention.num_heads=4",
        "model.attention.window=8", "model.mlp_expansion=2", "data.seq_len=16", "data.global_batch_size=2",
        "train.steps=2", "schedule.warmup_steps=1", "checkpoint.async_save=false", "mesh.data=1", "mesh.fsdp=1",
        "mesh.tensor=1"]


def random_model(cfg: ModelConfig | dict, seed: int = 0) -> LanguageModel:
    """A LanguageModel of `cfg` (or of ModelConfig() updated by a dict) with random parameters, built abstract
    first so nothing is initialised twice."""
    cfg = updated(ModelConfig(), cfg) if isinstance(cfg, dict) else cfg
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        scale = 1.0 if "a_param" in name else 0.3 if "conv" in name else 0.2
        offset = -2.0 if "a_param" in name else 0.0  # softplus(a_param) near 0.13: varied decays
        return jnp.asarray(offset + scale * rng.standard_normal(x.shape), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def params_of(model: LanguageModel) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_run(workdir: Path, overrides=(), steps=(1, 2)) -> Path:
    """WORKDIR/config.yaml plus checkpoints at `steps` holding random parameters (and EMA = params + 1).

    Only the "params" and "ema" entries of a train state are written: `load_run` reads nothing else, and a
    whole `Trainer` state (optimizer included) takes ~30 s to build on two cores."""
    cfg = load_config(CONFIG, [*TINY, *overrides, f"workdir={workdir}"])
    prepare_workdir(cfg)
    params = params_of(random_model(cfg.model))
    state = {"params": params, "ema": jax.tree.map(lambda x: x + 1.0, params)}
    with Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint) as ckpt:
        for step in steps:
            ckpt.maybe_save(step, state, {}, force=True)
    return workdir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """An RRA run with the byte tokenizer and EMA, checkpoints at steps 1 and 2."""
    return make_run(tmp_path_factory.mktemp("runs") / "griffin", ["optimizer.ema_decay=0.9"])


def tokens(batch: int = 2, length: int = 20, vocab: int = 259, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxT):
    return nnx.merge(graphdef, state)(tokens_BxT)[0]


def logits(model: LanguageModel, tokens_BxT) -> np.ndarray:
    """Our float32 logits of one document per row (state=None: token 0 starts it); one compilation per
    model structure and shape."""
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens_BxT)))
