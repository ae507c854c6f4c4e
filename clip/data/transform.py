"""The training-time image transform, written straight into a batch tensor.

Same result as `clip.preprocess.image_transform` (bicubic resize of the shorter side, center crop, CLIP
mean/std; or a RandomResizedCrop over `resize_scale` of the area with aspect ratios 3/4..4/3; or the CLIP
paper's random square crop of the resized image) on the RGB images it is given. Images with transparency
reach it already composited onto white (`decoding.upright_rgb` converts every mode to RGB before the
resize), which is `image_transform(alpha_background=(255, 255, 255))`, not the default `image_transform`,
whose premultiplied resize and dropped alpha follow openai/CLIP. Computed the fast way, which
`benchmarks/loader_speed.py` measures:
- the crop box is resized in one PIL call (`resize(box=...)`) instead of resizing the whole image and then
  cropping it, so the pixels the crop throws away are never interpolated. For the center crop the box is
  the one image_transform ends up showing (`center_crop_box`): the output differs from image_transform's by
  float rounding of the box, at most one grey level on a few pixels of smooth images (up to a few levels on
  a fraction of a percent of the pixels of pixel-level noise);
- JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (`draft`), and images more than 6x larger than the target
  are first shrunk by an integer factor (`reducing_gap`): faster, and slightly different pixels from a
  full-resolution resize of such large images;
- the batch holds uint8 pixels, a quarter of a float batch's bytes through shared memory, pinning and
  the host-to-device copy; `PixelNormalizer` turns them into the model's input where the batch lands
  (on the accelerator, in training), with the same arithmetic as a normalisation in the workers;
- the random crop comes from a numpy generator seeded per sample, so augmentations replay exactly after a
  resume and do not touch torch's global RNG.
Evaluation keeps using `image_transform`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..image_modes import OPENAI_MEAN, OPENAI_STD

RESIZE_SCALE = (0.9, 1.0)  # area fraction of RandomResizedCrop, as in image_transform(train=True)
ASPECT_RATIOS = (3 / 4, 4 / 3)
# PIL first box-averages by an integer factor when that still leaves >= 3x the target size, then resamples:
# much faster on big images, and by Pillow's documentation indistinguishable from a direct resize at 3.
REDUCING_GAP = 3.0

Box = tuple[float, float, float, float]


def center_crop_box(width: int, height: int, size: int) -> Box:
    """The source-pixel box that `image_transform(size)` (resize the shorter side to `size`, truncating the
    longer one to an integer; center crop, offsets rounded) ends up showing. Resizing this box straight to
    size x size samples the same source positions with the same filter scale, so the result is the same."""
    short, long = sorted((width, height))
    resized_long = int(size * long / short)
    resized_w, resized_h = (size, resized_long) if width <= height else (resized_long, size)
    left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)
    scale_x, scale_y = width / resized_w, height / resized_h
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = RESIZE_SCALE
) -> Box:
    """A RandomResizedCrop box: area fraction uniform in `scale`, aspect ratio log-uniform in 3/4..4/3;
    ten tries to fit in the image, then the largest centered crop with a ratio in range."""
    area = width * height
    log_low, log_high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    ratio = min(max(width / height, ASPECT_RATIOS[0]), ASPECT_RATIOS[1])
    crop_w, crop_h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def random_square_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """The CLIP paper's crop ("a random square crop from resized images"): the image resized so that its
    shorter side is the target size, then a target-size square at a random place. In source pixels: a
    square as large as the shorter side, at a uniformly drawn offset along the longer one."""
    side = min(width, height)
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return left, top, left + side, top + side


def draft_size(image_size: int, crop: str) -> int:
    """The smallest side a JPEG may be decoded at so the crop ("center", "random_square" or
    "random_resized") still has >= image_size pixels a side."""
    if crop != "random_resized":  # both crops span the whole shorter side
        return image_size
    smallest_side = math.sqrt(RESIZE_SCALE[0] * ASPECT_RATIOS[0])  # of the image's side, worst case
    return math.ceil(image_size / smallest_side)


class BatchImageWriter:
    """Resizes RGB images into rows of a uint8 batch tensor [B, 3, S, S]."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def write(self, image: Image.Image, box: Box, out: torch.Tensor) -> None:
        """out: ByteTensor[3, S, S] (a row of the batch); image: RGB."""
        size = self.image_size
        resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
        out.copy_(torch.from_numpy(np.array(resized)).permute(2, 0, 1))  # [S, S, 3] -> [3, S, S]


class PixelNormalizer:
    """uint8 pixel batches [B, 3, S, S] -> the model's float32 input, (x / 255 - mean) / std per channel,
    computed on the device it was made for (where the batch must be) and in the batch's memory format
    (channels-last stays channels-last).

    The per-channel constants are made once, on that device: building them per batch would copy from
    pageable host memory, which waits for the GPU's queue to drain."""

    def __init__(
        self, device: torch.device | str, mean: tuple[float, ...] = OPENAI_MEAN, std: tuple[float, ...] = OPENAI_STD
    ):
        # (x / 255 - mean) / std  ==  x * scale + shift, per channel
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise TypeError(f"expected uint8 pixels [B, 3, H, W], got {pixels.dtype} {list(pixels.shape)}")
        return pixels.to(torch.float32).mul_(self.scale).add_(self.shift)
