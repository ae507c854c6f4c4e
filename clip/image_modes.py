"""PIL images of any mode made ready for a resize, and for the model: upright, in a mode PIL resizes
faithfully, RGB at the end. The torchvision-free half of the preprocessing (`clip.preprocess` builds
openai/CLIP's Compose from it); the training loader and the evaluation datasets use it without importing
torchvision, whose import pulls in torch._dynamo (about 3 s per process).

Where we deliberately differ from openai/CLIP (in `prepare_for_resize`, which the preprocessing's first step,
`ResizeAnyMode` or `RandomResizedCropAnyMode`, runs before torchvision's resize):
- the EXIF orientation tag is applied, so a photo is seen upright, as a viewer shows it;
- palette ("P") and bilevel ("1") images are converted to RGB before the resize: PIL resizes them with
  nearest neighbour whatever filter is asked for, so converting first is what makes the bicubic resize
  bicubic. "PA" becomes RGBA and is resized like one (PIL would interpolate its palette indices);
- 16/32-bit integer and float greyscale images are rescaled to 8 bits before the resize instead of
  clipped at 255 afterwards (which turns most of a 16-bit image white);
- other colour spaces (CMYK, YCbCr, LAB, HSV, RGBX) are converted before the resize too: PIL resizes
  them channel by channel in their own space, which for HSV's circular hue (and LAB) is no image resize.
  CMYK and YCbCr come out within one or two grey levels of OpenAI's;
- an image more than MAX_KEPT_ASPECT (32) times as long as it is wide is first cut to its central part of that
  aspect ratio: the centre crop keeps only the middle of it anyway, and resized whole, a 1 x 20,000 strip
  became a 224 x 4,480,000 image (30 s and 4.7 GB in one DataLoader worker). Without a resize (its short
  side already the size) the pixels are OpenAI's; resized, the sampling grid of the part differs from the
  whole image's by well under a source pixel (the scale factors differ by the rounding of the long side);
- `alpha_background` (not set by default) composites transparent pixels onto a colour *before* the resize:
  the image as a viewer shows it on that background, resized, as the training loader sees it too. (Resizing
  with premultiplied alpha and compositing afterwards is the same in exact arithmetic, but PIL clips the
  bicubic overshoot of the alpha in between: at hard alpha edges that put pixels up to ~20 grey levels
  from a float-precision resize of the composited image, about three times further than compositing first.)
"""

from __future__ import annotations

from os import PathLike

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Per-channel statistics of OpenAI's training images; the released models expect inputs normalised by them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Beyond this ratio of its long to its short side an image is cut to its central part of this ratio before
# the resize (see the module doc). The centre crop then keeps 1/32 of it, and the resized part is at most
# 32 times the crop's area.
MAX_KEPT_ASPECT = 32

WHITE = (255, 255, 255)
RGB = tuple[int, int, int]
# What the training loader (clip.data) composites transparent images onto: they are mostly logos and product
# shots made for a white page. A model trained here is evaluated and loaded (clip.load of a trainer
# checkpoint) with the same background, so it sees transparent images as it saw them in training.
TRAINING_ALPHA_BACKGROUND = WHITE

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
_UINT16_MAX = 65535
# Modes PIL resizes faithfully with any filter (RGBA and LA with premultiplied alpha; RGBa and La are
# premultiplied already), and whose conversion to RGB commutes with the resize or is what OpenAI's does.
_RESIZED_AS_IS = {"RGB", "L", "RGBA", "LA", "RGBa", "La"}
# The straight-alpha mode that carries each mode's transparency (palette and greyscale transparency:
# the "transparency" entry a tRNS chunk or GIF leaves in image.info).
_STRAIGHT_ALPHA = {"RGBa": "RGBA", "La": "LA", "PA": "RGBA", "P": "RGBA", "L": "LA", "RGB": "RGBA"}


