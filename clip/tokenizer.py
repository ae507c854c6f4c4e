"""Byte-level BPE tokenizer that gives, id for id, the tokens of OpenAI's CLIP tokenizer.

The algorithm is OpenAI's: clean the text (ftfy, HTML entities, whitespace, lower case), split it into
pieces with one regular expression, write each piece's UTF-8 bytes in a printable 256-character alphabet,
and merge adjacent symbols by the rank of the merge in OpenAI's merges file, marking the end of each piece
with '</w>'. What differs is only how fast the same ids come out:

- ftfy and HTML unescaping are skipped for text they provably leave unchanged (see `_needs_full_cleaning`),
  which is most English captions; on such text they cost more than everything else together.
- Whitespace-separated chunks ("cat," or "photo") and their pieces are encoded once and their ids kept in a
  bounded cache. That is exact because no piece of the pre-tokenising expression contains whitespace.
- The merge loop runs on integer ids and, after each merge, updates only the ranks of the two pairs around it.
- A batch becomes a tensor through one numpy fill rather than one small tensor per caption.

Nothing is loaded at import time: `Tokenizer()` reads the merges file (downloading it into the cache when
missing) and `get_tokenizer()` builds one shared instance on first use.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import itertools
import operator
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

from .download import download

MERGES_URL = "https://openaipublic.azureedge.net/clip/bpe_simple_vocab_16e6.txt.gz"
MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_BYTE_TOKENS = 256
NUM_SPECIAL_TOKENS = 2
# OpenAI learnt a 49152-entry BPE vocabulary that counts the 256 byte tokens and the 2 special tokens, so the
# file's first 48894 merges (after its one header line) are the ones in use; the rest of the file is unused.
BPE_VOCAB_SIZE = 49152
NUM_MERGES = BPE_VOCAB_SIZE - NUM_BYTE_TOKENS - NUM_SPECIAL_TOKENS
MERGES_HEADER_LINES = 1
# Each byte appears twice, inside a word and word-final (with '</w>'); then one token per merge, then the specials.
VOCAB_SIZE = 2 * NUM_BYTE_TOKENS + NUM_MERGES + NUM_SPECIAL_TOKENS  # 49408, below 0xD800 (see _encode_as_chars)
FIRST_MERGE_ID = 2 * NUM_BYTE_TOKENS
DEFAULT_CONTEXT_LENGTH = 77

# OpenAI's pre-tokeniser: special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is neither whitespace, letter nor digit. No alternative can match whitespace.
PIECE_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# The same expression for cleaned chunks of printable ASCII, which are lower case and hold no whitespace:
# there \p{L} is [a-z] and \p{N} is [0-9], and the standard library's `re` runs it 4x faster than `regex`.
ASCII_PIECE_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^a-z0-9]+"
# Text that ftfy.fix_text and html.unescape might change (the complement is checked in the docstring of
# `_needs_full_cleaning` and tested against ftfy): ASCII control characters other than tab and newline,
# and '&' followed by anything but whitespace (HTML entities need a '#', a letter or a digit after the '&').
_UNSAFE_ASCII = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|&(?=[^ \t\n])")
_WHITESPACE_RUN = regex.compile(r"\s+")  # OpenAI collapses whitespace with `regex`'s idea of \s
# Longer chunks and pieces are rare enough that caching them would only cost memory.
MAX_CACHED_CHARS = 64
# Pieces with more byte tokens than this are merged with a heap (time n log n) rather than by rescanning.
LONG_PIECE_IDS = 128
DEFAULT_CACHE_ENTRIES = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 bijection from bytes to printable characters, in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls, space, NBSP,
    soft hyphen) are given the characters from U+0100 on, in byte order, so that no token contains
    whitespace or control characters. The dict's order is the order of the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(NUM_BYTE_TOKENS) if byte not in set(printable)]
    mapping = {byte: chr(byte) for byte in printable}
    mapping.update({byte: chr(NUM_BYTE_TOKENS + index) for index, byte in enumerate(others)})
    return mapping


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The merges in rank order from a gzipped merges file (one 'left right' pair a line after a header)."""
    # Only the first fifth of the file is used; stop decompressing there. Lines end at "\n" only, as in OpenAI's
    # reader (universal newlines would also break lines at a lone "\r").
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as file:
            lines = list(itertools.islice(file, MERGES_HEADER_LINES + NUM_MERGES))
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as error:  # a file other than OpenAI's
        raise ValueError(f"{path} is not a CLIP merges file (a gzipped UTF-8 text file): {error}") from None
    merges = [tuple(line.split()) for line in lines[MERGES_HEADER_LINES:]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} is not a CLIP merges file: expected {NUM_MERGES} lines of 'left right' pairs")
    return merges  # type: ignore[return-value]


