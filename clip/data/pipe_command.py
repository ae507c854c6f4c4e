"""`pipe:` shard sources: a shell command whose standard output is the shard, read as a stream.

Started in a process group of its own, so that the whole command (a pipeline, or `aws s3 cp`'s own children)
can be ended together: when its reader stops before the end (the rest of the shard is not needed), and when the
process that started it ends -- a data worker that torch's shutdown terminates because it hangs in a stalled
read (clip.data.worker_signals; Linux only: elsewhere torch's own handler ends such a worker without running
Python code), or any process's normal exit. A hung download was left running for good before, re-parented to
init and ignoring SIGTERM like the command it came from (below), one more per attempt.
"""

from __future__ import annotations

import multiprocessing.util
import os
import selectors
import signal
import subprocess
import threading
import time
from typing import IO

# How long a command may take to exit once its reader has the whole tar (its output read to the end, or the
# tar's end-of-archive marker read) before what is left of it is ended: a `tee` into a local copy finishing its
# file, a download tool's cleanup. A command that keeps running after that must not hold its worker up longer.
EXIT_WAIT_S = 10.0
TAR_BLOCK = 512

# The commands started and not yet closed, by their process id: (the id of the process that started it, the
# command), for `end_running_commands` at that process's exit. A forked data worker inherits its parent's
# entries, which are not its to end.
_running: dict[int, tuple[int, subprocess.Popen]] = {}
_exit_hooks_in: set[int] = set()  # process ids in which `end_running_commands` is registered to run at exit
# Process ids whose commands were ended: they start no more. A terminated worker's main thread, whose read
# ended as its command was killed, read on and started the next shard's command before os._exit.
_ended_in: set[int] = set()
# Held while a command is started and registered, and while the commands are ended: none starts unseen between
_starting = threading.Lock()
# Held while one command is killed and collected: by close() and by end_running_commands (another thread) alike
_ending = threading.Lock()


class PipeCommandFailed(OSError):
    """The command exited with an error status after writing its output: the shard may be cut short. `status`:
    its exit status (negative: the signal that ended it)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PipeCommand:
    """A binary stream of `command`'s standard output. `close()` after the reader has what it needs (the tar's
    end) gives the command EXIT_WAIT_S to finish, then ends what is left of its group; it raises
    PipeCommandFailed where the output was read to its end and the command then reported failure (a download
    that failed after a part of the shard). `abandon()` (the reader stops before the end) ends it at once."""

    def __init__(self, command: str, reading: str | None = None, status_meanings: dict[int, str] | None = None) -> None:
        """`reading`: what the command reads, for messages (a URL read through curl), instead of the command
        itself; `status_meanings`: what its exit statuses mean, said with a failure."""
        self.command, self.reading, self.status_meanings = command, reading, status_meanings or {}
        # The command ignores SIGINT, SIGTERM and SIGUSR1, as the data workers do (worker_signals.py), and so does
        # what it runs: a scheduler signals every process of the job, a Ctrl-C the terminal's process group, and a
        # command that died of it ended its shard there -- the rest counted as unreadable in the batch of the
        # step before the checkpoint, and never read again.
        from .worker_signals import job_signals_held  # (which imports this module)

        self.process: subprocess.Popen | None = None
        try:
            # A stop's exception (the trainer's handler raises to stop one process in its wait for data) raised
            # inside Popen, after the fork, left the command running and in no table: its handler runs after
            # the command is entered in the table, and the command is then ended
            with job_signals_held(), _starting:
                if os.getpid() in _ended_in:
                    raise OSError(f"not starting the pipe: command {command!r}: this process is ending")
                self.process = subprocess.Popen(["/bin/sh", "-c", f"trap '' INT TERM USR1; {command}"],
                                                stdout=subprocess.PIPE, start_new_session=True)
                _running[self.process.pid] = (os.getpid(), self.process)
        except BaseException:
            if self.process is not None:
                self.abandon()
            raise
        _end_running_commands_at_exit()
        self.read_to_the_end = False
        self.first_read = True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data = self.process.stdout.read()
            self.read_to_the_end = True
            return data
        # What has arrived, up to `size`: waiting for all of `size` (tarfile asks for 10 KB records) never ended
        # for a command that keeps its output open after the tar's end. But a whole tar block first: tarfile tells
        # gzip from tar by that one read (two bytes alone read a .tar.gz as a broken tar)
        data = self.process.stdout.read1(size)
        wanted = min(size, TAR_BLOCK) if self.first_read else 0
        self.first_read = False
        while data and len(data) < wanted:
            more = self.process.stdout.read1(wanted - len(data))
            if not more:
                break
            data += more
        if not data and size != 0:
            self.read_to_the_end = True
        return data

    def close(self) -> None:
        if self.process.stdout.closed:
            return
        deadline = time.monotonic() + EXIT_WAIT_S
        _read_on_until_the_end(self.process.stdout, deadline)
        self._let_go()
        exited = _exited_within(self.process, deadline - time.monotonic())
        _end(self.process)  # what it left running in its group (a background child), and its status
        _forget(self.process)
        status = self.process.returncode
        if exited and self.read_to_the_end and status != 0:
            how = f"was ended by signal {-status}" if status < 0 else f"exited with status {status}"
            meaning = f" ({self.status_meanings[status]})" if status in self.status_meanings else ""
            what = f"the pipe: command {self.command!r}" if self.reading is None else \
                f"{self.command.split()[0]} reading {self.reading}"
            raise PipeCommandFailed(f"{what} {how}{meaning} after its output ended", status)

    def abandon(self) -> None:
        """Close, ending the command at once: the rest of its output is not needed. Also after a close() that a
        stop's exception cut short while it waited for the command."""
        self._let_go()
        if self.process.returncode is None or _running.get(self.process.pid, (None, None))[1] is self.process:
            _end(self.process)
            _forget(self.process)

    def _let_go(self) -> bool:
        """Close this end of the pipe (a command still writing then gets SIGPIPE); False if it was closed. The
        command stays in the table until it is collected: a worker terminated meanwhile ends it."""
        if self.process.stdout.closed:
            return False
        self.process.stdout.close()
        return True

    def __enter__(self) -> PipeCommand:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # webdataset names the stream in its errors
        return f"pipe:{self.command}" if self.reading is None else self.reading


