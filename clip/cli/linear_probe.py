"""`clip-linear-probe --model M --dataset KIND --root DIR`: logistic-regression probe on frozen image features.

Features of the train split (and of a validation split, or a held-out fraction of train) pick the L2
strength; the probe is refitted on train + validation and scored on the test split. Writes
linear_probe_results.json to the output directory.

The splits must be different images (the same folder, or the same synthetic seed, for two of them is an
error), and an imagefolder's splits share one labelling: the union of their class folders, sorted, so a
class missing from one split does not shift the labels of the others.

Each split's features are kept in <output dir>/features/<train|val|test>.pt as soon as they are extracted, and
a later run reuses them when they were made from the same weights, images and settings (feature_cache.py):
an interrupted or failed sweep, or another --metric, does not extract them again.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from clip.config_io import home_expanded
from clip.evaluation.config import ZeroShotDatasetConfig
from clip.evaluation.datasets import (
    ClassificationData,
    TransformedDataset,
    list_class_folders,
    load_classification_data,
    split_folder,
    synthetic_split_seed,
    with_split,
)
from clip.evaluation.image_folder import MissingSplitError
from clip.evaluation.linear_probe import (
    DEFAULT_VAL_FRACTION,
    VALIDATION_FIELD,
    extract_features,
    run_linear_probe,
    validation_count,
)

from .common import (
    add_evaluation_options,
    errors_help,
    keep_results_of_other_weights,
    load_model,
    positive_int,
    resolve_device,
    run_command,
    setup_logging,
    workers_for_this_machine,
    writable_output_dir,
    write_json,
)
from .feature_cache import (
    FeatureKey,
    image_list_digest,
    load_features,
    remove_stale_temporaries,
    save_features,
    weights_digest,
)

logger = logging.getLogger("clip.linear_probe")


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (checked before the model loads and features are
    extracted, which can take hours)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-linear-probe", description=__doc__.split("\n\n")[0],
        epilog=errors_help("a missing dataset folder, a value out of range"),
    )
    parser.add_argument("--model", required=True, help="released name, weights/checkpoint file, or run directory")
    parser.add_argument("--dataset", choices=["imagefolder", "cifar10", "cifar100", "synthetic"], required=True,
                        help="an image folder tree under --root, CIFAR in torchvision's layout under --root, or the "
                        "rendered synthetic shapes")
    parser.add_argument("--root", default="", help="dataset root; an imagefolder root holds <split>/<class>/<image>")
    parser.add_argument("--train-split", default="train",
                        help="the split the probe is fitted on: an imagefolder's subfolder, CIFAR's 'train', or a "
                        "synthetic split name (default: train)")
    parser.add_argument("--test-split", default="test",
                        help="the split it is scored on, of the same kinds (default: test)")
    parser.add_argument(
        "--val-split",
        default="",
        help="a validation split (an imagefolder's subfolder, or a synthetic split name); "
        "default: hold out --val-fraction of train (stratified by class)",
    )
    parser.add_argument(
        "--val-fraction",
        type=open_fraction,
        default=None,
        help=f"the share of train held out without --val-split (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out and of the synthetic data")
    parser.add_argument("--num-samples", type=positive_int, default=2000, help="synthetic only: images per split")
    parser.add_argument("--image-size", type=positive_int, default=64, help="synthetic only: rendered image size")
    parser.add_argument("--standardize", action="store_true", help="z-score the features (the paper did not)")
    parser.add_argument(
        "--features", choices=["unprojected", "embedding"], default="unprojected",
        help="a ViT's class token before the projection to the embedding space (the paper's probe features; "
        "default), or the embedding encode_image returns. Both are the embedding for a ResNet",
    )
    parser.add_argument(
        "--metric", choices=["accuracy", "mean_per_class"], default="accuracy",
        help="what chooses the L2 strength on the validation split (the paper reports mean per-class accuracy "
        "for e.g. Aircraft, Pets, Caltech-101, Flowers); both are reported",
    )
    parser.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations per fit")
    add_evaluation_options(parser)
    parser.add_argument(
        "--output-dir", type=home_expanded, default="",
        help="where linear_probe_results.json is written (default: linear_probe_results/DATASET, DATASET the "
        "--dataset kind, or an imagefolder root's folder name and 8 hex digits of its path's SHA-256), and each "
        "split's features are kept (features/<role>.pt) to be reused by a later run from the same model weights, "
        "images, --features, --precision and device type (a run interrupted, or repeated with another --metric, "
        "--standardize or --max-iter, does not extract them again)",
    )
    parser.add_argument(
        "--recompute-features", action="store_true",
        help="extract every split's features again rather than reuse those kept in the output directory (e.g. "
        "after images were edited in place keeping their size and modification time); the new ones replace them",
    )
    args = parser.parse_args(argv)
    if args.val_split and args.val_fraction is not None:  # it would be ignored: the split is the validation
        parser.error("--val-fraction holds out part of train, which --val-split replaces: give one of them")
    if args.val_fraction is None:
        args.val_fraction = DEFAULT_VAL_FRACTION
    return args


def split_images(base: ZeroShotDatasetConfig, split: str) -> str:
    """What identifies the images of `split`: two splits with the same identity are the same images."""
    if base.kind == "imagefolder":
        return f"the folder {split_folder(base.root, split).resolve()}"
    if base.kind == "synthetic":
        return f"the synthetic images of seed {synthetic_split_seed(base.seed, split)}"
    return f"the {base.kind} {split or 'test'} split"


def refuse_shared_images(base: ZeroShotDatasetConfig, splits: dict[str, str]) -> None:
    """A probe fitted, tuned or scored on the images it is tested on would report memorisation as accuracy."""
    role_of: dict[str, str] = {}
    for role, split in splits.items():
        images = split_images(base, split)
        if images in role_of:
            other = role_of[images]
            raise ValueError(
                f"--{other}-split {splits[other]!r} and --{role}-split {split!r} are both {images}; "
                "the probe needs different images for each"
            )
        role_of[images] = role


def shared_class_folders(base: ZeroShotDatasetConfig, splits: dict[str, str]) -> list[str] | None:
    """For an imagefolder: the sorted union of the splits' class folders, one labelling for all of them."""
    if base.kind != "imagefolder":
        return None
    folders: set[str] = set()
    for split in splits.values():
        folders.update(list_class_folders(split_folder(base.root, split)))
    by_form: dict[str, list[str]] = {}
    for folder in sorted(folders):
        by_form.setdefault(unicodedata.normalize("NFC", folder), []).append(folder)
    alike = [names for names in by_form.values() if len(names) > 1]
    if alike:
        # A split copied from macOS writes "café" decomposed: the two spellings were two classes, the test
        # images of one never predicted, with no word but "no training images"
        pairs = ", ".join(" and ".join(map(ascii, names)) for names in alike)
        raise ValueError(f"--root {base.root}: the splits' class folders {pairs} are one name written in two Unicode "
                         "forms (composed and decomposed accents); rename them alike")
    return sorted(folders)


