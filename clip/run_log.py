"""What a training run writes beside its checkpoints: `metrics.jsonl`, TensorBoard events, Weights & Biases,
a final plot.

TensorBoard and matplotlib are optional: each is used when importable and skipped with one log line
otherwise. W&B is used only when asked for (`logging.wandb`), and then its absence is an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .dependencies import MissingDependency

log = logging.getLogger(__name__)


class RunLogWriteError(RuntimeError):
    """`metrics.jsonl` could not be written (a full disk, a quota); its OSError is the __cause__."""


class WandbStartError(RuntimeError):
    """W&B could not start its run (no API key, no network, a wrong entity); wandb's error is the __cause__."""


WANDB_RUN_ID_FILE = "wandb_run_id"
# W&B: the figures of an evaluation (metric names of clip.evaluation.during_training) and the step they are of
EVALUATION_PREFIXES = ("zeroshot/", "retrieval/")
EVALUATION_STEP = "evaluation_step"


def require_wandb():
    """The wandb module, or MissingDependency (checked by every rank before a run starts, so that no rank
    goes ahead into collectives that the rank which would log never joins)."""
    try:
        import wandb
    except ImportError as error:
        raise MissingDependency(
            "logging.wandb = true needs the wandb package: pip install wandb (then `wandb login`, or "
            "WANDB_MODE=offline)"
        ) from error
    return wandb


def start_wandb(run_dir: Path, project: str, entity: str | None, config: dict):
    """A W&B run for this run directory: the same W&B run again when the directory is resumed (its id is kept
    in RUN_DIR/wandb_run_id), named after the directory, with the resolved config. Steps a resumed run logs
    again are below W&B's last step, which W&B ignores (with a warning of its own; an evaluation owed is logged
    all the same, `RunLog._to_wandb`). After a SIGKILL, W&B's own
    process may not have written the last steps it was given, also steps the checkpoint covers, and a resume
    does not log those again (W&B offers no flush to call before a checkpoint): metrics.jsonl has them."""
    wandb = require_wandb()
    id_file = Path(run_dir) / WANDB_RUN_ID_FILE
    # W&B ids are short lowercase alphanumerics; made here, not by a wandb helper that versions have renamed
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n", encoding="utf-8")
    try:
        run = wandb.init(
            project=project, entity=entity, id=run_id, resume="allow", name=Path(run_dir).name, dir=str(run_dir),
            config=config,
        )
        # The evaluations' charts are drawn over the step they evaluate, given with them (`RunLog.write`): one a
        # resume owes is of a step W&B has passed, and is logged at W&B's own step
        run.define_metric(EVALUATION_STEP, hidden=True)
        for prefix in EVALUATION_PREFIXES:
            run.define_metric(f"{prefix}*", step_metric=EVALUATION_STEP)
        return run
    except Exception as error:  # wandb's UsageError, CommError, ...: a traceback through wandb said no more
        raise WandbStartError(
            f"W&B could not start the run's logging: {type(error).__name__}: {error}. Log in (`wandb login`), set "
            f"WANDB_MODE=offline to log locally and `wandb sync` later, or set logging.wandb = false"
        ) from error


