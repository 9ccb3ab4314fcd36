"""Sampling from a `LanguageModel`: batched prefill, then a jitted decode loop over the model state.

    out = generate(model, [[257, 100, 101], [257, 9]], max_new_tokens=32, top_p=0.9, stop_ids=[258])
    out[0].tokens, out[0].reason                      # new ids (stop id excluded); "eos" | "stop" | "length"
    done = sample("runs/demo", ["def ", "import "], max_new_tokens=40, stop=["\\n\\n"])
    done[0].text                                      # the completion, cut before the first stop string

One batch is one compiled program (`jax.jit`) per (batch size, prompt-length bucket, max_new_tokens,
number of stop ids, watched or not): the prompts, left-padded to the bucket, go through the model in
one call (prefill); then a `jax.lax.while_loop` samples a token, feeds it back with the state and
repeats, until every row has hit a stop id or `max_new_tokens`. Sampling settings and the seed are
traced values, so changing them does not recompile.

Padding: a prompt of n tokens in a bucket of L sits at the right end of its row; the L - n pad tokens
before it get segment id 0 and the prompt segment id 1. By the state contract (see
`lmtrain.models.model`) every layer resets where the segment id changes, attention only sees keys of
the query's segment, and positions restart at 0 at the first prompt token: no pad reaches the state a
prompt leaves, and each row decodes exactly as it would alone. Left padding keeps the real tokens of
every row at the end of the stream, so windowed and global attention see the same keys at the same
distances as without padding.

Randomness: token i of prompt r draws from `fold_in(fold_in(key(seed), r), i)`, with r the prompt's
index in the request, so a prompt gets the same tokens whatever else shares its batch. All sampling
math is float32: logits / temperature, then top-k, then top-p (the nucleus of the top-k distribution:
the smallest set of most likely tokens whose probability reaches top_p), then a categorical draw.

Host callbacks (streaming, stop strings): with `callback=` the loop calls back to Python once per
generated position (an ordered `jax.experimental.io_callback`), handing the new token of every row;
the callback may answer which rows to stop. `sample` uses it to stream text and to end a row as soon
as its text contains a stop string. Without a callback the loop never leaves the device.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from lmtrain.errors import LmtrainError
from lmtrain.models import LanguageModel
from lmtrain.models.mixers import MIXERS

REASONS = ("running", "eos", "stop", "length")  # codes 0..3 of a row's finish reason


class SampleError(LmtrainError, ValueError):
    """Bad sampling input (settings, prompts, lengths); the message names the value and the limit."""


class SamplingParams(NamedTuple):
    """Sampling settings, traced (changing them does not recompile)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False

    def check(self) -> None:
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise SampleError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SampleError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SampleError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")

    def arrays(self) -> SamplingParams:
        return SamplingParams(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                              jnp.bool_(self.greedy))


class Generation(NamedTuple):
    """One prompt's new tokens (a stop id that ended it excluded) and why it ended."""

    tokens: list[int]
    reason: str  # "eos": a stop id; "stop": the callback (a stop string); "length": max_new_tokens


class Completion(NamedTuple):
    """One prompt's completion as text (cut before the first stop string), its tokens and why it ended."""

    prompt: str
    text: str
    tokens: list[int]
    reason: str


