"""clip-train end to end when something outside the trainer fails mid-run: a data worker process that dies, the run
directory deleted under the run. Each ends in one line that says what is kept and how to go on. (The trainer's
own failures and full disks: test_train_loop.py.)"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal

import pytest
from test_train_loop import DEMO, TINY

from clip import checkpoint as ckpt
from clip.cli.train import main
from clip.data import loader, sources

# Checkpoints every 2 steps, and one data worker: with its 2 batches of prefetch, the worker renders the images of
# batch N + 2 once the trainer has taken batch N
WORKER_RUN = [*TINY, "eval.every_n_steps=0", "data.workers=1", "data.prefetch_factor=2", "schedule.steps=20",
              "checkpoint.every_n_steps=2"]


def data_worker_killed_after(monkeypatch, images: int) -> None:
    """The data worker ends itself with SIGKILL, as the out-of-memory killer ends one, as it starts on its image
    number `images` + 1 (forked, it inherits the patch)."""
    trainer = os.getpid()
    real_image = sources.SyntheticSource.image
    rendered = [0]

    def image(self, row):
        if os.getpid() != trainer:
            rendered[0] += 1
            if rendered[0] > images:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_image(self, row)

    monkeypatch.setattr(sources.SyntheticSource, "image", image)


def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_each_checkpoint_is_saved_after_the_records_it_covers_are_on_the_disk(tmp_path, monkeypatch, caplog):
    # metrics.jsonl's lines were never synced: after a power cut, a checkpoint on the disk could cover steps
    # whose records were not, and a resume logs only the steps after it again
    from clip.run_log import RunLog, RunLogWriteError

    events = []
    real_sync, real_save = RunLog.sync, ckpt.save_checkpoint
    monkeypatch.setattr(RunLog, "sync", lambda self: events.append("sync") or real_sync(self))
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *args, **kwargs: events.append("save") or real_save(*args,
                                                                                                            **kwargs))
    run_dir = tmp_path / "run"
    assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0"]) == 0
    assert events == ["sync", "save"] * 2  # steps 3 and 6

    def failing(self):
        raise RunLogWriteError(f"could not put {self.path} on the disk: Input/output error (errno 5)")

    monkeypatch.setattr(RunLog, "sync", failing)
    with caplog.at_level(logging.ERROR):
        assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0", "schedule.steps=9"]) == 1
    assert error_lines(caplog) == [
        f"could not put {run_dir / 'metrics.jsonl'} on the disk: Input/output error (errno 5), so the step 9 "
        f"checkpoint was not saved; the latest checkpoint before it, {ckpt.checkpoint_path(run_dir, 6)}, is kept"]


@pytest.mark.parametrize("images", [0, 40], ids=["before_any_checkpoint", "after_a_checkpoint"])
def test_a_data_worker_killed_mid_run_is_one_line_that_says_what_is_kept(tmp_path, monkeypatch, capsys, caplog,
                                                                         images):
    # torch's RuntimeError from its SIGCHLD handler, raised wherever the trainer was (a step's gradient clipping),
    # ended the run with a traceback through torch's internals, as if the trainer had crashed.
    data_worker_killed_after(monkeypatch, images)
    with caplog.at_level(logging.ERROR):
        assert main([str(DEMO), "--output-dir", str(tmp_path), *WORKER_RUN]) == 1
    errors = error_lines(caplog)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("a data loader worker process died: DataLoader worker (pid")
    # Said by torch's SIGCHLD handler, or added where torch's wait for a batch found the worker dead first
    assert re.search(r"(?:\(pid \d+\)|\(pid\(s\) \d+\) exited unexpectedly; pid \d+) is killed by signal: Killed\. "
                     r"A SIGKILL most often comes from the out-of-memory killer: ", errors[0])
    if images:
        # Batch 5 is rendered once batch 3 was taken: step 2's checkpoint is saved. torch's SIGCHLD handler says
        # the death during step 3 or 4; where it did not, the wait for batch 5 finds it, after step 4's save (batch
        # 4 was in the queue already). Either way the line names the newest checkpoint kept.
        newest = ckpt.list_checkpoints(tmp_path)[0]
        assert newest[0] in (2, 4)
        assert errors[0].endswith("The checkpoints saved so far are kept: run the same command again to continue "
                                  f"from {newest[1]}")
    else:
        assert errors[0].endswith("No checkpoint had been saved yet: the same command again starts the run over")
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "train.log").read_text().rstrip().splitlines()[-1].endswith(errors[0])


def test_torchs_reports_of_a_dead_data_worker_are_recognised_and_no_other_error():
    said_by_torch = [
        "DataLoader worker (pid 4242) is killed by signal: Killed. ",
        "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are "
        "out of shared memory. Please try to raise your shared memory limit.",
        "DataLoader worker (pid 4242) exited unexpectedly with exit code 1. Details are lost due to "
        "multiprocessing. Rerunning with num_workers=0 may give better error trace.",
        "DataLoader worker (pid(s) 4242, 4243) exited unexpectedly",
    ]
    for message in said_by_torch:
        death = RuntimeError(message)
        assert loader.worker_death(death) is death
        try:  # raised while it was handled (a clean-up that failed next): still the run's cause
            try:
                raise death
            except RuntimeError:
                raise ValueError("a clean-up's own error")  # noqa: B904 (as an unexpected error is raised)
        except ValueError as later:
            assert later.__context__ is death and loader.worker_death(later) is death
    for other in (RuntimeError("DataLoader timed out after 60 seconds"), RuntimeError("CUDA out of memory"),
                  ValueError("DataLoader worker (pid 4242) is killed by signal: Killed. "),
                  RuntimeError("a transform failed in DataLoader worker process 0")):
        assert loader.worker_death(other) is None


def test_a_run_directory_deleted_mid_run_is_made_again_whole_with_one_warning_and_the_run_goes_on(
    tmp_path, monkeypatch, caplog
):
    # The next save made the folder again without a word: no config.toml, no lock (a second run could start in
    # it), and train.log and TensorBoard's events went on into the deleted files
    pytest.importorskip("torch.utils.tensorboard")
    run_dir = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def deleted_after_step_3(state, folder, step, keep_last, **kwargs):
        saved = real_save(state, folder, step, keep_last, **kwargs)
        if step == 3:
            shutil.rmtree(folder)  # as rm -rf RUN_DIR while the run goes on
        return saved

    monkeypatch.setattr(ckpt, "save_checkpoint", deleted_after_step_3)
    with caplog.at_level(logging.INFO):
        assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0",
                     "logging.tensorboard=true"]) == 0
    warnings = [record.getMessage() for record in caplog.records if "deleted or moved away" in record.getMessage()]
    assert warnings == [f"the run directory {run_dir} was deleted or moved away while the run went on: made again "
                        "at step 4, with the run's config.toml and lock, and the run saves its checkpoints there "
                        "again; none of what was written there before (checkpoints, metrics.jsonl, train.log) is "
                        "in it"]
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [6]
    assert f"output_dir = \"{run_dir}\"" in (run_dir / "config.toml").read_text()
    assert f"pid {os.getpid()}," in (run_dir / ".lock").read_text()
    train_log = (run_dir / "train.log").read_text().splitlines()
    assert warnings[0] in train_log[0]  # its lines from the warning on
    assert any("step 6/6" in line for line in train_log) and not any("step 3/6" in line for line in train_log)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [record["step"] for record in records if "loss" in record] == [4, 5, 6]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "results.json").read_text())["step"] == 6


@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_run_directory_moved_or_deleted_during_a_save_gets_that_checkpoint_in_the_folder_made_again(
    tmp_path, monkeypatch, caplog, how
):
    # The write into the temporary file went on in the moved (or deleted) folder, and its rename into place failed:
    # the run ended with status 1, losing the steps since its last checkpoint, though its weights were in memory
    import torch

    run_dir, moved_to = tmp_path / "run", tmp_path / "moved"
    real_torch_save, gone = torch.save, []

    def folder_gone_during_step_3s_save(obj, file, *args, **kwargs):
        real_torch_save(obj, file, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == 3 and not gone:
            gone.append(how)
            if how == "moved":
                run_dir.rename(moved_to)
            else:
                shutil.rmtree(run_dir)

    monkeypatch.setattr(torch, "save", folder_gone_during_step_3s_save)
    with caplog.at_level(logging.INFO):
        assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0"]) == 0
    warnings = [record.getMessage() for record in caplog.records if "deleted or moved away" in record.getMessage()]
    assert len(warnings) == 1 and "made again at step 3" in warnings[0]
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [6, 3]
    assert ckpt.read_checkpoint(ckpt.checkpoint_path(run_dir, 3))["step"] == 3


def test_a_run_directory_that_cannot_be_made_again_is_one_line_that_keeps_nothing(tmp_path, monkeypatch, capsys,
                                                                                   caplog):
    # The folder deleted, and its making again failing (a full or read-only file system): a bare OSError ended
    # the run on a traceback, which said nothing of what was kept
    import clip.run_start

    run_dir = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def deleted_after_step_3(state, folder, step, keep_last, **kwargs):
        saved = real_save(state, folder, step, keep_last, **kwargs)
        if step == 3:
            shutil.rmtree(folder)
        return saved

    def no_space(folder, *args, **kwargs):  # the watch's call only: the run's start records it through clip.train
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", deleted_after_step_3)
    monkeypatch.setattr(clip.run_start, "record_run_start", no_space)
    with caplog.at_level(logging.INFO):
        assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0"]) == 1
    assert error_lines(caplog) == [
        f"the run directory {run_dir} was deleted or moved away while the run went on, and could not be made again "
        "at step 4: No space left on device; none of its checkpoints is kept"]
    assert "Traceback" not in capsys.readouterr().err


def test_the_latest_checkpoint_is_not_named_as_kept_once_its_run_directory_went(tmp_path):
    import contextlib

    from clip.run_start import RunDirectoryWatch

    class RunLogStub:
        def start_again(self):
            pass

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with contextlib.ExitStack() as on_exit:
        watch = RunDirectoryWatch(run_dir, {"output_dir": str(run_dir)}, RunLogStub(), on_exit)
        watch.check(3)
        assert watch.kept_step(3) == 3
        shutil.rmtree(run_dir)
        watch.check(4)
        assert watch.kept_step(3) is None  # step 3's file went with the folder
        assert watch.kept_step(None) is None


@pytest.mark.parametrize("resumed", [False, True], ids=["new_run", "resumed_run"])
def test_a_run_record_that_cannot_be_written_at_the_start_is_one_line_that_says_what_is_kept(
    tmp_path, monkeypatch, capsys, caplog, resumed
):
    # A full disk when the run's config.toml was written ended the start on a bare OSError's traceback
    import clip.train

    run_dir = tmp_path / "run"
    args = [str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0"]
    if resumed:
        assert main([*args, "schedule.steps=3"]) == 0

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clip.train, "record_run_start", no_space)
    with caplog.at_level(logging.INFO):
        assert main(args) == 1
    kept = ("its checkpoints are kept: run the same command again to continue from step 3" if resumed
            else "no checkpoint had been saved")
    assert error_lines(caplog) == [f"could not write the run's config.toml in {run_dir}: No space left on device "
                                   f"(errno 28); {kept}"]
    assert "Traceback" not in capsys.readouterr().err
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == ([3] if resumed else [])


def test_a_run_that_ends_on_an_error_closes_tensorboard_and_its_progress_bar(tmp_path, monkeypatch):
    # Closed on the normal path alone: each train() that raised (non-finite losses, a second Ctrl-C, a failed
    # save) left TensorBoard's writer thread running and its threading.excepthook installed, wrapping the last one,
    # and its progress bar open (the next one was drawn a line lower)
    import threading

    import tqdm

    import clip.train
    from test_train_loop import tiny_config

    pytest.importorskip("torch.utils.tensorboard")
    hook_before = threading.excepthook
    real_step = clip.train.contrastive_step
    steps = []

    def failing_at_step_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("a failure inside the step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(clip.train, "contrastive_step", failing_at_step_2)
    config = tiny_config(tmp_path, "eval.every_n_steps=0", "logging.tensorboard=true", "logging.progress_bar=true")
    with pytest.raises(RuntimeError, match="a failure inside the step") as failure:
        clip.train.train(config)
    assert failure.value is not None  # kept, with its frames, as a notebook keeps the last error
    assert threading.excepthook is hook_before
    assert not [thread for thread in threading.enumerate() if type(thread).__module__.startswith("tensorboard.")]
    assert not [bar for bar in tqdm.tqdm._instances if bar.desc == "train"]  # tqdm's open bars
