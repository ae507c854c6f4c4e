"""Image preprocessing: PIL image of any mode -> normalised FloatTensor[3, H, W].

`image_transform(n)` reproduces OpenAI's evaluation preprocessing exactly for RGB images (bicubic resize of
the shorter side to n, center crop to n x n, to [0, 1], normalise with CLIP's mean/std); `train=True`
swaps resize + crop for a bicubic RandomResizedCrop. Every other image mode first goes through `to_rgb`.

Where we deliberately differ from openai/CLIP (whose pipeline is Resize, CenterCrop, convert("RGB")):
- the RGB conversion comes *first*. PIL resizes palette ("P") and bilevel ("1") images with nearest
  neighbour whatever filter is asked for, so converting first is what makes the bicubic resize bicubic;
- 16/32-bit integer and float greyscale images are rescaled to 8 bits instead of clipped at 255 (which
  turns most of a 16-bit image white);
- the EXIF orientation tag is applied, so a photo is seen upright, as a viewer shows it.
For an RGB image without an orientation tag the output is identical to OpenAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

# Per-channel statistics of OpenAI's training images; the released models expect inputs normalised by them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

WHITE = (255, 255, 255)
RGB = tuple[int, int, int]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
_UINT16_MAX = 65535


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip `image` as its EXIF orientation tag says; the image itself when there is no such tag."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation == 1:
        return image  # exif_transpose would copy the pixels for nothing
    return ImageOps.exif_transpose(image)


def _array_to_l(values: np.ndarray, nominal_max: float | None) -> Image.Image:
    """Linearly map greyscale `values` onto 0..255. With `nominal_max`, [0, nominal_max] -> [0, 255] (the
    range the type promises); without one, the image's own min..max (data with no nominal range)."""
    values = values.astype(np.float64)
    if nominal_max is not None:
        low, high = 0.0, nominal_max
    else:
        low, high = float(values.min()), float(values.max())
        if high == low:  # a constant image: keep it black rather than divide by zero
            high = low + 1.0
    scaled = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


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


def to_rgb(image: Image.Image, alpha_background: RGB | None = WHITE, exif_orientation: bool = True) -> Image.Image:
    """Convert a PIL image of any mode to an 8-bit RGB image.

    alpha_background: the colour transparent pixels are composited onto. White by default: images with
        transparency are mostly logos, icons and product shots made to be shown on a white page. `None`
        drops the alpha channel like PIL's convert("RGB") (and openai/CLIP): transparent pixels then show
        whatever colour happens to be stored under them.
    exif_orientation: apply the EXIF orientation tag first (see `apply_exif_orientation`).

    Palette images with a transparent index go through RGBA so that index is treated as transparency;
    16/32-bit and float greyscale are rescaled, not clipped (see `_high_depth_to_l`); CMYK, YCbCr, LAB, HSV,
    "1", "L" use PIL's conversions. An RGB image is returned as it is (no copy).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if exif_orientation:
        image = apply_exif_orientation(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _INT16_MODES or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    # A palette or greyscale PNG can mark one value transparent ("transparency" in info, a tRNS chunk).
    if mode in _ALPHA_MODES or (mode in ("P", "L") and "transparency" in image.info):
        if mode == "La":  # premultiplied; PIL converts it only to straight-alpha LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        if alpha_background is None:
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (*alpha_background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {error}") from error


class ImageTransform:
    """PIL image -> FloatTensor[3, image_size, image_size], normalised; see `image_transform`.

    A plain class (no lambdas, no closures) so it pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        resize_scale: tuple[float, float] = (0.9, 1.0),
        alpha_background: RGB | None = None,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need three values (R, G, B), got {mean} and {std}")
        if not 0.0 < resize_scale[0] <= resize_scale[1] <= 1.0:
            raise ValueError(f"resize_scale must satisfy 0 < low <= high <= 1, got {resize_scale}")
        self.image_size = image_size
        self.train = train
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_scale = (float(resize_scale[0]), float(resize_scale[1]))
        self.alpha_background = alpha_background

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image, alpha_background=self.alpha_background)
        n = self.image_size
        if self.train:
            # RandomResizedCrop's default aspect ratios (3/4, 4/3); torch's global RNG, which the
            # DataLoader seeds differently in every worker.
            top, left, height, width = RandomResizedCrop.get_params(image, list(self.resize_scale), [3 / 4, 4 / 3])
            image = TF.resized_crop(image, top, left, height, width, [n, n], InterpolationMode.BICUBIC)
        else:
            image = TF.resize(image, n, interpolation=InterpolationMode.BICUBIC)  # shorter side -> n
            image = TF.center_crop(image, [n, n])
        tensor = TF.to_tensor(image)  # uint8 HWC -> float CHW in [0, 1]
        return TF.normalize(tensor, self.mean, self.std)

    def __repr__(self) -> str:
        if self.train:
            geometry = f"random_resized_crop(scale={self.resize_scale}, bicubic) -> {self.image_size}"
        else:
            geometry = f"resize(shorter side -> {self.image_size}, bicubic), center_crop({self.image_size})"
        alpha = "drop alpha" if self.alpha_background is None else f"alpha onto {self.alpha_background}"
        return (
            f"ImageTransform(to_rgb({alpha}), {geometry}, to_tensor, "
            f"normalize(mean={self.mean}, std={self.std}))"
        )


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    resize_scale: tuple[float, float] = (0.9, 1.0),
    alpha_background: RGB | None = None,
) -> ImageTransform:
    """The preprocessing for a model with `image_size`-pixel inputs: PIL image -> FloatTensor[3, n, n].

    train=False: RGB conversion, bicubic resize of the shorter side to `image_size`, center crop, to
        tensor, normalise -- numerically identical to openai/CLIP's for RGB images.
    train=True: RGB conversion, then a bicubic RandomResizedCrop covering `resize_scale` of the area.
    alpha_background: None (the default) drops transparency like openai/CLIP, so released models see what
        they were trained on; pass e.g. (255, 255, 255) to composite transparent images onto white.
    """
    return ImageTransform(image_size, train, mean, std, resize_scale, alpha_background)
