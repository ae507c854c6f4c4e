"""Tests for clip.preprocess: RGB conversion of every image mode, EXIF orientation, and the transform
matching OpenAI's reference pipeline (torchvision Resize + CenterCrop + ToTensor + Normalize)."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision import transforms as T

from clip.preprocess import (
    MAX_KEPT_ASPECT,
    OPENAI_MEAN,
    OPENAI_STD,
    apply_exif_orientation,
    image_transform,
    prepare_for_resize,
    to_rgb,
)

BICUBIC = T.InterpolationMode.BICUBIC


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def openai_reference(n: int) -> T.Compose:
    # openai/CLIP's evaluation pipeline, written out from its documented steps.
    return T.Compose(
        [
            T.Resize(n, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(n),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


def composited(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # The image as a viewer shows it on `background`. (PIL converts premultiplied La only to LA.)
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def random_rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colours; a third of the pixels fully transparent and storing white (as many logo PNGs do),
    a third opaque, the rest partly transparent."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    kind = rng.integers(0, 3, (height, width))
    pixels[kind == 0] = 255
    pixels[kind == 0, 3] = 0
    pixels[kind == 1, 3] = 255
    return Image.fromarray(pixels, mode="RGBA")


def logo(size: int = 64) -> Image.Image:
    """An opaque red disc on fully transparent pixels that store white."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 4) ** 2
    pixels = np.full((size, size, 4), 255, dtype=np.uint8)
    pixels[..., 3] = np.where(inside, 255, 0)
    pixels[inside, 1:3] = 0
    return Image.fromarray(pixels, mode="RGBA")


def png_round_trip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------------------------- to_rgb


def test_rgb_is_returned_unchanged():
    image = random_rgb(5, 4)
    assert to_rgb(image) is image


def test_grayscale_and_bilevel():
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    out = to_rgb(gray)
    assert out.mode == "RGB"
    assert (pixels(out) == pixels(gray)[..., None]).all()
    bilevel = gray.convert("1")
    assert to_rgb(bilevel).mode == "RGB"
    assert set(np.unique(pixels(to_rgb(bilevel)))) <= {0, 255}


def test_gray_with_alpha_is_composited():
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), mode="LA")
    out = pixels(to_rgb(la))
    assert (out[0, 0] == 255).all()  # fully transparent -> the white background
    assert (out[0, 1] == 50).all()


def test_palette():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 0), 1)
    out = pixels(to_rgb(palette))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_with_transparency_goes_through_alpha():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # index 1 (blue) is transparent
    # Round trip through PNG so the transparency is stored the way files carry it.
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert loaded.mode == "P" and "transparency" in loaded.info
    out = pixels(to_rgb(loaded))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert pixels(to_rgb(loaded, alpha_background=(0, 0, 0)))[0, 1].tolist() == [0, 0, 0]


def rgb_png_with_a_colour_key() -> Image.Image:
    """A red pixel beside a black one, black being the PNG's tRNS colour key (transparent)."""
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=(0, 0, 0))
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert loaded.mode == "RGB" and loaded.info["transparency"] == (0, 0, 0)
    return loaded


def test_an_rgb_colour_key_is_transparency_too():
    # Only palette and greyscale keys were: an RGB PNG's keyed background kept its stored colour (black here)
    loaded = rgb_png_with_a_colour_key()
    assert pixels(to_rgb(loaded)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    assert pixels(prepare_for_resize(loaded, alpha_background=(255, 255, 255))).tolist() == [[[255, 0, 0], [255] * 3]]
    # Without a background the key is ignored, as convert("RGB") and openai/CLIP ignore it
    assert to_rgb(loaded, alpha_background=None) is loaded and prepare_for_resize(loaded) is loaded


def test_rgba_composited_or_dropped():
    rgba = Image.fromarray(
        np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], dtype=np.uint8), mode="RGBA"
    )
    white = pixels(to_rgb(rgba))
    assert white[0, 0].tolist() == [255, 255, 255]
    assert white[0, 1].tolist() == [10, 20, 30]
    # Half transparent: halfway between the colour and white.
    assert np.abs(white[0, 2] - np.array([227, 177, 127])).max() <= 1
    black = pixels(to_rgb(rgba, alpha_background=(0, 0, 0)))
    assert black[0, 0].tolist() == [0, 0, 0]
    dropped = pixels(to_rgb(rgba, alpha_background=None))
    assert dropped[0, 0].tolist() == [10, 20, 30]  # PIL's convert("RGB"): the stored colour shows


