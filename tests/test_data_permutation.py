"""permuted_range: a keyed permutation of range(size) evaluated piecewise in memory O(piece).

Every key and split below is fixed, so the file is deterministic: a test that passes passes every time."""

import itertools

import numpy as np
import pytest

from clip.data import permutation
from clip.data.permutation import permuted_range


def _random_split(size: int, pieces: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """`pieces` contiguous ranges (some possibly empty) that cover range(size) in order."""
    cuts = np.sort(rng.integers(0, size + 1, size=pieces - 1)) if pieces > 1 else np.zeros(0, dtype=np.int64)
    bounds = [0, *cuts.tolist(), size]
    return list(itertools.pairwise(bounds))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 1000, 4097, 100_003])
def test_any_split_gives_the_same_permutation(size):
    key = (7, size, 1)
    whole = permuted_range(size, 0, size, key)
    assert whole.dtype == np.int64 and whole.shape == (size,)
    np.testing.assert_array_equal(np.sort(whole), np.arange(size))
    rng = np.random.default_rng(size)
    for pieces in (1, 2, 5, 17):
        ranges = _random_split(size, pieces, rng)
        joined = np.concatenate([permuted_range(size, first, stop, key) for first, stop in ranges])
        np.testing.assert_array_equal(joined, whole)


def test_an_item_does_not_depend_on_the_range_it_was_asked_in():
    size, key = 100_003, (3, 0, 1)
    whole = permuted_range(size, 0, size, key)
    rng = np.random.default_rng(0)
    for _ in range(20):
        first = int(rng.integers(0, size))
        stop = int(rng.integers(first, min(size, first + 5000) + 1))
        np.testing.assert_array_equal(permuted_range(size, first, stop, key), whole[first:stop])
    for position in (0, 1, size // 2, size - 1):
        assert permuted_range(size, position, position + 1, key)[0] == whole[position]


def test_blocks_join_seamlessly(monkeypatch):
    size, key = 10_007, (11,)
    whole = permuted_range(size, 0, size, key)
    monkeypatch.setattr(permutation, "_BLOCK", 1000)  # ten blocks, the last one partial
    np.testing.assert_array_equal(permuted_range(size, 0, size, key), whole)
    np.testing.assert_array_equal(permuted_range(size, 123, 4567, key), whole[123:4567])


def test_same_key_same_order_and_other_keys_other_orders():
    size = 1000
    orders = {}
    # (0,) / (0, 0) and (2**32,) / (0, 1) are pairs that plain SeedSequence(key) would seed alike.
    # (2**32, 1) / (0, 2**32 + 1) have the same words and part count; only the per-part word counts differ.
    keys = [(), (0,), (1,), (0, 0), (0, 1), (1, 0), (2**32,), (2**64 - 1,), (2**70,), (12345, 6, 7, 1)]
    keys += [(2**32, 1), (0, 2**32 + 1)]
    for key in keys:
        first = permuted_range(size, 0, size, key)
        np.testing.assert_array_equal(permuted_range(size, 0, size, key), first)
        orders[key] = tuple(first.tolist())
    assert len(set(orders.values())) == len(orders)
    assert all(order != tuple(range(size)) for order in orders.values())
    # numpy integers (as a planner may hold them) name the same permutation as the equal Python ints.
    np.testing.assert_array_equal(
        permuted_range(np.int64(size), np.int64(0), size, tuple(map(np.uint64, (12345, 6, 7, 1)))),
        orders[(12345, 6, 7, 1)],
    )


def test_the_permutation_is_pinned_because_saved_data_positions_index_it():
    """A checkpoint's data position is an offset into these orders; a run resumed by a version whose orders
    differ would read other samples than those it skipped. If this test fails after a deliberate change of
    the permutation (round function, key encoding, half width), bump sampling.PLAN_VERSION, so that old
    positions restart their epoch instead, and update the values."""
    assert permuted_range(10, 0, 10, (1, 2)).tolist() == [1, 2, 4, 3, 5, 7, 0, 8, 9, 6]
    assert permuted_range(100_003, 50_000, 50_008, (3, 0, 1)).tolist() == [
        97071, 69894, 48293, 60788, 92074, 58848, 39443, 67099,
    ]
    assert permuted_range(4 * 10**9, 2_123_456_789, 2_123_456_795, (1, 2, 3)).tolist() == [
        1947295754, 2776772125, 104103427, 555758365, 1769480857, 482920653,
    ]
    # A power of two, 2^(2h) itself, fills the network's range: no cycle walk, and one bit less than size's
    assert permuted_range(16, 0, 16, (1, 2)).tolist() == [14, 2, 4, 3, 5, 7, 13, 12, 9, 15, 1, 6, 8, 0, 10, 11]
    assert permuted_range(2**32, 7, 13, (1, 2)).tolist() == [
        3475386101, 2693618848, 1746111738, 636537008, 1720438103, 3744345925,
    ]


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_orders_over_many_keys_look_uniform():
    """Over 2000 keys, where item 0 lands in a size-10 permutation and which item follows the first are
    spread over all possibilities. Thresholds are far above chance (chi-square with 9 and 89 degrees of
    freedom has its 1e-9 tail near 60 and 190), yet an identity map or a rotation (by a fixed or keyed
    amount) gives values in the thousands."""
    size, keys = 10, 2000
    orders = np.stack([permuted_range(size, 0, size, (seed, 1)) for seed in range(keys)])
    slot_of_zero = np.bincount(np.argmax(orders == 0, axis=1), minlength=size)
    assert slot_of_zero.min() > 0
    assert _chi_square(slot_of_zero) < 60
    first_two = orders[:, 0] * size + orders[:, 1]  # 90 possible (first, second) pairs
    possible_pairs = [a * size + b for a in range(size) for b in range(size) if a != b]
    pair_counts = np.bincount(first_two, minlength=size * size)[possible_pairs]
    assert _chi_square(pair_counts) < 190


def test_huge_size_costs_only_the_range():
    size = 4 * 10**9  # materialising this permutation would take 32 GB
    for first in (0, 2_123_456_789, size - 1000):
        items = permuted_range(size, first, first + 1000, (1, 2, 3))
        assert items.shape == (1000,) and items.dtype == np.int64
        assert items.min() >= 0 and items.max() < size
        assert np.unique(items).size == 1000
    largest = 2**63 - 1  # 2h = 64 bits: the Feistel halves use the whole uint64
    items = permuted_range(largest, largest - 1000, largest, (5,))
    assert items.min() >= 0 and np.unique(items).size == 1000


@pytest.mark.parametrize(
    "size, first, stop, key",
    [
        (-1, 0, 0, (1,)),
        (10, 5, 4, (1,)),
        (10, 0, 11, (1,)),
        (10, -1, 3, (1,)),
        (10, 0, 3, (1, -2)),
        (10, 0, 3, (-1,)),
        (2**63, 0, 1, (1,)),
    ],
)
def test_bad_arguments_are_rejected(size, first, stop, key):
    with pytest.raises(ValueError, match="permuted_range"):
        permuted_range(size, first, stop, key)
