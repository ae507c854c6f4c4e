"""Random access into a keyed pseudo-random permutation of range(size), in memory O(items asked for).

Why: the data planner hands each worker a contiguous slice [first, stop) of a per-epoch permutation of a
manifest's rows. Materialising `np.random.default_rng(key).permutation(size)` costs 8 bytes per row in
every worker, every epoch (3.2 GB for 400M rows), although a worker needs only its slice. Here the
permutation is a function, position -> item, evaluated only at the positions asked for.

How:
1. A balanced Feistel network permutes [0, 2^(2h)): a number is split into two h-bit halves and each round
   maps (left, right) -> (right, left ^ F(right)). Whatever the round function F is, a round is undone by
   (left, right) -> (right ^ F(left), left), so the whole network is a bijection of [0, 2^(2h)). F is a
   keyed 64-bit mixing hash cut to h bits, with one round key per round derived from `key`.
2. Cycle-walking turns that bijection of [0, 2^(2h)) into one of range(size), size <= 2^(2h): an item that
   lands outside range(size) is sent through the network again until it lands inside. The orbit of a
   position p < size under a bijection returns to p itself, so the walk always ends; and it is a bijection
   because walking backwards (through the inverse network) from the result reaches p as the first value
   below size, i.e. distinct positions can never end on the same item.
Everything is vectorised over positions with numpy uint64 arithmetic, which wraps modulo 2^64 (the hash
relies on that); halves are masked to h bits after every round function.

Note that the permutation is pseudo-random, not uniform over all size! orders: a Feistel network with few
rounds reaches only a subset of them. It is a fixed function of (size, key), so every worker that asks for
the same (size, key) sees pieces of one and the same order.
"""

from __future__ import annotations

import operator

import numpy as np

# Luby and Rackoff: four rounds with independent random round functions already give a pseudo-random
# permutation; eight leave a margin for a cheap hash as the round function and for tiny half widths.
_ROUNDS = 8

# Positions evaluated per vectorised pass: bounds the temporaries (a few arrays of 8 bytes per position)
# whatever the range's length; 2^16 positions (512 KiB per array) stay within the CPU caches.
_BLOCK = 1 << 16

# splitmix64's output function (Steele, Lea and Flood 2014; constants by Vigna): a bijection of 64-bit
# words whose every output bit depends on every input bit, so its low h bits make a good round function.
_MIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_MIX_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


def permuted_range(size: int, first: int, stop: int, key: tuple[int, ...]) -> np.ndarray:
    """Items [first, stop) of a pseudo-random permutation of range(size) chosen by `key` (non-negative ints);
    int64 array of length stop - first, 0 <= first <= stop <= size. Memory and time O(stop - first)
    (not O(size)); the same key always gives the same permutation; every call with the same (size, key)
    describes one and the same permutation, so disjoint ranges never share an item."""
    size, first, stop, key = _checked(size, first, stop, key)
    items = np.zeros(stop - first, dtype=np.int64)
    if size <= 1:  # range(0) has no positions to ask for; range(1) has one order, [0]
        return items
    # The smallest h with 2^(2h) >= size, so that on average fewer than 4 passes per item land in range.
    half_bits = ((size - 1).bit_length() + 1) // 2
    round_keys = _round_keys(key)
    for begin in range(first, stop, _BLOCK):
        end = min(begin + _BLOCK, stop)
        positions = np.arange(begin, end, dtype=np.uint64)
        items[begin - first : end - first] = _cycle_walk(positions, size, half_bits, round_keys)
    return items


def _checked(size: int, first: int, stop: int, key: tuple[int, ...]) -> tuple[int, int, int, tuple[int, ...]]:
    """The arguments as Python ints (numpy integers accepted), or a ValueError that says what is wrong."""
    size, first, stop = operator.index(size), operator.index(first), operator.index(stop)
    key = tuple(operator.index(part) for part in key)
    if not 0 <= size < 2**63:  # items are returned as int64
        raise ValueError(f"permuted_range: size must be in [0, 2**63), got {size}")
    if not 0 <= first <= stop <= size:
        raise ValueError(
            f"permuted_range: need 0 <= first <= stop <= size, got first={first}, stop={stop}, size={size}"
        )
    if any(part < 0 for part in key):
        raise ValueError(f"permuted_range: key parts must be non-negative ints, got {key}")
    return size, first, stop, key


def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    """One uint64 round key per Feistel round, from numpy's SeedSequence. SeedSequence reads each int as
    little-endian 32-bit words and pads short input with zero words, so (0,) and (0, 0), or (2**32,) and
    (0, 1), would seed alike; it is fed a self-delimiting encoding instead (the number of parts, then each
    part's word count and words), which no other key's encoding equals or extends by zeros."""
    words = [len(key)]
    for part in key:
        part_words = [(part >> 32 * index) & 0xFFFFFFFF for index in range(max(1, (part.bit_length() + 31) // 32))]
        words += [len(part_words), *part_words]
    return np.random.SeedSequence(words).generate_state(_ROUNDS, dtype=np.uint64)


def _cycle_walk(positions: np.ndarray, size: int, half_bits: int, round_keys: np.ndarray) -> np.ndarray:
    """The Feistel network applied to each position until the result is below `size` (see the module
    docstring for why this is a bijection of range(size)). Only the items still out of range are walked
    again; with 2^(2h) < 4 * size each pass leaves fewer than 3/4 of them, so the passes are few."""
    items = _feistel(positions, half_bits, round_keys)
    limit = np.uint64(size)
    outside = np.flatnonzero(items >= limit)
    while outside.size:
        walked = _feistel(items[outside], half_bits, round_keys)
        items[outside] = walked
        outside = outside[walked >= limit]
    return items.astype(np.int64)


def _feistel(values: np.ndarray, half_bits: int, round_keys: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on 2h-bit numbers (uint64 [n] in, uint64 [n] out, both < 2^(2h))."""
    shift, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    left, right = values >> shift, values & mask
    for round_key in round_keys:
        scrambled = _mix64(right + round_key)  # uint64 addition wraps modulo 2^64, as intended
        scrambled &= mask  # keep h bits, so the new right half stays an h-bit number
        scrambled ^= left
        left, right = right, scrambled
    return (left << shift) | right


def _mix64(words: np.ndarray) -> np.ndarray:
    """splitmix64's output function, in place on a fresh uint64 array (products wrap modulo 2^64)."""
    words ^= words >> _MIX_SHIFTS[0]
    words *= _MIX_MULTIPLIERS[0]
    words ^= words >> _MIX_SHIFTS[1]
    words *= _MIX_MULTIPLIERS[1]
    words ^= words >> _MIX_SHIFTS[2]
    return words
