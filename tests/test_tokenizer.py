"""clip.tokenizer gives OpenAI's ids: checked against hard-coded ids, open_clip's tokenizer, and a slow literal
re-implementation (tests/reference_tokenizer.py) on generated captions and hypothesis-generated Unicode."""

from __future__ import annotations

import gzip
import html
import importlib
import importlib.util
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import ftfy
import numpy as np
import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clip.download
import clip.tokenizer
from clip.download import cache_dir
from clip.tokenizer import (
    ASCII_PIECE_PATTERN,
    END_OF_WORD,
    MERGES_SHA256,
    NUM_MERGES,
    PIECE_PATTERN,
    VOCAB_SIZE,
    Tokenizer,
    _needs_full_cleaning,
    bytes_to_unicode,
    clean_text,
)

MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
SHARED_MERGES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / MERGES_NAME
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Ids observed from open_clip 3.3.0's SimpleTokenizer (OpenAI's algorithm and merges).
KNOWN_IDS = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A diagram of the Eiffel Tower, Paris (France).": [
        320, 22697, 539, 518, 29720, 4730, 267, 3445, 263, 3552, 1818,
    ],
    "3.14 is pi; 42!": [274, 269, 272, 275, 533, 5357, 282, 275, 273, 256],
    "I'm sure they'll say it's fine": [328, 880, 1650, 889, 1342, 1451, 585, 568, 3797],
    "🐶 + 🐱 = ❤️": [10631, 266, 22979, 284, 1752],
    "Crème brûlée à la café": [1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 15304],
    "Tom &amp; Jerry &lt;3 &#39;quoted&#39;": [2435, 261, 9164, 283, 274, 262, 27706, 262],
    "東京の猫": [48338, 21078, 105, 21575, 163, 234, 360],
    "  lots   of\twhitespace\n": [2958, 539, 4699, 2138],
    "HELLO world": [3306, 1002],
    "e-mail@example.com #hashtag": [324, 268, 2614, 287, 6228, 269, 2464, 258, 9238],
    "“curly quotes” — and dashes…": [257, 20795, 5808, 257, 2005, 537, 925, 2502, 959],
    "": [],
}
NON_ASCII_WORDS = ["café", "naïve", "Zürich", "東京", "写真", "Москва", "κόσμος", "🐶", "👍🏽", "—", "“q”", "½"]
PUNCTUATION = [",", ".", "!", "?", ";", "'s", "'LL", "-", "...", "(", ")", '"', " & ", "&amp;", "#1", "\t", "\n"]
# Characters and fragments that exercise every cleaning step: entities, mojibake, odd whitespace, controls,
# ligatures, full-width forms, combining marks, case changes that alter length, and the special tokens.
TRICKY_FRAGMENTS = [
    "&amp;", "&amp;amp;", "&#39;", "&#x27;", "&lt;", "&", "&#", "#", ";", "<", "Ã©", "â€™", "Ã\xa0", "\x85",
    "<|startoftext|>", "<|endoftext|>", "'s", "'LL", "'D", " ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c",
    "\xa0", "\u2028", "\u3000", "\u200b", "\x00", "\x7f", "\x1b[31m", "ﬁ", "Ｆｕｌｌ", "“", "’", "e\u0301", "İ", "ß",
    "ǅ", "١٢٣", "½", "²", "🏽", "cat", "PHOTO", "a", "1", "aaaa", "\ufeff", "\U0001f600",
]


@pytest.fixture(scope="module")
def merges_path() -> Path:
    for candidate in (SHARED_MERGES, cache_dir() / MERGES_NAME):
        if candidate.is_file():
            return candidate
    pytest.skip(f"OpenAI's merges file is in neither {SHARED_MERGES} nor {cache_dir()}")


@pytest.fixture(scope="module")
def tokenizer(merges_path: Path) -> Tokenizer:
    return Tokenizer(merges_path)


