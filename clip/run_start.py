"""What a training run does before its first step, beside the loop in `clip.train`: the run directory held,
the process configured, the model built as it trains, a new run's initial weights, the run's config recorded,
and warnings about settings that run but are most likely not what was meant. Errors in the user's data found
then are BadTrainingInput, which `clip.cli.train` reports in one line. Also the watch, during the run, that the
run directory is still the folder the run took (`RunDirectoryWatch`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, TrainLoopConfig, to_toml
from .cpu_memory import freed_memory_kept
from .cuda_backends import configure_cuda_backends, cuda_backends_restored
from .config_io import differences, short_repr
from .distributed import (
    DistributedInfo,
    any_rank,
    from_rank_zero,
    gather_objects,
    raise_on_every_rank,
)
from .download import DownloadError
from .loading import load_weights_with_source
from .loss import SIGLIP_INITIAL_LOGIT_SCALE
from .model import create_model
from .run_lock import RunDirectoryInUse, locked_run_directory
from .run_log import RunLog, kept_aside_suffix, replaced_atomically
from .train_step import ContrastiveModel
from .weights_file import WeightsFileError, run_directories_in

log = logging.getLogger("clip.train")


class BadTrainingInput(ValueError):
    """A training or evaluation dataset that cannot be used (a missing manifest or folder, wrong columns, a
    malformed file, shards without a sample count), found before the first step: `clip.cli.train` reports it in
    one line, as a bad config. The error that the reading raised is its __cause__."""


# What reading the user's data raises for a wrong path or content. Not every OSError: a connection reset
# or a timeout on an object store is no bad input, and keeps its traceback (a rerun may well succeed).
TRAINING_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


@contextlib.contextmanager
def bad_input_reported_as(error_type: type[Exception]):
    """Turns the errors that a wrong path or file raises (TRAINING_INPUT_ERRORS) into `error_type`, the
    original chained for CLIP_DEBUG's traceback."""
    try:
        yield
    except TRAINING_INPUT_ERRORS as error:
        raise error_type(str(error)) from error


@contextlib.contextmanager
def bad_input_on_every_rank(dist_info: DistributedInfo, what: str) -> Iterator[None]:
    """`bad_input_reported_as(BadTrainingInput)`, and a BadTrainingInput that some ranks found raised on every
    rank: its own where it has one, else one that points at the other rank's. Each rank reads its data and
    evaluation datasets itself, and a path may be missing on one node only (a node-local disk, a relative path
    under another working directory): the others went on into their next collective and waited for it there
    (under NCCL until the timeout; under gloo rank 0 failed with "Connection closed by peer", having written the
    run's config.toml). `what` names the data in that pointer. Every rank enters the block at the same point:
    its end is a collective."""
    failure = None
    try:
        with bad_input_reported_as(BadTrainingInput):
            yield
    except BadTrainingInput as error:  # re-raised below, after the ranks agree
        failure = error
    raise_on_every_rank(failure, dist_info, BadTrainingInput(
        f"another rank could not use {what} (its error says why)"
    ))


# Settings that only shape the process they are given to (its device's spelling -- "cuda:0" beside "auto" --,
# threads, memory, how its data workers run, rank 0's own displays): ranks may differ in them
PER_PROCESS_SETTINGS = frozenset({
    "train.device", "train.threads", "train.keep_freed_cpu_memory", "data.prefetch_factor", "data.pin_memory",
    "data.log_every_s", "data.worker_timeout_s", "logging.progress_bar", "logging.tensorboard", "logging.plot",
})


def refuse_configs_that_differ_between_ranks(config_dict: dict, dist_info: DistributedInfo) -> None:
    """A BadTrainingInput on every rank where some rank's resolved config is not rank 0's, naming the settings.

    Each rank reads the config file and command line itself, and they can differ: torchrun started by hand on
    each node with another override, a recipe edited between the nodes' starts. A learning rate given to one rank
    only trained different weights on each rank, without a word (rank 0's checkpoint recording its own); a batch
    size or checkpoint interval ended a rank in a collective mismatch ("EnforceNotMet") that named no setting."""
    if not dist_info.is_distributed:
        return
    rank_0s = from_rank_zero(config_dict if dist_info.is_main else None, dist_info)
    differing = [found for found in differences(rank_0s, config_dict) if found[0] not in PER_PROCESS_SETTINGS]
    said = "; ".join(f"{key} = {short_repr(mine)} (rank 0: {short_repr(theirs)})"
                     for key, theirs, mine in differing[:5]) + ("; ..." if len(differing) > 5 else "")
    by_rank = [(rank, text) for rank, text in enumerate(gather_objects(said if differing else None, dist_info))
               if text is not None]
    if by_rank:
        rank, text = by_rank[0]
        others = f" (and {len(by_rank) - 1} other rank(s))" if len(by_rank) > 1 else ""
        error = BadTrainingInput(
            f"the ranks were started with different configs: rank {rank}{others} has {text}. Every rank must read "
            f"the same config file and overrides"
        )
        error.failed_on_another_rank = not dist_info.is_main  # the same line on every rank: rank 0 says it
        raise error


