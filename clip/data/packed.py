"""Many strings in two numpy arrays: one byte buffer and the offsets into it.

A Python list of ten million `str` objects is ten million refcounted objects. DataLoader workers are forked,
and every access to a list item bumps its refcount, which writes to the page holding it: over an epoch each
worker ends up with a private copy of the whole list (copy-on-write turns into copy). Two numpy arrays are
two objects; reading them never writes, so the forked workers keep sharing the parent's pages.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np


class PackedStrings:
    """An immutable sequence of byte strings stored as `buffer[offsets[i]:offsets[i + 1]]`."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(buffer):
            raise ValueError("offsets must start at 0 and end at the buffer's length")
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def from_bytes(cls, items: Iterable[bytes]) -> PackedStrings:
        builder = PackedStringsBuilder()
        for item in items:
            builder.append(item)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        index %= len(self)
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


class PackedStringsBuilder:
    """Appends byte strings into growing buffers, without a Python object per string."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offsets = array("q", [0])

    def append(self, item: bytes) -> None:
        self._buffer += item
        self._offsets.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def build(self) -> PackedStrings:
        buffer = np.frombuffer(bytes(self._buffer), dtype=np.uint8)
        return PackedStrings(buffer, np.frombuffer(self._offsets.tobytes(), dtype=np.int64).copy())
