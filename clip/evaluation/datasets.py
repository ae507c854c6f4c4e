"""Classification datasets read from a local root; nothing here downloads.

- `ImageFolderDataset`: <root>/<class folder>/**/<image>, labels in sorted folder order.
- `CIFARDataset`: CIFAR-10/100 in torchvision's on-disk pickle format, read with a restricted unpickler.
- the synthetic shapes dataset of `clip.data.synthetic`.
`load_classification_data` turns a `ZeroShotDatasetConfig` into images, class names, templates and subsets.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from .config import ZeroShotDatasetConfig, repeated_names
from .templates import Template, builtin_templates, load_classnames, load_templates

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
# Folders that archivers and operating systems add next to the data: macOS zips carry __MACOSX/ with "._x.jpg"
# resource forks that have an image extension but are not images. (Names starting with "." are left out too.)
IGNORED_NAMES = frozenset({"__MACOSX"})
# Folder names that mean "a split of the dataset", not "a class".
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})
Transform = Callable[[Image.Image], Any]

logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; evaluation loaders skip and count these (see features.py)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


def read_image(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the size is refused below, with the file's name, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only
        with opened as image:
            _refuse_decompression_bomb(image, path)
            image.load()  # read now, so the file is closed when we return
            return image
    except UnreadableImageError:
        raise
    # Corrupt files surface as any of these, depending on the format plugin and where the data breaks off.
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(path, str(error) or type(error).__name__) from error


def _refuse_decompression_bomb(image: Image.Image, path: Path) -> None:
    """PIL refuses images of more than twice Image.MAX_IMAGE_PIXELS, and only warns between once and twice:
    a 150-megapixel PNG of a few hundred KB was decoded (seconds, and 450 MB as RGB in each loader worker),
    its warning lost in a worker's output. Evaluation images are far smaller: above the limit is a skip."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise UnreadableImageError(
            path, f"{width}x{height} pixels is more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): a decompression "
            f"bomb, or an image far larger than evaluation needs"
        )


def is_ignored(name: str) -> bool:
    """Hidden files and folders ("._x.jpg", ".DS_Store", ".git") and archiver metadata (__MACOSX)."""
    return name.startswith(".") or name in IGNORED_NAMES


def list_class_folders(root: Path) -> list[str]:
    """Names of the class folders directly under `root`, sorted (the label order)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not is_ignored(p.name))


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, sorted, leaving out hidden and archiver-metadata paths. Symbolic
    links to folders are followed, as torchvision's ImageFolder follows them (a class assembled from links
    to other folders is common), each real folder once, so a link to an ancestor cannot loop. A link to an
    ancestor of `folder` is not followed at all: it led into the dataset root, and from there into the other
    classes' folders, whose images were then read as this class's."""
    images, visited = [], set()
    top = os.path.realpath(folder)
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited or (real != top and top.startswith(os.path.join(real, ""))):
            subdirectories.clear()
            continue
        visited.add(real)
        subdirectories[:] = [name for name in subdirectories if not is_ignored(name)]
        for name in files:
            path = Path(directory, name)
            if path.suffix.lower() in IMAGE_EXTENSIONS and not is_ignored(name) and path.is_file():
                images.append(path)
    return sorted(images)


NUMBERED_FOLDER = re.compile(r"(\d+)_(.+)")


def folder_numbers(folders: Sequence[str]) -> list[int] | None:
    """The numbers of folders that are all named "<digits>_<name>" with one digit count ("00_a", "01_b");
    None when any folder is named otherwise or the digit counts differ."""
    matches = [NUMBERED_FOLDER.fullmatch(folder) for folder in folders]
    if not matches or not all(matches):
        return None
    if len({len(match.group(1)) for match in matches}) != 1:
        return None
    return [int(match.group(1)) for match in matches]


def folder_to_classname(folder: str, numbered: bool = False) -> str:
    """'red_circle' -> 'red circle' (underscores read as spaces); with `numbered`, '03_red_circle' -> 'red
    circle' too (the label prefix dropped; a folder without one is read as without `numbered`)."""
    match = NUMBERED_FOLDER.fullmatch(folder) if numbered else None
    if match:
        folder = match.group(2)
    return folder.replace("_", " ").strip()


def classnames_from_folders(folders: Sequence[str], warn: bool = True) -> list[str]:
    """Readable class names. The "<label>_" prefix is dropped only when the folders are named as
    `clip.data.synthetic.write_image_folder` names them: every one "<label>_<name>", with zero-padded labels
    0, 1, 2, ... in sorted order. A number that is part of the name ("2012_Audi_S4") must stay, so any other
    numbering keeps every name as it is -- with a warning (when `warn`) if all folders are numbered alike,
    as when one folder of a numbered set is missing: the numbers then end up in the prompts."""
    numbers = folder_numbers(folders)
    numbered = numbers == list(range(len(folders)))
    if warn and numbers is not None and not numbered:
        logger.warning(
            "all %d class folders are named '<number>_<name>' (%s, ...) but not numbered 0, 1, 2, ... in "
            "order (is a folder missing?), so their numbers were kept in the class names (%r, ...); if the "
            "numbers are labels, list the names in classnames.txt or a classnames_file",
            len(folders),
            ", ".join(folders[:3]),
            folder_to_classname(folders[0]),
        )
    return [folder_to_classname(folder, numbered) for folder in folders]


