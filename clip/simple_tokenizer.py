"""openai/CLIP's `clip.simple_tokenizer` module, for code written against it: `SimpleTokenizer` with its
attributes (`encoder`, `decoder`, `byte_encoder`, `byte_decoder`, `bpe_ranks`, `cache`, `pat`) and methods
(`encode`, `decode`, `bpe`), and the module's helpers (`default_bpe`, `bytes_to_unicode`, `get_pairs`,
`basic_clean`, `whitespace_clean`). Prompt learners use `SimpleTokenizer().encode(name)` to count a class
name's tokens; captioning code decodes with `byte_decoder`. The same BPE as `clip.tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .download import download
from .tokenizer import (
    END_OF_TEXT,
    MERGES_SHA256,
    MERGES_URL,
    START_OF_TEXT,
    Tokenizer,
    basic_clean,
    bytes_to_unicode,
    whitespace_clean,
)

__all__ = ["SimpleTokenizer", "basic_clean", "bytes_to_unicode", "default_bpe", "get_pairs", "whitespace_clean"]


def default_bpe() -> str:
    """The path of OpenAI's merges file in the cache folder, downloaded and SHA256-checked if missing."""
    return str(download(MERGES_URL, MERGES_SHA256))


def get_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """The adjacent symbol pairs of a word given as a sequence of symbols."""
    return set(zip(word[:-1], word[1:]))


class SimpleTokenizer(Tokenizer):
    """`encode(text)` -> ids without start and end tokens; `decode(ids)` -> text with the special tokens
    spelled out, as openai/CLIP's does; `bpe(token)` -> the token's BPE symbols joined by spaces, the last
    one marked with "</w>" (token: a pre-tokenised piece in `byte_encoder`'s characters), by the same merge
    loop as `encode`."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        super().__init__(bpe_path)
        self.decoder: dict[int, str] = dict(enumerate(self.vocab))
        self.byte_encoder: dict[int, str] = bytes_to_unicode()
        self.byte_decoder: dict[str, int] = {char: byte for byte, char in self.byte_encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(self.merges)}
        self.cache: dict[str, str] = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
        self.pat = self._piece_pattern

    def bpe(self, token: str) -> str:
        if token not in self.cache:
            # The fast encoder's merge loop, on the ids of the bytes that the token's characters stand for
            byte_ids = bytes(self.byte_decoder[char] for char in token).translate(self._byte_ids)
            self.cache[token] = " ".join(self.vocab[token_id] for token_id in self._merge_ids(list(byte_ids)))
        return self.cache[token]

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return super().decode(tokens, skip_special_tokens=skip_special_tokens)
