"""Bad input never stops a run: each kind of broken sample is skipped or repaired, and counted exactly."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import build, caption_of, captions, image_bytes, take

from clip.data import SourceConfig, counts_line, decoding
from clip.data.decoding import (
    IMAGE_EXTENSIONS,
    SkipLog,
    SkipSample,
    decode_caption,
    find_member,
    open_image,
    pil_pixel_limit,
    upright_rgb,
)
from clip.data.transform import (
    BatchImageWriter,
    PixelNormalizer,
    center_crop_box,
    draft_size,
    random_resized_crop_box,
    random_square_box,
)
from clip.preprocess import OPENAI_MEAN, OPENAI_STD, image_transform

PIXEL_LIMIT = 2000  # the test images are 24 x 20 = 480 pixels


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb_image(size: tuple[int, int] = (24, 20), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return encoded(rgb_image(), "JPEG", exif=exif)


def sixteen_bit_png() -> bytes:
    image = Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16))  # mode I;16
    return encoded(image, "PNG")


# (file name, image bytes or None for a missing file, caption bytes)
REPAIRED = {
    "palette.png": (lambda: encoded(rgb_image().convert("P"), "PNG"), "converted_to_rgb"),
    "cmyk.jpg": (lambda: encoded(rgb_image().convert("CMYK"), "JPEG"), "converted_to_rgb"),
    "sixteen.png": (sixteen_bit_png, "converted_to_rgb"),
    "alpha.png": (lambda: encoded(rgb_image().convert("RGBA"), "PNG"), "converted_to_rgb"),
    "rotated.jpg": (exif_rotated_jpeg, "exif_rotated"),
}
SKIPPED = {
    "missing.jpg": (None, b"a fine caption", "missing_file"),
    "empty.jpg": (b"", b"a fine caption", "empty_file"),
    "truncated.jpg": (image_bytes(99)[:300], b"a fine caption", "truncated"),
    "text.jpg": (b"<html>not an image</html>", b"a fine caption", "not_an_image"),
    "bomb.png": (encoded(rgb_image((50, 50)), "PNG"), b"a fine caption", "decompression_bomb"),  # 2500 > limit
    "bigbomb.png": (encoded(rgb_image((70, 70)), "PNG"), b"a fine caption", "decompression_bomb"),  # > 2x limit
    "nocaption.jpg": (image_bytes(98), b"   ", "empty_caption"),
    "badutf8.jpg": (image_bytes(97), b"caf\xe9 au lait", "bad_utf8"),
    # A NUL byte in a path (a row torn by a crash mid-append): open() raises ValueError, not OSError
    "nul\x00.jpg": (None, b"a fine caption", "unreadable_file"),
}


def write_bad_manifest(folder: Path) -> tuple[Path, list[str]]:
    """Ten plain samples, five images needing repair, one over-long caption, and one sample of each kind
    that must be skipped. Returns the manifest and the captions of the usable samples."""
    rows, good = [], []
    for i in range(10):
        (folder / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append((f"{i}.jpg", caption_of(i).encode()))
        good.append(caption_of(i))
    for number, (name, (make, _)) in enumerate(REPAIRED.items(), start=10):
        (folder / name).write_bytes(make())
        rows.append((name, caption_of(number).encode()))
        good.append(caption_of(number))
    (folder / "long.jpg").write_bytes(image_bytes(15))
    rows.append(("long.jpg", (caption_of(15) + " and on" * 30).encode()))
    good.append(caption_of(15))
    for name, (data, caption, _) in SKIPPED.items():
        if data is not None:
            (folder / name).write_bytes(data)
        rows.append((name, caption))
    manifest = folder / "train.csv"
    lines = b"".join(name.encode() + b"," + caption + b"\n" for name, caption in rows)
    manifest.write_bytes(b"image,caption\n" + lines)
    return manifest, good


def test_an_epoch_of_bad_input_completes_with_exact_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest, good = write_bad_manifest(tmp_path)
    source = SourceConfig(kind="manifest", path=str(manifest), name="bad")
    # Batches of 4 take exactly the 16 usable samples; with a seed whose epoch order ends on a usable sample,
    # four batches consume exactly one epoch (position [1, 0]), so every count below is one epoch's.
    for seed in range(40):
        data = build([source], batch_size=4, seed=seed, max_image_pixels=PIXEL_LIMIT)
        with caplog.at_level(logging.WARNING, logger="clip.data.decoding"), caplog.at_level(logging.INFO, "clip.data"):
            batches = take(data, 4)
        if data.state_dict()["positions"] == [[1, 0]]:
            break
        data.close()
    else:
        pytest.fail("no seed ends the epoch on a usable sample")
    seen = [caption[: len(caption_of(0))] for caption in captions(batches)]
    assert Counter(seen) == Counter(good)  # every usable sample once, including the repaired ones
    stats = data.stats()
    assert stats["sources"]["bad"] == {
        "samples": 16,
        "skipped": dict(Counter(kind for _, _, kind in SKIPPED.values())),
        "repaired": {"converted_to_rgb": 4, "exif_rotated": 1, "caption_truncated": 1},
    }
    assert stats["skipped"] == len(SKIPPED) and stats["epoch"] == 1
    assert all(torch.isfinite(images).all() for images, _ in batches)
    assert "skipped 1 missing_file sample(s)" in caplog.text  # one rate-limited line per kind
    assert f"bad: 16 samples, skipped {len(SKIPPED)} (" in caplog.text  # the summary logged at the data epoch's end
    summary = data.summary_since_previous()
    assert "bad: 16 samples" in summary and "decompression_bomb 2" in summary and "caption_truncated 1" in summary
    assert "0 samples" in data.summary_since_previous()  # counts since the previous summary
    data.close()
    assert Image.MAX_IMAGE_PIXELS != PIXEL_LIMIT  # the limit was set only while decoding


def test_formats_outside_the_web_image_list_are_never_handed_to_their_plugins() -> None:
    # PIL would identify this as EPS (and run Ghostscript on it where installed); web data is not trusted.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(SkipSample) as caught:
        open_image(eps, PIXEL_LIMIT, None)
    assert caught.value.kind == "not_an_image"
    mpo = io.BytesIO()
    rgb_image().save(mpo, format="MPO")  # what phones and cameras write: still decoded
    assert open_image(mpo.getvalue(), PIXEL_LIMIT, None).size == (24, 20)


def test_open_image_classifies_failures() -> None:
    with pil_pixel_limit(PIXEL_LIMIT):
        for name, (data, _, kind) in SKIPPED.items():
            if data is None or kind in ("empty_caption", "bad_utf8"):
                continue
            with pytest.raises(SkipSample) as error:
                open_image(data, PIXEL_LIMIT, draft_size=None)
            assert error.value.kind == kind, name
    previous = Image.MAX_IMAGE_PIXELS
    with pil_pixel_limit(None):  # disabled: a big image decodes
        assert open_image(SKIPPED["bigbomb.png"][0], None, None).size == (70, 70)
    assert Image.MAX_IMAGE_PIXELS == previous


def test_an_image_of_exactly_max_image_pixels_is_decoded() -> None:
    # max_image_pixels is the most an image may have, as PIL's own limit (its warning is for more than it): an
    # image of exactly that many pixels is used, one more pixel is a decompression_bomb.
    data = encoded(rgb_image((24, 20)), "PNG")
    with pil_pixel_limit(24 * 20):
        assert open_image(data, 24 * 20, draft_size=None).size == (24, 20)
    with pil_pixel_limit(24 * 20 - 1), pytest.raises(SkipSample) as error:
        open_image(data, 24 * 20 - 1, draft_size=None)
    assert error.value.kind == "decompression_bomb"


def test_a_shard_samples_named_member_comes_before_the_usual_extensions() -> None:
    # image_column names the member to use: a sample with a full-size .png and a .jpg thumbnail gives the .png
    # when image_column = "png", though .jpg comes first among the image extensions; a field that is no
    # member's bytes (webdataset's __key__ and __url__ are str) is passed over
    sample = {"__key__": "k", "__url__": "s.tar", "jpg": b"thumbnail", "png": b"full size"}
    assert find_member(sample, "png", IMAGE_EXTENSIONS) == b"full size"
    assert find_member(sample, "jpeg", IMAGE_EXTENSIONS) == b"thumbnail"
    assert find_member(sample, "__key__", IMAGE_EXTENSIONS) == b"thumbnail"
    assert find_member(sample, "__url__", ("txt",)) is None


def test_the_loader_puts_an_rgb_colour_keys_pixels_on_white() -> None:
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    image.putpixel((1, 1), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=(0, 0, 0))  # black is transparent
    repairs: list[str] = []
    upright = upright_rgb(open_image(buffer.getvalue(), None, None), repairs)
    assert upright.getpixel((0, 0)) == (255, 255, 255) and upright.getpixel((1, 1)) == (200, 30, 30)
    assert repairs == ["converted_to_rgb"]


def test_repairs_give_upright_rgb() -> None:
    for name, (make, repair) in REPAIRED.items():
        repairs: list[str] = []
        image = upright_rgb(open_image(make(), None, None), repairs)
        assert image.mode == "RGB" and repairs == [repair], name
        assert image.size == ((20, 24) if name == "rotated.jpg" else (24, 20)), name
    sixteen = upright_rgb(open_image(sixteen_bit_png(), None, None), [])
    assert np.asarray(sixteen).mean() == pytest.approx(40000 / 65535 * 255, abs=1)  # scaled, not clipped


def test_an_orientation_tag_outside_1_to_8_is_no_rotation() -> None:
    # Some software writes orientation 0 (undefined); PIL's exif_transpose returns a copy for it, and such
    # images were counted as exif_rotated, a repair nobody made.
    for orientation in (0, 9, 99):
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = open_image(encoded(rgb_image(), "JPEG", exif=exif), None, None)
        repairs: list[str] = []
        assert upright_rgb(image, repairs) is image and repairs == [], orientation


def test_captions() -> None:
    assert decode_caption(b"  a cat \n") == "a cat"
    for raw, kind in [(b"", "empty_caption"), (b" \t", "empty_caption"), (b"\xff\xfe", "bad_utf8")]:
        with pytest.raises(SkipSample) as error:
            decode_caption(raw)
        assert error.value.kind == kind


def test_a_caption_the_tokenizer_cleans_to_nothing_is_an_empty_caption() -> None:
    # They passed as captions and were trained on as [start, end] alone
    import clip

    for raw in ["&nbsp;", "&amp;nbsp;", "\ufeff", "\x00\x01", "&nbsp; &#32;\t&amp;nbsp;"]:
        assert clip.tokenize(raw)[0, 2] == 0, raw  # what the tokenizer makes of it: nothing
        with pytest.raises(SkipSample) as error:
            decode_caption(raw.encode())
        assert error.value.kind == "empty_caption", raw
    for raw in ["a &amp; b", "!!!", "\U0001F600", "Tom & Jerry", "\ufeffcat", "&lt;3"]:
        assert decode_caption(raw.encode()) == raw  # something is left: kept as it is
        assert clip.tokenize(raw)[0, 2] != 0, raw


def test_a_huge_caption_is_cut_before_it_reaches_the_tokenizer() -> None:
    # The tokenizer cleans and splits a caption whole: a 300 MB caption member of a 300 KB compressed shard took
    # a worker to 6 GB. Cut to CAPTION_CHARS_KEPT characters, its 77 tokens are the same.
    import clip
    from clip.data.decoding import CAPTION_CHARS_KEPT

    words = " ".join(f"word{index % 1000}" for index in range(200_000)).encode()  # 1.6 MB
    cut = decode_caption(b"  " + words)
    assert cut == words.decode()[:CAPTION_CHARS_KEPT]
    assert torch.equal(clip.tokenize(cut, truncate=True), clip.tokenize(words.decode(), truncate=True))
    assert decode_caption(words[:CAPTION_CHARS_KEPT]) == words[:CAPTION_CHARS_KEPT].decode()  # at the limit: whole


def test_jpeg_draft_decodes_at_reduced_size_but_not_below_target() -> None:
    data = encoded(rgb_image((500, 375)), "JPEG")
    assert open_image(data, None, draft_size=224).size == (500, 375)  # 1/2 would be 188 < 224
    assert open_image(data, None, draft_size=90).size == (125, 94)  # 1/4 keeps both sides >= 90
    assert open_image(data, None, draft_size=None).size == (500, 375)
    # Many phones' JPEGs hold a second picture, which Pillow names MPO: decoded at reduced size as well
    multi = io.BytesIO()
    rgb_image((500, 375)).save(multi, format="MPO", save_all=True, append_images=[rgb_image((500, 375))])
    assert open_image(multi.getvalue(), None, draft_size=90).size == (125, 94)


def test_skip_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    log = SkipLog(interval_s=3600, where="test")
    with caplog.at_level(logging.WARNING, logger="clip.data.decoding"):
        for i in range(5):
            log.record("truncated", "src", f"file{i}", "detail")
        log.record("not_an_image", "src", "x", "")
    assert len(caplog.records) == 2
    # Each line says how many were skipped since the one before it: the first, so far
    caplog.clear()
    log = SkipLog(interval_s=0, where="test")
    with caplog.at_level(logging.WARNING, logger="clip.data.decoding"):
        log.record("truncated", "src", "file0", "")
        log.record("truncated", "src", "file1", "")
    assert [record.getMessage() for record in caplog.records] == [
        "test: skipped 1 truncated sample(s) so far; latest from src: file0",
        "test: skipped 1 truncated sample(s) in the last 0s; latest from src: file1",
    ]


def test_each_skip_log_line_counts_the_skips_since_the_line_before(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The count was never checked against skips held back by the rate limit: a line that said "skipped 1" for
    # every minute's skips, however many, passed the suite. The clock is the test's own
    clock = [1000.0]
    monkeypatch.setattr(decoding, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    log = SkipLog(interval_s=60, where="w")
    with caplog.at_level(logging.WARNING, logger="clip.data.decoding"):
        log.record("truncated", "src", "file0", "")  # the first of a kind: a line at once
        for now, item in [(1010.0, "file1"), (1020.0, "file2"), (1059.0, "file3")]:  # within the minute: held back
            clock[0] = now
            log.record("truncated", "src", item, "")
        log.record("not_an_image", "src", "other", "")  # another kind keeps its own count and clock
        clock[0] = 1061.0
        log.record("truncated", "src", "file4", "cut at 99 bytes")
        clock[0] = 1100.0
        log.record("truncated", "src", "file5", "")
        clock[0] = 1121.0  # exactly the interval after the last line
        log.record("truncated", "src", "file6", "")
    assert [record.getMessage() for record in caplog.records] == [
        "w: skipped 1 truncated sample(s) so far; latest from src: file0",
        "w: skipped 1 not_an_image sample(s) so far; latest from src: other",
        "w: skipped 4 truncated sample(s) in the last 60s; latest from src: file4 (cut at 99 bytes)",
        "w: skipped 2 truncated sample(s) in the last 60s; latest from src: file6",
    ]


def test_skip_log_names_each_broken_shard_once(caplog: pytest.LogCaptureFixture) -> None:
    # Rate-limited by kind, the second and third broken shards went unnamed, and the first line said "skipped 1
    # missing_shard sample(s)" of a shard whose 8 samples were all lost
    log = SkipLog(interval_s=3600, where="w")
    with caplog.at_level(logging.WARNING, logger="clip.data.decoding"):
        for shard, kind in [("d/1.tar", "missing_shard"), ("d/2.tar", "missing_shard"), ("d/3.tar", "shard_read_error")]:
            for _ in range(8):
                log.record(kind, "web", shard, "why")
        log.record("missing_shard", "web", "d/1.tar", "why")  # read again (another range, a resampled epoch)
        log.record("truncated", "web", "d/4.tar:0004", "")
    assert [record.getMessage() for record in caplog.records] == [
        "w: web: shard d/1.tar (why): the samples planned from it are skipped and counted as missing_shard",
        "w: web: shard d/2.tar (why): the samples planned from it are skipped and counted as missing_shard",
        "w: web: shard d/3.tar (why): the samples planned from it are skipped and counted as shard_read_error",
        "w: skipped 1 truncated sample(s) so far; latest from web: d/4.tar:0004",
    ]
    # Past decoding.SHARDS_NAMED shards, the rest share the rate-limited line of their kind
    caplog.clear()
    log = SkipLog(interval_s=3600, where="w")
    with caplog.at_level(logging.WARNING, logger="clip.data.decoding"):
        for shard in range(decoding.SHARDS_NAMED + 5):
            log.record("missing_shard", "web", f"d/{shard}.tar", "why")
    assert len(caplog.records) == decoding.SHARDS_NAMED + 1
    assert caplog.records[-1].getMessage() == (
        f"w: skipped 1 missing_shard sample(s) so far; latest from web: d/{decoding.SHARDS_NAMED}.tar (why)")


def test_batch_writer_matches_image_transform() -> None:
    # Resizing image_transform's crop box directly gives its pixels, up to one grey level of box rounding.
    one_grey_level = 1.01 / (255 * min(OPENAI_STD))
    rng = np.random.default_rng(0)
    # 23 x 16 to 16: a 7-pixel margin, whose half image_transform rounds to 4 (half to even), not 3
    for width, height, size in [(120, 90, 16), (500, 375, 224), (375, 500, 224), (225, 224, 224), (1000, 300, 224),
                                (23, 16, 16), (16, 23, 16)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out = torch.empty(1, 3, size, size, dtype=torch.uint8)
        BatchImageWriter(size).write(image, center_crop_box(width, height, size), out[0])
        difference = (PixelNormalizer("cpu")(out)[0] - image_transform(size)(image)).abs()
        assert difference.max() <= one_grey_level and difference.mean() < 1e-4, (width, height)


def test_batch_writer_matches_image_transform_on_white_for_transparent_images() -> None:
    # The loader composites transparency onto white before resizing (upright_rgb), as image_transform does
    # with alpha_background=white; the default image_transform follows openai/CLIP instead.
    one_grey_level = 1.01 / (255 * min(OPENAI_STD))
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    pixels[:, :40, 3] = 0  # a hard alpha edge
    image = Image.fromarray(pixels, mode="RGBA")
    out = torch.empty(1, 3, 32, 32, dtype=torch.uint8)
    BatchImageWriter(32).write(upright_rgb(image, []), center_crop_box(120, 90, 32), out[0])
    out = PixelNormalizer("cpu")(out)[0]
    difference = (out - image_transform(32, alpha_background=(255, 255, 255))(image)).abs()
    assert difference.max() <= one_grey_level
    assert (out - image_transform(32)(image)).abs().max() > 10 * one_grey_level


def test_random_resized_crop_box_is_seeded_and_inside_the_image() -> None:
    boxes = [random_resized_crop_box(120, 90, np.random.default_rng(seed)) for seed in range(50)]
    assert boxes[3] == random_resized_crop_box(120, 90, np.random.default_rng(3))
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
        assert 0.9 * 120 * 90 - 200 <= (right - left) * (bottom - top) <= 120 * 90
    assert len(set(boxes)) > 10
    # On a small image every place is drawn, the far edges too (an offset one short never reached them)
    boxes = [random_resized_crop_box(40, 30, np.random.default_rng(seed)) for seed in range(50)]
    assert any(right == 40 and left > 0 for left, _, right, _ in boxes)
    assert any(bottom == 30 and top > 0 for _, top, _, bottom in boxes)


def test_random_resized_crop_ratios_are_log_uniform() -> None:
    # As torchvision's RandomResizedCrop: log(ratio) uniform, so a ratio and its inverse are equally likely (a
    # uniform draw over 3/4..4/3 made 59% of the crops wider than tall). A quarter of the area always fits.
    quarter = (0.25, 0.25)
    boxes = [random_resized_crop_box(1000, 1000, np.random.default_rng(seed), scale=quarter) for seed in range(1000)]
    ratios = np.array([(right - left) / (bottom - top) for left, top, right, bottom in boxes])
    assert 0.75 <= ratios.min() and ratios.max() <= 4 / 3
    assert abs(np.log(ratios).mean()) < 0.015 and 0.45 < (ratios > 1).mean() < 0.55


def test_a_random_resized_crop_that_never_fits_is_the_largest_centred_one_in_range() -> None:
    # No crop of 90% of a 1000 x 10 strip's area has a ratio within 3/4..4/3: after ten tries, a centred crop as
    # tall as the strip and 4/3 as wide (and the same turned)
    assert random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (493.5, 0.0, 506.5, 10.0)
    assert random_resized_crop_box(10, 1000, np.random.default_rng(0)) == (0.0, 493.5, 10.0, 506.5)


def test_pixel_normalizer_is_clip_normalisation_keeping_the_memory_format() -> None:
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    normalized = PixelNormalizer("cpu")(pixels)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, (pixels.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    channels_last = PixelNormalizer("cpu")(pixels.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, normalized)
    other = PixelNormalizer("cpu", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(pixels)
    torch.testing.assert_close(other, pixels.float() / 255, rtol=0, atol=1e-7)


def test_pixel_normalizer_refuses_what_is_not_a_pixel_batch() -> None:
    with pytest.raises(TypeError, match="uint8 pixels"):
        PixelNormalizer("cpu")(torch.zeros(2, 3, 8, 8))  # already normalised: would be normalised twice
    with pytest.raises(TypeError, match="uint8 pixels"):
        PixelNormalizer("cpu")(torch.zeros(3, 8, 8, dtype=torch.uint8))  # one image, not a batch
    with pytest.raises(TypeError, match="uint8 pixels"):
        PixelNormalizer("cpu")(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))  # RGBA, not RGB


def test_random_square_box_spans_the_shorter_side_at_a_random_place() -> None:
    # The CLIP paper's crop: resize the shorter side to the target, take a random target-size square.
    for width, height in [(120, 90), (90, 120), (64, 64)]:
        boxes = [random_square_box(width, height, np.random.default_rng(seed)) for seed in range(40)]
        assert boxes[7] == random_square_box(width, height, np.random.default_rng(7))
        side = min(width, height)
        for left, top, right, bottom in boxes:
            assert right - left == bottom - top == side
            assert 0 <= left and right <= width and 0 <= top and bottom <= height
        offsets = {max(left, top) for left, top, _, _ in boxes}
        assert len(offsets) > 10 if width != height else offsets == {0}
    # Both crops cover the whole shorter side: JPEGs may be decoded down to the target size itself.
    assert draft_size(224, "random_square") == draft_size(224, "center") == 224 < draft_size(224, "random_resized")
    # A random resized crop's side is at least sqrt(0.9 * 3/4) = 0.82 of the shorter side: 224 / 0.82 = 272.6
    assert draft_size(224, "random_resized") == 273


def test_the_counts_line_says_what_changed_since_the_counts_before() -> None:
    # The line of summary_since_previous() and of each finished data epoch: per source the samples, then skips and
    # the repairs with their kinds, less `before`; a kind that did not change, or a field none of whose kinds
    # did, is left out
    before = {"a": {"samples": 5, "skipped": {"truncated": 2}, "repaired": {"exif_rotated": 1}}}
    now = {
        "a": {"samples": 9, "skipped": {"truncated": 2, "missing_file": 3, "bad_image": 1},
              "repaired": {"exif_rotated": 1}},
        "b": {"samples": 2, "skipped": {}, "repaired": {"caption_truncated": 2}},
    }
    assert counts_line(now, before) == (
        "a: 4 samples, skipped 4 (bad_image 1, missing_file 3); b: 2 samples, repaired 2 (caption_truncated 2)"
    )
    assert counts_line(now) == (
        "a: 9 samples, skipped 6 (bad_image 1, missing_file 3, truncated 2), repaired 1 (exif_rotated 1); "
        "b: 2 samples, repaired 2 (caption_truncated 2)"
    )
    assert counts_line(now, now) == "a: 0 samples; b: 0 samples"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, reading the cut TIFF's directory
@pytest.mark.parametrize("kind", ["WEBP", "TIFF"])
def test_a_webp_or_tiff_cut_short_is_counted_as_truncated(kind):
    # Their decoders' errors do not say "truncated": a cut WebP was a corrupt_image, a cut TIFF (its directory at
    # the end) not_an_image. Their headers say how long they are
    from clip.data.decoding import SkipSample, open_image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    options = {"compression": "tiff_deflate"} if kind == "TIFF" else {}
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=kind, **options)
    data = buffer.getvalue()
    kinds = Counter()
    for cut in range(16, len(data) - 16, max(1, len(data) // 40)):
        try:
            open_image(data[:cut], None, None)
            kinds["decoded"] += 1
        except SkipSample as skip:
            kinds[skip.kind] += 1
    assert set(kinds) == {"truncated"}, kinds
    assert open_image(data, None, None).size == (64, 64)
    with pytest.raises(SkipSample) as text:  # not an image at all, as before
        open_image(b"<html>not an image</html>" * 4, None, None)
    assert text.value.kind == "not_an_image"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")  # Pillow's, on the cut TIFF
def test_a_webp_short_of_its_last_bytes_or_a_tiff_cut_at_its_directory_is_counted_as_truncated():
    # The cuts above stop 16 bytes short of the end, so the headers' offsets went untried: a WebP's RIFF size
    # counts all but its first 8 bytes, and a TIFF's directory starts with a 2-byte entry count. Without the
    # "+ 8" a WebP missing 1 to 8 bytes was a corrupt_image; without the "+ 2" a TIFF cut at its directory, or
    # 1 byte into it, not_an_image
    from clip.data.decoding import SkipSample, open_image

    def skip_kind(data: bytes) -> str:
        try:
            open_image(data, None, None)
        except SkipSample as skip:
            return skip.kind
        return "decoded"

    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    pixels.save(buffer, format="WEBP")
    webp = buffer.getvalue()
    assert {k: skip_kind(webp[:-k]) for k in range(1, 9)} == {k: "truncated" for k in range(1, 9)}
    buffer = io.BytesIO()
    pixels.save(buffer, format="TIFF", compression="tiff_deflate")
    tiff = buffer.getvalue()
    directory = int.from_bytes(tiff[4:8], "little")
    assert tiff[:4] == b"II*\0" and directory > len(tiff) // 2  # Pillow writes the directory after the pixels
    cuts = [*range(directory - 8, directory + 2), *range(len(tiff) - 8, len(tiff))]  # also cut in its last bytes
    assert {cut: skip_kind(tiff[:cut]) for cut in cuts} == {cut: "truncated" for cut in cuts}