@pytest.fixture(scope="module")
def reference(merges_path: Path):
    path = Path(__file__).with_name("reference_tokenizer.py")
    spec = importlib.util.spec_from_file_location("reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceTokenizer(merges_path)


@pytest.fixture(scope="module")
def open_clip_tokenizer(merges_path: Path):
    open_clip_tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer_module.SimpleTokenizer(str(merges_path))


@pytest.fixture(scope="module")
def captions(tokenizer: Tokenizer) -> list[str]:
    """300 captions of vocabulary words with punctuation, capitals, whitespace and some non-ASCII words."""
    words = [token[: -len(END_OF_WORD)] for token in tokenizer.vocab if token.endswith(END_OF_WORD)]
    words = [word for word in words if word.isascii() and word.isalpha()]
    rng = random.Random(1234)
    result = []
    for index in range(300):
        parts = rng.choices(words, k=rng.randint(1, 40 if index % 10 else 90))  # some need truncation
        parts = [word.upper() if rng.random() < 0.05 else word for word in parts]
        parts = [word + rng.choice(PUNCTUATION) if rng.random() < 0.2 else word for word in parts]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(NON_ASCII_WORDS))
        result.append(" ".join(parts))
    return result


tricky_text = st.lists(
    st.sampled_from(TRICKY_FRAGMENTS)
    | st.text(max_size=4)
    | st.text(alphabet="&#;amplt0123x' \t\nAé", max_size=6),
    max_size=12,
).map("".join)
any_text = st.text(max_size=80) | tricky_text


# Vocabulary ---------------------------------------------------------------------------------------------


def test_vocabulary_layout(tokenizer: Tokenizer) -> None:
    assert NUM_MERGES == 48894 and VOCAB_SIZE == 49408 == tokenizer.vocab_size == len(tokenizer.encoder)
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    byte_characters = list(bytes_to_unicode().values())
    assert tokenizer.vocab[:256] == byte_characters
    assert tokenizer.vocab[256:512] == [char + END_OF_WORD for char in byte_characters]
    assert tokenizer.vocab[512] == "in" and tokenizer.vocab[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_byte_alphabet_is_printable_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in mapping.values())
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ"


def test_bad_merges_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="not a CLIP merges file"):
        Tokenizer(path)


# Ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_known_ids(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == KNOWN_IDS[text]


def test_repeated_characters_match_reference(tokenizer: Tokenizer, reference) -> None:
    # Words where one pair occurs many times, overlapping ("aaaa"), exercise the pass over all occurrences.
    for unit in ["a", "ab", "l", "o", "!", "ee", "ha", "1", "é", "猫", "🐶"]:
        for repeats in range(1, 30):
            word = unit * repeats
            assert tokenizer.encode(word) == reference.encode(word), word


def test_special_token_text_maps_to_special_ids(tokenizer: Tokenizer, reference) -> None:
    text = "x<|startoftext|>y <|ENDOFTEXT|>"
    assert tokenizer.encode(text) == reference.encode(text)
    assert 49406 in tokenizer.encode(text) and 49407 in tokenizer.encode(text)


def test_contractions_match_case_insensitively_as_openai(tokenizer: Tokenizer, reference) -> None:
    # OpenAI's expression is case-insensitive even on lowered text: "'ſ" (long s, which lower() keeps and which
    # folds to s) is the contraction "'s" as one piece, not "'" then "ſ"; so is "'\u0345" ("'ι" folded, no "'")
    for text in ["it'ſ", "Iſ'ſ ok", "x'\u0345"]:
        assert tokenizer.encode(text) == reference.encode(text), text
    apostrophe_then_long_s = tokenizer.encode("'") + tokenizer.encode("ſ")
    assert tokenizer.encode("it'ſ")[-len(apostrophe_then_long_s):] != apostrophe_then_long_s


def test_whitespace_clean_is_openai_s_with_regex_whitespace() -> None:
    # openai/CLIP's whitespace_clean uses the `regex` module, whose \s excludes the ASCII separators
    # \x1c-\x1f (Python's `re` and str.split count them as whitespace); ideographic space U+3000 is one
    assert clip.tokenizer.whitespace_clean(" a\x1cb\x1f \u3000 c\t") == "a\x1cb\x1f c"


def test_simple_tokenizer_bpe_leaves_special_tokens_whole(merges_path: Path, reference) -> None:
    # openai/CLIP's SimpleTokenizer starts its cache with the two special tokens, so bpe() returns them as
    # they are (as one token each) rather than merging their characters
    from clip.simple_tokenizer import SimpleTokenizer

    simple = SimpleTokenizer(merges_path)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        assert simple.bpe(special) == special == reference.bpe(special)
    assert simple.bpe("cat") == reference.bpe("cat") == "cat</w>"


