"""The commands' entry points (pyproject.toml [project.scripts], and scripts/*.py from a source checkout), which
take the signals of the start before they import their command.

Importing a command takes seconds (torch and the library; more on a loaded machine). A Ctrl-C then printed a
KeyboardInterrupt traceback through torch's modules, and a SIGTERM ended clip-train with status 143, which
slurm_train.sbatch takes for a failure. Neither can be caught from inside the `clip` package: importing any
module of it runs clip/__init__.py, which imports torch, before a line of the entry point runs. So this package
stands beside `clip` and imports neither it nor torch until its handling is in place. Once a command has
started, it handles signals itself as before (clip-train: clip.cli.train.command and clip.stopping).
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import traceback
from typing import NoReturn

# clip.cli.common.INTERRUPTED_EXIT_CODE: the evaluation commands' status for Ctrl-C (128 + SIGINT, as a shell
# reports a command that Ctrl-C ended). Repeated, not imported: importing it imports torch.
INTERRUPTED_EXIT_CODE = 130
# clip.stopping.STOPPED_EARLY_EXIT_CODE: clip-train's status for a start a signal abandoned, nothing trained
START_ABANDONED_EXIT_CODE = 75
# clip.stopping.STOP_SIGNALS, repeated for the same reason
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))
# clip.launcher_death.TORCHRUN_VARIABLE and LAUNCHER_PID_VARIABLE, repeated for the same reason
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"
LAUNCHER_PID_VARIABLE = "CLIP_LAUNCHER_PID"


def clip_train() -> NoReturn:
    """clip-train: a SIGTERM or Ctrl-C while it imports the library abandons the start with status 75 and one
    line, as one while it reads its config does (clip.cli.train.start_abandoned), instead of a traceback (Ctrl-C)
    or the default action's 143 (SIGTERM)."""
    remember_the_launcher(os.environ)
    # Registered first, so run last of the exit functions (see clip.cli.train.ignore_signals_in_the_teardown)
    atexit.register(_ignore_signals_in_the_teardown)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _abandon_the_start)  # replaced by clip.cli.train.command's own before its `main` runs
    from clip.cli.train import command

    command()


def remember_the_launcher(environ) -> None:
    """Under torchrun, its pid, read before the seconds of imports: the run asks the kernel to be signalled when
    torchrun ends (clip.launcher_death) only once it trains, and a torchrun killed before that (the OOM killer,
    a kill -9 during the imports) left its workers re-parented, with nothing to tell them, waiting at the
    rendezvous torchrun had served. clip.stopping stops a run whose parent is no longer this one."""
    if TORCHRUN_VARIABLE in environ:
        environ[LAUNCHER_PID_VARIABLE] = str(os.getppid())


def clip_zeroshot() -> int:
    return _command_when_imported("clip-zeroshot", "clip.cli.zeroshot")


def clip_retrieval() -> int:
    return _command_when_imported("clip-retrieval", "clip.cli.retrieval")


def clip_linear_probe() -> int:
    return _command_when_imported("clip-linear-probe", "clip.cli.linear_probe")


def clip_export() -> int:
    return _command_when_imported("clip-export", "clip.cli.export")


def clip_make_shards() -> int:
    return _command_when_imported("clip-make-shards", "clip.cli.make_shards", entry="run")


def _command_when_imported(prog: str, module: str, entry: str = "main") -> int:
    """The command's `main`, once imported; a Ctrl-C while it imports is one line and status 130 (what the command
    says of one while it runs, clip.cli.common.run_command, is of the files it wrote: here it did nothing yet)."""
    try:
        main = getattr(importlib.import_module(module), entry)
    except KeyboardInterrupt:
        if os.environ.get("CLIP_DEBUG", "") not in ("", "0"):  # clip.cli.common.debugging
            traceback.print_exc()
        print(f"{prog}: interrupted while starting, before it did anything", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    try:
        return main()
    finally:
        # The command is done, its files written: a Ctrl-C in the exit functions that follow (data loaders',
        # torch's) printed "Exception ignored in atexit callback" and a KeyboardInterrupt traceback, or ended
        # the process by SIGINT with no line at all, after a run that had succeeded. Registered last, it runs
        # first of them (and changes nothing for a caller that goes on, a test calling the command in-process)
        atexit.register(_ignore_signals_in_the_teardown)


def _abandon_the_start(signum, frame) -> NoReturn:
    # Nothing is trained yet: a start to run again, as after a signal during the rest of the start
    print("clip-train: stopped while starting, before training a step: run it again", file=sys.stderr)
    raise SystemExit(START_ABANDONED_EXIT_CODE)


def _ignore_signals_in_the_teardown() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
