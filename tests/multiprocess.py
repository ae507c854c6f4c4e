"""Starting several gloo ranks inside a test: a free port to meet on, and mp.spawn with a deadline."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(worker, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """mp.spawn(worker, args) with a deadline: ranks whose collectives never pair up would otherwise hang
    the suite. A rank that fails raises here, as with mp.spawn(join=True)."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout_s:.0f} s")
