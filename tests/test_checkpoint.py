"""clip.checkpoint on its own: no resume from unreadable files, pruning that keeps the new save, leftovers of
killed saves, and the permissions of the files it writes. (End to end with training: test_train_loop.py.)"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from clip import checkpoint as ckpt


def save(run_dir: Path, step: int, keep_last: int = 3) -> Path:
    return ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": step}, run_dir, step, keep_last)


def tear(path: Path) -> None:
    """Truncates a checkpoint as a disk or network file system fault (or an interrupted copy) would."""
    path.write_bytes(path.read_bytes()[:100])


def steps(run_dir: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(run_dir)]


def test_only_unreadable_checkpoints_are_an_error_naming_each_file(tmp_path):
    # A run without checkpoint files starts fresh; one whose files all fail to load must not, or it would
    # restart at step 0 beside them (and keep_last pruning kept the old, higher step numbers).
    assert ckpt.load_latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert ckpt.load_latest_checkpoint(tmp_path) is None
    tear(save(tmp_path, 30))
    torch.save({"step": 20, "model": {}}, ckpt.checkpoint_path(tmp_path, 20))  # no format entry
    torch.save({"format": "clip-pretrain/0", "step": 10}, ckpt.checkpoint_path(tmp_path, 10))  # another version
    torch.save({"step": 5, "args": argparse.Namespace(lr=1)}, ckpt.checkpoint_path(tmp_path, 5))  # needs pickled code
    with pytest.raises(ckpt.NoReadableCheckpointError) as raised:
        ckpt.load_latest_checkpoint(tmp_path)
    message = str(raised.value)
    assert "step_00000030.pt: RuntimeError: PytorchStreamReader failed reading zip archive" in message
    assert "step_00000020.pt: ValueError:" in message and "has no format entry" in message
    assert "format 'clip-pretrain/0'; this trainer reads checkpoints of format 'clip-pretrain/1'" in message
    assert "step_00000005.pt: UnpicklingError:" in message and "argparse.Namespace" in message
    assert "move them aside" in message
    assert steps(tmp_path) == [30, 20, 10, 5]  # nothing was deleted


def test_a_checkpoint_damaged_after_its_save_or_with_non_finite_weights_is_skipped(tmp_path, caplog):
    # torch.load reads a file whose bytes changed on disk without complaint: a run resumed from garbage.
    weights = torch.arange(1000, dtype=torch.float32)
    for step in (10, 20):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": step, "model": {"w": weights}},
                             tmp_path, step, keep_last=3)
    path = ckpt.checkpoint_path(tmp_path, 20)
    data = bytearray(path.read_bytes())
    at = data.find(weights.numpy().tobytes()[:64])
    data[at + 400 : at + 404] = torch.tensor([12345.0]).numpy().tobytes()  # a finite, wrong weight
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"][100] == 12345.0  # torch itself does not notice
    with caplog.at_level("WARNING"):
        assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 10
    assert "step_00000020.pt is damaged: its member" in caplog.text and "does not match the checksum" in caplog.text

    poisoned = weights.clone()
    poisoned[5] = float("nan")
    ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 30, "model": {"w": poisoned, "n": torch.ones(1)}},
                         tmp_path, 30, keep_last=3)
    with caplog.at_level("WARNING"):
        assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 10
    assert "step_00000030.pt holds non-finite weights (w)" in caplog.text


def test_a_storage_error_on_the_newest_checkpoint_stops_the_resume_instead_of_rewinding_it(tmp_path, monkeypatch, caplog):
    # An EIO or ESTALE from a network file system was taken for a damaged file: the run resumed a checkpoint
    # interval back, and its next save overwrote the good newer file. Errors of the contents still skip.
    for step in (10, 20):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": step, "model": {}}, tmp_path, step, keep_last=3)
    read = ckpt.read_checkpoint

    def failing_on(code: int):
        def read_or_fail(path, verify=True):
            if path == ckpt.checkpoint_path(tmp_path, 20):
                raise OSError(code, os.strerror(code))
            return read(path, verify)
        return read_or_fail

    for code in (errno.EIO, errno.ESTALE, errno.EACCES):
        monkeypatch.setattr(ckpt, "read_checkpoint", failing_on(code))
        with pytest.raises(ckpt.NoReadableCheckpointError) as raised:
            ckpt.latest_readable_checkpoint(tmp_path)
        assert f"could not read {ckpt.checkpoint_path(tmp_path, 20)} (step 20): " in str(raised.value)
        assert "a storage error, not a damaged file" in str(raised.value) and "move this one aside" in str(raised.value)
    # torch seeking before the start of a torn file raises EINVAL: that file is skipped, as before
    monkeypatch.setattr(ckpt, "read_checkpoint", failing_on(errno.EINVAL))
    with caplog.at_level("WARNING"):
        assert ckpt.latest_readable_checkpoint(tmp_path)[1]["step"] == 10
    assert "step_00000020.pt (step 20) is unreadable and skipped: OSError" in caplog.text
    assert steps(tmp_path) == [20, 10]
    monkeypatch.undo()
    # The same in the checksum pass over the real file, which reads the whole archive once more: an EIO there
    # was reported as damage ("its member ... cannot be read"), and the run fell back a checkpoint
    import zipfile

    opened = zipfile.ZipFile.open
    newest = str(ckpt.checkpoint_path(tmp_path, 20))

    def open_failing_on_the_newest(self, name, *args, **kwargs):
        member = opened(self, name, *args, **kwargs)
        if self.filename == newest:
            member.read = lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO)))
        return member

    monkeypatch.setattr(zipfile.ZipFile, "open", open_failing_on_the_newest)
    with pytest.raises(ckpt.NoReadableCheckpointError, match=r"step_00000020.pt \(step 20\): OSError: \[Errno 5\] "
                                                             r"Input/output error -- a storage error"):
        ckpt.latest_readable_checkpoint(tmp_path)


def test_running_out_of_memory_on_the_newest_checkpoint_stops_the_resume_instead_of_rewinding_it(tmp_path):
    # torch's allocator failing while the newest checkpoint loads (a larger model resumed on a fuller machine) was
    # taken for a damaged file, as a storage error was: the run resumed an older checkpoint, and its next saves
    # overwrote the newer one. Here a real allocation fails: the address space is limited below the newest
    # checkpoint's size, in a fork (the limit is process-wide).
    from multiprocess import run_in_fork

    ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 10, "model": {}}, tmp_path, 10, keep_last=3)
    ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 20, "model": {"w": torch.ones(64 << 20)}},
                         tmp_path, 20, keep_last=3)
    outcome = run_in_fork(_resume_and_read_with_128_mib_to_spare, tmp_path)
    assert outcome["resume"].startswith(f"could not read {ckpt.checkpoint_path(tmp_path, 20)} (step 20): RuntimeError")
    assert "ran out of memory, which says nothing about the file" in outcome["resume"], outcome
    # clip.load's reader lets the failure through as it is, not as "a damaged or truncated PyTorch file" (a run
    # directory's reader would then have taken an older checkpoint)
    assert outcome["weights"] == "RuntimeError" and outcome["weights_is_memory"], outcome
    assert steps(tmp_path) == [20, 10]



def legacy_file_declaring(path: Path, elements: int) -> None:
    """A torch.save file in the pre-zip format whose one tensor declares `elements` float32 elements and holds
    none: that format allocates a storage at its declared size before reading its bytes."""
    import struct

    count = 123_457  # a number that only the storage's and the tensor's size spell
    torch.save({"w": torch.zeros(count)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    declared = b"\x8a\x08" + elements.to_bytes(8, "little")  # pickle's LONG1
    patched = data.replace(b"J" + struct.pack("<i", count), declared)  # BININT
    assert patched.count(declared) == 2
    path.write_bytes(patched[: patched.index(declared) + 400])


def test_a_checkpoint_declaring_a_tensor_larger_than_itself_is_skipped_not_taken_for_a_lack_of_memory(
    tmp_path, caplog
):
    # 2**52 bytes, more than any address space: torch's allocator fails, and that failure said "this machine ran
    # out of memory" (no fallback) for a few hundred bytes of damage
    save(tmp_path, 10)
    newest = ckpt.checkpoint_path(tmp_path, 20)
    legacy_file_declaring(newest, 2**50)
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_readable_checkpoint(tmp_path)[1]["step"] == 10
    assert f"{newest} is damaged: it declares a tensor of {2**52} bytes, more than the whole file's" in caplog.text

def _resume_and_read_with_128_mib_to_spare(run_dir: Path) -> dict:
    import re
    import resource

    from clip.exception_chain import out_of_memory_in
    from clip.weights_file import read_weights

    size = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))
    outcome = {}
    try:
        ckpt.latest_readable_checkpoint(run_dir)
        outcome["resume"] = "loaded"
    except ckpt.NoReadableCheckpointError as error:
        outcome["resume"] = str(error)
    try:
        read_weights(ckpt.checkpoint_path(run_dir, 20))
        outcome["weights"] = "loaded"
    except Exception as error:
        outcome["weights"], outcome["weights_is_memory"] = type(error).__name__, out_of_memory_in(error) is error
    return outcome


def test_an_older_checkpoint_whose_zip_directory_zipfile_refuses_does_not_fail_later_saves(tmp_path, caplog):
    # One damaged byte ("version needed to extract" 25.5) made zipfile raise NotImplementedError in pruning's
    # check: every later save raised after writing its file, and the run stopped
    state = {"format": ckpt.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(3)}}
    first = ckpt.save_checkpoint({**state, "step": 1}, tmp_path, 1, keep_last=2)
    data = bytearray(first.read_bytes())
    data[data.find(b"PK\x01\x02") + 6] = 0xFF
    first.write_bytes(bytes(data))
    for step in (2, 3, 4):
        ckpt.save_checkpoint({**state, "step": step}, tmp_path, step, keep_last=2)
    assert steps(tmp_path)[:2] == [4, 3] and ckpt.load_latest_checkpoint(tmp_path)["step"] == 4


def test_memory_failures_are_recognised_through_the_errors_raised_from_them():
    from clip.exception_chain import out_of_memory_in

    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")
    for failure in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory"), allocator):
        try:
            try:
                raise failure
            except Exception as error:
                raise ValueError("wrapped") from error
        except ValueError as wrapped:
            assert out_of_memory_in(wrapped) is failure
    assert out_of_memory_in(RuntimeError("PytorchStreamReader failed reading zip archive")) is None
    assert out_of_memory_in(OSError(errno.ENOMEM, "no memory")) is None  # a storage errno: judged as one


def a_full_disk_in_torch_save(monkeypatch) -> None:
    """torch.save as it fails on a full disk: its archive writer's RuntimeError, raised from the OSError."""
    real_save = torch.save

    def disk_full(state, file):
        real_save(state, file)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from cause

    monkeypatch.setattr(torch, "save", disk_full)


