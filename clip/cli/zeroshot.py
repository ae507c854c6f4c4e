"""`clip-zeroshot CONFIG [key=value ...]`: zero-shot classification of one model on local datasets.

The config is a TOML file read into `ZeroShotRunConfig` (see configs/eval/ for examples); `key=value`
overrides are type-checked against it, e.g. `model=runs/tiny device=cpu batch_size=128`.
Writes results.json (and a confusion-matrix PNG per dataset) to the output directory, prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

from torch.utils.data import Subset

from clip.checkpoint import list_checkpoints
from clip.config import load_config
from clip.config_io import home_expanded, rechecked
from clip.evaluation.config import ZeroShotDatasetConfig, ZeroShotRunConfig, confusion_png_name
from clip.evaluation.datasets import (
    ClassificationData,
    TransformedDataset,
    load_classification_data,
    refuse_wordnet_ids_as_classnames,
    require_classes_to_choose_between,
)
from clip.evaluation.results import format_table, save_confusion_png
from clip.evaluation.zeroshot import evaluate_zeroshot

from .common import (
    errors_help,
    keep_results_of_other_weights,
    load_model,
    resolve_device,
    run_command,
    setup_logging,
    workers_for_this_machine,
    writable_output_dir,
    write_json,
)

logger = logging.getLogger("clip.zeroshot")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-zeroshot", description=__doc__.split("\n\n")[0],
        epilog=errors_help("a missing file, a malformed config or class-names file, a value out of range"),
    )
    parser.add_argument("config", help="TOML file (ZeroShotRunConfig): model, device, [[datasets]] tables")
    parser.add_argument("overrides", nargs="*", default=[],  # default: else listed as required without a config
                        help="type-checked key=value overrides, e.g. model=runs/tiny")
    parser.add_argument("--output-dir", type=home_expanded,
                        help="where results.json and the confusion PNGs are written; overrides the config's "
                        "output_dir (default: zeroshot_results/CONFIG_NAME)")
    return parser.parse_intermixed_args(argv)


def list_datasets(config: ZeroShotRunConfig) -> dict[str, ClassificationData]:
    """Every dataset of `config` by name, its images still PIL images (the model's preprocessing is known
    only once it is loaded). Listing them all first makes a missing folder or a malformed class-name file
    fail in seconds, before the model is loaded, rather than after the datasets before it were evaluated
    and with their results lost."""
    datasets = {dataset.resolved_name(): load_classification_data(dataset, None) for dataset in config.datasets}
    for name, data in datasets.items():
        require_classes_to_choose_between(name, data.classnames)
        refuse_wordnet_ids_as_classnames(name, data.classnames)
    return datasets


# Seconds between two progress lines while a dataset is evaluated: ImageNet's 50,000 images take minutes on a
# GPU and hours on a CPU, without a word between the dataset's first log line and its result.
PROGRESS_EVERY_S = 60.0


class ProgressLog:
    """`evaluate_zeroshot`'s progress callback: a log line at most every PROGRESS_EVERY_S seconds with the images
    read of `total`, the rate, and the time left at that rate."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total = name, total
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S or done >= self.total:  # the result's own line follows the last
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        logger.info("%s: %d of %d images (%.0f%%), %.1f images/s, about %.0f min left", self.name, done,
                    self.total, 100 * done / self.total, rate, (self.total - done) / rate / 60)


def list_digest(items: list[str]) -> str:
    """SHA256 of a list of strings written as compact JSON: the same names or templates give the same digest
    whichever file (and file format) they were read from. A folder name that is not UTF-8 (its bytes kept as
    Python keeps them, surrogates) is hashed as those bytes: encoded strictly, it failed once the whole dataset
    had been evaluated, and no results were written."""
    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def dataset_size(data: ClassificationData) -> int:
    """The images the dataset holds: `max_samples` makes `data.dataset` a Subset of them."""
    return len(data.dataset.dataset) if isinstance(data.dataset, Subset) else len(data.dataset)