def warn_about_unlikely_settings(
    config: TrainConfig, global_batch: int, samples_per_epoch: int, saved_config: dict | None, device: torch.device
) -> None:
    """Settings that run but are most likely not what was meant, each named in a warning. saved_config: the
    resumed checkpoint's, None for a new run."""
    if device.type == "cpu" and config.train.precision != "fp32":
        # The GPU recipes' bf16, run on a laptop as written: ViT-B/32 took 100 s a step at batch 4, not 2-5 s
        log.warning("train.precision = %r on the CPU: autocast to a 16-bit type is only fast on CPUs with native "
                    "16-bit matrix instructions (AMX, AVX512-BF16); elsewhere it is 20-50x slower than fp32 "
                    "(measured on an AVX2 CPU). Set train.precision=fp32 unless this CPU has them.",
                    config.train.precision)
    image_trained = not config.train.lock_image or config.train.lock_image_unlocked_layers > 0
    if config.train.grad_checkpointing and config.model.vision.kind == "resnet" and image_trained:
        # Recomputed in the backward pass, its BatchNorm layers would update their running statistics twice
        log.warning("train.grad_checkpointing recomputes transformer blocks only: this ResNet image tower keeps "
                    "its activations (the text tower's are recomputed)")
    schedule = config.schedule
    # The warmup's step k runs at (k + 1) / warmup_steps of the peak: the last of `steps` reaches it when equal
    if schedule.warmup_steps > schedule.steps:
        log.warning("schedule.warmup_steps (%d) > schedule.steps (%d): the learning rate never reaches "
                    "optimizer.lr (the last step's is %.3g of it)", schedule.warmup_steps, schedule.steps,
                    schedule.steps / schedule.warmup_steps)
    elif schedule.warmup_steps == schedule.steps and schedule.kind != "constant":
        log.warning("schedule.warmup_steps = schedule.steps (%d): the whole run is warmup, the learning rate "
                    "reaches optimizer.lr at the last step only and the %s decay never starts",
                    schedule.steps, schedule.kind)
    if samples_per_epoch < global_batch:
        log.warning("an epoch holds %d samples, fewer than the global batch of %d: each batch repeats pairs, whose "
                    "copies are then each other's negatives", samples_per_epoch, global_batch)
    locked = [f"train.lock_{tower}" for tower in ("image", "text") if getattr(config.train, f"lock_{tower}")]
    if locked and saved_config is None and config.train.init_weights is None:
        log.warning("%s without train.init_weights: the locked tower keeps its random initialisation (LiT locks a "
                    "pretrained one)", locked[0])
    if saved_config is None and config.train.init_weights is not None and all(
        source.kind == "synthetic" for source in config.data.sources
    ):
        # [data] left at its default (a config built in Python, or the demo recipe given init_weights): the
        # pretrained weights were tuned to the demo's shapes for the whole run, without a word
        log.warning("train.init_weights with synthetic data only: %s is fine-tuned on the demo's generated shapes; "
                    "for your own pairs add [[data.sources]] tables of kind \"manifest\" or \"shards\"",
                    config.train.init_weights)
    saved_init_weights = saved_config.get("train", {}).get("init_weights") if saved_config is not None else None
    if saved_config is not None and config.train.init_weights not in (None, saved_init_weights):  # same: a requeue
        log.warning("train.init_weights changed to %s, which is not read: a resumed run continues from its own "
                    "checkpoint (a new --output-dir starts from them)", config.train.init_weights)


