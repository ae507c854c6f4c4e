"""Training checkpoints: atomic writes, the last K kept, and resume from the latest one that loads.

A checkpoint is one `torch.save` dict:
  {"format": CHECKPOINT_FORMAT, "step": int, "model": CLIP state dict, "config": resolved TrainConfig dict,
   "optimizer": ..., "optimizer_parameter_names": the parameter of each optimizer state entry, "scaler": ...,
   "loss_parameters": ..., "rng": per-rank RNG states, "data": per-rank data positions, "metrics": last
   logged metrics, "evaluation_owed": the step's evaluation was skipped for a signal (made up on resume),
   "init_weights": which weights train.init_weights named when the run started (None from scratch; absent
   before 2026-12-03)}
It holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
Files are `RUN_DIR/checkpoints/step_XXXXXXXX.pt`; the highest step whose file loads is the latest (a symlink to
a checkpoint counts; a FIFO, folder or device of that name is skipped as unreadable, and never waited on). They
are written as `.step_XXXXXXXX.pt.<8 random characters>.tmp` first and renamed into place; a process killed
while writing leaves that temporary file, which `remove_stray_temporaries` deletes.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import secrets
import stat
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .exception_chain import first_in_chain, out_of_memory_in
from .weights_file import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    archive_damage,
    is_storage_error,
    tensor_beyond_the_file,
    warn_if_weights_only_is_unsafe,
    weights_only_refusal,
)

# The names this trainer writes, and the only ones a resume reads (clip.load of a run directory also takes other
# tools' step_N.pt and "latest": weights_file.checkpoint_candidates)
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
# save_checkpoint's temporary files. Earlier versions named them with tempfile.mkstemp, whose random part has
# the same shape (8 characters of a-z, 0-9 and _), so their leftovers match too.
_TEMPORARY_NAME = re.compile(r"^\.step_\d{8,}\.pt\.[a-z0-9_]{8}\.tmp$")

log = logging.getLogger(__name__)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in the run directory, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


class NoReadableCheckpointError(RuntimeError):
    """The run directory holds checkpoint files, but none of them can be loaded."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); nothing of it is left behind."""


def save_checkpoint(state: dict, run_dir: Path, step: int, keep_last: int, prune: bool = True) -> Path:
    """Writes atomically: a temporary file in the same folder, flushed to disk, then renamed into place; then
    prunes older checkpoints (see `prune_checkpoints`) unless `prune` is False: the save a stop signal asked
    for leaves that to the resumed run's first save, as pruning reads a kept checkpoint whole to check it
    (seconds for a large one on network storage), time the scheduler's grace period may not leave.

    An interrupted write leaves at worst a stray temporary file, never a truncated `step_*.pt`.
    """
    final = checkpoint_path(run_dir, step)
    temporary = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_temporary(final)  # an inode quota or a read-only mount fails here
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        interruption = first_in_chain(error, lambda link: not isinstance(link, Exception))  # KeyboardInterrupt, ...
        if interruption is not None and interruption is not error:
            # A second Ctrl-C inside torch.save's write: the archive writer, closed after it, raises its own
            # "unexpected pos" RuntimeError, which read as a failed write and hid the interruption
            raise interruption from None
        cause = first_in_chain(error, lambda link: isinstance(link, OSError))
        if cause is not None:  # a full disk, a quota: torch.save reports it as an "enforce fail" RuntimeError
            reason = f"{cause.strerror or cause} (errno {cause.errno})"
            raise CheckpointWriteError(
                f"could not write {final}: {reason}; {kept_before(run_dir, step)}"
            ) from error
        started = _raised_while_closing(error)
        if started is not None:
            raise started from None
        raise
    _sync_directory(final.parent)  # the rename itself on disk before older checkpoints are deleted
    if prune:
        prune_checkpoints(run_dir, step, keep_last)
    return final