def basic_clean(text: str) -> str:
    """ftfy's fixes, then HTML entities unescaped twice (doubly escaped web text), stripped."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    """Every run of whitespace as one space, stripped."""
    return _WHITESPACE_RUN.sub(" ", text).strip()


def clean_text(text: str) -> str:
    """OpenAI's normalisation: `basic_clean`, `whitespace_clean`, lower case."""
    return whitespace_clean(basic_clean(text)).lower()


def cleans_to_nothing(text: str) -> bool:
    """Whether `clean_text(text)` is empty: the tokenizer makes [start, end] of it alone ("&nbsp;", a byte-order
    mark, control characters). Without running the cleaning for text it provably leaves something of: ftfy and
    HTML unescaping remove control and format characters and turn entities into what they name, but never remove
    a letter or digit outside an entity ('&...'). Most text answers at its first letter."""
    if "&" not in text and any(character.isalnum() for character in text):
        return False
    return not clean_text(text)


def _needs_full_cleaning(text: str) -> bool:
    """False when `clean_text(text)` is just whitespace collapsing and lower-casing.

    That holds for ASCII text without control characters other than tab and newline, in which every '&' is
    followed by whitespace or ends the text. On such text each ftfy fixer is the identity: mojibake detection
    returns ASCII unchanged; the HTML, ligature, width, quote, surrogate, C1, line-break and terminal-escape
    fixers only match '&#'/'&' + alphanumerics, non-ASCII characters, '\\r' or ESC; control-character removal
    spares tab and newline; NFC leaves ASCII alone. html.unescape only rewrites '&' followed by '#' or by a
    character other than whitespace, '<', '&' or ';'. tests/test_tokenizer.py checks this against ftfy.
    """
    return not text.isascii() or _UNSAFE_ASCII.search(text) is not None


