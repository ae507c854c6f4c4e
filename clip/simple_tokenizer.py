"""openai/CLIP's `clip.simple_tokenizer` module, for code written against it: `SimpleTokenizer` with its
attributes (`encoder`, `decoder`, `byte_encoder`, `byte_decoder`, `bpe_ranks`, `cache`, `pat`) and methods
(`encode`, `decode`, `bpe`), and the module's helpers (`default_bpe`, `bytes_to_unicode`, `get_pairs`,
`basic_clean`, `whitespace_clean`). Prompt learners use `SimpleTokenizer().encode(name)` to count a class
name's tokens; captioning code decodes with `byte_decoder`. The same BPE as `clip.tokenizer`, whose fast
encoder `encode` runs; `bpe` is the plain merge loop, for code that calls it on single words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .download import download
from .tokenizer import (
    END_OF_TEXT,
    END_OF_WORD,
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
    one marked with "</w>" (token: a pre-tokenised piece in `byte_encoder`'s characters)."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        super().__init__(bpe_path)
        self.decoder: dict[int, str] = dict(enumerate(self.vocab))
        self.byte_encoder: dict[int, str] = bytes_to_unicode()
        self.byte_decoder: dict[str, int] = {char: byte for byte, char in self.byte_encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(self.merges)}
        self.cache: dict[str, str] = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
        self.pat = self._piece_pattern

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + END_OF_WORD)
        while len(word) > 1:
            # The pair that was merged earliest in training merges first, everywhere it occurs in the word
            best = min(get_pairs(word), key=lambda pair: self.bpe_ranks.get(pair, len(self.bpe_ranks)))
            if best not in self.bpe_ranks:
                break
            merged, index = [], 0
            while index < len(word):
                if index + 1 < len(word) and (word[index], word[index + 1]) == best:
                    merged.append(word[index] + word[index + 1])
                    index += 2
                else:
                    merged.append(word[index])
                    index += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return super().decode(tokens, skip_special_tokens=skip_special_tokens)
