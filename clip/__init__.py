"""clip: pre-train, load and evaluate CLIP models.

The API of openai/CLIP (`available_models`, `load`, `tokenize`) plus `create_model` for training from
scratch. Importing the package does no work: the tokenizer's vocabulary is read on first use.
"""

from .architectures import RELEASED_ARCHITECTURES, ModelConfig, TextConfig, VisionConfig
from .loading import load
from .model import CLIP, create_model
from .preprocess import image_transform
from .tokenizer import decode, tokenize


def available_models() -> list[str]:
    """Names of the nine architectures whose weights OpenAI released."""
    return list(RELEASED_ARCHITECTURES)


# openai/CLIP's module layout (`clip.clip.load`, `from clip import clip`); imported last, it uses the above.
from . import clip  # noqa: E402, F401

__all__ = [
    "CLIP",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "available_models",
    "create_model",
    "decode",
    "image_transform",
    "load",
    "tokenize",
]