def check_validation_hold_out(train_split: str, num_train: int, val_fraction: float) -> None:
    """Without --val-split, the hold-out must leave training images: a ValueError naming the split otherwise."""
    try:
        validation_count(num_train, val_fraction)
    except ValueError as error:
        raise ValueError(f"--train-split {train_split!r} (--val-fraction {val_fraction}): {error}") from None


def warn_about_classes_without_training_images(labels: torch.Tensor, classnames: list[str]) -> None:
    """labels: those of every image the final probe is fitted on (train, and a --val-split's)."""
    counts = torch.bincount(labels, minlength=len(classnames))
    missing = [name for name, count in zip(classnames, counts.tolist(), strict=True) if count == 0]
    if missing:
        logger.warning(
            "%d of %d classes have no training images, so the probe never predicts them: %s",
            len(missing),
            len(classnames),
            missing,
        )


def split_identity(base: ZeroShotDatasetConfig, split: str, dataset: Dataset) -> dict[str, Any]:
    """What the images of `split` are, for the feature cache: the synthetic set's parameters, or a root's images
    (`image_list_digest`)."""
    if base.kind == "synthetic":
        return {"kind": "synthetic", "seed": synthetic_split_seed(base.seed, split), "num_samples": base.num_samples,
                "image_size": base.image_size}
    folder = split_folder(base.root, split) if base.kind == "imagefolder" else Path(base.root)
    return {"kind": base.kind, "root": str(folder.resolve()), "split": split, "count": len(dataset),
            "digest": image_list_digest(dataset)}


