"""Train state, loss, and the jitted train / eval steps with explicit shardings.

The train state is a pytree (`TrainState`) of arrays: parameters as a pure nested dict, optax
state, step, RNG key, optional EMA, and the count of consecutive skipped (non-finite) steps.
`Trainer` builds the model's graph once, derives every sharding from the logical-axis rules, and
jits one step with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.config import Config
from lmtrain.models import LanguageModel
from lmtrain.sharding import logical_to_spec, use_rules
from lmtrain.train import mesh as mesh_lib
from lmtrain.train.optimizer import ema_update, grad_norms, make_optimizer, make_schedule, opt_state_specs

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
NORM_GROUP_DEPTH = 3  # e.g. "groups/0/mixer": fine enough to name an offending parameter group


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # pure nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any
    rng: jax.Array
    ema: Any  # same structure as params, or None
    skipped: jax.Array  # consecutive non-finite steps


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses incl. z-loss, sum of masked token NLL); float32."""
    logits = logits_BxTxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum((nll + z_loss * jnp.square(log_z)) * mask), jnp.sum(nll * mask)


class Trainer:
    """Holds the model graph, optimizer, mesh and shardings; builds and compiles the steps."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh, self.rules = cfg, mesh, cfg.mesh.rules
        abstract_model = nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_vars = nnx.split(abstract_model)
        abstract_vars = self.abstract_vars
        self.param_specs = nnx.to_pure_dict(mesh_lib.param_specs(abstract_vars, self.rules, mesh))
        self.abstract_params = nnx.to_pure_dict(abstract_vars)
        self.tx = make_optimizer(cfg.optimizer, cfg.schedule, cfg.train.steps)
        self.lr_schedule = make_schedule(cfg.optimizer, cfg.schedule, cfg.train.steps)
        named = lambda spec: NamedSharding(mesh, spec)
        replicated = named(PartitionSpec())
        param_sh = jax.tree.map(named, self.param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        opt_specs = opt_state_specs(self.tx, self.abstract_params, self.param_specs, PartitionSpec())
        opt_sh = jax.tree.map(named, opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.state_sharding = TrainState(replicated, param_sh, opt_sh, replicated,
                                         param_sh if cfg.optimizer.ema_decay else None, replicated)
        self.batch_sharding = named(logical_to_spec(("batch", "length"), self.rules))
        self._train_step = jax.jit(self._step, in_shardings=(self.state_sharding, self.batch_sharding),
                                   out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
        self._eval_step = jax.jit(self._eval, in_shardings=(param_sh, self.batch_sharding),
                                  out_shardings=replicated)

    # ------------------------------------------------------------------------------------ init
    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly with their shardings."""

        @functools.partial(jax.jit, out_shardings=self.state_sharding)
        def init() -> TrainState:
            model = LanguageModel(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
            params = nnx.to_pure_dict(nnx.state(model))
            ema = params if self.cfg.optimizer.ema_decay else None
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                              jax.random.key_data(jax.random.key(self.cfg.train.seed)), ema,
                              jnp.zeros((), jnp.int32))

        with use_rules(self.mesh, self.rules):
            return init()

    def abstract_state(self) -> TrainState:
        """The train state's shapes, dtypes and shardings (the restore target)."""
        shapes = jax.eval_shape(self.init_state)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_sharding)

    def model(self, params: Any) -> LanguageModel:
        """An nnx model holding pure `params` (works on concrete arrays and inside jit)."""
        variables = jax.tree.map(lambda x: x, self.abstract_vars)  # a fresh copy to fill in
        nnx.replace_by_pure_dict(variables, params)
        return nnx.merge(self.graphdef, variables)

    # ------------------------------------------------------------------------------------ loss
    def _loss(self, params: Any, batch: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        model = self.model(params)
        logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        total, nll = cross_entropy(logits, batch["targets"], batch["loss_mask"], self.cfg.train.z_loss)
        count = jnp.sum(batch["loss_mask"]).astype(jnp.float32)
        return total, (nll, count)

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        accum = self.cfg.train.grad_accum
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        with use_rules(self.mesh, self.rules):
            if accum == 1:
                (total, (nll, count)), grads = grad_fn(state.params, batch)
            else:  # sequential microbatches, gradients summed then normalised by the token count
                # Microbatch i takes rows i, i + accum, ...: every device keeps an equal share of each
                # microbatch in place (contiguous chunks would sit on a subset of the data-parallel
                # devices and be resharded every iteration).
                micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

                def body(carry, mb):
                    (t, (n, c)), g = grad_fn(state.params, mb)
                    return jax.tree.map(jnp.add, carry, (t, n, c, g)), None

                zeros = (0.0, 0.0, 0.0, jax.tree.map(jnp.zeros_like, state.params))
                (total, nll, count, grads), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        gnorm, group = grad_norms(grads, depth=NORM_GROUP_DEPTH)
        finite = jnp.isfinite(total) & jnp.isfinite(gnorm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            ema = keep(ema_update(ema, params, self.cfg.optimizer.ema_decay), ema)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng, ema,
                               jnp.where(finite, 0, state.skipped + 1))
        metrics = {"loss": nll / denom, "grad_norm": gnorm, "finite": finite, "tokens": count,
                   "lr": self.lr_schedule(state.step), "group_norms": group}
        return new_state, metrics

    def _eval(self, params: Any, batch: dict) -> dict:
        with use_rules(self.mesh, self.rules):
            _, (nll, count) = self._loss(params, batch)
        return {"nll_sum": nll, "tokens": count}

    # ------------------------------------------------------------------------------------- api
    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._train_step(state, batch)

    def eval_step(self, params: Any, batch: dict) -> dict:
        return self._eval_step(params, batch)

    def compiled_memory(self, local_batch: dict) -> Any:
        """`memory_analysis()` of the compiled train step for batches shaped like `local_batch`."""
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in local_batch.items()}
        return self._train_step.lower(self.abstract_state(), batch).compile().memory_analysis()
