"""Loss vs position far beyond the training length, in bounded memory, and state diagnostics.

    runner = ChunkRunner(model, chunk=256)            # one jitted chunk step, reused
    out = runner.run(inputs_BxL, targets_BxL)         # per-token NLL, greedy predictions, state norms
    result = evaluate_longctx(cfg, runner, length=16384, sequences=4)

Held-out documents of the run's split are concatenated (in file order, each `[bos, ..., eos]`, as
the packer lays them out) into `sequences` rows of `length` tokens. Each row is one context: no
state reset at document boundaries, positions count from the row's start. The rows are fed in
chunks of `chunk` tokens with the model state passed along (by the state contract of docs/models.md
this equals one long call), so only one chunk's activations are ever alive: memory is
O(batch x chunk), whatever the length. Recorded: the NLL of every token, mean NLL in position
buckets ([0,T), [T,2T), [2T,4T), ... with T the run's `data.seq_len`), a log-spaced loss curve for
the plot, and the L2 norm of every recurrent layer's state at each chunk end (state collapse or
explosion beyond T shows here).
The same tokens are also scored with the state restarted every T tokens (`loss_restart`): the
difference is the effect of the context beyond T, free of which text sits at which position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.config import Config, ConfigError
from lmtrain.data.pipeline import make_eval_iterator
from lmtrain.models import LanguageModel, ModelState
from lmtrain.models.layout import StateLayout
from lmtrain.models.loss import token_nll


class ChunkOutputs(NamedTuple):
    nll_BxL: np.ndarray  # float32: -log p(target) of every token
    pred_BxL: np.ndarray  # int32: greedy (argmax) prediction at every position
    state_norm_KxRxB: np.ndarray  # float32: |h| of each recurrent layer R (by depth) at the end of chunk K


def check_chunking(length: int, chunk: int) -> None:
    """Raises ValueError unless `length` is a positive multiple of `chunk`."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if length < 1 or length % chunk:
        up = max(1, math.ceil(length / chunk))
        down = length // chunk
        alternatives = f"{up * chunk} ({up} x {chunk})" + (f" or {down * chunk} ({down} x {chunk})" if down else "")
        raise ValueError(f"eval length {length} is not a multiple of the chunk size {chunk}: use a multiple of "
                         f"{chunk}, e.g. {alternatives}, or a chunk that divides {length}")


def state_norms(layout: StateLayout, state: ModelState) -> jax.Array:
    """L2 norm of every recurrent layer's state (all its channels): [num_recurrent_layers, batch], in depth
    order (`layout.layers`)."""
    rows = [jnp.sqrt(jnp.sum(jnp.square(h.astype(jnp.float32)).reshape(h.shape[0], -1), axis=-1))
            for _, _, h in layout.layers(state)]
    if not rows:
        return jnp.zeros((0, state.position_B.shape[0]), jnp.float32)
    return jnp.stack(rows)


@functools.partial(jax.jit, static_argnums=0)
def _chunk_step(graphdef: Any, params: Any, state: Any, inputs_BxC: jax.Array, targets_BxC: jax.Array) -> tuple:
    """One chunk: (NLL, argmax, state norms, new state). Jitted once per architecture and shape, so
    every checkpoint of a run (and every run of the same architecture) shares the compiled step."""
    model = nnx.merge(graphdef, params)
    logits_BxCxV, state = model(inputs_BxC, state=state)
    nll_BxC, _ = token_nll(logits_BxCxV, targets_BxC)
    pred_BxC = jnp.argmax(logits_BxCxV, axis=-1).astype(jnp.int32)
    return nll_BxC, pred_BxC, state_norms(StateLayout(model.cfg), state), state


