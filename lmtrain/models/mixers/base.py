"""The Mixer protocol: everything generic code may know about a layer kind, declared by the kind.

A layer kind is one module with one `Mixer` subclass, registered under its pattern letter in
`lmtrain/models/mixers/__init__.py`. The subclass declares, next to its code:

    section          name of its config section, `model.<section>` (several letters may share one)
    Config           that section's dataclass (fields made with `configlib.field`, `validate()`)
    __init__(cfg, rngs=...)                     cfg: the ModelConfig (shared fields + every section)
    __call__(x_BxTxD, ctx, state|None) -> (y_BxTxD, state)
    init_state(cfg, batch_size)                 the state at a document start (a NamedTuple of arrays)
    state_axes(cfg)                             the same NamedTuple, each leaf a tuple of logical axis
                                                names (`batch` on every leaf; see lmtrain/sharding.py)
    recurrent_field                             the state field that is "the recurrent state" (what
                                                length-generalization interventions and state-norm
                                                diagnostics act on), or None
    bounded_state                               False if the state grows with the context (it cannot be
                                                carried across training steps)
    flops_per_token(cfg, seq_len)               analytic forward FLOPs of one token at training length
    check_config(cfg)                           checks of its section against the shared fields
    check_length(cfg, seq_len)                  checks of a training length (ConfigError)
    max_call_len(cfg), limit_field              longest sequence one call can take (None: unbounded) and the
                                                config field that sets it

Generic code (model assembly, FLOPs, interventions, evaluation, sharding, config checks) only ever
asks these; it never tests a letter or a state class.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flax import nnx

from lmtrain.models.base_config import CoreConfig


class Mixer(nnx.Module):
    """Base class of the temporal mixers (see the module docstring for the protocol)."""

    section: ClassVar[str]
    Config: ClassVar[type]
    recurrent_field: ClassVar[str | None] = None
    bounded_state: ClassVar[bool] = True
    limit_field: ClassVar[str] = ""  # dotted model-config field of `max_call_len`, e.g. "attention.max_len"

    @classmethod
    def settings(cls, cfg: CoreConfig) -> Any:
        """This kind's section of the model config, `cfg.<section>`."""
        return getattr(cfg, cls.section)

    @classmethod
    def init_state(cls, cfg: CoreConfig, batch_size: int) -> Any:
        raise NotImplementedError

    @classmethod
    def state_axes(cls, cfg: CoreConfig) -> Any:
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, cfg: CoreConfig, seq_len: int) -> float:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: CoreConfig) -> None:
        """Raises ConfigError if this kind's section does not fit the shared fields."""

    @classmethod
    def check_length(cls, cfg: CoreConfig, seq_len: int) -> None:
        """Raises ConfigError if the kind cannot be trained at `seq_len` tokens per row."""

    @classmethod
    def max_call_len(cls, cfg: CoreConfig) -> int | None:
        return None