def test_a_save_that_runs_out_of_disk_says_so_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    # torch.save's own error was "[enforce fail at inline_container.cc:672] unexpected pos", the cause
    # (a full disk, a quota, ulimit -f) only further up the chained traceback.
    save(tmp_path, 10)
    save(tmp_path, 30)  # a file of a later step (one the run could not read, and resumed below) is not named
    tear(save(tmp_path, 15))
    ckpt.checkpoint_path(tmp_path, 30).write_bytes(b"not a checkpoint")
    a_full_disk_in_torch_save(monkeypatch)
    with pytest.raises(ckpt.CheckpointWriteError) as raised:
        save(tmp_path, 20)
    assert str(raised.value) == (f"could not write {ckpt.checkpoint_path(tmp_path, 20)}: No space left on device "
                                 f"(errno {errno.ENOSPC}); the latest checkpoint before it, "
                                 f"{ckpt.checkpoint_path(tmp_path, 10)}, is kept")
    assert steps(tmp_path) == [30, 15, 10] and not list((tmp_path / "checkpoints").glob(".*"))


def test_a_first_save_that_runs_out_of_disk_does_not_claim_earlier_checkpoints(tmp_path, monkeypatch):
    # It said "the checkpoints saved before it are kept" where there were none
    a_full_disk_in_torch_save(monkeypatch)
    with pytest.raises(ckpt.CheckpointWriteError) as raised:
        save(tmp_path, 20)
    assert str(raised.value) == (f"could not write {ckpt.checkpoint_path(tmp_path, 20)}: No space left on device "
                                 f"(errno {errno.ENOSPC}); no checkpoint had been saved before it")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def files_that_raise_after(limit: int, error: BaseException, real_fdopen=os.fdopen):
    """A stand-in for os.fdopen whose files raise `error` from a write once `limit` bytes are written: a signal
    handler that raises inside torch.save's write."""

    class InterruptedFile:
        def __init__(self, descriptor, mode):
            self.file, self.written = real_fdopen(descriptor, mode), 0

        def write(self, data):
            self.written += len(data)
            if self.written > limit:
                raise error
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    return InterruptedFile


