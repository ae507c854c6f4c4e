"""A classification dataset stored as a folder of images: <root>/<class folder>/**/<image>.

`ImageFolderDataset` labels images by their class folder in sorted order; the helpers here list the class
folders and images (leaving out hidden files and archiver metadata), turn folder names into class names,
and find the folder of a split (<root>/<split>).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from clip.config_io import relative_path_note

from .image_files import Transform, read_image
from .templates import load_classnames, one_name_each

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# Folders that archivers and operating systems add next to the data: macOS zips carry __MACOSX/ with "._x.jpg"
# resource forks that have an image extension but are not images. (Names starting with "." are left out too.)
IGNORED_NAMES = frozenset({"__MACOSX"})
# Folder names that mean "a split of the dataset", not "a class".
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})

logger = logging.getLogger(__name__)


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


def ends_of(folders: Sequence[str], shown: int = 2) -> str:
    """"a, b, ..., y, z": the first and last `shown` of the sorted class folders, where a stray folder among
    ImageNet's 1000 synset folders ("ILSVRC2012_img_val", "val", "z_extra") sorts, so that a count of classes
    one off says which folder made it."""
    listed = folders if len(folders) <= 2 * shown else [*folders[:shown], "...", *folders[-shown:]]
    return ", ".join(listed)


def refuse_names_in_another_order(classnames: Sequence[str], class_folders: Sequence[str], source: str) -> None:
    """Class names are listed in label order, the sorted order of the class folders. A list written in
    another order (as the classes came to mind: cat, dog, bird) gives each folder another class's prompts,
    and the accuracy comes out near 0 without a word. An entry that is the name of another class folder
    than its own, while its own folder's name is listed at another entry, shows that order: refused, naming
    the entry and where it belongs. `source`: the file read."""
    readable = [name.lower() for name in classnames_from_folders(class_folders, warn=False)]
    counts = Counter(readable)  # (readable.count per name was quadratic: 5 s for ImageNet-21k's classes)
    label_of = {name: label for label, name in enumerate(readable) if counts[name] == 1}
    keys = [name.replace("_", " ").strip().lower() for name in classnames]
    listed = set(keys)
    for label, (name, key) in enumerate(zip(classnames, keys, strict=True)):
        other = label_of.get(key)
        # Not where the other folder's own entry names it too: that is a name given twice, which
        # warn_about_duplicate_classnames reports. Nor where this folder's own name is listed nowhere: a file
        # may rename a folder after another whose entry it renamed too (folders cat, wild_cat named
        # "house cat", "cat"), which is an order of its own choosing, not another order.
        if (other is not None and other != label and key != readable[label] and keys[other] != key
                and readable[label] in listed):
            raise ValueError(
                f"{source}: entry {label + 1} is {name!r}, the name of class folder {class_folders[other]!r} "
                f"(label {other}), but label {label} is folder {class_folders[label]!r}: class names are listed "
                f"in the sorted order of the class folders ({', '.join(class_folders[:4])}"
                f"{', ...' if len(class_folders) > 4 else ''})"
            )


def loose_images_hint(root: Path) -> str:
    """What to do with images lying directly in `root`, where class folders were expected: ImageNet's
    validation set is distributed as 50,000 files in one folder, and its labels in a separate file."""
    loose = sum(1 for path in root.iterdir()
                if path.suffix.lower() in IMAGE_EXTENSIONS and not is_ignored(path.name) and path.is_file())
    if not loose:
        return ""
    return (f"; its {loose} image files lie directly in it, and an image's class is the folder it is in: move "
            "each into a folder of its class first (ImageNet's validation images into their synset folders "
            "n01440764/, ...: see README's Evaluation section)")


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
            raise FileNotFoundError(_missing_folder(self.root))
        present = list_class_folders(self.root)
        # (a union over splits: a class folder of another split counts, and is named as one)
        given_folders = class_folders is not None and list(class_folders) != present
        if class_folders is None:
            class_folders = present
        unlisted = sorted(set(present) - set(class_folders))
        if unlisted:
            raise ValueError(f"{self.root} has class folders {unlisted} that are not among the classes {class_folders}")
        if not class_folders:
            raise ValueError(f"{self.root} has no class folders (expected <root>/<class>/<image files>)"
                             f"{loose_images_hint(self.root)}")
        self.class_folders = list(class_folders)
        self.samples = [
            (path, label)
            for label, folder in enumerate(self.class_folders)
            if folder in present
            for path in list_images(self.root / folder)
        ]
        if not self.samples:
            raise ValueError(f"no images with extensions {sorted(IMAGE_EXTENSIONS)} under {self.root}")
        names_file = None  # where the names came from, for an error about them: None for those passed
        if classnames is None and (self.root / "classnames.txt").is_file():
            names_file = self.root / "classnames.txt"
            classnames = load_classnames(names_file)
        if classnames is None:
            classnames = classnames_from_folders(self.class_folders, warn)
        classnames = one_name_each(classnames, names_file)
        if len(classnames) != len(self.class_folders):
            where = f"in {self.root}" if not given_folders else (
                f"of the splits together, {self.root} holding {len(present)} of them; the others are another "
                "split's, whose classes need names too")
            raise ValueError(
                f"{len(classnames)} class names for {len(self.class_folders)} class folders {where} "
                f"({ends_of(self.class_folders)})"
            )
        self.classes = classnames
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), label


class MissingSplitError(FileNotFoundError):
    """A split folder that is not there; `split` names it, for commands whose option for it has another name."""

    def __init__(self, split: str, message: str) -> None:
        super().__init__(message)
        self.split = split


def split_folder(root: str | Path, split: str) -> Path:
    """The image folder of `split`: <root>/<split>, which must exist; `root` itself when no split is named.

    Falling back to the root when <root>/<split> is missing would silently evaluate the wrong images (the
    train images as test, or the split folders as two classes), so that is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(_missing_folder(root))
    if not split:
        return root
    folder = root / split
    if not folder.is_dir():
        raise MissingSplitError(
            split,
            f"split {split!r}: no folder {folder}; the folders in {root} are {list_class_folders(root)} "
            f'(the split must be one of them, or "" if {root} itself holds the class folders)'
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


def _missing_folder(root: Path) -> str:
    """Why `root` is no image folder: a file there ("not found" of a file that is there sent the user looking for
    it), or nothing, said with where a relative root was looked for (the command's folder, not the config
    file's)."""
    if root.exists():
        return f"image folder {root} is a file, not a folder of class folders"
    return f"image folder not found: {root}{relative_path_note(str(root))}"