def test_doubly_escaped_html_in_markup_is_unescaped_twice(tokenizer: Tokenizer, reference) -> None:
    # ftfy leaves entities alone in text that holds '<' (it may be HTML): html.unescape twice does both levels
    for text in ["<b>&amp;amp;</b>", "a < b &amp;amp; c", "x<y &amp;lt;3"]:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.encode("a < b &amp;amp; c") == tokenizer.encode("a < b & c")


def test_captions_match_reference(tokenizer: Tokenizer, reference, captions: list[str]) -> None:
    for caption in captions:
        assert tokenizer.encode(caption) == reference.encode(caption), caption
    rows = tokenizer(captions, truncate=True)
    assert rows.tolist() == reference.tokenize(captions)


def test_captions_match_open_clip(tokenizer: Tokenizer, open_clip_tokenizer, captions: list[str]) -> None:
    texts = captions + [text for text in KNOWN_IDS]
    for text in texts:
        assert tokenizer.encode(text) == open_clip_tokenizer.encode(text), text
    # open_clip always truncates, keeping the end token last.
    assert torch.equal(tokenizer(texts, truncate=True), open_clip_tokenizer(texts, context_length=77))


@PROPERTY_SETTINGS
@given(text=any_text)
def test_arbitrary_text_matches_reference(tokenizer: Tokenizer, reference, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert all(0 <= token_id < VOCAB_SIZE for token_id in ids)
    row = tokenizer(text, context_length=16, truncate=True)
    assert row.shape == (1, 16) and row[0, 0] == tokenizer.sot_token_id


def test_cache_stays_bounded_and_exact(merges_path: Path, reference) -> None:
    small = Tokenizer(merges_path, cache_entries=8)
    words = [f"word{index}x" for index in range(50)] + ["x" * 200]
    for word in words * 2:
        assert small.encode(word) == reference.encode(word)
        assert len(small._cached_ids) <= 8
    assert "x" * 200 not in small._cached_ids  # long chunks are not cached at all


def test_pickled_copy_encodes_the_same(tokenizer: Tokenizer) -> None:
    tokenizer.encode("a photo of a dog")
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy._cached_ids == {} and copy.encode("a photo of a dog") == tokenizer.encode("a photo of a dog")


# The shortcut that skips ftfy and html.unescape -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needs_cleaning"),
    [("a photo of a cat", False), ("salt & pepper", False), ("tabs\tand\nnewlines &", False),
     ("&amp;", True), ("AT&T", True), ("café", True), ("carriage\rreturn", True), ("\x1b[1m", True)],
)
def test_shortcut_is_taken_for_plain_ascii(text: str, needs_cleaning: bool) -> None:
    assert _needs_full_cleaning(text) is needs_cleaning


def _assert_shortcut_sound(text: str) -> None:
    if not _needs_full_cleaning(text):
        assert ftfy.fix_text(text) == text, repr(text)
        assert html.unescape(text) == text, repr(text)
        assert clean_text(text) == " ".join(text.lower().split()), repr(text)


def test_shortcut_sound_on_all_short_ascii() -> None:
    ascii_characters = [chr(code) for code in range(128)]
    for first in ascii_characters:
        _assert_shortcut_sound(first)
        for second in ascii_characters:
            _assert_shortcut_sound(first + second)
            _assert_shortcut_sound("&" + first + second)
            _assert_shortcut_sound(first + "&" + second)


@PROPERTY_SETTINGS
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=40) | tricky_text)
def test_shortcut_sound_on_generated_ascii(text: str) -> None:
    _assert_shortcut_sound(text)


@PROPERTY_SETTINGS
@given(text=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30) | tricky_text)
def test_ascii_pre_tokeniser_agrees_with_unicode_one(text: str) -> None:
    chunk = text.lower()
    if chunk.isascii() and chunk.isprintable() and " " not in chunk:
        unicode_pattern = regex.compile(PIECE_PATTERN, regex.IGNORECASE)
        assert re.findall(ASCII_PIECE_PATTERN, chunk) == unicode_pattern.findall(chunk)


# Batches, truncation and errors -------------------------------------------------------------------------


