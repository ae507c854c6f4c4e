"""pipe: shard sources: the command's failure after its output is a read error of the shard, and a command is
ended with its whole process group when its reader stops early, and when the data worker reading it is
terminated by the loader's shutdown (a hung command was left running for good, ignoring SIGTERM)."""

from __future__ import annotations

import gzip
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from test_data_helpers import build, caption_of, take, write_shards

from clip.data import SourceConfig
from clip.data import pipe_command, shards
from clip.data.pipe_command import PipeCommand, PipeCommandFailed
from clip.data.shards import MissingSample, count_tar_samples, expand_shard_pattern, read_shard_range


def q(path: object) -> str:
    """`path` as one word of a shell command: a TMPDIR with a space in it split the commands' paths."""
    return shlex.quote(str(path))

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or shutil.which("cat") is None or shutil.which("head") is None,
    reason="needs /proc, a POSIX shell, cat and head",
)


def group_is_gone(pgid: int, within_s: float = 10.0) -> bool:
    """The process `pgid` and every process in its group have ended (a killed one may stay a zombie until init
    reaps it)."""
    deadline = time.monotonic() + within_s
    while any(live_members(pgid)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def live_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "
            if fields[0] != "Z" and pgid in (int(entry.name), int(fields[2])):  # the leader, or in its group
                members.append(int(entry.name))
    return members


def shard_of_four(tmp_path: Path) -> str:
    return expand_shard_pattern(write_shards(tmp_path, 4, 4))[0]


def gzipped_shard_of_four(tmp_path: Path) -> Path:
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(Path(shard_of_four(tmp_path)).read_bytes()))
    return packed


def sample_start(url: str, index: int) -> int:
    """The byte offset of sample `index`'s first member header (each sample has three members)."""
    with tarfile.open(url) as tar:
        return tar.getmembers()[3 * index].offset


def test_a_command_that_fails_after_whole_samples_makes_the_rest_a_read_error(tmp_path: Path) -> None:
    # Cut at a sample boundary, the output reads as a complete tar of two samples; the command's status, known only
    # when the pipe is closed, was dropped, and the two samples it never delivered read as shard_too_short ("a wrong
    # index, or a file cut short") instead of naming the failed command.
    url = shard_of_four(tmp_path)
    items = list(read_shard_range(f"pipe:head -c {sample_start(url, 2)} {q(url)}; exit 3", 0, 4))
    assert [item["txt"].decode() for item in items[:2]] == [caption_of(0), caption_of(1)]
    assert [item.kind for item in items[2:]] == ["shard_read_error"] * 2
    assert "exited with status 3" in items[2].detail
    with pytest.raises(PipeCommandFailed, match="exited with status 3"):
        count_tar_samples(f"pipe:head -c {sample_start(url, 2)} {q(url)}; exit 3")


def test_a_command_that_succeeds_or_is_stopped_early_reports_nothing(tmp_path: Path) -> None:
    url = shard_of_four(tmp_path)
    assert [item["txt"].decode() for item in read_shard_range(f"pipe:cat {q(url)}", 0, 4)] == [
        caption_of(i) for i in range(4)
    ]
    # Read to its end (json's read() reads all): a clean exit is no error
    with PipeCommand(f"cat {q(url)}") as stream:
        assert len(stream.read()) == Path(url).stat().st_size
    # Stopped after two samples while the command still writes: killed, not reported
    items = list(read_shard_range(f"pipe:cat {q(url)} {q(url)} {q(url)}; exit 3", 0, 2))
    assert [item["txt"].decode() for item in items] == [caption_of(0), caption_of(1)]


