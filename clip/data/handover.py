"""What each slot reads in each epoch, also after elastic resumes: a run continued under another layout
(world size, data workers per rank, shuffle_buffer) finishes the epochs in progress without reading a
sample twice or losing one.

Under one layout, slot s reads in epoch e its plan (`sampling.Planner.plan`) in window-shuffled order: its
*stream* for e. When a run resumes under another layout, the layout it leaves is recorded as a `Handover`:
the layout and every old slot's position (epoch, offset into its stream) at that moment. Then for each
epoch e from the earliest epoch an old slot is still in (`first_epoch`) up to, excluding, the first epoch no
old slot had started (`end_epoch`):

* the *remainder* of old slot t in e is its stream after its offset if it is in e, all of its stream if it
  is in an earlier epoch, nothing if it is past e;
* the remainders of all old slots, concatenated in slot order, are cut into contiguous ranges of sizes
  differing by at most one, one per new slot: new slot s's stream for e is the s-th range. Samples keep the
  old slots' shuffled order; a new slot computes only the plans of the old slots its range overlaps.

From `end_epoch` on, the new layout's normal plans. A further change of layout during such a transition
epoch adds another handover whose old streams are themselves transition streams: the chain of handovers
is kept while a later layer still refers to it, so it is bounded by the layout changes made within the
epochs still in progress (`MAX_HANDOVERS`). Exact epochs only: resampled epochs draw with replacement and
have no remainder to keep (see `resampled_positions`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .sampling import Planner, SlotPlan, split_range

# (epoch, items of that epoch's stream consumed); (e + 1, 0) once epoch e is done.
Position = tuple[int, int]

# Layout changes whose transitions may overlap; one more and the loader restarts the earliest epoch instead.
MAX_HANDOVERS = 8


@dataclass(frozen=True)
class SlotLayout:
    """What decides which slot reads what, besides the seed and sources."""

    world_size: int
    workers: int  # slots per rank
    shuffle_buffer: int

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


@dataclass(frozen=True)
class Handover:
    """A layout that a resume left, and the positions of all its slots (slot order) when it was left."""

    layout: SlotLayout
    positions: tuple[Position, ...]

    @property
    def first_epoch(self) -> int:
        """The earliest epoch an old slot was still in: the new layout starts there."""
        return min(epoch for epoch, _ in self.positions)

    def started_end(self) -> int:
        """One past the last epoch some slot of this layout had started."""
        return max(epoch + (offset > 0) for epoch, offset in self.positions)

    def to_state(self) -> dict:
        layout = self.layout
        return {"world_size": layout.world_size, "workers": layout.workers, "shuffle_buffer": layout.shuffle_buffer,
                "positions": [list(position) for position in self.positions]}

    @classmethod
    def from_state(cls, state: dict) -> Handover:
        layout = SlotLayout(int(state["world_size"]), int(state["workers"]), int(state["shuffle_buffer"]))
        positions = tuple((int(epoch), int(offset)) for epoch, offset in state["positions"])
        if len(positions) != layout.slots:
            raise ValueError(f"a handover of {layout.slots} slots records {len(positions)} positions")
        return cls(layout, positions)


def end_epochs(handovers: tuple[Handover, ...]) -> list[int]:
    """For each handover, the first epoch that no slot of it nor of an earlier layer had started: the layer
    after it reads transition streams before that epoch, its normal plans from it."""
    ends, end = [], 0
    for handover in handovers:
        end = max(end, handover.started_end())
        ends.append(end)
    return ends


def needed_handovers(handovers: tuple[Handover, ...], earliest_epoch: int) -> tuple[Handover, ...]:
    """The handovers still referred to by streams of epochs >= `earliest_epoch` (a suffix of the chain: a
    layer's transition epochs all lie before its handover's end epoch, and end epochs never decrease)."""
    ends = end_epochs(handovers)
    keep = next((i for i, end in enumerate(ends) if end > earliest_epoch), len(handovers))
    return handovers[keep:]


def window_items(
    sources: list, planner: Planner, plan: SlotPlan, window: int, epoch: int, rank: int, worker: int, start: int
) -> Iterator[tuple[int, object]]:
    """A plan's raw items in emission order from position `start`. Windows before the one holding `start`
    are skipped without reading anything; each source's cursor starts after its items in them."""
    labels = plan.labels
    first_window = start // window
    begin = first_window * window
    cursors = {
        int(index): sources[index].items(plan, int(index), int(np.count_nonzero(labels[:begin] == index)))
        for index in np.unique(labels)
    }
    for number in range(first_window, math.ceil(len(labels) / window)):
        block_labels = labels[number * window : (number + 1) * window].tolist()
        block = [(label, next(cursors[label])) for label in block_labels]
        order = planner.window_permutation(epoch, rank, worker, number, len(block))
        for j in order[start - begin if number == first_window else 0 :]:
            yield block[j]


