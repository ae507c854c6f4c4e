"""Stopping a run on a scheduler's signal: a checkpoint at the next step boundary the ranks agree on, an
evaluation abandoned where that is safe, and the exit status that tells a job script to run it again."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping

from .launcher_death import LAUNCHER_PID_VARIABLE, has_ended, launched_by_torchrun, sigterm_when_the_parent_ends

log = logging.getLogger(__name__)


# What `main` returns when a signal stopped the run before its last step, after a checkpoint: sysexits'
# EX_TEMPFAIL ("try again later"), so that a job script can tell "run again to continue"
# (scripts/slurm_train.sbatch requeues itself) from success and from failure.
STOPPED_EARLY_EXIT_CODE = 75
# A second Ctrl-C: what a shell reports for a process that Ctrl-C ended (128 + SIGINT)
STOPPED_AT_ONCE_EXIT_CODE = 130
# The signals that stop a run with a checkpoint: a scheduler's SIGTERM, Ctrl-C, and SIGUSR1, which SLURM scripts
# written for other trainers ask for (`#SBATCH --signal=USR1@120`): its default action ended the run unsaved
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))


class EvaluationInterrupted(BaseException):
    """A signal arrived while an evaluation that may be abandoned was running (see StopRequest.interrupting).
    A BaseException, like KeyboardInterrupt: an `except Exception` on the way (an image decoder's fallback)
    must not swallow it."""


class DataWaitInterrupted(BaseException):
    """A signal arrived while one process waited for its next batch (a stalled download or `pipe:` command can
    hold it for data.worker_timeout_s): the step in progress has not begun, so the run saves and stops there.
    Several ranks keep waiting: the others are in a collective of that step, which no checkpoint can come
    between."""


class SetupInterrupted(BaseException):
    """A signal arrived while the run was starting (reading its config, a download, reading a checkpoint, building
    the data): nothing is trained yet, so the start is abandoned at once, with the status that asks for a rerun."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: the run stops where it is, without saving. A KeyboardInterrupt, so that it unwinds
    like one; clip-train ends on it with the shell's status for Ctrl-C (130) and no traceback, as the log
    line said what happened and what a rerun does."""


class StopRequest:
    """Turns SIGTERM (SLURM's pre-emption notice) and Ctrl-C into a checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        self._abandoning: type[BaseException] | None = None  # while set, a signal raises it at once
        self._finishing = False  # while set, the run has nothing left that a stop would cut short
        self._ending = False  # while set, the run is over and only lets go of what it holds
        self._ending_on_error = False  # ... and it is over because it raised an error
        # torchrun's pid where its end sends this process SIGTERM (clip.launcher_death), to say so when it does
        self.launcher_pid: int | None = None

    @contextlib.contextmanager
    def interrupting(self, exception: type[BaseException] = EvaluationInterrupted):
        """Inside the block a signal (or one that came before it) raises `exception` at once, besides being
        recorded: for work that abandoning loses nothing of. An evaluation (EvaluationInterrupted) can take
        longer than a scheduler's grace period; for one process only: several ranks would leave each other
        waiting in the evaluation's collectives, so they abandon one together at its stop checks instead (an
        agreement every few batches, `clip.evaluation.features.with_stop_checks`). The start of a run
        (SetupInterrupted), clip-train's and `train`'s, on every rank, except while the ranks meet
        (`clip.distributed.init_distributed`): nothing is trained yet, and a rank in a long download would
        otherwise only stop when the scheduler kills it."""
        previous = self._abandoning
        self._abandoning = exception  # before the check: a signal in between then raises from the handler
        try:
            if self.requested:
                raise exception
            yield
        finally:
            self._abandoning = previous

    @contextlib.contextmanager
    def finishing(self):
        """Inside the block the run has done all that a stop could cut short (its last step, final checkpoint and
        final evaluation) and only writes down its results: a signal is recorded (a second Ctrl-C still stops at
        once), but said as what it is. It was said as "stopping at the next safe point", and the run then
        exited 0, finished, as it should: there was nothing left to stop before."""
        self._finishing = True
        try:
            yield
        finally:
            self._finishing = False

    @contextlib.contextmanager
    def ending(self, on_error: bool = False):
        """Inside the block the run is over (it finished, stopped with a checkpoint or failed) and only lets go of
        what it holds: its data workers, its run directory, the process group, and clip-train's last lines.
        A signal there changes nothing, so it is recorded and said as such (a second Ctrl-C still stops at once),
        and the exit status stays what the run did. It came after the handlers were put back, and the default
        action ended the process with status 143: a run stopped with a checkpoint was not requeued by
        slurm_train.sbatch, and a finished one read as failed. `on_error`: the run is over because it raised an error
        (another rank's process ended, and a collective with it failed: torchrun then signals the ranks left), said
        as such: "as the run ends" alone read as a run that had finished or stopped, above the error's traceback."""
        self._ending, self._ending_on_error = True, on_error
        try:
            yield
        finally:
            self._ending, self._ending_on_error = False, False

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def stop_when_torchrun_ends(self, environ: Mapping[str, str]) -> None:
        """Under torchrun, its end (a SIGKILL, which it cannot forward) is a SIGTERM to this process, which stops
        the run as a scheduler's would: its workers, in sessions of their own, went on training (clip.launcher_death).
        Only while this catches SIGTERM (in the main thread), whose default action would lose the steps."""
        if signal.SIGTERM not in self._previous or not launched_by_torchrun(environ):
            return
        launcher = os.getppid()
        if launcher == 0:  # started into a PID namespace of its own (unshare --pid): torchrun is not to be seen
            return
        remembered = environ.get(LAUNCHER_PID_VARIABLE, "")
        if remembered.isascii() and remembered.isdigit() and int(remembered) != launcher:
            # torchrun ended while this process imported the library (it was re-parented since): the request
            # below would wait for the end of a process that is not torchrun
            self.launcher_pid = int(remembered)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if sigterm_when_the_parent_ends():
            self.launcher_pid = launcher
            if os.getppid() != launcher or has_ended(launcher):  # it ended before the request, which sends nothing
                os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        # A second Ctrl-C stops at once. Not a second SIGTERM: under srun every process of the step gets it,
        # and torchrun forwards its own copy to its workers, so one pre-emption can arrive twice.
        if self.requested and self._abandoning is None:
            if signum == signal.SIGINT:
                log.warning("received a second Ctrl-C: stopping at once, without saving; the run resumes from its "
                            "latest checkpoint")
                raise StoppedAtOnce
            return
        self.requested = True
        # Said at the first one: a second, pressed while the checkpoint is written, loses the steps since the last
        # (after a SIGTERM too: a Ctrl-C is someone at the terminal, who is told what it would do)
        again = " (a second Ctrl-C stops at once, without saving)" if signum == signal.SIGINT else \
            " (a Ctrl-C now stops at once, without saving)"
        if self._abandoning is not None:
            exception, self._abandoning = self._abandoning, None  # raised once; cleanup code after it keeps running
            abandoned = {SetupInterrupted: "start of the run", DataWaitInterrupted: f"wait for the next batch, to save "
                         f"and stop{again}"}.get(exception, f"evaluation, to save and stop{again}")
            log.warning("received %s: abandoning the %s", self._signal_said(signum), abandoned)
            raise exception
        if self._ending:
            log.warning("received %s as the run ends%s: there is nothing left to stop, and it exits as it would "
                        "have%s", self._signal_said(signum),
                        " on an error (the run failed)" if self._ending_on_error else "",
                        " (a second Ctrl-C ends it at once)" if signum == signal.SIGINT else "")
            return
        if self._finishing:
            log.warning("received %s after the run's final checkpoint and evaluation: it is complete, and "
                        "exits as finished once its results are written%s", self._signal_said(signum),
                        " (a second Ctrl-C stops at once, without writing them)" if signum == signal.SIGINT else "")
            return
        # Over several processes the ranks agree on it before the next backward pass, so a signal that
        # arrives late in a step is acted on after the following one.
        log.warning("received %s: stopping at the next safe point (the weights are saved first)%s",
                    self._signal_said(signum), again)

    def _signal_said(self, signum: int) -> str:
        """'signal 15', and why where it is known: the kernel sends SIGTERM when torchrun ends (clip.launcher_death),
        which a user who killed torchrun would not otherwise connect with their worker's stopping."""
        if signum == signal.SIGTERM and self.launcher_pid is not None and (
                os.getppid() != self.launcher_pid or has_ended(self.launcher_pid)):
            return f"signal {signum} (torchrun, pid {self.launcher_pid}, which started this process, has ended)"
        return f"signal {signum}"

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