def test_call_layout(tokenizer: Tokenizer) -> None:
    tokens = tokenizer(["a photo of a cat", ""])
    assert tokens.dtype == torch.int32 and tokens.shape == (2, 77)  # openai/CLIP returns int32 too
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokens[1, :2].tolist() == [49406, 49407]
    assert not tokens[0, 7:].any() and not tokens[1, 2:].any()


def test_str_list_and_tuple_inputs_agree(tokenizer: Tokenizer) -> None:
    single = tokenizer("a photo of a cat")
    assert single.shape == (1, 77)
    assert torch.equal(single, tokenizer(["a photo of a cat"]))
    assert torch.equal(single, tokenizer(("a photo of a cat",)))
    assert tokenizer([]).shape == (0, 77)


@pytest.mark.parametrize("bad_input", [b"bytes", 3, None, ["ok", 5], {"a photo"}, {"a photo": 1}])
def test_non_text_input_is_a_type_error(tokenizer: Tokenizer, bad_input) -> None:
    with pytest.raises(TypeError):
        tokenizer(bad_input)


def test_any_ordered_iterable_of_text_and_numpy_lengths(tokenizer: Tokenizer) -> None:
    # What openai/CLIP's tokenize takes: numpy arrays of str (e.g. a pandas column's values), generators.
    expected = tokenizer(["a photo", "of a cat"], context_length=8)
    assert torch.equal(tokenizer(np.array(["a photo", "of a cat"]), context_length=np.int64(8)), expected)
    assert torch.equal(tokenizer((text for text in ["a photo", "of a cat"]), context_length=8), expected)


def test_encode_rejects_non_str(tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode(["a list"])


def test_too_long_text_raises_with_details(tokenizer: Tokenizer) -> None:
    text = "a photo of a cat " * 30
    with pytest.raises(ValueError) as raised:
        tokenizer(["fine", text])
    assert isinstance(raised.value, RuntimeError)  # what openai/CLIP raises; code catches it to truncate
    message = str(raised.value)
    assert "a photo of a cat a photo" in message and "..." in message  # the text, shortened
    assert "152 tokens" in message and "context_length=77" in message and "truncate=True" in message
    # Raised in a DataLoader worker, it is pickled to the main process: the same type, message and reason
    import pickle

    copied = pickle.loads(pickle.dumps(raised.value))
    assert type(copied) is type(raised.value) and str(copied) == message
    assert copied.reason == raised.value.reason and "truncate=True" not in copied.reason


def test_too_long_text_is_quoted_whole_up_to_60_characters(tokenizer: Tokenizer) -> None:
    for length, shown in [(60, "a" * 60), (61, "a" * 57 + "...")]:
        with pytest.raises(ValueError) as raised:
            tokenizer("a" * length, context_length=3)
        assert f"Text {shown!r} is" in str(raised.value), length
    # A numpy array's text is a numpy str: quoted as a plain str, not as np.str_('...')
    with pytest.raises(ValueError, match=r"^Text 'a photo of a cat' is 7 tokens long"):
        tokenizer(np.array(["a photo of a cat"]), context_length=4)


def test_truncation_keeps_end_token_last(tokenizer: Tokenizer, reference) -> None:
    text = "a photo of a cat " * 30
    tokens = tokenizer(text, truncate=True)[0]
    assert tokens[-1] == tokenizer.eot_token_id
    assert tokens[:-1].tolist() == [tokenizer.sot_token_id, *tokenizer.encode(text)[:75]]
    assert tokens.tolist() == reference.tokenize([text])[0]


def test_exact_fit_is_not_truncated(tokenizer: Tokenizer) -> None:
    text = " ".join(["cat"] * 75)  # 75 tokens + start + end = 77
    tokens = tokenizer(text)[0]
    assert tokens[-1] == tokenizer.eot_token_id and tokens[-2] == 2368
    with pytest.raises(ValueError, match="78 tokens"):
        tokenizer(text + " cat")


def test_context_length_edge_cases(tokenizer: Tokenizer) -> None:
    assert tokenizer("", context_length=2).tolist() == [[49406, 49407]]
    assert tokenizer("cat", context_length=2, truncate=True).tolist() == [[49406, 49407]]
    assert tokenizer("cat", context_length=3).tolist() == [[49406, 2368, 49407]]
    with pytest.raises(ValueError, match="context_length=2"):
        tokenizer("cat", context_length=2)
    # No text fits in one token (it needs the start and end tokens), so without truncate it is too long, and a
    # RuntimeError as openai/CLIP's; an empty batch has nothing to refuse.
    for text in ("cat", ""):
        with pytest.raises(RuntimeError, match="more than context_length=1; pass truncate=True"):
            tokenizer(text, context_length=1)
    assert tokenizer([], context_length=1).shape == (0, 1)
    for too_small in (0, -5):
        with pytest.raises(ValueError, match=f"context_length must be at least 1 .*got {too_small}"):
            tokenizer("cat", context_length=too_small)
        with pytest.raises(ValueError, match="at least 1"):
            tokenizer("cat", context_length=too_small, truncate=True)
    for not_int in (77.0, "77", True):
        with pytest.raises(TypeError, match="context_length"):
            tokenizer("cat", context_length=not_int)


def test_truncating_to_tiny_contexts_follows_openai(tokenizer: Tokenizer, reference) -> None:
    # openai/CLIP keeps the first context_length tokens and overwrites the last with the end token: with one
    # token that is the end token alone (the start token overwritten), with two the start and end tokens.
    texts = ["", "cat", "a photo of a cat", "東京の猫"]
    assert tokenizer(texts, context_length=1, truncate=True).tolist() == [[tokenizer.eot_token_id]] * len(texts)
    for context_length in (1, 2, 3):
        rows = tokenizer(texts, context_length=context_length, truncate=True)
        assert rows.dtype == torch.int32
        assert rows.tolist() == reference.tokenize(texts, context_length=context_length), context_length


# Decoding -----------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(words=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12), max_size=10))
def test_decode_round_trips_lowercase_words(tokenizer: Tokenizer, words: list[str]) -> None:
    text = " ".join(words)
    # Like OpenAI's decoder, every word ends in a space.
    assert tokenizer.decode(tokenizer.encode(text)) == "".join(word + " " for word in words)


def test_decode_matches_open_clip(tokenizer: Tokenizer, open_clip_tokenizer, captions: list[str]) -> None:
    for text in captions[:50] + list(KNOWN_IDS):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == open_clip_tokenizer.decode(ids)


def test_decode_of_a_padded_row(tokenizer: Tokenizer) -> None:
    row = tokenizer("A photo of a café!")[0]
    assert tokenizer.decode(row) == "a photo of a café ! "
    assert tokenizer.decode(row.numpy()) == tokenizer.decode(row.tolist())
    spelled = tokenizer.decode(row[:4], skip_special_tokens=False)
    assert spelled == "<|startoftext|>a photo of "


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE, 2.5, "3", True])  # True would read as id 1
def test_decode_rejects_non_ids(tokenizer: Tokenizer, bad_id) -> None:
    with pytest.raises(ValueError, match="not a token id"):
        tokenizer.decode([320, bad_id])



