"""Image preprocessing: PIL image of any mode -> normalised FloatTensor[3, H, W].

`image_transform(n)` is openai/CLIP's evaluation preprocessing, step for step: a torchvision `Compose`
whose `.transforms` are bicubic Resize of the shorter side to n, CenterCrop(n), conversion to RGB,
ToTensor, Normalize(CLIP's mean/std) -- so `preprocess.transforms[-1].mean`, `preprocess.transforms[:2]`
or `Compose([RandomResizedCrop(...), *preprocess.transforms[2:]])` work as they do on OpenAI's. The output
is identical to OpenAI's for RGB and L images, and, with the default alpha_background=None, for RGBA and
LA images too: those are resized in their own mode (PIL resizes them with premultiplied alpha, so fully
transparent areas come out black) and converted to RGB afterwards, as OpenAI's pipeline does. An image whose
shorter side already is n is not resized at all (torchvision's Resize returns it as it is, OpenAI's too): its
transparent areas then show the colour stored under them, often white.
`train=True` swaps Resize + CenterCrop for a bicubic RandomResizedCrop.

See `clip.image_modes` for where it deliberately differs from openai/CLIP (EXIF orientation, palette,
16-bit and other modes, very long images, `alpha_background`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from .image_modes import (  # noqa: F401  (re-exported: the preprocessing's public names)
    MAX_KEPT_ASPECT,
    OPENAI_MEAN,
    OPENAI_STD,
    RGB,
    TRAINING_ALPHA_BACKGROUND,
    WHITE,
    apply_exif_orientation,
    central_part,
    not_an_image_error,
    prepare_for_resize,
    to_rgb,
)

# RandomResizedCrop's default aspect-ratio range, used by the train=True transform.
RANDOM_CROP_RATIOS = (3 / 4, 4 / 3)


# The steps of ImageTransform. torchvision's own classes where they do exactly what OpenAI's pipeline does;
# the two geometry steps are torchvision's, preceded by `prepare_for_resize` (so `transforms[0]` is still a
# Resize with its `.size`); all are plain picklable objects for DataLoader workers.


def _refuse_empty(image: Image.Image) -> None:
    # torchvision's resize divides by a side (a bare ZeroDivisionError), its RandomResizedCrop made a tensor
    # out of no pixels at all
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image has no pixels (size {image.width}x{image.height}): an empty crop?")


class _PreparedForResize:
    """Mixin for a torchvision geometry transform: a PIL image goes through `prepare_for_resize` (with the
    subclass's `alpha_background`) before the transform; tensors go to it unchanged."""

    alpha_background: RGB | None

    def forward(self, image):
        if isinstance(image, Image.Image):
            _refuse_empty(image)
            image = prepare_for_resize(image, self.alpha_background)
        elif not isinstance(image, torch.Tensor):  # torchvision's "Unexpected type" would say neither what nor how
            raise not_an_image_error(image)
        return super().forward(image)


class ResizeAnyMode(_PreparedForResize, T.Resize):
    """torchvision's bicubic Resize of the shorter side to `size`, for a PIL image of any mode: the image
    first goes through `prepare_for_resize` (EXIF orientation, palette/16-bit/... conversions). Identical to
    Resize(size, bicubic) on RGB, L, RGBA and LA images without an orientation tag."""

    def __init__(self, size: int, alpha_background: RGB | None = None) -> None:
        super().__init__(size, interpolation=T.InterpolationMode.BICUBIC)
        self.alpha_background = alpha_background

    def forward(self, image):
        if isinstance(image, Image.Image):
            _refuse_empty(image)  # before central_part, which would cut a 0 x 50 image to 0 x 2
            image = central_part(image, MAX_KEPT_ASPECT)
        return super().forward(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value}, "
            f"alpha_background={self.alpha_background})"
        )


class RandomResizedCropAnyMode(_PreparedForResize, T.RandomResizedCrop):
    """torchvision's bicubic RandomResizedCrop to size x size over `scale` of the area (aspect ratios
    3/4..4/3, torch's global RNG, which the DataLoader seeds differently in every worker), after
    `prepare_for_resize` as in `ResizeAnyMode`."""

    def __init__(self, size: int, scale: tuple[float, float], alpha_background: RGB | None = None) -> None:
        super().__init__(size, scale=scale, ratio=RANDOM_CROP_RATIOS, interpolation=T.InterpolationMode.BICUBIC)
        self.alpha_background = alpha_background

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio=(3/4, 4/3), "
            f"interpolation={self.interpolation.value}, alpha_background={self.alpha_background})"
        )


class ToRGB:
    """PIL image -> RGB after the geometry, where OpenAI's pipeline has its convert("RGB"): drops the alpha
    of the RGBA/LA images `prepare_for_resize` leaves with alpha_background=None, converts L. Any mode is
    accepted (see `to_rgb`), so that user pipelines built from `.transforms` slices work; alpha is then
    composited onto `alpha_background` when one is set. The EXIF orientation is not applied again (the
    first step did, and resized images keep the tag in their info)."""

    def __init__(self, alpha_background: RGB | None = None) -> None:
        self.alpha_background = alpha_background

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image, alpha_background=self.alpha_background, exif_orientation=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha_background={self.alpha_background})"


class ImageTransform(T.Compose):
    """PIL image -> FloatTensor[3, image_size, image_size], normalised; see `image_transform`.

    A torchvision Compose, like openai/CLIP's preprocess: `.transforms` is the list of steps it runs,
    [ResizeAnyMode, CenterCrop, ToRGB, ToTensor, Normalize] (OpenAI's order and indices), or with
    train=True [RandomResizedCropAnyMode, ToRGB, ToTensor, Normalize]. The settings it was built from stay
    readable as attributes; they describe the steps built at construction, not later edits of the list.
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
        super().__init__(self._steps())

    def _steps(self) -> list:
        n = self.image_size
        if self.train:
            geometry = [RandomResizedCropAnyMode(n, self.resize_scale, self.alpha_background)]
        else:
            geometry = [ResizeAnyMode(n, self.alpha_background), T.CenterCrop(n)]
        # ToTensor: uint8 HWC -> float CHW in [0, 1]
        return [*geometry, ToRGB(self.alpha_background), T.ToTensor(), T.Normalize(self.mean, self.std)]


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    resize_scale: tuple[float, float] = (0.9, 1.0),
    alpha_background: RGB | None = None,
) -> ImageTransform:
    """The preprocessing for a model with `image_size`-pixel inputs: PIL image -> FloatTensor[3, n, n].

    train=False: bicubic resize of the shorter side to `image_size`, center crop, RGB conversion, to
        tensor, normalise -- openai/CLIP's steps (a torchvision Compose with the same `.transforms` order),
        numerically identical to its output for RGB, L, RGBA and LA images (without an EXIF orientation).
    train=True: a bicubic RandomResizedCrop covering `resize_scale` of the area, then the same last steps.
    alpha_background: None (the default) handles transparency like openai/CLIP, so released models see what
        they were trained on: the image is resized with its alpha (premultiplied, so where alpha is 0 no
        colour survives and fully transparent areas come out black), then the alpha is dropped. An image
        that needs no resize (train=False and its shorter side already `image_size`; OpenAI's pipeline
        skips it too) keeps the colour stored under its fully transparent areas. Pass e.g. (255, 255, 255)
        to composite transparent images onto white first, as a viewer shows them (and as the training
        loader, `clip.data`, does).
    """
    return ImageTransform(image_size, train, mean, std, resize_scale, alpha_background)
