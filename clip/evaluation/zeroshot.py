"""Zero-shot classification: class embeddings from prompt templates, then nearest class by cosine similarity.

The classifier is the CLIP paper's prompt ensemble: every prompt embedding is L2-normalised, each class's
embeddings are averaged over the templates (and over its names, for a class given several), and the mean is
normalised again.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clip.cuda_backends import ieee_float32_matmul

from .features import (
    CutTexts,
    StopCheck,
    Tokenizer,
    all_reduce_sum,
    batches_on_every_rank,
    default_tokenizer,
    distributed_world,
    encode_image_batches,
    encode_texts,
    eval_mode,
    log_skipped,
    make_loader,
    model_device,
    nonfinite_causes,
    nonfinite_rows,
    refuse_nonfinite,
    refuse_nonfinite_features,
    shard,
    unwrap_model,
    with_stop_checks,
)
from .datasets import warn_about_duplicate_classnames
from .results import ClassificationCounts, ZeroShotResult, predicted_classes, summarize
from .templates import ClassName, Template, fill_template, first_names, names_of, resolve_templates


CLASS_EMBEDDINGS = "class (prompt ensemble)"


def _class_name_list(classnames: Sequence[ClassName], prompted: bool = True) -> list[ClassName]:
    """`classnames` as a list, numpy's strings among them as plain str, a class's several names (a list or tuple)
    as a list, or as its one name where it has one. A numpy array (LabelEncoder.classes_, np.unique(labels)) has no
    truth value for an emptiness check, and its items are np.str_, which a result would hand back (printed as
    np.str_('cat'), refused by yaml.safe_dump). Refused in one line: a missing, blank or non-str name, a class
    with an empty list of names, and a collection without the label order (a dict, a set).

    The same names are refused whether they are `prompted` (the classifier is built from them) or only name a
    precomputed classifier's columns, so that a list that works with one works with the other; `prompted` only
    changes the reason given."""
    _refuse_without_label_order(classnames)
    entries: list[ClassName] = []
    for index, name in enumerate(classnames):
        if isinstance(name, list | tuple):  # the class's names, each prompted
            if not name:
                raise ValueError(f"classnames[{index}] is an empty list: every class needs its name")
            several = [str(each) if isinstance(each, str) else each for each in name]
            for position, each in enumerate(several):
                _check_class_name(f"{index}][{position}", each, prompted)
            entries.append(several[0] if len(several) == 1 else several)
        else:
            name = str(name) if isinstance(name, str) else name
            _check_class_name(index, name, prompted)
            entries.append(name)
    return entries


def _refuse_without_label_order(classnames: Sequence[str]) -> None:
    """Refuses what is not a list of names in label order: a string is a sequence too ("cat" would be three
    classes, "c", "a" and "t"); a dict iterates over its keys, which were class 0, 1, ... each named by its
    label number (idx_to_class), or names in insertion order, not label order, without a word (class_to_idx); a
    set's order is that of the names' hashes, another in each process."""
    if isinstance(classnames, str):
        raise TypeError(f"classnames={classnames!r} is a string; pass a list of class names, e.g. [{classnames!r}]")
    if isinstance(classnames, Mapping):
        raise TypeError(
            f"classnames is a {type(classnames).__name__}; pass a list of names in label order: for a dict of "
            f"name -> label (class_to_idx) sorted(names, key=names.get), for label -> name [names[i] for i in "
            f"range(len(names))]"
        )
    if isinstance(classnames, Set):
        raise TypeError(f"classnames is a {type(classnames).__name__}, which has no order; pass a list of names in "
                        f"label order (class i's name at index i)")


def _check_class_name(index: int | str, name: Any, prompted: bool) -> None:
    """Refuses classnames[index] unless it is a name. A gap in a table of names (None, NaN, "") would be a class of
    its own, prompted as 'a photo of a None.'; a label number would be prompted as 'a photo of a 3.' (near
    chance for ImageNet's 0..999), so it is text only where the caller says so (MNIST's digits)."""
    if name is None or (isinstance(name, numbers.Real) and name != name):  # NaN (pandas' gap), of any float type
        raise TypeError(f"classnames[{index}] is {name!r}, not a string: every class needs its name")
    if not isinstance(name, str):
        use = ("is the text of its prompts ('a photo of a {}.')" if prompted
               else "labels the precomputed classifier's column in the result")
        raise TypeError(
            f"classnames[{index}] is {name!r} ({type(name).__name__}), not a str: a class name {use}; pass the "
            f"names as text (where numbers are the names, [str(name) for name in classnames])"
        )
    if not name.strip():
        raise ValueError(f"classnames[{index}] is blank ({name!r}): every class needs its name")


def build_zeroshot_classifier(
    model: nn.Module,
    classnames: Sequence[ClassName],
    templates: Sequence[Template] | str | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
    stop_check: StopCheck | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Zero-shot weights [D, C] (float32, unit columns): column c is class c's prompt-ensemble embedding.
    NonFiniteFeaturesError for NaN or inf embeddings, unless `check_finite` is False (the caller's to count).

    classnames: class c's name at index c, or its names (a list): then the mean is over every name's prompts.
    templates: format strings with one "{}", callables classname -> prompt, a built-in set's name, a file
        path, or None for the default set.
    batch_size: prompts per text-encoder call; classes are processed a group at a time, so memory stays
        bounded by the batch and the [D, C] result, whatever the number of classes and templates.
    stop_check: called between groups (see `with_stop_checks`; every rank builds the whole classifier).
    """
    model = unwrap_model(model)
    classnames = _class_name_list(classnames)
    if not classnames:
        raise ValueError("no class names given")
    templates = resolve_templates(templates)
    device = device or model_device(model)
    tokenizer = tokenizer or default_tokenizer()
    names_of_class = [names_of(name) for name in classnames]
    prompt_counts = [len(names) * len(templates) for names in names_of_class]
    groups = _class_groups(prompt_counts, batch_size)
    columns = []
    cut = CutTexts()
    with eval_mode(model):
        for start, stop in with_stop_checks(groups, stop_check, len(groups)):
            prompts = [fill_template(template, name) for names in names_of_class[start:stop] for name in names
                       for template in templates]
            embeddings = encode_texts(
                model, prompts, tokenizer, device=device, batch_size=batch_size, precision=precision, normalize=True,
                cut=cut,
            )  # [prompts, D], unit rows
            counts = prompt_counts[start:stop]
            if len(set(counts)) == 1:  # one name each (or as many each): one reshape
                class_means = embeddings.view(len(counts), counts[0], -1).mean(dim=1)  # -> G, D
            else:
                class_means = torch.stack([rows.mean(dim=0) for rows in embeddings.split(counts)])
            columns.append(nn.functional.normalize(class_means, dim=-1))
    cut.warn(sum(prompt_counts), int(model.context_length))
    classifier = torch.cat(columns)
    if check_finite:
        refuse_nonfinite_features(classifier, CLASS_EMBEDDINGS, nonfinite_causes(model, precision))
    return classifier.t().contiguous()  # C, D -> D, C