def dataset_record(dataset: ZeroShotDatasetConfig, data: ClassificationData) -> dict:
    """What results.json needs to tell which images, class names and prompts gave a dataset's figures: the
    names themselves are in its result (a class's first name, where it has several: those are listed here as
    several_names); the templates are listed here. num_images counts the images evaluated, readable or not, of
    the dataset's num_images_found (fewer with max_samples)."""
    templates = [template if isinstance(template, str) else repr(template) for template in data.templates]
    return {
        "kind": dataset.kind,
        "root": dataset.root,
        "split": dataset.split,
        "max_samples": dataset.max_samples,
        "num_images": len(data.dataset),
        "num_images_found": dataset_size(data),
        "classnames_source": data.classnames_source,
        "classnames_sha256": list_digest(data.prompted_names),
        "templates_source": data.templates_source,
        "templates_sha256": list_digest(templates),
        "templates": templates,
    } | ({"several_names": data.several_names} if data.several_names is not None else {})


def run(config: ZeroShotRunConfig, output_dir: Path) -> dict:
    """Evaluates every dataset of `config`; writes results.json and PNGs to `output_dir`; returns the JSON."""
    config = rechecked(config)  # as train() does: a value set after the config was built, from Python
    if not config.datasets:  # before the model loads (run() from Python ended in an UnboundLocalError after it)
        raise ValueError("the config has no [[datasets]] tables")
    device = resolve_device(config.device)
    datasets = list_datasets(config)
    if list_checkpoints(output_dir):
        # Its results.json is the trainer's: moved aside as "an earlier version's" results, then replaced
        raise ValueError(f"{output_dir} is a training run's folder, whose results.json is the trainer's: give "
                         f"another output folder ({Path(output_dir) / 'zeroshot'}, say)")
    writable_output_dir(output_dir)
    model, preprocess, source = load_model(config.model, device)
    keep_results_of_other_weights(output_dir / "results.json", source, companions="confusion_*.png")
    configs = {dataset.resolved_name(): dataset for dataset in config.datasets}
    settings = {"device": str(device), "precision": config.precision, "batch_size": config.batch_size,
                "text_batch_size": config.text_batch_size, "preprocess": repr(preprocess)}
    workers = workers_for_this_machine(config.workers, "workers =")
    results = []
    for name, data in datasets.items():
        found = dataset_size(data)
        logger.info(
            "%s: %d images%s, %d classes, %d templates",
            name,
            len(data.dataset),
            f" of {found} (max_samples)" if found != len(data.dataset) else "",
            len(data.classnames),
            len(data.templates),
        )
        result = evaluate_zeroshot(
            model,
            TransformedDataset(data.dataset, preprocess),
            data.prompted_names,
            data.templates,
            device=device,
            batch_size=config.batch_size,
            workers=workers,
            text_batch_size=config.text_batch_size,
            precision=config.precision,
            subsets=data.subsets,
            name=name,
            progress=ProgressLog(name, len(data.dataset)),
        )
        results.append(result)
        logger.info("%s: top-1 %.2f%%", name, 100 * result.top1)
        # Written after every dataset: a failure or Ctrl-C in a later one (hours into a long config) lost the
        # results of all those before it
        summary = {
            "model": config.model,
            "weights": source.to_dict(),  # which file (and step) "model" was when it was loaded
            "settings": settings,
            "datasets": {r.name: dataset_record(configs[r.name], datasets[r.name]) for r in results},
            "metrics": {r.name: r.metrics() for r in results},
            "results": {r.name: r.to_dict() for r in results},
        }
        # Checked again before each write: another run evaluating other weights into the same folder (several
        # checkpoints in parallel with one config) may have written its results since, which this write replaced
        keep_results_of_other_weights(output_dir / "results.json", source, companions="confusion_*.png")
        path = write_json(output_dir / "results.json", summary)
        if config.confusion_png:
            save_confusion_png(result, output_dir / confusion_png_name(name))
        logger.info("wrote %s", path)
    print(format_table(results))
    return summary


def evaluate(args: argparse.Namespace) -> int:
    """Reads and checks the config (names are unique and sizes in range: `ZeroShotRunConfig`), then runs it."""
    config = load_config(args.config, args.overrides, ZeroShotRunConfig)
    if not config.model:
        raise ValueError("no model given; set `model = ...` in the config or pass model=NAME_OR_PATH")
    if not config.datasets:
        raise ValueError("the config has no [[datasets]] tables")
    output_dir = Path(args.output_dir or config.output_dir or Path("zeroshot_results") / Path(args.config).stem)
    run(config, output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("clip-zeroshot", evaluate, args)


if __name__ == "__main__":
    raise SystemExit(main())
