"""Tests for clip.preprocess: RGB conversion of every image mode, EXIF orientation, and the transform
matching OpenAI's reference pipeline (torchvision Resize + CenterCrop + ToTensor + Normalize)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torchvision import transforms as T

from clip.preprocess import OPENAI_MEAN, OPENAI_STD, image_transform, to_rgb


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


def test_rejects_non_images():
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3), dtype=np.uint8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- image_transform


@pytest.mark.parametrize("size", [(64, 64), (97, 50), (40, 123), (13, 9)])
def test_matches_openai_reference_on_rgb(size):
    image = random_rgb(*size, seed=sum(size))
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
    assert "random_resized_crop" in repr(transform)
    assert "center_crop(24)" in repr(image_transform(24))
    image = random_rgb(30, 30)
    assert torch.equal(pickle.loads(pickle.dumps(image_transform(16)))(image), image_transform(16)(image))


def test_alpha_background_option():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    dropped = image_transform(8, mean=(0, 0, 0), std=(1, 1, 1))(rgba)
    assert torch.allclose(dropped[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    white = image_transform(8, mean=(0, 0, 0), std=(1, 1, 1), alpha_background=(255, 255, 255))(rgba)
    assert torch.allclose(white, torch.ones_like(white))


def test_bad_arguments():
    with pytest.raises(ValueError):
        image_transform(0)
    with pytest.raises(ValueError):
        image_transform(8, mean=(0.5, 0.5))
    with pytest.raises(ValueError):
        image_transform(8, train=True, resize_scale=(0.9, 1.5))
