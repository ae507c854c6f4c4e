"""`first_in_chain`: the exception an error was raised from or while handling, found by what it is. A failure
deep in torch reaches the library wrapped (torch.save reports a full disk as an "enforce fail" RuntimeError
raised from the OSError), or as the context of another error raised while it propagated. `out_of_memory_in`: a
memory failure, which says nothing about the file being read when one occurs."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch


def first_in_chain(error: BaseException | None, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception that is `wanted` among `error` and those it was raised from (its cause, else its
    context), if any. A cycle of causes ends the search."""
    seen = set()
    while error is not None and id(error) not in seen:
        if wanted(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def out_of_memory_in(error: BaseException | None) -> BaseException | None:
    """The memory failure that `error` is or was raised from, if any: Python's MemoryError, torch's CPU
    allocator's RuntimeError ("can't allocate memory"), a device's torch.OutOfMemoryError. Like a storage error it
    says nothing about a file being read: the read may succeed with more memory free, so the file is not to be
    judged damaged (and an older checkpoint taken in its place) by it."""
    return first_in_chain(error, _is_memory_failure)


def _is_memory_failure(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    # c10's DefaultCPUAllocator raises a plain RuntimeError, not OutOfMemoryError
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def allocation_beyond(error: BaseException | None, limit: int) -> int | None:
    """The bytes torch's CPU allocator was asked for when `error` is (or was raised from) its failure to give
    more than `limit` bytes, else None. A file holds every byte of its tensors, so an allocation larger than the
    whole file is the file's damage (a size crafted or broken), not this machine's lack of memory."""
    memory = out_of_memory_in(error)
    tried = re.search(r"tried to allocate (\d+) bytes", str(memory)) if memory is not None else None
    return int(tried.group(1)) if tried is not None and int(tried.group(1)) > limit else None