def _read_on_until_the_end(stream: IO[bytes], deadline: float) -> None:
    """Read and drop what the command still writes, until it closes its output or the deadline: closed at once,
    a `tee` into a local copy of the shard died of SIGPIPE with the rest of the tar's padding still to write."""
    descriptor = stream.fileno()
    with selectors.DefaultSelector() as selector:  # poll/epoll: select() refuses descriptors past 1023
        selector.register(descriptor, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                return
            if not os.read(descriptor, 1 << 16):
                return


def _exited_within(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the command's shell exits within `timeout_s`. Left uncollected (WNOWAIT), so that its id still
    names its process group for `_end`."""
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: collected, and its group is not ended by id then
        try:
            process.wait(timeout=max(timeout_s, 0))
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while process.returncode is None:
        try:
            if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # collected by end_running_commands, or by the kernel (SIGCHLD ignored)
            process.wait()  # sets its status (0 where unknown), so that no id that may be reused is killed
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    return True


def _end(process: subprocess.Popen) -> None:
    """Kill the command's process group, then collect its status. Sent while the group's leader is not yet
    collected, so that its id cannot have been given to another process."""
    with _ending:
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # the group is gone already
                pass
        try:
            process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:  # in uninterruptible sleep (a dead network mount): left to the kernel
            pass


def _forget(process: subprocess.Popen) -> None:
    with _starting:  # end_running_commands reads the table from another thread
        if _running.get(process.pid, (None, None))[1] is process:
            del _running[process.pid]


def end_running_commands() -> None:
    """End the commands this process started and has not closed, and start no more in it. Called at its exit,
    and by a data worker that its parent terminates (os._exit skips exit handlers), from another thread."""
    here = os.getpid()
    with _starting:
        _ended_in.add(here)
        ours = [(pid, process) for pid, (started_by, process) in _running.items() if started_by == here]
        for pid, _ in ours:
            del _running[pid]
    for _, process in ours:
        _end(process)


def _end_running_commands_at_exit() -> None:
    # multiprocessing's exit function runs these finalizers in the main process (through atexit) and in a
    # data worker when its loop ends (which leaves through os._exit, skipping atexit)
    pid = os.getpid()
    if pid not in _exit_hooks_in:
        _exit_hooks_in.add(pid)
        multiprocessing.util.Finalize(None, end_running_commands, exitpriority=0)
