"""Model library: hybrid recurrent / attention language models (Flax NNX)."""

from lmtrain.models.config import ModelConfig
from lmtrain.models.model import LanguageModel
from lmtrain.models.state import ModelState, SeqContext

__all__ = ["LanguageModel", "ModelConfig", "ModelState", "SeqContext"]
