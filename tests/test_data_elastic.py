"""Elastic resumes: a run continued under another world size or number of data workers finishes the epochs in
progress with every sample read exactly once over the layouts (clip/data/handover.py), resumes exactly again
within such a transition, and then follows the new layout's own plans."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_helpers import build, captions, take, write_manifest, write_shards

from clip.data import (
    SourceConfig,
    data_state_for_other_world_size,
    data_state_for_rank,
    merge_rank_reports,
    states_to_save,
)
from clip.data.rank_states import every_slot_position
from clip.data.stream import SampleStream

# (world_size, workers) before and after
LAYOUT_CHANGES = {
    "2->1 ranks": ((2, 1), (1, 1)),
    "1->2 ranks": ((1, 1), (2, 1)),
    "2->3 ranks": ((2, 1), (3, 1)),
    "0->2 workers": ((1, 0), (1, 2)),
    "2->1 workers": ((2, 2), (2, 1)),
}


def mixed_sources(tmp_path: Path) -> list[SourceConfig]:
    """Rows with weight 2 and shards (of 4, split across slots) with weight 0.5: an epoch of 26 + 8 samples."""
    manifest = write_manifest(tmp_path / "m", range(100, 113))
    return [
        SourceConfig(kind="manifest", path=str(manifest), name="rows", weight=2.0),
        SourceConfig(kind="shards", path=write_shards(tmp_path / "s", 17, 4), name="shards", weight=0.5),
    ]


SETTINGS = dict(batch_size=3, shuffle_buffer=3, prefetch_factor=2)
# Batches per rank, by world size: into epoch 1 (34 samples an epoch); of two ranks, rank 1 into epoch 2
BATCHES = {1: [17], 2: [8, 12]}


def run(sources, world_size: int, workers: int, rank: int, state: dict | None = None):
    data = build(sources, rank=rank, world_size=world_size, workers=workers, **SETTINGS)
    if state is not None:
        data.load_state_dict(state)
    return data


def items_between(data, stop_positions: list | None = None, before_epoch: int | None = None) -> list:
    """(epoch, sample) of every item `data`'s workers read from their current positions up to the given
    positions (exclusive of nothing: the item that brings a worker there is included) or up to an epoch."""
    stream = SampleStream(data.sources, data.planner, data.settings, data.tokenizer, data._positions,
                          handovers=data._handovers)
    read = []
    for worker, start in enumerate(data._positions):
        stop = tuple(stop_positions[worker]) if stop_positions is not None else None
        if stop is not None and tuple(start) == stop:
            continue
        for item in stream._items(worker, *start):
            if before_epoch is not None and item.epoch >= before_epoch:
                break
            source = data.sources[item.source]
            read.append((item.epoch, f"{source.name}:{source.describe(item.raw)}"))
            if stop is not None and item.position == stop:
                break
    return read


def epoch_reference(sources, epochs: int) -> list:
    """Every item of the first `epochs` epochs, as one uninterrupted rank with one worker reads them."""
    return items_between(run(sources, 1, 0, 0), before_epoch=epochs)


def phase(sources, layout: tuple[int, int], states: list[dict] | None, batches: list[int]) -> tuple[list, list]:
    """Runs every rank of `layout` (from the saved `states`, if any) for its number of batches; returns the
    items each read, and their states."""
    world_size, workers = layout
    read, saved = [], []
    for rank in range(world_size):
        state = None if states is None else to_resume(states, rank, world_size)
        data = run(sources, world_size, workers, rank, state)
        start = run(sources, world_size, workers, rank, state)  # an untouched copy, to list what was read
        take(data, batches[rank])
        saved.append(data.state_dict())
        data.close()
        read += items_between(start, stop_positions=saved[-1]["positions"])
    return read, states_to_save(saved)  # as the trainer's checkpoint keeps them


def to_resume(states: list[dict], rank: int, world_size: int) -> dict:
    """What the trainer's resume hands the loader (clip/resume.py)."""
    if len(states) == world_size:
        return data_state_for_rank(states, rank)
    return data_state_for_other_world_size(states, rank)


def finish(sources, layout: tuple[int, int], states: list[dict], before_epoch: int) -> list:
    world_size, workers = layout
    read = []
    for rank in range(world_size):
        read += items_between(run(sources, world_size, workers, rank, to_resume(states, rank, world_size)),
                              before_epoch=before_epoch)
    return read


def assert_each_epoch_read_once(read: list, reference: list, epochs: int) -> None:
    for epoch in range(epochs):
        got = Counter(sample for e, sample in read if e == epoch)
        expected = Counter(sample for e, sample in reference if e == epoch)
        assert got == expected, f"epoch {epoch}: twice {got - expected}, missing {expected - got}"