def test_a_second_ctrl_c_during_a_save_is_a_keyboard_interrupt_not_a_write_error(tmp_path, monkeypatch):
    # A second Ctrl-C stops the run at once (clip.stopping). Raised from the signal handler inside torch.save's
    # write, it met the archive writer's closing check, whose RuntimeError ("[enforce fail at
    # inline_container.cc:672] . unexpected pos") the run stopped with, reading as a failed write.
    save(tmp_path, 10)
    monkeypatch.setattr(ckpt.os, "fdopen", files_that_raise_after(4096, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "weights": torch.zeros(100_000)}, tmp_path, 20, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010.pt"]


def test_a_data_worker_killed_during_a_save_is_the_error_not_the_archive_writers_check(tmp_path, monkeypatch):
    # The DataLoader's SIGCHLD handler reports a dead worker (the OOM killer, a kill -9) by raising wherever the
    # training process is. Inside torch.save's write, the archive writer's closing check raised next, and the
    # run ended on "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos", as did train.log's
    # line: a failed write, not the dead worker (seen with a worker killed mid-run).
    save(tmp_path, 10)
    worker_died = RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed. ")
    monkeypatch.setattr(ckpt.os, "fdopen", files_that_raise_after(4096, worker_died))
    with pytest.raises(RuntimeError) as raised:
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "weights": torch.zeros(100_000)}, tmp_path, 20, 3)
    assert raised.value is worker_died
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010.pt"]


