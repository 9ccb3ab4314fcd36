"""Train state, loss, and the jitted train / eval steps with explicit shardings.

The train state is a pytree (`TrainState`) of arrays: parameters as a pure nested dict, optax
state, step, RNG key, optional EMA, and the count of consecutive skipped (non-finite) steps.
`Trainer` builds the model's graph once, derives every sharding from the logical-axis rules, and
jits one step with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.data.batch import Batch
from lmtrain.data.config import DataConfig, StageConfig
from lmtrain.models import LanguageModel, ModelConfig, ModelState
from lmtrain.models.layout import StateLayout
from lmtrain.models.loss import chunked_cross_entropy, cross_entropy
from lmtrain.models.state import map_with_axes
from lmtrain.sharding import logical_to_spec, use_rules
from lmtrain.train import interventions as iv
from lmtrain.train import mesh as mesh_lib
from lmtrain.train.config import TrainConfig
from lmtrain.train.mesh import MeshConfig
from lmtrain.train.optimizer import (
    OptimizerConfig,
    ScheduleConfig,
    ema_update,
    grad_norms,
    make_optimizer,
    make_schedule,
    opt_state_specs,
)

NORM_GROUP_DEPTH = 3  # e.g. "groups/0/mixer": fine enough to name an offending parameter group


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # pure nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any
    rng: jax.Array
    ema: Any  # same structure as params, or None
    skipped: jax.Array  # consecutive non-finite steps
    carry: Any = None  # ModelState: the last step's final state [global batch] (state_passing, tbptt), or None
    stats: Any = None  # interventions.StateStats of final recurrent states (fitted_noise), or None


class RunSections(Protocol):
    """The config sections a Trainer reads (the run's `lmtrain.config.Config` has them all)."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    mesh: MeshConfig
    train: TrainConfig
    stages: tuple[StageConfig, ...]


def split_rows(x: jax.Array, axis: int, accum: int) -> jax.Array:
    """Rows i * accum + j on `axis` to microbatch j: [..B..] -> [accum, ..B/accum..]."""
    x = x.reshape(x.shape[:axis] + (-1, accum) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def merge_rows(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `split_rows`: [accum, ..B/accum..] -> [..B..]."""
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class Trainer:
    """Holds the model graph, optimizer, mesh and shardings; builds and compiles the steps."""

    def __init__(self, cfg: RunSections, mesh: Mesh):
        self.cfg, self.mesh, self.rules = cfg, mesh, cfg.mesh.rules
        abstract_model = nnx.eval_shape(lambda: LanguageModel(cfg.model, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_vars = nnx.split(abstract_model)
        abstract_vars = self.abstract_vars
        self.param_specs = nnx.to_pure_dict(mesh_lib.param_specs(abstract_vars, self.rules, mesh))
        self.abstract_params = nnx.to_pure_dict(abstract_vars)
        self.tx = make_optimizer(cfg.optimizer, cfg.schedule, cfg.train.steps, cfg.stages)
        self.lr_schedule = make_schedule(cfg.optimizer, cfg.schedule, cfg.train.steps, cfg.stages)
        named = lambda spec: NamedSharding(mesh, spec)
        replicated = named(PartitionSpec())
        param_sh = jax.tree.map(named, self.param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        opt_specs = opt_state_specs(self.tx, self.abstract_params, self.param_specs, PartitionSpec())
        opt_sh = jax.tree.map(named, opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.interventions = cfg.train.interventions
        self.extras_configured = (iv.needs_carry(self.interventions), iv.needs_stats(self.interventions))
        self.layout = StateLayout(cfg.model)
        carry, stats = jax.eval_shape(lambda: self._extras(True))  # shapes whether configured or not
        self._any_extras = (self.state_shardings(carry), jax.tree.map(lambda _: replicated, stats))
        carry_sh, stats_sh = (sh if on else None for sh, on in zip(self._any_extras, self.extras_configured))
        self.state_sharding = TrainState(replicated, param_sh, opt_sh, replicated,
                                         param_sh if cfg.optimizer.ema_decay else None, replicated,
                                         carry_sh, stats_sh)
        self.batch_sharding = named(logical_to_spec(("batch", "length"), self.rules))
        self._train_step = jax.jit(self._step, in_shardings=(self.state_sharding, self.batch_sharding),
                                   out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
        self._eval_step = jax.jit(self._eval, in_shardings=(param_sh, self.batch_sharding),
                                  out_shardings=replicated)

    def state_shardings(self, state: ModelState) -> ModelState:
        """Shardings of a model state (e.g. the carry) from its leaves' logical axes and the rules."""
        def sharding(axes: tuple, leaf: Any) -> NamedSharding:
            spec = mesh_lib.fit_spec(logical_to_spec(axes, self.rules), leaf.shape, self.mesh, name="model state")
            return NamedSharding(self.mesh, spec)

        return map_with_axes(sharding, self.layout.axes, state)

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
                              jnp.zeros((), jnp.int32), *self._extras())

        with use_rules(self.mesh, self.rules):
            return init()

    def _extras(self, all_: bool = False) -> tuple[ModelState | None, iv.StateStats | None]:
        """(carry, stats) at the start of training: zero states [global batch] and statistics; None where
        the interventions do not use them (unless `all_`)."""
        model = nnx.merge(self.graphdef, self.abstract_vars)  # init_state needs no parameter values
        use_carry, use_stats = (True, True) if all_ else self.extras_configured
        carry = model.init_state(self.cfg.data.global_batch_size) if use_carry else None
        stats = iv.init_stats(self.layout, model.init_state(1)) if use_stats else None
        return carry, stats

    def fresh_extras(self) -> tuple[ModelState | None, iv.StateStats | None]:
        """`_extras` created with their shardings (for a checkpoint written before they were configured)."""
        shardings = (self.state_sharding.carry, self.state_sharding.stats)
        with use_rules(self.mesh, self.rules):
            return jax.jit(self._extras, out_shardings=shardings)()

    def restore_target(self, carry: bool, stats: bool) -> TrainState:
        """`abstract_state()` with the carry / statistics present as given (a checkpoint's own layout)."""
        target = self.abstract_state()
        shapes = jax.eval_shape(lambda: self._extras(True))
        abstract = [jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), x, sh)
                    if on else None for x, sh, on in zip(shapes, self._any_extras, (carry, stats))]
        return target._replace(carry=abstract[0], stats=abstract[1])

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
    def _loss(self, params: Any, batch: Batch, state0: ModelState | None = None
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, ModelState]]:
        """(loss sum incl. z-loss, (NLL sum, token count, final model state)) from initial state `state0`."""
        model, train = self.model(params), self.cfg.train
        hidden, final = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                                     state=state0)
        if train.loss_chunk:  # fused output projection + cross-entropy, never the whole [B, T, V] logits
            total, nll = chunked_cross_entropy(hidden, model.embedder.embedding[...], batch["targets"],
                                               batch["loss_mask"], softcap=self.cfg.model.logit_softcap,
                                               chunk=train.loss_chunk, z_loss=train.z_loss)
        else:
            total, nll = cross_entropy(model.logits(hidden), batch["targets"], batch["loss_mask"], train.z_loss)
        count = jnp.sum(batch["loss_mask"]).astype(jnp.float32)
        return total, (nll, count, final)

    def _initial_state(self, state: TrainState, batch: Batch) -> tuple[ModelState | None, dict]:
        """This step's initial model state from the interventions (None without any), and metrics."""
        if not self.interventions:
            return None, {}
        rows = batch["inputs"].shape[0]
        inputs = iv.Inputs(self.layout, self.model(state.params).init_state(rows), batch["segment_ids"][:, 0],
                           state.carry, state.stats)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        state0, touched_B = iv.initial_state(self.interventions, inputs, state.step, rng)
        return state0, {"intervened_rows": jnp.mean(touched_B.astype(jnp.float32))}

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        accum = self.cfg.train.grad_accum
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        with use_rules(self.mesh, self.rules):
            state0, extra = self._initial_state(state, batch)
            if accum == 1:
                (total, (nll, count, final)), grads = grad_fn(state.params, batch, state0)
            else:  # sequential microbatches, gradients summed then normalised by the token count
                # Microbatch i takes rows i, i + accum, ...: every device keeps an equal share of each
                # microbatch in place (contiguous chunks would sit on a subset of the data-parallel
                # devices and be resharded every iteration).
                def body(carry, xs):
                    mb, s0 = xs
                    (t, (n, c, f)), g = grad_fn(state.params, mb, s0)
                    return jax.tree.map(jnp.add, carry, (t, n, c, g)), f

                zeros = (0.0, 0.0, 0.0, jax.tree.map(jnp.zeros_like, state.params))
                split = lambda axis, x: split_rows(x, axis, accum)
                xs = ({k: split(0, v) for k, v in batch.items()},
                      None if state0 is None else self.layout.map_rows(split, state0))
                (total, nll, count, grads), finals = jax.lax.scan(body, zeros, xs)
                final = self.layout.map_rows(lambda axis, x: merge_rows(x, axis), finals)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        gnorm, group = grad_norms(grads, depth=NORM_GROUP_DEPTH)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The update itself must be finite too (a finite gradient times an infinite learning rate is not).
        finite = jnp.isfinite(total) & jnp.isfinite(gnorm) & _all_finite((params, opt_state))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            ema = keep(ema_update(ema, params, self.cfg.optimizer.ema_decay), ema)
        final = jax.lax.stop_gradient(final)
        carry = None if state.carry is None else final
        stats = state.stats
        if stats is not None:
            stats = keep(iv.update_stats(self.layout, stats, final, iv.stats_decay(self.interventions)), stats)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng, ema,
                               jnp.where(finite, 0, state.skipped + 1), carry, stats)
        metrics = {"loss": nll / denom, "grad_norm": gnorm, "finite": finite, "tokens": count,
                   "lr": self.lr_schedule(state.step), "group_norms": group,
                   "state_rms": iv.state_rms(self.layout, final), **extra}
        return new_state, metrics

    def _eval(self, params: Any, batch: Batch) -> dict:
        with use_rules(self.mesh, self.rules):
            _, (nll, count, _) = self._loss(params, batch)
        return {"nll_sum": nll, "tokens": count}

    # ------------------------------------------------------------------------------------- api
    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        return self._train_step(state, batch)

    def eval_step(self, params: Any, batch: Batch) -> dict:
        return self._eval_step(params, batch)

    def compiled_memory(self, local_batch: dict) -> Any:
        """`memory_analysis()` of the compiled train step for batches shaped like `local_batch`."""
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in local_batch.items()}
        return self._train_step.lower(self.abstract_state(), batch).compile().memory_analysis()
