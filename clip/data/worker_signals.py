"""DataLoader worker processes that leave a scheduler's SIGTERM and SIGINT to the training process:
`signal_safe_worker_options()` gives the DataLoader arguments, for the training data (loader.py) and for
the evaluation loaders (clip.evaluation.features); their iterators are built inside `job_signals_held()`."""

from __future__ import annotations

import contextlib
import multiprocessing.context
import os
import signal
import threading
from collections.abc import Iterator

from ..stopping import STOP_SIGNALS
from .pipe_command import end_running_commands


def signal_safe_worker_options() -> dict:
    """DataLoader arguments for worker processes that outlive a scheduler's signals (see
    `shield_worker_from_job_signals`): that function as `worker_init_fn`, and where it can work (Linux),
    forked workers. A spawned or forkserver-started worker has threads of its own before `worker_init_fn`
    runs, which would still take the signal, and its parent is not necessarily the training process."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: torch's own handling
        return {}
    return {"worker_init_fn": shield_worker_from_job_signals, "multiprocessing_context": ForkWithJobSignalsHeld()}


JOB_SIGNALS = set(STOP_SIGNALS)  # SIGTERM, SIGINT and (where it exists) SIGUSR1


@contextlib.contextmanager
def job_signals_held() -> Iterator[None]:
    """Inside the block SIGTERM and SIGINT are only noted; on leaving it, the handlers they would have met run.

    For building a DataLoader's iterator, which starts its worker processes. The trainer's handler raises to
    abandon an evaluation or the start of a run; raised inside torch's iterator constructor, it left the
    iterator half built, a started worker outside the iterator's list (running until the process exits), and
    the iterator's __del__ printed an AttributeError traceback ('_workers_status'). Held in Python, not in the
    signal mask: a process-directed signal goes to any thread that does not block it, and the main thread's
    handler runs all the same.
    """
    noted: list[int] = []
    handlers = {}
    held = True

    def note_or_pass_on(signum, frame):
        # Passed on once the block ends: a signal whose handler raises while the others are still being put
        # back would otherwise leave them with this one for good. Its handler is put back first: under SIG_DFL,
        # raise_signal met this function again, and again, until a RecursionError instead of the signal's end
        if held:
            noted.append(signum)
        else:
            signal.signal(signum, handlers[signum])
            _pass_on(handlers[signum], signum, frame)

    try:
        for sig in JOB_SIGNALS:
            if signal.getsignal(sig) is None:  # installed outside Python (an embedding): it could not be put back
                continue
            if signal.getsignal(sig) == signal.SIG_IGN:
                # Nothing to note; and a process started inside the block (a pipe: command, in a data worker)
                # inherits it ignored, where a handler of ours is reset to the default action by its exec
                continue
            handlers[sig] = signal.signal(sig, note_or_pass_on)
    except ValueError:  # not the main thread, where no Python signal handler runs
        pass
    try:
        yield
    finally:
        held = False
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for signum in noted:
            _pass_on(handlers[signum], signum, None)


def _pass_on(handler, signum: int, frame) -> None:
    """What the signal would have done under `handler`: call it, take the default action, or nothing (ignored)."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


if hasattr(signal, "sigwaitinfo"):  # Linux, where the shield works (there is no fork context on Windows)

    class _ForkProcessWithJobSignalsHeld(multiprocessing.context.ForkProcess):
        def start(self) -> None:
            # Forked with the job's signals blocked, so the child holds one that arrives before its
            # worker_init_fn installs the shield (torch's own worker handler would die of it), and the shield
            # then takes it. The parent's mask is restored at once: a signal meant for it is delivered then.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    class ForkWithJobSignalsHeld(multiprocessing.context.ForkContext):
        """The fork start method, with SIGTERM and SIGINT blocked in a new worker from its first instruction
        until `shield_worker_from_job_signals` has taken them over (a scheduler's signal in between killed it)."""

        Process = _ForkProcessWithJobSignalsHeld


def shield_worker_from_job_signals(worker_id: int) -> None:
    """Run in each data worker: leave SIGTERM and SIGINT from outside to the training process.

    A scheduler stops a job by signalling every process in it (SLURM's pre-emption and time limit send
    SIGTERM to the whole step; Ctrl-C sends SIGINT to the terminal's process group). A worker that dies of
    it makes torch raise "DataLoader worker ... killed by signal" in the training process, at whatever line
    runs then -- typically inside the checkpoint save the same signal asked for. So workers ignore SIGINT (and
    SIGUSR1, which some SLURM scripts ask for),
    and answer SIGTERM only from their parent (torch's own shutdown of a worker that does not stop in time):
    a thread waits for the signal and exits the worker if the parent sent it, ignores it otherwise. Workers
    still stop when the loader is closed, and on their own when the training process dies.
    """
    ignored = JOB_SIGNALS - {signal.SIGTERM}  # SIGINT, SIGUSR1
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)  # held since the fork; one pending is dropped
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_answer_sigterm_from_parent_only, name="sigterm-filter", daemon=True).start()


def _answer_sigterm_from_parent_only() -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == os.getppid():
            # torch's shutdown terminates a worker that did not stop in time, typically one hung in a pipe:
            # command's read: that command is ended too (os._exit skips the exit handlers that would)
            end_running_commands()
            os._exit(0)  # as torch's worker handler does when its parent terminates it