def kept_aside_suffix(path: Path) -> str:
    """"_kept_TIME" (TIME: `path`'s last change), or "_kept_TIME_N" where that name is taken: what a results file
    moved aside (and the files that go with it) add to their stems."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(path.stat().st_mtime))
    number, suffix = 1, f"_kept_{stamp}"
    while path.with_name(f"{path.stem}{suffix}{path.suffix}").exists():
        number += 1
        suffix = f"_kept_{stamp}_{number}"
    return suffix


class RunLog:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard when available, and to a W&B
    run when given one (`start_wandb`)."""

    def __init__(
        self, run_dir: Path, tensorboard: bool, resumed_at: int = 0, wandb_run=None, reevaluated: bool = False
    ) -> None:
        """resumed_at: the step of the checkpoint the run continues from (0 for a fresh start). Records of
        later steps, logged before an interruption that the checkpoint does not cover, are dropped: those
        steps run again, and the file and TensorBoard would otherwise show them twice. reevaluated: the
        evaluation of step `resumed_at` runs again (a finished run started again, which only evaluates; a
        checkpoint that owes it): its evaluation records are dropped too (the training record of that step
        stays)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self._quiet_threads = None
        self.wandb_run = wandb_run
        kept = _drop_records_after(self.path, resumed_at, drop_evaluations_at_step=reevaluated)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                # purge_step hides the events of steps >= it that an earlier attempt wrote. A step evaluated
                # again hides its own as well (its evaluation was shown twice), and its training record, kept in
                # metrics.jsonl, is written to TensorBoard again.
                self._start_tensorboard(SummaryWriter, purge_step=resumed_at if reevaluated else resumed_at + 1)
        # TensorBoard's writer was started again after a failed write (`write`): a second failure ends it
        self._tensorboard_restarted = False
        if reevaluated:
            for line in kept:
                if _record_step(line) == resumed_at:
                    self._to_tensorboard(json.loads(line))

    def _start_tensorboard(self, summary_writer: type, purge_step: int | None) -> None:
        """Starts TensorBoard's writer, or says why it cannot and goes on without it: TensorBoard mirrors what
        metrics.jsonl holds, and an unwritable tensorboard/ folder ended the run's start on two tracebacks."""
        folder = self.path.parent / "tensorboard"
        self._quiet_threads = QuietWriterThreads()
        error = None
        try:
            self.writer = summary_writer(log_dir=str(folder), purge_step=purge_step)
        except OSError as failure:
            self.writer, error = None, failure
        self._quiet_threads.adopt()
        if error is not None:
            self._quiet_threads.remove()
            log.warning("TensorBoard's events cannot be written in %s: %s; metrics go to %s only", folder,
                        error.strerror or error, self.path)

    def start_again(self) -> None:
        """Goes on in a run directory made again under the run (`clip.run_start.RunDirectoryWatch`): TensorBoard's
        writer, whose open event file was in the old one, starts a new file (its events went on into the deleted
        one). metrics.jsonl, opened by name for each record, starts anew by itself."""
        if self.writer is None:
            return
        summary_writer = type(self.writer)
        self._end_tensorboard()
        self._start_tensorboard(summary_writer, purge_step=None)

    def _end_tensorboard(self) -> OSError | None:
        """Closes TensorBoard's writer, which writes its buffered events and ends its thread; the error of that
        last write, if any (the callers decide whether it is worth a warning)."""
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError as error:
            return error
        finally:
            self._quiet_threads.remove()
        return None

    def _tensorboard_failed(self, error: OSError) -> None:
        """A write of TensorBoard's events failed. The run goes on: metrics.jsonl, written first, has every
        figure, and a full disk stops the run at its next metrics.jsonl line or checkpoint anyway. The writer
        starts a new event file once (a tensorboard/ folder deleted under the run, to clear old events, failed
        every later write: the run ended, losing the steps since its last checkpoint); a second failure ends
        TensorBoard for the run."""
        folder = self.writer.log_dir
        if self._tensorboard_restarted:
            self._end_tensorboard()
            log.warning("TensorBoard's events could not be written in %s again: %s (errno %s); TensorBoard stops "
                        "for this run, metrics go on to %s", folder, error.strerror or error, error.errno, self.path)
            return
        self._tensorboard_restarted = True
        log.warning("TensorBoard's events could not be written in %s: %s (errno %s); it starts a new event file "
                    "(%s has every figure)", folder, error.strerror or error, error.errno, self.path)
        self.start_again()

    def write(self, record: dict) -> None:
        """Appends `record`; RunLogWriteError if the file cannot be written (a line torn by a full disk is
        dropped when the run resumes, as one torn by a kill)."""
        try:
            with self.path.open("a", encoding="utf-8") as file:
                # Strict JSON (allow_nan=False): a non-finite figure, such as a skipped step's loss, is null; NaN
                # and Infinity are Python's extensions, which jq, JavaScript and many readers refuse
                file.write(strict_json(record) + "\n")
        except OSError as error:
            raise RunLogWriteError(
                f"could not write {self.path}: {error.strerror or error} (errno {error.errno})"
            ) from error
        scalars = self._to_tensorboard(record)
        if self.wandb_run is not None:
            self._to_wandb(scalars, record.get("step", 0))

    def _to_wandb(self, scalars: dict, step: int) -> None:
        """Logs `scalars` of `step` to W&B, which takes no step below its own (a resumed W&B run's is the one
        after its last): the training records of steps a resume runs again are dropped there, as W&B has them
        from before. An evaluation is logged with its step as EVALUATION_STEP, its charts' x axis, and where W&B
        has passed that step (the evaluation a checkpoint owes: the interrupted attempt logged the step's training
        record), at W&B's own step: logged at its own, W&B dropped it."""
        if not any(key.startswith(EVALUATION_PREFIXES) for key in scalars):
            self.wandb_run.log(scalars, step=step)
        else:
            # At W&B's own step, not without one: that closed W&B's row, and the next training record, of the
            # step W&B had been at, was dropped in its turn
            self.wandb_run.log({**scalars, EVALUATION_STEP: step}, step=max(step, self.wandb_run.step))

    def sync(self) -> None:
        """Puts the records appended so far on the disk (fsync). Called before each checkpoint is saved: the
        checkpoint is on the disk once saved, and a power cut would otherwise leave the records of the steps it
        covers missing for good (a resume logs only the steps after it again). RunLogWriteError if it fails."""
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # writable: Windows fsyncs no read-only file
        except FileNotFoundError:  # nothing logged yet
            return
        except OSError as error:
            raise RunLogWriteError(f"could not open {self.path}: {error.strerror or error} (errno {error.errno})") \
                from error
        try:
            os.fsync(descriptor)
        except OSError as error:
            raise RunLogWriteError(f"could not put {self.path} on the disk: {error.strerror or error} "
                                   f"(errno {error.errno})") from error
        finally:
            os.close(descriptor)

    def _to_tensorboard(self, record: dict) -> dict:
        """Adds the finite figures of `record` to TensorBoard's events, where its writer runs; returns them."""
        step = record.get("step", 0)
        scalars = {
            key: value for key, value in _flatten(record).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
            and math.isfinite(value)
        }
        if self.writer is not None:
            try:
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, step)
            except OSError as error:
                # The event file is written by the writer's thread, whose error (a full disk, a quota, its folder
                # deleted) the next call raises
                self._tensorboard_failed(error)
        return scalars

    def close(self, failed: bool = False) -> None:
        """Writes what TensorBoard buffers and ends its thread and the W&B run, as failed (exit code 1) where the
        run ends on an error: W&B took a finish without one for a success, while the error was on its way out. A
        second call does nothing: the trainer's normal end closes the log, and its exit closes it again for a run
        that ended on an error."""
        if self.writer is not None:
            folder = self.writer.log_dir
            error = self._end_tensorboard()
            if error is not None:  # metrics.jsonl has every figure: TensorBoard's last steps are all it costs
                log.warning("TensorBoard's last events may be missing from %s: %s", folder, error.strerror or error)
        wandb_run, self.wandb_run = self.wandb_run, None
        if wandb_run is not None:
            wandb_run.finish(exit_code=1 if failed else 0)