@contextlib.contextmanager
def run_directory_held(run_dir: Path, dist_info: DistributedInfo) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (`clip.run_lock`) while the run lives. The ranks agree on a
    refusal, or the others would wait for rank 0 in their next collective until it timed out."""
    with contextlib.ExitStack() as held:
        refusal = None
        if dist_info.is_main:
            try:
                held.enter_context(locked_run_directory(run_dir))
            except RunDirectoryInUse as error:  # re-raised below, after the ranks agree
                refusal = error
            except OSError as error:  # an output_dir that cannot be created or written: a file, read-only, full
                refusal = BadTrainingInput(f"cannot use {run_dir} as the run directory: {error}")
                refusal.__cause__ = error
        raise_on_every_rank(refusal, dist_info, RunDirectoryInUse(
            f"rank 0 could not take {run_dir} (its error says why)"
        ))
        yield


def start_new_run(module: ContrastiveModel, config: TrainConfig, dist_info: DistributedInfo) -> dict | None:
    """A run without a checkpoint: the initial weights (train.init_weights) and temperature, and each rank's
    random numbers. Returns, on rank 0, the record of the initial weights that the run's checkpoints and
    results.json keep (`init_weights_record`); None from scratch and on the other ranks."""
    record = None
    if config.train.init_weights is not None:
        # Rank 0 alone reads them (one download, one copy in memory): DDP's constructor gives every rank
        # rank 0's parameters. Copied in place, so the optimizer's references stay valid. The ranks agree
        # on a failure, or the others would wait for rank 0 in that constructor until it timed out.
        failure = None
        if dist_info.is_main:
            try:
                source = load_weights_with_source(module.clip, config.train.init_weights)
                log.info("initialised from %s%s", source.path, "" if source.step is None else f" (step {source.step})")
                record = init_weights_record(config.train.init_weights, source.to_dict())
            except Exception as error:  # re-raised below, after the ranks agree
                failure = error
        elsewhere: Exception = WeightsFileError("rank 0 could not read train.init_weights (its log says why)")
        # Of the same kind as rank 0's failure where that is a download's (status 1, try again), not bad input
        # (status 2): the other ranks said "bad input" for a network failure, and srun reports the highest status
        if dist_info.is_distributed and any_rank(failure is not None, dist_info):
            if from_rank_zero(isinstance(failure, DownloadError) if dist_info.is_main else None, dist_info):
                elsewhere = DownloadError("rank 0 could not download train.init_weights (its log says why)")
        raise_on_every_rank(failure, dist_info, elsewhere)
    if dist_info.is_main:
        warn_of_a_literal_tilde_folder(Path(config.output_dir))
        warn_of_run_directories_inside(Path(config.output_dir))
    # The initial weights' SigLIP bias (None for weights trained without one) is the loss's parameter here
    loaded_bias, module.clip.logit_bias = module.clip.logit_bias, None
    if config.loss.kind == "siglip":
        with torch.no_grad():
            if loaded_bias is not None:  # a SigLIP model goes on from its own temperature and bias
                module.logit_bias.copy_(loaded_bias)
            else:  # SigLIP starts from its own temperature, also over weights trained with another loss
                module.clip.logit_scale.fill_(SIGLIP_INITIAL_LOGIT_SCALE)
    # Ranks draw different random numbers (patch dropout's masks; the data's crops have seeds of their own)
    torch.manual_seed(ckpt.rank_seed(config.train.seed, dist_info.rank))
    return record


def init_weights_record(given: str, source: dict) -> dict:
    """What a fine-tuning run keeps of its initial weights: train.init_weights as given, and which weights that
    was when the run started (`WeightsSource.to_dict()`). A run directory's newest checkpoint moves on and a
    file may be replaced since, so the name alone (config.toml's) does not say."""
    return {"given": given, **source}


def warn_of_a_literal_tilde_folder(run_dir: Path) -> None:
    """Before "~" in output_dir meant the home folder, a recipe's output_dir = "~/runs/x" (which no shell expands)
    made a folder named "~" in the current one. A run of that recipe started there, now under the home folder,
    would start over from step 0 beside its own checkpoints: named here."""
    try:
        under_home = run_dir.relative_to(Path.home())
    except (ValueError, RuntimeError):  # not under the home folder, or no home folder
        return
    literal = Path("~") / under_home
    try:
        earlier = ckpt.list_checkpoints(literal)
    except OSError:  # unreadable: a warning's check must not stop the run
        return
    if earlier:
        log.warning("%s starts a new run, but %s (a folder named '~' in the current one, which output_dir = '~/...' "
                    "made before '~' meant the home folder) holds checkpoints: to continue that run, pass "
                    "--output-dir %s", run_dir, literal, literal.resolve())


RUNS_NAMED = 5  # of a folder of runs given as the run directory: a long-lived runs/ holds hundreds


def warn_of_run_directories_inside(run_dir: Path) -> None:
    """--output-dir runs, meant as runs/my_run (to resume that run, or to start one beside it), started a new run
    from scratch in the folder of runs itself, its checkpoints and results among the runs' folders, without a
    word: named here, with the runs inside (those holding a checkpoint: a folder of runs may hold others)."""
    runs = run_directories_in(run_dir)  # [] where unreadable, or not there yet: a warning must not stop the run
    if runs:
        named = ", ".join(map(str, runs[:RUNS_NAMED]))
        if len(runs) > RUNS_NAMED:
            named += f" and {len(runs) - RUNS_NAMED} more"
        log.warning("%s starts a new run, but it holds run directories: %s. To continue one of them, pass its own "
                    "folder (--output-dir %s)", run_dir, named, runs[-1])


def results_step(path: Path, default: int) -> int:
    """The step a results.json records (the step its run ended at), or `default` if it says none."""
    try:
        step = json.loads(path.read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return default
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else default


def configure_process(train_config: TrainLoopConfig, device: torch.device, on_exit: contextlib.ExitStack) -> None:
    """The process-wide settings the run asks for, each undone by `on_exit` where the process outlives the run."""
    if train_config.threads:
        # The process's setting: put back when the run ends, for the notebook or test that called train()
        on_exit.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(train_config.threads)
    if device.type == "cpu" and train_config.keep_freed_cpu_memory:
        # Process-wide malloc settings for the run's length; the data-loader workers, forked later, inherit them
        if on_exit.enter_context(freed_memory_kept()):
            log.info("CPU run: malloc keeps freed memory for reuse (train.keep_freed_cpu_memory)")
    if device.type == "cuda":
        on_exit.enter_context(cuda_backends_restored())
        configure_cuda_backends(allow_tf32=train_config.tf32)


def build_training_module(config: TrainConfig, device: torch.device) -> ContrastiveModel:
    """A new model as the run trains it (seeded: the same initial weights on every rank), on `device`: towers
    locked as asked before the optimizer sees the parameters, with SigLIP's bias for that loss."""
    torch.manual_seed(config.train.seed)
    clip_model = create_model(config.model)
    clip_model.set_grad_checkpointing(config.train.grad_checkpointing)
    clip_model.lock(
        image=config.train.lock_image, text=config.train.lock_text,
        image_unlocked_layers=config.train.lock_image_unlocked_layers,
        text_unlocked_layers=config.train.lock_text_unlocked_layers,
    )
    if config.train.patch_dropout:
        clip_model.set_patch_dropout(config.train.patch_dropout)
    module = ContrastiveModel(clip_model, with_logit_bias=config.loss.kind == "siglip", trim_text=False).to(device)
    if config.model.vision.kind == "resnet" and device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)  # cuDNN's fastest layout for convolutions
    return module


def record_run_start(run_dir: Path, config_dict: dict, resumed: bool, start_step: int) -> None:
    """Writes the run's config.toml (rank 0, once the run is about to train); a resumed run's earlier
    results.json, from a finished run now extended (more schedule.steps), is kept as results_step_N.json: it
    would say "finished", with the earlier step's figures, until the extension finishes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(run_dir / "config.toml") as file:  # a kill mid-write tore it
        file.write(to_toml(config_dict))
    earlier_results = run_dir / "results.json"
    if resumed and earlier_results.exists():
        # Named after their own step: a resume from below it (the last checkpoint torn) would otherwise
        # mislabel them, and replace the results an earlier extension kept under that name
        ended_at = results_step(earlier_results, default=start_step)
        kept = earlier_results.with_name(f"results_step_{ended_at}.json")
        earlier_results.replace(kept)
        log.info("the results of the run's end at step %d are now %s", ended_at, kept)


# [eval] settings that change no figure: how often, how many at once, with how many workers. A final evaluation
# run again with a smaller batch (after running out of memory) gives the same results, replaced as a rerun's
_EVALUATION_PACE = ("every_n_steps", "at_start", "batch_size", "workers", "text_batch_size", "retrieval_chunk_size")


def _what_gives_the_figures(eval_settings: dict) -> dict:
    return {key: value for key, value in eval_settings.items() if key not in _EVALUATION_PACE}


def keep_results_of_other_evaluations(run_dir: Path, eval_settings: dict) -> None:
    """Moves a finished run's results.json aside, to results_kept_TIME.json (TIME: its last change), when the
    [eval] settings it records (`train` writes them) are not `eval_settings`, those of the run started again to
    evaluate it: the new figures (other datasets, other sample counts) replaced the earlier ones without a trace,
    while config.toml and the checkpoint still named the earlier settings. Results of the same settings (a final
    evaluation that was interrupted or could not be written, run again) and of an earlier version, which record
    none, are replaced as before."""
    path = run_dir / "results.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("eval")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(recorded, dict):
        return
    before, now = _what_gives_the_figures(recorded), _what_gives_the_figures(eval_settings)
    if before == now:
        return
    kept = path.with_name(f"{path.stem}{kept_aside_suffix(path)}{path.suffix}")
    try:
        path.replace(kept)
    except OSError as error:  # the new results replace them, as before: no reason to refuse the evaluation
        log.warning("results.json holds the evaluation of other settings, and could not be kept as %s: %s", kept.name,
                    error.strerror or error)
        return
    changed = ", ".join(f"eval.{key}" for key, _, _ in differences(before, now)[:5])
    log.info("results.json holds the evaluation of other settings (%s): kept as %s", changed, kept.name)


class RunDirectoryWatch:
    """Rank 0's look, before each write into the run directory, that it is still the folder the run took. One
    deleted (or moved away) under a running run was made again by the next checkpoint's save without a word: no
    config.toml, no lock (a second run could start in it), train.log and TensorBoard's events going on into the
    deleted files. The run goes on, as its weights in memory are the only copy of its progress: the folder is
    made again with the run's config.toml and lock, TensorBoard starts a new event file (train.log follows by
    itself: `clip.cli.train.RunDirectoryLog`), and a warning says what is gone, once for each disappearance."""

    def __init__(self, run_dir: Path, config_dict: dict, run_log: RunLog, on_exit: contextlib.ExitStack) -> None:
        self.run_dir, self.config_dict, self.run_log, self.on_exit = run_dir, config_dict, run_log, on_exit
        self.identity = self._identity()
        # The checkpoints saved before the folder was made again went with it, until the next save: the messages
        # that name the latest checkpoint as kept must not name a deleted file (`kept_step`)
        self.checkpoints_lost = False

    def _identity(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.run_dir)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def check(self, step: int) -> None:
        try:
            if self._identity() == self.identity:
                return
        except OSError:  # the storage failing (EIO, ESTALE): the write that follows says so
            return
        self.checkpoints_lost = True
        try:
            # Its own lock: RunDirectoryInUse if another run has started in a folder of that name meanwhile
            self.on_exit.enter_context(locked_run_directory(self.run_dir))
            record_run_start(self.run_dir, self.config_dict, resumed=False, start_step=step)  # config.toml
        except OSError as error:  # a read-only or full file system: one line, as a checkpoint that cannot be written
            raise ckpt.CheckpointWriteError(
                f"the run directory {self.run_dir} was deleted or moved away while the run went on, and could not "
                f"be made again at step {step}: {error.strerror or error}; none of its checkpoints is kept"
            ) from error
        self.identity = self._identity()
        self.run_log.start_again()
        log.warning("the run directory %s was deleted or moved away while the run went on: made again at step %d, "
                    "with the run's config.toml and lock, and the run saves its checkpoints there again; none of "
                    "what was written there before (checkpoints, metrics.jsonl, train.log) is in it",
                    self.run_dir, step)

    def moved(self) -> bool:
        """Whether the folder at the run directory's path is no longer the one the run took (deleted or moved away
        since the last `check`)."""
        try:
            return self._identity() != self.identity
        except OSError:  # the storage failing: not a sign of a move
            return False

    def kept_step(self, saved_step: int | None) -> int | None:
        """The step of the latest checkpoint still on disk, of those this run saved (`saved_step` the latest)."""
        return None if self.checkpoints_lost else saved_step
