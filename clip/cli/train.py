"""`clip-train CONFIG [--output-dir DIR] [section.key=value ...]`: pre-train or fine-tune a CLIP model from a TOML
recipe (`clip.train` runs it). What a run's exit status means: 0 finished; 2 bad input, one line on stderr
(a config error, data that cannot be used, a run directory the config cannot continue or another run is
using, init weights that name nothing loadable); 75 stopped early with a checkpoint, run again to continue;
1 anything else.

    clip-train CONFIG [--output-dir DIR] [section.key=value ...]    (python scripts/train.py ... in a source checkout)
    torchrun --nproc-per-node 8 scripts/train.py CONFIG ...      (or under SLURM: srun python scripts/train.py ...)
    torchrun --nproc-per-node 8 --no-python clip-train CONFIG ...   (the same, installed without the checkout)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .. import checkpoint as ckpt
from ..config import TrainConfig, load_config
from ..config_io import ConfigError
from ..data.loader import worker_death
from ..data.stream import UnusableData
from ..dependencies import MissingDependency
from ..distributed import DeviceUnavailable, RendezvousPortInUse, failed_on_another_rank
from ..download import DownloadError
from ..launcher import LauncherEnvironment, LauncherMisconfigured, read_launcher_environment
from ..loading import ModelNotFoundError
from ..resume import ResumeRefused
from ..run_lock import RunDirectoryInUse
from ..run_log import RunLogWriteError, WandbStartError
from ..run_start import BadTrainingInput
from ..stopping import (
    STOP_SIGNALS, STOPPED_AT_ONCE_EXIT_CODE, STOPPED_EARLY_EXIT_CODE, SetupInterrupted, StoppedAtOnce, StopRequest,
)
from ..train import NonFiniteLossError, train
from ..url_passwords import URL_PASSWORDS_HIDDEN, hide_url_passwords
from ..weights_file import WeightsFileError
from .common import debugging, warnings_as_log_lines

log = logging.getLogger(__name__)


EPILOG = (
    "Overrides name any field of the config: train.batch_size=64, model.vision.layers=[3,4,6,3], "
    "data.sources.0.weight=2 (an element of [[data.sources]] by its index from 0), optimizer.grad_clip_norm=none "
    "(a setting that can be off), 'train={seed=1, batch_size=64}' (several keys of a section, quoted for the "
    "shell), 'data.sources.0.path=shards/{00000..00099}.tar' (quoted too, or the shell expands the range). "
    "Exit status: 0 finished; 2 bad input, said in one line (CLIP_DEBUG=1 adds its traceback); "
    f"{STOPPED_EARLY_EXIT_CODE} stopped early with a checkpoint: run the same command again to continue; "
    f"{STOPPED_AT_ONCE_EXIT_CODE} stopped at once by a second Ctrl-C, without saving; 1 anything else."
)


# open_clip's training flags that people bring along, and where each setting lives here. Passed to clip-train
# they were refused as "unrecognized arguments", which named neither the override to write nor that every
# setting is one: the error now says both.
OPEN_CLIP_FLAGS = {
    "--train-data": "a [[data.sources]] table: data.sources.0.kind=shards data.sources.0.path='DIR/{00000..00099}.tar'",
    "--train-num-samples": "nothing to set for shards with sizes.json or img2dataset's *_stats.json "
                           "(else data.sources.0.num_samples=N)",
    "--dataset-type": "data.sources.0.kind=shards (or manifest, for CSV/TSV/JSONL)",
    "--dataset-resampled": "data.resampled=true",
    "--csv-img-key": "data.sources.0.image_column=NAME",
    "--csv-caption-key": "data.sources.0.caption_column=NAME",
    "--csv-separator": "data.sources.0.separator=SEP",
    "--val-data": "an [[eval.retrieval]] table (annotations = a CSV/TSV/JSONL manifest)",
    "--imagenet-val": "an [[eval.zeroshot]] table (kind = \"imagefolder\", root = the folder of class folders)",
    "--zeroshot-frequency": "eval.every_n_steps=N",
    "--val-frequency": "eval.every_n_steps=N",
    "--model": "the config's [model] section (the source repository's configs/finetune_vit_b32.toml has ViT-B/32's "
               "sizes; open_clip's ViT-B-32 is those with activation = \"gelu\", ViT-B-32-quickgelu with "
               "\"quick_gelu\"; its RN50 is this RN50's sizes with \"gelu\")",
    "--pretrained": "train.init_weights=NAME_OR_FILE",
    "--batch-size": "train.batch_size=N (per process, as in open_clip)",
    "--epochs": "schedule.steps=N: runs are counted in optimiser steps (epochs x samples per epoch / global batch; "
                "the run's first lines give both)",
    "--warmup": "schedule.warmup_steps=N",
    "--lr": "optimizer.lr=X",
    "--wd": "optimizer.weight_decay=X",
    "--beta1": "optimizer.beta1=X",
    "--beta2": "optimizer.beta2=X",
    "--eps": "optimizer.eps=X",
    "--grad-clip-norm": "optimizer.grad_clip_norm=X",
    "--lr-scheduler": "schedule.kind=cosine|constant|constant_cooldown",
    "--epochs-cooldown": "schedule.cooldown_steps=N with schedule.kind=constant_cooldown",
    "--precision": "train.precision=fp32|bf16|fp16 (autocast over float32 weights: open_clip's amp_bf16 "
                   "is bf16, its amp is fp16; its bf16, fp16 and pure_* cast the weights, which is not offered)",
    "--workers": "data.workers=N",
    "--seed": "train.seed=N",
    "--accum-freq": "train.accumulation_steps=N",
    "--grad-checkpointing": "train.grad_checkpointing=true",
    "--torchcompile": "train.compile=true",
    "--force-patch-dropout": "train.patch_dropout=P",
    "--lock-image": "train.lock_image=true",
    "--lock-text": "train.lock_text=true",
    # open_clip counts the projection as a group of its own, which an unlocked layer here trains with it: its
    # 1 (the projection alone) has no counterpart, and 0 here locks the projection too
    "--lock-image-unlocked-groups": "train.lock_image_unlocked_layers=N-1 for open_clip's N >= 2 (its 1, the "
                                    "projection alone, is not offered)",
    "--lock-text-unlocked-layers": "train.lock_text_unlocked_layers=N-1 for open_clip's N >= 2 (its 1, the "
                                   "projection alone, is not offered)",
    "--siglip": "loss.kind=siglip",
    "--local-loss": "nothing: the loss is always computed per rank with exact gradients",
    "--gather-with-grad": "nothing: the loss is always computed per rank with exact gradients",
    "--logs": "--output-dir DIR (the run directory itself)",
    "--name": "--output-dir DIR (the run directory itself)",
    "--resume": "nothing: a run started again in its run directory resumes from its latest checkpoint",
    "--save-frequency": "checkpoint.every_n_steps=N",
    "--log-every-n-steps": "logging.every_n_steps=N",
    "--report-to": "logging.wandb=true (TensorBoard events are written when tensorboard is installed)",
    "--wandb-project-name": "logging.wandb_project=NAME",
    "--device": "train.device=cpu|cuda",
}


def open_clip_flags_error(argv: list[str]) -> str | None:
    """What to write instead of the open_clip flags in `argv`, one line each; None when there are none."""
    named = dict.fromkeys(arg.partition("=")[0] for arg in argv if arg.partition("=")[0] in OPEN_CLIP_FLAGS)
    if not named:
        return None
    lines = [f"  {flag} -> {OPEN_CLIP_FLAGS[flag]}" for flag in named]
    return ("open_clip's flags are not options here: every setting is a field of the TOML config, set in the file "
            "or overridden as section.key=value after it (clip-train CONFIG train.batch_size=64 ...):\n"
            + "\n".join(lines))


def dashed_overrides_error(argv: list[str]) -> str | None:
    """What to write instead of overrides given as options (`--train.seed=3`, `--train.seed 3`: argparse's
    "unrecognized arguments" did not say that an override takes no dashes); None when there are none."""
    named = [arg for arg in argv if arg.startswith("--") and "." in arg.partition("=")[0]]
    if not named:
        return None
    lines = [f"  {arg} -> {arg[2:] if '=' in arg else arg[2:] + '=VALUE'}" for arg in named]
    return "config overrides are written without dashes, as section.key=value after the config:\n" + "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-train",
        description="Pre-train or fine-tune a CLIP model. An existing run directory is resumed from its latest checkpoint.",
        epilog=EPILOG,
    )
    parser.add_argument("config", help="a TOML recipe (the source repository's configs/ has them: configs/demo.toml "
                                       "is the demo)")
    parser.add_argument("--output-dir", help="the run directory (overrides output_dir in the config)")
    # default: a `*` positional without one is listed as required when the config is missing
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help="type-checked config overrides (below)")
    given = sys.argv[1:] if argv is None else argv
    for error in (open_clip_flags_error(given), dashed_overrides_error(given)):
        if error is not None:
            parser.error(error)  # usage, the message, exit status 2
    # intermixed: `--output-dir` may come after the positional overrides as well as before them
    return parser.parse_intermixed_args(argv)


def headline(results: dict) -> str | None:
    """The first zero-shot top-1 figure, for the last line of the demo's output."""
    for key, value in results.items():
        if key.startswith("zeroshot/") and key.endswith("/top1"):
            return f"zero-shot top-1: {100 * value:.1f}%"
    return None