def test_a_checkpoint_file_that_cannot_be_created_is_a_write_error(tmp_path, monkeypatch):
    # An inode quota or a read-only mount fails at the file's creation, before torch.save: that OSError
    # escaped the one-line error (and, under DDP, the ranks' agreement)
    def quota(final):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(final))

    monkeypatch.setattr(ckpt, "_create_temporary", quota)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write .*step_00000010\.pt: Disk quota exceeded"):
        save(tmp_path, 10)


def test_a_rank_that_sees_checkpoints_rank_0_does_not_says_so(tmp_path, monkeypatch, caplog):
    # A node-local output_dir: rank 0 found none, so every rank starts afresh together, which rank 1 names.
    import clip.resume as resume
    from clip.distributed import DistributedInfo

    save(tmp_path, 10)
    monkeypatch.setattr(resume, "from_rank_zero", lambda value, dist_info: None)  # rank 0's choice: no checkpoint
    rank_1 = DistributedInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with caplog.at_level("WARNING"):
        assert resume.checkpoint_to_resume(tmp_path, rank_1) is None
    assert "rank 1 sees checkpoints in" in caplog.text and "the run starts from step 0" in caplog.text


def test_a_checkpoint_saved_without_checksums_is_read(tmp_path):
    # torch writes CRC 0 for every member when told not to compute them (faster saves of large files);
    # every such checkpoint was refused as damaged.
    torch.serialization.set_crc32_options(False)
    try:
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 10, "model": {"w": torch.ones(100)}},
                             tmp_path, 10, keep_last=3)
    finally:
        torch.serialization.set_crc32_options(True)
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 10


def test_pruning_keeps_the_new_save_below_unreadable_checkpoints(tmp_path):
    # Resumed from step 10 because 30 is torn and 40 is another program's file: the saves of steps 20 and
    # 25 must not be pruned by the higher numbers they cannot read. Those are left for a save to replace.
    save(tmp_path, 10)
    tear(save(tmp_path, 30))
    torch.save({"weights": torch.zeros(2)}, ckpt.checkpoint_path(tmp_path, 40))
    save(tmp_path, 20, keep_last=1)
    assert steps(tmp_path) == [40, 30, 20]
    save(tmp_path, 25, keep_last=2)
    assert steps(tmp_path) == [40, 30, 25, 20]
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 25


def test_pruning_counts_and_deletes_only_complete_looking_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    tear(ckpt.checkpoint_path(tmp_path, 2))  # would otherwise take the place of step 1 or 3
    save(tmp_path, 4, keep_last=3)
    assert steps(tmp_path) == [4, 3, 2, 1]  # 4, 3 and 1 are the three kept; the torn 2 is not touched
    save(tmp_path, 5, keep_last=3)
    assert steps(tmp_path) == [5, 4, 3, 2]


def damage(path: Path) -> None:
    """Changes a weight inside a checkpoint saved with `saved_with_weights`, as a bad sector or a faulty copy would:
    the archive stays whole, and torch.load reads it without a word."""
    data = bytearray(path.read_bytes())
    at = data.find(WEIGHTS.numpy().tobytes()[:64])
    data[at + 400 : at + 404] = torch.tensor([12345.0]).numpy().tobytes()
    path.write_bytes(bytes(data))


WEIGHTS = torch.arange(1000, dtype=torch.float32)


def saved_with_weights(run_dir: Path, step: int, keep_last: int) -> Path:
    state = {"format": ckpt.CHECKPOINT_FORMAT, "step": step, "model": {"w": WEIGHTS}}
    return ckpt.save_checkpoint(state, run_dir, step, keep_last)


