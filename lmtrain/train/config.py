"""Config sections of the training loop itself: `TrainConfig` and `EvalConfig`."""

from __future__ import annotations

import dataclasses

from lmtrain.configlib import ConfigError, field
from lmtrain.train.interventions import InterventionConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of the run, determinism, loss extras, and what to do with non-finite steps."""

    steps: int = field(1000, "Total optimizer steps of the run.")
    seed: int = field(0, "Seed of parameter initialisation and of the per-step RNG.")
    grad_accum: int = field(1, "Microbatches per step: the global batch is split into this many "
                               "sequential microbatches whose gradients are averaged.")
    z_loss: float = field(0.0, "Weight of the z-loss (mean log(Z)^2 of the softmax normaliser); 0 = off.")
    max_skipped_steps: int = field(
        5, "Non-finite loss or gradients skip the update; after this many consecutive skips the run "
           "stops with a diagnostic naming the step and the offending parameter group.")
    loss_chunk: int = field(256, "Positions per chunk of the fused output projection + cross-entropy "
                                 "(lmtrain.models.loss), which never forms the whole [B, T, V] logits; 0 = plain "
                                 "logits then cross-entropy.")
    interventions: tuple[InterventionConfig, ...] = field(
        (), "Initial-state interventions for length generalization (a list; see docs/length_generalization.md), "
            "e.g. [{kind: state_passing, start_step: 900}].")

    def validate(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0:
            raise ConfigError(f"steps and grad_accum must be positive, got {self.steps}, {self.grad_accum}")
        if self.max_skipped_steps < 0 or self.z_loss < 0 or self.loss_chunk < 0:
            raise ConfigError("max_skipped_steps, z_loss and loss_chunk must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation on the held-out split."""

    every_steps: int = field(500, "Evaluate every this many steps (and at the end); 0 = only at the end.")
    batches: int = field(8, "Held-out batches per evaluation (global batches of data.global_batch_size).")

    def validate(self) -> None:
        if self.every_steps < 0 or self.batches <= 0:
            raise ConfigError(f"every_steps must be >= 0 and batches > 0, got {self.every_steps}, {self.batches}")