def not_an_image_error(value: object) -> TypeError:
    """The error for a value given where a PIL image belongs, saying how to make one from what notebooks most
    often pass instead: an array (cv2, plt.imread) or a file name."""
    if isinstance(value, str | PathLike):
        return TypeError(f"expected a PIL image, got a file path ({value!r}): open it first, "
                         "preprocess(Image.open(path))")
    if isinstance(value, np.ndarray):
        return TypeError("expected a PIL image, got a numpy.ndarray: convert it with PIL.Image.fromarray(array) "
                         "(uint8, height x width x 3, RGB order)")
    return TypeError(f"expected a PIL image (PIL.Image.Image), got {type(value).__name__}")


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip `image` as its EXIF orientation tag says; the image itself when there is no such tag, its
    value is no orientation (2..8 rotate or flip; some software writes 0), or its EXIF block cannot be read."""
    # A damaged EXIF block makes reading it, or exif_transpose's rewriting of it, raise whatever PIL's TIFF tag
    # code trips on (struct.error, SyntaxError, ValueError, ...) in a file whose pixels decode fine. The pixels
    # as stored beat a lost image: an exception here would end an evaluation's DataLoader (and leave the other
    # ranks waiting in a collective), so any error keeps the image as it is.
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation not in range(2, 9):
            return image  # 1 is upright; exif_transpose would copy the pixels for nothing
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _array_to_l(values: np.ndarray, nominal_max: float | None) -> Image.Image:
    """Linearly map greyscale `values` onto 0..255. With `nominal_max`, [0, nominal_max] -> [0, 255] (the
    range the type promises); without one, the image's own min..max (data with no nominal range)."""
    if nominal_max is not None:
        low, high = 0.0, nominal_max
    else:
        low, high = float(values.min()), float(values.max())
        if high == low:  # a constant image: keep it black rather than divide by zero
            high = low + 1.0
    scale = 255.0 / (high - low)
    # In float64 a band of rows at a time: the whole image's float64 copies took a 200 KB 16-bit PNG of 88
    # megapixels (under PIL's pixel limit) to 3 GB in one data worker, where the bands keep it to the 8-bit result
    grey = np.empty(values.shape, np.uint8)
    rows = max(1, _BAND_ELEMENTS // max(1, values[0].size)) if values.ndim >= 2 else len(values)
    for start in range(0, len(values), rows):
        band = values[start : start + rows].astype(np.float64)
        band -= low
        band *= scale
        np.rint(band, out=band)
        grey[start : start + rows] = np.clip(band, 0, 255, out=band)
    return Image.fromarray(grey, mode="L")


_BAND_ELEMENTS = 1 << 19  # 4 MB of float64 per band


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer ("I") and float ("F") greyscale -> 8-bit "L", without clipping.

    PIL's own convert("L") clips to 255, so a typical 16-bit photo becomes almost all white. We scale:
    - I;16*: by the full 16-bit range (65535 -> 255), as image viewers display them;
    - I: 0..255 is kept, 0..65535 is treated as 16-bit (older Pillow opened 16-bit PNGs as "I"),
      anything else (negative values, > 65535) is stretched from its own min..max;
    - F: 0..1 is taken as the usual float-image convention, 0..255 kept, anything else stretched.
    """
    values = np.asarray(image)
    if image.mode in _INT16_MODES:
        return _array_to_l(values, _UINT16_MAX)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return _array_to_l(values, 1.0)
    if low >= 0 and high <= 255:
        return _array_to_l(values, 255)
    if image.mode == "I" and low >= 0 and high <= _UINT16_MAX:
        return _array_to_l(values, _UINT16_MAX)
    return _array_to_l(values, None)


def has_transparency_entry(image: Image.Image) -> bool:
    """A palette, greyscale or RGB image with one value marked transparent (a PNG's tRNS chunk, which for RGB
    is a colour key; GIF transparency)."""
    return image.mode in ("P", "L", "RGB") and "transparency" in image.info


def _straight_alpha(image: Image.Image) -> Image.Image:
    """An image with transparency as "RGBA" or "LA" (straight alpha, what PIL pastes and converts);
    RGBA and LA images are returned as they are."""
    if image.mode in ("RGBA", "LA"):
        return image
    return image.convert(_STRAIGHT_ALPHA[image.mode])


def _composite(image: Image.Image, background: RGB) -> Image.Image:
    """A straight-alpha RGBA or LA image over an opaque `background` colour -> RGB.

    Pasting with the image as its own mask blends by its alpha band (colour * a + background * (1 - a)):
    the same pixels as Image.alpha_composite onto an opaque background, with one new image instead of three.
    """
    out = Image.new("RGB", image.size, tuple(background))
    out.paste(image, mask=image)
    return out


def to_rgb(image: Image.Image, alpha_background: RGB | None = WHITE, exif_orientation: bool = True) -> Image.Image:
    """Convert a PIL image of any mode to an 8-bit RGB image, at its own size.

    alpha_background: the colour transparent pixels are composited onto. White by default: images with
        transparency are mostly logos, icons and product shots made to be shown on a white page. `None`
        drops the alpha channel like PIL's convert("RGB"): transparent pixels then show whatever colour is
        stored under them. (`image_transform`'s default resizes RGBA and LA images before dropping their
        alpha, as openai/CLIP does; see the module docstring.)
    exif_orientation: apply the EXIF orientation tag first (see `apply_exif_orientation`).

    Palette, greyscale and RGB images with a transparent value (a colour key) treat it as transparency;
    16/32-bit and float greyscale are rescaled, not clipped (see `_high_depth_to_l`); CMYK, YCbCr, LAB, HSV,
    "1", "L" use PIL's conversions. An RGB image without a colour key (or with one and no background) is
    returned as it is, no copy.
    """
    if not isinstance(image, Image.Image):
        raise not_an_image_error(image)
    if exif_orientation:
        image = apply_exif_orientation(image)
    mode = image.mode
    if mode == "RGB" and not (alpha_background is not None and has_transparency_entry(image)):
        return image
    if mode in _INT16_MODES or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    if mode in _ALPHA_MODES or has_transparency_entry(image):
        # PIL converts La to LA only, and composites straight alpha. Without a background the detour through
        # RGBA/LA gives the pixels a direct convert("RGB") gives, but a palette whose transparency is a byte
        # string (a PNG tRNS chunk with partial alphas) would make PIL warn on every such image.
        with_alpha = _straight_alpha(image)
        if alpha_background is None:
            return with_alpha.convert("RGB")
        return _composite(with_alpha, alpha_background)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {error}") from error


def prepare_for_resize(
    image: Image.Image, alpha_background: RGB | None = None, exif_orientation: bool = True
) -> Image.Image:
    """`image` upright and in a mode PIL resizes faithfully: the first half of `image_transform`'s RGB
    conversion, the rest (`ToRGB`) coming after the geometry, where OpenAI's pipeline converts.

    With an `alpha_background`, an image with transparency is composited onto it now (see the module
    docstring for why before the resize). Otherwise RGB, L, RGBA, LA, RGBa and La are returned as they are
    (OpenAI's pipeline resizes them so; PIL resizes RGBA and LA with premultiplied alpha), "PA" becomes RGBA
    (PIL would interpolate its palette indices), and every other mode is converted to RGB now (see the
    module docstring); a palette image's transparent value is then ignored, as OpenAI's convert("RGB")
    ignores it.
    """
    if not isinstance(image, Image.Image):
        raise not_an_image_error(image)
    if exif_orientation:
        image = apply_exif_orientation(image)
    if alpha_background is not None and (image.mode in _ALPHA_MODES or has_transparency_entry(image)):
        return to_rgb(image, alpha_background, exif_orientation=False)
    if image.mode == "PA":
        return image.convert("RGBA")
    if image.mode in _RESIZED_AS_IS:
        return image
    return to_rgb(image, alpha_background=None, exif_orientation=False)


def central_part(image: Image.Image, max_aspect: int) -> Image.Image:
    """`image` itself, or, where its long side is more than `max_aspect` times its short side, its middle part
    of (nearly) that aspect ratio. The part is cut symmetrically, 2 pixels at a time from each end: an image that
    needs no resize then gives the centre crop's pixels exactly (CenterCrop rounds half offsets to even)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= max_aspect * short:
        return image
    cut = 2 * ((long - max_aspect * short) // 4)  # from each end
    box = (cut, 0, width - cut, height) if width > height else (0, cut, width, height - cut)
    return image.crop(box)