@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_an_epoch_in_progress_is_finished_under_the_new_layout_each_sample_once(tmp_path: Path, change: str) -> None:
    sources = mixed_sources(tmp_path)
    before, after = LAYOUT_CHANGES[change]
    first_read, states = phase(sources, before, None, batches=BATCHES[before[0]])
    assert 1 in {position[0] for state in states for position in state["positions"]}
    second_read = finish(sources, after, states, before_epoch=4)
    assert_each_epoch_read_once(first_read + second_read, epoch_reference(sources, 4), epochs=4)


def test_new_slots_without_a_share_of_many_transition_epochs_read_on(tmp_path: Path) -> None:
    # One old worker 10 small epochs ahead of the other (a batch of 40 from 8 rows, 2 workers), resumed on 8 ranks:
    # each transition epoch's remainder (4 samples) is split over 8 new slots, the first four of which got no
    # share in 10 epochs in a row, and "no sample planned in 9 epochs" stopped them
    sources = [SourceConfig(kind="manifest", path=str(write_manifest(tmp_path / "m", range(8))), name="m")]
    settings = dict(workers=2, batch_size=40, shuffle_buffer=3, prefetch_factor=2)
    data, start = build(sources, **settings), build(sources, **settings)
    take(data, 1)
    state = data.state_dict()
    data.close()
    assert sorted(tuple(position) for position in state["positions"]) == [(0, 0), (10, 0)]
    first_read = items_between(start, stop_positions=state["positions"])
    second_read = finish(sources, (8, 0), states_to_save([state]), before_epoch=12)
    assert_each_epoch_read_once(first_read + second_read, epoch_reference(sources, 12), epochs=12)


@pytest.mark.parametrize("change", ["2->3 ranks", "2->1 workers", "0->2 workers"])
def test_the_epoch_after_the_transition_is_the_new_layouts_own_plan(tmp_path: Path, change: str) -> None:
    sources = mixed_sources(tmp_path)
    before, (world_size, workers) = LAYOUT_CHANGES[change]
    _, states = phase(sources, before, None, batches=BATCHES[before[0]])
    for rank in range(world_size):
        resumed = run(sources, world_size, workers, rank, to_resume(states, rank, world_size))
        end = max(epoch + (offset > 0) for state in states for epoch, offset in state["positions"])
        resumed_items = [item for item in items_between(resumed, before_epoch=end + 1) if item[0] == end]
        fresh = run(sources, world_size, workers, rank)
        fresh._positions = [(end, 0)] * len(fresh._positions)
        assert resumed_items == items_between(fresh, before_epoch=end + 1)


def test_a_second_resume_in_the_transition_under_the_same_layout_gives_the_same_batches(tmp_path: Path) -> None:
    sources = mixed_sources(tmp_path)
    _, states = phase(sources, (2, 1), None, batches=BATCHES[2])
    for rank in range(3):
        state = data_state_for_other_world_size(states, rank)
        uninterrupted = run(sources, 3, 2, rank, state)
        expected = take(uninterrupted, 6)
        uninterrupted.close()
        first = run(sources, 3, 2, rank, state)
        head = take(first, 2)
        again = first.state_dict()
        assert again["handovers"], "still in the transition"
        first.close()
        resumed = run(sources, 3, 2, rank, again)
        tail = take(resumed, 4)
        resumed.close()
        assert captions(head + tail) == captions(expected)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(head + tail, expected))


@pytest.mark.parametrize("layouts", [((2, 1), (3, 1), (1, 2)), ((1, 2), (2, 1), (2, 2)), ((2, 1), (1, 1), (2, 1))])
def test_another_layout_change_within_the_transition_still_reads_each_sample_once(tmp_path: Path, layouts) -> None:
    sources = mixed_sources(tmp_path)
    first, second, third = layouts
    read, states = phase(sources, first, None, batches=BATCHES[first[0]])
    more, states = phase(sources, second, states, batches=[2, 1, 3][: second[0]])
    # Interrupted within the transition; the checkpoint keeps the chain once, not once per rank (its size grew
    # with the square of the number of ranks), and the resumed ranks all get it
    assert sum(bool(state["handovers"]) for state in states) == 1
    read += more + finish(sources, third, states, before_epoch=3)
    assert_each_epoch_read_once(read, epoch_reference(sources, 3), epochs=3)


