"""One run per run directory at a time: rank 0 holds an exclusive lock on RUN_DIR/.lock while the run lives.

Two runs in one directory (a job submitted twice, or started again by hand while the first still drains)
resume from the same checkpoint, write the same metrics twice, and the second one's start-up removes the
first one's half-written checkpoint as a leftover. The lock is a POSIX record lock (lockf): the kernel
releases it when the process that took it ends, however it ends (kill -9 included), and its forked children
(the data loader's workers, which may outlive it by seconds) do not inherit it, as they would flock's. It is
also the kind network file systems implement (NFS through its lock manager).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


# The run directories this process holds, by (device, inode) of their folder. A POSIX lock belongs to a
# process, so the kernel never refuses a second train() of the same process (a notebook's thread), and that
# one's end, closing the file, would release the first one's lock: the process keeps its own account.
_HELD_HERE: set[tuple[int, int]] = set()
_HELD_HERE_GUARD = threading.Lock()


@contextlib.contextmanager
def locked_run_directory(run_dir: Path) -> Iterator[None]:
    """Creates `run_dir` if needed and holds its lock until the block ends; raises RunDirectoryInUse, naming
    the holder, when another process or another run of this one has it. On a file system without locks
    (some network mounts), warns and goes on unlocked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir.stat()
    key = (folder.st_dev, folder.st_ino)
    with _HELD_HERE_GUARD:
        if key in _HELD_HERE:
            raise RunDirectoryInUse(f"{run_dir} is in use by another run of this process (pid {os.getpid()}); "
                                    f"wait for it to end, or use another --output-dir")
        _HELD_HERE.add(key)
    try:
        with open(run_dir / LOCK_NAME, "a+", encoding="utf-8", errors="replace") as file:
            if _try_lock(file, run_dir / LOCK_NAME):
                # Whom a refused run names: the lock's holder, not whoever last wrote the file
                file.truncate(0)
                file.write(f"host {socket.gethostname()}, pid {os.getpid()}, "
                           f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                file.flush()
            yield  # closing the file releases the lock
    finally:
        with _HELD_HERE_GUARD:
            _HELD_HERE.discard(key)


def _try_lock(file: IO[str], path: Path) -> bool:
    """True once locked; False (with a warning) where locks are not available; RunDirectoryInUse if held."""
    if fcntl is None:
        log.warning("cannot lock %s on this platform: nothing stops a second run from using it at once", path)
        return False
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: a mount without locks
            log.warning("cannot lock %s (%s): nothing stops a second run from using it at once", path, error)
            return False
    file.seek(0)
    holder = file.read().strip() or "a process that has not written its name yet"
    # A lock held from another host may outlive that host: a network file system keeps a failed node's locks
    # until it comes back (NFSv3's lock manager) or its lease runs out, and a requeued job was refused for good
    # with no word of what to do. A new file is a new lock: deleting the old one frees the directory.
    elsewhere = holder.startswith("host ") and not holder.startswith(f"host {socket.gethostname()},")
    dead_node = (f"; if that host is down (its process cannot be running), delete {path} and start again"
                 if elsewhere else "")
    raise RunDirectoryInUse(
        f"{path.parent} is in use by another run ({holder}); wait for it to end, or use another --output-dir"
        f"{dead_node}"
    )