def split_features(
    args: argparse.Namespace, role: str, split: str, data: ClassificationData, key: FeatureKey, path: Path,
    model: torch.nn.Module, preprocess: Any, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's (features, labels): those kept in `path` when they were made from `key`'s inputs, else
    extracted and kept there at once, so an interrupt in a later split loses only that split."""
    num_images = len(data.dataset)
    remove_stale_temporaries(path)  # before the extraction, whose save needs the space
    cached = None if args.recompute_features else load_features(path, key, num_images, len(data.classnames))
    if cached is not None:
        logger.info("%s split %r: reused the features of %d images kept in %s (--recompute-features extracts "
                    "them again)", role, split, len(cached[1]), path)
        if len(cached[1]) < num_images:
            logger.warning("%s split %r: %d images could not be read when these features were extracted; "
                           "--recompute-features reads them again", role, split, num_images - len(cached[1]))
        return cached
    try:
        extracted = extract_features(
            model,
            TransformedDataset(data.dataset, preprocess),
            device=device,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
            unprojected=args.features == "unprojected",
        )
    except ValueError as error:  # no readable image, non-finite features: which of the splits
        raise ValueError(f"{role} split {split!r}: {error}") from error
    logger.info("%s split %r: extracted the features of %d images", role, split, len(extracted[1]))
    save_features(path, key, extracted)
    return extracted


def default_output_dir(base: ZeroShotDatasetConfig) -> Path:
    """A folder of the dataset's own: in one folder for all, probing a second dataset replaced the first one's
    results and kept features (hours of extraction for a large one). An image folder's is its name with the
    start of its path's SHA-256: named alone, two roots of one name (data/a/images, data/b/images) shared it."""
    if base.kind != "imagefolder":
        return Path("linear_probe_results") / base.kind
    root = Path(base.root).resolve()
    path_digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:8]
    return Path("linear_probe_results") / f"{root.name or base.kind}-{path_digest}"


def point_to_earlier_default_folder(base: ZeroShotDatasetConfig, output_dir: Path) -> None:
    """Says where an image folder's features kept by an earlier version are: its default folder was the root's
    name alone (`default_output_dir`), so they would be extracted again, hours for a large dataset, unsaid."""
    if base.kind != "imagefolder" or (output_dir / "features").is_dir():
        return
    earlier = Path("linear_probe_results") / (Path(base.root).resolve().name or base.kind)
    if (earlier / "features").is_dir():
        logger.warning("%s, this dataset's default folder before, holds kept features (this version's is %s): move "
                       "its features/ folder there to reuse them (they are checked against this run's model and "
                       "images first)", earlier, output_dir)


def data_record(args: argparse.Namespace, base: ZeroShotDatasetConfig, classnames: list[str]) -> dict[str, Any]:
    """Which images the probe was fitted, tuned and scored on, and its labels: "dataset" (the kind) alone did
    not say which root or splits gave the results, nor what the validation split was."""
    synthetic = base.kind == "synthetic"
    return {
        "root": None if synthetic else os.path.abspath(base.root),  # as clip-retrieval's dataset_record's paths
        "train_split": args.train_split,
        "val_split": args.val_split or None,  # None: held out of train
        "val_fraction": None if args.val_split else args.val_fraction,
        "test_split": args.test_split,
        **({"num_samples": base.num_samples, "image_size": base.image_size} if synthetic else {}),
        "classnames": classnames,
    }


