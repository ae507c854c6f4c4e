"""clip.run_log on its own: the W&B run a directory keeps, metrics.jsonl on resume, strict JSON, atomic writes
and their temporaries, the training plot. (With training end to end: test_train_loop.py.)"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from clip import run_log
from clip.run_log import RunLog, RunLogWriteError
from sync_order import record_syncs_and_renames


class RecordingWandb:
    """The wandb module as start_wandb uses it: the keyword arguments of each init."""

    def __init__(self) -> None:
        self.inits, self.metrics = [], {}

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def define_metric(self, name: str, **kwargs) -> None:
        self.metrics[name] = kwargs


def test_start_wandb_passes_the_entity_and_config_and_keeps_the_run_id_for_a_resume(tmp_path, monkeypatch):
    fake = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    run_log.start_wandb(run_dir, "proj", "team", {"train": {"batch_size": 8}})
    run_log.start_wandb(run_dir, "proj", None, {})
    first, again = fake.inits
    assert first["entity"] == "team" and again["entity"] is None
    assert first["project"] == "proj" and first["name"] == "my-run" and first["dir"] == str(run_dir)
    assert first["config"] == {"train": {"batch_size": 8}} and first["resume"] == "allow"
    assert first["id"] == again["id"] == (run_dir / run_log.WANDB_RUN_ID_FILE).read_text().strip()


def test_a_wandb_start_that_fails_is_one_error_saying_what_to_do(tmp_path, monkeypatch):
    # wandb.init without an API key (UsageError) or network (CommError after its retries) ended clip-train in a
    # traceback through wandb's internals
    class UsageError(Exception):
        pass

    class FailingWandb:
        def init(self, **kwargs):
            raise UsageError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", FailingWandb())
    with pytest.raises(run_log.WandbStartError, match=r"^W&B could not start the run's logging: UsageError: api_key "
                       r"not configured \(no-tty\)\. .*WANDB_MODE=offline.*logging\.wandb = false$") as raised:
        run_log.start_wandb(tmp_path, "proj", None, {})
    assert isinstance(raised.value.__cause__, UsageError)


def test_the_tensorboard_writer_gets_the_scalars_and_is_closed_with_the_log(tmp_path, monkeypatch):
    # Its events are buffered until close (or a flush every two minutes): unclosed, a run's last steps could be
    # missing from TensorBoard
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writers = []

    class RecordingWriter:
        def __init__(self, log_dir, purge_step):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, key, value, step):
            self.scalars.append((key, value, step))

        def close(self):
            self.closed = True

    monkeypatch.setattr(tensorboard, "SummaryWriter", RecordingWriter)
    log = RunLog(tmp_path, tensorboard=True, resumed_at=4)
    log.write({"step": 5, "loss": 1.0, "data": {"samples": 8}})
    log.close()
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step == 5
    assert writer.scalars == [("loss", 1.0, 5), ("data/samples", 8, 5)] and writer.closed


def test_a_last_tensorboard_write_that_fails_at_close_is_a_warning_and_a_second_close_does_nothing(
    tmp_path, monkeypatch, caplog
):
    # metrics.jsonl has every figure: a full disk under TensorBoard's last events costs those events only
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    closes = []

    class FullDiskWriter:
        def __init__(self, log_dir, purge_step):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            pass

        def close(self):
            closes.append(self)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboard, "SummaryWriter", FullDiskWriter)
    hook = threading.excepthook
    log = RunLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 1.0})
    with caplog.at_level(logging.WARNING, logger="clip"):
        log.close()
        log.close()
    assert len(closes) == 1 and log.writer is None and threading.excepthook is hook
    assert [record.getMessage() for record in caplog.records] == [
        f"TensorBoard's last events may be missing from {tmp_path / 'tensorboard'}: No space left on device"
    ]


def test_a_tensorboard_write_that_fails_starts_a_new_event_file_once_then_tensorboard_stops(
    tmp_path, monkeypatch, caplog
):
    # A failed event write (a full disk, the tensorboard/ folder deleted to clear old events) ended the run with
    # status 1, losing the steps since its last checkpoint, though metrics.jsonl has every figure
    pytest.importorskip("torch.utils.tensorboard")
    log = RunLog(tmp_path, tensorboard=True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    first = log.writer
    monkeypatch.setattr(first, "add_scalar", disk_full)
    with caplog.at_level(logging.WARNING):
        log.write({"step": 5, "loss": 1.0})
    assert log.writer is not first and log.writer is not None  # a new event file
    assert "could not be written in" in caplog.text and "No space left on device (errno 28)" in caplog.text
    assert "it starts a new event file" in caplog.text
    caplog.clear()
    second = log.writer
    monkeypatch.setattr(second, "add_scalar", disk_full)
    with caplog.at_level(logging.WARNING):
        log.write({"step": 6, "loss": 2.0})
        log.write({"step": 7, "loss": 3.0})
    assert log.writer is None and caplog.text.count("TensorBoard stops for this run") == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()] == [5, 6, 7]
    log.close()
    monkeypatch.undo()
    first.close()  # its thread


def test_a_tensorboard_folder_deleted_under_the_run_is_made_again_and_its_events_go_on(tmp_path, caplog):
    import shutil

    pytest.importorskip("torch.utils.tensorboard")
    log = RunLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 1.0})
    log.writer.flush()
    shutil.rmtree(tmp_path / "tensorboard")
    with caplog.at_level(logging.WARNING):
        for step in range(2, 500):  # the writer's thread fails on the next event; the step after says so
            log.write({"step": step, "loss": 1.0})
            if "it starts a new event file" in caplog.text:
                break
            time.sleep(0.01)
    log.write({"step": 500, "loss": 1.0})
    log.close()
    assert "it starts a new event file" in caplog.text and "TensorBoard stops" not in caplog.text
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tensorboard_folder_that_cannot_be_made_is_a_warning_and_metrics_go_on(tmp_path, caplog):
    # An unwritable tensorboard/ ended the run's start on two tracebacks (TensorBoard's thread's and the run's)
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    with caplog.at_level(logging.WARNING):
        log = RunLog(tmp_path, tensorboard=True)
    assert log.writer is None and "TensorBoard's events cannot be written in" in caplog.text
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_a_full_disk_under_tensorboards_writer_thread_is_the_one_line_without_the_threads_traceback(
    tmp_path, monkeypatch, caplog
):
    # TensorBoard writes its event file from a thread of its own, which ended on the OSError and printed its
    # traceback ("Exception in thread Thread-1: ...") before the run's RunLogWriteError line (a full tmpfs mid-run)
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.summary.writer import record_writer

    thread_errors = []  # what Python's hook would have printed
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    log = RunLog(tmp_path, tensorboard=True)
    another = threading.Thread(target=lambda: os.stat(tmp_path / "missing"))  # any other thread's error is said
    another.start()
    another.join()
    assert [type(error.exc_value) for error in thread_errors] == [FileNotFoundError]
    thread_errors.clear()

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", disk_full)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 1000):  # the thread's error reaches the step after the one it failed in
            log.write({"step": step, "loss": 1.0})
            if log.writer is None:  # failed twice: the new event file's thread failed as well
                break
            time.sleep(0.01)
    # The new event file failed as well: at its start, or at a later write
    assert log.writer is None and "it starts a new event file" in caplog.text
    assert "TensorBoard stops for this run" in caplog.text or "metrics go to" in caplog.text
    log.close()
    assert thread_errors == [] and threading.excepthook == thread_errors.append  # put back


def test_a_step_evaluated_again_shows_its_evaluation_once_in_tensorboard_and_keeps_its_training_figures(tmp_path):
    # A run killed after its last evaluation was logged, before it ended, evaluates that step again when it is
    # started again: TensorBoard showed the evaluation twice (found by a SIGKILL fuzz), while metrics.jsonl
    # dropped the first one
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLog(tmp_path, tensorboard=True)
    first.write({"step": 2, "loss": 2.0})
    first.write({"step": 3, "loss": 1.0})
    first.write({"step": 3, "zeroshot": {"top1": 0.5}})
    first.close()  # then killed
    again = RunLog(tmp_path, tensorboard=True, resumed_at=3, reevaluated=True)
    again.write({"step": 3, "zeroshot": {"top1": 0.5}})
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    shown = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in ("loss", "zeroshot/top1")}
    assert shown == {"loss": [(2, 2.0), (3, 1.0)], "zeroshot/top1": [(3, 0.5)]}


def test_a_resume_that_evaluates_its_step_again_says_it_drops_that_evaluation(tmp_path, caplog):
    # Only step 2's evaluation record goes: the line said "dropping 1 records of the steps after 2"
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 2, "zeroshot/x/top1": 0.5}\n')
    with caplog.at_level(logging.INFO, logger="clip.run_log"):
        RunLog(tmp_path, tensorboard=False, resumed_at=2, reevaluated=True).close()
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.0}']
    assert "dropping 1 records of step 2's evaluation and the steps after it" in caplog.text


def test_a_resume_with_nothing_to_drop_leaves_metrics_jsonl_alone(tmp_path, caplog):
    # Rewriting it anyway said "dropping 0 records", and on a full disk failed a resume that needed no write
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    path.chmod(0o444)  # a rewrite would replace it with a file of the default mode
    before = path.stat()
    with caplog.at_level(logging.INFO, logger="clip.run_log"):
        RunLog(tmp_path, tensorboard=False, resumed_at=2).close()
    after = path.stat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert "dropping" not in caplog.text


def test_a_line_of_json_that_is_not_an_object_is_dropped_on_resume_like_a_torn_one(tmp_path):
    # A hand-edited metrics.jsonl: its step cannot be known, so it is not kept (AttributeError ended the start)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n7\n{"step": 2, "loss": 1.0}\n')
    RunLog(tmp_path, tensorboard=False, resumed_at=2).close()
    assert run_log.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def test_a_full_disk_when_a_fresh_run_drops_records_does_not_claim_a_checkpoint(tmp_path, monkeypatch):
    # resumed_at=0: a run that logged steps before any checkpoint; there is no "checkpoint of step 0" to keep
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_log, "_created_afresh", full_disk)  # the rewrite's temporary file
    with pytest.raises(RunLogWriteError) as raised:
        RunLog(tmp_path, tensorboard=False, resumed_at=0)
    assert "checkpoint" not in str(raised.value)
    assert str(raised.value).endswith(f"(errno {errno.ENOSPC}); run the same command again once the file can be written")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_sync_puts_metrics_jsonl_on_the_disk_and_says_when_it_cannot(tmp_path, monkeypatch):
    # Before each checkpoint: a power cut left the records of the steps it covers missing for good
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    log = RunLog(tmp_path, tensorboard=False)
    log.sync()  # nothing logged yet: no file to sync, none made
    assert synced == [] and not (tmp_path / "metrics.jsonl").exists()
    log.write({"step": 1, "loss": 1.0})
    log.sync()
    assert synced == [str(tmp_path / "metrics.jsonl")]

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(RunLogWriteError, match=rf"^could not put {re.escape(str(tmp_path / 'metrics.jsonl'))} on "
                                               rf"the disk: Input/output error \(errno {errno.EIO}\)$"):
        log.sync()
    log.close()


def test_read_metrics_skips_blank_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n  \n{"step": 2}\n')
    assert run_log.read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    assert run_log.read_metrics(tmp_path / "none") == []


def test_strict_json_makes_the_non_finite_figures_of_a_tuple_null():
    assert run_log.strict_json({"range": (1.5, math.nan), "n": [math.inf]}) == '{"range": [1.5, null], "n": [null]}'


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    # A Ctrl-C during the write is no Exception; it too must not leave .NAME.PID.tmp behind
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), run_log.replaced_atomically(path) as file:
        file.write("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and run_log.temporaries_of(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_an_atomic_write_is_on_the_disk_before_its_rename(tmp_path, monkeypatch):
    # Renamed unsynced, a power cut could leave the new name on an empty or torn file in place of the previous
    # one, which the rename was there to prevent: the temporary's whole bytes are synced before it is renamed
    path = tmp_path / "results.json"
    path.write_text("old")
    events = record_syncs_and_renames(monkeypatch)
    with run_log.replaced_atomically(path) as file:
        file.write("the new results")
    temporary = str(tmp_path / f".results.json.{os.getpid()}.tmp")
    # the whole file at its sync, not what Python's buffer had passed on by then
    assert events == [("sync", temporary, len("the new results")), ("rename", temporary, str(path))]
    assert path.read_text() == "the new results"


def test_an_atomic_write_does_not_write_through_a_link_at_its_temporary_name(tmp_path):
    # `.NAME.PID.tmp` is a name anyone sharing the folder can foresee: a symbolic link planted there (or a file
    # a killed process of the same id left) is replaced, and the file a link names is left as it was
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("precious")
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    (path.parent / f".results.json.{os.getpid()}.tmp").symlink_to(elsewhere)
    run_log.write_json(path, {"accuracy": 0.5})
    assert elsewhere.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    previous = os.umask(0o022)  # created as open() creates a file: the umask decides, not a private 0600
    try:
        run_log.write_json(path, {"accuracy": 0.75})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    stale = path.parent / f".results.json.{os.getpid()}.tmp"
    stale.write_text("a killed write's")
    with run_log.replaced_atomically(path) as file:
        file.write("new")
    assert path.read_text() == "new" and not stale.exists()


def test_temporaries_of_lists_every_one_and_none_in_a_missing_folder(tmp_path):
    for name in (".x.pt.12.tmp", ".x.pt.345.tmp", "x.pt"):
        (tmp_path / name).write_text("")
    assert run_log.temporaries_of(tmp_path / "x.pt") == [(tmp_path / ".x.pt.12.tmp", 12),
                                                         (tmp_path / ".x.pt.345.tmp", 345)]
    assert run_log.temporaries_of(tmp_path / "missing" / "x.pt") == []


def test_no_training_plot_without_training_records(tmp_path):
    # e.g. a run stopped before its first logged step, or whose metrics.jsonl holds evaluations only
    pytest.importorskip("matplotlib")
    assert run_log.plot_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "zeroshot/x/top1": 0.5}) + "\n")
    assert run_log.plot_run(tmp_path) is None
    assert not (tmp_path / "training.png").exists()
