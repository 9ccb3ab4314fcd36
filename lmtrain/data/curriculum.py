"""Sequence-length curricula: the length and the number of rows of every optimizer step's batch.

    cur = Curriculum(data_cfg)
    cur.length_at(step)      # tokens per row at `step` (a bucket, <= data.seq_len)
    cur.rows_at(step)        # rows over all processes at `step`
    cur.shapes()             # every (rows, length) the run can produce: the train-step compilations

A schedule kind (one class each, registered in SCHEDULES) gives a raw length per step and every raw
length it can give; the curriculum rounds lengths up to a multiple of `bucket` (at most data.seq_len)
and turns them into rows by the batch mode:

    constant   length = seq_len
    staged     length = the first [until_step, length] stage with step < until_step (the last: forever)
    warmup     length = start + increment * floor((seq_len - start) * step / (warmup_steps * increment)),
               seq_len from step warmup_steps on
    mixture    length = lengths[i], i drawn with probabilities `weights` by an RNG seeded (seed, step)

    constant_tokens   rows = global_batch_size * seq_len / length
    fixed_batch       rows = global_batch_size
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal, Protocol

import numpy as np

from lmtrain import configlib
from lmtrain.configlib import ConfigError

_MIXTURE_TAG = 0x6C656E  # separates the length draws from the data's other seeded streams


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """The length (and number of rows) of each step's batch: a sequence-length curriculum."""

    kind: Literal["constant", "staged", "warmup", "mixture"] = configlib.field(
        "constant", help="constant: always data.seq_len; staged: `stages` of [until_step, length]; warmup: "
        "linear from start_length to data.seq_len over warmup_steps, in steps of `increment`; mixture: each "
        "step a random length from `lengths` with `weights`")
    batch_mode: Literal["constant_tokens", "fixed_batch"] = configlib.field(
        "constant_tokens", help="constant_tokens: rows = global_batch_size * seq_len / length, so every step "
        "has the same tokens; fixed_batch: rows = global_batch_size")
    bucket: int = configlib.field(
        64, help="lengths are rounded up to a multiple of this (at most data.seq_len), so a run compiles one "
        "step per distinct length; 1 keeps lengths as given")
    stages: tuple[tuple[int, ...], ...] = configlib.field(
        (), help="staged: [[until_step, length], ...], until_step increasing; stage i runs to its until_step "
        "(exclusive), the last one to the end of training")
    start_length: int = configlib.field(64, help="warmup: the length at step 0")
    increment: int = configlib.field(64, help="warmup: lengths grow in steps of this many tokens")
    warmup_steps: int = configlib.field(1000, help="warmup: steps to reach data.seq_len")
    lengths: tuple[int, ...] = configlib.field((), help="mixture: the lengths to draw from")
    weights: tuple[float, ...] = configlib.field(
        (), help="mixture: their probabilities (normalised; empty = uniform); drawn per step from (seed, step)")

    def validate(self) -> None:
        if self.bucket < 1:
            raise ConfigError(f"bucket: must be >= 1, got {self.bucket}")


class CurriculumInputs(Protocol):
    """What a curriculum reads of its data config (data.config.DataConfig has these fields)."""

    @property
    def curriculum(self) -> CurriculumConfig: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def global_batch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...


def _check_lengths(name: str, lengths: tuple[int, ...], seq_len: int) -> None:
    for length in lengths:
        if not 1 <= length <= seq_len:
            raise ConfigError(f"curriculum.{name}: lengths must be in [1, data.seq_len={seq_len}] (seq_len is the "
                              f"longest length), got {length}")


@dataclasses.dataclass(frozen=True)
class Constant:
    fields: ClassVar[tuple[str, ...]] = ()
    cfg: CurriculumConfig
    seq_len: int
    seed: int

    def length(self, step: int) -> int:
        return self.seq_len

    def lengths(self) -> tuple[int, ...]:
        return (self.seq_len,)


@dataclasses.dataclass(frozen=True)
class Staged(Constant):
    fields: ClassVar[tuple[str, ...]] = ("stages",)

    def __post_init__(self):
        stages = self.cfg.stages
        if not stages or any(len(stage) != 2 for stage in stages):
            raise ConfigError(f"curriculum.stages: kind staged needs [[until_step, length], ...], "
                              f"e.g. [[1000, 128], [3000, 256]]; got {[list(s) for s in stages]}")
        _check_lengths("stages", tuple(length for _, length in stages), self.seq_len)
        ends = [until for until, _ in stages]
        if ends[0] <= 0 or any(b <= a for a, b in zip(ends, ends[1:])):
            raise ConfigError(f"curriculum.stages: until_step must be > 0 and strictly increasing, got {ends}")

    def length(self, step: int) -> int:
        return next((length for until, length in self.cfg.stages if step < until), self.cfg.stages[-1][1])

    def lengths(self) -> tuple[int, ...]:
        return tuple(length for _, length in self.cfg.stages)


