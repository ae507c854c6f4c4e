"""Starting several gloo ranks inside a test: a free port to meet on, and ranks started with a deadline; and
another process holding a run directory's lock."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from clip import run_lock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The ranks are forked from a fork server that has imported torch, the library and the tests' workers once.
# Started with "spawn", every rank imported them itself: about 5 s of CPU per rank, most of the distributed
# tests' time on two cores. A fork of a process that has only imported modules is as fresh as a new one (no
# threads, no process group, no patches: a worker's patches die with its fork).
# clip.preprocess (torchvision) too: the trainer imports it at its first evaluation, seconds in every rank.
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "clip.train", "clip.evaluation.zeroshot", "clip.preprocess",
                       "test_train_loop"]


def _in_callers_environment(rank: int, environment: dict, cwd: str, worker, *args) -> None:
    # The fork server froze the environment and working directory of the test that started it; a rank takes
    # those of the test that starts it, as a spawned one would.
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    worker(rank, *args)


def spawn_ranks(worker, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """mp.spawn(worker, args) with a deadline: ranks whose collectives never pair up would otherwise hang
    the suite. A rank that fails raises here, as with mp.spawn(join=True)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
    context = mp.start_processes(_in_callers_environment, args=(dict(os.environ), os.getcwd(), worker, *args),
                                 nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout_s:.0f} s")


# clip.run_lock loaded from its file, without the package: it needs only the standard library, and importing the
# package imports torch (seconds per process, most of these tests' time)
_LOAD_RUN_LOCK = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('run_lock', {run_lock.__file__!r})\n"
    "run_lock = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(run_lock)\n"
)

HOLD_LOCK = """
with run_lock.locked_run_directory(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()  # the test's "release" line, or end of input
"""


def run_lock_command(script: str, run_dir: Path) -> list[str]:
    """The command that runs `script` in a new interpreter with `run_lock` (clip.run_lock) and `sys` imported and
    `run_dir` as sys.argv[1]."""
    return [sys.executable, "-c", _LOAD_RUN_LOCK + script, str(run_dir)]


@contextlib.contextmanager
def lock_held_by_another_process(run_dir: Path) -> Iterator[int]:
    """Another process holds `run_dir`'s lock for the block (a POSIX lock never conflicts with its own
    process's); yields its pid."""
    holder = subprocess.Popen(run_lock_command(HOLD_LOCK, run_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        # A line, not only end of input: a process forked meanwhile (a data loader worker, say) inherits this pipe's
        # writing end, and the holder would see no end of input until that process exited as well
        with contextlib.suppress(BrokenPipeError):  # the holder is gone already (close flushes the line again)
            holder.stdin.write("release\n")
            holder.stdin.flush()
        with contextlib.suppress(BrokenPipeError):
            holder.stdin.close()
        holder.wait(timeout=60)


def _send_outcome(sending, function, args) -> None:
    try:
        outcome = ("returned", function(*args))
    except BaseException:  # noqa: BLE001  (whatever it was goes back to the test, as its message)
        outcome = ("raised", traceback.format_exc())
    sending.send(outcome)


def run_in_fork(function, *args, timeout_s: float = 240.0):
    """`function(*args)`'s result, computed in a fork of this process, which is killed after `timeout_s`: for the
    tests whose bug was a stall (hours in one regular expression or loop, which no thread can interrupt), and for
    process-wide limits (setrlimit) a test must not leave behind. A fork has torch and the library imported
    already, where a new interpreter spent seconds importing them. An exception in it fails the test with its
    traceback."""
    name = getattr(function, "__name__", repr(function))
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_send_outcome, args=(sending, function, args), daemon=True)
    process.start()
    sending.close()
    try:
        if not receiving.poll(timeout_s):
            pytest.fail(f"{name} did not finish within {timeout_s:.0f} s")
        kind, value = receiving.recv()
    except EOFError:
        pytest.fail(f"the fork running {name} died without an answer")
    finally:
        process.kill()
        process.join()
        receiving.close()
    if kind == "raised":
        pytest.fail(f"{name} raised:\n{value}")
    return value
