"""Which samples each worker reads in each epoch, and in which order: a pure function of the seed.

Every (rank, worker) pair is a *slot*; slot = rank * workers_per_rank + worker, S = world_size * workers.

Exact epochs (resampled=False). Each source has one endless sequence: random orders of the source (a
permutation of its rows, or of its shards with their samples in file order), one after the other. Epoch e
takes the next C_i = round(weight_i * size_i) samples of it, [e * C_i, (e + 1) * C_i): with weight 1 one
whole permutation per epoch, every sample exactly once; with 2, two; with 0.5, half a permutation, so two
epochs see every sample once. Epoch e's range is cut into S contiguous ranges of C_i // S or C_i // S + 1
samples, slot s taking the ((s + i + e) mod S)-th: slots differ by at most one sample per source, and the
rotation spreads the larger ranges over slots, sources and epochs, so ranks stay in step. A shard can
straddle two slots; each reads only its own range of it.

Resampled (resampled=True). Each slot independently draws its share of the epoch with replacement:
a source per sample with probability proportional to weight_i * size_i, then rows uniformly, or whole shards
uniformly among the non-empty ones: a draw reads every sample of its shard, so each shard equally likely makes
every sample equally likely (drawn by size, a shard twice as large would have each of its samples read twice
as often). A slot's share is a window of that stream of whole shards beginning at a random sample of it
(`_draw_segments`), so that a share smaller than a shard keeps every sample equally likely too.

Within a slot the sources are interleaved in a random order (`labels`), and the resulting stream is shuffled
in consecutive windows of `shuffle_buffer` items (`window_permutation`). Unlike a streaming shuffle buffer,
a window permutation is known without reading the data, so a worker resumes at any position by skipping
whole windows unread (see `stream.py`).

A run resumed under another world size or number of workers finishes the epochs in progress from the
old slots' plans before the new layout's plans take over (`handover.py`).

All randomness comes from numpy generators seeded with integer tuples (seed, epoch, ..., purpose), never from
global state, so every process computes the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .permutation import permuted_range

# Purposes mixed into the seeds, so that no two uses of randomness share a stream.
_ORDER, _SHARD_ORDER, _INTERLEAVE, _RESAMPLE, _WINDOW = 1, 2, 3, 4, 5

# Bumped whenever the same seed would plan other samples: a data position saved under another version
# cannot resume exactly (the loader then restarts the epoch, with a warning). 2: resampled partial shards
# start at a random offset. 3: row orders from `permuted_range` instead of numpy's permutation. 4: resampled
# shards drawn uniformly, not by size. 5: a resampled share begins at a random sample of the stream of shards.
PLAN_VERSION = 5


@dataclass(frozen=True)
class SourceLayout:
    """What the planner needs to know about a source: its size and, for shards, the size of each shard."""

    size: int
    weight: float
    shard_sizes: np.ndarray | None = None  # int64 per shard; None for row-indexed sources

    @property
    def samples_per_epoch(self) -> int:
        return int(round(self.weight * self.size))


@dataclass
class SlotPlan:
    """One slot's raw items for one epoch, before the window shuffle.

    Item j comes from source labels[j]; it is the k-th item of that source in this plan, where k counts the
    earlier labels equal to it. Row-indexed sources list their rows in `rows`; shard sources list
    (shard, start, stop) ranges in `segments`, read in order.
    """

    labels: np.ndarray  # int16 [n]
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    segments: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**64 for k in key])  # SeedSequence takes non-negative ints


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of `parts` contiguous ranges covering range(total), sizes differing by at most one."""
    return total * index // parts, total * (index + 1) // parts


