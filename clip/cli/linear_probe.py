"""`clip-linear-probe --model M --dataset KIND --root DIR`: logistic-regression probe on frozen image features.

Features of the train split (and of a validation split, or a held-out fraction of train) pick the L2
strength; the probe is refitted on train + validation and scored on the test split. Writes
linear_probe_results.json to the output directory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clip.evaluation.config import ZeroShotDatasetConfig
from clip.evaluation.datasets import load_classification_data, with_split
from clip.evaluation.linear_probe import extract_features, run_linear_probe

from .common import load_model, resolve_device, setup_logging, write_json

logger = logging.getLogger("clip.linear_probe")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip-linear-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="released name, weights/checkpoint file, or run directory")
    parser.add_argument("--dataset", choices=["imagefolder", "cifar10", "cifar100", "synthetic"], required=True)
    parser.add_argument("--root", default="", help="dataset root; an imagefolder root holds <split>/<class>/<image>")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument(
        "--val-split", default="", help="a validation split (imagefolder); default: hold out --val-fraction of train"
    )
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out and of the synthetic data")
    parser.add_argument("--num-samples", type=int, default=2000, help="synthetic only: images per split")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic only: rendered image size")
    parser.add_argument("--standardize", action="store_true", help="z-score the features (the paper did not)")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--output-dir", default="linear_probe_results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    model, preprocess = load_model(args.model, device)
    base = ZeroShotDatasetConfig(
        kind=args.dataset,
        root=args.root,
        num_samples=args.num_samples,
        image_size=args.image_size,
        seed=args.seed,
        heldout_report=False,
    )
    splits = {"train": args.train_split, "test": args.test_split, **({"val": args.val_split} if args.val_split else {})}
    features, num_classes = {}, 0
    for role, split in splits.items():
        data = load_classification_data(with_split(base, split), preprocess)
        num_classes = max(num_classes, len(data.classnames))
        features[role] = extract_features(
            model,
            data.dataset,
            device=device,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
        )
        logger.info("%s split %r: %d images", role, split, len(features[role][1]))
    result = run_linear_probe(
        features["train"],
        features["test"],
        num_classes,
        val=features.get("val"),
        val_fraction=args.val_fraction,
        seed=args.seed,
        standardize=args.standardize,
        device=device,
        max_iter=args.max_iter,
    )
    print(
        f"linear probe on {args.dataset}: l2={result.l2:.3g}  val {100 * result.val_accuracy:.2f}%  "
        f"test {100 * result.test_accuracy:.2f}%"
    )
    path = write_json(
        Path(args.output_dir) / "linear_probe_results.json",
        {"model": args.model, "dataset": args.dataset, **result.to_dict()},
    )
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
