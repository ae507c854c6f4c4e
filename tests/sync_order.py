"""Records the order of a module's fsyncs and renames: a file replaced whole must be on the disk before its rename
(a power cut could otherwise leave an empty or torn file under the final name). Linux only (names descriptors
through /proc)."""

from __future__ import annotations

import os


def record_syncs_and_renames(monkeypatch, os_module=os) -> list[tuple]:
    """Patches `os_module`'s fsync and replace; returns the list that each call appends to:
    ("sync", path, size at the sync) and ("rename", source, destination)."""
    events: list[tuple] = []
    real_fsync, real_replace = os_module.fsync, os_module.replace

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("rename", os.fspath(source), os.fspath(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os_module, "fsync", fsync)
    monkeypatch.setattr(os_module, "replace", replace)
    return events
