"""Pre-train or fine-tune a CLIP model from a TOML recipe: `python scripts/train.py configs/demo.toml [key=value ...]`."""

import atexit
import signal
import sys
from pathlib import Path


def stopped_while_importing(signum, frame):
    # A signal while Python imports torch and the library (seconds, on a loaded node) ended the process with
    # the default action's status, 143, which slurm_train.sbatch takes for a failure. Nothing is trained yet:
    # a start to run again, as after a signal during the rest of the start (clip.stopping's 75).
    print("clip-train: stopped while starting, before training a step: run it again", file=sys.stderr)
    raise SystemExit(75)


def ignore_signals_in_the_teardown():
    # Registered first, so run last of the exit functions: Python then puts back the default action of the
    # signals it handled and frees its modules (tens of milliseconds with torch), where a second copy of a
    # pre-emption's SIGTERM ended a stopped start or run with 143 (clip.cli.train.ignore_signals_in_the_teardown)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    atexit.register(ignore_signals_in_the_teardown)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped_while_importing)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not pip-installed
    from clip.cli.train import command

    command()
