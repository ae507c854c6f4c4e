"""clip-train's exit status for a SIGTERM or Ctrl-C at any point of its process's life where one can be handled:
while it imports and starts, while the run stops or finishes, and as the process ends. Each run is a process of
its own (signalled_clip_train.py), as under srun or torchrun: a signal that the default action takes ends it with
143 (128 + SIGTERM), which slurm_train.sbatch takes for a failure instead of requeueing the run. And `train`'s
handling of the start, from a notebook: its own from its first line, but the default action while ranks meet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import clip.train as train_module
from clip import checkpoint as ckpt
from clip.stopping import SetupInterrupted, StopRequest
from clip.train import train

from multiprocess import free_port
from test_train_loop import DEMO, TINY, tiny_config

DRIVER = Path(__file__).parent / "signalled_clip_train.py"
REPO = Path(__file__).resolve().parents[1]
# Three steps with nothing but the final checkpoint: the run's own work is a small part of each process's time
QUICK = [*TINY, "schedule.steps=3", "schedule.warmup_steps=1", "checkpoint.every_n_steps=0", "eval.every_n_steps=0",
         "eval.zeroshot=[]"]


def clip_train(entry: str, points: str, run_dir: Path, *extra: str, env: dict | None = None,
               wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """clip-train run as `entry` ("script": scripts/train.py, as the clip-train command through clip_commands;
    "module": python -m clip.cli.train), signalled at `points` (signalled_clip_train.py's)."""
    environment = {**os.environ, **(env or {})}
    # After `env`: two_slurm_ranks passes a copy of os.environ, whose PYTHONPATH replaced this one
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    command = [sys.executable, str(DRIVER), entry, points, str(DEMO), "--output-dir", str(run_dir), *QUICK, *extra]
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def two_slurm_ranks(run_dir: Path, points_of_ranks: list[str]) -> list[tuple[int, str]]:
    """Two clip-train ranks started as srun starts them (SLURM's variables alone, none of torchrun's), rank r
    signalled at points_of_ranks[r]; each rank's exit status and stderr."""
    port = str(free_port())
    base = {name: value for name, value in os.environ.items()
            if not name.startswith("SLURM_") and name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    ranks = [
        clip_train("script", points, run_dir, "train.batch_size=4", wait=False, env={
            **base, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1", "MASTER_PORT": port})
        for rank, points in enumerate(points_of_ranks)
    ]
    return [(process.wait(timeout=300), process.communicate()[1]) for process in ranks]


def test_a_signal_while_scripts_train_py_imports_the_library_exits_75_without_a_traceback(tmp_path):
    # Importing torch and the library takes seconds (more on a loaded node): the likeliest moment for a requeued
    # job's start to be pre-empted. The default action exited 143 and the job was not requeued.
    ended = clip_train("script", "import:SIGTERM", tmp_path / "run")
    assert ended.returncode == 75, ended.stderr
    assert "clip-train: stopped while starting, before training a step: run it again" in ended.stderr
    assert "Traceback" not in ended.stderr
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_while_clip_train_reads_its_config_exits_75_without_a_traceback(tmp_path):
    # It ended in a KeyboardInterrupt's traceback (through tomllib) and status 130, "stopped at once, without
    # saving", before anything was started
    ended = clip_train("module", "config:SIGINT", tmp_path / "run")
    assert ended.returncode == 75, ended.stderr
    assert "stopped while starting, before training a step: run it again" in ended.stderr
    assert "Traceback" not in ended.stderr


def test_signals_as_a_stopped_run_ends_leave_its_status_75(tmp_path):
    # Stopped at step 2 with a checkpoint, then signalled again (srun's SIGTERM reaches every task, torchrun
    # forwards its own copy) as train destroys the process group, once train has returned, and as the
    # interpreter exits: each one, taken by the default action, ended it with 143 and the run was not requeued.
    ended = clip_train("script", "step2:SIGTERM,teardown:SIGTERM,returned:SIGTERM,exit:SIGTERM", tmp_path)
    assert ended.returncode == 75, ended.stderr
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert "received signal 15 as the run ends: there is nothing left to stop" in ended.stderr
    assert "Traceback" not in ended.stderr


def test_signals_as_a_finished_run_ends_leave_its_status_0(tmp_path):
    # The run is complete (results.json written): rerunning it would only evaluate it again, so it exits as
    # finished, as it does for a signal once its final checkpoint and evaluation are done (StopRequest.finishing)
    ended = clip_train("module", "teardown:SIGINT,returned:SIGTERM,exit:SIGINT", tmp_path)
    assert ended.returncode == 0, ended.stderr
    assert (tmp_path / "results.json").exists()
    assert "received signal 2 as the run ends: there is nothing left to stop" in ended.stderr
    assert "received signal 15 as the run ends: there is nothing left to stop" in ended.stderr
    assert "Traceback" not in ended.stderr


@pytest.mark.parametrize(("points", "status"), [("import:SIGTERM", 75), ("step2:SIGTERM", 75), ("teardown:SIGINT", 0)],
                         ids=["abandoned_while_importing", "stopped", "finished"])
def test_a_signal_as_the_interpreter_frees_its_modules_leaves_the_status(tmp_path, points, status):
    # One pre-emption can arrive twice (srun signals every task, torchrun forwards its own copy), the second one
    # tens of milliseconds after the first: as the process ends. Python puts back the default action of the
    # signals it handled once its exit functions have run, and freeing torch's modules takes tens of
    # milliseconds more: a signal then ended the run with 143 (or 130), and slurm_train.sbatch did not requeue it.
    ended = clip_train("script" if points.startswith("import") else "module", f"{points},finalization:SIGTERM",
                       tmp_path)
    assert ended.returncode == status, ended.stderr
    assert "Traceback" not in ended.stderr


def test_a_signal_to_one_rank_as_it_destroys_the_process_group_leaves_every_ranks_status_75(tmp_path):
    # srun reports the highest of its tasks' statuses: rank 0 signalled during the run and rank 1 only as it
    # destroyed the process group (a pre-emption's SIGTERM reaching them apart) exited 75 and 143, and the job
    # was not requeued although the checkpoint was saved.
    ended = two_slurm_ranks(tmp_path, ["step2:SIGTERM", "teardown:SIGTERM"])
    assert [status for status, _ in ended] == [75, 75], ended
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert "rank 1 clip.stopping: received signal 15 as the run ends" in ended[1][1]


@pytest.fixture
def recording_sigterm():
    """The caller's SIGTERM handler (a notebook's) records the signals it gets; put back after."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    yield caught
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_while_train_chooses_its_device_abandons_its_start(tmp_path, monkeypatch, recording_sigterm):
    # Its handlers were installed after init_distributed: a signal while it chose the device (CUDA's start) went
    # to the caller's handler (the default action under clip-train) and the run went on
    real = train_module.init_distributed

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "init_distributed", signalled)
    with pytest.raises(SetupInterrupted):
        train(tiny_config(tmp_path, "schedule.steps=1", "eval.every_n_steps=0"))
    assert recording_sigterm == []
    assert not ckpt.list_checkpoints(tmp_path)


def test_ranks_meet_under_the_default_signal_action_and_catch_signals_again_after(monkeypatch):
    # Blocked in init_process_group's C++ rendezvous a process runs no Python handler: a caught signal would
    # leave it waiting for ranks that may never come, for the rendezvous timeout
    from clip import distributed

    seen = {}

    def rendezvous(**kwargs):
        seen.update(SIGTERM=signal.getsignal(signal.SIGTERM), SIGINT=signal.getsignal(signal.SIGINT))

    monkeypatch.setattr(distributed.dist, "init_process_group", rendezvous)
    environment = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with StopRequest():
        caught = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        assert distributed.init_distributed(device="cpu").is_distributed
        assert seen == {"SIGTERM": signal.SIG_DFL, "SIGINT": signal.SIG_DFL}
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == caught


def test_a_rank_whose_peer_was_killed_says_it_failed_in_train_log_and_its_signal_line(tmp_path):
    # Rank 1 killed (a lost node, the OOM killer): rank 0's next collective fails, and torchrun sends it SIGTERM as
    # it ends. Its train.log ended on its last saved checkpoint, with no word of the failure (Python's traceback
    # goes to stderr alone), and the signal was said as "received signal 15 as the run ends", as for a finished or
    # stopped run, above the traceback.
    ended = two_slurm_ranks(tmp_path, ["teardown:SIGTERM", "step2:SIGKILL"])
    assert [status for status, _ in ended] == [1, -signal.SIGKILL], ended
    assert "received signal 15 as the run ends on an error (the run failed): there is nothing left" in ended[0][1]
    logged = (tmp_path / "train.log").read_text()
    assert "ERROR clip.cli.train: the run failed: " in logged
    assert "Traceback (most recent call last)" in logged


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_the_process_groups_threads_end_with_cleanup_whatever_is_imported_after_the_ranks_meet():
    # torch.distributed.nn.functional's functions take `group=group.WORLD` as a default, evaluated as it is imported:
    # imported after the ranks met (through torch._dynamo, from the optimizer's constructor), it held the process
    # group for the rest of the process, so destroy_process_group left gloo's worker threads running into the
    # interpreter's exit, where one of them sometimes aborted a rank that had stopped as asked (status -6,
    # "terminate called without an active exception"). A fresh process (this one has imported it already), whose
    # group is a world of one made through init_distributed's own call.
    code = """
import gc, os, socket
import torch.distributed as dist
from clip import distributed
threads = lambda: len(os.listdir("/proc/self/task"))
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
before = threads()
join = dist.init_process_group
dist.init_process_group = lambda **options: join(**{**options, "world_size": 1})
os.environ.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
distributed.init_distributed(device="cpu")
during = threads()
import torch._dynamo
distributed.cleanup_distributed()
gc.collect()
print(before, during, threads())
assert during > before and threads() == before, (before, during, threads())
"""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert ended.returncode == 0, ended.stdout + ended.stderr
