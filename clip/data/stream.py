"""The data worker: turns its slot's planned raw items into full batches, forever.

Each DataLoader worker of a rank plays one slot (see `sampling.py`) and walks the concatenation of its
epochs' plans: epoch e's raw items in window-shuffled order, then epoch e+1's, and so on (after a resume under
another layout, first its share of what the old slots left of the epochs in progress: `handover.py`), without a seam
(the last batch of an epoch is completed with the first samples of the next, so no sample is dropped and
every batch is full). A raw item that cannot be used is skipped and counted; the next good item takes its
place in the batch, so a batch of B samples may consume more than B raw items.

Every batch carries, besides images and token ids, a small `meta` dict: which worker made it, the worker's
position (epoch, items consumed in that epoch) after it, and the exact per-source counts of samples used,
skipped (by kind) and repaired while it was made, by the data epoch each raw item belongs to (a batch can
straddle two). The training process sums these (workers cannot update its counters) and so knows each data
epoch's exact counts, and the positions are what `TrainData.state_dict()` saves: a resumed worker starts at its
position, skipping earlier windows of its plan unread, and produces exactly the batches it would have.

`rotation` maps DataLoader worker ids onto slots. torch's DataLoader asks its workers for batches strictly
in turn (worker 0, 1, ..., 0, 1, ...) and our streams never end, so the trainer receives batches from
slots in a fixed cycle; a resumed loader starts that cycle at the slot whose batch was due next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decoding import SkipLog, SkipSample, decode_caption, open_image, pil_pixel_limit, upright_rgb
from .handover import Handover, Position, SlotLayout, SlotStreams
from .sampling import Planner, SourceLayout
from .sources import Source
from .transform import BatchImageWriter, center_crop_box, draft_size, random_resized_crop_box, random_square_box

_AUGMENT = 6  # seed purpose of the per-sample crop, distinct from sampling.py's


class UnusableData(RuntimeError):
    """The data yields no usable sample: found in a loader worker, but bad input all the same, which the
    trainer reports in one line. Raised in a DataLoader worker, it reaches the main process as this type
    (torch re-raises a worker's error by its type, the worker's traceback put in front of the message)."""

    def without_traceback(self) -> str:
        """The message alone, also of an error re-raised from a DataLoader worker. (Not named `message`: torch
        re-raises an exception type with that attribute as type(message=...).)"""
        text = str(self)
        marker = f"{type(self).__name__}: "
        return text.rsplit(marker, 1)[-1].strip() if "Original Traceback" in text and marker in text else text


# What to check when a source's samples are all skipped for one reason.
SKIP_HINTS = {
    "missing_file": "a manifest's image paths are read relative to the manifest's own folder, or are absolute",
    "missing_caption": 'a shard sample\'s caption is its .txt member, or the member caption_column names ("json" '
                       "for the caption field of its .json)",
    "missing_image": "a shard sample's image is the member image_column names, or one with an image extension",
    "bad_utf8": "captions must be UTF-8 (a manifest in another encoding needs converting)",
    "empty_caption": "check the source's caption column",
    "missing_shard": "check the shard path pattern",
    "shard_read_error": "check that the shards are readable tar files",
}
DEFAULT_SKIP_HINT = "check the source's path and image/caption columns"


def _largest_shard(source: SourceLayout) -> int:
    return int(source.shard_sizes.max()) if source.shard_sizes is not None and len(source.shard_sizes) else 0


def _skipped_kinds(counts: dict) -> str:
    """"missing_file 221" from a batch's per-epoch, per-source counts (the samples skipped, by kind)."""
    kinds: dict[str, int] = {}
    for per_source in counts.values():
        for source_counts in per_source.values():
            for kind, count in source_counts.get("skipped", {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
    return _kinds_line(kinds)


def _kinds_line(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "none skipped"


@dataclass(frozen=True)
class StreamSettings:
    rank: int
    batch_size: int
    image_size: int
    context_length: int
    shuffle_window: int
    crop: Literal["center", "random_square", "random_resized"]  # DataConfig.crop
    jpeg_draft: bool
    max_image_pixels: int | None
    log_every_s: float


@dataclass
class _Item:
    epoch: int
    index: int  # in the epoch's emission order
    position: Position  # of the worker after this item
    source: int
    raw: object


def empty_counts() -> dict:
    """One source's counts: samples used, and samples skipped and repaired by kind."""
    return {"samples": 0, "skipped": {}, "repaired": {}}


def _count(meta: dict, epoch: int, source: str, field: str, kind: str | None = None) -> None:
    """One more sample used (field "samples") or skipped/repaired (field "skipped"/"repaired", by kind) in
    meta["counts"] = {epoch: {source: empty_counts() shaped}}."""
    counts = meta["counts"].setdefault(epoch, {}).setdefault(source, empty_counts())
    if kind is None:
        counts[field] += 1
    else:
        counts[field][kind] = counts[field].get(kind, 0) + 1


def _pixel_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8; in a worker, allocated in shared memory: sending it to the training process then costs no copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what torch's default_collate uses
    if new_shared is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape))).view(shape)


