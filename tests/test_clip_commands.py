"""The console scripts, run as pip's wrapper runs them (`from MODULE import FUNCTION; sys.exit(FUNCTION())`, with
pyproject.toml's [project.scripts]), signalled while they import torch: the likeliest moment for a Ctrl-C, as
importing takes seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]

# pip's console-script wrapper, preceded by a finder that sends the signal argv[1] as torch is first looked for
WRAPPER = """
import os, signal, sys

signame = sys.argv[1]
# A command typed at a terminal starts with both signals at their defaults; an ignored SIGINT is inherited through
# exec (pytest started in the background has it), and made the signal a no-op here
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)

class SignalOnImport:
    def find_spec(self, name, path, target=None):
        if name == "torch" and signame:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, signame))
        return None

sys.meta_path.insert(0, SignalOnImport())
module, function = sys.argv[2].split(":")
sys.argv = sys.argv[3:]
entry = getattr(__import__(module, fromlist=[function]), function)
sys.exit(entry())
"""


def run_script(name: str, signame: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environment.pop("CLIP_DEBUG", None)
    return subprocess.run([sys.executable, "-c", WRAPPER, signame, SCRIPTS[name], name, *args], env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"clip-train"}))
def test_a_ctrl_c_while_a_command_imports_torch_is_one_line_and_status_130(name):
    # It printed a KeyboardInterrupt traceback through torch's modules
    ended = run_script(name, "SIGINT", "--help")
    assert ended.returncode == 130, ended.stderr
    assert ended.stderr == f"{name}: interrupted while starting, before it did anything\n"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_clip_train_imports_torch_abandons_its_start_as_one_while_it_reads_its_config(signame):
    # Status 75, as scripts/train.py and a signal while clip-train reads its config (test_clip_train_signals): the
    # Ctrl-C was a traceback, and the SIGTERM's default action (143) read as a failure to slurm_train.sbatch
    ended = run_script("clip-train", signame, "configs/demo.toml")
    assert ended.returncode == 75, ended.stderr
    assert ended.stderr == "clip-train: stopped while starting, before training a step: run it again\n"


def test_a_command_started_without_a_signal_runs_as_before():
    ended = run_script("clip-export", "", "--help")
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.startswith("usage: clip-export")


def test_the_statuses_clip_commands_repeats_are_the_library_s():
    # Repeated there, not imported (importing them imports torch): a change to the library's must change these
    import clip_commands
    from clip.cli.common import INTERRUPTED_EXIT_CODE
    from clip.stopping import STOPPED_EARLY_EXIT_CODE

    assert clip_commands.INTERRUPTED_EXIT_CODE == INTERRUPTED_EXIT_CODE
    assert clip_commands.START_ABANDONED_EXIT_CODE == STOPPED_EARLY_EXIT_CODE


@pytest.mark.parametrize("name", ["clip-export", "clip-zeroshot"])
def test_a_ctrl_c_once_an_evaluation_command_is_done_is_ignored(name):
    # It came during the exit functions (the data loaders' clean-up): "Exception ignored in atexit callback" and a
    # KeyboardInterrupt traceback after the command's own output, or an end by SIGINT with no line at all
    code = f"""
import atexit, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)

def ctrl_c_in_the_teardown():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)

atexit.register(ctrl_c_in_the_teardown)  # registered first: runs last, after the command's own
import clip_commands
sys.argv = [{name!r}, "--help"]
sys.exit(getattr(clip_commands, {name.replace("-", "_")!r})())
"""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert ended.returncode == 0 and ended.stdout.startswith(f"usage: {name}"), ended.stderr
    assert "KeyboardInterrupt" not in ended.stderr and "Exception ignored" not in ended.stderr