def _class_groups(prompt_counts: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive classes whose prompts add up to at most `batch_size` (a class of more prompts
    on its own): a text-encoder call's worth, so the embeddings held at once stay bounded."""
    groups, start, total = [], 0, 0
    for index, count in enumerate(prompt_counts):
        if index > start and total + count > batch_size:
            groups.append((start, index))
            start, total = index, 0
        total += count
    groups.append((start, len(prompt_counts)))
    return groups


def _logit_scale(model: nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


def _class_scores(features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """features @ classifier in full IEEE float32 even where training chose TF32 (train.tf32), as retrieval's
    scores are: TF32's rounding of the scores could reorder near-tied classes, so the evaluation's ranking
    would depend on a speed setting. Only this product: the image encoder keeps the run's choice."""
    with ieee_float32_matmul():
        return features @ classifier


@dataclass
class ZeroShotOutput:
    logits: torch.Tensor  # [N, C], cosine similarity times the model's logit scale
    labels: torch.Tensor | None  # [N] when the data carried labels

    @property
    def predictions(self) -> torch.Tensor:
        """The lowest class index among each image's top scores (`results.predicted_classes`: within a
        millionth they are a tie), as the metrics count them."""
        return predicted_classes(self.logits)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)


def zeroshot_classify(
    model: nn.Module,
    classifier: torch.Tensor,
    images: torch.Tensor | DataLoader,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> ZeroShotOutput:
    """Logits of preprocessed images (a [N, 3, H, W] tensor, or a DataLoader of (images, labels))."""
    model = unwrap_model(model)
    device = device or model_device(model)
    classifier = classifier.to(device, torch.float32)  # the image features are float32 (a half one failed)
    scale = _logit_scale(model)
    logits, labels = [], []
    with eval_mode(model):
        batches = encode_image_batches(model, images, device=device, batch_size=batch_size, precision=precision)
        with contextlib.closing(batches):  # its DataLoader's workers end with an error here too
            for features, batch_labels in batches:
                logits.append(_class_scores(scale * features, classifier).cpu())
                if batch_labels is not None:
                    labels.append(batch_labels.cpu())
    if not logits:
        raise ValueError("no images to classify")
    return ZeroShotOutput(torch.cat(logits), torch.cat(labels) if labels else None)


def evaluate_zeroshot(
    model: nn.Module,
    dataset: Dataset | DataLoader,
    classnames: Sequence[ClassName],
    templates: Sequence[Template] | str | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    text_batch_size: int = 256,
    precision: str = "fp32",
    subsets: dict[str, list[int]] | None = None,
    name: str = "",
    classifier: torch.Tensor | None = None,
    dist_info: Any | None = None,
    stop_check: StopCheck | None = None,
    progress: Callable[[int], None] | None = None,
) -> ZeroShotResult:
    """Top-1/top-5, per-class and mean per-class accuracy, confusion matrix, and accuracies on `subsets`.

    classnames: class i's name (a str) at index i, the same with a precomputed `classifier` (whose column i is
        class i) as without, where they are prompted (see `_class_name_list`); or its names (a list), each
        prompted, the first naming it in the result.
    dataset: (preprocessed image, label) pairs, or a ready DataLoader of batches. Items of a dataset whose
        image cannot be read (`UnreadableImageError`) are left out and counted in `num_skipped` (a ready
        DataLoader's own collation is not ours to wrap: there the error propagates); ValueError when no image
        is left.
    dist_info: with world_size > 1 and torch.distributed initialised, each rank classifies its slice of a
        (map-style) dataset and the counts are all-reduced, so every rank returns the full result.
    stop_check: called every few batches, at the same batches on every rank (see `with_stop_checks`); what
        it raises abandons the evaluation. The trainer's ends an evaluation a signal came in.
    progress: called after every batch with how many of this rank's images have been read so far (classified
        or skipped as unreadable), e.g. to log how far a long evaluation has come.
    """
    model = unwrap_model(model)
    device = device or model_device(model)
    classnames = _class_name_list(classnames, prompted=classifier is None)  # the result names them
    if classifier is None:
        # Judged below with the images' count, after the all-reduce: a rank whose classifier alone were non-finite
        # must not raise here while the others wait for it in a collective
        classifier = build_zeroshot_classifier(
            model, classnames, templates, tokenizer, device=device, batch_size=text_batch_size, precision=precision,
            stop_check=stop_check, check_finite=False,
        )
    if classifier.shape[1] != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} classes, but {len(classnames)} class names were given")
    rank, world_size = distributed_world(dist_info)
    if isinstance(dataset, DataLoader):
        if world_size > 1:
            raise ValueError("pass a Dataset, not a DataLoader, to shard evaluation across ranks")
        loader, checked_batches = dataset, math.inf  # one process: any batch may be a check point
    else:
        loader = make_loader(shard(dataset, rank, world_size), batch_size, workers, device)
        checked_batches = batches_on_every_rank(len(dataset), world_size, batch_size)
    loader = with_stop_checks(loader, stop_check, checked_batches)
    classifier = classifier.to(device, torch.float32)  # the image features are float32 (a half one failed)
    counts = ClassificationCounts(len(classnames), top_k=5, device=device)
    skipped: list[str] = []
    read = 0  # images classified so far on this rank
    # Non-finite [image rows | one flag per class embedding], on the device (no sync), all-reduced with the
    # counts. Flags, not a count of classes: every rank builds the whole classifier, so a summed count would
    # count each bad class once per rank; a class is bad when any rank's flag for it is set.
    nonfinite = torch.cat([
        torch.zeros(1, dtype=torch.long, device=device), (~torch.isfinite(classifier).all(dim=0)).long()
    ])
    with eval_mode(model):
        batches = encode_image_batches(model, loader, device=device, precision=precision, skipped=skipped)
        with contextlib.closing(batches):  # its DataLoader's workers end with an error here too
            for features, labels in batches:
                if labels is None:
                    raise ValueError("evaluate_zeroshot needs labelled data: (image, label) pairs")
                nonfinite[0] += nonfinite_rows(features)
                counts.update(_class_scores(features, classifier), labels)
                read += len(labels)
                if progress is not None:
                    progress(read + len(skipped))
    counts.add_skipped(len(skipped))
    if world_size > 1:
        reduced = all_reduce_sum(torch.cat([counts.as_tensor(), nonfinite]), world_size)
        counts.load_tensor(reduced[: -len(nonfinite)])
        nonfinite = reduced[-len(nonfinite) :]
    # Every rank holds the same all-reduced counts, so every rank raises alike
    causes = nonfinite_causes(model, precision)
    refuse_nonfinite(int((nonfinite[1:] > 0).sum()), len(classnames), CLASS_EMBEDDINGS, causes)
    refuse_nonfinite(int(nonfinite[0]), int(counts.confusion.sum()), f"zero-shot {name or 'dataset'} image", causes)
    result = summarize(counts, first_names(classnames), subsets, name, warn=rank == 0)
    what = f"zero-shot {name or 'dataset'}"
    log_skipped(what, result.num_skipped, skipped, rank, world_size)  # the count is global now
    if result.num_samples == 0:
        # Accuracies of no images would read as 0%. Every rank holds the same all-reduced count, so every rank
        # raises here and none is left waiting in a later collective.
        reason = f"none of its {result.num_skipped} images is readable" if result.num_skipped else "no images"
        raise ValueError(f"{what}: {reason}")
    return result


def _check_notebook_images(images: Any) -> None:
    """Refuse the notebook mistakes that would otherwise fail deep inside with a message naming neither
    argument: one image instead of a list ("object of type 'Image' has no len()"), and file paths instead of
    opened images (torchvision's "Unexpected type <class 'str'>")."""
    if isinstance(images, Image.Image):
        raise TypeError("images is a single PIL image; pass a list of images, e.g. [image]")
    if isinstance(images, str | bytes) or not hasattr(images, "__len__"):  # a generator, say: list() it first
        raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
    for index, image in enumerate(images):
        if isinstance(image, str | bytes | PathLike):
            raise TypeError(
                f"images[{index}] is a file path ({image!r}), not an image: open it first, "
                "e.g. [Image.open(path) for path in paths]"
            )


def _preprocessed(preprocess: Callable[[Image.Image], torch.Tensor], image: Image.Image, index: int) -> torch.Tensor:
    """`preprocess(image)`, or an error naming which image could not be decoded: Image.open reads only the header,
    so a corrupt or truncated file fails here, inside the resize, with PIL's message alone."""
    try:
        return preprocess(image)
    except (OSError, SyntaxError, EOFError) as error:  # as PIL's format plugins report broken data
        filename = getattr(image, "filename", "")
        where = f" ({filename})" if filename else ""
        raise OSError(f"images[{index}]{where} cannot be decoded: {str(error) or type(error).__name__}") from error


def zeroshot_classify_images(
    model: nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Sequence[Image.Image],
    classnames: Sequence[ClassName],
    templates: Sequence[Template] | str | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """For notebooks: PIL images -> (probabilities [N, C] on the CPU, predicted class name per image: the first of
    a class's several names)."""
    _check_notebook_images(images)
    if len(images) == 0:
        raise ValueError("no images to classify")
    classnames = _class_name_list(classnames)
    names = first_names(classnames)  # the predictions are its items
    if len(classnames) == 1:  # as a dataset of one class is (datasets.require_classes_to_choose_between)
        raise ValueError(
            f"one class name ({names[0]!r}): zero-shot classification chooses between names, so it needs at "
            f"least 2 (with one, every image is that class with probability 1): add the names to tell it apart from"
        )
    warn_about_duplicate_classnames(names, "zeroshot_classify_images")  # as a config's dataset is warned of
    model = unwrap_model(model)
    device = device or model_device(model)
    classifier = build_zeroshot_classifier(model, classnames, templates, tokenizer, device=device)
    batch = torch.stack([_preprocessed(preprocess, image, index) for index, image in enumerate(images)])
    output = zeroshot_classify(model, classifier, batch, device=device)
    probabilities = output.probabilities
    return probabilities, [names[i] for i in probabilities.argmax(dim=1).tolist()]