def test_cmyk_and_ycbcr():
    source = random_rgb(8, 6, seed=1)
    for mode in ("CMYK", "YCbCr"):
        out = to_rgb(source.convert(mode))
        assert out.mode == "RGB" and out.size == source.size
        # Both are (nearly) lossless round trips of an RGB image in PIL.
        assert np.abs(pixels(out) - pixels(source)).max() <= 3, mode


def test_16bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16).reshape(16, 16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    for candidate in (image, loaded):
        out = pixels(to_rgb(candidate))[..., 0]
        assert out.min() == 0 and out.max() == 255
        # PIL's own convert clips everything above 255 to white; a proper scaling keeps the ramp.
        assert (out.ravel() == np.arange(256)).all()


def test_32bit_integer_and_float():
    as_int16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I")
    assert pixels(to_rgb(as_int16))[0, :, 0].tolist() == [0, 128, 255]
    # 16-bit values (a 16-bit PNG opened as "I") that do not span the range keep their brightness: not stretched
    dim = Image.fromarray(np.array([[1000, 15000, 30000]], dtype=np.int32), mode="I")
    assert pixels(to_rgb(dim))[0, :, 0].tolist() == [4, 58, 117]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), mode="I")
    assert pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert pixels(to_rgb(unit_float))[0, :, 0].tolist() == [0, 128, 255]
    constant = Image.fromarray(np.full((2, 2), 7e5, dtype=np.float32), mode="F")
    assert to_rgb(constant).mode == "RGB"


def test_exif_orientation_is_applied():
    # A 4x2 landscape image, left half red and right half blue, tagged "rotate 90 CW to display" (6).
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    image.paste((0, 0, 255), (2, 0, 4, 2))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert loaded.getexif().get(ExifTags.Base.Orientation) == 6
    out = to_rgb(loaded)
    assert out.size == (2, 4)  # displayed as portrait
    out_pixels = pixels(out)
    # Rotating 90 degrees clockwise moves the left (red) half to the top.
    assert out_pixels[0, 0].tolist() == [255, 0, 0]
    assert out_pixels[-1, -1].tolist() == [0, 0, 255]
    assert to_rgb(loaded, exif_orientation=False).size == (4, 2)


@pytest.mark.parametrize(("orientation", "transpose"), [
    (0, None), (1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_270),
    (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_90), (9, None),
])
def test_every_exif_orientation_is_applied_and_others_are_not(orientation, transpose):
    # Six distinct pixels: each of the 8 orientations gives another image
    image = Image.frombytes("RGB", (3, 2), bytes(range(0, 18 * 10, 10)))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    expected = image if transpose is None else image.transpose(transpose)
    assert np.array_equal(pixels(apply_exif_orientation(loaded)), pixels(expected))


