"""Classification datasets read from a local root; nothing here downloads.

`load_classification_data` turns a `ZeroShotDatasetConfig` into images, class names, templates and subsets,
from one of
- `ImageFolderDataset` (image_folder.py): <root>/<class folder>/**/<image>, labels in sorted folder order.
- `CIFARDataset` (cifar.py): CIFAR-10/100 in torchvision's on-disk pickle format, read with a restricted unpickler.
- the synthetic shapes dataset of `clip.data.synthetic`.
Reading one image file (`read_image`, `UnreadableImageError`) is in image_files.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from .cifar import CIFAR_LAYOUTS, CIFARDataset, load_cifar_pickle
from .config import ZeroShotDatasetConfig, repeated_names
from .image_files import Transform, UnreadableImageError, read_image
from .image_folder import (
    ImageFolderDataset,
    classnames_from_folders,
    ends_of,
    folder_to_classname,
    list_class_folders,
    refuse_names_in_another_order,
    refuse_split_folders_as_classes,
    split_folder,
)
from .templates import (
    ClassName,
    Template,
    builtin_templates,
    first_names,
    load_classnames,
    load_templates,
    names_of,
    one_name_each,
)

# What other modules import from here: the names defined below, and those of the dataset kinds and of image
# reading, which live in the modules named in the docstring.
__all__ = [
    "CIFARDataset",
    "ClassificationData",
    "ImageFolderDataset",
    "TransformedDataset",
    "UnreadableImageError",
    "classnames_from_folders",
    "evenly_spaced_indices",
    "folder_to_classname",
    "list_class_folders",
    "load_cifar_pickle",
    "load_classification_data",
    "read_image",
    "refuse_wordnet_ids_as_classnames",
    "split_folder",
    "synthetic_split_seed",
    "warn_about_duplicate_classnames",
    "with_split",
]

logger = logging.getLogger(__name__)


def prompted_spelling(name: str) -> str:
    """`name` as the tokenizer sees it: lowercased, whitespace collapsed."""
    return " ".join(name.lower().split())


def warn_about_duplicate_classnames(classnames: Sequence[str], where: str) -> None:
    """Two classes with the same name get the same prompts, so zero-shot cannot tell them apart."""
    repeated = repeated_names(classnames)
    if repeated:
        logger.warning(
            "%s: several classes share the name(s) %s; zero-shot classification cannot tell them apart "
            "(give every class its own name: a config's classnames_file, or the classnames passed)",
            where,
            repeated,
        )
    # The tokenizer lowercases and collapses whitespace: "Apple" and "apple ", or "red  fox" and "red fox", give
    # the same prompts as surely as a repeated name
    spellings: dict[str, set[str]] = {}
    for name in classnames:
        spellings.setdefault(prompted_spelling(name), set()).add(name)
    alike = sorted(" = ".join(repr(name) for name in sorted(group)) for group in spellings.values() if len(group) > 1)
    if alike:
        logger.warning(
            "%s: class names that differ only in case or spacing give the same prompts (the tokenizer lowercases "
            "and collapses spaces), so zero-shot classification cannot tell them apart: %s",
            where,
            ", ".join(alike[:10]) + (f" and {len(alike) - 10} more" if len(alike) > 10 else ""),
        )


def warn_about_names_in_several_classes(classnames: Sequence[ClassName], where: str) -> None:
    """A name among two classes' several names gives both classes the same prompts: it pulls their embeddings
    together. Told apart from the first names' repeats (warn_about_duplicate_classnames), which results show."""
    classes_of: dict[str, set[int]] = {}
    for index, names in enumerate(classnames):
        for name in names_of(names):
            classes_of.setdefault(prompted_spelling(name), set()).add(index)
    shared = sorted(f"{name!r} (classes {', '.join(map(str, sorted(classes)))})"
                    for name, classes in classes_of.items() if len(classes) > 1)
    if shared:
        logger.warning(
            "%s: some names are given to several classes, whose prompts they make alike: %s", where,
            ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else ""),
        )


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
    named subsets of class indices to report separately (e.g. the synthetic held-out pairs). The sources say
    where the names and templates came from, for the results file: a file's path, or what else gave them."""

    dataset: Dataset
    classnames: list[str]  # as results name the classes: the first of a class's several names
    templates: list[Template]
    subsets: dict[str, list[int]] = field(default_factory=dict)
    classnames_source: str = ""
    templates_source: str = ""
    # Where the class names file gives some class several names (the CLIP paper's FER2013): every class's name or
    # names (`ClassName`), all of them prompted
    several_names: list[ClassName] | None = None

    @property
    def prompted_names(self) -> list[ClassName]:
        """What the zero-shot classifier is built from: `classnames`, or `several_names` where given."""
        return self.classnames if self.several_names is None else self.several_names


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


def require_classes_to_choose_between(name: str, classnames: Sequence[str]) -> None:
    """Zero-shot classification of a dataset with one class classifies every image right, whatever the
    model: its 100% would be reported as a result. Refused wherever zero-shot datasets are listed."""
    if len(classnames) < 2:
        raise ValueError(
            f"dataset {name!r} has {len(classnames)} class ({', '.join(classnames)}); zero-shot classification "
            "needs at least 2 classes to choose between (with one, every image is classified right)"
        )