def test_a_command_still_running_after_the_tar_is_given_time_then_ended_with_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tarfile stops at the end-of-archive marker. A command that finishes a little later (a `tee` into a local
    # copy) finishes; one that keeps running (here a child keeping the output open, as a hung download would)
    # was left behind, and its read waited for bytes that never came
    monkeypatch.setattr(pipe_command, "EXIT_WAIT_S", 1.0)
    url = shard_of_four(tmp_path)
    done = tmp_path / "done"
    items = list(read_shard_range(f"pipe:cat {q(url)}; sleep 0.3; echo ok > {q(done)}", 0, 4))
    assert len(items) == 4 and done.read_text() == "ok\n"
    pid_file = tmp_path / "pid"
    for command in [f"echo $$ > {q(pid_file)}; cat {q(url)}; sleep 600",
                    f"echo $$ > {q(pid_file)}; cat {q(url)}; sleep 600 &"]:
        items = list(read_shard_range(f"pipe:{command}", 0, 4))
        assert not any(isinstance(item, MissingSample) for item in items)
        assert group_is_gone(int(pid_file.read_text())), command


def test_a_compressed_shard_whose_first_bytes_come_alone(tmp_path: Path) -> None:
    # tarfile tells gzip from tar by one read of 512 bytes: two bytes alone read the shard as a broken tar
    packed = gzipped_shard_of_four(tmp_path)
    command = f"pipe:head -c 2 {q(packed)}; sleep 0.3; tail -c +3 {q(packed)}"
    assert [item["txt"].decode() for item in read_shard_range(command, 0, 4)] == [caption_of(i) for i in range(4)]
    assert count_tar_samples(command) == 4


def test_a_size_index_from_a_command_that_fails_is_not_used() -> None:
    assert shards._read_json("""pipe:printf '{"s-000000.tar": 4}'""") == {"s-000000.tar": 4}
    assert shards._read_json("""pipe:printf '{"s-000000.tar": 4}'; exit 3""") is None


def test_a_failed_commands_error_carries_its_exit_status() -> None:
    # Said only in its message: a size index's reader could not tell curl's HTTP error (22, a missing file's among
    # them) from a failure to reach the store
    with pytest.raises(PipeCommandFailed, match="exited with status 22") as failed, \
            PipeCommand("printf x; exit 22") as stream:
        assert stream.read() == b"x"
    assert failed.value.status == 22


def test_a_process_that_exits_without_closing_its_command_ends_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        "import pathlib, time; from clip.data.pipe_command import PipeCommand\n"
        f"stream = PipeCommand({'echo $$ > ' + q(pid_file) + '; sleep 600'!r})\n"
        f"pid_file = pathlib.Path({str(pid_file)!r})\n"
        "deadline = time.monotonic() + 30\n"
        "while (not pid_file.exists() or not pid_file.read_text().strip()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, stderr=subprocess.DEVNULL)
    assert group_is_gone(int(pid_file.read_text()))


def test_once_ended_a_process_starts_no_more_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker terminated by its parent ends its commands from another thread; its main thread, whose read the
    # kill ended, went on to the next shard and started its command before the worker's exit
    monkeypatch.setattr(pipe_command, "_ended_in", set())
    pid_file = tmp_path / "pid"
    stream = PipeCommand(f"echo $$ > {q(pid_file)}; sleep 600")
    deadline = time.monotonic() + 30  # (a command that never writes it failed the test by hanging)
    while (not pid_file.exists() or not pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pipe_command.end_running_commands()
    assert group_is_gone(int(pid_file.read_text()))
    stream.close()  # closing after the end is no error
    with pytest.raises(OSError, match="this process is ending"):
        PipeCommand("true")


def test_a_hung_command_ends_with_the_worker_the_loader_terminates(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    source = SourceConfig(
        kind="shards", path=f"pipe:echo $$ > {q(pid_file)}; sleep 600 && cat never.tar", num_samples=4, name="hung"
    )
    data = build([source], batch_size=2, workers=1, worker_timeout_s=1.0)
    with pytest.raises(RuntimeError, match="no batch from the data workers"):
        take(data, 1)
    data.close()
    # torch's shutdown waits for the worker a few seconds before it terminates it
    assert group_is_gone(int(pid_file.read_text()), within_s=30.0)


def test_without_workers_pipe_and_remote_shards_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # data.worker_timeout_s applies to workers only: a hung read in the training process hangs the run, and
    # SIGTERM is acted on only after the read
    url = shard_of_four(tmp_path)
    said = "data.workers = 0: the training process reads source(s) piped itself"
    for workers, path, warned in [(0, f"pipe:cat {q(url)}", True), (1, f"pipe:cat {q(url)}", False), (0, url, False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="clip.data.loader"):
            build([SourceConfig(kind="shards", path=path, num_samples=4, name="piped")], workers=workers).close()
        assert (said in caplog.text) == warned, (workers, path)


def test_a_compressed_shard_whose_last_bytes_come_alone_while_the_output_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the first read waits for a whole tar block: gzip data is no whole blocks, and a read waiting for the
    # rest of one after the last bytes hung for as long as the command kept its output open
    monkeypatch.setattr(pipe_command, "EXIT_WAIT_S", 1.0)
    packed = gzipped_shard_of_four(tmp_path)
    size = packed.stat().st_size
    command = f"pipe:head -c {size - 100} {q(packed)}; sleep 0.3; tail -c 100 {q(packed)}; sleep 600"

    def hung(signum, frame):
        raise TimeoutError("the read waits for bytes the command never writes")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        items = list(read_shard_range(command, 0, 4))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [item["txt"].decode() for item in items] == [caption_of(i) for i in range(4)]


def test_a_command_still_writing_after_the_tar_is_read_on_until_it_ends(tmp_path: Path) -> None:
    # The tar's end-of-archive marker comes before the end of its last record (a tar of 1 MB records): the pipe
    # closed there, a `tee` keeping a local copy of the shard died of SIGPIPE with the copy cut short
    url = shard_of_four(tmp_path)
    padded = tmp_path / "padded.tar"
    padded.write_bytes(Path(url).read_bytes() + bytes(1 << 20))
    copy = tmp_path / "copy.tar"
    items = list(read_shard_range(f"pipe:cat {q(padded)} | tee {q(copy)}", 0, 4))
    assert len(items) == 4 and copy.read_bytes() == padded.read_bytes()


class Stopped(BaseException):
    """What the trainer's handler raises to stop one process in its wait for data (DataWaitInterrupted)."""


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises Stopped in the main thread, as the trainer's handler does in a one-process wait for data."""
    def stop(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_raised_as_a_command_starts_ends_it(tmp_path: Path, monkeypatch, sigterm_raises) -> None:
    # Raised inside Popen, after the fork, the stop left the command running and in no table, for good: it
    # ignores SIGTERM, and a stalled download never exits
    import os

    started = []
    real_popen = subprocess.Popen

    def signalled_as_it_starts(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process)
        os.kill(os.getpid(), signal.SIGTERM)
        return process

    monkeypatch.setattr(pipe_command.subprocess, "Popen", signalled_as_it_starts)
    with pytest.raises(Stopped):
        PipeCommand("sleep 600")
    assert group_is_gone(started[0].pid) and pipe_command._running == {}


def test_a_stop_while_a_finished_shards_command_is_waited_for_ends_it(
    tmp_path: Path, monkeypatch, sigterm_raises
) -> None:
    # The tar is read, and close() gives the command EXIT_WAIT_S to end: a stop in that wait (one process, its data
    # read in the training process) left it running after the run had stopped
    import threading

    url = shard_of_four(tmp_path)
    pid_file = tmp_path / "pid"
    # The second closes its output first: close() has let go of the pipe and waits for its exit when the stop
    # comes, and ending it is left to abandon()
    for after_the_tar in ("sleep 600", "exec >&-; sleep 600"):
        timer = threading.Timer(1.0, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM))
        timer.start()
        with pytest.raises(Stopped):
            list(read_shard_range(f"pipe:echo $$ > {q(pid_file)}; cat {q(url)}; {after_the_tar}", 0, 4))
        timer.join()
        assert group_is_gone(int(pid_file.read_text())) and pipe_command._running == {}, after_the_tar
