"""openai/CLIP's `clip.simple_tokenizer.SimpleTokenizer`, for code written against it (prompt learners use
`SimpleTokenizer().encode(name)` to count a class name's tokens). The same BPE as `clip.tokenizer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .download import download
from .tokenizer import MERGES_SHA256, MERGES_URL, Tokenizer


def default_bpe() -> str:
    """The path of OpenAI's merges file in the cache folder, downloaded and SHA256-checked if missing."""
    return str(download(MERGES_URL, MERGES_SHA256))


class SimpleTokenizer(Tokenizer):
    """`encode(text)` -> ids without start and end tokens; `decode(ids)` -> text with the special tokens
    spelled out, as openai/CLIP's does; `encoder` (token -> id) and `decoder` (id -> token)."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        super().__init__(bpe_path)
        self.decoder: dict[int, str] = dict(enumerate(self.vocab))

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return super().decode(tokens, skip_special_tokens=skip_special_tokens)
