"""Helpers shared by the evaluation commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clip.config_io import MAX_WORKERS  # --workers' limit, as for the configs' workers settings
from clip.device_names import available_device
from clip.download import DownloadError
from clip.launcher import LauncherMisconfigured, read_launcher_environment
from clip.run_log import kept_aside_suffix
from clip.run_log import write_json  # noqa: F401 -- the commands write results files as the trainer does

if TYPE_CHECKING:
    from clip.loading import WeightsSource

logger = logging.getLogger(__name__)

# A bad path, a malformed annotation file, a config value out of range: the commands' inputs fail with these
# (ConfigError is a ValueError), and a one-line message says more to the user than a traceback. A bug inside
# the library, torch or numpy can raise them too, so CLIP_DEBUG brings the traceback back.
USER_ERRORS = (ValueError, OSError)
# A released model's weights could not be fetched (offline, or a file that fails its SHA256): one line too, as
# its message says what to do, but status 1, as clip-train gives it: it is no bad input, and the same command
# may work later (a script that retries on a network failure tells the two apart by the status)
FAILED_DOWNLOAD_EXIT_CODE = 1
DEBUG_VARIABLE = "CLIP_DEBUG"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C ended


def errors_help(examples: str) -> str:
    """The commands' --help epilog, naming `examples` of the command's own input errors: one text for them all
    spoke of annotation files also in the help of commands that read none (clip-export's)."""
    return (
        f"An input error ({examples}) is reported in one line, with exit status 2, and a failed download with "
        f"status 1; set {DEBUG_VARIABLE}=1 to print its traceback as well."
    )


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def debugging() -> bool:
    """CLIP_DEBUG is set to anything but "" or "0"."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def warnings_as_log_lines() -> Iterator[None]:
    """Within the block, a Python warning (clip.load's about a file's conventions, a cached download that no
    longer matches its SHA256) is a log line of the "py.warnings" logger, as the command's other warnings are:
    printed raw it began with the library's source path and line and ended with the `warnings.warn(` call,
    which tell a command's user nothing, and it was missing from the run's train.log. With CLIP_DEBUG set,
    warnings print as Python prints them, with their place in the code."""
    if debugging():
        yield
        return
    logger = logging.getLogger("py.warnings")

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        logger.warning("%s%s", kind, message)

    previous = warnings.showwarning
    warnings.showwarning = log_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs `command(args)`; an input error becomes `prog: message` on stderr and exit status 2 (argparse's
    status for bad usage), a failed download the same line and status 1, Ctrl-C a line and status 130, each
    preceded by its traceback when CLIP_DEBUG is set. Python warnings are log lines. Refused (status 2) as one of
    several processes of a launcher: the commands run in one process."""
    refusal = refusal_as_one_of_several(prog, "do the whole job and write the same files")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    try:
        with warnings_as_log_lines():
            return command(args)
    except (*USER_ERRORS, DownloadError) as error:
        if debugging():
            traceback.print_exc()
        print(f"{prog}: {error}", file=sys.stderr)
        return FAILED_DOWNLOAD_EXIT_CODE if isinstance(error, DownloadError) else 2
    except KeyboardInterrupt:
        # Ctrl-C: a traceback of wherever the evaluation happened to be told the user nothing. What the command
        # wrote before it (results files, cached features) was written whole, each file replaced atomically.
        if debugging():
            traceback.print_exc()
        print(f"{prog}: interrupted; the files it wrote before are kept", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def refusal_as_one_of_several(prog: str, each_would: str) -> str | None:
    """The message refusing a one-process command that a launcher started as one of several processes (what
    each process would do: `each_would`), else None."""
    launched_as = one_of_several_ranks(os.environ)
    if launched_as is None:
        return None
    return (f"{prog}: runs in one process, but was started as {launched_as}: every process would {each_would}. "
            f"Start it once: without torchrun, or with `srun -n1`")


def one_of_several_ranks(environ: Mapping[str, str]) -> str | None:
    """'rank R of N (torchrun)' where a launcher started this process as one of several, else None. Under SLURM
    only a task of an srun step of several: a batch script's own shell has SLURM_PROCID and the job's
    SLURM_NTASKS too, and a command run there is one process."""
    try:
        # Unchecked ranges: a job script's MASTER_PORT=$((29500 + SLURM_JOB_ID)), meant for training, made the
        # several tasks of an srun evaluation look like no launcher, and each did the whole job
        launcher = read_launcher_environment(environ, check_ranges=False)
    except LauncherMisconfigured:  # variables that make no run: not a several-process start to refuse either
        return None
    if launcher is None or launcher.world_size <= 1:
        return None
    if launcher.launcher == "slurm" and not environ.get("SLURM_STEP_NUM_TASKS"):  # not in an srun step
        return None
    return f"rank {launcher.rank} of {launcher.world_size} ({launcher.launcher})"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch or chunk size of 0 would only fail deep inside a loop)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value >= 2**63:  # 99999999999999999999 failed deep inside, "Stop argument for islice() must be ..."
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker counts, "0 = all" limits)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value



def worker_count(text: str) -> int:
    """argparse type: a DataLoader worker count in [0, MAX_WORKERS]."""
    value = non_negative_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_WORKERS} (processes decoding the images; at most one per CPU this process "
            f"may use is started), got {value}")
    return value


