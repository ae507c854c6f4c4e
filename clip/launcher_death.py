"""A torchrun worker that outlives its launcher stops as on a scheduler's SIGTERM.

torchrun starts each worker in a session of its own, so a torchrun that is killed outright (SIGKILL: the OOM
killer, `kill -9`, a container's hard stop) leaves its workers running: they go on training and saving into
the run directory, whose lock then refuses the rerun ("in use by another run") until someone finds and kills
them. torchrun's own SIGTERM or Ctrl-C is forwarded to the workers and needs nothing of this.

Here the kernel is asked (Linux's prctl PR_SET_PDEATHSIG) to send this process SIGTERM when the process that
started it ends: the run's stop handler then saves a checkpoint at the next step boundary and ends with the
status that asks for a rerun. The request is made only under torchrun (its TORCHELASTIC_RUN_ID variable):
under srun the parent is slurmstepd, which ends the job's processes itself, and a process started by hand may
well outlive the shell that started it on purpose (nohup).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"  # set by torchrun (torch.distributed.elastic) for each worker
# torchrun's pid as the worker's command started, before its imports (clip_commands.remember_the_launcher)
LAUNCHER_PID_VARIABLE = "CLIP_LAUNCHER_PID"


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    return TORCHRUN_VARIABLE in environ


def has_ended(pid: int) -> bool:
    """Whether process `pid` is gone or ending, by Linux's /proc: its main thread a zombie, or no such process.
    The kernel sends the SIGTERM as torchrun's main thread ends, and while its other threads are still ending it
    hands this process to one of them (the same pid): os.getppid() does not change until the last one is gone."""
    if pid <= 0:  # os.getppid()'s 0: a parent outside this PID namespace, which /proc cannot show
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # no such process, where /proc is there to say so (a sandbox may lack it)
        return Path("/proc/self/stat").exists()
    except OSError:  # cannot tell: not ended, or a run would stop at its start
        return False
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # after the command's name, which may hold spaces


def sigterm_when_the_parent_ends() -> bool:
    """Asks Linux to send this process SIGTERM when the process that started it ends; False where it cannot
    (another system, no C library to ask, a refusal). The kernel sends it when the *thread* that started this
    process ends: torchrun starts its workers from its main thread, which lives as long as torchrun does. A
    parent that ended before the request is not signalled: the caller compares os.getppid() across it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0
    except (OSError, AttributeError):  # a static interpreter
        return False
    if failed:
        log.debug("prctl(PR_SET_PDEATHSIG) failed with errno %d: not stopped when torchrun ends", ctypes.get_errno())
    return not failed
