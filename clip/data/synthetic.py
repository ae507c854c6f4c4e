"""A synthetic image-caption world, rendered on the fly with PIL: one coloured shape on a noisy background.

It exists so the whole pipeline (data -> training -> zero-shot evaluation) can be run and checked in
minutes on a laptop CPU, with a number at the end that means something:

- `SyntheticCaptions`: (image, caption) pairs such as "a small red circle on the left" to train on.
  Every caption names the colour and the shape; size and position are mentioned some of the time.
- `SyntheticClassification`: (image, label) over the colour x shape classes ("red circle", ...) for
  zero-shot classification with `templates()`; chance is 1 / len(classes).
- Some (colour, shape) combinations (`DEFAULT_HELDOUT_PAIRS`) are never rendered in the training split;
  zero-shot accuracy on them (`heldout_class_indices`) measures compositional generalisation.

Determinism: item i depends only on (seed, split, i). Its random generator is seeded with the integer
tuple (seed, stream, i) through numpy's SeedSequence, never with Python's per-process salted hash(), so
every process, worker and machine renders the same pixels and the same caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Names -> RGB, chosen to stay distinct under the +-JITTER below and against the grey background
# (whose level stays within BACKGROUND_LEVEL +- gradient, far from both white and black).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 220, 40),
    "purple": (140, 45, 175),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# Radius of the shape's bounding circle as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.21, "large": 0.27}
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
# One held-out colour per shape, each colour at most once: 6 of the 48 pairs (12.5%), and every colour
# and every shape still appears in training with other partners.
DEFAULT_HELDOUT_PAIRS: tuple[str, ...] = (
    "red star",
    "green square",
    "blue triangle",
    "yellow circle",
    "purple cross",
    "orange diamond",
)

COLOUR_JITTER = 12  # +- per channel
SIZE_JITTER = 0.015  # +- radius fraction
ROTATION_JITTER = 12.0  # +- degrees
BACKGROUND_LEVEL = (85, 170)  # range of the mean grey level
BACKGROUND_GRADIENT = 25.0  # +- grey levels across the image
BACKGROUND_NOISE = 6.0  # std of per-pixel noise, also over the shape
SUPERSAMPLE = 2  # the shape's mask is drawn at 2x and box-downsampled: cheap antialiasing

_STREAMS = {"train": 1, "val": 2, "classification": 3}


def class_names() -> list[str]:
    """Every "colour shape" pair, colour-major: label = colour index * len(SHAPES) + shape index."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def templates() -> list[str]:
    """Zero-shot prompt templates; "{}" takes a class name. They use "the" so every class reads
    grammatically ("the orange circle"), and the training captions use "the" as well as "a"/"an"."""
    return ["the {}.", "a photo of the {}.", "an image of the {}.", "a drawing of the {}."]


@dataclass(frozen=True)
class SyntheticSpec:
    """What defines the synthetic world: the seed, the side of the square images, and the class names
    ("colour shape") of the pairs the training split never shows."""

    seed: int = 0
    image_size: int = 64
    heldout_pairs: tuple[str, ...] = DEFAULT_HELDOUT_PAIRS

    def __post_init__(self) -> None:
        object.__setattr__(self, "heldout_pairs", tuple(self.heldout_pairs))
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels to draw shapes, got {self.image_size}")
        known = set(class_names())
        unknown = [pair for pair in self.heldout_pairs if pair not in known]
        if unknown:
            raise ValueError(f"unknown held-out pairs {unknown}; a pair is 'colour shape', e.g. 'red star'")
        training = [name for name in class_names() if name not in self.heldout_pairs]
        for word in (*COLOURS, *SHAPES):
            if not any(word in name.split() for name in training):
                raise ValueError(f"held-out pairs remove every training example of {word!r}")


def _generator(seed: int, split: str, index: int) -> np.random.Generator:
    # SeedSequence mixes the integer tuple with a fixed hash: hash-free across processes and platforms.
    return np.random.default_rng([seed, _STREAMS[split], index])


def _sample_details(rng: np.random.Generator) -> tuple[str, str]:
    """Size and position, uniformly."""
    sizes = tuple(SIZES)
    return sizes[rng.integers(len(sizes))], POSITIONS[rng.integers(len(POSITIONS))]