def warn_about_duplicate_classnames(classnames: Sequence[str], where: str) -> None:
    """Two classes with the same name get the same prompts, so zero-shot cannot tell them apart."""
    repeated = repeated_names(classnames)
    if repeated:
        logger.warning(
            "%s: several classes share the name(s) %s; zero-shot classification cannot tell them apart "
            "(set classnames_file to give every class its own name)",
            where,
            repeated,
        )


class ImageFolderDataset(Dataset):
    """<root>/<class folder>/**/<image> -> (transform(image), label); label = index of the sorted folder.

    class_folders: the folder names in label order, when they must agree with other splits (e.g. the union
        of the folders of train and test); a listed folder missing here has no images. Default: the folders
        under root.
    Class names: `classnames` if given, else <root>/classnames.txt (one per line, in label order) if present,
    else the folder names through `classnames_from_folders` (which warns, when `warn`, about numbered folder
    names it keeps as they are). Hidden files and folders and __MACOSX are ignored. An unreadable image raises
    `UnreadableImageError` when its item is read.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        classnames: list[str] | None = None,
        class_folders: Sequence[str] | None = None,
        warn: bool = True,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        present = list_class_folders(self.root)
        if class_folders is None:
            class_folders = present
        unlisted = sorted(set(present) - set(class_folders))
        if unlisted:
            raise ValueError(f"{self.root} has class folders {unlisted} that are not among the classes {class_folders}")
        if not class_folders:
            raise ValueError(f"{self.root} has no class folders (expected <root>/<class>/<image files>)")
        self.class_folders = list(class_folders)
        self.samples = [
            (path, label)
            for label, folder in enumerate(self.class_folders)
            if folder in present
            for path in list_images(self.root / folder)
        ]
        if not self.samples:
            raise ValueError(f"no images with extensions {sorted(IMAGE_EXTENSIONS)} under {self.root}")
        if classnames is None and (self.root / "classnames.txt").is_file():
            classnames = load_classnames(self.root / "classnames.txt")
        if classnames is None:
            classnames = classnames_from_folders(self.class_folders, warn)
        if len(classnames) != len(self.class_folders):
            raise ValueError(
                f"{len(classnames)} class names for {len(self.class_folders)} class folders in {self.root}"
            )
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
        # A malformed pickle raises nearly anything: UnpicklingError, EOFError, ValueError, TypeError, and
        # MemoryError for an array header declaring terabytes (numpy allocates it before the data is read)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, RecursionError) as error:
            raise ValueError(f"{path} is not a CIFAR pickle: {error or type(error).__name__}") from error
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
            # Pixel values in another dtype (floats in [0, 1], say) would be cast to near-black images silently
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                found = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
                raise ValueError(f"{folder / name}: 'data' must be a uint8 array of shape [N, 3072], got a {found}")
            if batch_labels is None or len(batch_labels) != len(data):
                raise ValueError(f"{folder / name}: '{layout.labels_key}' must hold one label per image")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
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


def synthetic_split_seed(seed: int, split: str) -> int:
    """The generator seed of a synthetic split: "test" (and "", the default) keep `seed` itself, the images a
    training run's own evaluation used; "train" keeps its historical seed + 1; any other name gets a stream
    of its own from a stable hash of the name (offset past 1, so it never lands on test's or train's)."""
    if split in ("", "test"):
        return seed
    if split == "train":
        return seed + 1
    return seed + 2 + zlib.crc32(split.encode("utf-8"))


def _synthetic_dataset(config: ZeroShotDatasetConfig) -> tuple[Dataset, list[str], list[str], dict[str, list[int]]]:
    from clip.data import synthetic

    # Every split its own images, so a linear probe never validates or tests on the images it was fitted on.
    seed = synthetic_split_seed(config.seed, config.split)
    dataset = synthetic.SyntheticClassification(config.num_samples, config.image_size, seed)
    subsets = {"heldout": list(dataset.heldout_class_indices)} if config.heldout_report else {}
    return dataset, list(dataset.classes), list(synthetic.templates()), subsets


def split_folder(root: str | Path, split: str) -> Path:
    """The image folder of `split`: <root>/<split>, which must exist; `root` itself when no split is named.

    Falling back to the root when <root>/<split> is missing would silently evaluate the wrong images (the
    train images as test, or the split folders as two classes), so that is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not split:
        return root
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"split {split!r}: no folder {folder}; the folders in {root} are {list_class_folders(root)} "
            f'(set split to one of them, or to "" if {root} itself holds the class folders)'
        )
    return folder


def refuse_split_folders_as_classes(root: Path) -> None:
    """A root whose only folders are split names ("train", "test", ...) was meant to be read with a split."""
    folders = list_class_folders(root)
    if folders and all(folder.lower() in SPLIT_NAMES for folder in folders):
        example = "test" if "test" in folders else folders[-1]
        raise ValueError(
            f"the class folders of {root} are {folders}, which look like dataset splits, not classes; "
            f"set split to the one to evaluate (e.g. split = {example!r})"
        )