# ------------------------------------------------------------------------------------------ sampling
def row_keys(key: jax.Array, rows_B: jax.Array, step: jax.Array) -> jax.Array:
    """The key of each row at generated position `step`: fold_in(fold_in(key, row), step)."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows_B)


def sample_logits(logits_BxV: jax.Array, keys_B: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token of each row, int32 [B]: greedy, or a draw from softmax(logits / T) after top-k and top-p."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    temperature, top_k, top_p, greedy = params
    greedy = jnp.logical_or(greedy, temperature <= 0)
    scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
    vocab = logits_BxV.shape[-1]

    def plain(scaled_BxV: jax.Array) -> jax.Array:
        return jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)

    def filtered(scaled_BxV: jax.Array) -> jax.Array:  # in sorted order (descending), then mapped back
        order_BxV = jnp.argsort(-scaled_BxV, axis=-1, stable=True)
        sorted_BxV = jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1)
        rank_V = jnp.arange(vocab)
        keep_BxV = jnp.broadcast_to((top_k <= 0) | (rank_V < top_k), sorted_BxV.shape)
        sorted_BxV = jnp.where(keep_BxV, sorted_BxV, -jnp.inf)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
        keep_BxV = keep_BxV & (before_BxV < top_p)  # the top token always stays (0 < top_p)
        choice_B = jax.vmap(jax.random.categorical)(keys_B, jnp.where(keep_BxV, sorted_BxV, -jnp.inf))
        return jnp.take_along_axis(order_BxV, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)

    needs_filter = ((top_k > 0) & (top_k < vocab)) | (top_p < 1)
    drawn_B = jax.lax.cond(needs_filter, filtered, plain, scaled_BxV)
    return jnp.where(greedy, jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), drawn_B)


def decode_step(model: LanguageModel, state, tokens_B: jax.Array) -> tuple[jax.Array, object]:
    """One decode step: feed one token per row with the state -> (float32 logits [B, V], new state)."""
    logits_Bx1xV, state = model(tokens_B[:, None], state=state)
    return logits_Bx1xV[:, 0].astype(jnp.float32), state


# -------------------------------------------------------------------------------------- host calls
_CALLBACKS: dict[int, Callable] = {}  # handle -> the callback of a running `generate`
_HANDLES = itertools.count(1)
_LOCK = threading.Lock()


def _dispatch(handle: np.ndarray, step: np.ndarray, tokens_B: np.ndarray, new_B: np.ndarray) -> np.ndarray:
    """The one function compiled programs call back: routes to the callback registered under `handle`."""
    out = _CALLBACKS[int(handle)](int(step), np.asarray(tokens_B), np.asarray(new_B))
    stop_B = np.zeros(new_B.shape, bool) if out is None else np.asarray(out, bool).reshape(new_B.shape)
    return stop_B & new_B


# ------------------------------------------------------------------------------------------ the loop
def _generate(graphdef, params, tokens_BxL, segments_BxL, rows_B, key, sp: SamplingParams, stop_ids_S,
              handle, *, max_new: int, watch: bool):
    """Prefill + while_loop decode. Returns (tokens [B, max_new] (pad -1), lengths [B], reasons [B])."""
    model = nnx.merge(graphdef, params)
    b = tokens_BxL.shape[0]
    logits_BxLxV, state = model(tokens_BxL, segment_ids=segments_BxL)
    logits_BxV = logits_BxLxV[:, -1].astype(jnp.float32)

    def choose(i, logits_BxV, out_BxN, length_B, reason_B):
        """Samples position i of every running row; records it; asks the callback."""
        token_B = sample_logits(logits_BxV, row_keys(key, rows_B, i), sp)
        running_B = reason_B == 0
        eos_B = running_B & jnp.isin(token_B, stop_ids_S)
        new_B = running_B & ~eos_B
        out_BxN = out_BxN.at[:, i].set(jnp.where(new_B, token_B, -1))
        length_B = jnp.where(new_B, i + 1, length_B)
        reason_B = jnp.where(eos_B, 1, reason_B)
        if watch:
            stop_B = io_callback(_dispatch, jax.ShapeDtypeStruct((b,), jnp.bool_), handle, jnp.asarray(i, jnp.int32),
                                 token_B, new_B, ordered=True)
            reason_B = jnp.where(stop_B & new_B, 2, reason_B)
        return token_B, out_BxN, length_B, reason_B

    out_BxN = jnp.full((b, max_new), -1, jnp.int32)
    zeros_B = jnp.zeros((b,), jnp.int32)
    token_B, out_BxN, length_B, reason_B = choose(0, logits_BxV, out_BxN, zeros_B, zeros_B)

    def cond(carry):
        i, _, _, _, _, reason_B = carry
        return (i < max_new) & jnp.any(reason_B == 0)

    def body(carry):
        i, token_B, state, out_BxN, length_B, reason_B = carry
        logits_BxV, state = decode_step(model, state, token_B)
        token_B, out_BxN, length_B, reason_B = choose(i, logits_BxV, out_BxN, length_B, reason_B)
        return i + 1, token_B, state, out_BxN, length_B, reason_B

    carry = (jnp.int32(1), token_B, state, out_BxN, length_B, reason_B)
    _, _, _, out_BxN, length_B, reason_B = jax.lax.while_loop(cond, body, carry)
    return out_BxN, length_B, jnp.where(reason_B == 0, 3, reason_B)


_generate_jit = jax.jit(_generate, static_argnums=(0,), static_argnames=("max_new", "watch"))


def bucket_length(n: int) -> int:
    """Prefill length for a longest prompt of n tokens: a power of two >= 16 up to 1024, then a multiple of 1024
    (bounds the compilations to ~log2 of the prompt lengths, and the padding to < 2x or < 1024 tokens)."""
    if n <= 1024:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 1024) * 1024


def context_limit(model: LanguageModel) -> tuple[int, str] | None:
    """(tokens, model.<field>) of the tightest layer-kind limit on one row's context, or None if unbounded."""
    limits = [(MIXERS[k].max_call_len(model.cfg), MIXERS[k]) for k in dict.fromkeys(model.cfg.pattern)]
    limits = [(n, m) for n, m in limits if n is not None]
    if not limits:
        return None
    n, mixer = min(limits, key=lambda x: x[0])
    return n, f"model.{mixer.limit_field}"


