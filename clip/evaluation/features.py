"""Shared machinery for evaluation: eval mode, autocast, batched feature extraction, sharding over ranks.

Unreadable images: the loaders of `make_loader` leave out every item whose image cannot be decoded (its
dataset raised `UnreadableImageError`) and pass on why, so one corrupt file costs one image, not the whole
evaluation. Each image's features depend on that image alone, so leaving some out changes nothing for the
others, whatever the batch size or the number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ..data.worker_signals import job_signals_held, signal_safe_worker_options
from .image_files import UnreadableImageError

logger = logging.getLogger(__name__)

# Anything called as tokenizer(texts, context_length=n) -> integer tensor[len(texts), n], like
# clip.tokenizer.Tokenizer; texts are tokenized at the model's own context length.
Tokenizer = Callable[..., torch.Tensor]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Abandons an evaluation by raising (the trainer's, when a signal reached some rank). Under several ranks it
# is a collective, so it is only called where every rank calls it: see `with_stop_checks`.
StopCheck = Callable[[], None]

# Batches between two stop checks: each costs one small all-reduce and a wait for the GPU, and a signal
# waits at most this many batches (a few seconds of a scheduler's grace period).
BATCHES_BETWEEN_STOP_CHECKS = 10

T = TypeVar("T")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The CLIP module inside DistributedDataParallel (`.module`) and/or torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts the model in eval mode without gradients, and restores every submodule's own train/eval state
    afterwards (not `model.train()`, which would also put back into training mode a part kept in eval
    mode on purpose, such as a locked tower whose BatchNorm statistics must not move)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class SkippedImage(NamedTuple):
    """Stands in for a dataset item whose image could not be read."""

    reason: str


class SkipUnreadable(Dataset):
    """`dataset`, with an item whose image cannot be read replaced by a `SkippedImage` instead of raising
    (which would end the DataLoader's iteration, and the evaluation with it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UnreadableImageError as error:
            return SkippedImage(str(error))


class ReadableBatch(NamedTuple):
    """A batch without its unreadable items: images (None when none was readable), labels (None when the
    items carry none), and why each left-out item was unreadable."""

    images: Any
    labels: Any
    skipped: list[str]


def collate_readable(items: list[Any]) -> ReadableBatch:
    """Collates the readable items the usual way and keeps the reasons of the `SkippedImage`s."""
    readable = [item for item in items if not isinstance(item, SkippedImage)]
    skipped = [item.reason for item in items if isinstance(item, SkippedImage)]
    if not readable:
        return ReadableBatch(None, None, skipped)
    collated = default_collate(readable)
    if isinstance(collated, list | tuple):
        return ReadableBatch(collated[0], collated[1] if len(collated) > 1 else None, skipped)
    return ReadableBatch(collated, None, skipped)


class _EvaluationLoader(DataLoader):
    def __iter__(self) -> Iterator:
        with job_signals_held():  # while the workers start: a signal abandons the evaluation after it
            return super().__iter__()


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device | str) -> DataLoader:
    """An ordered (unshuffled) loader of `ReadableBatch`es (unreadable images left out); pinned memory only
    when copying to a GPU."""
    return _EvaluationLoader(
        SkipUnreadable(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_readable,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        # Its own generator: every DataLoader iterator draws a worker seed, which would otherwise come from
        # torch's global generator and make an evaluation during training shift the training run's RNG.
        generator=torch.Generator().manual_seed(0),
        # A scheduler's SIGTERM during an evaluation inside training must reach the trainer only (which then
        # checkpoints), not kill these workers and the run with them.
        **(signal_safe_worker_options() if workers > 0 else {}),
    )


def log_skipped(what: str, count: int, reasons: Sequence[str], rank: int = 0, world_size: int = 1) -> None:
    """One warning line, from rank 0, for the unreadable images an evaluation left out, with one example.

    count: the global count, the same on every rank. reasons: this rank's. With several ranks every rank
    calls this: when some image was skipped (every rank knows it from `count`), the ranks gather one reason
    each, so that the example may come from whichever rank met one -- all of them can be another rank's."""
    if not count:
        return
    if world_size > 1:
        examples: list[str | None] = [None] * world_size
        dist.all_gather_object(examples, reasons[0] if reasons else None)
        reasons = [reason for reason in examples if reason is not None]
    if rank == 0:
        example = f"; e.g. {reasons[0]}" if reasons else ""
        logger.warning("%s: skipped %d unreadable image(s)%s", what, count, example)


def with_stop_checks(items: Iterable[T], stop_check: StopCheck | None, checked: float) -> Iterator[T]:
    """`items`, calling `stop_check` before every BATCHES_BETWEEN_STOP_CHECKS-th of the first `checked` ones
    (not before the first: the caller checks before it starts). `checked` is how many items every rank has,
    so that every rank makes the same calls even when the ranks' slices differ by a batch."""
    iterator = iter(items)
    try:
        for index, item in enumerate(iterator):
            if stop_check is not None and 0 < index < checked and index % BATCHES_BETWEEN_STOP_CHECKS == 0:
                stop_check()
            yield item
    except BaseException:  # also GeneratorExit: closed early by its consumer
        end_loader_workers(iterator, items)
        raise


def end_loader_workers(iterator: Iterator, iterable: Iterable) -> None:
    """Ends the worker processes behind `iterator` (a DataLoader's, `iterable`'s) or the generators it wraps,
    for an iteration that stopped early on an error, a Ctrl-C or its consumer's close: its workers stayed alive as
    long as the error was kept (a notebook keeps the last one). A finished DataLoader iterator ends its own, and
    those of a loader with persistent_workers are kept for its next pass, as its owner meant."""
    if getattr(iterable, "persistent_workers", False):
        return
    if isinstance(iterator, types.GeneratorType):
        iterator.close()
        return
    shut_down = getattr(iterator, "_shutdown_workers", None)
    if shut_down is not None:
        shut_down()


def batches_on_every_rank(length: int, world_size: int, batch_size: int) -> int:
    """How many batches of `batch_size` the smallest of `shard`'s slices of `length` items makes."""
    return math.ceil(length // world_size / batch_size)


def iterate_batches(
    data: Iterable | torch.Tensor, batch_size: int, skipped: list[str] | None = None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """(images, labels-or-None) from a DataLoader of (images, labels) pairs or of `ReadableBatch`es, or from
    a stacked image tensor. The reasons of the images a `ReadableBatch` left out are appended to `skipped`."""
    if isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
        return
    batches = iter(data)
    try:
        for batch in batches:
            if isinstance(batch, ReadableBatch):
                if skipped is not None:
                    skipped.extend(batch.skipped)
                if batch.images is not None:
                    yield batch.images, batch.labels
            elif isinstance(batch, list | tuple):
                yield batch[0], batch[1] if len(batch) > 1 else None
            else:
                yield batch, None
    except BaseException:  # also GeneratorExit: closed early (`contextlib.closing` in its callers)
        end_loader_workers(batches, data)
        raise


def encode_image_batches(
    model: nn.Module,
    data: Iterable | torch.Tensor,
    *,
    device: torch.device | str,
    batch_size: int = 64,
    precision: str = "fp32",
    normalize: bool = True,
    skipped: list[str] | None = None,
    unprojected: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yields (float32 features [B, D] on `device`, labels [B] or None) per batch; the caller sets eval mode.
    Why each unreadable image was left out is appended to `skipped` (see `iterate_batches`).
    unprojected: `encode_image_unprojected`'s features (a ViT's before its projection) instead of the embedding."""
    if unprojected and not hasattr(model, "encode_image_unprojected"):
        raise TypeError(
            f"features before the projection need a model built by this library (clip.load with jit=False), "
            f"not a {type(model).__name__}"
        )
    encode = model.encode_image_unprojected if unprojected else model.encode_image
    with contextlib.closing(iterate_batches(data, batch_size, skipped)) as batches:
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            with autocast(device, precision):
                features = encode(images)
            features = features.float()
            if normalize:
                features = nn.functional.normalize(features, dim=-1)
            if labels is not None:
                labels = torch.as_tensor(labels).to(device)
            yield features, labels


def nonfinite_rows(features: torch.Tensor, chunk_rows: int = 65_536) -> torch.Tensor:
    """How many rows of `features` hold a NaN or inf, as a tensor on their device (no host sync). A chunk of rows
    at a time: isfinite over a whole feature matrix took 1.75 times its size in temporaries."""
    counts = [(~torch.isfinite(features[start:start + chunk_rows]).all(dim=-1)).sum()
              for start in range(0, features.shape[0], chunk_rows)]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64, device=features.device)


class NonFiniteFeaturesError(ValueError):
    """A model gave NaN or inf features: an evaluation of them would be noise dressed as results."""


def nonfinite_causes(model: nn.Module | None = None, precision: str | None = None) -> str:
    """What makes features NaN or inf, and what to try, for the model and the autocast precision that gave
    them (None: not known, for features computed elsewhere)."""
    parameters = model.parameters() if isinstance(model, nn.Module) else ()
    weights = next((parameter.dtype for parameter in parameters if parameter.is_floating_point()), None)
    if weights == torch.float16:  # clip.load's on CUDA, as openai/CLIP's: no autocast setting computes in float32
        return ("a model whose weights are non-finite, or activations beyond the range of its float16 weights "
                "(clip.load's on CUDA): evaluate float32 weights, model.float()")
    if precision == "fp16":
        return ("a model whose weights are non-finite, or activations beyond float16's range (evaluate with "
                "precision fp32)")
    if precision is None or weights is None:
        return ("a model whose weights are non-finite, or activations beyond float16's range (precision fp16, or "
                "float16 weights as clip.load gives on CUDA)")
    return "a model whose weights are non-finite or too large (a diverged run)"


def refuse_nonfinite_features(features: torch.Tensor, what: str, causes: str | None = None) -> None:
    """`refuse_nonfinite` of the rows of `features` (one host sync)."""
    refuse_nonfinite(int(nonfinite_rows(features)), features.shape[0], what, causes)


def refuse_nonfinite(count: int, total: int, what: str, causes: str | None = None) -> None:
    """NonFiniteFeaturesError when `count` of `total` features are non-finite: every comparison with NaN is false,
    and an argmax takes it for the largest, so rankings and predictions of them would be meaningless.
    causes: `nonfinite_causes` of the model and precision that gave them, when the caller knows them."""
    if count:
        raise NonFiniteFeaturesError(
            f"{count} of {total} {what} features are NaN or inf, which no evaluation can use: "
            f"{causes or nonfinite_causes()}"
        )


class CutTexts:
    """Texts longer than a model's context, evaluated cut to it (the end token kept) rather than aborting a
    training run at its evaluation step; counted over `encode_texts` calls, so that an evaluation says so in
    one line (a line per batch of texts was a hundred lines for COCO's captions on a small-context model, and
    a line per group of classes in zero-shot)."""

    def __init__(self) -> None:
        self.count = 0
        self.first_reason: str | None = None

    def add(self, count: int, reason: str) -> None:
        self.count += count
        self.first_reason = self.first_reason or reason

    def warn(self, total: int, context_length: int) -> None:
        if self.count:
            logger.warning("%d of %d texts are longer than the model's context and were cut to %d tokens (the end "
                           "token kept); the first: %s", self.count, total, context_length, self.first_reason)


def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    precision: str = "fp32",
    normalize: bool = True,
    cut: CutTexts | None = None,
) -> torch.Tensor:
    """float32 text features [len(texts), D] on `device`, tokenized and encoded `batch_size` at a time.
    Texts longer than the model's context are cut to it and counted in `cut`, whose caller warns once for
    all its calls; without `cut`, this call warns."""
    if batch_size < 1:
        raise ValueError(f"the text batch size must be >= 1, got {batch_size}")
    context_length = int(model.context_length)
    counted_here = cut is None
    cut = CutTexts() if cut is None else cut
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        try:
            tokens = tokenizer(batch, context_length=context_length)
        except ValueError as error:
            cut.add(_count_too_long(batch, tokenizer, context_length), str(getattr(error, "reason", error)))
            tokens = tokenizer(batch, context_length=context_length, truncate=True)
        _check_vocabulary(tokens, model)
        tokens = tokens.to(device)
        with autocast(device, precision):
            features = model.encode_text(tokens)
        features = features.float()
        chunks.append(nn.functional.normalize(features, dim=-1) if normalize else features)
    if not chunks:
        raise ValueError("no texts to encode")
    if counted_here:
        cut.warn(len(texts), context_length)
    return torch.cat(chunks)


def _count_too_long(batch: list[str], tokenizer: Tokenizer, context_length: int) -> int:
    """How many of a batch's texts the tokenizer refuses as longer than the context (only for a batch that it
    refused, and the BPE tokenizer remembers the texts it has just encoded)."""
    too_long = 0
    for text in batch:
        try:
            tokenizer([text], context_length=context_length)
        except ValueError:
            too_long += 1
    return too_long


def _check_vocabulary(tokens: torch.Tensor, model: nn.Module) -> None:
    """A model trained with a smaller vocabulary than the tokenizer's (a tiny test model, another tokenizer)
    failed inside its token embedding with torch's "IndexError: index out of range in self"."""
    vocab_size = getattr(model, "vocab_size", None)
    if isinstance(vocab_size, int) and tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer gives token id {int(tokens.max())}, but the model's vocabulary has {vocab_size} "
            f"tokens: it was trained with another tokenizer than the one evaluating it"
        )


def default_tokenizer() -> Tokenizer:
    """The shared BPE tokenizer; a prompt longer than the context is an error, not silently cut."""
    from clip.tokenizer import get_tokenizer

    return get_tokenizer()


# ---- sharding across ranks -------------------------------------------------------------------------


def distributed_world(dist_info: Any | None) -> tuple[int, int]:
    """(rank, world_size) when torch.distributed is initialised and there is more than one rank, else (0, 1)."""
    world_size = int(getattr(dist_info, "world_size", 1)) if dist_info is not None else 1
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return int(dist_info.rank), world_size


def shard_bounds(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the rank's contiguous slice; the slices in rank order cover 0..length exactly once."""
    return rank * length // world_size, (rank + 1) * length // world_size


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """The rank's contiguous slice, so concatenating the shards in rank order restores the dataset's order."""
    if world_size == 1:
        return dataset
    return Subset(dataset, range(*shard_bounds(len(dataset), rank, world_size)))


def all_reduce_sum(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenates every rank's rows in rank order; ranks may hold different numbers of rows."""
    if world_size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    # all_gather needs equal shapes: pad to the longest shard, then drop the padding.
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)])
