"""A slow, literal CLIP tokenizer: the test oracle for clip/tokenizer.py and the baseline of its benchmark.

It follows OpenAI's algorithm step by step with no shortcuts: ftfy and HTML unescaping on every text, the
pre-tokenising expression on the whole cleaned text, and per word a BPE loop that each time finds the
lowest-ranked adjacent pair with min() and rebuilds the word, remembering finished words in a dict. It shares
no code with the package on purpose, so that a bug in one does not hide in the other.
"""

from __future__ import annotations

import gzip
import html
from pathlib import Path

import ftfy
import regex

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
BYTE_COUNT = 256
MERGE_COUNT = 49152 - BYTE_COUNT - len(SPECIALS)  # the BPE vocabulary size counts bytes and specials


def byte_alphabet() -> dict[int, str]:
    """Byte -> printable character; printable Latin-1 bytes keep their character, the rest get U+0100.. ."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    characters = list(keep)
    extra = 0
    for byte in range(BYTE_COUNT):
        if byte not in keep:
            keep.append(byte)
            characters.append(BYTE_COUNT + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(keep, characters)}


class ReferenceTokenizer:
    def __init__(self, merges_path: str | Path) -> None:
        with gzip.open(merges_path) as file:
            lines = file.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + MERGE_COUNT]]
        self.byte_encoder = byte_alphabet()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [token + "</w>" for token in vocab]
        vocab += ["".join(pair) for pair in merges]
        vocab += SPECIALS
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {token_id: token for token, token_id in self.encoder.items()}
        self.ranks = dict(zip(merges, range(len(merges))))
        self.word_cache = {special: special for special in SPECIALS}
        self.pattern = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )

    @staticmethod
    def clean(text: str) -> str:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        text = text.strip()
        text = regex.sub(r"\s+", " ", text)
        return text.strip().lower()

    def bpe(self, word: str) -> str:
        if word in self.word_cache:
            return self.word_cache[word]
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        while len(symbols) > 1:
            pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            rebuilt = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    rebuilt.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    rebuilt.append(symbols[i])
                    i += 1
            symbols = tuple(rebuilt)
        result = " ".join(symbols)
        self.word_cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            spelled = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(spelled).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        spelled = "".join(self.decoder[token_id] for token_id in ids)
        raw = bytearray(self.byte_decoder[char] for char in spelled)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, texts: list[str], context_length: int = 77) -> list[list[int]]:
        """Rows of [sot, ids..., eot] padded with zeros, truncated OpenAI's way (end token kept last)."""
        rows = []
        for text in texts:
            row = [self.encoder[SPECIALS[0]], *self.encode(text), self.encoder[SPECIALS[1]]]
            if len(row) > context_length:
                row = row[:context_length]
                row[-1] = self.encoder[SPECIALS[1]]
            rows.append(row + [0] * (context_length - len(row)))
        return rows