def check_request(model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: SamplingParams) -> None:
    """Raises SampleError for settings or prompts `generate` cannot run (one line naming the fix)."""
    params.check()
    if max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise SampleError("no prompts given")
    vocab = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SampleError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's bos id)")
        if min(p) < 0 or max(p) >= vocab:
            raise SampleError(f"prompt {i} has token ids outside [0, {vocab}) (model.vocab_size)")
    limit = context_limit(model)
    if limit is not None:
        n = max(len(p) for p in prompts)
        if n + max_new_tokens > limit[0]:
            raise SampleError(f"a prompt of {n} tokens plus max_new_tokens {max_new_tokens} = {n + max_new_tokens} "
                              f"exceeds {limit[0]}, the longest context this model holds ({limit[1]}): shorten "
                              f"the prompt, lower max_new_tokens, or raise {limit[1]}")


def generate(model: LanguageModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
             stop_ids: Sequence[int] | None = None, rows: Sequence[int] | None = None,
             callback: Callable[[int, np.ndarray, np.ndarray], np.ndarray | None] | None = None,
             ) -> list[Generation]:
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens, all prompts in one batch.

    A row ends at the first token in `stop_ids` (excluded from its tokens; other rows go on), when the
    callback stops it, or after `max_new_tokens`. `temperature=0` or `greedy=True` takes the argmax.
    `rows` (default 0..B-1) are the prompts' indices for the random streams (see the module docstring).
    `callback(step, tokens_B, new_B)` runs on the host for every generated position `step`, in order:
    `tokens_B[r]` is row r's new token where `new_B[r]`; it may return a bool [B] of rows to stop now.
    """
    params = SamplingParams(float(temperature), int(top_k), float(top_p), bool(greedy))
    prompts = [list(map(int, p)) for p in prompts]
    check_request(model, prompts, max_new_tokens, params)
    b, n = len(prompts), max(len(p) for p in prompts)
    length = bucket_length(n)
    limit = context_limit(model)
    if limit is not None:
        length = min(length, limit[0])
    tokens = np.zeros((b, length), np.int32)
    segments = np.zeros((b, length), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, length - len(p):] = p
        segments[r, length - len(p):] = 1
    rows = np.arange(b, dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
    if rows.shape != (b,):
        raise SampleError(f"rows must give one index per prompt ({b}), got {rows.shape[0]}")
    stops = np.asarray(sorted(set(stop_ids or ())) or [-1], np.int32)
    graphdef, state = nnx.split(model)
    with _LOCK:
        handle = next(_HANDLES)
        if callback is not None:
            _CALLBACKS[handle] = callback
    try:
        out, lengths, reasons = _generate_jit(graphdef, state, tokens, segments, rows, jax.random.key(seed),
                                              params.arrays(), stops, np.int32(handle), max_new=int(max_new_tokens),
                                              watch=callback is not None)
        out, lengths, reasons = jax.device_get((out, lengths, reasons))
    finally:
        _CALLBACKS.pop(handle, None)
    return [Generation(out[r, :lengths[r]].tolist(), REASONS[reasons[r]]) for r in range(b)]


# ---------------------------------------------------------------------------------------------- text
def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` may still turn into a stop string or a complete character."""
    keep = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _TextWatcher:
    """Host side of the callback: decodes each row's tokens so far, streams the final part, finds stop strings."""

    def __init__(self, tokenizer, rows: Sequence[int], stops: Sequence[str],
                 stream: Callable[[int, str], None] | None):
        self.tok, self.rows, self.stops, self.stream = tokenizer, list(rows), [s for s in stops if s], stream
        self.ids: list[list[int]] = [[] for _ in self.rows]
        self.sent = [0] * len(self.rows)
        self.done = [False] * len(self.rows)

    def _emit(self, r: int, text: str) -> None:
        if self.stream is not None and len(text) > self.sent[r]:
            self.stream(self.rows[r], text[self.sent[r]:])
        self.sent[r] = max(self.sent[r], len(text))

    def __call__(self, step: int, tokens_B: np.ndarray, new_B: np.ndarray) -> np.ndarray:
        stop_B = np.zeros(len(self.rows), bool)
        for r in np.flatnonzero(new_B):
            if self.done[r]:
                continue
            self.ids[r].append(int(tokens_B[r]))
            text, hit = cut_at_stop(self.tok.decode(self.ids[r]), self.stops)
            if hit:
                self._emit(r, text)
                self.done[r] = stop_B[r] = True
            else:
                self._emit(r, text[:len(text) - _held_back(text, self.stops)])
        return stop_B

    def finish(self, r: int, text: str) -> None:
        self._emit(r, text)