def evenly_spaced_indices(length: int, count: int) -> list[int]:
    """`count` distinct indices spread evenly over range(length), always starting at 0 (deterministic)."""
    return [i * length // count for i in range(count)]


def subsample_indices(kind: str, length: int, count: int) -> list[int]:
    """The `count` items of a dataset of `kind` that `max_samples` keeps, chosen so that classes of similar size
    are all represented once `count` reaches the number of classes; a fixed function of its arguments, so
    every rank keeps the same items."""
    if kind == "synthetic":
        # Its labels cycle through the classes item by item, so evenly spaced indices alias onto a few classes
        # (100 of 960 items, every 9.6th, hold 5 of the 48 classes); its first `count` items go round them all.
        return list(range(count))
    # Spread over the whole dataset: the first N of a sorted image folder would be class 0's images only.
    return evenly_spaced_indices(length, count)


# The settings only kind = "synthetic" reads: set on another kind they change nothing (num_samples does not
# limit an image folder's images; max_samples does).
SYNTHETIC_ONLY_SETTINGS = ("num_samples", "image_size", "seed", "heldout_report")


def warn_about_synthetic_settings_on_other_kinds(config: ZeroShotDatasetConfig) -> None:
    """Names the synthetic-only settings a dataset of another kind sets away from their defaults. A warning,
    not an error: turning a config's synthetic evaluation into a real one by overrides
    (`eval.zeroshot.0.kind=imagefolder eval.zeroshot.0.root=...`) leaves them set and must still run."""
    if config.kind == "synthetic":
        return
    defaults = ZeroShotDatasetConfig()
    changed = [name for name in SYNTHETIC_ONLY_SETTINGS if getattr(config, name) != getattr(defaults, name)]
    if changed:
        logger.warning(
            "zero-shot dataset %r: %s %s read by kind = \"synthetic\" only and ignored for %s%s",
            config.resolved_name(), ", ".join(changed), "is" if len(changed) == 1 else "are", config.kind,
            " (max_samples limits how many images are evaluated)" if "num_samples" in changed else "",
        )


def load_classification_data(
    config: ZeroShotDatasetConfig,
    transform: Transform | None,
    class_folders: Sequence[str] | None = None,
    warn: bool = True,
) -> ClassificationData:
    """Builds the dataset that `config` describes, with `transform` applied to every image.

    class_folders: imagefolder only: the class folder names in label order (see `ImageFolderDataset`), so
    that several splits share one labelling.
    warn: log warnings about the class names (shared names, kept folder numbers) and about synthetic-only
        settings on another kind. Pass False where another process or call reports the same data: on ranks
        other than 0, for the second split of a dataset.
    """
    templates: list[Template] | None = None
    subsets: dict[str, list[int]] = {}
    if warn:
        warn_about_synthetic_settings_on_other_kinds(config)
    if config.kind == "synthetic":
        base, classnames, templates, subsets = _synthetic_dataset(config)
        dataset: Dataset = TransformedDataset(base, transform)
    elif config.kind in CIFAR_LAYOUTS:
        if not config.root:
            raise ValueError(f"a {config.kind} dataset needs `root`")
        if config.split not in ("", "train", "test"):
            raise ValueError(f"CIFAR splits are 'train' and 'test' (or '' for test), got {config.split!r}")
        dataset = CIFARDataset(config.root, config.kind, train=config.split == "train", transform=transform)
        classnames = dataset.classes
    elif config.kind == "imagefolder":
        if not config.root:
            raise ValueError("an imagefolder dataset needs `root`")
        folder = split_folder(config.root, config.split)
        if not config.split:
            refuse_split_folders_as_classes(folder)
        # A classnames_file replaces the names read from the folders (below): no warning about those then.
        folder_warnings = warn and not config.classnames_file
        # A split's own classnames.txt, else one beside the splits (<root>/classnames.txt, shared by them)
        shared_names = Path(config.root) / "classnames.txt"
        use_shared = config.split and not (folder / "classnames.txt").is_file() and shared_names.is_file()
        dataset = ImageFolderDataset(
            folder, transform, classnames=load_classnames(shared_names) if use_shared else None,
            class_folders=class_folders, warn=folder_warnings,
        )
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
    if warn:
        warn_about_duplicate_classnames(classnames, config.resolved_name())
    if config.templates_file:
        templates = load_templates(config.templates_file)
    elif templates is None or config.builtin_templates != "default":
        templates = builtin_templates(config.builtin_templates)
    if 0 < config.max_samples < len(dataset):
        dataset = Subset(dataset, subsample_indices(config.kind, len(dataset), config.max_samples))
    return ClassificationData(dataset, list(classnames), templates, subsets)


def with_split(config: ZeroShotDatasetConfig, split: str) -> ZeroShotDatasetConfig:
    return dataclasses.replace(config, split=split)