class Tokenizer:
    """OpenAI's CLIP BPE tokenizer: 49408 token ids, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407.

    Args:
        merges_path: a gzipped merges file; default: OpenAI's, from the cache folder (downloaded and
            SHA256-checked when missing).
        cache_entries: how many whitespace-separated chunks and pieces to remember the ids of; the cache is
            emptied when full, so memory stays bounded on any stream of text.
    """

    def __init__(self, merges_path: str | Path | None = None, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if merges_path is None:
            merges_path = download(MERGES_URL, MERGES_SHA256)
        self.merges = read_merges(merges_path)
        byte_alphabet = bytes_to_unicode()
        byte_tokens = list(byte_alphabet.values())
        vocab = [*byte_tokens, *(token + END_OF_WORD for token in byte_tokens)]
        vocab += [left + right for left, right in self.merges]  # the token of merge k has id FIRST_MERGE_ID + k
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.vocab: list[str] = vocab  # id -> token
        self.encoder: dict[str, int] = {token: token_id for token_id, token in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise ValueError(f"{merges_path} is not a CLIP merges file: some merges give the same token")
        unknown = next((pair for pair in self.merges if pair[0] not in self.encoder or pair[1] not in self.encoder), None)
        if unknown is not None:  # each side of a merge is a byte token or an earlier merge's token
            raise ValueError(f"{merges_path} is not a CLIP merges file: the merge {' '.join(unknown)!r} joins tokens "
                             f"that no byte or merge gives")
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[START_OF_TEXT]
        self.eot_token_id = self.encoder[END_OF_TEXT]
        self._special_ids = {START_OF_TEXT: self.sot_token_id, END_OF_TEXT: self.eot_token_id}
        self._build_bpe_tables(byte_alphabet)
        self._piece_pattern = regex.compile(PIECE_PATTERN, regex.IGNORECASE)
        self._ascii_piece_pattern = re.compile(ASCII_PIECE_PATTERN)
        self._cache_entries = cache_entries
        # Ids of whitespace-separated chunks and of the pre-tokeniser's pieces, in one dict: a piece is also a
        # chunk that splits into just itself, so the two kinds of key never disagree.
        self._cached_ids: dict[str, str] = {}

    def _build_bpe_tables(self, byte_alphabet: dict[int, str]) -> None:
        """BPE runs on ids, not strings. A piece's UTF-8 bytes become the ids of their byte tokens with one
        bytes.translate(); a pair of ids (left, right) is keyed as left * vocab_size + right."""
        byte_ids = bytearray(NUM_BYTE_TOKENS)
        for token_id, byte in enumerate(byte_alphabet):
            byte_ids[byte] = token_id  # byte tokens have ids 0..255, so they fit in a translation table
        self._byte_ids = bytes(byte_ids)
        encoder = self.encoder
        self._pair_ranks: dict[int, int] = {
            encoder[left] * self.vocab_size + encoder[right]: rank for rank, (left, right) in enumerate(self.merges)
        }
        # The first round of merges only sees byte tokens (the last one with '</w>'): a flat list indexed by
        # left * 512 + right answers those look-ups faster than the dict.
        self._byte_pair_ranks = [NUM_MERGES] * (NUM_BYTE_TOKENS * 2 * NUM_BYTE_TOKENS)
        for key, rank in self._pair_ranks.items():
            left, right = divmod(key, self.vocab_size)
            if left < NUM_BYTE_TOKENS and right < 2 * NUM_BYTE_TOKENS:
                self._byte_pair_ranks[left * 2 * NUM_BYTE_TOKENS + right] = rank
        # The (left id, right id) of each merge, by rank, for _merge_long_piece.
        self.merge_pair_ids = [(encoder[left], encoder[right]) for left, right in self.merges]
        # For decoding: token characters back to the bytes they stand for (as Latin-1 characters).
        self._byte_unspelling = str.maketrans({char: chr(byte) for byte, char in byte_alphabet.items()})

    def __getstate__(self) -> dict:
        # DataLoader workers receive a copy; the cache is cheap to refill and not worth pickling.
        return {**self.__dict__, "_cached_ids": {}}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start and end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return list(map(ord, self._encode_as_chars(text)))

    # Internally a sequence of token ids is a str with one character per id, chr(id): every id is below the
    # UTF-16 surrogates, so such strings join in C and become a numpy array with one frombuffer(), and the
    # cache holds one compact object per entry instead of a tuple of int objects scattered in memory.

    def _encode_as_chars(self, text: str) -> str:
        if _needs_full_cleaning(text):
            chunks = clean_text(text).split(" ")
        else:  # Equal to clean_text(text).split(" ") here, minus the work; see _needs_full_cleaning.
            chunks = text.lower().split()
        cached = list(map(self._cached_ids.get, chunks))
        if None in cached:
            cached = [self._encode_chunk(chunk) if ids is None else ids for chunk, ids in zip(chunks, cached)]
        return "".join(cached)

    def _encode_chunk(self, chunk: str) -> str:
        """Ids (as characters) of cleaned text that contains no space, not yet in the cache; cached on return."""
        if chunk.isascii() and chunk.isalpha():  # the most common chunk, a plain word, is one piece
            ids = self._encode_piece(chunk)
        else:
            printable_ascii = chunk.isascii() and chunk.isprintable()
            pattern = self._ascii_piece_pattern if printable_ascii else self._piece_pattern
            cache = self._cached_ids
            pieces_ids = []
            for piece in pattern.findall(chunk):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = self._encode_piece(piece)
                    self._remember(piece, piece_ids)
                pieces_ids.append(piece_ids)
            ids = "".join(pieces_ids)
        self._remember(chunk, ids)
        return ids

    def _encode_piece(self, piece: str) -> str:
        special_id = self._special_ids.get(piece)
        if special_id is not None:
            return chr(special_id)
        return "".join(map(chr, self._merge_ids(list(piece.encode("utf-8").translate(self._byte_ids)))))

    def _remember(self, text: str, ids: str) -> None:
        # Emptying a full cache is cruder than LRU eviction but costs nothing per hit, and it bounds memory.
        if len(text) <= MAX_CACHED_CHARS:
            if len(self._cached_ids) >= self._cache_entries:
                self._cached_ids.clear()
            self._cached_ids[text] = ids

    def _merge_ids(self, ids: list[int]) -> list[int]:
        """BPE on the byte-token ids of one piece: mark the last as word-final ('</w>'), then apply the
        lowest-ranked merge among adjacent pairs, at every non-overlapping occurrence from the left, until no
        pair has a merge. Returns the merged ids (the list passed in, changed in place).

        Only the two pairs around a merge change, so their ranks are updated in place rather than all ranks
        recomputed after every merge, which roughly halves the cost of a new word.
        """
        ids[-1] += NUM_BYTE_TOKENS  # the '</w>' twin of a byte token
        if len(ids) > LONG_PIECE_IDS:
            return self._merge_long_piece(ids)
        row = 2 * NUM_BYTE_TOKENS
        byte_pair_ranks = self._byte_pair_ranks
        pair_ranks = [byte_pair_ranks[left * row + right] for left, right in zip(ids, ids[1:])]
        ranks = self._pair_ranks
        vocab_size = self.vocab_size
        no_merge = NUM_MERGES  # ranks run 0..NUM_MERGES-1
        while pair_ranks:
            best_rank = min(pair_ranks)
            if best_rank == no_merge:
                break
            merged = FIRST_MERGE_ID + best_rank
            # One left-to-right pass over the occurrences, as in OpenAI's loop. Nothing left of the merge can
            # equal best_rank (it was the leftmost occurrence, and a pair holding the merged token is another
            # pair), so the next occurrence is found from the start.
            while best_rank in pair_ranks:
                position = pair_ranks.index(best_rank)
                ids[position] = merged
                del ids[position + 1]
                del pair_ranks[position]
                if position > 0:
                    pair_ranks[position - 1] = ranks.get(ids[position - 1] * vocab_size + merged, no_merge)
                if position < len(pair_ranks):
                    pair_ranks[position] = ranks.get(merged * vocab_size + ids[position + 1], no_merge)
        return ids

    def _merge_long_piece(self, ids: list[int]) -> list[int]:
        """`_merge_ids` for a long piece, in O(n log n): each merge of `_merge_ids` costs time linear in the
        piece, and a 1 MB word without spaces (a base64 blob in a caption) took hours, truncate=True or not.

        The same merges in the same order: a heap of (rank, position) of adjacent pairs, and a linked list of
        the tokens. A round takes every queued occurrence of the lowest rank and merges them from the left,
        skipping those an earlier merge of the round used up (as OpenAI's pass does); pairs that the merges
        create wait in the heap for later rounds."""
        count = len(ids)
        next_of = list(range(1, count + 1))  # position -> position of the next live token (count: none)
        previous_of = list(range(-1, count - 1))
        alive = [True] * count
        ranks, vocab_size, no_merge = self._pair_ranks, self.vocab_size, NUM_MERGES
        heap = [
            (rank, position)
            for position in range(count - 1)
            if (rank := ranks.get(ids[position] * vocab_size + ids[position + 1], no_merge)) != no_merge
        ]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            round_positions = []
            while heap and heap[0][0] == rank:
                round_positions.append(heapq.heappop(heap)[1])
            merged = FIRST_MERGE_ID + rank
            left_id, right_id = self.merge_pair_ids[rank]
            for position in round_positions:  # in increasing order: popped from a heap of (rank, position)
                following = next_of[position]
                if not alive[position] or following == count or ids[position] != left_id or ids[following] != right_id:
                    continue  # an earlier merge used one of its tokens up
                ids[position] = merged
                alive[following] = False
                next_of[position] = next_of[following]
                if next_of[position] < count:
                    previous_of[next_of[position]] = position
                    pair_rank = ranks.get(merged * vocab_size + ids[next_of[position]], no_merge)
                    if pair_rank != no_merge:
                        heapq.heappush(heap, (pair_rank, position))
                before = previous_of[position]
                if before >= 0:
                    pair_rank = ranks.get(ids[before] * vocab_size + merged, no_merge)
                    if pair_rank != no_merge:
                        heapq.heappush(heap, (pair_rank, before))
        return [token_id for token_id, live in zip(ids, alive) if live]

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of token ids; like OpenAI's, every word-final token ends in a space ("a photo " for "a photo").

        With `skip_special_tokens`, the start token is dropped and decoding stops at the first end token, so
        that a padded row of `tokenize()` decodes to its text. Without it, special tokens are spelled out.
        """
        ids = _one_row_of_ids(ids)
        ids = [_as_token_id(token_id, self.vocab_size) for token_id in ids]
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            ids = [token_id for token_id in ids if token_id != self.sot_token_id]
        spelled = "".join(self.vocab[token_id] for token_id in ids)
        utf8 = spelled.translate(self._byte_unspelling).encode("latin-1")
        return utf8.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(
        self, texts: str | Iterable[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """IntTensor[N, context_length] (int32, as openai/CLIP's): start token, text tokens, end token, then
        zeros, one row per text. `texts`: one str, or any iterable of str (list, tuple, numpy array, ...).

        Raises `TextTooLongError` (a ValueError and, as in openai/CLIP, a RuntimeError) when a text does not
        fit, unless `truncate`: then its tokens are cut so that the end token is the last one kept (with
        context_length=1, as in openai/CLIP, that leaves the end token alone, without the start token).
        """
        texts = _as_text_list(texts)
        if isinstance(context_length, bool):
            raise TypeError("context_length must be an int, got bool")
        try:
            context_length = operator.index(context_length)  # also numpy integers
        except TypeError:
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}") from None
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1 (room for the end token), got {context_length}")
        rows = [self._encode_as_chars(text) for text in texts]
        max_text_tokens = context_length - 2  # -1 when context_length is 1: every text is too long then
        for index, row in enumerate(rows):
            if len(row) > max_text_tokens:
                if not truncate:
                    raise TextTooLongError.of(texts[index], len(row) + 2, context_length)
                rows[index] = row[: max(max_text_tokens, 0)]
        if context_length == 1:
            # openai/CLIP truncates by keeping the first context_length tokens and overwriting the last one with
            # the end token; here that keeps the start token alone and so leaves the end token alone.
            return torch.full((len(rows), 1), self.eot_token_id, dtype=torch.int32)
        # int32 like openai/CLIP's tokenize (ids are below 49408); embeddings take either index type.
        tokens = np.zeros((len(rows), context_length), dtype=np.int32)
        if rows:
            # All rows, each framed by the start and end tokens, in one string, then one array; a row-major
            # boolean mask takes those ids in order.
            start, end = chr(self.sot_token_id), chr(self.eot_token_id)
            framed = start + (end + start).join(rows) + end
            flat_ids = np.frombuffer(framed.encode("utf-16-le"), dtype="<u2")
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) + 2
            tokens[np.arange(context_length) < lengths[:, None]] = flat_ids
        return torch.from_numpy(tokens)


class TextTooLongError(ValueError, RuntimeError):
    """A text has more tokens than the context holds. A ValueError, and a RuntimeError because that is what
    openai/CLIP's tokenize raises (code catches it to retry with truncate=True). `reason`: the message
    without its advice to the caller, for code that truncates by itself."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason

    def __reduce__(self):  # pickled across DataLoader workers: rebuilt with its reason
        return type(self), (str(self.args[0]), self.reason)

    @classmethod
    def of(cls, text: str, num_tokens: int, context_length: int) -> TextTooLongError:
        shown = text if len(text) <= 60 else text[:57] + "..."
        reason = (
            f"Text {shown!r} is {num_tokens} tokens long (with the start and end tokens), more than "
            f"context_length={context_length}"
        )
        return cls(f"{reason}; pass truncate=True to cut it to fit.", reason)


def _as_text_list(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    # Sets and mappings are iterable but unordered or keyed: which row is which text would be a guess.
    if isinstance(texts, (bytes, AbstractSet, Mapping)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or an ordered iterable of str, got {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):  # numpy's str_ is a str subclass
            raise TypeError(f"texts[{index}] is a {type(text).__name__}, not a str")
    return [str(text) for text in texts]


def _one_row_of_ids(ids: object) -> list:
    """`decode`'s argument as a list, refusing with advice the two shapes a notebook passes by mistake: the
    whole [N, L] output of tokenize (listed as one bad id) and a lone id ("'int' object is not iterable")."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()  # a 0-dim one gives a number, a 2-dim one lists of numbers
    if isinstance(ids, (int, float, np.number)):
        raise TypeError(f"decode takes a sequence of token ids, got a single {type(ids).__name__}: decode([{ids}])")
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple, torch.Tensor, np.ndarray)):
        raise ValueError(
            f"decode takes one text's token ids, got {len(ids)} rows of them: for tokenize's [N, L] output, "
            f"decode each row: [decode(row) for row in tokens]"
        )
    return ids


def _as_token_id(token_id: object, vocab_size: int) -> int:
    if isinstance(token_id, (int, np.integer)) and not isinstance(token_id, bool) and 0 <= token_id < vocab_size:
        return int(token_id)
    raise ValueError(f"{token_id!r} is not a token id (ids are ints in [0, {vocab_size}))")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer with OpenAI's merges, built on first use (downloading the merges if needed)."""
    return Tokenizer()


def tokenize(
    texts: str | Iterable[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """openai/CLIP's `clip.tokenize`: IntTensor[N, context_length] of token ids; see `Tokenizer.__call__`."""
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)


def decode(ids: Sequence[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = True) -> str:
    """Text of token ids with the shared tokenizer; see `Tokenizer.decode`."""
    return get_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)
