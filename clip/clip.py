"""openai/CLIP's module layout, for code written against it: `from clip import clip` (or `clip.clip`)
followed by `clip.load`, `clip.tokenize`, `clip.available_models`, `clip.build_model`, and the private names
that prompt-learning code reads: `_MODELS` (name -> URL), `_download(url, root)`, `_transform(n_px)` and
`_tokenizer` (a SimpleTokenizer, built on first use rather than at import); and `BICUBIC` and
`_convert_image_to_rgb`, from which code builds its own variants of the preprocessing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

# simple_tokenizer as in openai/CLIP, where this module imports it: `import clip`, then
# `clip.simple_tokenizer.SimpleTokenizer()`
from . import available_models, simple_tokenizer  # noqa: F401
from .download import cache_dir, download
from .loading import load
from .model import build_model
from .released import RELEASED_WEIGHTS
from .tokenizer import tokenize

if TYPE_CHECKING:
    from .preprocess import ImageTransform

__all__ = ["available_models", "build_model", "load", "tokenize"]

_MODELS: dict[str, str] = {name: release.url for name, release in RELEASED_WEIGHTS.items()}


def _download(url: str, root: str | Path | None = None) -> str:
    """The local path of a released model's file, downloaded into `root` (default: the cache folder) and
    checked against the release's SHA256; as openai/CLIP's `_download`, for the URLs in `_MODELS` only."""
    sha256 = next((release.sha256 for release in RELEASED_WEIGHTS.values() if release.url == url), None)
    if sha256 is None:
        raise ValueError(f"{url} is not one of the released models' URLs (clip.clip._MODELS)")
    return str(download(url, sha256, root=root if root is not None else cache_dir()))


def _convert_image_to_rgb(image: Image.Image) -> Image.Image:
    """The preprocessing's colour step as openai/CLIP's: `image.convert("RGB")`."""
    return image.convert("RGB")


def _transform(n_px: int) -> ImageTransform:
    """openai/CLIP's evaluation preprocessing for `n_px`-pixel inputs."""
    from .preprocess import image_transform  # here, not at import: torchvision's import costs seconds (image_modes)

    return image_transform(n_px)


@functools.lru_cache(maxsize=1)
def _shared_simple_tokenizer():
    from .simple_tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def __getattr__(name: str):
    # openai/CLIP builds `_tokenizer` at import; here reading the merges file waits for the first use.
    if name == "_tokenizer":
        return _shared_simple_tokenizer()
    if name == "BICUBIC":  # the interpolation of the preprocessing's resize, as openai/CLIP names it
        from torchvision.transforms import InterpolationMode

        return InterpolationMode.BICUBIC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "_tokenizer", "BICUBIC"})  # for a notebook's completion
