"""One run per run directory at a time: rank 0 holds an exclusive lock on RUN_DIR/.lock while the run lives.

Two runs in one directory (a job submitted twice, or started again by hand while the first still drains)
resume from the same checkpoint, write the same metrics twice, and the second one's start-up removes the
first one's half-written checkpoint as a leftover. The lock is flock(2)'s: the kernel releases it when the
holder's process ends however it ends (kill -9 included), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def locked_run_directory(run_dir: Path) -> Iterator[None]:
    """Creates `run_dir` if needed and holds its lock until the block ends; raises RunDirectoryInUse, naming
    the holder, when another process has it. On a file system without locks (some network mounts), warns and
    goes on unlocked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    with open(path, "a+", encoding="utf-8") as file:
        if fcntl is None:
            log.warning("cannot lock %s on this platform: nothing stops a second run from using it at once", run_dir)
            yield
            return
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that has not written its name yet"
            raise RunDirectoryInUse(
                f"{run_dir} is in use by another run ({holder}); wait for it to end, or use another --output-dir"
            ) from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP: a mount without lock support
            log.warning("cannot lock %s (%s): nothing stops a second run from using it at once", path, error)
            yield
            return
        # Whom a refused run names: the lock's holder, not whoever last wrote the file
        file.truncate(0)
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        yield  # closing the file releases the lock
