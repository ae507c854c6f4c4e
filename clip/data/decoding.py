"""Robust decoding of image bytes and captions: every failure becomes a `SkipSample` of a named kind.

Kinds of skipped samples (the sample is dropped and the next good one takes its place in the batch):
    missing_file        a manifest row's image file does not exist
    empty_file          a zero-byte image file
    not_an_image        bytes no image decoder recognises (a text or HTML file named .jpg, ...)
    truncated           an image whose data ends early
    corrupt_image       any other decoding error
    decompression_bomb  more pixels than `max_image_pixels` (PIL's DecompressionBombError or -Warning)
    empty_caption       a caption that is empty or only whitespace, also once cleaned as the tokenizer cleans
                        it ("&nbsp;", control characters)
    bad_utf8            a caption that is not valid UTF-8
    missing_image / missing_caption   a shard sample without an image / a caption member
    missing_shard / shard_read_error / shard_too_short   planned shard samples that could not be read
Repairs (the sample is kept): converted_to_rgb (palette, CMYK, 16-bit, alpha, greyscale, ... via
`clip.image_modes.to_rgb`), exif_rotated, caption_truncated (cut to the context length by the tokenizer; a
caption over CAPTION_CHARS_KEPT characters is cut to that many first).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from ..image_modes import TRAINING_ALPHA_BACKGROUND, apply_exif_orientation, has_transparency_entry, to_rgb
from ..tokenizer import cleans_to_nothing

log = logging.getLogger(__name__)

# Shard member extensions that hold an image, in the order they are looked for.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# What PIL may identify web data as. Untrusted bytes never reach PIL's other plugins (EPS, for one, would run
# Ghostscript on them). Multi-picture JPEGs from cameras and phones open through the JPEG plugin (older
# Pillows register them as "MPO" too); names this Pillow does not register are left out (see registered_formats).
DECODED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
CAPTION_EXTENSIONS = ("txt",)


def registered_formats(names: tuple[str, ...] = DECODED_FORMATS) -> tuple[str, ...]:
    """Those of the PIL format `names` this Pillow registers, for Image.open's `formats`."""
    Image.init()  # registers every plugin once; later calls return at once
    return tuple(name for name in names if name in Image.OPEN)


