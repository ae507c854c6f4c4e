"""`first_in_chain`: the exception an error was raised from or while handling, found by what it is. A failure
deep in torch reaches the library wrapped (torch.save reports a full disk as an "enforce fail" RuntimeError
raised from the OSError), or as the context of another error raised while it propagated."""

from __future__ import annotations

from collections.abc import Callable


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