def test_the_layout_change_is_said_and_counts_stay_exact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = mixed_sources(tmp_path)
    _, states = phase(sources, (2, 1), None, batches=BATCHES[2])
    reports = []
    with caplog.at_level(logging.WARNING):
        for rank in range(3):
            data = run(sources, 3, 1, rank, data_state_for_other_world_size(states, rank))
            take(data, 12)  # well past epoch 1 on every rank
            reports.append(data.rank_report())
            data.close()
    # 20 and 36 batches of 3 into epochs of 34: epoch 1 and 2 in progress
    assert "continuing epochs 1-2 under the new layout: 10 samples of epoch 1, 32 samples of epoch 2 left, none " \
           "read twice" in caplog.text
    assert "read again" not in caplog.text and "rank," not in caplog.text
    # Every rank would say the same: a warning from rank 0 alone
    assert sum("under the new layout" in record.getMessage() for record in caplog.records) == 1
    for epoch in (1, 2, 3):  # summed over the new ranks, each epoch's counts are whole
        for name, samples in (("rows", 26), ("shards", 8)):
            assert sum(r["finished_epochs"][epoch][name]["samples"] for r in reports) == samples, (epoch, name)
    assert merge_rank_reports(reports)["finished_epoch"]["epoch"] == 3
    assert merge_rank_reports(reports)["samples"] == (8 + 12) * 3 + 3 * 12 * 3


def slot_state(rank: int, positions: list, **layout) -> dict:
    """A saved rank's data state, with only what the resume helpers read: one worker per rank of two."""
    return {"layout": {"world_size": 2, "workers": 1, "shuffle_buffer": 3, **layout, "rank": rank},
            "positions": positions, "handovers": []}


def test_every_slot_position_only_from_one_layouts_ranks_in_rank_order() -> None:
    states = [slot_state(0, [[1, 5]]), slot_state(1, [[2, 0]])]
    assert every_slot_position(data_state_for_rank(states, 1)) == [(1, 5), (2, 0)]
    # ranks out of order, or saved under different layouts: which slot a position is of cannot be told, and the
    # resume restarts the epoch in progress (with a warning) rather than continue from the wrong slots
    assert every_slot_position(data_state_for_rank(states[::-1], 0)) is None
    mixed = [states[0], slot_state(1, [[2, 0]], shuffle_buffer=4)]
    assert every_slot_position(data_state_for_rank(mixed, 0)) is None
    # a list that does not cover every slot of the saved layout is not used
    assert every_slot_position({**states[0], "every_slot_position": [[1, 5]]}) is None
    # a one-rank run's state is every slot's already
    assert every_slot_position(slot_state(0, [[3, 1], [3, 2]], world_size=1, workers=2)) == [(3, 1), (3, 2)]


def test_the_checkpoint_keeps_the_longest_chain_of_handovers_once() -> None:
    # Ranks past a transition drop their handovers: the chains are suffixes of the longest, which one rank keeps
    states = [{"handovers": ["h2"]}, {"handovers": ["h1", "h2"]}, {"handovers": []}]
    assert [state["handovers"] for state in states_to_save(states)] == [[], ["h1", "h2"], []]
    assert states_to_save([]) == []
    # and on resume every rank gets that chain back, whichever rank's state held it
    saved = [slot_state(0, [[1, 5]]), {**slot_state(1, [[2, 0]]), "handovers": ["h1", "h2"]}]
    assert data_state_for_rank(saved, 0)["handovers"] == ["h1", "h2"]


def test_old_states_still_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A state as the previous version saved it: format 1, no handovers, no other ranks' positions
    sources = mixed_sources(tmp_path)
    read, states = phase(sources, (2, 1), None, batches=BATCHES[2])
    old = [{key: value for key, value in state.items() if key != "handovers"} | {"format": 1} for state in states]
    # the same layout: exact, as before
    expected = take(run(sources, 2, 1, 1), 15)  # rank 1 had taken 12 batches
    assert captions(take(run(sources, 2, 1, 1, old[1]), 3)) == captions(expected[12:])
    # another layout, with every rank's state at hand: continued
    read += finish(sources, (1, 2), old, before_epoch=3)
    assert_each_epoch_read_once(read, epoch_reference(sources, 3), epochs=3)
    # one rank's state alone under another layout: restarted, as before, with the reason said
    with caplog.at_level(logging.WARNING):
        lone = run(sources, 1, 1, 0, old[1])
    assert "lacks the other saved ranks' positions" in caplog.text and "read again" in caplog.text
    assert lone.state_dict()["positions"] == [[2, 0]]  # saved rank 1 was in epoch 2


