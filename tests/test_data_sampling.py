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