def log_format(launcher: LauncherEnvironment | None) -> str:
    """Log lines of ranks other than 0 (which log warnings and errors only) name their rank: a shard or a
    signal one rank reports is then found on its node."""
    where = "" if launcher is None or launcher.rank == 0 else f"rank {launcher.rank} "
    return f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s"


def program_name(launcher: LauncherEnvironment | None) -> str:
    """How a bad-input error line starts: other ranks' say which they are (each rank reads its own part of
    the data, so their errors may differ from rank 0's)."""
    return "clip-train" if launcher is None or launcher.rank == 0 else f"clip-train (rank {launcher.rank})"


class RunDirectoryLog(logging.Handler):
    """Rank 0's log, appended to RUN_DIR/train.log as well: what happened to a run (resumes, signals, skipped
    checkpoints, changed settings) stays beside it, not only in a scheduler's output file. Dated in full,
    since a run spans days and restarts.

    Written only once this process holds the run directory (`open`, called by `train` when it has taken the
    directory's lock); the lines logged before then wait for it. A start refused the directory, because
    another live run holds it, never opens the file: its lines and its refusal went into that other run's
    train.log, between the running run's own lines."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = run_dir / "train.log"
        self.waiting: list[logging.LogRecord] | None = []  # None once open (or given up)
        self.file: logging.FileHandler | None = None

    def open(self) -> None:
        """Appends the lines logged so far to train.log, and every later one as it comes."""
        with self.lock:  # a line logged meanwhile (a loader's thread) neither lost nor written out of order
            waiting, self.waiting = self.waiting, None
            try:
                self._open_the_file()
            except OSError as error:  # a train.log that cannot be written (another user's): stderr has it all
                log.warning("cannot append to %s (%s): the log goes to stderr only", self.path,
                            error.strerror or error)
                return
            for record in waiting or []:
                self.emit(record)

    def _open_the_file(self) -> None:
        self.file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(log_format(None)))  # rank 0's lines, with the date
        self.file.handleError = self._give_up_the_file

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self._follow_a_new_train_log()
            if self.file is not None:
                self.file.handle(record)
        elif self.waiting is not None:
            self.waiting.append(record)

    def _follow_a_new_train_log(self) -> None:
        """Opens train.log again where the file at its path is no longer the one open: the run directory was made
        again under the run (`clip.run_start.RunDirectoryWatch`), whose lines went on into the deleted file. While the
        folder is missing they still go there (and to stderr)."""
        try:
            opened = os.fstat(self.file.stream.fileno())
            current = os.stat(self.path)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                return
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                return
        except (OSError, AttributeError, ValueError):  # the storage failing; a stream closed by a failed write
            return
        with contextlib.suppress(OSError):
            self.file.close()
        try:
            self._open_the_file()
        except OSError as error:
            self.file = None
            log.warning("cannot append to %s (%s): the log goes to stderr only", self.path, error.strerror or error)

    def _give_up_the_file(self, record: logging.LogRecord) -> None:
        """A line train.log could not write (a full disk, a quota): said once, and the file is left. logging's own
        handling printed a traceback to stderr for each line from then on, and closing the file raised over the
        error the run ended on."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a log call's own mistake (its arguments): logging's traceback
            logging.FileHandler.handleError(self.file, record)
            return
        file, self.file = self.file, None
        with contextlib.suppress(OSError):
            file.close()
        reason = getattr(error, "strerror", None) or error
        log.warning("cannot append to %s (%s): the log goes to stderr only", self.path, reason)

    def close(self) -> None:
        """Lines still waiting (the directory was never held) are dropped: they are on stderr."""
        self.waiting = None
        if self.file is not None:
            with contextlib.suppress(OSError):  # the last lines' flush on a full disk
                self.file.close()
        super().close()