def test_decode_of_a_whole_batch_or_a_single_id_says_what_it_takes(tokenizer: Tokenizer) -> None:
    # decode(tokenize(texts)), the first thing a notebook tries, listed all 77 ids of the first row as "not a
    # token id"; a lone id failed with "'int' object is not iterable"
    tokens = tokenizer(["a cat", "a dog"])
    as_tuples = [tuple(row) for row in tokens.tolist()]
    for batch in (tokens, tokens.numpy(), tokens.tolist(), as_tuples, tuple(as_tuples)):
        with pytest.raises(ValueError, match=r"one text's token ids.*\[decode\(row\) for row in tokens\]"):
            tokenizer.decode(batch)
    for lone in (320, torch.tensor(320), np.int64(320)):
        with pytest.raises(TypeError, match=r"a sequence of token ids.*\[320\]"):
            tokenizer.decode(lone)
    assert tokenizer.decode(torch.tensor([320])) == "a "

def test_decode_accepts_numpy_integers(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode([np.int64(320), np.int32(2368)]) == "a cat "


def test_decode_of_cut_utf8_shows_replacement_characters(tokenizer: Tokenizer, reference) -> None:
    # A row cut inside a character (truncation, a model's generated ids) leaves bytes that are not UTF-8:
    # OpenAI's decode shows each bad sequence as U+FFFD rather than dropping it silently
    cat_ids = tokenizer.encode("猫")
    first_byte_id = list(bytes_to_unicode()).index("猫".encode("utf-8")[0])
    for ids in ([first_byte_id, 320], [first_byte_id]):
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.decode([first_byte_id, 320]) == "\ufffda "
    assert tokenizer.decode(cat_ids) == "猫 "


# Module-level API and laziness --------------------------------------------------------------------------


def test_module_functions_use_the_cache_dir(monkeypatch, tmp_path: Path, merges_path: Path) -> None:
    shutil.copy(merges_path, tmp_path / MERGES_NAME)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    clip.tokenizer.get_tokenizer.cache_clear()
    try:
        expected = [49406, *KNOWN_IDS["a photo of a cat"], 49407]
        assert clip.tokenizer.tokenize("a photo of a cat")[0, :7].tolist() == expected
        assert clip.tokenizer.get_tokenizer() is clip.tokenizer.get_tokenizer()
        assert clip.tokenizer.decode([320, 2368]) == "a cat "
    finally:
        clip.tokenizer.get_tokenizer.cache_clear()
    assert clip.download.sha256_of_file(tmp_path / MERGES_NAME) == MERGES_SHA256


def test_import_reads_nothing(monkeypatch, tmp_path: Path) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("no downloads in this test")

    def refuse_to_read(*args, **kwargs):
        raise AssertionError("the merges file was read at import time")

    original = sys.modules["clip.tokenizer"]
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(clip.download, "download", refuse)
    monkeypatch.delitem(sys.modules, "clip.tokenizer")  # both restored to the original module after the test
    monkeypatch.delattr(clip, "tokenizer")
    with monkeypatch.context() as patched:
        patched.setattr(gzip, "open", refuse_to_read)
        fresh = importlib.import_module("clip.tokenizer")
    assert fresh is not original
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="no downloads"):
        fresh.tokenize("a photo of a cat")