def probe(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    args.workers = workers_for_this_machine(args.workers, "--workers")  # once: said once, not for every split
    if args.dataset != "synthetic" and not args.root:  # "" read the current folder, under another option's name
        raise ValueError(f"--dataset {args.dataset} needs --root, the folder of its data")
    # The synthetic-only options go to a synthetic dataset alone: their defaults differ from the config's, so
    # every other dataset was warned that they were set and ignored
    synthetic = (
        {"num_samples": args.num_samples, "image_size": args.image_size, "seed": args.seed, "heldout_report": False}
        if args.dataset == "synthetic" else {}
    )
    base = ZeroShotDatasetConfig(kind=args.dataset, root=args.root, **synthetic)
    splits = {"train": args.train_split, "test": args.test_split, **({"val": args.val_split} if args.val_split else {})}
    try:
        refuse_shared_images(base, splits)
        class_folders = shared_class_folders(base, splits)
        # Every split is listed before the model loads (a download, for a released name): a missing folder or
        # file fails at once. Every split has the same class names, so their warnings come once, with the first.
        listed = {
            role: load_classification_data(with_split(base, split), None, class_folders=class_folders, warn=role == "train")
            for role, split in splits.items()
        }
    except MissingSplitError as error:  # named by this command's options, not the dataset setting's name "split"
        options = " and ".join(f"--{role}-split" for role, split in splits.items() if split == error.split)
        raise FileNotFoundError(f"{options}: {error}") from None
    classnames = listed["train"].classnames  # the same for every split: fixed by the dataset kind or `class_folders`
    if len(classnames) < 2:  # one class: every prediction is right, 100% whatever the features
        raise ValueError(
            f"--root {args.root}: the splits hold {len(classnames)} class"
            f"{'' if len(classnames) == 1 else 'es'} ({', '.join(class_folders or classnames)}); a linear probe needs "
            f"at least 2 classes to tell apart"
        )
    if not args.val_split:
        check_validation_hold_out(args.train_split, len(listed["train"].dataset), args.val_fraction)
    output_dir = writable_output_dir(Path(args.output_dir or default_output_dir(base)))
    if not args.output_dir:
        point_to_earlier_default_folder(base, output_dir)
    model, preprocess, source = load_model(args.model, device)
    # The architecture too: the same weights under another activation or head count (open_clip's GELU models
    # loaded as QuickGELU, then again as they are) give other features
    settings = {"weights": weights_digest(model), "architecture": model.config.to_dict(),
                "preprocess": repr(preprocess), "features": args.features, "precision": args.precision,
                "device": device.type}
    features, skipped = {}, {}
    for role, split in splits.items():
        data = listed[role]
        key = {**settings, "images": split_identity(base, split, data.dataset)}
        features[role] = split_features(args, role, split, data, key, output_dir / "features" / f"{role}.pt",
                                        model, preprocess, device)
        skipped[role] = len(data.dataset) - len(features[role][1])
    if not args.val_split:  # again: unreadable images may have left fewer
        check_validation_hold_out(args.train_split, len(features["train"][1]), args.val_fraction)
    # The probe is refitted on train + validation: a class with validation images alone is still predicted
    fitted = [features[role][1] for role in ("train", "val") if role in features]
    warn_about_classes_without_training_images(torch.cat(fitted), classnames)
    result = run_linear_probe(
        features["train"],
        features["test"],
        len(classnames),
        val=features.get("val"),
        val_fraction=args.val_fraction,
        seed=args.seed,
        standardize=args.standardize,
        device=device,
        metric=args.metric,
        max_iter=args.max_iter,
    )
    val = getattr(result, VALIDATION_FIELD[args.metric])
    print(
        f"linear probe on {args.dataset} ({args.features} features): l2={result.l2:.3g} (1/C) chosen by "
        f"{args.metric} (val {100 * val:.2f}%); test accuracy {100 * result.test_accuracy:.2f}%, "
        f"mean per class {100 * result.test_mean_per_class:.2f}%"
    )
    if any(skipped.values()):
        print(f"unreadable images skipped: {', '.join(f'{role} {count}' for role, count in skipped.items())}")
    keep_results_of_other_weights(output_dir / "linear_probe_results.json", source,
                                  inputs=("data", data_record(args, base, classnames), ("root",)))
    path = write_json(
        output_dir / "linear_probe_results.json",
        {"model": args.model, "weights": source.to_dict(), "dataset": args.dataset,
         "data": data_record(args, base, classnames),
         "settings": {"device": str(device), "precision": args.precision, "batch_size": args.batch_size,
                      "max_iter": args.max_iter, "seed": args.seed, "preprocess": repr(preprocess)},
         "features": args.features, **result.to_dict(), "num_skipped": skipped},
    )
    logger.info("wrote %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("clip-linear-probe", probe, args)


if __name__ == "__main__":
    raise SystemExit(main())
