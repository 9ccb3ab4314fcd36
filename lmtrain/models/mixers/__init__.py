"""The registry of layer kinds: pattern letter -> `Mixer` subclass (protocol in `mixers/base.py`).

A new layer kind is one module in this folder plus one entry here; its config section, state, FLOPs
and checks come with it (see docs/architecture.md).
"""

from lmtrain.models.mixers.attention import GlobalAttention, LocalAttention
from lmtrain.models.mixers.base import Mixer
from lmtrain.models.mixers.mamba import Mamba2
from lmtrain.models.mixers.rglru import RecurrentBlock

MIXERS: dict[str, type[Mixer]] = {
    "R": RecurrentBlock,
    "A": LocalAttention,
    "G": GlobalAttention,
    "M": Mamba2,
}

__all__ = ["MIXERS", "Mixer"]