class QuietWriterThreads:
    """Leaves out the traceback of an OSError that ends one of TensorBoard's event-writer threads, which Python's
    threading.excepthook printed: on a full disk, "Exception in thread ..." and a traceback through TensorBoard
    came before the run's own line. The error is not lost: TensorBoard keeps it and raises it in the training
    process at its writer's next call, where RunLog.write says it in a warning (`RunLog._tensorboard_failed`), as
    RunLog.close does; a writer that fails in its start raises it there. Any other error, of any thread, is
    printed as before.

    Made before the SummaryWriter, whose thread can fail before the writer's start returns (its first event is
    the file's header); `adopt` then names the threads the writer started, the only ones left out from there on.
    The hook is put back by `remove`, or once such a thread has ended on its error."""

    def __init__(self) -> None:
        self.before = set(threading.enumerate())
        self.threads: set[threading.Thread] | None = None  # until `adopt`: every TensorBoard thread started since
        self.previous = threading.excepthook
        threading.excepthook = self.hook

    def adopt(self) -> None:
        self.threads = {thread for thread in threading.enumerate() if self._started_by_the_writer(thread)}

    def _started_by_the_writer(self, thread: threading.Thread) -> bool:
        if self.threads is not None:
            return thread in self.threads
        return thread not in self.before and type(thread).__module__.startswith("tensorboard.")

    def hook(self, args: threading.ExceptHookArgs) -> None:
        if self._started_by_the_writer(args.thread) and isinstance(args.exc_value, OSError):
            self._put_back()  # its thread has ended: nothing more of it to leave out
            return
        self.previous(args)

    def remove(self) -> None:
        """Puts the previous hook back where TensorBoard's threads have ended (closing the writer ends them). One
        still alive may yet fail, or be on its way to the hook with its error: the hook stays for it, and goes
        once it has left out that error."""
        if not any(thread.is_alive() and self._started_by_the_writer(thread) for thread in threading.enumerate()):
            self._put_back()

    def _put_back(self) -> None:
        if threading.excepthook == self.hook:  # not where another hook was set over this one since
            threading.excepthook = self.previous


