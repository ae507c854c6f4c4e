"""openai/CLIP's module layout, for code written against it: `from clip import clip` followed by
`clip.load`, `clip.tokenize`, `clip.available_models`, `clip.build_model`, and the two private names that
prompt-learning code reads, `clip._MODELS` (name -> URL) and `clip._download(url, root)`.
"""

from __future__ import annotations

from pathlib import Path

from . import available_models
from .download import cache_dir, download
from .loading import load
from .model import build_model
from .released import RELEASED_WEIGHTS
from .tokenizer import tokenize

__all__ = ["available_models", "build_model", "load", "tokenize"]

_MODELS: dict[str, str] = {name: release.url for name, release in RELEASED_WEIGHTS.items()}


def _download(url: str, root: str | Path | None = None) -> str:
    """The local path of a released model's file, downloaded into `root` (default: the cache folder) and
    checked against the release's SHA256; as openai/CLIP's `_download`, for the URLs in `_MODELS` only."""
    sha256 = next((release.sha256 for release in RELEASED_WEIGHTS.values() if release.url == url), None)
    if sha256 is None:
        raise ValueError(f"{url} is not one of the released models' URLs (clip.clip._MODELS)")
    return str(download(url, sha256, root=root if root is not None else cache_dir()))