def workers_for_this_machine(requested: int, setting: str) -> int:
    """`requested` DataLoader workers, at most one per CPU this process may use: they decode images, which more
    processes than CPUs only share, and torch warns of "excessive worker creation" that "might get DataLoader
    running slow or even freeze" above that count (its own measure of CPUs, used here). A config written for a
    GPU server (configs/eval/zeroshot_imagefolder.toml's workers = 8) then runs on a laptop without that
    warning, and the capped count is logged, naming the `setting` that asked for more."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested <= cpus:
        return requested
    logging.getLogger(__name__).info(
        "%s %d is more than the %d CPU(s) this process may use: %d worker processes decode the images",
        setting, requested, cpus, cpus)
    return cpus


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else the CPU) or a torch device string that this machine has; anything
    else is a ValueError, so a typo or a missing GPU is one line before the model loads, not torch's
    traceback from the first tensor moved there ("gpu", "meta", "cpu:1", "cuda:3" on two GPUs: see
    clip.device_names)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return available_device(name, "'auto', 'cpu', 'cuda' or 'cuda:N'")


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The options that the evaluation commands share: where and how the model runs over the images."""
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=worker_count, default=2,
                        help=f"DataLoader processes decoding the images (0: in this process; at most {MAX_WORKERS}); "
                             "no more are started than the CPUs this process may use")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast over the float32 weights (fp32: none)")


def load_model(name: str, device: torch.device) -> tuple[torch.nn.Module, Any, WeightsSource]:
    """(model with float32 weights, eval preprocessing, the weights read) through `clip.loading.load_with_source`:
    a released name, a file or a training run directory. The commands' `precision` is the autocast of float32
    weights, as in evaluation during training; clip.load's float16 weights on CUDA made "fp32" (the default)
    compute in float16, and could make a run's own checkpoint score differently from its evaluation during
    training. The weights are not halved at all (`half_on_cuda=False`): float16 weights made float32 again
    would still have lost a float32 checkpoint's precision. The commands record the `WeightsSource` in their
    results: the model given names a run directory whose newest checkpoint moves on while it trains, and the
    source says which file (and step) was evaluated."""
    from clip.loading import load_with_source

    model, preprocess, source = load_with_source(name, device=device, half_on_cuda=False)
    return model.float(), preprocess, source


def writable_output_dir(path: Path) -> Path:
    """Creates `path` and checks that files can be written in it, once an evaluation's inputs are checked and
    before its model loads: found only when its results were written, a folder that is a file or read-only
    lost the whole evaluation's work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"cannot write results to {path}: {error.strerror or error}") from error
    return path


# The end of a name keep_results_of_other_weights gave: _kept_TIME, or _kept_TIME_N
_KEPT_NAME = re.compile(r"_kept_\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(_\d+)?$")


def _with_paths_resolved(record: Any, path_keys: tuple[str, ...]) -> Any:
    """`record` (a JSON object) with the values of `path_keys` made absolute and real: 'imgs', './imgs/' and
    '/data/imgs' name one folder, whose results a rerun replaces."""
    if not isinstance(record, dict):
        return record
    return {key: os.path.realpath(value) if key in path_keys and isinstance(value, str) and value else value
            for key, value in record.items()}


def keep_results_of_other_weights(
    path: Path, source: WeightsSource, companions: str = "",
    inputs: tuple[str, dict[str, Any], tuple[str, ...]] | None = None,
) -> None:
    """Moves a results file that `path` holds aside when it was written for other weights (its "weights" record,
    `WeightsSource.to_dict`, differs) or cannot be read as one, to `STEM_kept_TIME.json` (TIME: its last change),
    with a log line; results of the same weights are replaced, as a rerun of the same evaluation. The files
    beside it that match the glob `companions` (clip-zeroshot's confusion PNGs) go with it, as NAME_kept_TIME.
    `inputs`, (FIELD, RECORD, PATH_KEYS), moves aside the results of another dataset as well, those whose FIELD
    is not RECORD (the values of PATH_KEYS compared as the files they name): two image folders both named
    "images" share a default output folder. Called before an evaluation writes: the default output folders
    are named after the config or dataset, not the model, so evaluating a second checkpoint replaced the first
    one's results without a word."""
    import json

    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):  # not a results file this command could read: not to be replaced either
        written = None
    same_weights = isinstance(written, dict) and written.get("weights") == json.loads(json.dumps(source.to_dict()))
    field, record, path_keys = inputs if inputs is not None else (None, None, ())
    same_inputs = field is None or (
        isinstance(written, dict)
        and _with_paths_resolved(written.get(field), path_keys)
        == _with_paths_resolved(json.loads(json.dumps(record)), path_keys)
    )
    if same_weights and same_inputs:
        return
    # Said as what it is: an earlier version's results record no weights, and were said to be "other weights'"
    if not isinstance(written, dict):
        holds = "holds no results this command can read"
    elif "weights" not in written:
        holds = "holds results that do not name their weights (an earlier version's)"
    elif not same_weights:
        holds = "holds the results of other weights"
    else:
        holds = f"holds the results of another dataset (its {field!r} record differs)"
    suffix = kept_aside_suffix(path)
    kept = path.with_name(f"{path.stem}{suffix}{path.suffix}")
    # The companions first (those named _kept_TIME are earlier ones', left where they are): the results file last, so
    # that an interrupted move leaves it to be found and moved again
    for companion in sorted(path.parent.glob(companions) if companions else []):
        if not _KEPT_NAME.search(companion.stem):  # "confusion_flowers_kept_aside" is a dataset's own
            companion.rename(companion.with_name(f"{companion.stem}{suffix}{companion.suffix}"))
    path.rename(kept)
    logger.info("%s %s: kept as %s%s", path, holds, kept,
                f" (and {companions} beside it, as *{suffix}*)" if companions else "")