def jpeg_with_damaged_exif() -> Image.Image:
    """A 5x3 red JPEG tagged orientation 6 whose EXIF also holds a text value under the SubIFDs tag (330),
    which must hold offsets: the pixels decode, but exif_transpose's rewriting of the EXIF raises
    struct.error (a byte flip the reviewer's fuzzing of camera EXIF blocks found)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Model] = "EOS"
    raw = exif.tobytes()
    model_entry = b"\x01\x10\x00\x02"  # big-endian tag 0x0110 (Model), type 2 (ASCII)
    assert raw.count(model_entry) == 1
    damaged = raw.replace(model_entry, b"\x01\x4a\x00\x02")  # tag 0x014a (SubIFDs), still ASCII
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (200, 10, 10)).save(buffer, format="JPEG", exif=damaged)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_a_damaged_exif_block_keeps_the_pixels_as_stored():
    image = jpeg_with_damaged_exif()
    image.load()
    with pytest.raises(Exception):  # noqa: B017 -- whatever PIL raises is what apply_exif_orientation catches
        ImageOps.exif_transpose(image)
    assert apply_exif_orientation(image) is image
    assert to_rgb(image).size == (5, 3)
    for train in (False, True):
        assert image_transform(8, train=train)(image).shape == (3, 8, 8)


def test_rejects_non_images():
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3), dtype=np.uint8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- image_transform


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", [(64, 64), (97, 50), (40, 123), (13, 9)])
def test_matches_openai_reference_on_rgb_and_gray(size, mode):
    image = random_rgb(*size, seed=sum(size)).convert(mode)
    ours = image_transform(32)(image)
    reference = openai_reference(32)(image)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I", "F"]
)
def test_every_mode_gives_a_normalised_tensor(mode):
    source = random_rgb(30, 20, seed=3)
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(source.convert("L"), dtype=np.float64)
        arrays = {
            "I;16": (gray * 257).astype(np.uint16),
            "I": (gray * 1000).astype(np.int32),
            "F": (gray / 255).astype(np.float32),
        }
        image = Image.fromarray(arrays[mode])
    elif mode in ("P", "PA", "La"):
        image = source.convert({"P": "P", "PA": "P", "La": "LA"}[mode]).convert(mode)
    else:
        image = source.convert(mode)
    out = image_transform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    low = (0 - max(OPENAI_MEAN)) / min(OPENAI_STD)
    high = (1 - min(OPENAI_MEAN)) / min(OPENAI_STD)
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5


def test_normalisation_values():
    gray = Image.new("RGB", (10, 10), (255, 0, 128))
    out = image_transform(8)(gray)
    expected = [(value - m) / s for value, m, s in zip((1.0, 0.0, 128 / 255), OPENAI_MEAN, OPENAI_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)
    custom = image_transform(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(gray)
    assert torch.allclose(custom[0], torch.ones(8, 8))


def test_non_square_center_crop_keeps_the_middle():
    # A wide image, white in the middle (plus a margin for the bicubic kernel) and black at both ends:
    # the shorter side is resized to 20 and the crop keeps only the white middle. Same for a tall image.
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (75, 0, 225, 100))
    for image in (wide, wide.transpose(Image.Transpose.ROTATE_90)):
        out = image_transform(20, mean=(0, 0, 0), std=(1, 1, 1))(image)
        assert out.shape == (3, 20, 20)
        assert torch.allclose(out, torch.ones_like(out))
    # Without the margin the black ends would show at the crop's edges.
    narrow = Image.new("RGB", (300, 100), (0, 0, 0))
    narrow.paste((255, 255, 255), (100, 0, 200, 100))
    assert image_transform(20, mean=(0, 0, 0), std=(1, 1, 1))(narrow)[:, :, 0].max() < 1.0


def test_a_long_strip_is_cut_to_its_middle_before_the_resize():
    # A 20,000 x 1 strip was resized whole to 4,480,000 x 224 (4.7 GB, 30 s in one DataLoader worker) for the
    # centre crop to keep 224 columns of it
    strip = Image.new("RGB", (20000, 1), (200, 30, 90))
    resize = image_transform(224).transforms[0]
    assert max(resize(strip).size) <= (MAX_KEPT_ASPECT + 1) * 224
    assert max(resize(strip.transpose(Image.Transpose.ROTATE_90)).size) <= (MAX_KEPT_ASPECT + 1) * 224
    assert torch.allclose(image_transform(224, mean=(0, 0, 0), std=(1, 1, 1))(strip)[:, 0, 0],
                          torch.tensor([200, 30, 90]) / 255)
    # With no resize (the short side already the size), OpenAI's pixels exactly, whatever the length's parity
    for length in (5000, 5001, 5002, 5003):
        image = random_rgb(length, 32, seed=length)
        for turned in (image, image.transpose(Image.Transpose.ROTATE_90)):
            assert torch.equal(image_transform(32)(turned), openai_reference(32)(turned))
    # Up to 32:1 nothing is cut: OpenAI's pixels exactly, resized too (the module doc's promise). Odd sizes: a cut
    # of such an image shifts the resize's sampling grid
    for length, side in ((2001, 100), (2503, 97), (3101, 97)):  # 20:1 to 32:1
        image = random_rgb(length, side, seed=length)
        for turned in (image, image.transpose(Image.Transpose.ROTATE_90)):
            assert torch.equal(image_transform(32)(turned), openai_reference(32)(turned))
    # Resized: the same image but for a sampling grid shifted by a fraction of a source pixel
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 3000), (40, 1)).astype(np.uint8), mode="L")
    for turned in (ramp, ramp.transpose(Image.Transpose.ROTATE_90)):
        assert (image_transform(32)(turned) - openai_reference(32)(turned)).abs().max() < 0.01


def test_train_transform_is_random_and_shaped():
    image = random_rgb(80, 60, seed=5)
    transform = image_transform(24, train=True, resize_scale=(0.3, 0.6))
    torch.manual_seed(0)
    first = transform(image)
    second = transform(image)
    assert first.shape == second.shape == (3, 24, 24)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)  # seeded by torch's RNG, as DataLoader workers are


def test_transform_pickles_and_has_readable_repr():
    transform = image_transform(24, train=True)
    restored = pickle.loads(pickle.dumps(transform))
    assert restored.image_size == 24 and restored.train
    assert "RandomResizedCropAnyMode(size=(24, 24), scale=(0.9, 1.0)" in repr(transform)
    evaluation = repr(image_transform(24, alpha_background=(255, 255, 255)))
    for step in ("ResizeAnyMode(size=24, interpolation=bicubic", "CenterCrop(size=(24, 24))", "ToTensor()"):
        assert step in evaluation
    assert "ToRGB(alpha_background=(255, 255, 255))" in evaluation and "Normalize(mean=(0.48145466" in evaluation
    image = random_rgb(30, 30)
    assert torch.equal(pickle.loads(pickle.dumps(image_transform(16)))(image), image_transform(16)(image))
    torch.manual_seed(0)
    expected = transform(image)
    torch.manual_seed(0)
    assert torch.equal(restored(image), expected)


def test_alpha_background_option():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    dropped = image_transform(8, mean=(0, 0, 0), std=(1, 1, 1))(rgba)
    assert torch.allclose(dropped[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    white = image_transform(8, mean=(0, 0, 0), std=(1, 1, 1), alpha_background=(255, 255, 255))(rgba)
    assert torch.allclose(white, torch.ones_like(white))


# ------------------------------------------------------------------------ transparency, as openai/CLIP


@pytest.mark.parametrize("mode", ["RGBA", "LA", "RGBa"])
@pytest.mark.parametrize("size", [(64, 64), (97, 50), (40, 123), (32, 40)])
def test_alpha_images_match_openai_reference(size, mode):
    # OpenAI's pipeline resizes in the image's own mode (premultiplied alpha) and converts afterwards.
    image = random_rgba(*size, seed=sum(size)).convert(mode)
    assert torch.equal(image_transform(32)(image), openai_reference(32)(image))


def test_logo_corners_are_black_like_openai_or_the_background():
    image = logo()
    plain = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    assert torch.equal(image_transform(32)(image), openai_reference(32)(image))
    dropped = image_transform(32, **plain)(image)
    # Where alpha is 0 the premultiplied resize keeps no colour: black corners, as openai/CLIP gives.
    assert torch.equal(dropped[:, 0, 0], torch.zeros(3))
    assert torch.allclose(dropped[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]))
    white = image_transform(32, alpha_background=(255, 255, 255), **plain)(image)
    assert torch.equal(white[:, 0, 0], torch.ones(3))
    assert torch.allclose(white[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]))
    # Converting before the resize (the old order) would have shown the white stored under the corners.
    assert not torch.equal(dropped, image_transform(32, **plain)(image.convert("RGB")))


def test_an_image_that_needs_no_resize_keeps_the_colour_under_its_transparency():
    # Shorter side == image_size: torchvision's Resize (OpenAI's too) returns the image untouched, so no
    # premultiplied resize runs and dropping the alpha shows the white the logo stores there.
    image = logo(32)
    plain = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    out = image_transform(32, **plain)(image)
    assert torch.equal(image_transform(32)(image), openai_reference(32)(image))
    assert torch.equal(out[:, 0, 0], torch.ones(3))
    assert torch.equal(out, image_transform(32, **plain)(image.convert("RGB")))


@pytest.mark.parametrize("transparency", [0, bytes([0, 128, 255, 64])], ids=["index", "alpha_bytes"])
def test_dropping_palette_transparency_gives_convert_rgb_pixels_without_a_warning(transparency):
    # to_rgb(alpha_background=None) goes through RGBA: the pixels of PIL's convert("RGB"), which would warn
    # about a palette whose transparency is a byte string.
    rng = np.random.default_rng(11)
    palette = Image.fromarray(rng.integers(0, 4, (6, 7), dtype=np.uint8), mode="P")
    palette.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255, 250, 250, 250] + [0] * (252 * 3))
    palette.info["transparency"] = transparency
    loaded = png_round_trip(palette)
    grey = png_round_trip(Image.fromarray(np.arange(42, dtype=np.uint8).reshape(6, 7), mode="L"))
    grey.info["transparency"] = 5
    for image in (loaded, grey):
        assert "transparency" in image.info
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = to_rgb(image, alpha_background=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(pixels(out), pixels(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "RGBa", "La", "PA"])
def test_background_is_composited_before_the_resize(mode):
    # The image a viewer shows, resized: PIL's premultiplied resize would clip the alpha's overshoot first.
    image = random_rgba(70, 45, seed=4)
    image = image.convert("P").convert("PA") if mode == "PA" else image.convert(mode)
    for background in ((255, 255, 255), (0, 128, 255)):
        ours = image_transform(32, alpha_background=background)(image)
        assert torch.equal(ours, openai_reference(32)(composited(image, background)))


def test_colour_under_transparent_pixels_does_not_show_once_resized():
    first = random_rgba(60, 50, seed=5)
    values = np.array(first)
    values[values[..., 3] == 0, :3] = (0, 255, 0)  # a different colour stored under the transparent pixels
    second = Image.fromarray(values, mode="RGBA")
    for background in (None, (255, 255, 255)):
        transform = image_transform(24, alpha_background=background)
        assert torch.equal(transform(first), transform(second))


def palette_with_transparency() -> Image.Image:
    """A 40x30 palette PNG whose index 0 (stored as green) is transparent."""
    rng = np.random.default_rng(6)
    palette = Image.fromarray(rng.integers(0, 4, (30, 40), dtype=np.uint8), mode="P")
    palette.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255, 250, 250, 250] + [0] * (252 * 3))
    palette.info["transparency"] = 0
    loaded = png_round_trip(palette)
    assert loaded.mode == "P" and loaded.info.get("transparency") == 0
    return loaded


def test_palette_transparency_is_composited_then_resized_bicubic():
    image = palette_with_transparency()
    background = (255, 255, 255)
    ours = image_transform(16, alpha_background=background)(image)
    assert torch.equal(ours, openai_reference(16)(composited(image, background)))
    # Without one: the stored colours, as openai/CLIP's convert("RGB") shows them, resized bicubic.
    assert torch.equal(image_transform(16)(image), openai_reference(16)(image.convert("RGB")))


def test_palette_with_alpha_is_resized_as_rgba():
    # PIL would interpolate "PA"'s palette indices; converted first, it is resized like an RGBA image.
    image = random_rgba(40, 30, seed=7).convert("P").convert("PA")
    assert torch.equal(image_transform(16)(image), openai_reference(16)(image.convert("RGBA")))
    for background in (None, (255, 255, 255)):
        transform = image_transform(16, alpha_background=background)
        assert torch.equal(transform(image), transform(image.convert("RGBA")))


def test_gray_with_transparent_value():
    gray = Image.fromarray(np.random.default_rng(8).integers(0, 3, (30, 40), dtype=np.uint8) * 100, mode="L")
    gray.info["transparency"] = 100
    loaded = png_round_trip(gray)
    assert loaded.mode == "L" and "transparency" in loaded.info
    assert torch.equal(image_transform(16)(loaded), openai_reference(16)(loaded))  # ignored, as by OpenAI
    background = (0, 0, 255)
    ours = image_transform(16, alpha_background=background)(loaded)
    assert torch.equal(ours, openai_reference(16)(composited(loaded, background)))


def test_exif_orientation_is_applied_before_the_geometry():
    image = random_rgba(48, 32, seed=9)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    upright = image.transpose(Image.Transpose.ROTATE_270)
    for background in (None, (255, 255, 255)):
        transform = image_transform(16, alpha_background=background)
        assert torch.equal(transform(loaded), transform(upright))


# ---------------------------------------------------------------- .transforms, as openai/CLIP's Compose


def test_is_a_compose_with_openai_steps():
    transform = image_transform(24)
    assert isinstance(transform, T.Compose)
    resize, crop, _, to_tensor, normalize = transform.transforms
    assert isinstance(resize, T.Resize) and resize.size == 24 and resize.interpolation == BICUBIC
    assert isinstance(crop, T.CenterCrop) and crop.size == (24, 24)
    assert isinstance(to_tensor, T.ToTensor)
    assert isinstance(normalize, T.Normalize)
    assert tuple(normalize.mean) == OPENAI_MEAN and tuple(normalize.std) == OPENAI_STD
    crop_step, *rest = image_transform(24, train=True, resize_scale=(0.5, 0.8)).transforms
    assert isinstance(crop_step, T.RandomResizedCrop) and crop_step.size == (24, 24)
    assert crop_step.scale == (0.5, 0.8) and crop_step.ratio == (3 / 4, 4 / 3) and crop_step.interpolation == BICUBIC
    assert [type(step) for step in rest] == [type(step) for step in transform.transforms[2:]]


def test_transforms_are_what_runs_and_slice_like_openai():
    image = random_rgba(50, 40, seed=10)
    transform = image_transform(24)
    stepped = image
    for step in transform.transforms:
        stepped = step(stepped)
    assert torch.equal(stepped, transform(image))
    reference = openai_reference(24).transforms
    # The first two steps give the cropped PIL image (to look at what the model sees) ...
    cropped = T.Compose(transform.transforms[:2])(image)
    assert cropped.size == (24, 24)
    assert np.array_equal(np.asarray(cropped), np.asarray(T.Compose(reference[:2])(image)))
    # ... a new geometry in front of the last three is the usual way to add augmentation ...
    augment = T.RandomResizedCrop(16, interpolation=BICUBIC)
    torch.manual_seed(0)
    augmented = T.Compose([augment, *transform.transforms[2:]])(image)
    torch.manual_seed(0)
    assert torch.equal(augmented, T.Compose([augment, *reference[2:]])(image))
    # ... and everything but Normalize gives values in [0, 1]; editing the list changes what runs.
    unnormalised = T.Compose(transform.transforms[:-1])(image)
    assert unnormalised.min() >= 0 and unnormalised.max() <= 1
    transform.transforms[-1] = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(transform(image), unnormalised * 2 - 1)


def test_steps_pass_through_and_reject_the_right_things():
    image = random_rgb(20, 10)
    assert prepare_for_resize(image) is image  # no copy for the common case
    resize, _, to_rgb_step, _, _ = image_transform(8).transforms
    assert to_rgb_step(image) is image
    assert resize(torch.rand(3, 10, 20)).shape == (3, 8, 16)  # tensors go to torchvision's Resize
    crop_step = image_transform(8, train=True).transforms[0]
    assert crop_step(torch.rand(3, 10, 20)).shape == (3, 8, 8)  # ... and to its RandomResizedCrop
    with pytest.raises(TypeError, match="PIL"):
        prepare_for_resize(np.zeros((2, 2, 3), dtype=np.uint8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PIL"):
        image_transform(8)(torch.rand(3, 10, 20))  # type: ignore[arg-type]


def test_bad_arguments():
    with pytest.raises(ValueError):
        image_transform(0)
    with pytest.raises(ValueError):
        image_transform(8, mean=(0.5, 0.5))
    with pytest.raises(ValueError):
        image_transform(8, train=True, resize_scale=(0.9, 1.5))


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [0, 1], [0, 1]),  # 8-bit values in a 32-bit image are kept, not taken for a 0..1 float image
    ("I", [0, 255], [0, 255]),  # 255 itself is still an 8-bit value, not a 16-bit one
    ("F", [0.0, 500.0, 1000.0], [0, 128, 255]),  # a float image beyond 0..255 is stretched, not taken for 16-bit
])
def test_high_depth_greyscale_ranges_at_their_edges(mode, values, expected):
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(len(values))] == expected


def test_a_std_of_other_than_three_values_is_refused():
    with pytest.raises(ValueError, match=r"mean and std need three values \(R, G, B\)"):
        image_transform(32, std=(0.5, 0.5))


@pytest.mark.parametrize("train", [False, True])
def test_notebook_inputs_that_are_not_images_are_named_with_the_way_to_make_one(train, tmp_path):
    # torchvision's own message, "Unexpected type <class 'numpy.ndarray'>", says neither what preprocess
    # takes nor how to get one from an array (cv2, plt.imread) or a file name
    preprocess = image_transform(8, train=train)
    with pytest.raises(TypeError, match=r"PIL image.*numpy\.ndarray.*Image\.fromarray"):
        preprocess(np.zeros((10, 10, 3), dtype=np.uint8))
    for path in (str(tmp_path / "cat.jpg"), tmp_path / "cat.jpg"):
        with pytest.raises(TypeError, match=r"PIL image.*file path.*cat\.jpg.*Image\.open"):
            preprocess(path)
    with pytest.raises(TypeError, match=r"PIL image.*got list"):
        preprocess([random_rgb(10, 10)])


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(0, 0), (0, 50), (50, 0)])
def test_an_image_without_pixels_is_refused_with_its_size(train, size):
    # An empty crop in a notebook (image.crop with a box of no width) was a bare ZeroDivisionError from
    # torchvision's resize, or with train=True a tensor made from no pixels at all
    with pytest.raises(ValueError, match=rf"no pixels.*{size[0]}x{size[1]}"):
        image_transform(8, train=train)(Image.new("RGB", size))


def test_high_depth_greyscale_is_scaled_a_band_of_rows_at_a_time_with_the_same_result(monkeypatch):
    # The whole image's float64 copies took a 200 KB 16-bit PNG of 88 megapixels to 3 GB in one data worker
    import tracemalloc

    from clip import image_modes

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (300, 200), dtype=np.uint16)
    expected = np.clip(np.rint(values.astype(np.float64) * (255.0 / 65535)), 0, 255).astype(np.uint8)
    stretched = rng.normal(size=(37, 11)).astype(np.float32)
    low, high = float(stretched.min()), float(stretched.max())
    expected_stretched = np.clip(np.rint((stretched.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255)
    for band in (1, 7, 200, 1 << 20):  # bands of one row, of rows not dividing the height, the whole image
        monkeypatch.setattr(image_modes, "_BAND_ELEMENTS", band)
        assert np.array_equal(np.asarray(image_modes._array_to_l(values, 65535)), expected)
        assert np.array_equal(np.asarray(image_modes._array_to_l(stretched, None)), expected_stretched)
    monkeypatch.undo()
    big = np.zeros((2000, 2000), np.uint16)
    tracemalloc.start()
    image_modes._array_to_l(big, 65535)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * big.size  # the 4 MB result, its image and a band; the float64 copies were 32 MB each