def keep_log_in(run_dir: Path) -> RunDirectoryLog:
    """A RunDirectoryLog for `run_dir`, added to the root logger (its `open` is for `train`)."""
    handler = RunDirectoryLog(run_dir)
    handler.addFilter(URL_PASSWORDS_HIDDEN)
    logging.getLogger().addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    """clip-train: the exit status. SIGTERM and Ctrl-C are handled from its first line to its last (`train` has its
    own handling while it runs, and the caller's handlers are put back when main returns): one while it starts
    abandons the start (status 75, as one during `train`'s setup does); one once `train` has returned or raised
    changes nothing, and the status is what the run did (a second Ctrl-C still stops at once: 130). The default
    action ended the process in both with status 143, which slurm_train.sbatch takes for a failure: a start or
    a run stopped with a checkpoint was not requeued."""
    with StopRequest() as signals, contextlib.ExitStack() as phase:
        phase.enter_context(signals.interrupting(SetupInterrupted))

        def run_took_over(on_error: bool = False) -> None:
            # Called once `train` handles signals itself (as it holds its run directory), and again as it returns
            # or raises (`on_error`: an error): a signal that reaches these handlers after that came once it had
            # handed them back, the run over. Not as `train` is called: a signal before it took over would have
            # been taken for the end of the run and ignored, and the run would have gone on until the scheduler
            # killed it.
            phase.close()
            phase.enter_context(signals.ending(on_error))

        try:
            return parse_and_run(argv, run_took_over)
        except SetupInterrupted:
            return start_abandoned()
        except StoppedAtOnce:  # a second Ctrl-C as the command ends: said already, when it came
            return STOPPED_AT_ONCE_EXIT_CODE