class SlotStreams:
    """The streams of the current layout's slots (the last layer), given the handovers before it (oldest
    first). Layer i < len(handovers) is handovers[i]'s layout; identical in every process."""

    def __init__(self, sources: list, planner: Planner, layout: SlotLayout, handovers: tuple[Handover, ...] = ()):
        self.sources = sources
        self.layouts = [handover.layout for handover in handovers] + [layout]
        self.planners = [dataclasses.replace(planner, world_size=lay.world_size, workers_per_rank=lay.workers)
                         for lay in self.layouts]
        self.handovers = handovers
        self.ends = end_epochs(handovers)
        self._positions = [np.asarray(handover.positions, dtype=np.int64).reshape(-1, 2) for handover in handovers]
        self._lengths: dict[tuple[int, int], np.ndarray] = {}

    def epoch_stream(self, slot: int, epoch: int, start: int) -> tuple[int, Iterator[tuple[int, object]]]:
        """(length of the slot's stream in `epoch`, its (source, raw item)s from position `start`)."""
        layer = len(self.handovers)
        if self._is_transition(layer, epoch):
            length = int(self.lengths(layer, epoch)[slot])
            return length, self._items(layer, slot, epoch, start, length)
        return self._normal_stream(layer, slot, epoch, start)

    def is_transition(self, epoch: int) -> bool:
        """Whether `epoch` finishes the epochs in progress of the layouts a resume left (finitely many)."""
        return self._is_transition(len(self.handovers), epoch)

    def _is_transition(self, layer: int, epoch: int) -> bool:
        return layer > 0 and self.handovers[layer - 1].first_epoch <= epoch < self.ends[layer - 1]

    def _normal_stream(self, layer: int, slot: int, epoch: int, start: int) -> tuple[int, Iterator]:
        planner = self.planners[layer]
        rank, worker = divmod(slot, planner.workers_per_rank)
        plan = planner.plan(epoch, rank, worker)
        window = self.layouts[layer].shuffle_buffer
        return len(plan), window_items(self.sources, planner, plan, window, epoch, rank, worker, start)

    def lengths(self, layer: int, epoch: int) -> np.ndarray:
        """int64 [slots of the layer]: every slot's stream length in `epoch`, from sizes alone (no plan)."""
        key = (layer, epoch)
        if key not in self._lengths:
            slots = self.layouts[layer].slots
            if self._is_transition(layer, epoch):
                total = int(self.remainders(layer - 1, epoch).sum())
                index = np.arange(slots + 1, dtype=np.int64)
                bounds = total * index // slots
                self._lengths[key] = np.diff(bounds)
            else:
                lengths = np.zeros(slots, dtype=np.int64)
                for source_index, source in enumerate(self.planners[layer].sources):
                    count = source.samples_per_epoch
                    part = (np.arange(slots, dtype=np.int64) + source_index + epoch) % slots  # as Planner.plan
                    lengths += count * (part + 1) // slots - count * part // slots
                self._lengths[key] = lengths
        return self._lengths[key]

    def remainders(self, layer: int, epoch: int) -> np.ndarray:
        """int64 [slots of handover `layer`]: what each old slot had left unread of `epoch` when it was left."""
        lengths = self.lengths(layer, epoch)
        at, offsets = self._positions[layer][:, 0], self._positions[layer][:, 1]
        return np.where(at < epoch, lengths, np.where(at == epoch, lengths - offsets, 0))

    def _items(self, layer: int, slot: int, epoch: int, start: int, stop: int) -> Iterator[tuple[int, object]]:
        """Items [start, stop) of a slot's stream in `epoch`."""
        if start >= stop:
            return
        if not self._is_transition(layer, epoch):
            _, items = self._normal_stream(layer, slot, epoch, start)
            yield from itertools.islice(items, stop - start)
            return
        old = layer - 1
        remainders = self.remainders(old, epoch)
        ends = np.cumsum(remainders)
        share_begin = split_range(int(ends[-1]), self.layouts[layer].slots, slot)[0]
        first, last = share_begin + start, share_begin + stop  # in the concatenated remainders
        old_slot = int(np.searchsorted(ends, first, side="right"))
        while first < last:
            begin = int(ends[old_slot] - remainders[old_slot])  # where this old slot's remainder begins
            piece_end = min(last, int(ends[old_slot]))
            at, offset = self.handovers[old].positions[old_slot]
            skipped = offset if at == epoch else 0  # the old slot had read these
            yield from self._items(old, old_slot, epoch, skipped + first - begin, skipped + piece_end - begin)
            first, old_slot = piece_end, old_slot + 1


def resampled_positions(saved: list[Position], saved_slots: list[int], saved_planner: Planner,
                        planner: Planner, slots: list[int]) -> list[Position]:
    """Resampled epochs: the new slots `slots` continue at the old slots' average progress (in epochs,
    fractions included), so the run draws as many samples as it would have; draws are independent, there
    is no remainder to keep."""
    progress = []
    for (epoch, offset), slot in zip(saved, saved_slots):
        length = _resampled_length(saved_planner, slot, epoch)
        progress.append(epoch + (offset / length if length else 0.0))
    mean = sum(progress) / len(progress)
    positions = []
    for slot in slots:
        epoch = math.floor(mean)
        offset = int((mean - epoch) * _resampled_length(planner, slot, epoch))
        positions.append((epoch, offset))
    return positions


def _resampled_length(planner: Planner, slot: int, epoch: int) -> int:
    first, stop = split_range(planner.samples_per_pass, planner.slots, (slot + epoch) % planner.slots)
    return stop - first