def test_long_pieces_match_reference(tokenizer: Tokenizer, reference) -> None:
    # Pieces above LONG_PIECE_IDS byte tokens take the heap-based merge; the same merges in the same order
    generator = random.Random(0)
    words = [unit * repeats for unit in ["a", "ab", "lol", "é", "猫", "hello", "aab"] for repeats in (70, 131, 300)]
    for alphabet in ["ab", "abcdefgh", "thequickbrownfoxjumps", "éèü中"]:
        words += ["".join(generator.choice(alphabet) for _ in range(generator.randint(129, 600))) for _ in range(8)]
    for word in words:
        assert tokenizer.encode(word) == reference.encode(word), word[:40]


def _megabyte_word_row(merges_path: Path) -> tuple[int, int]:
    row = Tokenizer(merges_path)("\u00e9" * 500_000, truncate=True)
    return row.shape[1], int((row[0] != 0).sum())


def test_a_megabyte_word_is_tokenized_without_stalling(merges_path: Path) -> None:
    # BPE rescanned the whole piece for every merge: a 1 MB word (a base64 blob in a web caption) took hours,
    # also with truncate=True, which cuts the tokens only after encoding all of them. The timeout only
    # detects such a stall (in a fork, which it kills).
    from multiprocess import run_in_fork

    assert run_in_fork(_megabyte_word_row, merges_path, timeout_s=240) == (77, 77)


@pytest.mark.parametrize(
    "content",
    [b"#version: 0.2\ni n\n", gzip.compress(b"#version: 0.2\n" * 1000)[:30],
     gzip.compress(b"#version: 0.2\n" + b"\xe9 n\n" * NUM_MERGES),
     gzip.compress(b"#version: 0.2\n" + b"".join(b"q%d r%d\n" % (i, i) for i in range(NUM_MERGES))),
     gzip.compress(b"#version: 0.2\n" + b"i n\n" * (NUM_MERGES - 1) + b"i n g\n"),
     gzip.compress(b"#version: 0.2\n" + b"i n\n" * NUM_MERGES)],
    ids=["not gzipped", "truncated", "not UTF-8", "unknown tokens", "not a pair", "the same token twice"],
)
def test_a_merges_file_of_another_kind_is_a_value_error_naming_it(tmp_path: Path, content: bytes) -> None:
    # BadGzipFile, EOFError and UnicodeDecodeError escaped without the file's name, and merges of tokens that
    # no byte or earlier merge gives a KeyError
    path = tmp_path / "merges.txt.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"merges\.txt\.gz is not a CLIP merges file"):
        Tokenizer(path)