def start_abandoned() -> int:
    """Says that a signal abandoned the start (nothing trained yet): the status that asks for a rerun."""
    log.warning("stopped while starting, before training a step: run it again")
    return STOPPED_EARLY_EXIT_CODE


def overrides_output_dir(overrides: list[str]) -> bool:
    """Whether an override sets output_dir, spelled as the loader reads it ("output_dir = runs/b" too)."""
    return any(override.partition("=")[0].strip() == "output_dir" for override in overrides if "=" in override)


def refuse_a_runs_config_pointing_elsewhere(config_file: Path, output_dir: Path) -> None:
    """ConfigError where `config_file` is a run directory's own config.toml (the folder holds checkpoints) and its
    output_dir, relative to the current folder, is another folder: `cd runs/a && clip-train config.toml` trained a
    new run in runs/a/runs/a, meant as the resume of runs/a. An output_dir given on the command line is taken as
    meant."""
    run_dir = Path(os.path.abspath(config_file.parent))
    if config_file.name != "config.toml" or not ckpt.list_checkpoints(run_dir):
        return
    if os.path.realpath(output_dir) != os.path.realpath(run_dir):
        raise ConfigError(
            f"{config_file} is the config of the run in {run_dir}, but its output_dir, {output_dir}, is "
            f"{os.path.abspath(output_dir)} from here: to continue that run, give --output-dir {run_dir} (or start "
            f"from the folder it was started in); to start another run from its settings, give that run's own "
            f"--output-dir"
        )


def parse_and_run(argv: list[str] | None, run_took_over: Callable[..., None]) -> int:
    """`main`'s work; `run_took_over` as `run`'s."""
    args = parse_args(argv)
    try:
        launcher = read_launcher_environment(os.environ)
    except LauncherMisconfigured as error:  # every rank says it: none can tell that it is rank 0
        print(f"clip-train: {error}", file=sys.stderr)
        return 2
    rank_zero = launcher is None or launcher.rank == 0
    if args.output_dir is not None:
        if overrides_output_dir(args.overrides) and rank_zero:
            print("clip-train: both --output-dir and an output_dir= override given; --output-dir is used",
                  file=sys.stderr)
    try:
        # --output-dir also when "" (an unset variable in a job script), which the config refuses. Given as it
        # is, not written into an override: a path outside Unicode's first plane (an emoji) came back from JSON's
        # escapes as a relative folder named after its own quoted, escaped text
        config = load_config(args.config, args.overrides, TrainConfig,
                             given={} if args.output_dir is None else {"output_dir": args.output_dir})
        if args.output_dir is None and not overrides_output_dir(args.overrides):
            refuse_a_runs_config_pointing_elsewhere(Path(args.config), Path(config.output_dir))
    except ConfigError as error:
        # Every rank reads the same file and overrides: rank 0 alone says what is wrong, not each of the
        # hundreds of processes of a cluster job. Unless this rank cannot read the file (a path that exists on
        # rank 0's node only): then rank 0 would be waiting for it, and it alone can say why.
        if rank_zero or not os.access(args.config, os.R_OK):
            if debugging():
                traceback.print_exc()
            print(f"{program_name(launcher)}: {hide_url_passwords(str(error))}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if rank_zero else logging.WARNING, format=log_format(launcher), datefmt="%H:%M:%S"
    )
    for console in logging.getLogger().handlers:
        console.addFilter(URL_PASSWORDS_HIDDEN)
    log_file = keep_log_in(Path(config.output_dir)) if rank_zero else None
    try:
        with warnings_as_log_lines():  # in train.log too
            return run(config, launcher, log_file, run_took_over)
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()