class SampleStream(IterableDataset):
    """An endless stream of (images ByteTensor[B, 3, S, S], tokens IntTensor[B, ctx], meta) batches; the pixels
    are normalised by the consumer (`transform.PixelNormalizer`)."""

    def __init__(
        self,
        sources: list[Source],
        planner: Planner,
        settings: StreamSettings,
        tokenizer: object,
        start_positions: list[Position],
        rotation: int = 0,
        handovers: tuple[Handover, ...] = (),
    ) -> None:
        self.sources = sources
        self.planner = planner
        self.settings = settings
        self.tokenizer = tokenizer
        self.start_positions = list(start_positions)
        self.rotation = rotation
        self.handovers = handovers  # the layouts a resume left while their epochs were in progress

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.planner.workers_per_rank
        items = self._items(worker, *self.start_positions[worker])
        batches = _BatchBuilder(self, worker)
        while True:
            yield batches.next_batch(items)

    def _items(self, worker: int, epoch: int, offset: int) -> Iterator[_Item]:
        rank, empty_epochs = self.settings.rank, 0
        layout = SlotLayout(self.planner.world_size, self.planner.workers_per_rank, self.settings.shuffle_window)
        streams = SlotStreams(self.sources, self.planner, layout, self.handovers)
        slot = rank * self.planner.workers_per_rank + worker
        while True:
            length, items = streams.epoch_stream(slot, epoch, offset)
            # A slot can draw no sample in an epoch when sources are smaller than the number of slots; the
            # rotation of ranges gives it some within `slots` epochs whenever the epoch has >= slots samples.
            # Transition epochs (an elastic resume's) are not counted: their shares do not rotate, and a slot can
            # have none in more than `slots` of them (an old worker many small epochs ahead of another), but
            # they are finitely many, and the normal epochs after them rotate.
            if length:
                empty_epochs = 0
            elif not streams.is_transition(epoch):
                empty_epochs += 1
            if empty_epochs > self.planner.slots:
                raise RuntimeError(f"data rank {rank} worker {worker}: no sample planned in {empty_epochs} epochs")
            for source, raw in items:
                offset += 1
                position = (epoch + 1, 0) if offset == length else (epoch, offset)
                yield _Item(epoch, offset - 1, position, source, raw)
            epoch, offset = epoch + 1, 0