def _rows_in_range(size: int, first: int, stop: int, key: tuple[int, ...]) -> np.ndarray:
    """Items [first, stop) of the endless concatenation of permutations `perm(key + (repeat,))` of range(size).
    Only the slot's own part of each permutation is computed (`permuted_range`): memory grows with the
    slot's share, not with the manifest (a 400M-row permutation would be 3.2 GB in every worker)."""
    pieces = []
    for repeat in range(first // size, (stop - 1) // size + 1) if stop > first and size else ():
        lo, hi = max(first - repeat * size, 0), min(stop - repeat * size, size)
        pieces.append(permuted_range(size, lo, hi, tuple(int(k) % 2**64 for k in (*key, repeat, _ORDER))))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _segments_in_range(sizes: np.ndarray, first: int, stop: int, key: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Samples [first, stop) of the endless concatenation of shard orders `perm(key + (repeat,))`, as
    (shard, start, stop) ranges within shards."""
    total, segments = int(sizes.sum()), []
    for repeat in range(first // total, (stop - 1) // total + 1) if stop > first and total else ():
        order = _rng(*key, repeat, _SHARD_ORDER).permutation(len(sizes))
        ends = np.cumsum(sizes[order]) + repeat * total
        begins = ends - sizes[order]
        for shard, begin, end in zip(order, begins, ends):
            lo, hi = max(first, begin), min(stop, end)
            if lo < hi:
                segments.append((int(shard), int(lo - begin), int(hi - begin)))
    return segments


def _draw_segments(sizes: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """`count` samples drawn with replacement: a window of an endless stream of whole shards, each drawn with
    every non-empty shard equally likely (see the module docstring for why not by size), the window beginning
    at a random sample of that stream -- its first shard drawn by size and entered at a random sample, then
    whole shards from their starts, the last cut at `count`. Every position of the window is then every sample
    equally likely, whatever the shard sizes and however small a slot's share: a window beginning at a shard's
    start read a short shard whole and a long one only in part, each short shard's samples far more often."""
    nonempty = np.flatnonzero(sizes > 0)  # an empty shard drawn would add an empty segment
    if count <= 0:
        return []
    weights = sizes[nonempty].astype(np.float64)
    first = int(nonempty[rng.choice(len(nonempty), p=weights / weights.sum())])
    start = int(rng.integers(0, sizes[first]))
    planned = min(int(sizes[first]) - start, count)
    segments = [(first, start, start + planned)]
    while planned < count:
        batch = max(1, int(np.ceil((count - planned) / weights.mean())))
        for shard in nonempty[rng.integers(0, len(nonempty), size=batch)]:
            take = min(int(sizes[shard]), count - planned)
            if take > 0:  # 0 once the count is reached within this batch of draws
                segments.append((int(shard), 0, take))
            planned += take
    return segments


@dataclass(frozen=True)
class Planner:
    """Computes `SlotPlan`s; identical in every process given the same arguments."""

    sources: tuple[SourceLayout, ...]
    seed: int
    world_size: int
    workers_per_rank: int
    resampled: bool = False
    epoch_samples: int | None = None  # resampled: samples drawn per epoch over all slots

    @property
    def slots(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def samples_per_pass(self) -> int:
        """Samples planned per epoch over all slots."""
        if self.resampled and self.epoch_samples is not None:
            return self.epoch_samples
        return sum(source.samples_per_epoch for source in self.sources)

    def plan(self, epoch: int, rank: int, worker: int) -> SlotPlan:
        slot = rank * self.workers_per_rank + worker
        if self.resampled:
            return self._resampled_plan(epoch, rank, worker, slot)
        plan = SlotPlan(labels=np.zeros(0, np.int16))
        counts = []
        for index, source in enumerate(self.sources):
            first, stop = split_range(source.samples_per_epoch, self.slots, (slot + index + epoch) % self.slots)
            first, stop = first + epoch * source.samples_per_epoch, stop + epoch * source.samples_per_epoch
            key = (self.seed, index)
            if source.shard_sizes is None:
                plan.rows[index] = _rows_in_range(source.size, first, stop, key)
            else:
                plan.segments[index] = _segments_in_range(source.shard_sizes, first, stop, key)
            counts.append(stop - first)
        labels = np.repeat(np.arange(len(self.sources), dtype=np.int16), counts)
        if len(self.sources) > 1:
            _rng(self.seed, epoch, rank, worker, _INTERLEAVE).shuffle(labels)
        plan.labels = labels
        return plan

    def _resampled_plan(self, epoch: int, rank: int, worker: int, slot: int) -> SlotPlan:
        first, stop = split_range(self.samples_per_pass, self.slots, (slot + epoch) % self.slots)
        rng = _rng(self.seed, epoch, rank, worker, _RESAMPLE)
        rates = np.array([source.weight * source.size for source in self.sources], dtype=np.float64)
        labels = rng.choice(len(self.sources), size=stop - first, p=rates / rates.sum()).astype(np.int16)
        plan = SlotPlan(labels=labels)
        for index, source in enumerate(self.sources):
            count = int(np.count_nonzero(labels == index))
            if source.shard_sizes is None:
                plan.rows[index] = rng.integers(0, source.size, size=count) if count else np.zeros(0, np.int64)
            else:
                plan.segments[index] = _draw_segments(source.shard_sizes, count, rng) if count else []
        return plan

    def window_permutation(self, epoch: int, rank: int, worker: int, window: int, length: int) -> np.ndarray:
        """The order in which the `window`-th window of `length` raw items is emitted."""
        return _rng(self.seed, epoch, rank, worker, window, _WINDOW).permutation(length)