def command() -> NoReturn:
    """The clip-train command (and scripts/train.py): `main`, then the process's exit with its status. A signal
    after `main` returned (atexit's work, the interpreter's teardown) is ignored: the run is over and the status
    says what it did; the default action would have ended the process with 143 instead. Two Ctrl-C end an
    exit that hangs in the exit functions registered while `main` ran (the data loaders' clean-up)."""
    pressed = {"ctrl_c": 0}

    def while_exiting(signum, frame) -> None:
        if signum == signal.SIGINT:
            pressed["ctrl_c"] += 1
            if pressed["ctrl_c"] >= 2:
                os._exit(STOPPED_AT_ONCE_EXIT_CODE)

    # Installed before `main`, which puts it back as it returns: no moment is left to the default action
    for sig in STOP_SIGNALS:
        signal.signal(sig, while_exiting)
    atexit.register(ignore_signals_in_the_teardown)
    sys.excepthook = traceback_with_url_passwords_hidden
    sys.exit(main())


def traceback_with_url_passwords_hidden(kind: type[BaseException], error: BaseException, trace) -> None:
    """The command's `sys.excepthook`: Python's traceback of an error `main` did not expect, on stderr as Python
    writes it, the passwords of its URLs hidden as in the run's log lines (train.log has the same traceback
    hidden already; the console's showed them whole)."""
    sys.stderr.write(hide_url_passwords("".join(traceback.format_exception(kind, error, trace))))