class ChunkRunner:
    """Feeds [B, L] token rows to a model `chunk` tokens at a time, the state passed along.

    The chunk step is compiled once per (architecture, batch, chunk) and reused for every chunk,
    row batch, length and checkpoint.
    """

    def __init__(self, model: LanguageModel, chunk: int):
        check_chunking(chunk, chunk)
        self.model, self.chunk = model, chunk
        self.layers = [f"layer {depth} ({kind})"  # names of the state_norm rows
                       for depth, kind, _ in StateLayout(model.cfg).layers(model.init_state(1))]
        self._graphdef, params = nnx.split(model)
        # Everything on one device with one sharding, so the state a step returns has the same type as
        # the fresh one it got: one compilation serves every chunk.
        self._device = jax.devices()[0]
        self._params = jax.device_put(params, self._device)

    def run(self, inputs_BxL: np.ndarray, targets_BxL: np.ndarray) -> ChunkOutputs:
        """Per-token NLL, greedy predictions and per-chunk state norms of rows starting a fresh context."""
        inputs_BxL, targets_BxL = np.asarray(inputs_BxL, np.int32), np.asarray(targets_BxL, np.int32)
        if inputs_BxL.ndim != 2 or inputs_BxL.shape != targets_BxL.shape:
            raise ValueError(f"inputs and targets must both be [batch, length], got {inputs_BxL.shape} "
                             f"and {targets_BxL.shape}")
        b, length = inputs_BxL.shape
        check_chunking(length, self.chunk)
        state = jax.device_put(self.model.init_state(b), self._device)
        nll, pred, norms = [], [], []
        for start in range(0, length, self.chunk):
            sl = slice(start, start + self.chunk)
            nll_BxC, pred_BxC, norm_RxB, state = _chunk_step(self._graphdef, self._params, state,
                                                             inputs_BxL[:, sl], targets_BxL[:, sl])
            nll.append(np.asarray(nll_BxC))
            pred.append(np.asarray(pred_BxC))
            norms.append(np.asarray(norm_RxB))
        return ChunkOutputs(np.concatenate(nll, axis=1), np.concatenate(pred, axis=1), np.stack(norms))


# ----------------------------------------------------------------------------------------- buckets
def bucket_edges(train_length: int, length: int, multiples: Sequence[float] | None = None) -> list[int]:
    """Bucket boundaries in tokens: [0, T, 2T, 4T, ..., length] (doubling) or [0, m1*T, m2*T, ...].

    The last bucket ends at `length`; boundaries at or past `length` are dropped.
    """
    if multiples is None:
        edges, e = [0], train_length
        while e < length:
            edges.append(e)
            e *= 2
    else:
        if any(m <= 0 for m in multiples) or list(multiples) != sorted(set(multiples)):
            raise ValueError(f"bucket multiples must be positive and increasing, got {list(multiples)}")
        edges = [0] + [round(m * train_length) for m in multiples if round(m * train_length) < length]
    return edges + [length]


def bucket_means(nll_NxL: np.ndarray, mask_NxL: np.ndarray, edges: Sequence[int]) -> list[dict[str, Any]]:
    """Mean NLL over the masked tokens of each bucket [edges[i], edges[i+1]) (None if it has none)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = mask_NxL[:, lo:hi].astype(np.float64)
        count = float(m.sum())
        loss = float((nll_NxL[:, lo:hi] * m).sum() / count) if count else None
        out.append({"start": int(lo), "end": int(hi), "loss": loss, "tokens": int(count)})
    return out


def log_bins(length: int, per_octave: int = 4) -> list[int]:
    """Log-spaced bin edges over positions [0, length) for the loss curve: 0, 1, 2, ... length."""
    n = max(2, int(per_octave * math.log2(max(length, 2))) + 1)
    edges = np.unique(np.round(np.geomspace(1, length, n)).astype(int))
    return [0, *[int(e) for e in edges if 0 < e < length], length]


# ------------------------------------------------------------------------------------ evaluation
def heldout_rows(cfg: Config, length: int, sequences: int) -> dict[str, np.ndarray]:
    """`sequences` rows of `length` tokens of the run's held-out split, documents concatenated.

    Rows past the end of the held-out data are padded with loss_mask 0; raises if there is no data.
    """
    data = dataclasses.replace(cfg.data, seq_len=length, global_batch_size=sequences)
    batch = next(iter(make_eval_iterator(data, num_batches=1)))
    real = int(batch["loss_mask"].sum())
    if real == 0:
        raise ConfigError("the run's held-out split is empty; raise data.heldout_fraction in its config.yaml")
    return batch


def _run_rows(runner: ChunkRunner, inputs_NxL: np.ndarray, targets_NxL: np.ndarray,
              batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(nll_NxL, state_norm_KxRxN) over all rows, `batch` at a time (one compiled shape)."""
    n = len(inputs_NxL)
    nll, norms = np.zeros(inputs_NxL.shape, np.float32), []
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        pad = batch - (hi - lo)  # repeat the last row to keep the batch shape; dropped below
        take = lambda x, lo=lo, hi=hi, pad=pad: np.concatenate([x[lo:hi]] + [x[hi - 1:hi]] * pad)
        out = runner.run(take(inputs_NxL), take(targets_NxL))
        nll[lo:hi] = out.nll_BxL[:hi - lo]
        norms.append(out.state_norm_KxRxB[:, :, :hi - lo])
    return nll, np.concatenate(norms, axis=2)