def _shape_outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of `shape` with bounding radius r around (cx, cy), rotated by `angle` radians.
    Image y grows downwards, so "up" is negative y."""
    if shape == "square":
        points = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":  # taller than wide, so no rotation of the square looks like it
        points = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "triangle":  # pointing up, centroid slightly below the center for visual balance
        points = [(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)]
    elif shape == "star":  # five points, outer radius 1, inner 0.42
        points = [
            (radius * math.sin(k * math.pi / 5), -radius * math.cos(k * math.pi / 5))
            for k, radius in zip(range(10), [1.0, 0.42] * 5)
        ]
    elif shape == "cross":  # a plus sign with arms 0.34 wide
        a, b = 0.34, 0.95
        quarter = [(-a, -b), (a, -b), (a, -a)]  # the top arm; the others are this turned by 90 degrees
        points = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter]
    else:
        raise ValueError(f"no outline for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _shape_center(position: str, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    """Center in image fractions. Off-center shapes move towards their side as far as their size allows,
    keeping a 0.04 margin from the border; the other coordinate wobbles a little."""
    along = (0.46 - radius) * rng.uniform(0.75, 1.0)
    across = rng.uniform(-0.05, 0.05)
    if position == "center":
        return 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    dx, dy = {"left": (-along, across), "right": (along, across), "top": (across, -along), "bottom": (across, along)}[
        position
    ]
    return 0.5 + dx, 0.5 + dy


def render(colour: str, shape: str, size: str, position: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one shape on a grey gradient with noise; all variation comes from `rng`."""
    n = image_size
    # Background: a grey level, a linear gradient in a random direction, per-pixel noise (added last,
    # over the shape too, so the shape's edges and colour are never perfectly clean).
    level = rng.uniform(*BACKGROUND_LEVEL)
    gx, gy = rng.uniform(-BACKGROUND_GRADIENT, BACKGROUND_GRADIENT, size=2)
    ramp = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    background = (level + gx * ramp[None, :] + gy * ramp[:, None])[..., None]  # [n, n, 1]

    radius = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    cx, cy = _shape_center(position, radius, rng)
    angle = math.radians(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
    scale = n * SUPERSAMPLE
    mask = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        r = 0.92 * radius * scale
        draw.ellipse((cx * scale - r, cy * scale - r, cx * scale + r, cy * scale + r), fill=255)
    else:
        draw.polygon(_shape_outline(shape, cx * scale, cy * scale, radius * scale, angle), fill=255)
    coverage = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] * (1.0 / 255.0)  # [n, n, 1]

    rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    image = background + coverage * (rgb - background)  # [n, n, 3]
    image += rng.normal(0.0, BACKGROUND_NOISE, size=(n, n, 1)).astype(np.float32)  # grey noise: keeps hue
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def make_caption(colour: str, shape: str, size: str, position: str, rng: np.random.Generator) -> str:
    """A caption naming the colour and the shape, and sometimes the size and the position, in one of a few
    word orders: "a small red circle on the left", "at the top, the blue star", "a photo of a green
    cross.", "the white square is in the middle", "a large diamond in purple"."""
    use_size = rng.random() < 0.5
    place = POSITION_PHRASES[position][rng.integers(len(POSITION_PHRASES[position]))]
    form = rng.integers(5)
    if form == 3:  # a sentence about the object's place
        return f"the {colour} {shape} is {place}" + ("." if rng.random() < 0.5 else "")
    words = f"{size} {colour} {shape}" if use_size else f"{colour} {shape}"
    if form == 4:  # colour after the shape
        words = f"{size} {shape} in {colour}" if use_size else f"{shape} in {colour}"
    noun_phrase = ("the " if rng.random() < 0.3 else _article(words) + " ") + words
    if form == 1 or (form in (0, 4) and rng.random() < 0.3):
        noun_phrase = f"{noun_phrase} {place}"
    elif form == 2:
        noun_phrase = f"{place}, {noun_phrase}"
    if form != 2:  # "a photo of on the left, ..." would not be English
        prefixes = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")
        noun_phrase = prefixes[rng.integers(len(prefixes))] + noun_phrase
    return noun_phrase + ("." if rng.random() < 0.5 else "")


class _SyntheticBase(torch.utils.data.Dataset):
    """Shared by both datasets: the spec, the class list and the held-out split of it."""

    def __init__(self, num_samples: int, spec: SyntheticSpec) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative, got {num_samples}")
        self.num_samples = num_samples
        self.spec = spec
        self.classes = class_names()
        self.heldout_class_indices = [self.classes.index(pair) for pair in spec.heldout_pairs]

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        return index % self.num_samples  # negative indices count from the end