def kept_before(run_dir: Path, step: int) -> str:
    """What a failed save of `step` leaves to resume from, said truly also when it was the run's first save."""
    try:
        latest = latest_complete_checkpoint(run_dir, below_step=step)
    except OSError:  # the folder cannot even be listed now
        return "the checkpoints saved before it, if any, are kept"
    if latest is None:
        return "no checkpoint had been saved before it"
    return f"the latest checkpoint before it, {latest[1]}, is kept"


def latest_complete_checkpoint(run_dir: Path, below_step: int | None = None) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint file that looks complete (`_looks_complete`, which reads only the end
    of a file), of a step below `below_step` if given; None when there is none. What an error can name as the
    checkpoint a run continues from, without reading whole files on the way out."""
    for step, path in list_checkpoints(run_dir):
        if (below_step is None or step < below_step) and _looks_complete(path):
            return step, path
    return None


def _raised_while_closing(error: BaseException) -> Exception | None:
    """The error that broke off torch.save's write, where `error` is only the archive writer's closing check that
    followed it ("unexpected pos", raised implicitly while the first propagated); None otherwise.

    A data worker's death is reported by the DataLoader's SIGCHLD handler, which raises in the training process
    wherever it is: in a save, the run stopped on the closing check's line, which read as a failed write and
    hid the dead worker (train.log said only "unexpected pos")."""
    started = error.__context__
    implicit = error.__cause__ is None and not error.__suppress_context__
    if isinstance(error, RuntimeError) and isinstance(started, Exception) and implicit:
        return started
    return None


def _sync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open folders: nothing more to do
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a folder; their renames are durable by other means
    finally:
        os.close(descriptor)


def _create_temporary(final: Path) -> tuple[int, Path]:
    """Creates and opens an empty temporary file beside `final`: (file descriptor, path).

    Mode 0o666 lets the kernel apply the process umask (and a default ACL of the folder), as for any file a
    program creates; tempfile.mkstemp's 0o600 made checkpoints unreadable to teammates on a shared cluster.
    O_EXCL never opens a file that already exists. The name comes from `secrets`, not `random`, whose state
    is the training's and is saved in the checkpoint.
    """
    for _ in range(10):  # 16**8 names: a clash is all but impossible, but costs only another try
        temporary = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"found no free temporary file name beside {final}")


def prune_checkpoints(run_dir: Path, newest_step: int, keep_last: int) -> list[Path]:
    """Deletes older checkpoints, keeping the one of `newest_step` (just saved) and the `keep_last - 1`
    newest sound ones below it; returns the deleted paths.

    Only files with a lower step than the one just saved are counted or deleted, and only those that look
    complete (`_looks_complete`). A run resumes from its newest readable checkpoint, so a file with a
    higher step is one it could not read (torn, foreign, another format version): counting those made them
    fill the keep_last places and deleted the new save at once. They are left alone; a save of the same
    step replaces them. A torn file below is not counted either, or it would take the place of a good one,
    and is left to be looked at rather than deleted. Nor is a damaged one (`_checksums_match`), which is left until
    the checkpoints kept are all newer than it.
    """
    older = [path for step, path in list_checkpoints(run_dir) if step < newest_step and _looks_complete(path)]
    kept, deleted = [], []
    for path in older:
        if len(kept) >= max(keep_last, 1) - 1:
            deleted.append(path)
        elif _checksums_match(path):
            kept.append(path)
    for path in deleted:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # the new checkpoint is saved: an old one left behind costs only disk space
            log.warning("could not delete the older checkpoint %s: %s", path, error)
    return deleted


def warn_of_incomplete_checkpoints(run_dir: Path, below_step: int) -> list[Path]:
    """A warning for each checkpoint file below `below_step` (the step resumed from) that is not a whole archive
    (`_looks_complete`): `prune_checkpoints` never deletes one, nor counts it, and a resume never reads it, so
    without a word it stayed for good. Returns them. Those above were warned of as the resume skipped them."""
    incomplete = [path for step, path in list_checkpoints(run_dir) if step < below_step and not _looks_complete(path)]
    for path in incomplete:
        log.warning("%s is not a whole checkpoint (cut short by a storage fault, or not written by a save): runs "
                    "neither resume from it nor delete it; delete it once you have looked at it", path)
    return incomplete


def _looks_complete(path: Path) -> bool:
    """Whether `path` is a whole torch.save archive: it ends with a zip directory naming a data.pkl.

    torch.save writes that directory last, so a truncated file has none. Reads only the end of the file."""
    try:
        with _open_regular_file(path) as file, zipfile.ZipFile(file) as archive:
            return any(name.rpartition("/")[2] == "data.pkl" for name in archive.namelist())
    # ValueError: not a regular file; NotImplementedError: zipfile's refusal of a damaged "version needed" field
    # or compression method (it escaped, and every later save of the run failed in pruning)
    except (OSError, ValueError, NotImplementedError, zipfile.BadZipFile):
        return False


def _checksums_match(path: Path) -> bool:
    """Whether the archive `path` is undamaged (`archive_damage`: a resume skips a damaged file), said with a
    warning when it is not. A file damaged after its save (a bad sector, a faulty copy) still looks complete, and
    took one of the keep_last places: one fallback fewer was kept than asked for.

    The check reads the whole file, so its answer is kept for the file's identity (device, inode, size,
    modification time; a save over it changes them): each checkpoint is read once in a process, by the first
    save after its own, not once per save. A read that the storage fails is not kept, and the file is not
    counted this time (nor deleted)."""
    try:
        status = os.stat(path)
        return _checksums_match_of(str(path), (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))
    except (OSError, ValueError, NotImplementedError, zipfile.BadZipFile) as error:  # a storage error; a file gone
        log.warning("could not check %s before pruning older checkpoints (%s): it is not counted among those kept "
                    "this time", path, error)
        return False


@functools.lru_cache(maxsize=256)
def _checksums_match_of(path: str, identity: tuple[int, int, int, int]) -> bool:
    damage = archive_damage(Path(path))
    if damage is not None:
        log.warning("%s; it is not counted among the checkpoints that pruning keeps (checkpoint.keep_last)", damage)
    return damage is None


def _open_regular_file(path: Path) -> BinaryIO:
    """Opens `path` (or the file a symlink names) for reading; raises ValueError, saying what it is, when it is
    not a regular file.

    A FIFO (named pipe) of a checkpoint's name blocked a resume, and pruning, forever: opening one for reading
    waits for a writer. O_NONBLOCK opens it at once; the type is then read from the opened file itself, not
    from the name beforehand, so what is read is what was checked."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is {_kind_of_file(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _kind_of_file(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISDIR: "a folder", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), f"of file type {stat.S_IFMT(mode):o}")