def sample(run: str | Path | LanguageModel, prompts: Sequence[str], *, tokenizer=None, step: int | None = None,
           ema: bool = False, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, seed: int = 0, stop: Sequence[str] = (), add_bos: bool = True,
           batch_size: int = 16, stream: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Completes text prompts with a run (a workdir, loaded with `load_run`) or a model plus its tokenizer.

    Each prompt is `[bos] + encode(prompt)` (as training documents start; `add_bos=False` drops the
    bos), generation ends a row at eos, and the text is cut before the first stop string (a row
    stops as soon as its text contains one). Prompts run in batches of up to `batch_size`, grouped
    by length (in input order when streaming); the tokens of a prompt do not depend on the grouping.
    `stream(prompt_index, text)` is called with "" when a prompt's batch starts, then with each new
    piece of its completion as it becomes final (text held back while it may still begin a stop
    string or end inside a UTF-8 character); the pieces add up to `Completion.text`.
    """
    if isinstance(run, LanguageModel):
        model = run
        if tokenizer is None:
            raise SampleError("sample(model, ...) needs tokenizer=...; pass a workdir to use the run's own")
    else:
        from lmtrain.data.tokenizer import load_tokenizer
        from lmtrain.eval.load import load_run

        cfg, model, _ = load_run(run, step, ema=ema)
        tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
    if batch_size < 1:
        raise SampleError(f"batch_size must be >= 1, got {batch_size}")
    ids = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p) for p in prompts]
    params = SamplingParams(float(temperature), int(top_k), float(top_p), bool(greedy))
    check_request(model, ids, max_new_tokens, params)  # everything, before the first batch runs
    order = list(range(len(ids))) if stream else sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Completion | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i in rows if stream else ():
            stream(i, "")
        watcher = _TextWatcher(tokenizer, rows, stop, stream) if (stop or stream) else None
        gens = generate(model, [ids[i] for i in rows], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, stop_ids=[tokenizer.eos_id],
                        rows=rows, callback=watcher)
        for r, (i, g) in enumerate(zip(rows, gens)):
            text, hit = cut_at_stop(tokenizer.decode(g.tokens), stop)
            if watcher is not None:
                watcher.finish(r, text)
            out[i] = Completion(prompts[i], text, g.tokens, "stop" if hit else g.reason)
    return out  # type: ignore[return-value]


__all__ = ["Completion", "Generation", "SampleError", "SamplingParams", "bucket_length", "check_request",
           "context_limit", "cut_at_stop", "decode_step", "generate", "row_keys", "sample", "sample_logits"]
