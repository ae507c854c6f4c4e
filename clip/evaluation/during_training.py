"""The evaluation hook the trainer calls: every configured zero-shot and retrieval dataset -> flat metrics.

Keys: "zeroshot/<name>/top1", "zeroshot/<name>/top5", "zeroshot/<name>/mean_per_class",
"zeroshot/<name>/<subset>/top1" (e.g. the synthetic "heldout" pairs), "retrieval/<name>/image_to_text_R@1",
"retrieval/<name>/text_to_image_R@5", "retrieval/<name>/image_to_text_median_rank", ..., and
"zeroshot/<name>/num_skipped" (or "retrieval/<name>/num_skipped") when unreadable images were left out. A
model that gives NaN or inf features (a diverged run) records NaN for a dataset's top1, or both R@1, with a
warning, instead of stopping the run.
`EvalConfig` makes sure names are unique within each kind, so no dataset's metrics overwrite another's.

Distributed: when `dist_info.world_size > 1` and torch.distributed is initialised, every rank must call
`run_evaluations`. Each rank encodes its own slice of the images (and captions); zero-shot counts are
all-reduced and retrieval features all-gathered, so every rank returns the same dict.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config_io import rechecked
from .config import EvalConfig
from .datasets import (
    evenly_spaced_indices,
    load_classification_data,
    refuse_wordnet_ids_as_classnames,
    require_classes_to_choose_between,
)
from .features import (
    NonFiniteFeaturesError,
    StopCheck,
    Tokenizer,
    default_tokenizer,
    distributed_world,
    eval_mode,
    unwrap_model,
)
from .image_files import UnreadableImageError, read_image
from .retrieval import evaluate_retrieval
from .retrieval_data import load_retrieval_data, warn_about_shared_captions
from .zeroshot import evaluate_zeroshot

logger = logging.getLogger(__name__)


# How many images (spread over each dataset) `check_evaluation_datasets` tries before calling it unreadable.
IMAGES_TRIED = 8


def check_evaluation_datasets(eval_config: EvalConfig, warn: bool = True) -> None:
    """Reads every configured dataset's file list (its folders or annotations) and decodes a few of its images,
    before training: a wrong path or layout, or a dataset whose files do not decode (Git LFS pointers named
    .jpg), then fails in the first minute. Found at the first evaluation instead, it would stop the run there
    and cost the steps since the last checkpoint, and again after every resume."""
    for dataset in eval_config.zeroshot:
        data = load_classification_data(dataset, None, warn=warn)
        require_classes_to_choose_between(dataset.resolved_name(), data.classnames)
        refuse_wordnet_ids_as_classnames(dataset.resolved_name(), data.classnames)
        _require_a_readable_image(lambda index: data.dataset[index], len(data.dataset), dataset.resolved_name())
    for dataset in eval_config.retrieval:
        data = load_retrieval_data(dataset, warn=warn)
        paths = data.image_paths
        # Two: with one image left readable every recall is 100%, refused at the first evaluation, steps later
        _require_a_readable_image(lambda index: read_image(paths[index]), len(paths), dataset.resolved_name(),
                                  needed=2)
        if warn and dataset.ties == "pessimistic":
            warn_about_shared_captions(
                data, dataset.resolved_name(), 'ties = "optimistic" in its [[eval.retrieval]] table ranks them in '
                "the truth's favour."
            )


def _require_a_readable_image(read: Callable[[int], Any], count: int, name: str, needed: int = 1) -> None:
    """Reads up to IMAGES_TRIED images spread over the dataset until `needed` of them decode; where fewer do, the
    rest too (for needed > 1: a dataset of mostly unreadable files may still hold enough). A ValueError else."""
    if count == 0:
        raise ValueError(f"evaluation dataset {name!r} has no images")
    reasons, readable = [], 0
    tried = evenly_spaced_indices(count, min(count, IMAGES_TRIED))
    first = set(tried)
    rest = (index for index in range(count) if index not in first) if needed > 1 else iter(())
    for index in itertools.chain(tried, rest):
        try:
            read(index)
        except UnreadableImageError as error:
            reasons.append(str(error))
            continue
        readable += 1
        if readable == needed:
            return
    example = f", e.g. {reasons[0]}" if reasons else ""
    if readable == 0:
        raise ValueError(f"evaluation dataset {name!r}: none of the {len(reasons)} images tried can be read{example}")
    raise ValueError(f"evaluation dataset {name!r}: only {readable} of its {count} images can be read{example}; "
                     f"it needs at least {needed} (retrieval with one image scores every recall 100%)")


def has_evaluations(eval_config: EvalConfig) -> bool:
    """Whether any zero-shot or retrieval dataset is configured: without one there is nothing to evaluate."""
    return bool(eval_config.zeroshot or eval_config.retrieval)


def should_evaluate(eval_config: EvalConfig, step: int, total_steps: int) -> bool:
    """True at the final step, and every `every_n_steps` steps when that is positive."""
    if not has_evaluations(eval_config):
        return False
    if step >= total_steps:
        return True
    return eval_config.every_n_steps > 0 and step > 0 and step % eval_config.every_n_steps == 0


def _image_transform(model: nn.Module) -> Callable:
    from clip.preprocess import TRAINING_ALPHA_BACKGROUND, image_transform

    # The model in training sees transparent images composited as the training loader composites them
    return image_transform(int(model.visual.input_resolution), train=False, alpha_background=TRAINING_ALPHA_BACKGROUND)


def run_evaluations(
    model: nn.Module,
    eval_config: EvalConfig,
    *,
    device: torch.device | str,
    tokenizer: Tokenizer | None = None,
    step: int | None = None,
    dist_info: Any | None = None,
    transform: Callable | None = None,
    stop_check: StopCheck | None = None,
    warn_about_data: bool = True,
) -> dict[str, float]:
    """Runs every dataset in `eval_config`; returns flat float metrics (see the module docstring).

    The model (DDP/compiled wrappers are unwrapped) is evaluated in eval mode without gradients and put
    back in its previous mode. `transform` defaults to the eval preprocessing at the model's resolution, with
    transparent images composited as the training loader does (`TRAINING_ALPHA_BACKGROUND`);
    `tokenizer` to the BPE tokenizer at the model's context length. `stop_check` is called before each
    dataset and every few batches inside it, at the same points on every rank; what it raises abandons
    the evaluations (the trainer's, when a signal reached some rank). `warn_about_data`: log (from rank 0)
    what is odd about the datasets (shared class names, ignored settings); the trainer says it once, when it
    checks them before its first step, not at every evaluation.
    """
    # As train() does: a value set after the config was built (a notebook's) is checked before any evaluation
    eval_config = rechecked(eval_config)
    model = unwrap_model(model)
    transform = transform or _image_transform(model)
    tokenizer = tokenizer or default_tokenizer()
    options = dict(
        tokenizer=tokenizer,
        device=device,
        batch_size=eval_config.batch_size,
        workers=eval_config.workers,
        text_batch_size=eval_config.text_batch_size,
        precision=eval_config.precision,
        dist_info=dist_info,
        stop_check=stop_check,
    )
    metrics: dict[str, float] = {}
    rank, _ = distributed_world(dist_info)
    with eval_mode(model):
        for dataset_config in eval_config.zeroshot:
            if stop_check is not None:
                stop_check()
            started = time.perf_counter()
            name = dataset_config.resolved_name()
            # Every rank loads the same data: rank 0 alone warns about it.
            data = load_classification_data(dataset_config, transform, warn=warn_about_data and rank == 0)
            try:
                result = evaluate_zeroshot(
                    model, data.dataset, data.prompted_names, data.templates, subsets=data.subsets, name=name, **options
                )
            except NonFiniteFeaturesError as error:  # every rank raises alike (the counts are all-reduced)
                metrics[f"zeroshot/{name}/top1"] = _recorded_as_nan(error, step, rank)
                continue
            metrics.update({f"zeroshot/{name}/{key}": value for key, value in result.metrics().items()})
            logger.info(
                "step %s zero-shot %s: top-1 %.2f%% (%.1fs)",
                step,
                name,
                100 * result.top1,
                time.perf_counter() - started,
            )
        for dataset_config in eval_config.retrieval:
            if stop_check is not None:
                stop_check()
            started = time.perf_counter()
            name = dataset_config.resolved_name()
            data = load_retrieval_data(dataset_config, warn=warn_about_data and rank == 0)  # as for zero-shot
            try:
                result = evaluate_retrieval(
                    model,
                    data,
                    transform,
                    name=name,
                    chunk_size=eval_config.retrieval_chunk_size,
                    ties=dataset_config.ties,
                    **options,
                )
            except NonFiniteFeaturesError as error:  # every rank raises alike (the features are all-gathered)
                nan = _recorded_as_nan(error, step, rank)
                metrics.update({f"retrieval/{name}/image_to_text_R@1": nan, f"retrieval/{name}/text_to_image_R@1": nan})
                continue
            metrics.update({f"retrieval/{name}/{key}": value for key, value in result.metrics().items()})
            logger.info(
                "step %s retrieval %s: image->text R@1 %.2f%%, text->image R@1 %.2f%% (%.1fs)",
                step,
                name,
                100 * result.recalls["image_to_text_R@1"],
                100 * result.recalls["text_to_image_R@1"],
                time.perf_counter() - started,
            )
    return metrics


def _recorded_as_nan(error: NonFiniteFeaturesError, step: int | None, rank: int) -> float:
    """NaN for a dataset the model gave non-finite features on, said once (rank 0): a diverged model's
    evaluation is no reason to stop the run, whose own checks decide about its losses."""
    if rank == 0:
        logger.warning("step %s: %s; recorded as NaN", step, error)
    return float("nan")