def readable_steps(run_dir: Path) -> list[int]:
    readable = []
    for step, path in ckpt.list_checkpoints(run_dir):
        try:
            ckpt.read_checkpoint(path)
        except ValueError:
            continue
        readable.append(step)
    return readable


def test_pruning_keeps_keep_last_readable_checkpoints_past_a_damaged_one(tmp_path, caplog):
    # A file damaged after its save (its checksums no longer match) looks complete, and took one of the keep_last
    # places: a resume skips it, so one fallback fewer was left than asked for.
    for step in (10, 20):
        saved_with_weights(tmp_path, step, keep_last=2)
    damage(ckpt.checkpoint_path(tmp_path, 20))
    with caplog.at_level(logging.WARNING):
        saved_with_weights(tmp_path, 30, keep_last=2)
    assert readable_steps(tmp_path) == [30, 10]
    assert steps(tmp_path) == [30, 20, 10]
    assert f"{ckpt.checkpoint_path(tmp_path, 20)} is damaged: its member" in caplog.text
    assert "not counted among the checkpoints that pruning keeps (checkpoint.keep_last)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        saved_with_weights(tmp_path, 40, keep_last=3)
    assert steps(tmp_path) == [40, 30, 20, 10]
    assert "damaged" not in caplog.text  # said once, as the file was read once
    saved_with_weights(tmp_path, 50, keep_last=2)  # older than the kept ones, it goes as any older file does
    assert steps(tmp_path) == [50, 40]


def test_a_data_worker_death_while_pruning_checks_a_checkpoint_is_raised_not_taken_for_damage(
    tmp_path, monkeypatch, caplog
):
    # torch's DataLoader reports a dead worker with a plain RuntimeError, raised by its SIGCHLD handler wherever
    # the training process is. Landing in the CRC check of a kept checkpoint, it was caught as the member's read
    # error: the sound checkpoint was warned of as damaged, that answer cached for the process, and the death
    # itself swallowed.
    import zipfile

    for step in (10, 20, 30):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": step, "model": {"w": WEIGHTS}}, tmp_path,
                             step, keep_last=2, prune=False)  # unchecked: the check below is their first
    opened = zipfile.ZipFile.open
    death = "DataLoader worker (pid 12345) is killed by signal: Killed. "

    def open_with_a_worker_dying(self, name, *args, **kwargs):
        member = opened(self, name, *args, **kwargs)
        member.read = lambda *a: (_ for _ in ()).throw(RuntimeError(death))
        return member

    monkeypatch.setattr(zipfile.ZipFile, "open", open_with_a_worker_dying)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=r"DataLoader worker \(pid 12345\)"):
        ckpt.prune_checkpoints(tmp_path, 30, keep_last=2)
    assert "damaged" not in caplog.text
    assert steps(tmp_path) == [30, 20, 10]
    monkeypatch.undo()
    assert ckpt.prune_checkpoints(tmp_path, 30, keep_last=2) == [ckpt.checkpoint_path(tmp_path, 10)]
    assert steps(tmp_path) == [30, 20]


