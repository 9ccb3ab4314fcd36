"""`ModelConfig`: the shared fields (`CoreConfig`) plus one section per registered layer kind.

    cfg = ModelConfig(width=256, pattern="RRA")                 # sections at their defaults
    cfg.rglru.width, cfg.attention.window                       # each kind's own settings

The sections come from the registry (`lmtrain.models.mixers.MIXERS`): each mixer declares its
section name and dataclass, so adding a layer kind adds its section here without touching this file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from lmtrain.configlib import ConfigError, field
from lmtrain.models.base_config import CoreConfig
from lmtrain.models.mixers import MIXERS

log = logging.getLogger(__name__)

# Flat keys of earlier versions -> where they live now (num_heads set both the attention heads and the
# RG-LRU gate blocks). Stored run configs with them still load (with a warning).
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "num_heads": ("attention.num_heads", "rglru.num_heads"), "num_kv_heads": ("attention.num_kv_heads",),
    "head_dim": ("attention.head_dim",), "window": ("attention.window",), "attn_block": ("attention.block",),
    "max_len": ("attention.max_len",), "rope_base": ("attention.rope_base",),
    "rope_fraction": ("attention.rope_fraction",), "lru_width": ("rglru.width",),
    "conv_width": ("rglru.conv_width",), "lru_c": ("rglru.c",), "lru_min_rad": ("rglru.min_rad",),
    "lru_max_rad": ("rglru.max_rad",), "lru_sqrt_max_grad": ("rglru.sqrt_max_grad",),
}


def _migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with the flat keys of earlier versions moved into their sections (an old key given as an
    override, e.g. model.window=64, replaces the section's value)."""
    old = [k for k in data if k in LEGACY_KEYS]
    if not old:
        return dict(data)
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items() if k not in LEGACY_KEYS}
    for key in old:
        for target in LEGACY_KEYS[key]:
            section, name = target.split(".")
            out.setdefault(section, {})[name] = data[key]
    log.warning("model config keys %s are from an earlier version of lmtrain; read as %s (update the config)",
                ", ".join(old), ", ".join("/".join(LEGACY_KEYS[k]) for k in old))
    return out


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
    namespace={"validate": _validate, "check_length": _check_length, "migrate": staticmethod(_migrate),
               "__module__": __name__,
               "__doc__": "Architecture, numerics and execution switches of `LanguageModel`: the shared fields "
                          "and one section per layer kind."})

__all__ = ["ModelConfig"]
