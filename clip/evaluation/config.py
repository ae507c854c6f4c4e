"""Typed configuration of evaluation: which zero-shot and retrieval datasets to run, and how often.

`EvalConfig` is the `[eval]` section of the training config; `ZeroShotDatasetConfig` is also what the
`clip-zeroshot` command reads from its `[[datasets]]` tables. Plain dataclasses with simple field types,
so the generic TOML loader in `clip.config` can read and type-check them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip.config_io import InvalidValue, check_field_types, home_expanded, require, require_workers
from clip.evaluation.templates import BUILTIN_TEMPLATE_SETS

Precision = Literal["fp32", "bf16", "fp16"]

# open_clip's --precision values, which people write here: the ones that autocast over float32 weights, as
# every precision here does, and those that cast the weights themselves, which have no counterpart.
_OPEN_CLIP_AUTOCAST = {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"}
_OPEN_CLIP_CAST_WEIGHTS = ("pure_bf16", "pure_fp16")


def precision_hint(key: str, value: object) -> str:
    """The `config_hint` (see clip.config_io) of a config with a `precision` field: what open_clip's name for a
    precision is here, where the field's type check alone said only that it is not fp32, bf16 or fp16."""
    if key != "precision" or not isinstance(value, str):
        return ""
    if value in _OPEN_CLIP_AUTOCAST:
        return f"open_clip's {value!r} is {_OPEN_CLIP_AUTOCAST[value]!r} here: autocast over float32 weights"
    if value in _OPEN_CLIP_CAST_WEIGHTS:
        return (f"open_clip's {value!r} casts the weights themselves, which is not offered: the weights stay "
                f"float32, and {value.removeprefix('pure_')!r} autocasts over them")
    return ""


def require_at_least(minimum: int, **values: int) -> None:
    """Refuses the first of `values` below `minimum`: a 0 batch or chunk size would only fail much later,
    deep inside a loop, with an unhelpful message. Read through `from_dict`, the error names the full
    dotted key ("eval.text_batch_size must be >= 1, got 0")."""
    for name, value in values.items():
        require(name, value, value >= minimum, f">= {minimum}")


