"""scripts/slurm_train.sbatch run by bash (as SLURM runs it on the first node), with stand-ins for `srun` and
`scontrol` on PATH: which command each task runs, with which arguments, and what the job does with its status.
No SLURM and no training: the stand-in srun runs the command once, and the command is a stub that records its
arguments and exits with the status it is told."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm_train.sbatch"

# srun's options (--wait=120) dropped, the task's command run once in its place
FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$RECORD_DIR/scontrol"
"""
# A stand-in for the training command: records how it was called, exits with $STUB_STATUS
STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$RECORD_DIR/ran"
exit "${STUB_STATUS:-0}"
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def submit(tmp_path: Path, status: int = 0, checkout: bool = True,
           **variables: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The job script run in `tmp_path/job` (the submission folder: a checkout's root, holding scripts/train.py,
    unless not `checkout`), whose PATH has the stand-ins: `python` and `clip-train` are the stub."""
    bin_dir, records, job_dir = tmp_path / "bin", tmp_path / "records", tmp_path / "job"
    for folder in (bin_dir, records, job_dir):
        folder.mkdir()
    if checkout:
        (job_dir / "scripts").mkdir()
        (job_dir / "scripts" / "train.py").write_text("# the stub python runs in its place\n")
    executable(bin_dir / "srun", FAKE_SRUN)
    executable(bin_dir / "scontrol", FAKE_SCONTROL)
    for name in ("python", "clip-train"):
        executable(bin_dir / name, STUB)
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(records),
        "STUB_STATUS": str(status), "SLURM_JOB_ID": "1234", "SLURM_CPUS_PER_TASK": "12", **variables,
    }
    ended = subprocess.run(["bash", str(SBATCH), "configs/vit_b32_paper.toml", "train.batch_size=64"],
                           cwd=job_dir, env=environment, capture_output=True, text=True, timeout=30)
    return ended, records


def test_by_default_each_task_runs_the_checkouts_script(tmp_path):
    ended, records = submit(tmp_path)
    assert ended.returncode == 0, ended.stderr
    assert (records / "ran").read_text() == "python scripts/train.py configs/vit_b32_paper.toml train.batch_size=64\n"


def test_clip_train_variable_names_the_command_for_an_installed_package_without_the_checkout(tmp_path):
    # A wheel has no scripts/train.py: its console script runs the same trainer
    ended, records = submit(tmp_path, CLIP_TRAIN="clip-train")
    assert ended.returncode == 0, ended.stderr
    assert (records / "ran").read_text() == "clip-train configs/vit_b32_paper.toml train.batch_size=64\n"


@pytest.mark.parametrize("command", [None, "clip-train"])
def test_a_run_stopped_with_a_checkpoint_requeues_the_job_whichever_the_command(tmp_path, command):
    ended, records = submit(tmp_path, status=75, **({"CLIP_TRAIN": command} if command else {}))
    assert ended.returncode == 0, ended.stderr
    assert (records / "scontrol").read_text() == "requeue 1234\n"


def test_a_failed_run_is_the_jobs_failure_and_not_requeued(tmp_path):
    ended, records = submit(tmp_path, status=1, CLIP_TRAIN="clip-train")
    assert ended.returncode == 1
    assert not (records / "scontrol").exists()


def test_a_job_started_outside_a_checkout_says_so_once_and_is_not_requeued(tmp_path):
    # Every task's python said "can't open file .../scripts/train.py" (status 2), nothing said where to submit from
    ended, records = submit(tmp_path, checkout=False)
    assert ended.returncode == 2
    assert ended.stderr.startswith(f"slurm_train.sbatch: no scripts/train.py in {tmp_path / 'job'}, where the job "
                                   f"started: submit from the checkout's root")
    assert not (records / "ran").exists() and not (records / "scontrol").exists()
    (tmp_path / "installed").mkdir()
    ended, records = submit(tmp_path / "installed", checkout=False, CLIP_TRAIN="clip-train")  # needs no checkout
    assert ended.returncode == 0 and (records / "ran").read_text().startswith("clip-train ")