def test_resampled_epochs_continue_at_the_same_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = mixed_sources(tmp_path)
    settings = dict(resampled=True, epoch_samples=40)
    states = []
    for rank in range(2):
        data = build(sources, rank=rank, world_size=2, workers=1, **SETTINGS, **settings)
        take(data, 10)  # 30 of 20 samples per rank: half of epoch 1
        states.append(data.state_dict())
        data.close()
    with caplog.at_level(logging.WARNING):
        data = build(sources, world_size=1, workers=2, **SETTINGS, **settings)
        data.load_state_dict(data_state_for_other_world_size(states, 0))
    assert "continuing the resampled epochs" in caplog.text
    assert data.state_dict()["positions"] == [[1, 10], [1, 10]]


def test_a_layout_change_at_an_epoch_boundary_starts_the_new_layouts_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = mixed_sources(tmp_path)
    first = build(sources, batch_size=2, workers=0)
    take(first, 17)  # exactly epoch 0's 34 samples
    state = first.state_dict()
    first.close()
    assert state["positions"] == [[1, 0]]
    with caplog.at_level(logging.WARNING):
        resumed = run(sources, 1, 2, 0, state)
    assert "continuing at the beginning of epoch 1 under the new layout" in caplog.text
    assert resumed.state_dict()["positions"] == [[1, 0], [1, 0]] and resumed.state_dict()["handovers"] == []
    fresh = run(sources, 1, 2, 0)
    fresh._positions = [(1, 0), (1, 0)]
    assert items_between(resumed, before_epoch=2) == items_between(fresh, before_epoch=2)


class _RowItems:
    def items(self, plan, index: int, skip: int):
        return ((index, int(row)) for row in plan.rows[index][skip:])


class _ShardItems:
    def items(self, plan, index: int, skip: int):
        samples = [(index, shard, i) for shard, start, stop in plan.segments[index] for i in range(start, stop)]
        return iter(samples[skip:])


