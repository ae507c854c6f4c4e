"""clip: pre-train, load and evaluate CLIP models.

The API of openai/CLIP (`available_models`, `load`, `tokenize`) plus `create_model` for training from
scratch. Importing the package does no work: the tokenizer's vocabulary is read on first use.
"""

from .architectures import RELEASED_ARCHITECTURES, ModelConfig, TextConfig, VisionConfig
from .loading import load
from .model import CLIP, create_model
from .tokenizer import decode, tokenize


def available_models() -> list[str]:
    """Names of the nine architectures whose weights OpenAI released."""
    return list(RELEASED_ARCHITECTURES)


def __getattr__(name: str):
    # On first use rather than at import: torchvision's import (clip.preprocess) pulls in torch._dynamo, seconds
    # that training and tokenizing never need
    if name == "image_transform":
        from .preprocess import image_transform

        return image_transform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "image_transform"})  # for a notebook's completion


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