def _drop_records_after(path: Path, step: int, drop_evaluations_at_step: bool = False) -> list[str]:
    """Rewrites metrics.jsonl without the records of the steps after `step` (and, with drop_evaluations_at_step,
    its evaluation records), and without lines torn or not a JSON object; returns the lines kept."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def kept_line(line: str) -> bool:
        record_step = _record_step(line)
        if drop_evaluations_at_step and record_step == step:
            return "loss" in json.loads(line)  # a training record (an evaluation record has no loss)
        return record_step <= step

    kept = [line for line in lines if kept_line(line)]
    if len(kept) == len(lines):
        return kept
    # A resume that evaluates step `step` again drops that step's evaluation records as well
    which = f"of step {step}'s evaluation and the steps after it" if drop_evaluations_at_step else \
        f"of the steps after {step}"
    log.info("%s: dropping %d records %s, which are logged again", path, len(lines) - len(kept), which)
    try:
        # Atomic and on the disk before it replaces the old file: an interruption, even a power cut, leaves the
        # old file or the new one
        with replaced_atomically(path) as file:
            file.write("".join(kept))
    except OSError as error:  # a full disk, a quota: most likely what stopped the run, still there
        checkpoint_kept = f"the checkpoint of step {step} is kept: " if step else ""
        raise RunLogWriteError(
            f"could not rewrite {path} without the records of the steps that run again: {error.strerror or error} "
            f"(errno {error.errno}); {checkpoint_kept}run the same command again once the file can be written"
        ) from error
    return kept


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf  # the last line, torn by a kill mid-write: dropped


def strict_json(record: dict, indent: int | None = None) -> str:
    """`record` as strict JSON: a non-finite figure is null (a bare NaN is no JSON: jq and JavaScript refuse it),
    tensors and NumPy scalars are plain numbers."""
    return json.dumps(_finite_or_null(record), default=_json_default, allow_nan=False, indent=indent)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite_or_null(value):
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or NumPy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path | None:
    """Training loss and accuracies against steps as `RUN_DIR/training.png`, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no training plot")
        return None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = {k: [(r["step"], r[k]) for r in records if k in r] for r in records for k in r if k.endswith("top1")}
    if not train:
        return None
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train])
    loss_axis.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    if "image_to_text_accuracy" in train[0]:
        steps = [r["step"] for r in train]
        accuracy_axis.plot(steps, [r["image_to_text_accuracy"] for r in train], label="in-batch image→text")
    for key, points in evals.items():
        accuracy_axis.plot(*zip(*points), marker="o", label=key)
    accuracy_axis.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    accuracy_axis.legend(fontsize="small")
    figure.tight_layout()
    path = Path(run_dir) / "training.png"
    try:
        with replaced_atomically(path, "wb") as file:  # a full disk left an empty training.png
            figure.savefig(file, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path


@contextlib.contextmanager
def replaced_atomically(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside `path` that replaces `path` whole (os.replace), flushed to the disk, when the
    block ends; removed if the block raises. Writing `path` itself truncated it first, so a full disk or a
    kill during the write left a torn file in place of the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # `.NAME.PID.tmp`, which temporaries_of finds again; not mkstemp's names: its files are private (0600)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, opener=lambda name, _flags: _created_afresh(Path(name)),
                  **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _created_afresh(temporary: Path) -> int:
    """A new empty file at `temporary`, opened for writing. O_EXCL: a file or symbolic link already there (one a
    killed process of the same id left, or one planted in a shared folder) is removed, not written through --
    open() followed a link and overwrote the file it named, wherever that was."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        return os.open(temporary, flags, 0o666)  # 0o666 as open()'s: the umask decides
    except FileExistsError:
        os.unlink(temporary)
        return os.open(temporary, flags, 0o666)


def temporaries_of(path: Path) -> list[tuple[Path, int]]:
    """The temporary files of `replaced_atomically` beside `path` (`.NAME.PID.tmp`: a save in progress, or one
    that a killed process left), each with the id of the process that wrote it."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    matches = ((candidate, pattern.fullmatch(candidate.name)) for candidate in sorted(path.parent.iterdir()))
    return [(candidate, int(match.group(1))) for candidate, match in matches if match is not None]


def remove_temporaries_of(path: Path, left_by: str, logger: logging.Logger,
                          still_writing: Callable[[int], bool] = lambda pid: False) -> list[Path]:
    """Deletes the `replaced_atomically` temporaries beside `path` (regular files only) whose writer is not
    `still_writing` (by its process id; by default none is, as for a run holding its directory's lock), says so
    on `logger` with their sizes, and returns them. One that cannot be removed costs only disk space: a warning."""
    removed = []
    for stray, pid in temporaries_of(path):
        if stray.is_symlink() or not stray.is_file():
            continue
        try:
            size_mb = stray.stat().st_size / 1e6
        except OSError:  # its save ended meanwhile
            continue
        if still_writing(pid):
            logger.info("left %s (%.1f MB) alone: process %d, whose save it is, is running", stray, size_mb, pid)
            continue
        try:
            stray.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("could not remove %s (%.1f MB), left by %s: %s", stray, size_mb, left_by, error)
            continue
        logger.info("removed %s (%.1f MB), left by %s", stray, size_mb, left_by)
        removed.append(stray)
    return removed


def write_json(path: Path, content: Any) -> Path:
    """Writes `content` as strict JSON (a non-finite figure is null), replacing
    the file whole (`replaced_atomically`)."""
    with replaced_atomically(path) as file:
        file.write(strict_json(content, indent=2))
    return path