def test_chains_of_random_layout_changes_read_each_sample_once() -> None:
    # The planner alone (items named, never read): random layouts (ranks, workers, shuffle_buffer), each left
    # after its slots read a random number of items, up to four changes in the epochs in progress.
    import itertools
    import random

    import numpy as np

    from clip.data.handover import Handover, SlotLayout, SlotStreams, needed_handovers
    from clip.data.sampling import Planner, SourceLayout

    rng = random.Random(0)
    for trial in range(40):
        sizes = np.array([rng.randint(1, 7) for _ in range(rng.randint(1, 6))], dtype=np.int64)
        planner = Planner((SourceLayout(rng.randint(5, 40), rng.choice([0.5, 1.0, 2.0])),
                           SourceLayout(int(sizes.sum()), rng.choice([0.5, 1.0, 2.0]), sizes)), seed=trial,
                          world_size=1, workers_per_rank=1)
        sources, total = [_RowItems(), _ShardItems()], planner.samples_per_pass
        layouts = []
        for _ in range(5):  # no more slots than samples in an epoch (the loader refuses that)
            world_size = rng.randint(1, min(4, total))
            layouts.append(SlotLayout(world_size, rng.randint(1, max(1, min(3, total // world_size))), rng.randint(1, 6)))
        chain, read, starts = (), [], [(0, 0)] * layouts[0].slots
        for layout, following in itertools.pairwise(layouts):
            streams, positions = SlotStreams(sources, planner, layout, chain), []
            for slot, (epoch, offset) in enumerate(starts):
                steps = rng.randint(0, total)
                while steps:
                    length, items = streams.epoch_stream(slot, epoch, offset)
                    taken = list(itertools.islice(items, steps))
                    read += [(epoch, item) for item in taken]
                    steps, offset = steps - len(taken), offset + len(taken)
                    if offset == length:
                        epoch, offset = epoch + 1, 0
                positions.append((epoch, offset))
            handover = Handover(layout, tuple(positions))
            chain = needed_handovers(chain + (handover,), handover.first_epoch)
            starts = [(handover.first_epoch, 0)] * following.slots
        streams, end = SlotStreams(sources, planner, layouts[-1], chain), max(e for e, _ in read or [(0, 0)]) + 2
        for slot, (first, _) in enumerate(starts):
            for epoch in range(first, end):
                length, items = streams.epoch_stream(slot, epoch, 0)
                items = list(items)
                assert len(items) == length
                read += [(epoch, item) for item in items]
        reference = SlotStreams(sources, planner, SlotLayout(1, 1, 1))
        for epoch in range(end):
            expected = Counter(reference.epoch_stream(0, epoch, 0)[1])
            assert Counter(item for e, item in read if e == epoch) == expected, (trial, epoch)


def test_stream_lengths_from_sizes_match_the_plans() -> None:
    """lengths() sizes the old slots' remainders without planning; it must rotate the larger shares over
    sources and epochs exactly as Planner.plan does, or a transition would skip or repeat samples."""
    from clip.data.handover import SlotLayout, SlotStreams
    from clip.data.sampling import Planner, SourceLayout

    # shares of 7 over 3 slots are 2, 2, 3; of 10, 3, 3, 4: the slots' totals differ, and move with the epoch
    planner = Planner((SourceLayout(7, 1.0), SourceLayout(20, 0.5)), seed=0, world_size=3, workers_per_rank=1)
    streams = SlotStreams([], planner, SlotLayout(3, 1, 4))
    for epoch in range(4):
        expected = [len(planner.plan(epoch, rank, 0)) for rank in range(3)]
        assert streams.lengths(0, epoch).tolist() == expected, epoch


def test_a_handover_state_must_record_one_position_per_slot() -> None:
    from clip.data.handover import Handover

    state = {"world_size": 2, "workers": 2, "shuffle_buffer": 8, "positions": [[0, 3], [0, 4], [1, 0]]}
    with pytest.raises(ValueError, match="handover of 4 slots records 3 positions"):
        Handover.from_state(state)
    state["positions"].append([0, 1])
    assert Handover.from_state(state).to_state() == state


def test_resampled_new_slots_continue_at_the_old_slots_average_progress() -> None:
    from clip.data.handover import resampled_positions
    from clip.data.sampling import Planner, SourceLayout

    def planner(world_size: int) -> Planner:
        return Planner((SourceLayout(100, 1.0),), seed=0, world_size=world_size, workers_per_rank=1,
                       resampled=True, epoch_samples=40)

    # old slots (20 samples per epoch each) at 1.0 and 2.5 epochs: on average 1.75 epochs
    positions = resampled_positions([(1, 0), (2, 10)], [0, 1], planner(2), planner(4), [0, 1, 2, 3])
    assert positions == [(1, 7)] * 4  # three quarters of 10 samples per slot per epoch


@pytest.mark.parametrize("change", ["2->1 workers", "2->3 ranks"])
def test_each_epochs_counts_summed_over_the_ranks_stay_whole_across_the_layout_change(tmp_path: Path, change) -> None:
    # Rank 1 had finished epoch 1 when rank 0 had not. Under 2 ranks of 1 worker each rank resumes from its own
    # state, and rank 1's counts of epoch 1 go back into the epoch the new slots complete (`EpochCounts.reopen`);
    # under 3 ranks rank 0 takes the saved ranks' sums
    sources = mixed_sources(tmp_path)
    before, (world_size, workers) = LAYOUT_CHANGES[change]
    _, states = phase(sources, before, None, batches=BATCHES[before[0]])
    assert [min(epoch for epoch, _ in state["positions"]) for state in states] == [1, 2]
    reports = []
    for rank in range(world_size):
        data = run(sources, world_size, workers, rank, to_resume(states, rank, world_size))
        take(data, 36 // world_size)  # every rank past epoch 3
        reports.append(data.rank_report())
        data.close()
    for epoch in (1, 2, 3):
        for name, samples in (("rows", 26), ("shards", 8)):
            assert sum(r["finished_epochs"][epoch][name]["samples"] for r in reports) == samples, (epoch, name)


def test_resampled_slot_lengths_from_sizes_match_the_plans() -> None:
    # 41 samples over 3 slots are shares of 13, 14 and 14; the shorter one moves with the epoch as in Planner.plan,
    # so old slots' progress is measured against the lengths their plans had
    from clip.data.handover import _resampled_length
    from clip.data.sampling import Planner, SourceLayout

    planner = Planner((SourceLayout(100, 1.0),), seed=0, world_size=3, workers_per_rank=1, resampled=True,
                      epoch_samples=41)
    for epoch in range(3):
        expected = [len(planner.plan(epoch, slot, 0)) for slot in range(3)]
        assert [_resampled_length(planner, slot, epoch) for slot in range(3)] == expected, epoch


def test_a_rank_other_than_the_saved_one_names_only_the_settings_that_changed(tmp_path: Path, caplog) -> None:
    # Every rank of the new world size loads rank 0's state: its own rank differing is no change to report
    source = SourceConfig(kind="shards", path=write_shards(tmp_path, 20, 5), name="s")
    state = build([source], batch_size=4).state_dict()
    data = build([source], batch_size=4, rank=1, world_size=2)
    with caplog.at_level(logging.INFO, logger="clip.data"):
        data.load_state_dict(data_state_for_other_world_size([state], 1))
    assert "(world_size changed); continuing" in caplog.text