class SkipSample(Exception):
    """A sample that cannot be used; `kind` is one of the kinds listed in this module's docstring."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


# The tokenizer cleans and splits a caption whole before cutting its tokens to the context length: a 300 MB
# caption member in a 300 KB compressed shard took a loader worker to 6 GB and half a minute for one batch.
# 77 tokens come from a few hundred characters; only a caption whose first 64 Ki characters hold fewer tokens
# than the context (a run of whitespace or markup that long) reads differently cut.
CAPTION_CHARS_KEPT = 1 << 16


def decode_caption(raw: bytes | str, max_chars: int | None = CAPTION_CHARS_KEPT) -> str:
    """UTF-8 bytes (or an already decoded str) -> stripped text, cut to `max_chars` characters (None: whole,
    as make_shards stores it); SkipSample for bad or empty captions."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkipSample("bad_utf8", str(error)) from None
    text = raw.strip()
    if not text:
        raise SkipSample("empty_caption")
    text = text if max_chars is None else text[:max_chars]
    if cleans_to_nothing(text[:CAPTION_CHARS_KEPT]):
        # "&nbsp;", a byte-order mark, control characters: the tokenizer's cleaning leaves nothing, and the
        # sample would be trained on as an empty text
        raise SkipSample("empty_caption", "nothing left once cleaned as the tokenizer cleans it")
    return text


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Within the block, PIL's decompression-bomb limit is `max_pixels` and its DecompressionBombWarning
    (over the limit; the Error comes at twice the limit) is raised as an error; both are restored after.
    Scoped, because with workers=0 this runs in the training process, whose settings must not change."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(data: bytes, max_pixels: int | None, draft_size: int | None) -> Image.Image:
    """Decodes image bytes (call inside `pil_pixel_limit`). `draft_size`: a JPEG may be decoded at 1/2, 1/4
    or 1/8 scale as long as both sides stay >= draft_size -- libjpeg then skips most of the work."""
    if not data:
        raise SkipSample("empty_file")
    try:
        image = Image.open(io.BytesIO(data), formats=registered_formats())
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise SkipSample("decompression_bomb", f"{image.width}x{image.height} pixels")
        if draft_size is not None and image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with more pictures
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        return image
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise SkipSample("decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise SkipSample("truncated" if _ends_before_its_header_says(data) else "not_an_image") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        ends_early = "truncat" in str(error).lower() or _ends_before_its_header_says(data)
        raise SkipSample("truncated" if ends_early else "corrupt_image", f"{type(error).__name__}: {error}") from None


# The bytes of one value of each TIFF field type (TIFF 6.0: BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED,
# SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE)
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


def _ends_before_its_header_says(data: bytes) -> bool:
    """Whether a WebP's RIFF size, or a TIFF's first directory (its entries, the values they point to, the next
    directory's offset), reaches past the end of `data`: their decoders' errors do not say "truncated" (a cut WebP
    was counted as a corrupt image, a cut TIFF, whose directory and its values sit at its end, as not an image at
    all)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if data[:4] not in (b"II*\0", b"MM\0*"):
        return False
    order = "little" if data[:2] == b"II" else "big"
    directory = int.from_bytes(data[4:8], order)
    if directory + 2 > len(data):
        return True
    count = int.from_bytes(data[directory : directory + 2], order)
    if directory + 2 + 12 * count + 4 > len(data):  # its entries, then the next directory's offset
        return True
    for entry in range(directory + 2, directory + 2 + 12 * count, 12):
        kind = int.from_bytes(data[entry + 2 : entry + 4], order)
        size = _TIFF_TYPE_BYTES.get(kind, 1) * int.from_bytes(data[entry + 4 : entry + 8], order)
        if size > 4 and int.from_bytes(data[entry + 8 : entry + 12], order) + size > len(data):  # stored elsewhere
            return True
    return False


def upright_rgb(image: Image.Image, repairs: list[str]) -> Image.Image:
    """EXIF orientation applied and any mode converted to RGB; each change is appended to `repairs`."""
    try:
        rotated = apply_exif_orientation(image)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        rotated = image
    if rotated is not image:
        repairs.append("exif_rotated")
    if rotated.mode != "RGB" or has_transparency_entry(rotated):  # an RGB colour key is composited as well
        repairs.append("converted_to_rgb")
        try:
            # onto the background that evaluation and clip.load use for models trained here too
            rotated = to_rgb(rotated, alpha_background=TRAINING_ALPHA_BACKGROUND, exif_orientation=False)
        except Exception as error:
            raise SkipSample("corrupt_image", f"cannot convert mode {rotated.mode}: {error}") from None
    return rotated


def find_member(sample: dict, preferred: str, extensions: tuple[str, ...]) -> bytes | None:
    """The bytes of a shard sample's member: `preferred` extension first, then `extensions` in order."""
    for extension in (preferred, *extensions):
        value = sample.get(extension)
        if isinstance(value, bytes):
            return value
    return None


# Kinds that a whole shard (or its rest) is skipped for; their `item` is the shard
SHARD_FAULTS = ("missing_shard", "shard_read_error", "shard_too_short")
# Broken shards a worker names each, before they share the rate-limited lines of the other kinds
SHARDS_NAMED = 100


class SkipLog:
    """Rate-limited log lines about skipped samples: at most one per kind every `interval_s` seconds, saying
    how many were skipped since the last line and the latest one's details. A broken shard is named once, as
    its first planned sample is skipped: the rate-limited line named one shard a minute (the next ones were
    never named) and said "skipped 1 missing_shard sample(s)" of a shard whose every sample was lost."""

    def __init__(self, interval_s: float, where: str) -> None:
        self.interval_s = interval_s
        self.where = where
        self.last_logged: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}
        self.named_shards: set[str] = set()

    def record(self, kind: str, source: str, item: str, detail: str) -> None:
        if kind in SHARD_FAULTS and (item in self.named_shards or len(self.named_shards) < SHARDS_NAMED):
            if item not in self.named_shards:
                self.named_shards.add(item)
                log.warning("%s: %s: shard %s (%s): the samples planned from it are skipped and counted as %s",
                            self.where, source, item, detail, kind)
            return
        self.unlogged[kind] = self.unlogged.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last_logged.get(kind, float("-inf")) < self.interval_s:
            return
        count = self.unlogged.pop(kind)
        since = f"in the last {self.interval_s:.0f}s" if kind in self.last_logged else "so far"
        self.last_logged[kind] = now
        log.warning(
            "%s: skipped %d %s sample(s) %s; latest from %s: %s%s",
            self.where, count, kind, since, source, item, f" ({detail})" if detail else "",
        )