def test_stray_temporary_files_of_killed_saves_are_removed(tmp_path, monkeypatch):
    # The name save_checkpoint uses, recorded on its way to the rename (a SIGKILL before the rename leaves it).
    used = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda source, target: used.append(Path(source)) or real_replace(source, target))
    kept = save(tmp_path, 7)
    folder = tmp_path / "checkpoints"
    leftovers = [
        used[0],
        folder / ".step_00000009.pt.k3_x9a0q.tmp",  # tempfile.mkstemp's names, from earlier versions
    ]
    unrelated = [
        folder / ".step_00000009.pt.abc.tmp",  # not the random part's length
        folder / ".step_00000009.pt.abcdefgh.tmp.bak",
        folder / "step_00000009.pt.abcdefgh.tmp",  # no leading dot
        folder / "notes.tmp",
        tmp_path / ".step_00000009.pt.abcdefgh.tmp",  # not in the checkpoint folder
    ]
    for path in leftovers + unrelated:
        path.write_bytes(b"PK\x03\x04 partial")
    (folder / ".step_00000010.pt.abcdefgh.tmp").mkdir()  # only files are removed

    assert sorted(ckpt.remove_stray_temporaries(tmp_path)) == sorted(leftovers)
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in unrelated) and kept.exists()
    assert ckpt.remove_stray_temporaries(tmp_path / "no-such-run") == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoints_get_the_permissions_of_a_new_file_under_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save(tmp_path, 1)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def finishes_within(call, fifo: Path, seconds: float = 20.0):
    """call()'s result, or a test failure if it is still running after `seconds` (waiting on `fifo`): the
    FIFO is then opened for writing and closed, so the waiting reader sees an end and the thread ends."""
    outcome = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(seconds)
        pytest.fail(f"still waiting on {fifo.name} after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_a_fifo_named_like_a_checkpoint_is_skipped_with_a_warning_not_waited_on(tmp_path, caplog):
    # Opening a FIFO for reading waits for a writer: a resume (and the pruning after a save) hung forever.
    elsewhere = tmp_path / "elsewhere"
    ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 5}, elsewhere, 5, keep_last=3)
    save(tmp_path, 10)
    fifo = ckpt.checkpoint_path(tmp_path, 20)
    os.mkfifo(fifo)
    ckpt.checkpoint_path(tmp_path, 30).symlink_to(fifo)  # a symlink to a FIFO is no regular file either
    ckpt.checkpoint_path(tmp_path, 40).mkdir()
    with caplog.at_level("WARNING"):
        path, state = finishes_within(lambda: ckpt.latest_readable_checkpoint(tmp_path), fifo)
    assert path == ckpt.checkpoint_path(tmp_path, 10) and state["step"] == 10
    assert f"{fifo} is a FIFO (named pipe), not a regular file" in caplog.text
    assert f"{ckpt.checkpoint_path(tmp_path, 30)} is a FIFO (named pipe), not a regular file" in caplog.text
    assert f"{ckpt.checkpoint_path(tmp_path, 40)} is a folder, not a regular file" in caplog.text

    # Pruning below the FIFO neither waits on it nor counts or deletes it: keep_last=1 deletes only step 10.
    finishes_within(lambda: save(tmp_path, 25, keep_last=1), fifo)
    assert steps(tmp_path) == [40, 30, 25, 20] and stat.S_ISFIFO(fifo.lstat().st_mode)

    # A symlink to a regular checkpoint is read as before.
    ckpt.checkpoint_path(tmp_path, 50).symlink_to(ckpt.checkpoint_path(elsewhere, 5))
    assert finishes_within(lambda: ckpt.load_latest_checkpoint(tmp_path), fifo)["step"] == 5