class SyntheticCaptions(_SyntheticBase):
    """(PIL RGB image, caption) pairs. split="train" never shows the held-out pairs; split="val" is a
    separate stream of images over every pair (for caption retrieval on unseen combinations)."""

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        heldout_pairs: Sequence[str] = DEFAULT_HELDOUT_PAIRS,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        super().__init__(num_samples, SyntheticSpec(seed, image_size, tuple(heldout_pairs)))
        self.split = split
        excluded = set(self.heldout_class_indices) if split == "train" else set()
        self.pair_indices = [k for k in range(len(self.classes)) if k not in excluded]

    def _attributes(self, rng: np.random.Generator) -> dict[str, str]:
        label = self.pair_indices[rng.integers(len(self.pair_indices))]
        colour, shape = self.classes[label].split()
        size, position = _sample_details(rng)
        return {"colour": colour, "shape": shape, "size": size, "position": position}

    def describe(self, index: int) -> dict:
        """Item `index`'s attributes and caption, without rendering the image."""
        rng = _generator(self.spec.seed, self.split, self._check_index(index))
        attributes = self._attributes(rng)
        return {**attributes, "caption": make_caption(**attributes, rng=rng)}

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        rng = _generator(self.spec.seed, self.split, self._check_index(index))
        attributes = self._attributes(rng)
        caption = make_caption(**attributes, rng=rng)
        return render(**attributes, image_size=self.spec.image_size, rng=rng), caption


class SyntheticClassification(_SyntheticBase):
    """(PIL RGB image, label) over `classes` ("red circle", ... every colour x shape pair), from a seed
    stream of its own, so its images are never training images. Labels cycle through the classes
    (item i has the (i mod K)-th class), so every class is equally represented."""

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        include_heldout_pairs: bool = True,
        heldout_pairs: Sequence[str] = DEFAULT_HELDOUT_PAIRS,
    ) -> None:
        super().__init__(num_samples, SyntheticSpec(seed, image_size, tuple(heldout_pairs)))
        excluded = set() if include_heldout_pairs else set(self.heldout_class_indices)
        self.label_cycle = [k for k in range(len(self.classes)) if k not in excluded]

    @staticmethod
    def templates() -> list[str]:
        return templates()

    def describe(self, index: int) -> dict:
        """Item `index`'s label and attributes, without rendering the image."""
        index = self._check_index(index)
        label = self.label_cycle[index % len(self.label_cycle)]
        colour, shape = self.classes[label].split()
        size, position = _sample_details(_generator(self.spec.seed, "classification", index))
        return {"label": label, "colour": colour, "shape": shape, "size": size, "position": position}

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._check_index(index)
        rng = _generator(self.spec.seed, "classification", index)
        label = self.label_cycle[index % len(self.label_cycle)]
        colour, shape = self.classes[label].split()
        size, position = _sample_details(rng)
        return render(colour, shape, size, position, self.spec.image_size, rng), label


def class_folder_name(label: int, class_name: str, num_classes: int) -> str:
    """"07_red_star": a zero-padded label first, so the alphabetical order torchvision's ImageFolder
    sorts folders in is the label order."""
    width = max(2, len(str(num_classes - 1)))
    return f"{label:0{width}d}_{class_name.replace(' ', '_')}"


def write_image_folder(dataset: SyntheticClassification, root: Path | str) -> Path:
    """Write `dataset` as PNGs in an ImageFolder tree, root/<label>_<class_name>/<index>.png, plus
    root/classnames.txt (one class name per line, in label order). Every class gets a folder even if it
    has no image (e.g. include_heldout_pairs=False); read such a tree with ImageFolder(allow_empty=True).
    Returns root. Refuses a non-empty root, so stale images never mix in."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write the image folder into a new directory")
    folders = [root / class_folder_name(k, name, len(dataset.classes)) for k, name in enumerate(dataset.classes)]
    for folder in folders:
        folder.mkdir(parents=True)
    width = len(str(max(len(dataset) - 1, 0)))
    for index in range(len(dataset)):
        image, label = dataset[index]
        image.save(folders[label] / f"{index:0{width}d}.png")
    (root / "classnames.txt").write_text("".join(name + "\n" for name in dataset.classes))
    return root
