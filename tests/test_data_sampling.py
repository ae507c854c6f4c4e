"""The epoch planner (clip/data/sampling.py): exactly-once splits, weights, resampling, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clip.data.sampling import Planner, SourceLayout, split_range


def planned_samples(planner: Planner, epoch: int) -> Counter:
    """(source, sample id) -> times planned in `epoch` over every slot; shard samples are (shard, offset)."""
    seen: Counter = Counter()
    for rank in range(planner.world_size):
        for worker in range(planner.workers_per_rank):
            plan = planner.plan(epoch, rank, worker)
            for source, rows in plan.rows.items():
                seen.update((source, int(row)) for row in rows)
            for source, segments in plan.segments.items():
                seen.update((source, (shard, i)) for shard, start, stop in segments for i in range(start, stop))
            counts = Counter(plan.labels.tolist())
            assert counts.get(0, 0) + counts.get(1, 0) == len(plan)
    return seen


def shard_layout(sizes: list[int], weight: float = 1.0) -> SourceLayout:
    return SourceLayout(sum(sizes), weight, np.array(sizes, dtype=np.int64))


def test_split_range_covers_everything_evenly() -> None:
    ranges = [split_range(37, 4, i) for i in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 37
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert {stop - start for start, stop in ranges} <= {9, 10}


@pytest.mark.parametrize("world_size, workers", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_every_sample_exactly_once_per_epoch(world_size: int, workers: int) -> None:
    sizes = [5, 0, 7, 3, 6, 5, 4]  # uneven shards, one empty
    sources = (SourceLayout(23, 1.0), shard_layout(sizes))
    planner = Planner(sources, seed=3, world_size=world_size, workers_per_rank=workers)
    expected = Counter({(0, i): 1 for i in range(23)}) + Counter(
        {(1, (shard, i)): 1 for shard, size in enumerate(sizes) for i in range(size)}
    )
    for epoch in range(3):
        assert planned_samples(planner, epoch) == expected
    # slots get the same number of samples per source, up to one
    lengths = [len(planner.plan(0, r, w)) for r in range(world_size) for w in range(workers)]
    assert max(lengths) - min(lengths) <= 2


def test_epochs_differ_and_plans_are_deterministic() -> None:
    make = lambda seed: Planner((SourceLayout(50, 1.0),), seed=seed, world_size=2, workers_per_rank=2)  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    assert np.array_equal(a.plan(0, 1, 1).rows[0], b.plan(0, 1, 1).rows[0])
    assert not np.array_equal(a.plan(0, 1, 1).rows[0], a.plan(1, 1, 1).rows[0])
    assert not np.array_equal(a.plan(0, 1, 1).rows[0], c.plan(0, 1, 1).rows[0])
    assert np.array_equal(a.window_permutation(2, 1, 0, 5, 8), b.window_permutation(2, 1, 0, 5, 8))
    assert sorted(a.window_permutation(2, 1, 0, 5, 8)) == list(range(8))


def test_weights_repeat_and_subsample() -> None:
    planner = Planner(
        (SourceLayout(10, 2.0), shard_layout([4, 4, 4], weight=0.5)), seed=0, world_size=1, workers_per_rank=2
    )
    assert planner.samples_per_pass == 26
    epoch0, epoch1 = planned_samples(planner, 0), planned_samples(planner, 1)
    assert all(epoch0[(0, i)] == 2 for i in range(10))  # weight 2: every row twice per epoch
    halves = [{key for key in seen if key[0] == 1} for seen in (epoch0, epoch1)]
    assert len(halves[0]) == len(halves[1]) == 6  # weight 0.5: half of the 12 shard samples ...
    assert not halves[0] & halves[1]  # ... and the other half in the next epoch


def test_resampled_follows_weights() -> None:
    planner = Planner(
        (SourceLayout(100, 3.0), shard_layout([10] * 10, weight=1.0)),
        seed=0, world_size=2, workers_per_rank=2, resampled=True, epoch_samples=20_000,
    )
    counts: Counter = Counter()
    for rank in range(2):
        for worker in range(2):
            plan = planner.plan(0, rank, worker)
            counts.update(plan.labels.tolist())
            assert sum(stop - start for _, start, stop in plan.segments[1]) == np.count_nonzero(plan.labels == 1)
            assert len(plan.rows[0]) == np.count_nonzero(plan.labels == 0)
    assert sum(counts.values()) == 20_000
    assert counts[0] / 20_000 == pytest.approx(0.75, abs=0.02)
    # with replacement: rows repeat within an epoch
    rows = planner.plan(0, 0, 0).rows[0]
    assert len(np.unique(rows)) < len(rows)
    assert set(rows.tolist()) == set(range(100))  # and every row can be drawn, the last one too


def test_resampled_sources_of_equal_weight_are_drawn_in_proportion_to_their_sizes() -> None:
    # weight is per sample: 100 rows and 300 rows of weight 1 are a quarter and three quarters of the draws
    planner = Planner((SourceLayout(100, 1.0), SourceLayout(300, 1.0)), seed=0, world_size=1, workers_per_rank=1,
                      resampled=True, epoch_samples=8000)
    labels = planner.plan(0, 0, 0).labels
    assert np.count_nonzero(labels == 0) / len(labels) == pytest.approx(0.25, abs=0.03)


def test_resampled_shard_draws_reach_every_offset_when_slots_need_less_than_a_shard() -> None:
    # 4 slots share 40 samples per epoch: each takes 10 samples of a 100-sample shard. Every offset in the
    # shards must be drawn about equally often, not only the first 10.
    planner = Planner((shard_layout([100] * 10, weight=1.0),), seed=0, world_size=2, workers_per_rank=2,
                      resampled=True, epoch_samples=40)
    offsets: Counter = Counter()
    for epoch in range(300):
        for rank in range(2):
            for worker in range(2):
                for _, start, stop in planner.plan(epoch, rank, worker).segments[0]:
                    offsets.update(range(start, stop))
    per_decile = [sum(offsets[o] for o in range(d * 10, d * 10 + 10)) for d in range(10)]
    assert sum(per_decile) == 300 * 40
    assert min(per_decile) > 0.6 * max(per_decile), per_decile


def test_resampled_shards_of_unequal_sizes_have_every_sample_read_equally_often() -> None:
    # A draw reads a whole shard: drawn by size, the 9-sample shard would come up 9 times as often as the
    # 1-sample one, and each of its samples would be read 9 times as often as that one's
    planner = Planner((shard_layout([1, 0, 9]),), seed=0, world_size=1, workers_per_rank=1, resampled=True,
                      epoch_samples=100)
    reads: Counter = Counter()
    for epoch in range(50):
        for shard, start, stop in planner.plan(epoch, 0, 0).segments[0]:
            reads.update((shard, i) for i in range(start, stop))
    assert sum(reads.values()) == 50 * 100 and len(reads) == 10  # the empty shard is never drawn
    assert 0.7 < reads[(0, 0)] / (50 * 100 / 10) < 1.3, reads



def test_resampled_shares_smaller_than_a_shard_read_a_short_shards_samples_no_more_often() -> None:
    # 4 slots of 5 samples over nine 100-sample shards and one of 2: a share that began at a shard's start read
    # the short shard whole whenever it was drawn (1 in 10) and a long one only in part, so each of its two
    # samples was read about 21 times as often as a long shard's
    sizes = [100] * 9 + [2]
    planner = Planner((shard_layout(sizes),), seed=0, world_size=2, workers_per_rank=2, resampled=True,
                      epoch_samples=20)
    reads: Counter = Counter()
    epochs = 2000
    for epoch in range(epochs):
        for rank in range(2):
            for worker in range(2):
                for shard, start, stop in planner.plan(epoch, rank, worker).segments[0]:
                    reads[shard] += stop - start
    expected = epochs * 20 / sum(sizes)  # reads of each sample
    per_sample = [reads[shard] / size / expected for shard, size in enumerate(sizes)]
    assert sum(reads.values()) == epochs * 20
    assert all(0.75 < ratio < 1.25 for ratio in per_sample), per_sample

def test_plans_are_pinned_because_saved_data_positions_index_them() -> None:
    """A checkpoint's data position counts items of these plans, stamped with PLAN_VERSION. If this test
    fails after a deliberate change of what a seed plans (seeds, purposes, rotation, interleaving, window
    orders), bump sampling.PLAN_VERSION, so that old positions restart their epoch, and update the values."""
    sources = (SourceLayout(12, 1.0), shard_layout([4, 0, 6]))
    planner = Planner(sources, seed=5, world_size=2, workers_per_rank=1)
    plan = planner.plan(1, 1, 0)
    assert plan.labels.tolist() == [1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0]
    assert plan.rows[0].tolist() == [8, 4, 0, 6, 1, 10]
    assert plan.segments[1] == [(2, 1, 6)]
    assert planner.window_permutation(1, 1, 0, 2, 6).tolist() == [1, 3, 4, 2, 0, 5]
    resampled = Planner(sources, seed=5, world_size=2, workers_per_rank=1, resampled=True, epoch_samples=9)
    plan = resampled.plan(1, 1, 0)
    assert plan.labels.tolist() == [1, 1, 0, 0]
    assert plan.rows[0].tolist() == [3, 1] and plan.segments[1] == [(2, 4, 6)]


@pytest.mark.parametrize("resampled", [False, True])
def test_larger_shares_rotate_over_sources_and_epochs(resampled: bool) -> None:
    """7 samples over 3 slots are shares of 2, 2 and 3. Three sources of 7 rotate the 3 over the slots, so
    every slot plans 7 per epoch (ranks stay in step); one source rotates it over epochs, so over 3 epochs
    every slot plans 7 samples."""
    three = Planner((SourceLayout(7, 1.0),) * 3, seed=0, world_size=3, workers_per_rank=1)
    if not resampled:
        assert [len(three.plan(0, rank, 0)) for rank in range(3)] == [7, 7, 7]
    one = Planner((SourceLayout(7, 1.0),), seed=0, world_size=3, workers_per_rank=1, resampled=resampled,
                  epoch_samples=7 if resampled else None)
    assert {len(one.plan(0, rank, 0)) for rank in range(3)} == {2, 3}
    assert [sum(len(one.plan(epoch, rank, 0)) for epoch in range(3)) for rank in range(3)] == [7, 7, 7]


def test_each_epoch_and_each_source_has_its_own_order() -> None:
    # one slot takes whole epochs, so only a new permutation per epoch (not the slot rotation) changes them
    rows = Planner((SourceLayout(50, 1.0), SourceLayout(50, 1.0)), seed=0, world_size=1, workers_per_rank=1)
    epoch0, epoch1 = rows.plan(0, 0, 0), rows.plan(1, 0, 0)
    assert not np.array_equal(epoch0.rows[0], epoch1.rows[0])
    assert not np.array_equal(epoch0.rows[0], epoch0.rows[1])  # equal sizes, yet not one shared order
    shards = Planner((shard_layout([1] * 20),), seed=0, world_size=1, workers_per_rank=1)
    assert shards.plan(0, 0, 0).segments[0] != shards.plan(1, 0, 0).segments[0]
    # weight 2: the two passes within one epoch are two different orders too
    twice = Planner((SourceLayout(50, 2.0),), seed=0, world_size=1, workers_per_rank=1).plan(0, 0, 0).rows[0]
    assert not np.array_equal(twice[:50], twice[50:])


def test_sources_are_interleaved_within_a_slot() -> None:
    planner = Planner((SourceLayout(40, 1.0), SourceLayout(40, 1.0)), seed=0, world_size=1, workers_per_rank=1)
    labels = planner.plan(0, 0, 0).labels
    assert np.count_nonzero(labels[:40] == 0) not in (0, 40)  # not one source's block after the other's
    switches = np.count_nonzero(labels[1:] != labels[:-1])
    assert switches > 20  # a random interleaving of 40 + 40 switches about 40 times


def test_interleavings_draws_and_window_orders_differ_between_epochs_and_slots() -> None:
    """Each random choice is seeded by the epoch and the slot (rank and worker): with one left out, two slots
    would interleave, draw or shuffle alike (resampled: the very same samples), or every epoch would."""
    keys = [(epoch, rank, worker) for epoch in range(2) for rank in range(2) for worker in range(2)]
    sources = (SourceLayout(40, 1.0), SourceLayout(40, 1.0))
    exact = Planner(sources, seed=0, world_size=2, workers_per_rank=2)
    assert len({tuple(exact.plan(*key).labels.tolist()) for key in keys}) == len(keys)
    resampled = Planner(sources, seed=0, world_size=2, workers_per_rank=2, resampled=True, epoch_samples=160)
    assert len({tuple(resampled.plan(*key).rows[0].tolist()) for key in keys}) == len(keys)
    windows = {tuple(exact.window_permutation(*key, window, 10).tolist()) for key in keys for window in range(2)}
    assert len(windows) == 2 * len(keys)


def test_segments_are_never_empty_and_whole_shard_draws_are_read_from_the_start() -> None:
    """An empty segment would make a worker open (and perhaps download) a shard to read nothing."""
    sizes = [5, 0, 7, 3, 0, 6]
    exact = Planner((shard_layout(sizes),), seed=1, world_size=2, workers_per_rank=2)
    for epoch in range(3):
        for rank in range(2):
            for worker in range(2):
                assert all(start < stop for _, start, stop in exact.plan(epoch, rank, worker).segments[0])
    # resampled: the first shard entered at a random sample and read to its end, the others from their starts
    resampled = Planner((shard_layout([4] * 5),), seed=1, world_size=1, workers_per_rank=1, resampled=True,
                        epoch_samples=40)
    for epoch in range(20):
        (_, first_start, first_stop), *others = resampled.plan(epoch, 0, 0).segments[0]
        assert first_stop == 4 and all((start, stop) == (0, 4) for _, start, stop in others[:-1])
        assert others[-1][1] == 0 and sum(stop - start for _, start, stop in others) + 4 - first_start == 40
    partial = Planner((shard_layout([4] * 5),), seed=1, world_size=1, workers_per_rank=1, resampled=True,
                      epoch_samples=6)
    for epoch in range(40):
        assert all(start < stop for _, start, stop in partial.plan(epoch, 0, 0).segments[0])


def test_fractional_weights_round_to_the_nearest_count() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point: truncation would plan 28 samples per epoch
    assert SourceLayout(100, 0.29).samples_per_epoch == 29
    assert SourceLayout(10, 0.26).samples_per_epoch == 3


def test_resampled_draws_past_the_count_add_no_segment() -> None:
    # Shards of 1 and 9 samples, 9 per epoch: two shards drawn at once, and after a 9 the second adds nothing
    planner = Planner((shard_layout([1, 9]),), seed=0, world_size=1, workers_per_rank=1, resampled=True,
                      epoch_samples=9)
    for epoch in range(20):
        segments = planner.plan(epoch, 0, 0).segments[0]
        assert all(start < stop for _, start, stop in segments) and sum(b - a for _, a, b in segments) == 9


def test_resampled_plans_of_several_draws_are_pinned_too() -> None:
    """See test_plans_are_pinned_because_saved_data_positions_index_them: the first shard drawn by size and
    entered at a random sample, whole shards drawn a batch at a time after it, the last cut at the count, and a
    negative seed not the same as its absolute value."""
    sources = (shard_layout([3, 5, 2]),)
    planner = Planner(sources, seed=7, world_size=1, workers_per_rank=1, resampled=True, epoch_samples=17)
    assert planner.plan(0, 0, 0).segments[0] == [(1, 1, 5), (0, 0, 3), (2, 0, 2), (0, 0, 3), (1, 0, 5)]
    negative = Planner(sources, seed=-7, world_size=1, workers_per_rank=1, resampled=True, epoch_samples=17)
    assert negative.plan(0, 0, 0).segments[0] == [(2, 0, 2), (2, 0, 2), (1, 0, 5), (0, 0, 3), (2, 0, 2), (0, 0, 3)]
    # The version these values were pinned under: new values without a new version would resume old positions
    # onto other samples, silently
    from clip.data.sampling import PLAN_VERSION

    assert PLAN_VERSION == 5


def test_an_epoch_of_exact_plans_ignores_a_resampled_epoch_size() -> None:
    planner = Planner((SourceLayout(12, 1.0),), seed=0, world_size=1, workers_per_rank=1, epoch_samples=5)
    assert planner.samples_per_pass == 12 and len(planner.plan(0, 0, 0)) == 12