# A WordNet noun id, as ImageNet names its class folders ("n01440764"), alone or before the names a synset
# mapping file lists for it ("n01440764 tench, Tinca tinca", as the devkit's and Kaggle's LOC_synset_mapping.txt)
WORDNET_ID = re.compile(r"n\d{8}(?=\s|$)")


def refuse_wordnet_ids_as_classnames(name: str, classnames: Sequence[str]) -> None:
    """Zero-shot prompts built from ImageNet's folder names ("a photo of a n01440764.") name nothing the text
    encoder knows, and the accuracy comes out near chance, reported as a result. Refused when every class
    name is, or starts with, a WordNet id: the folder names themselves, or a synset mapping file given as the
    class names. Wherever zero-shot datasets are listed (a linear probe never reads the names)."""
    ids = [WORDNET_ID.match(classname.strip()) for classname in classnames]
    if not classnames or not all(ids):
        return
    example = classnames[0].strip()
    fix = ("give a classnames_file with one readable name per line (\"tench\", \"goldfish\", ...) in the sorted "
           "order of the class folders, e.g. the 1000 names the CLIP paper used for ImageNet")
    if all(classname.strip() == match.group() for classname, match in zip(classnames, ids, strict=True)):
        raise ValueError(
            f"dataset {name!r}: its class names are WordNet ids ({', '.join(classnames[:3])}, ...), as ImageNet "
            f"names its class folders, and a prompt such as 'a photo of a {example}.' names nothing a text encoder "
            f"knows; {fix}"
        )
    raise ValueError(
        f"dataset {name!r}: its class names start with WordNet ids ({example!r}, ...): the class names file is a "
        f"mapping of folders to names (as LOC_synset_mapping.txt), whose ids would be part of every prompt; {fix}"
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
    names_file: str | Path = ""  # an imagefolder's class names file, if it has one
    several_names: list[ClassName] | None = None
    if warn:
        warn_about_synthetic_settings_on_other_kinds(config)
    if config.kind == "synthetic":
        base, classnames, templates, subsets = _synthetic_dataset(config)
        dataset: Dataset = TransformedDataset(base, transform)
        names_source = templates_source = "the synthetic dataset's own"
    elif config.kind in CIFAR_LAYOUTS:
        if config.split not in ("", "train", "test"):
            raise ValueError(f"CIFAR splits are 'train' and 'test' (or '' for test), got {config.split!r}")
        dataset = CIFARDataset(config.root, config.kind, train=config.split == "train", transform=transform)
        classnames = dataset.classes
        names_source = str(dataset.meta_file)
    elif config.kind == "imagefolder":
        folder = split_folder(config.root, config.split)
        if not config.split:
            refuse_split_folders_as_classes(folder)
        # A classnames_file replaces the names read from the folders (below): no warning about those then.
        folder_warnings = warn and not config.classnames_file
        # A split's own classnames.txt, else one beside the splits (<root>/classnames.txt, shared by them)
        own_names, shared_names = folder / "classnames.txt", Path(config.root) / "classnames.txt"
        has_own_names = own_names.is_file()  # which ImageFolderDataset reads, given no names
        use_shared = config.split and not has_own_names and shared_names.is_file()
        if config.classnames_file:
            # Stand-ins, one per class folder, for the file's names (checked and put in below): a classnames.txt
            # that the file replaces is not read, so one left stale (of another length) is no error
            names = [""] * len(class_folders if class_folders is not None else list_class_folders(folder))
        else:
            names = one_name_each(load_classnames(shared_names), shared_names) if use_shared else None
        dataset = ImageFolderDataset(
            folder, transform, classnames=names, class_folders=class_folders, warn=folder_warnings
        )
        classnames = dataset.classes
        names_file = config.classnames_file or (shared_names if use_shared else own_names if has_own_names else "")
        names_source = str(names_file) if names_file else "the class folder names"
    else:
        raise ValueError(f"unknown dataset kind {config.kind!r}")

    if config.classnames_file:
        from_file = load_classnames(config.classnames_file)
        if len(from_file) != len(classnames):
            # Which folders made the count: a stray one among ImageNet's synset folders sorts at either end
            folders = (f" (the class folders of {dataset.root}: {ends_of(dataset.class_folders)})"
                       if isinstance(dataset, ImageFolderDataset) else "")
            raise ValueError(
                f"{config.classnames_file} has {len(from_file)} class names; the dataset has {len(classnames)} "
                f"classes{folders}"
            )
        classnames = first_names(from_file)
        several_names = from_file if classnames != from_file else None
        names_source = config.classnames_file
    if names_file:
        refuse_names_in_another_order(classnames, dataset.class_folders, str(names_file))
    if warn:
        warn_about_duplicate_classnames(classnames, config.resolved_name())
        if several_names is not None:
            warn_about_names_in_several_classes(several_names, config.resolved_name())
    if config.templates_file:
        templates = load_templates(config.templates_file)
        templates_source = config.templates_file
    elif templates is None or config.builtin_templates != "default":
        templates = builtin_templates(config.builtin_templates)
        templates_source = f"the built-in set {config.builtin_templates!r}"
    if 0 < config.max_samples < len(dataset):
        dataset = Subset(dataset, subsample_indices(config.kind, len(dataset), config.max_samples))
    return ClassificationData(
        dataset, list(classnames), templates, subsets, names_source, templates_source, several_names
    )


def with_split(config: ZeroShotDatasetConfig, split: str) -> ZeroShotDatasetConfig:
    return dataclasses.replace(config, split=split)