def evaluate_longctx(cfg: Config, runner: ChunkRunner, length: int, sequences: int = 4, batch: int = 4,
                     bucket_multiples: Sequence[float] | None = None, restart: bool = True) -> dict[str, Any]:
    """Loss vs position and state norms on `sequences` held-out rows of `length` tokens (see module doc).

    With `restart`, the same tokens are also scored with the state restarted every T tokens (each
    T-window a fresh context, as in training): `loss_restart` per bucket. The difference isolates
    the effect of the context beyond T from the text that happens to sit at those positions.
    """
    check_chunking(length, runner.chunk)
    t = cfg.data.seq_len
    rows = heldout_rows(cfg, length, sequences)
    mask = rows["loss_mask"].astype(bool)
    nll, norm_KxRxN = _run_rows(runner, rows["inputs"], rows["targets"], batch)
    edges = bucket_edges(t, length, bucket_multiples)
    buckets, curve = bucket_means(nll, mask, edges), bucket_means(nll, mask, log_bins(length))
    restart_note = None
    if restart and length % t == 0 and t % runner.chunk == 0:
        windows = lambda x: x.reshape(-1, t)
        nll_restart = _run_rows(runner, windows(rows["inputs"]), windows(rows["targets"]), batch)[0]
        nll_restart = nll_restart.reshape(nll.shape)
        for out, edges_ in ((buckets, edges), (curve, log_bins(length))):
            for b, r in zip(out, bucket_means(nll_restart, mask, edges_)):
                b["loss_restart"] = r["loss"]
    elif restart:
        restart_note = (f"not computed: needs the length to be a multiple of T={t} and T a multiple of the "
                        f"chunk {runner.chunk}")
    counted = mask.sum()
    ends = [runner.chunk * (k + 1) for k in range(length // runner.chunk)]
    at_t = next((k for k, e in enumerate(ends) if e >= t), len(ends) - 1)
    layers = {}
    for r, name in enumerate(runner.layers):
        mean_K = norm_KxRxN[:, r, :].mean(axis=1)
        layers[name] = {"mean": mean_K.tolist(), "max": norm_KxRxN[:, r, :].max(axis=1).tolist(),
                        "end_over_train_length": float(mean_K[-1] / max(mean_K[at_t], 1e-30))}
    result = {
        "train_length": t, "length": length, "chunk": runner.chunk, "sequences": sequences,
        "tokens": int(counted), "complete_sequences": int(mask.all(axis=1).sum()),
        "mean_loss": float((nll * mask).sum() / max(counted, 1)),
        "buckets": buckets, "curve": curve,
        "state_norms": {"positions": ends, "norm_at": ends[at_t], "layers": layers},
    }
    if restart_note:
        result["restart"] = restart_note
    return result
