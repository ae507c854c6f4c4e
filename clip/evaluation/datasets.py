"""Classification datasets read from a local root; nothing here downloads.

- `ImageFolderDataset`: <root>/<class folder>/**/<image>, labels in sorted folder order.
- `CIFARDataset`: CIFAR-10/100 in torchvision's on-disk pickle format, read with a restricted unpickler.
- the synthetic shapes dataset of `clip.data.synthetic`.
`load_classification_data` turns a `ZeroShotDatasetConfig` into images, class names, templates and subsets.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from .config import ZeroShotDatasetConfig
from .templates import Template, builtin_templates, load_classnames, load_templates

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
Transform = Callable[[Image.Image], Any]


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # read now, so the file is closed when we return
            return image
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def folder_to_classname(folder: str) -> str:
    """'03_red_circle' -> 'red circle': drop a numeric ordering prefix, read underscores as spaces."""
    return re.sub(r"^\d+_", "", folder).replace("_", " ").strip()


class ImageFolderDataset(Dataset):
    """<root>/<class folder>/**/<image> -> (transform(image), label); label = index of the sorted folder.

    Class names: `classnames` if given, else <root>/classnames.txt (one per line, in label order) if present,
    else the folder names through `folder_to_classname`.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, classnames: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root} has no class folders (expected <root>/<class>/<image files>)")
        self.samples = [
            (path, label)
            for label, folder in enumerate(folders)
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise ValueError(f"no images with extensions {sorted(IMAGE_EXTENSIONS)} under {self.root}")
        if classnames is None and (self.root / "classnames.txt").is_file():
            classnames = load_classnames(self.root / "classnames.txt")
        if classnames is None:
            classnames = [folder_to_classname(folder.name) for folder in folders]
        if len(classnames) != len(folders):
            raise ValueError(f"{len(classnames)} class names for {len(folders)} class folders in {self.root}")
        self.classes = list(classnames)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), label


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's files contain (dicts, lists, strings, numbers, numpy uint8 arrays).

    A pickle can run arbitrary code through `find_class`; refusing every other global makes reading a
    downloaded file safe.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of the CIFAR format")
        if name == "_reconstruct":  # numpy 2 renamed numpy.core to numpy._core; avoid its deprecation shim
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except ImportError:
                    continue
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR batch or meta file as a dict with str keys (the files are Python 2 pickles: latin-1)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with open(path, "rb") as file:
        try:
            content = _RestrictedUnpickler(file, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a CIFAR pickle: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a dict, got {type(content).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


@dataclass(frozen=True)
class CIFARLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str


CIFAR_LAYOUTS = {
    "cifar10": CIFARLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": CIFARLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


class CIFARDataset(Dataset):
    """CIFAR-10 or CIFAR-100 from torchvision's on-disk layout, without torchvision's download/md5 logic.

    `root` may be the folder holding `cifar-10-batches-py/` (`cifar-100-python/`) or that folder itself.
    """

    def __init__(
        self, root: str | Path, kind: str = "cifar10", train: bool = False, transform: Transform | None = None
    ):
        if kind not in CIFAR_LAYOUTS:
            raise ValueError(f"kind must be one of {sorted(CIFAR_LAYOUTS)}, got {kind!r}")
        layout = CIFAR_LAYOUTS[kind]
        folder = Path(root) / layout.folder
        folder = folder if folder.is_dir() else Path(root)
        images, labels = [], []
        for name in layout.train_files if train else layout.test_files:
            batch = load_cifar_pickle(folder / name)
            data, batch_labels = batch.get("data"), batch.get(layout.labels_key)
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / name}: 'data' must be a uint8 array of shape [N, 3072]")
            if batch_labels is None or len(batch_labels) != len(data):
                raise ValueError(f"{folder / name}: '{layout.labels_key}' must hold one label per image")
            images.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch_labels)
        names = load_cifar_pickle(folder / layout.meta_file).get(layout.names_key)
        if not names:
            raise ValueError(f"{folder / layout.meta_file} has no '{layout.names_key}'")
        # CIFAR-100 names are identifiers ("aquarium_fish"); prompts read better with spaces.
        self.classes = [(n.decode() if isinstance(n, bytes) else n).replace("_", " ") for n in names]
        if labels and not 0 <= min(labels) <= max(labels) < len(self.classes):
            raise ValueError(f"{folder}: labels outside 0..{len(self.classes) - 1}")
        self.images = np.ascontiguousarray(np.concatenate(images))  # N, 32, 32, 3 (HWC, RGB)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.labels[index]


class TransformedDataset(Dataset):
    """Applies an image transform to a dataset of (PIL image, label) pairs."""

    def __init__(self, dataset: Dataset, transform: Transform | None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return (self.transform(image) if self.transform else image), int(label)


@dataclass
class ClassificationData:
    """What a classification evaluation needs: (image, label) pairs, class names, prompt templates, and
    named subsets of class indices to report separately (e.g. the synthetic held-out pairs)."""

    dataset: Dataset
    classnames: list[str]
    templates: list[Template]
    subsets: dict[str, list[int]] = field(default_factory=dict)


def _synthetic_dataset(config: ZeroShotDatasetConfig) -> tuple[Dataset, list[str], list[str], dict[str, list[int]]]:
    from clip.data import synthetic

    # A different seed for "train", so a linear probe never tests on the images it was fitted on.
    seed = config.seed + 1 if config.split == "train" else config.seed
    dataset = synthetic.SyntheticClassification(config.num_samples, config.image_size, seed)
    subsets = {"heldout": list(dataset.heldout_class_indices)} if config.heldout_report else {}
    return dataset, list(dataset.classes), list(synthetic.templates()), subsets


def load_classification_data(config: ZeroShotDatasetConfig, transform: Transform | None) -> ClassificationData:
    """Builds the dataset that `config` describes, with `transform` applied to every image."""
    templates: list[Template] | None = None
    subsets: dict[str, list[int]] = {}
    if config.kind == "synthetic":
        base, classnames, templates, subsets = _synthetic_dataset(config)
        dataset: Dataset = TransformedDataset(base, transform)
    elif config.kind in CIFAR_LAYOUTS:
        if not config.root:
            raise ValueError(f"a {config.kind} dataset needs `root`")
        if config.split not in ("train", "test"):
            raise ValueError(f"CIFAR splits are 'train' and 'test', got {config.split!r}")
        dataset = CIFARDataset(config.root, config.kind, train=config.split == "train", transform=transform)
        classnames = dataset.classes
    elif config.kind == "imagefolder":
        if not config.root:
            raise ValueError("an imagefolder dataset needs `root`")
        root = Path(config.root)
        root = root / config.split if config.split and (root / config.split).is_dir() else root
        dataset = ImageFolderDataset(root, transform)
        classnames = dataset.classes
    else:
        raise ValueError(f"unknown dataset kind {config.kind!r}")

    if config.classnames_file:
        from_file = load_classnames(config.classnames_file)
        if len(from_file) != len(classnames):
            raise ValueError(
                f"{config.classnames_file} has {len(from_file)} class names; the dataset has {len(classnames)} classes"
            )
        classnames = from_file
    if config.templates_file:
        templates = load_templates(config.templates_file)
    elif templates is None or config.builtin_templates != "default":
        templates = builtin_templates(config.builtin_templates)
    if config.max_samples > 0 and config.max_samples < len(dataset):
        dataset = Subset(dataset, range(config.max_samples))
    return ClassificationData(dataset, list(classnames), templates, subsets)


def with_split(config: ZeroShotDatasetConfig, split: str) -> ZeroShotDatasetConfig:
    return dataclasses.replace(config, split=split)