def repeated_names(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted. Counted in one pass: ImageNet-21k's 21,843 class names
    took seconds with a list.count per name, at every evaluation, on every rank."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def require_unique_names(key: str, names: Sequence[str]) -> None:
    """Every dataset's results are keyed by its name, so a repeated name would overwrite another's metrics."""
    repeated = repeated_names(names)
    if repeated:
        raise InvalidValue(
            key,
            f"needs a unique name per dataset (their metrics are keyed by it), but {', '.join(map(repr, repeated))} "
            f"occurs more than once in {list(names)}; set `name` to tell them apart",
        )


def confusion_png_name(dataset_name: str) -> str:
    """The file a dataset's confusion matrix is drawn to: a name such as "imagenet/val" is one file, not a
    subfolder that does not exist."""
    return "confusion_" + re.sub(r"[/\\]", "_", dataset_name) + ".png"


def require_distinct_png_names(names: Sequence[str]) -> None:
    """Datasets whose names differ only where a slash is ("shapes/test", "shapes_test") drew their confusion
    matrices to one file, the second replacing the first without a word."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(confusion_png_name(name), []).append(name)
    shared = [(file, sharing) for file, sharing in by_file.items() if len(sharing) > 1]
    if shared:
        file, sharing = shared[0]
        raise InvalidValue(
            "datasets", f"{' and '.join(map(repr, sharing))} would draw their confusion matrices to the same file, "
            f"{file}; set `name` to tell them apart (or confusion_png = false)",
        )


# The largest side of a synthetic dataset's images: the models' largest input is 448 pixels
MAX_SYNTHETIC_IMAGE_SIZE = 4096


@dataclass
class ZeroShotDatasetConfig:
    """One zero-shot classification dataset, read from local files (nothing is ever downloaded)."""

    # Name used in metric keys (`zeroshot/<name>/top1`) and output files; empty means the `kind`.
    name: str = ""
    # imagefolder: <root>/<class folder>/<image>; cifar10/cifar100: torchvision's on-disk pickles;
    # synthetic: clip.data.synthetic's generated shapes (no files needed).
    kind: Literal["imagefolder", "cifar10", "cifar100", "synthetic"] = "synthetic"
    # Dataset directory. For CIFAR: the folder holding `cifar-10-batches-py/` (or that folder itself).
    root: str = ""
    # Which split. Empty: the evaluation split -- CIFAR's "test", the synthetic "test" images, and for an
    # imagefolder `root` itself. CIFAR: "test" or "train". imagefolder: the subfolder `<root>/<split>`, which
    # must exist. synthetic: any name; every name draws its own images ("train" and "val" differ from "test").
    split: str = ""
    # Class names, one per line or a JSON list (lines copied from a Python list, quoted, one or several to a
    # line, are unquoted, and a Python list copied whole, brackets and all, is read as its strings); empty: the
    # dataset's own (CIFAR meta, classnames.txt in the image folder or beside its split folders, else the folder
    # names with "_" read as spaces, and their "00_", "01_", ... label prefixes removed when every folder is
    # numbered so, as clip.data.synthetic.write_image_folder writes them). A list of lists (the CLIP paper's
    # FER2013 classes, [['angry'], ['happy', 'smiling'], ...]) gives a class several names, all prompted.
    classnames_file: str = ""
    # Prompt templates with one "{}", one per line or a JSON list (a Python list too, whole or its lines, as
    # the CLIP paper's prompts.md writes them); empty: the built-in set
    # (`builtin_templates`), or the synthetic dataset's own templates for kind = "synthetic".
    templates_file: str = ""
    # Which built-in template set to use when no templates_file is given: "default" or "simple".
    builtin_templates: str = "default"
    # Evaluate at most this many images, evenly spaced over the dataset's order (so every class of a sorted
    # image folder is represented, not just the first; the synthetic set, which cycles through its classes,
    # gives its first N); 0 = all.
    max_samples: int = 0
    # kind = "synthetic" only: number of images, their size in pixels, and the generator's seed.
    num_samples: int = 500
    image_size: int = 64
    seed: int = 0
    # kind = "synthetic" only: also report accuracy on the colour/shape pairs held out from training.
    heldout_report: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)  # a pathlib.Path as its text; a wrong type refused as in a file
        require_at_least(0, max_samples=self.max_samples, seed=self.seed)
        require_at_least(1, num_samples=self.num_samples, image_size=self.image_size)
        # 100000 pixels a side asked numpy for 75 GB, a traceback once the model had loaded
        require("image_size", self.image_size, self.image_size <= MAX_SYNTHETIC_IMAGE_SIZE,
                f"at most {MAX_SYNTHETIC_IMAGE_SIZE} (the synthetic shapes' side in pixels)")
        # Checked with the config, so that the error names the key (it was found when the dataset was listed)
        names = sorted(BUILTIN_TEMPLATE_SETS)
        require("builtin_templates", self.builtin_templates, self.builtin_templates in names,
                f"one of {', '.join(map(repr, names))}")
        # Here, not when the dataset is listed: there "an imagefolder dataset needs `root`" named neither the
        # file nor which of the [[eval.zeroshot]] tables, and came after clip-train had made the run's folder
        folders = {"imagefolder": "the image folder (<root>/<class>/<image>, or <root>/<split>/<class>/<image>)",
                   "cifar10": "the folder holding cifar-10-batches-py/", "cifar100": "the folder holding cifar-100-python/"}
        require("root", self.root, self.kind == "synthetic" or bool(self.root),
                f"{folders.get(self.kind, 'its folder')} for kind = {self.kind!r}")
        self.root = home_expanded(self.root)
        self.classnames_file = home_expanded(self.classnames_file)
        self.templates_file = home_expanded(self.templates_file)

    def resolved_name(self) -> str:
        """The name its metrics are keyed by: `name`, else the kind."""
        return self.name or self.kind


@dataclass
class RetrievalDatasetConfig:
    """One image-text retrieval dataset: images on disk plus captions (several per image allowed)."""

    # Name used in metric keys (`retrieval/<name>/image_to_text_R@1`); empty means the file's stem.
    name: str = ""
    # Karpathy-style JSON ({"images": [{"filename", "filepath", "split", "sentences": [{"raw"}]}]}), or a
    # CSV/TSV/JSONL manifest with one (image, caption) row per caption; "auto" decides by file extension.
    format: Literal["auto", "karpathy", "manifest"] = "auto"
    # Path of the annotation file.
    annotations: str = ""
    # Directory that image paths in the annotations are relative to; empty = the annotation file's folder.
    image_root: str = ""
    # Karpathy JSON only: which split to evaluate ("test", "val", ...); empty = every image.
    split: str = "test"
    # Manifest only: the column names of the image path and of the caption.
    image_column: str = "image"
    caption_column: str = "caption"
    # Manifest only, as for training's [[data.sources]]: "auto" = CSV quoting rules for .csv, none for .tsv
    # (whose captions hold raw '"'); "csv" for a TSV that a CSV writer (pandas) quoted; "none" reads every
    # field as written.
    quoting: Literal["auto", "none", "csv"] = "auto"
    # Evaluate the first N images (and all of their captions); 0 = all.
    max_images: int = 0
    # Each caption is put in place of "{}" here before encoding; empty = the captions as written. The CLIP
    # paper's Flickr30k and MSCOCO figures used "a photo of {}" (worth 1-2 points of R@1, it says).
    caption_template: str = ""
    # How a ground truth tied with other candidates ranks: behind them ("pessimistic": a collapsed model scores
    # no better than chance) or ahead ("optimistic": for captions that several images share word for word, each
    # copy of an image's true caption a tie that would count against it), as clip-retrieval's --ties.
    ties: Literal["pessimistic", "optimistic"] = "pessimistic"

    def __post_init__(self) -> None:
        check_field_types(self)  # a pathlib.Path as its text; a wrong type refused as in a file
        require_at_least(0, max_images=self.max_images)
        require("annotations", self.annotations, bool(self.annotations),
                "the path of the dataset's Karpathy JSON or CSV/TSV/JSONL manifest")  # as `root` above
        require("caption_template", self.caption_template,
                not self.caption_template or self.caption_template.count("{}") == 1,
                'empty or a text with one "{}" where the caption goes, e.g. "a photo of {}"')
        self.annotations, self.image_root = home_expanded(self.annotations), home_expanded(self.image_root)

    def resolved_name(self) -> str:
        """The name its metrics are keyed by: `name`, else the annotation file's stem."""
        return self.name or Path(self.annotations).stem


@dataclass
class EvalConfig:
    """Evaluations the trainer runs during and at the end of training (`clip.evaluation.run_evaluations`)."""

    # Run every N optimiser steps; 0 = only once, at the end of training.
    every_n_steps: int = 0
    # Also evaluate the starting weights, before the first step (recorded as step 0): the baseline a fine-tuning
    # run improves on. Once per run: a resumed run does not repeat it.
    at_start: bool = False
    # Images (and texts) per forward pass.
    batch_size: int = 64
    # DataLoader worker processes per rank for reading evaluation images.
    workers: int = 2
    # Autocast dtype for the encoders ("fp32" = no autocast).
    precision: Precision = "fp32"
    # Prompts encoded per forward pass when building zero-shot classifiers (bounds text-side memory).
    text_batch_size: int = 256
    # Rows and columns of the similarity matrix held at once when ranking retrieval candidates.
    retrieval_chunk_size: int = 4096
    # Zero-shot classification datasets ([[eval.zeroshot]] tables).
    zeroshot: list[ZeroShotDatasetConfig] = field(default_factory=list)
    # Image-text retrieval datasets ([[eval.retrieval]] tables).
    retrieval: list[RetrievalDatasetConfig] = field(default_factory=list)

    config_hint = staticmethod(precision_hint)

    def __post_init__(self) -> None:
        check_field_types(self)  # a pathlib.Path as its text; a wrong type refused as in a file
        require_at_least(0, every_n_steps=self.every_n_steps)
        require_workers("workers", self.workers)
        require_at_least(
            1,
            batch_size=self.batch_size,
            text_batch_size=self.text_batch_size,
            retrieval_chunk_size=self.retrieval_chunk_size,
        )
        # Metric keys are "zeroshot/<name>/..." and "retrieval/<name>/...": names must differ within a kind.
        require_unique_names("zeroshot", [dataset.resolved_name() for dataset in self.zeroshot])
        require_unique_names("retrieval", [dataset.resolved_name() for dataset in self.retrieval])


@dataclass
class ZeroShotRunConfig:
    """The config file of `clip-zeroshot` / `scripts/zeroshot.py`: one model, one or more datasets."""

    # A released name ("ViT-B/32"), a weights or checkpoint file, or a training run directory.
    model: str = ""
    # "auto" (CUDA when available, else CPU), or a torch device string such as "cuda:1" or "cpu".
    device: str = "auto"
    # Images per forward pass, and DataLoader worker processes.
    batch_size: int = 64
    workers: int = 2
    # Autocast dtype for the encoders ("fp32" = no autocast), over float32 weights (also on CUDA, where
    # clip.load's are float16).
    precision: Precision = "fp32"
    # Prompts encoded per forward pass when building the classifiers.
    text_batch_size: int = 256
    # Where results.json and the confusion-matrix PNGs go ("~" is the home folder); empty:
    # ./zeroshot_results/<config file stem>.
    output_dir: str = ""
    # Write confusion_<dataset>.png (needs matplotlib; skipped with a log message without it).
    confusion_png: bool = True
    # The datasets, as [[datasets]] tables.
    datasets: list[ZeroShotDatasetConfig] = field(default_factory=list)

    config_hint = staticmethod(precision_hint)

    def __post_init__(self) -> None:
        check_field_types(self)  # a pathlib.Path as its text; a wrong type refused as in a file
        require_workers("workers", self.workers)
        require_at_least(1, batch_size=self.batch_size, text_batch_size=self.text_batch_size)
        require_unique_names("datasets", [dataset.resolved_name() for dataset in self.datasets])
        if self.confusion_png:
            require_distinct_png_names([dataset.resolved_name() for dataset in self.datasets])
        # No shell expands a TOML file's "~/results": it made a folder named "~" in the current one
        self.output_dir = os.path.expanduser(self.output_dir)