def ignore_signals_in_the_teardown() -> None:
    """An exit function (registered before the run's own, it runs after them): from here to the process's end
    SIGTERM and SIGINT are ignored. Once the exit functions have run, Python puts back the default action of every
    signal it handled (not of an ignored one) and then frees its modules, which takes torch tens of milliseconds:
    a second copy of a pre-emption's SIGTERM (srun's and torchrun's) arriving then ended a stopped or finished
    run with 143, which slurm_train.sbatch takes for a failure. Here the exit functions that imports registered
    still run after this one, signals ignored: multiprocessing's (which ends and joins any child process the run's
    clean-up left), weakref finalizers, logging's flush; clip-train and scripts/train.py (clip_commands.clip_train)
    register it first, before those imports."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def note_in_run_log(log_file: RunDirectoryLog | None, message: str, error: BaseException | None = None) -> None:
    """Writes `message` to train.log alone, as an error (followed by `error`'s traceback, when given): the terminal
    has it already. Dropped where the run never held its directory (`RunDirectoryLog`)."""
    if log_file is not None:
        exc_info = (type(error), error, error.__traceback__) if error is not None else None
        log_file.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), exc_info))


def said_by_rank_0(error: BaseException, launcher: LauncherEnvironment | None) -> bool:
    """Whether this rank leaves `error` unsaid: another rank's failure, which every rank that did not fail raises
    alike (`clip.distributed.raise_on_every_rank`), is said by rank 0 (its own error, or the pointer to the rank
    whose own error says why). Said by every rank, hundreds of identical lines buried the one that says why."""
    return launcher is not None and launcher.rank != 0 and failed_on_another_rank(error)


def data_worker_died(death: BaseException, error: Exception, config: TrainConfig,
                     launcher: LauncherEnvironment | None) -> int:
    """Says in one line (on stderr and in train.log) that a data worker process died, as torch reported it, and
    what the run can continue from: status 1. It was a traceback through torch's SIGCHLD handler, from wherever
    the training process was (a step's gradient clipping, a save), which read as a crash of the trainer."""
    if debugging():
        traceback.print_exception(error)
    said = " ".join(str(death).split()).rstrip(".")  # torch's message ends in ". " and may run to two sentences
    sentences = [f"a data loader worker process died: {said}."]
    if "killed by signal: Killed" in said:  # SIGKILL: the usual way a worker dies
        sentences.append("A SIGKILL most often comes from the out-of-memory killer: fewer data.workers or a smaller "
                         "batch use less memory.")
    sentences.append(what_is_kept(config, launcher))
    log.error("%s", " ".join(sentences))
    return 1


def what_is_kept(config: TrainConfig, launcher: LauncherEnvironment | None) -> str:
    """What a run that failed can continue from, in a sentence: its latest checkpoint, by rank 0, which saves them
    (the other ranks may not see its run directory)."""
    if launcher is not None and launcher.rank != 0:
        return "Rank 0's checkpoints are kept: run the same command again to continue from the latest"
    latest = ckpt.latest_complete_checkpoint(Path(config.output_dir))
    if latest is None:
        return "No checkpoint had been saved yet: the same command again starts the run over"
    return f"The checkpoints saved so far are kept: run the same command again to continue from {latest[1]}"


def run(
    config: TrainConfig, launcher: LauncherEnvironment | None, log_file: RunDirectoryLog | None = None,
    run_took_over: Callable[..., None] = lambda on_error=False: None,
) -> int:
    """Trains; the exit status, with bad input and known failures said in one line (and in `log_file`,
    train.log, so that a run refused at a requeue says why beside its other starts; not where the run never
    held its directory, whose train.log may be another live run's). `run_took_over` is called once `train`
    handles signals itself, and again as it returns or raises."""

    def directory_held() -> None:  # inside train's signal handling
        run_took_over()
        if log_file is not None:
            log_file.open()

    failed = False
    try:
        try:
            results = train(config, on_run_directory_held=directory_held)
        except Exception:  # not a signal's own ending (SetupInterrupted, a second Ctrl-C)
            failed = True
            raise
        finally:
            run_took_over(on_error=failed)
    except SetupInterrupted:
        return start_abandoned()
    except StoppedAtOnce:
        # Said already, when it came; Python's traceback of the KeyboardInterrupt, through torch's modules,
        # read as a crash under that line
        if debugging():
            traceback.print_exc()
        return STOPPED_AT_ONCE_EXIT_CODE
    # Bad input, as a bad config: data that cannot be used, a run directory the config cannot continue (or
    # that another run is using),
    # train.init_weights naming no weights or weights of another architecture, a device this machine lacks
    except (
        BadTrainingInput, ResumeRefused, RunDirectoryInUse, WeightsFileError, ModelNotFoundError, UnusableData,
        DeviceUnavailable, RendezvousPortInUse,
    ) as error:
        if said_by_rank_0(error, launcher):
            return 2
        if debugging():
            traceback.print_exception(error.__cause__ or error)
        message = error.without_traceback() if isinstance(error, UnusableData) else str(error)
        print(f"{program_name(launcher)}: {hide_url_passwords(message)}", file=sys.stderr)
        note_in_run_log(log_file, message)
        return 2
    except (
        NonFiniteLossError, ckpt.NoReadableCheckpointError, ckpt.CheckpointWriteError, RunLogWriteError,
        MissingDependency, WandbStartError,
        DownloadError,  # train.init_weights could not be fetched (network, or a file that fails its SHA256)
    ) as error:
        if not said_by_rank_0(error, launcher):
            log.error("%s", error)
        return 1
    except Exception as error:
        death = worker_death(error)
        if death is not None:
            return data_worker_died(death, error, config, launcher)
        # Python prints its traceback on stderr as the process ends (status 1). train.log had none of it: a run
        # whose other rank was killed (a lost node, the OOM killer) fails here in a collective, and its log ended
        # on its last saved checkpoint as if it were still running. Said there with the traceback.
        note_in_run_log(log_file, f"the run failed: {type(error).__name__}: {error}", error)
        raise
    # Stopped by a signal, with a checkpoint: before the last step, or in the final evaluation
    if results.get("step", 0) < config.schedule.steps or results.get("evaluation_interrupted"):
        if launcher is None or launcher.rank == 0:  # the status alone (75) says it only to those who know it
            what = ("the final evaluation was abandoned" if results.get("step", 0) >= config.schedule.steps
                    else f"stopped at step {results.get('step', 0)} of {config.schedule.steps}")
            log.warning("%s, with a checkpoint in %s: run the same command again to continue (exit status %d)",
                        what, config.output_dir, STOPPED_EARLY_EXIT_CODE)
        return STOPPED_EARLY_EXIT_CODE
    line = headline(results)
    if line and (launcher is None or launcher.rank == 0):
        print(line)
    return 0


if __name__ == "__main__":
    command()
