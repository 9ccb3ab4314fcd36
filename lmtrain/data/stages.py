"""Continual-pretraining stages: from a step on, a new source mixture (with replay) and an LR re-warm."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.data.source_config import SourceConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A continual-pretraining stage: from `start_step` on, a new mixture (with replay) and an LR re-warm."""

    start_step: int = configlib.field(0, help="first step of the stage; > 0, increasing across stages "
                                      "(steps before the first stage use data.sources)")
    sources: tuple[SourceConfig, ...] = configlib.field(
        (), help="the stage's sources (a mixture, as data.sources); empty = keep the previous stage's")
    replay: float = configlib.field(
        0.0, help="fraction of rows drawn from the previous stage's sources (by their weights), in [0, 1)")
    lr: float = configlib.field(0.0, help="peak learning rate of the stage's re-warm; 0 = optimizer.lr")
    warmup_steps: int = configlib.field(0, help="steps of the linear re-warm from the lr the previous "
                                      "stage ended at to this stage's lr")
    min_lr_ratio: float = configlib.field(-1.0, help="the stage's final lr as a fraction of its peak; "
                                          "-1 = schedule.min_lr_ratio")

    def validate(self) -> None:
        rules = {  # field: (ok, requirement)
            "start_step": (self.start_step > 0, "> 0 (the stage's first step)"),
            "replay": (0.0 <= self.replay < 1.0, "in [0, 1)"),
            "lr": (self.lr >= 0, ">= 0 (0 = optimizer.lr)"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "min_lr_ratio": (self.min_lr_ratio == -1.0 or 0.0 <= self.min_lr_ratio <= 1.0,
                             "in [0, 1], or -1 for schedule.min_lr_ratio"),
        }
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise ConfigError(f"{name}: must be {requirement}, got {getattr(self, name)!r}")


def check_stages(stages: Sequence[StageConfig]) -> None:
    """Cross-stage checks: each stage valid, start steps strictly increasing."""
    for i, stage in enumerate(stages):
        try:
            stage.validate()
        except ConfigError as e:
            raise ConfigError(f"stages[{i}].{e}") from None
        if i and stage.start_step <= stages[i - 1].start_step:
            raise ConfigError(f"stages[{i}].start_step: must be > stages[{i - 1}].start_step "
                              f"({stages[i - 1].start_step}), got {stage.start_step}; list stages in order")