def remove_stray_temporaries(run_dir: Path) -> list[Path]:
    """Deletes the temporary files that saves killed mid-write (SIGKILL, a node failure) left in the run's
    checkpoint folder; returns their paths. Only names of save_checkpoint's temporary-file pattern.

    Call it once, from the process that saves (rank 0), before its first save: a temporary file of a save
    in progress matches the pattern too, so running it beside a writer would break that save.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if _TEMPORARY_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            log.info("removed %s (%.1f MB), left by an interrupted checkpoint save", path, size / 1e6)
            removed.append(path)
    return removed


def read_checkpoint(path: Path, verify: bool = True) -> dict:
    """Loads one checkpoint without running pickled code; raises if it is truncated, not ours, or (if
    `verify`) damaged or holding non-finite weights (none of which a run can continue from); also if it is
    not a regular file (see `_open_regular_file`)."""
    warn_if_weights_only_is_unsafe()  # a run directory may be someone else's
    oversized = None
    with _open_regular_file(path) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except RuntimeError as error:
            oversized = tensor_beyond_the_file(error, path, size)
            if oversized is None:
                raise
    if oversized is not None:  # raised outside the handler: the file's damage, not a lack of memory (no fallback)
        raise ValueError(oversized)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint written by this trainer")
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        what = "no format entry" if found is None else f"format {found!r}"
        raise ValueError(f"{path} has {what}; this trainer reads checkpoints of format {CHECKPOINT_FORMAT!r}")
    if not verify:
        return state
    damage = archive_damage(path)
    if damage is not None:
        raise ValueError(damage)
    nonfinite = [name for name, tensor in state.get("model", {}).items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if nonfinite:
        raise ValueError(f"{path} holds non-finite weights ({', '.join(nonfinite[:3])}"
                         f"{', ...' if len(nonfinite) > 3 else ''})")
    return state


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint that loads, or None when the run has no checkpoint files yet; see
    `latest_readable_checkpoint`."""
    found = latest_readable_checkpoint(run_dir)
    return None if found is None else found[1]