@dataclasses.dataclass(frozen=True)
class Warmup(Constant):
    fields: ClassVar[tuple[str, ...]] = ("start_length", "increment", "warmup_steps")

    def __post_init__(self):
        c = self.cfg
        _check_lengths("start_length", (c.start_length,), self.seq_len)
        if c.increment < 1 or c.warmup_steps < 1:
            raise ConfigError(f"curriculum.increment and curriculum.warmup_steps: must be >= 1, got "
                              f"{c.increment} and {c.warmup_steps}")

    def length(self, step: int) -> int:
        c = self.cfg
        if step >= c.warmup_steps:
            return self.seq_len
        return min(self.seq_len, c.start_length + c.increment * (
            (self.seq_len - c.start_length) * step // (c.warmup_steps * c.increment)))

    def lengths(self) -> tuple[int, ...]:
        return (*range(self.cfg.start_length, self.seq_len, self.cfg.increment), self.seq_len)


@dataclasses.dataclass(frozen=True)
class Mixture(Constant):
    fields: ClassVar[tuple[str, ...]] = ("lengths", "weights")

    def __post_init__(self):
        c = self.cfg
        if not c.lengths:
            raise ConfigError("curriculum.lengths: kind mixture needs lengths to draw from, e.g. [128, 256, 512]")
        _check_lengths("lengths", c.lengths, self.seq_len)
        if c.weights and (len(c.weights) != len(c.lengths) or min(c.weights) < 0 or sum(c.weights) <= 0):
            raise ConfigError(f"curriculum.weights: need one weight >= 0 per length ({len(c.lengths)}), not all "
                              f"0, or none for uniform; got {list(c.weights)}")

    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.cfg.weights or [1.0] * len(self.cfg.lengths), np.float64)
        return w / w.sum()

    def length(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, _MIXTURE_TAG, step])
        return int(self.cfg.lengths[rng.choice(len(self.cfg.lengths), p=self.probabilities())])

    def lengths(self) -> tuple[int, ...]:
        return tuple(length for length, p in zip(self.cfg.lengths, self.probabilities()) if p > 0)


SCHEDULES: dict[str, type[Constant]] = {"constant": Constant, "staged": Staged, "warmup": Warmup,
                                        "mixture": Mixture}


class Curriculum:
    """The (rows, length) of every step of a run with data config `cfg` (raises ConfigError if invalid)."""

    def __init__(self, cfg: CurriculumInputs):
        c = cfg.curriculum
        defaults = CurriculumConfig()
        for kind, schedule in SCHEDULES.items():
            stray = [f for f in schedule.fields if kind != c.kind and f not in SCHEDULES[c.kind].fields
                     and getattr(c, f) != getattr(defaults, f)]
            if stray:
                raise ConfigError(f"curriculum.{stray[0]}: set, but only kind {kind} uses it (kind is {c.kind})")
        self.schedule = SCHEDULES[c.kind](c, cfg.seq_len, cfg.seed)
        self.seq_len, self.bucket, self.batch_mode = cfg.seq_len, c.bucket, c.batch_mode
        self.global_batch_size = cfg.global_batch_size
        tokens = cfg.global_batch_size * cfg.seq_len
        if self.batch_mode == "constant_tokens":
            for length in self.buckets():
                if tokens % length:
                    raise ConfigError(
                        f"curriculum.batch_mode: constant_tokens needs global_batch_size * seq_len ({tokens}) to be "
                        f"a multiple of every length, but {length} is not a divisor; use lengths (and bucket) "
                        f"that divide it, e.g. powers of two, or batch_mode: fixed_batch")

    def _round(self, length: int) -> int:
        return min(self.seq_len, math.ceil(length / self.bucket) * self.bucket)

    def length_at(self, step: int) -> int:
        """Tokens per row at `step`."""
        return self._round(self.schedule.length(step))

    def rows_for(self, length: int) -> int:
        if self.batch_mode == "fixed_batch":
            return self.global_batch_size
        return self.global_batch_size * self.seq_len // length

    def rows_at(self, step: int) -> int:
        """Rows at `step` over all processes (each process makes rows_at(step) / process_count)."""
        return self.rows_for(self.length_at(step))

    def buckets(self) -> tuple[int, ...]:
        """Every length the run can produce, ascending."""
        return tuple(sorted({self._round(length) for length in self.schedule.lengths()}))

    def shapes(self) -> tuple[tuple[int, int], ...]:
        """Every global (rows, length) batch shape the run can produce, by ascending length."""
        return tuple((self.rows_for(length), length) for length in self.buckets())

    def check_processes(self, process_count: int) -> None:
        """Every step's rows must split evenly over `process_count` processes."""
        for rows, length in self.shapes():
            if rows % process_count:
                raise ConfigError(f"global_batch_size={self.global_batch_size} gives {rows} rows at length {length}, "
                                  f"which is not divisible by process_count={process_count}")


def check(cfg: CurriculumInputs) -> None:
    """Config-time checks of `cfg.curriculum` against the rest of `cfg` (raises ConfigError)."""
    Curriculum(cfg)