class _BatchBuilder:
    """Fills one batch at a time from a worker's items, decoding, skipping and counting."""

    def __init__(self, stream: SampleStream, worker: int) -> None:
        self.stream = stream
        self.settings = stream.settings
        self.worker = worker
        self.writer = BatchImageWriter(self.settings.image_size)
        self.draft = draft_size(self.settings.image_size, self.settings.crop) if self.settings.jpeg_draft else None
        self.skip_log = SkipLog(self.settings.log_every_s, f"data rank {self.settings.rank} worker {worker}")
        self.misses = 0  # raw items in a row that could not be used
        # A run stops only when no sample can be used at all: more failures in a row than two passes over
        # every source (or two of the largest shard, which a missing shard costs a slot at once) means the
        # data is unusable, not dirty. A limit per slot would trip on one missing shard with many slots.
        largest_shard = max((_largest_shard(source) for source in stream.planner.sources), default=0)
        self.miss_limit = 2 * max(stream.planner.samples_per_pass, largest_shard, 1) + 100
        # Broken settings (a wrong image column, a wrong path) make every sample unusable from the start: said
        # after ten shards' worth of failures (or 1000 rows) instead of two whole passes, which at scale would
        # take long enough to look like a hang. Dirty data with some usable samples never reaches this.
        self.first_use_limit = min(self.miss_limit, 10 * largest_shard + 1000)
        self.used = 0  # samples this worker has put in batches
        # The same for one source of several, whose failures the others' samples hide from the limits above
        # (a source of bad paths in a mix would change the mix silently, for the whole run): a source none of
        # whose samples this worker could use in two epochs of its share of them is unusable -- but, as above,
        # not before ten of its shards' worth (or 1000 rows): a run of missing shards is dirt, not a broken source.
        slots = stream.planner.slots
        self.source_limits = [
            min(self.first_use_limit,
                max(2 * -(-source.samples_per_epoch // slots) + 100, 10 * _largest_shard(source) + 1000))
            for source in stream.planner.sources
        ]
        self.source_used: set[int] = set()  # sources this worker has put a sample of in a batch
        self.source_misses: dict[int, dict[str, int]] = {}  # skips by kind, of sources not in source_used

    def next_batch(self, items: Iterator[_Item]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        s = self.settings
        images = _pixel_batch((s.batch_size, 3, s.image_size, s.image_size))
        texts: list[str] = []
        origins: list[tuple[int, str]] = []  # (epoch, source name) of each sample in the batch
        meta: dict = {"worker": self.worker, "counts": {}}
        with pil_pixel_limit(s.max_image_pixels):  # scoped: never left set while the trainer runs
            while len(texts) < s.batch_size:
                item = next(items)
                source = self.stream.sources[item.source]
                repairs: list[str] = []
                try:
                    caption = decode_caption(source.caption(item.raw))
                    self._write_image(source, item, repairs, images[len(texts)])
                except SkipSample as skip:
                    self._skipped(source, item, skip, meta)
                    continue
                self.misses = 0
                self.used += 1
                self.source_used.add(item.source)
                texts.append(caption)
                origins.append((item.epoch, source.name))
                _count(meta, item.epoch, source.name, "samples")
                for repair in repairs:
                    _count(meta, item.epoch, source.name, "repaired", repair)
                meta["position"] = item.position
        tokens = self._tokenize(texts, origins, meta)
        return images, tokens, meta

    def _write_image(self, source: Source, item: _Item, repairs: list[str], out: torch.Tensor) -> None:
        image = source.image(item.raw)
        if isinstance(image, bytes):
            image = open_image(image, self.settings.max_image_pixels, self.draft)
        image = upright_rgb(image, repairs)
        width, height = image.size
        if self.settings.crop == "center":
            box = center_crop_box(width, height, self.settings.image_size)
        else:
            key = [self.stream.planner.seed, item.epoch, self.settings.rank, self.worker, item.index, _AUGMENT]
            rng = np.random.default_rng([k % 2**64 for k in key])
            random_box = random_square_box if self.settings.crop == "random_square" else random_resized_crop_box
            box = random_box(width, height, rng)
        self.writer.write(image, box, out)

    def _skipped(self, source: Source, item: _Item, skip: SkipSample, meta: dict) -> None:
        _count(meta, item.epoch, source.name, "skipped", skip.kind)
        meta["position"] = item.position
        self.skip_log.record(skip.kind, source.name, source.describe(item.raw, skip.kind), skip.detail)
        self.misses += 1
        if self.used == 0 and self.misses > self.first_use_limit:
            raise self._unusable(
                f"none of the first {self.misses} samples could be used ({_skipped_kinds(meta['counts'])})",
                source, item, skip,
            )
        if item.source not in self.source_used:
            kinds = self.source_misses.setdefault(item.source, {})
            kinds[skip.kind] = kinds.get(skip.kind, 0) + 1
            misses = sum(kinds.values())
            if self.used and misses > self.source_limits[item.source]:  # (no source delivered: the limits below)
                raise self._unusable(
                    f"source {source.name}: none of its first {misses} samples could be used ({_kinds_line(kinds)}), "
                    "while other sources' samples could", source, item, skip,
                )
        if self.misses > self.miss_limit:
            raise self._unusable(
                f"{self.misses} samples in a row could not be used (more than two passes over all the data; "
                f"{_skipped_kinds(meta['counts'])})", source, item, skip,
            )

    def _unusable(self, problem: str, source: Source, item: _Item, skip: SkipSample) -> UnusableData:
        """The error that stops the run: where, the problem, what to check for the latest skip's kind, and it."""
        return UnusableData(
            f"data rank {self.settings.rank} worker {self.worker}: {problem} -- "
            f"{SKIP_HINTS.get(skip.kind, DEFAULT_SKIP_HINT)}; the latest: {source.describe(item.raw, skip.kind)}: {skip}"
        )

    def _tokenize(self, texts: list[str], origins: list[tuple[int, str]], meta: dict) -> torch.Tensor:
        """Token ids cut to the context length; cut captions are counted as caption_truncated per source."""
        context = self.settings.context_length
        tokenizer = self.stream.tokenizer
        tokens = tokenizer(texts, context_length=context, truncate=True)
        full_rows = torch.nonzero(tokens[:, -1] != 0).flatten().tolist()
        if full_rows:  # a filled last slot is a caption that fits exactly or one that was cut: look one further
            longer = tokenizer([texts[i] for i in full_rows], context_length=context + 1, truncate=True)
            for row, was_cut in zip(full_rows, (longer[:, -1] != 0).tolist()):
                if was_cut:
                    _count(meta, *origins[row], "repaired", "caption_truncated")
        return tokens