def latest_readable_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that loads, or None when the run has no checkpoint files yet.

    A newer file that does not load (torn, damaged, foreign, another format version, non-finite weights, not a
    regular file) is skipped with a warning. When there are checkpoint files but none loads, raises
    NoReadableCheckpointError rather than starting again at step 0: the new run would mix with the old files,
    and its checkpoints be pruned below them. So does a read that the storage fails (`is_storage_error`) or that
    runs out of memory (`out_of_memory_in`): neither judges the file.
    """
    failures = []
    for step, path in list_checkpoints(run_dir):
        try:
            return path, read_checkpoint(path)
        except Exception as error:  # a torn file raises anything from zipfile/pickle/torch
            if is_storage_error(error):
                # The storage failed, not the file (a network file system's EIO or ESTALE, a permission): skipping
                # it would resume from an older checkpoint, lose the steps since, and later overwrite this file.
                raise NoReadableCheckpointError(
                    f"could not read {path} (step {step}): {_one_line_reason(error)} -- a storage error, not a "
                    f"damaged file, so the run does not fall back to an older checkpoint (losing the steps since). "
                    f"Run again once the file can be read; to resume from the previous checkpoint instead, move this "
                    f"one aside."
                ) from error
            if out_of_memory_in(error) is not None:
                raise NoReadableCheckpointError(
                    f"could not read {path} (step {step}): {_one_line_reason(error)} -- this process ran out of "
                    f"memory, which says nothing about the file, so the run does not fall back to an older "
                    f"checkpoint (losing the steps since). Run again with more memory free."
                ) from error
            reason = _one_line_reason(error)
            log.warning("checkpoint %s (step %d) is unreadable and skipped: %s", path, step, reason)
            failures.append(f"{path.name}: {reason}")
    if failures:
        folder = Path(run_dir) / CHECKPOINT_DIR
        raise NoReadableCheckpointError(
            f"none of the checkpoints in {folder} can be read, so the run cannot resume:\n  "
            + "\n  ".join(failures)
            + f"\nTo start the run over, move them aside (e.g. mv {folder} {folder}.unreadable) or use another "
            "output directory; to resume, put a readable checkpoint back."
        )
    return None


def _one_line_reason(error: Exception) -> str:
    """The gist of a loading error: torch's messages run to paragraphs, and the weights-only one names its
    cause on a later line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = weights_only_refusal(str(error)) or (lines[0] if lines else "")
    first_sentence = cause.strip().split(". ")[0]
    return f"{type(error).__name__}: {first_sentence}" if first_sentence else type(error).__name__


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain values (safe for weights_only loading)."""
    numpy_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "numpy_gauss": [int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s torch generators where a run starts at `step` with no saved state for them.

    A new run: seed + rank, so that the ranks draw different numbers (patch dropout's masks). A resume
    from a checkpoint of another number of ranks, or a CPU run's (which saved no CUDA state): mixed with
    the step as well, or every rank would draw alike again and replay the numbers the run began with."""
    if step == 0:
        return seed + rank
    return int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1, np.uint64)[0])


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