def test_a_run_whose_only_checkpoint_is_a_fifo_cannot_resume_and_is_told_why(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    fifo = ckpt.checkpoint_path(tmp_path, 20)
    os.mkfifo(fifo)
    with pytest.raises(ckpt.NoReadableCheckpointError, match=r"step_00000020\.pt: ValueError: .* is a FIFO"):
        finishes_within(lambda: ckpt.latest_readable_checkpoint(tmp_path), fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_keep_last_below_one_keeps_only_the_new_save(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    save(tmp_path, 4, keep_last=0)
    assert steps(tmp_path) == [4]


def test_checkpoints_are_ordered_by_step_also_past_eight_digits_and_other_names_are_ignored(tmp_path):
    save(tmp_path, 99_999_999)
    save(tmp_path, 100_000_000)  # "step_100000000.pt" sorts below "step_99999999.pt" as a name
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    for name in ("step_1.pt", "step_00000005.pt.bak", "step_00000006.pt~", "xstep_00000007.pt"):
        (folder / name).write_bytes(b"")
    assert steps(tmp_path) == [100_000_000, 99_999_999]
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 100_000_000


def test_rank_seeds_differ_by_rank_and_by_the_step_a_run_resumes_at():
    assert [ckpt.rank_seed(7, rank) for rank in range(3)] == [7, 8, 9]  # a new run: seed + rank
    resumed = {(rank, step): ckpt.rank_seed(7, rank, step) for rank in range(3) for step in (5, 6)}
    assert len(set(resumed.values())) == 6 and not set(resumed.values()) & {7, 8, 9}
    assert ckpt.rank_seed(7, 1, 5) == ckpt.rank_seed(7, 1, 5)


def test_the_captured_rng_state_replays_every_generator():
    import random

    import numpy as np

    outside = ckpt.capture_rng_state()  # given back at the end: other tests' draws stay as they were
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(), np.random.random(5), np.random.normal(), torch.rand(2)  # mid-stream, gaussians cached
    state = ckpt.capture_rng_state()
    drawn = (random.gauss(), np.random.random(3).tolist(), np.random.normal(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    replayed = (random.gauss(), np.random.random(3).tolist(), np.random.normal(), torch.rand(3).tolist())
    ckpt.restore_rng_state(outside)
    assert replayed == drawn


def _whole_resume_state(ranks: int = 2) -> dict:
    config = {section: {} for section in ("model", "loss", "optimizer", "train")}
    return {"step": 0, "model": {}, "config": config, "optimizer": {}, "scaler": {},
            "rng": [ckpt.capture_rng_state() for _ in range(ranks)], "data": [{} for _ in range(ranks)]}


def test_incomplete_entries_names_what_a_resume_lacks_for_each_rank():
    from clip.resume import incomplete_entries

    assert incomplete_entries(_whole_resume_state()) == []
    state = _whole_resume_state()
    state["step"] = -1
    assert incomplete_entries(state) == ["'step' is -1, not a step count"]
    state = _whole_resume_state()
    state["data"].append({})
    assert incomplete_entries(state) == ["'rng' holds 2 ranks' states but 'data' 3"]
    state = _whole_resume_state()
    del state["rng"][1]["numpy_pos"], state["rng"][1]["torch"]
    assert incomplete_entries(state) == ["'rng' of rank 1 lacks 'numpy_pos', 'torch'"]


def test_a_refused_entry_is_named_in_one_line_without_torchs_source_lines():
    from clip.resume import ResumeRefused, entry_restored

    cpp = "size mismatch for w:\n  copying a param\nException raised from copy_ at /torch/x.cpp:12\nframe #0: ..."
    with pytest.raises(ResumeRefused) as refused, entry_restored("the model's weights", Path("run"), 4):
        raise RuntimeError(cpp)
    message = str(refused.value)
    assert "\n" not in message and "Exception raised" not in message and "frame" not in message
    assert "(RuntimeError: size mismatch for w: copying a param); move it aside" in message
    with pytest.raises(ResumeRefused) as refused, entry_restored("the data state", Path("run"), 4):
        raise ValueError("x" * 1000)
    assert f"ValueError: {'x' * 400}...)" in str(refused.value) and "x" * 401 not in str(refused.value)


def test_running_out_of_memory_while_restoring_an_entry_is_not_blamed_on_the_checkpoint():
    # torch.OutOfMemoryError is a RuntimeError: taken for an entry that does not fit, it would send the user to move
    # a good checkpoint aside
    from clip.resume import entry_restored

    with pytest.raises(torch.OutOfMemoryError), entry_restored("its 'model' entry", Path("run"), 4):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_older_checkpoint_that_cannot_be_deleted_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    # The new checkpoint is saved: an old one left behind costs only disk space, not the run
    save(tmp_path, 1)
    stuck = ckpt.checkpoint_path(tmp_path, 1)
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if path == stuck:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level("WARNING", logger="clip.checkpoint"):
        save(tmp_path, 2, keep_last=1)
    assert steps(tmp_path) == [2, 1]
    assert "could not delete the older checkpoint" in caplog.text and "Permission denied" in caplog.text


def test_a_zip_without_a_data_pkl_does_not_count_as_a_complete_checkpoint(tmp_path):
    # Another program's zip under a checkpoint's name is no save of this run: it took a keep_last place
    import zipfile

    save(tmp_path, 1)
    with zipfile.ZipFile(ckpt.checkpoint_path(tmp_path, 2), "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    save(tmp_path, 3, keep_last=2)
    assert steps(tmp_path) == [3, 2, 1]


def test_a_symlink_named_like_a_temporary_file_is_not_removed(tmp_path):
    # No save writes through a link: one of that name is someone's, not a leftover of a killed save
    save(tmp_path, 1)
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"data")
    link = tmp_path / ckpt.CHECKPOINT_DIR / ".step_00000002.pt.abcd1234.tmp"
    link.symlink_to(target)
    assert ckpt.remove_stray_temporaries(tmp_path) == []
    assert link.is_symlink() and target.exists()


def test_read_checkpoint_names_non_finite_weights_unless_told_not_to_verify(tmp_path):
    nan = torch.tensor([float("nan")])
    state = {"format": ckpt.CHECKPOINT_FORMAT, "step": 1, "model": {"a": nan, "b": nan, "c": nan}}
    path = ckpt.save_checkpoint(state, tmp_path, 1, keep_last=1)
    with pytest.raises(ValueError, match=r"holds non-finite weights \(a, b, c\)$"):  # all three: no "..."
        ckpt.read_checkpoint(path)
    assert ckpt.read_checkpoint(path, verify=False)["model"]["a"].isnan().all()  # resume.py: rank 0 verified it


def test_an_unreadable_checkpoint_is_named_with_the_first_sentence_of_its_error(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def unreadable(path, verify=True):
        raise RuntimeError("PytorchStreamReader failed locating file data.pkl. The rest is advice\non more lines")

    monkeypatch.setattr(ckpt, "read_checkpoint", unreadable)
    with pytest.raises(ckpt.NoReadableCheckpointError) as raised:
        ckpt.load_latest_checkpoint(tmp_path)
    assert "step_00000001.pt: RuntimeError: PytorchStreamReader failed locating file data.pkl\n" in str(raised.value)
    assert "advice" not in str(raised.value)


def test_a_signal_while_the_latest_checkpoint_is_read_abandons_the_start_instead_of_skipping_the_file(
        tmp_path, monkeypatch):
    # A signal abandons the start of a run while it reads its checkpoint; caught as the file's own failure, it
    # would skip the newest checkpoint as unreadable and resume from an older one, losing the steps since.
    import signal

    from clip.stopping import SetupInterrupted, StopRequest

    save(tmp_path, 10)
    save(tmp_path, 20)
    real_read = ckpt.read_checkpoint

    def read_while_signalled(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "read_checkpoint", read_while_signalled)
    with StopRequest() as stop, pytest.raises(SetupInterrupted), stop.interrupting(SetupInterrupted):
        ckpt.load_latest_checkpoint(tmp_path)
    monkeypatch.undo()
    assert steps(tmp_path) == [20, 10] and ckpt.load_latest_checkpoint(tmp_path)["step"] == 20


def test_a_save_is_on_disk_before_its_rename_and_the_rename_before_older_saves_are_pruned(tmp_path, monkeypatch):
    # A crash or power loss must leave the previous checkpoints or the whole new one: the file's bytes are
    # flushed and synced before the rename makes it the latest, and the rename is synced before pruning
    # deletes what a resume would otherwise fall back to.
    save(tmp_path, 1)
    events = []
    real_fsync, real_replace, real_prune = os.fsync, os.replace, ckpt.prune_checkpoints

    def fsync(descriptor):
        info = os.fstat(descriptor)
        events.append(("sync folder",) if stat.S_ISDIR(info.st_mode) else ("sync file", info.st_size))
        real_fsync(descriptor)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", lambda *paths: (events.append(("rename",)), real_replace(*paths))[1])
    monkeypatch.setattr(ckpt, "prune_checkpoints", lambda *args: (events.append(("prune",)), real_prune(*args))[1])
    final = save(tmp_path, 2, keep_last=1)
    # the whole file at its sync, not what Python's buffer had passed on by then
    assert events == [("sync file", final.stat().st_size), ("rename",), ("sync folder",), ("prune",)]
    assert steps(tmp_path) == [2]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors in /proc")
def test_saves_and_pruning_leave_no_file_descriptor_open(tmp_path):
    # The folder is opened on every save to sync the rename: one descriptor leaked per save would run a
    # long run out of them.
    save(tmp_path, 1)
    open_before = len(os.listdir("/proc/self/fd"))
    for step in range(2, 12):
        save(tmp_path, step, keep_last=2)
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert steps(tmp_path) == [11, 10]


def test_a_checkpoint_that_is_not_a_dict_is_refused_saying_what_it_holds(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 1)
    path.parent.mkdir()
    torch.save([ckpt.CHECKPOINT_FORMAT, 1], path)
    with pytest.raises(ValueError, match=r"holds a list, not a checkpoint written by this trainer$"):
        ckpt.read_checkpoint(path)


def test_infinite_weights_are_non_finite_too_and_a_long_list_of_them_is_cut(tmp_path):
    # An overflow in fp16 training leaves inf, not NaN, in the weights
    inf = torch.tensor([1.0, float("inf")])
    state = {"format": ckpt.CHECKPOINT_FORMAT, "step": 1,
             "model": {"a": inf, "b": -inf, "c": inf, "d": inf, "steps": torch.tensor([3])}}
    path = ckpt.save_checkpoint(state, tmp_path, 1, keep_last=1)
    with pytest.raises(ValueError, match=r"holds non-finite weights \(a, b, c, \.\.\.\)$"):
        ckpt.read_checkpoint(path)


def test_a_temporary_name_already_taken_is_left_alone_and_another_one_tried(tmp_path, monkeypatch):
    # Another save's file in progress, or a leftover not yet removed: never opened, truncated or renamed
    used = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda source, target: (used.append(Path(source)), real_replace(source, target))[1])
    save(tmp_path, 1)
    taken = used[0]
    taken.write_bytes(b"someone else's bytes")
    names = iter([taken.name.split(".")[-2], "bbbbbbbb"])  # the taken name first
    monkeypatch.setattr(ckpt.secrets, "token_hex", lambda length: next(names))
    save(tmp_path, 1)
    assert used[1].name.split(".")[-2] == "bbbbbbbb"
    assert taken.read_bytes() == b"someone else's bytes"
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 1
