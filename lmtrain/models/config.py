"""`ModelConfig`: the shared fields (`CoreConfig`) plus one section per registered layer kind.

    cfg = ModelConfig(width=256, pattern="RRA")                 # sections at their defaults
    cfg.rglru.width, cfg.attention.window                       # each kind's own settings

The sections come from the registry (`lmtrain.models.mixers.MIXERS`): each mixer declares its
section name and dataclass, so adding a layer kind adds its section here without touching this file.
"""

from __future__ import annotations

import dataclasses

from lmtrain.configlib import ConfigError, field
from lmtrain.models.base_config import CoreConfig
from lmtrain.models.mixers import MIXERS


def _sections() -> list[tuple[str, type, str]]:
    """(section name, dataclass, help) of every registered kind, in registry order."""
    letters: dict[str, list[str]] = {}
    classes: dict[str, type] = {}
    for letter, mixer in MIXERS.items():
        letters.setdefault(mixer.section, []).append(letter)
        classes[mixer.section] = mixer.Config
    return [(name, classes[name], (classes[name].__doc__ or "").strip().splitlines()[0])
            for name in letters]


def _validate(self: CoreConfig) -> None:
    self.check_core()
    unknown = sorted(set(self.pattern) - set(MIXERS))
    if unknown:
        raise ConfigError(f"pattern {self.pattern!r} has unknown letter(s) {unknown}; known: "
                          f"{', '.join(f'{k} ({v.__name__})' for k, v in MIXERS.items())}")
    for kind in dict.fromkeys(self.pattern):
        MIXERS[kind].check_config(self)


def _check_length(self: CoreConfig, seq_len: int) -> None:
    """Raises ConfigError if some layer kind of the pattern cannot be trained at `seq_len` tokens per row."""
    for kind in dict.fromkeys(self.pattern):
        MIXERS[kind].check_length(self, seq_len)


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(name, cls, field(cls(), help_)) for name, cls, help_ in _sections()],
    bases=(CoreConfig,), frozen=True,
    namespace={"validate": _validate, "check_length": _check_length, "__module__": __name__,
               "__doc__": "Architecture, numerics and execution switches of `LanguageModel`: the shared fields "
                          "and one section per layer kind."})

__all__ = ["ModelConfig"]
