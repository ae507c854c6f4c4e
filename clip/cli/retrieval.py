"""`clip-retrieval --model M --annotations FILE`: image<->text recall@1/5/10 of one model on local data.

Annotations: a Karpathy-style JSON split file, or a CSV/TSV/JSONL manifest with one (image, caption) row
per caption. Prints the recalls and writes retrieval_results.json to the output directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from clip.config_io import home_expanded
from clip.data.manifest import QUOTING_CHOICES
from clip.evaluation.config import RetrievalDatasetConfig
from clip.evaluation.retrieval import evaluate_retrieval
from clip.evaluation.retrieval_data import (
    RetrievalData,
    annotations_format,
    load_retrieval_data,
    warn_about_shared_captions,
)

from .common import (
    add_evaluation_options,
    errors_help,
    keep_results_of_other_weights,
    load_model,
    non_negative_int,
    positive_int,
    resolve_device,
    run_command,
    setup_logging,
    workers_for_this_machine,
    writable_output_dir,
    write_json,
)

logger = logging.getLogger("clip.retrieval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-retrieval", description=__doc__.split("\n\n")[0],
        epilog=errors_help("a missing file, a malformed annotation file, a value out of range"),
    )
    parser.add_argument("--model", required=True, help="released name, weights/checkpoint file, or run directory")
    parser.add_argument("--annotations", required=True, help="Karpathy JSON, or CSV/TSV/JSONL manifest")
    parser.add_argument(
        "--image-root", default="", help="folder image paths are relative to (default: the annotations' folder)"
    )
    parser.add_argument("--format", choices=["auto", "karpathy", "manifest"], default="auto",
                        help="how --annotations is read; auto (the default): a manifest for .csv, .tsv and .jsonl "
                        "files, Karpathy JSON otherwise")
    parser.add_argument("--split", default=None,
                        help="Karpathy split to evaluate (default: test; '' = all images); a manifest has none")
    parser.add_argument("--image-column", default="image", help="manifest column of the image path")
    parser.add_argument("--caption-column", default="caption", help="manifest column of the caption")
    parser.add_argument(
        "--quoting",
        choices=QUOTING_CHOICES,
        default="auto",
        help="manifest quote handling, as for training manifests: auto = CSV rules for .csv, none for .tsv "
        "(captions with raw quotes); csv for a TSV written by a CSV writer such as pandas",
    )
    parser.add_argument(
        "--max-images", type=non_negative_int, default=0, help="evaluate the first N images only (0 = all)"
    )
    parser.add_argument("--name", default="", help="name in the output (default: the annotation file's stem)")
    add_evaluation_options(parser)
    parser.add_argument(
        "--chunk-size", type=positive_int, default=4096, help="rows/columns of the similarity matrix held at once"
    )
    parser.add_argument(
        "--ties",
        choices=["pessimistic", "optimistic"],
        default="pessimistic",
        help="a ground truth tied with other candidates ranks last (pessimistic: a model whose features are "
        "all equal scores no better than chance; another image's word-for-word copy of a true caption counts "
        "against it) or first (optimistic) among them",
    )
    parser.add_argument(
        "--caption-template", default="",
        help='put each caption in place of "{}" before encoding, e.g. "a photo of {}" as the paper did for '
        "Flickr30k and MSCOCO (default: the captions as written)",
    )
    parser.add_argument("--output-dir", type=home_expanded, default="",
                        help="where retrieval_results.json is written (default: retrieval_results/NAME, NAME as "
                        "--name gives it, with _SPLIT added for a Karpathy split other than test: _val, _all for '')")
    return parser.parse_args(argv)


def dataset_record(dataset: RetrievalDatasetConfig, data: RetrievalData) -> dict:
    """Which images and captions the results are of: the name and counts alone did not say which annotations
    file, image folder or split (COCO's test or val, a restval) gave them. COCO's own captions file, read as
    a Karpathy JSON file is, holds one split: its format is "coco_captions", with no split."""
    format_ = data.layout if data.layout == "coco_captions" else annotations_format(dataset)
    # Absolute: a relative path was compared, by the next run into the same folder, as relative to that run's
    # current folder (`keep_results_of_other_weights`), so one started elsewhere took other files for these
    return {
        "annotations": os.path.abspath(dataset.annotations),
        "format": format_,
        "image_root": os.path.abspath(dataset.image_root or Path(dataset.annotations).parent),
        "split": dataset.split if format_ == "karpathy" else None,  # a manifest's rows are all evaluated
        "max_images": dataset.max_images,
    }


def default_output_dir(dataset: RetrievalDatasetConfig) -> Path:
    """A folder of the dataset's own: in one for all, evaluating Flickr30k replaced COCO's results. A Karpathy
    split other than the default test gets its own too ("dataset_coco_val"; '' is "_all"): COCO's val and test
    splits share the file, and so its name."""
    name = re.sub(r"[/\\]", "_", dataset.resolved_name())
    if annotations_format(dataset) == "karpathy" and dataset.split != "test":
        name += f"_{dataset.split or 'all'}"
    return Path("retrieval_results") / name


def evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dataset = RetrievalDatasetConfig(
        name=args.name,
        format=args.format,
        annotations=args.annotations,
        image_root=args.image_root,
        split="test" if args.split is None else args.split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        quoting=args.quoting,
        max_images=args.max_images,
        caption_template=args.caption_template,
    )
    if args.split and annotations_format(dataset) == "manifest":
        # Ignored, it evaluated every row of the manifest under the name of a split. Not '' (every image), which
        # is what a manifest gives: a job script passing --split "$SPLIT" for files of both kinds
        raise ValueError(
            f"--split {args.split!r}: {dataset.annotations} is a manifest, whose rows are all evaluated; --split "
            "selects a split of a Karpathy JSON file (write the split's rows to a manifest of their own)"
        )
    name = dataset.resolved_name()
    data = load_retrieval_data(dataset)
    logger.info("%s: %d images, %d captions", name, len(data.image_paths), len(data.captions))
    if args.ties == "pessimistic":
        warn_about_shared_captions(data, name, "--ties optimistic ranks them in its favour.")
    output_dir = writable_output_dir(Path(args.output_dir or default_output_dir(dataset)))
    model, preprocess, source = load_model(args.model, device)
    result = evaluate_retrieval(
        model,
        data,
        preprocess,
        device=device,
        batch_size=args.batch_size,
        workers=workers_for_this_machine(args.workers, "--workers"),
        precision=args.precision,
        chunk_size=args.chunk_size,
        ties=args.ties,
        name=name,
    )
    for key, value in result.recalls.items():
        print(f"{name} {key}: {100 * value:.2f}")
    if result.num_skipped:
        print(f"{name}: {result.num_skipped} unreadable image(s) skipped, with their captions")
    keep_results_of_other_weights(output_dir / "retrieval_results.json", source,
                                  inputs=("dataset", dataset_record(dataset, data), ("annotations", "image_root")))
    path = write_json(
        output_dir / "retrieval_results.json",
        {"model": args.model, "weights": source.to_dict(), "dataset": dataset_record(dataset, data),
         "settings": {"device": str(device), "precision": args.precision, "batch_size": args.batch_size,
                      "chunk_size": args.chunk_size, "preprocess": repr(preprocess)},
         "caption_template": args.caption_template, **result.to_dict()},
    )
    logger.info("wrote %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("clip-retrieval", evaluate, args)


if __name__ == "__main__":
    raise SystemExit(main())
