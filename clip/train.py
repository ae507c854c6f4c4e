"""The training loop, read top to bottom: setup, resume, the steps, logging, evaluation and checkpoints. What
comes before the first step (the run directory, the model as built, a new run's initial weights, warnings about
settings) is `clip.run_start`'s, one step's passes (exact contrastive gradient accumulation) `clip.train_step`'s,
stopping on a signal `clip.stopping`'s, what a checkpoint allows a new start to do `clip.resume`'s, the command
line and its exit statuses `clip.cli.train`'s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import TrainConfig, TrainLoopConfig, to_dict
from .config_io import rechecked
from .data import (
    PixelNormalizer,
    build_train_data,
    counts_line,
    merge_rank_reports,
    states_to_save,
)
from .data.shards import require_shard_readers
from .dependencies import require_a_compiler_for_compile
from .distributed import (
    DistributedInfo,
    StepAgreement,
    agreement_flags,
    any_rank,
    broadcast_buffers_from_rank_zero,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    raise_on_every_rank,
    ranks_phrase,
    release_run_objects,
)
from .evaluation.during_training import check_evaluation_datasets, has_evaluations, run_evaluations
from .evaluation.features import AUTOCAST_DTYPES
from .evaluation.features import autocast as autocast_in
from .loss import build_loss
from .model import count_parameters, trimmed_text_length
from .optim import build_optimizer, learning_rate, optimizer_parameter_names
from .resume import checkpoint_to_resume, entry_restored, refused_on_every_rank, restore_training_state
from .run_lock import RunDirectoryInUse
from .run_log import (
    RunLog,
    RunLogWriteError,
    plot_run,
    remove_temporaries_of,
    require_wandb,
    start_wandb,
    write_json,
)
from .run_start import (
    BadTrainingInput,
    RunDirectoryWatch,
    bad_input_on_every_rank,
    build_training_module,
    configure_process,
    keep_results_of_other_evaluations,
    record_run_start,
    refuse_configs_that_differ_between_ranks,
    run_directory_held,
    start_new_run,
    warn_about_unlikely_settings,
)
from .step_verdict import VerdictInFlight, skips_on_device, step_or_skip_on_device
from .stopping import STOP_SIGNALS, DataWaitInterrupted, EvaluationInterrupted, SetupInterrupted, StopRequest
from .throughput import peak_flops, training_flops_per_sample
from .tokenizer import get_tokenizer
from .train_step import BatchNormSnapshot, contrastive_step

log = logging.getLogger("clip.train")

# The files of the run directory that its rank 0 replaces whole (`run_log.replaced_atomically`)
RUN_FILES_REPLACED_WHOLE = ("config.toml", "metrics.jsonl", "results.json", "training.png")


class NonFiniteLossError(RuntimeError):
    pass


def gradient_norm(module: nn.Module, clip_to: float | None) -> torch.Tensor:
    """The total L2 norm of the gradients (a tensor on their device: reading it waits for the backward pass),
    clipped to `clip_to` unless None."""
    if clip_to is not None:
        return torch.nn.utils.clip_grad_norm_(module.parameters(), clip_to)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(module.parameters(), math.inf)  # scales by 1


def bound_temperature(clip_model: nn.Module, max_log_scale: float) -> None:
    """The paper clips the learned temperature so that the logits are scaled by at most 100
    (loss.max_logit_scale; `max_log_scale` is its log)."""
    with torch.no_grad():
        clip_model.logit_scale.clamp_(0, max_log_scale)


def wait_for_device(device: torch.device) -> float:
    """time.perf_counter() once `device` has run all it was given: CUDA kernels run behind the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def set_training_modes(train_module: nn.Module, clip_model: nn.Module, train_config: TrainLoopConfig) -> None:
    """Training mode, but a locked tower stays in eval mode (evaluations restore each module's own mode): a
    ResNet's BatchNorm keeps its (loaded) running statistics. The top of a partly locked tower trains."""
    train_module.train()
    if train_config.lock_image:
        clip_model.visual.eval()
    if train_config.lock_text:
        for tower_module in clip_model.text_tower():
            tower_module.eval()
    for tower in ("image", "text"):
        for tower_module in clip_model.tower_top(tower, getattr(train_config, f"lock_{tower}_unlocked_layers"))[0]:
            tower_module.train()


def trained_phrase(module: nn.Module, train_config: TrainLoopConfig) -> str:
    """" (N trained: ...)" for a run with a locked tower, "" otherwise: without it, nothing a run logs showed
    that lock_image or lock_text had taken effect, or how much of the model a partly locked tower trains."""
    locks = []
    for tower in ("image", "text"):
        if getattr(train_config, f"lock_{tower}"):
            layers = getattr(train_config, f"lock_{tower}_unlocked_layers")
            unlocked = f" except its last {layers} layer{'s' * (layers > 1)}" if layers else ""
            locks.append(f"{tower} tower locked{unlocked}")
    if not locks:
        return ""
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return f" ({trained / 1e6:.2f}M trained: {'; '.join(locks)})"


def diverged(in_a_row: int, step: int, run_dir: Path, saved_step: int | None) -> NonFiniteLossError:
    """The error that stops a run after `in_a_row` non-finite steps, with what is kept and what to try."""
    # No periodic checkpoint is written during such a run of steps, so the latest one holds the weights from
    # before it (one written by a stop within it: the skipped steps left the weights as they were)
    kept = (f"the latest checkpoint, {ckpt.checkpoint_path(run_dir, saved_step)}, holds the weights from before "
            f"them and is kept" if saved_step is not None else "no checkpoint was written before them")
    return NonFiniteLossError(
        f"{in_a_row} non-finite losses or gradients in a row at step {step}; stopping: {kept}. Try a lower "
        f"optimizer.lr, precision=bf16 instead of fp16, or a smaller loss.max_logit_scale."
    )


# How often the progress bar redraws where stderr is not a terminal: a scheduler's output file (SLURM's
# slurm-%j.out), which keeps every redraw. At tqdm's 0.1 s each step added a copy of the bar after a carriage
# return: one line of tens of megabytes over a long run (the paper recipes' 390,625 steps), with the log lines
# glued to it. A notebook's stream is no terminal either, but shows the bar as a terminal does.
PROGRESS_FILE_REDRAW_S = 60.0
PROGRESS_TERMINAL_REDRAW_S = 0.1  # tqdm's default


def step_summary(metrics: dict) -> str:
    """A logged step's main figures in one line, for a run without a progress bar (metrics.jsonl has them all)."""
    parts = [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}", f"logit scale {metrics['logit_scale']:.1f}",
             f"{metrics['samples_per_s']:.1f} samples/s"]
    if "mfu" in metrics:
        parts.append(f"MFU {metrics['mfu']:.1%}")
    parts.append(f"data wait {metrics['data_wait_fraction']:.0%}")
    return ", ".join(parts)


def progress_redraw_interval_s(stream) -> float:
    """The progress bar's least time between redraws on `stream`: tqdm's default on a terminal or in a notebook,
    PROGRESS_FILE_REDRAW_S in a file."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    in_notebook = "ipykernel" in sys.modules
    return PROGRESS_TERMINAL_REDRAW_S if terminal or in_notebook else PROGRESS_FILE_REDRAW_S


class LoggingWindow:
    """The steps since the last logged one: the samples and FLOPs they trained and where their time went.
    Seconds spent saving and evaluating (`paused`) are left out of the window's throughput and MFU, which
    measure training: an ImageNet evaluation would otherwise halve the next logged samples_per_s."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start()

    def start(self) -> None:
        self.started = time.perf_counter()
        self.samples = 0
        self.flops = 0.0
        self.data_wait_s = 0.0  # host seconds spent waiting for the data loader's next batch
        self.paused_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = wait_for_device(self.device)  # the training kernels queued before it are training time
        yield
        self.paused_s += wait_for_device(self.device) - started

    def training_seconds(self) -> float:
        # The host runs ahead of the GPU: without waiting, the window would end before its last steps' kernels
        # ran, and throughput and MFU would read too high.
        return wait_for_device(self.device) - self.started - self.paused_s


def train(
    config: TrainConfig, stop_at_step: int | None = None, on_run_directory_held: Callable[[], None] | None = None,
) -> dict:
    """Runs (or resumes) the run described by `config`; returns the final metrics.

    stop_at_step: stop after this many steps as if interrupted (checkpoint, then return); for tests.
    on_run_directory_held: called once the run holds its directory (`run_start.run_directory_held`), before it
    writes anything there: clip-train starts appending its log to RUN_DIR/train.log then, so that a start
    refused the directory, which another live run holds, writes nothing into that run's log.
    """
    if not isinstance(config, TrainConfig):
        # A recipe's path or a dict (from a notebook) failed later, as AttributeError: 'str' object has no
        # attribute 'train'
        raise TypeError(f"train() takes a TrainConfig, not {type(config).__name__}: read a recipe with "
                        f"clip.config.load_config(path, ['section.key=value', ...], TrainConfig), or build a dict "
                        f"into one with clip.config.from_dict(TrainConfig, data)")
    # Checked again, as a recipe's values are, before anything starts: a value set after the config was built
    # (`config.train.batch_size = "8"`, a pathlib.Path) went unchecked, to fail late or train something else
    config = rechecked(config)
    # ---- setup ----------------------------------------------------------------------------------------
    # Signals are caught from here until train returns (a notebook's handlers are put back then). One during
    # the setup (choosing the device, a download, a resume's reads) abandons it at once with SetupInterrupted,
    # which `main` turns into the status that requeues the run: the default handler would end it with a status
    # the job script takes for a failure. The ranks meet under the default handling all the same
    # (`init_distributed`). One once the run is over, while it lets go of its data workers, its directory and
    # the process group, changes nothing (`StopRequest.ending`).
    with StopRequest() as stop, contextlib.ExitStack() as phase:
        phase.enter_context(stop.interrupting(SetupInterrupted))
        imported_whole("torch._dynamo")
        stop.stop_when_torchrun_ends(os.environ)
        dist_info = None
        try:
            dist_info = init_distributed(device=config.train.device)
            if config.train.batch_size * dist_info.world_size < 2:  # one process, train.batch_size = 1
                # A pair alone has no negatives: the contrastive loss was 0 at every step and nothing trained
                learns = ("its loss is 0 and nothing trains" if config.loss.kind == "clip"
                          else "the sigmoid loss sees only matching pairs and learns that every pair matches")
                raise BadTrainingInput(f"train.batch_size = 1 on one process: a global batch of one image-text pair "
                                       f"has no negatives, so {learns}; set train.batch_size >= 2 (with "
                                       f"train.accumulation_steps = train.batch_size if memory is short)")
            # `on_exit` closes what the run opens (the data loader's workers) however it ends: a run that
            # raised in a notebook left its workers behind
            with run_directory_held(Path(config.output_dir), dist_info), contextlib.ExitStack() as on_exit:
                if on_run_directory_held is not None:
                    on_run_directory_held()
                failed = False
                try:
                    return _train(config, dist_info, stop_at_step, stop, end_setup=phase.close, on_exit=on_exit)
                except Exception:  # not a signal's own ending (SetupInterrupted, a second Ctrl-C)
                    failed = True
                    raise
                finally:
                    phase.close()  # the setup's, when it raised
                    phase.enter_context(stop.ending(on_error=failed))
        except BaseException as error:
            if dist_info is not None and dist_info.is_distributed:
                release_run_objects(error)
            raise
        finally:
            cleanup_distributed()


def _train(
    config: TrainConfig, dist_info: DistributedInfo, stop_at_step: int | None, stop: StopRequest,
    end_setup: Callable[[], None], on_exit: contextlib.ExitStack,
) -> dict:
    run_dir = Path(config.output_dir)
    device = dist_info.device
    config_dict = to_dict(config)
    refuse_configs_that_differ_between_ranks(config_dict, dist_info)
    if config.logging.wandb:
        require_wandb()
    require_shard_readers(config.data.sources)
    if config.train.compile:
        require_a_compiler_for_compile(device.type)
    configure_process(config.train, device, on_exit)

    module = build_training_module(config, device)
    optimizer = build_optimizer(list(module.named_parameters()), config.optimizer, device)
    # Saved beside the optimizer state; fixed for the run (groups and locks do not change while it trains)
    optimizer_names = optimizer_parameter_names(list(module.named_parameters()), config.optimizer.decay_embeddings)
    autocast_dtype = AUTOCAST_DTYPES[config.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
    loss_fn = build_loss(config.loss, distributed=dist_info.is_distributed)
    max_log_scale = math.log(config.loss.max_logit_scale)

    # ---- resume -----------------------------------------------------------------------------------------
    # Warnings that every rank would give alike are given by rank 0 (from here to the end of the run)
    state = checkpoint_to_resume(run_dir, dist_info)
    resumed = state is not None
    saved_config = state["config"] if resumed else None
    evaluation_owed = resumed and bool(state.get("evaluation_owed"))
    # The initial weights' record (train.init_weights resolved when the run started; None from scratch), which
    # the checkpoints and results.json keep: a resumed run has it from its checkpoint, as it does not read
    # those weights again. Rank 0's alone counts (it alone writes both).
    if resumed:
        with refused_on_every_rank(run_dir, dist_info):  # each rank restores its own random generators
            start_step, data_state, metrics_so_far = restore_training_state(
                state, config, run_dir, module=module, optimizer=optimizer, scaler=scaler, dist_info=dist_info,
            )
        init_weights = state.get("init_weights")  # absent from checkpoints before 2026-12-03: unknown, None
    else:
        start_step, data_state, metrics_so_far = 0, None, {}
        init_weights = start_new_run(module, config, dist_info)
    # Copied into the run's own tensors by now: kept, the checkpoint's CPU copy of the weights and optimizer
    # moments (5 GB for ViT-L/14) would stay in every rank's memory for the whole run.
    del state
    already_finished = resumed and start_step >= config.schedule.steps
    if already_finished and start_step > config.schedule.steps:  # schedule.steps lowered below the checkpoint's
        log.warning("%s has a checkpoint at step %d, past schedule.steps = %d: evaluating that checkpoint only (its "
                    "weights and config are left as they are)", run_dir, start_step, config.schedule.steps)
    elif already_finished:
        log.info("%s finished its %d steps already: evaluating only, its checkpoint and config are left as they are",
                 run_dir, start_step)
    else:
        # The temperature's bound holds from the first step on, not only after the first update: a new run's
        # initial value (1 / 0.07, SigLIP's 10, loaded weights' 100) or a checkpoint's may exceed a lower
        # loss.max_logit_scale. Bound again after every step (below).
        bound_temperature(module.clip, max_log_scale)
    with bad_input_on_every_rank(dist_info, "the evaluation datasets"):
        check_evaluation_datasets(config.eval, warn=dist_info.is_main)
    if dist_info.is_main:
        # A save killed mid-write (SIGKILL, a lost node) leaves its temporary file; none of this run's saves
        # has started yet, so every such file is a leftover. So for the files replaced whole beside them: the
        # run's lock keeps any other process from writing them, and this one is not writing them now.
        ckpt.remove_stray_temporaries(run_dir)
        ckpt.warn_of_incomplete_checkpoints(run_dir, below_step=start_step)
        for name in RUN_FILES_REPLACED_WHOLE:
            remove_temporaries_of(run_dir / name, "an interrupted write", log)

    train_module: nn.Module = module
    if dist_info.is_distributed:
        # Gradients as views into DDP's all-reduce buckets: no second gradient-sized buffer per rank.
        train_module = DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    if config.train.compile:
        # fallback_random: random numbers (patch dropout's) drawn by torch's generator as in eager mode, not by
        # inductor's own, which drew other masks: a compiled run differed from the same run uncompiled (also
        # after a resume that turns compile off), and accumulated micro-batches from their one whole batch.
        # Patch dropout's draw is one small tensor per batch: nothing to fuse is lost.
        train_module = torch.compile(train_module, options={"fallback_random": True})

    tokenizer = get_tokenizer()
    # A finished run started again only evaluates: it reads no training data, which may be gone by then (a
    # scratch area purged after the job refused the evaluation as bad input), and starts no data workers
    data = None
    if not already_finished:
        with bad_input_on_every_rank(dist_info, "its training data"):
            data = build_train_data(
                config.data,
                image_size=config.model.vision.image_size,
                context_length=config.model.text.context_length,
                tokenizer=tokenizer,
                batch_size=config.train.batch_size,
                rank=dist_info.rank,
                world_size=dist_info.world_size,
                seed=config.train.seed,
            )
        on_exit.callback(data.close)
    if resumed and data is not None:  # on every rank alike (a collective); data_state is each rank's own position
        with refused_on_every_rank(run_dir, dist_info), entry_restored("its 'data' entry", run_dir, start_step):
            data.load_state_dict(data_state)
    if dist_info.is_distributed:
        # The setup's last collective is behind: from here a signal is recorded, not raised. What follows is rank 0's
        # alone (its run record, logs, TensorBoard): a SIGTERM to every rank (a scheduler's) that rank 0 took there
        # abandoned its start (status 75) while the others, past their setup, failed in the first step's collective
        # (status 1, no checkpoint). The ranks now stop together after the first step, with a checkpoint.
        end_setup()
    if dist_info.is_main and already_finished:
        keep_results_of_other_evaluations(run_dir, config_dict["eval"])
    if dist_info.is_main and not already_finished:
        # Written once the run's data is set up too: a refused resume, or a start whose data cannot be used
        # (a mistyped path), leaves the run's recorded config and results alone.
        try:
            record_run_start(run_dir, config_dict, resumed, start_step)
        except OSError as error:  # a full disk: a bare OSError's traceback said nothing of the checkpoints kept
            # Rank 0's alone, with no collective for it past the setup's last one (see end_setup above): the
            # other ranks hear of it as of any rank 0 that ended, at their first step's collective
            kept = (f"its checkpoints are kept: run the same command again to continue from step {start_step}"
                    if resumed else "no checkpoint had been saved")
            raise RunLogWriteError(
                f"could not write the run's config.toml in {run_dir}: {error.strerror or error} (errno {error.errno}); "
                f"{kept}") from error
    global_batch = config.train.batch_size * dist_info.world_size
    # None where unknown: no MFU then
    peak = peak_flops(device, autocast_dtype or torch.float32, tf32=config.train.tf32)
    run_log = run_directory = None  # rank 0's
    if dist_info.is_main:
        wandb_run = None
        if config.logging.wandb:
            wandb_run = start_wandb(run_dir, config.logging.wandb_project, config.logging.wandb_entity, config_dict)
        run_log = RunLog(
            run_dir, config.logging.tensorboard, resumed_at=start_step, wandb_run=wandb_run,
            # The evaluation of the checkpoint's step runs again (a finished run's final one, or one the
            # checkpoint owes, which an earlier start may have made up and recorded before it was killed; a new
            # run's eval.at_start, which an attempt killed before its first checkpoint recorded): the new record
            # replaces the old
            reevaluated=already_finished or evaluation_owed or (config.eval.at_start and not resumed),
        )
        if data is not None:
            log.info(
                "model: %.2fM parameters%s; global batch %d (%s x %d, %d micro-batches); %d steps; data: %d samples/"
                "epoch", count_parameters(module) / 1e6, trained_phrase(module, config.train),
                global_batch, ranks_phrase(dist_info.world_size), config.train.batch_size,
                config.train.accumulation_steps, config.schedule.steps, data.samples_per_epoch,
            )
            warn_about_unlikely_settings(config, global_batch, data.samples_per_epoch, saved_config, device)
        # Closed also when the run ends on an error (non-finite losses, a second Ctrl-C, a failed save): TensorBoard's
        # thread, its threading.excepthook and the W&B run were left behind, one more at each failed train() call
        # Failed for an error; a signal's own endings (a second Ctrl-C, an abandoned start) are no failures
        on_exit.push(lambda error_type, error, traceback: run_log.close(
            failed=error_type is not None and issubclass(error_type, Exception)))
        run_directory = RunDirectoryWatch(run_dir, config_dict, run_log, on_exit)

    def autocast():
        return autocast_in(device, config.train.precision)

    # The step of this run's latest checkpoint, the same on every rank; a resumed run's is on disk already.
    saved_at = {"step": start_step if resumed else None}

    def save(step: int, metrics: dict, evaluation_owed: bool = False) -> None:
        # Every rank contributes its RNG state and data position; rank 0 writes the file. evaluation_owed: this
        # step's periodic evaluation was skipped or abandoned for a signal; the resumed run makes it up.
        with window.paused():
            saved_at["step"] = step
            failure = None
            rng_states = gather_objects(ckpt.capture_rng_state(), dist_info)
            data_states = gather_objects(data.state_dict(), dist_info)
            if dist_info.is_main:
                state = {
                    "format": ckpt.CHECKPOINT_FORMAT,
                    "step": step,
                    "model": module.clip.state_dict(),
                    "config": config_dict,
                    "optimizer": optimizer.state_dict(),
                    "optimizer_parameter_names": optimizer_names,
                    "scaler": scaler.state_dict(),
                    "loss_parameters": (
                        {} if module.logit_bias is None else {"logit_bias": module.logit_bias.detach()}
                    ),
                    "rng": rng_states,
                    "data": states_to_save(data_states),
                    "metrics": metrics,
                    "evaluation_owed": evaluation_owed,
                    "init_weights": init_weights,
                }
                try:
                    run_directory.check(step)
                    try:
                        run_log.sync()  # the records this checkpoint covers are on the disk before it
                    except RunLogWriteError as error:
                        raise ckpt.CheckpointWriteError(f"{error}, so the step {step} checkpoint was not saved; "
                                                        f"{ckpt.kept_before(run_dir, step)}") from error
                    try:
                        saved = ckpt.save_checkpoint(state, run_dir, step, config.checkpoint.keep_last,
                                                     prune=not stop.requested)
                    except ckpt.CheckpointWriteError:
                        if not run_directory.moved():
                            raise
                        # The folder was deleted or moved away during the write (minutes for a large model): the
                        # file's rename into it failed and the run ended, though the weights in memory were fine.
                        # Written again, into the folder made again
                        run_directory.check(step)
                        saved = ckpt.save_checkpoint(state, run_dir, step, config.checkpoint.keep_last,
                                                     prune=not stop.requested)
                    log.info("saved %s", saved)
                    run_directory.checkpoints_lost = False
                except Exception as error:  # re-raised below, after the ranks agree
                    failure = error
            # Every rank waits here for the file, and hears of a failure
            raise_on_every_rank(failure, dist_info, ckpt.CheckpointWriteError(
                f"rank 0 could not write the step {step} checkpoint (its log says why)"))

    def write_record(record: dict | None) -> None:
        """Rank 0 appends `record` (None: nothing to append) to metrics.jsonl. Every rank calls this at the same
        point and stops if the write failed (a full disk), as after a checkpoint that could not be written: an
        OSError's traceback said neither that the checkpoints are kept nor how to continue."""
        failure = None
        if dist_info.is_main and record is not None:
            try:
                run_directory.check(record["step"])
                run_log.write(record)
            except RunLogWriteError as error:  # re-raised below, after the ranks agree
                kept_at = run_directory.kept_step(saved_at["step"])
                kept = (f"the latest checkpoint, {ckpt.checkpoint_path(run_dir, kept_at)}, is kept: run "
                        f"the same command again to continue from it" if kept_at is not None
                        else "no checkpoint was written before it")
                failure = RunLogWriteError(f"{error}; {kept}")
                failure.__cause__ = error.__cause__
            except (ckpt.CheckpointWriteError, RunDirectoryInUse) as error:  # a deleted run directory not made again
                failure = error
        raise_on_every_rank(failure, dist_info, RunLogWriteError(
            f"rank 0 could not write {run_dir / 'metrics.jsonl'} (its log says why)"))

    def evaluate(step: int) -> dict:
        """The evaluations' results, also logged. A signal (also one before them) abandons them by raising
        EvaluationInterrupted before anything is written: in one process at once, from the signal handler;
        several ranks together, at the evaluation's next stop check after any of them was signalled (an
        all-reduce every few batches, at the same batches on every rank, so their collectives pair up). A run
        without evaluations has nothing to abandon: a signal during its final save said "final evaluation
        abandoned" and asked for a rerun that had nothing to do."""
        if not has_evaluations(config.eval):
            return {}
        if dist_info.is_distributed:
            def abandon_if_some_rank_was_signalled() -> None:
                if any_rank(stop.requested, dist_info):
                    raise EvaluationInterrupted

            interrupting, stop_check = contextlib.nullcontext(), abandon_if_some_rank_was_signalled
        else:
            interrupting, stop_check = stop.interrupting(), None
        if dist_info.is_distributed:
            broadcast_buffers_from_rank_zero(module)  # the model evaluated is the one rank 0 saves
        with interrupting, window.paused():
            results = run_evaluations(
                module.clip, config.eval, device=device, tokenizer=tokenizer, step=step, dist_info=dist_info,
                stop_check=stop_check, warn_about_data=False,  # said once, by check_evaluation_datasets
            )
        write_record({"step": step, **results} if results else None)
        if results and dist_info.is_main:
            log.info("step %d evaluation: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    # ---- the loop ---------------------------------------------------------------------------------------
    total_steps = config.schedule.steps
    last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    # (A finished run takes no step.) One process waiting for a batch stops on a signal at once, with a checkpoint
    # of the step it is at: a stalled download could otherwise hold it past a scheduler's grace period
    waiting = functools.partial(stop.interrupting, DataWaitInterrupted)
    batches = None if data is None else data.batches(contextlib.nullcontext if dist_info.is_distributed else waiting)
    normalize_pixels = PixelNormalizer(device)
    progress = None
    if dist_info.is_main and config.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr,
                        mininterval=progress_redraw_interval_s(sys.stderr))
        on_exit.callback(progress.close)  # also after an error (the next bar was drawn a line lower each time)
    nonfinite_total = metrics_so_far.get("nonfinite_steps_total", 0)
    # A run stopped (signalled) within a run of non-finite steps continues it: counted from 0 again, each stop
    # would give a diverged run another max_consecutive_nonfinite steps
    nonfinite_in_a_row = metrics_so_far.get("nonfinite_steps_in_a_row", 0)
    last_metrics = {key: value for key, value in metrics_so_far.items() if key != "nonfinite_steps_in_a_row"}
    window = LoggingWindow(device)  # the first one starts here (save and evaluate, above, pause it)
    step = start_step

    set_training_modes(train_module, module.clip, config.train)
    batch_norm_statistics = BatchNormSnapshot(module)  # those that train: put back when a step is skipped
    skip_on_device = skips_on_device(optimizer, scaler.is_enabled())
    in_flight = None  # a step's verdict that the host has not read yet (skip_on_device)

    def count_verdicts(verdicts: list[tuple[int, StepAgreement, torch.Tensor]]) -> bool:
        """Counts, says and judges the skipped steps among `verdicts` (each with its step and loss, oldest
        first): raises once too many came in a row. Returns whether one of them agreed to stop."""
        nonlocal nonfinite_total, nonfinite_in_a_row
        for verdict_step, agreed, verdict_loss in verdicts:
            if not agreed.skipped:
                nonfinite_in_a_row = 0
                continue
            nonfinite_total += 1
            nonfinite_in_a_row += 1
            if dist_info.is_main:  # the ranks skip together (agreement_flags)
                log.warning("step %d: non-finite %s (loss %s); step skipped (%d in a row)", verdict_step,
                            "loss" if not agreed.losses_finite else "gradients", verdict_loss.item(),
                            nonfinite_in_a_row)
            if nonfinite_in_a_row >= config.train.max_consecutive_nonfinite:
                kept_at = saved_at["step"] if run_directory is None else run_directory.kept_step(saved_at["step"])
                raise diverged(nonfinite_in_a_row, verdict_step, run_dir, kept_at)
        return any(agreed.stop for _, agreed, _ in verdicts)

    # A tower locked whole computes the same features in accumulation's caching and gradient passes: reused
    locked_whole = {
        tower: getattr(config.train, f"lock_{tower}") and not getattr(config.train, f"lock_{tower}_unlocked_layers")
        for tower in ("image", "text")
    }
    end_setup()  # from here a signal stops the run at the next step boundary, with a checkpoint (ranks: above)
    # An evaluation due before the first step: the one this checkpoint owes (skipped or abandoned when the run
    # was stopped), made up first so that the run's evaluation record has no gap, or a new run's of its starting
    # weights (eval.at_start). Evaluations leave the RNG and data alone.
    # Whether this start made up its checkpoint's owed evaluation: a stop before the first step then saves that
    made_up_evaluation = False
    if (evaluation_owed or (config.eval.at_start and not resumed)) and start_step < last_step:
        try:
            last_metrics.update(evaluate(start_step))
            made_up_evaluation = evaluation_owed
        except EvaluationInterrupted:
            last_step = start_step
            if evaluation_owed:  # stopped again: the checkpoint still owes it
                message = "step %d evaluation abandoned again to stop: still owed"
            else:  # a step-0 checkpoint owes it, as a stopped periodic evaluation's step does
                save(start_step, {**last_metrics, "nonfinite_steps_total": nonfinite_total,
                                  "nonfinite_steps_in_a_row": nonfinite_in_a_row}, evaluation_owed=True)
                message = "step %d evaluation abandoned to stop: the resumed run makes it up first"
            if dist_info.is_main:
                log.warning(message, start_step)
    while step < last_step:
        lr = learning_rate(step, config.optimizer.lr, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        waiting_since = time.perf_counter()
        try:
            images, texts = next(batches)
        except DataWaitInterrupted:
            if in_flight is not None:  # the checkpoint's counts include the previous step's verdict
                count_verdicts([(step, in_flight.read(), in_flight.loss)])
                in_flight = None
            if dist_info.is_main:
                log.warning("stopped while waiting for the batch of step %d: saving step %d", step + 1, step)
            last_step = step
            break  # saved below, as a run stopped at its last step is
        window.data_wait_s += time.perf_counter() - waiting_since
        # The texts are cut after the batch's last end-of-text token, a position read here on the host
        # where it costs no GPU sync (the model is built with trim_text=False). The cut is taken after
        # the copy, so the copy stays an asynchronous one from the loader's pinned memory.
        text_length = trimmed_text_length(texts.argmax(dim=-1), texts.shape[-1])
        if peak is not None:
            window.flops += global_batch * training_flops_per_sample(
                config.model, text_length, config.train.lock_image, config.train.lock_text,
                config.train.patch_dropout, config.train.lock_image_unlocked_layers,
                config.train.lock_text_unlocked_layers,
            )
        images = images.to(device, non_blocking=True)  # uint8 pixels: a quarter of a float batch's bytes
        texts = texts.to(device, non_blocking=True)[:, :text_length]
        if config.model.vision.kind == "resnet" and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)  # kept by the normalisation
        images = normalize_pixels(images)

        batch_norm_statistics.take()
        optimizer.zero_grad(set_to_none=True)
        losses_finite = []  # one flag per micro-batch, on the device: read once, after the backward passes

        def backward(loss: torch.Tensor) -> None:
            # Every micro-batch's backward pass runs, its loss finite or not (so every rank runs as many, and
            # DDP's all-reduces pair up); a non-finite step's gradients are dropped below.
            losses_finite.append(torch.isfinite(loss.detach()))
            scaler.scale(loss).backward()

        loss, loss_metrics = contrastive_step(
            train_module, images, texts, config.train.accumulation_steps, loss_fn, autocast, backward,
            dist_info.is_distributed, locked_image=locked_whole["image"], locked_text=locked_whole["text"],
        )
        step += 1
        # A finite loss can still give non-finite gradients, and one such step turns every weight it touches
        # into NaN: the gradient norm is judged with the losses (every rank has the same all-reduced
        # gradients). Under fp16 the gradient scaler judges them itself (skipping such steps is a routine part
        # of finding its scale), and unscaling commits it to this step: the norm comes after.
        grad_norm = None if scaler.is_enabled() else gradient_norm(module, config.optimizer.grad_clip_norm)
        flags = agreement_flags(torch.stack(losses_finite).all(), grad_norm, stop.requested, dist_info)
        logs_now = step % config.logging.every_n_steps == 0 or step == last_step
        evaluate_now = config.eval.every_n_steps and step % config.eval.every_n_steps == 0 and step < total_steps
        checkpoint_due = config.checkpoint.every_n_steps and step % config.checkpoint.every_n_steps == 0
        # Verdicts read now, each with its step and loss (oldest first): this step's, and a previous one's
        # that waited for it
        verdicts: list[tuple[int, StepAgreement, torch.Tensor]] = []
        if skip_on_device:
            step_or_skip_on_device(optimizer, flags, batch_norm_statistics)
            # Bounded whether the step was skipped or not: a skipped step's temperature was bounded already
            bound_temperature(module.clip, max_log_scale)
            # The previous step's verdict is read once this step is launched: the device has finished that
            # step meanwhile, or works on this one while the host waits. This step's waits for the next one,
            # unless the host needs it now: to log this step, at the last one, or before an evaluation (which
            # a run that gives up now does not start). That is decided by the step number alone, so every rank
            # reads each verdict at the same step and stops after the same one. A save reads it too (below).
            if in_flight is not None:
                verdicts.append((in_flight.step, in_flight.read(), in_flight.loss))
            in_flight = VerdictInFlight(step, flags, loss)
            if logs_now or evaluate_now:
                verdicts.append((step, in_flight.read(), in_flight.loss))
                in_flight = None
        else:  # read at once, and the step taken or skipped on the host
            agreed = StepAgreement.read(flags)
            if not agreed.skipped and scaler.is_enabled():
                scaler.unscale_(optimizer)
                grad_norm = gradient_norm(module, config.optimizer.grad_clip_norm)
            if agreed.skipped:
                optimizer.zero_grad(set_to_none=True)
                batch_norm_statistics.restore()
            else:
                scaler.step(optimizer)
                scaler.update()
                bound_temperature(module.clip, max_log_scale)
            verdicts.append((step, agreed, loss))
        stopping = count_verdicts(verdicts)  # some rank was signalled: checkpoint after this step, then stop
        # this step's verdict, where it is read already (always on the steps that log)
        skipped = verdicts[-1][1].skipped if verdicts and verdicts[-1][0] == step else None
        window.samples += global_batch

        if logs_now:
            elapsed = window.training_seconds()
            samples_per_s = window.samples / max(elapsed, 1e-9)
            last_metrics = {
                "step": step,
                "loss": loss.item(),  # replaced below by the loss averaged over ranks
                "lr": lr,
                "logit_scale": module.clip.logit_scale.exp().item(),
                "samples_per_s": samples_per_s,
                # The most any rank waited, of its window (below); near 0 when the loaders keep up: a data-bound
                # run's steps wait (more data.workers, faster storage). A slow rank makes the others wait in the
                # all-reduce instead, so rank 0's own figure would read low.
                "data_wait_fraction": min(window.data_wait_s / max(elapsed, 1e-9), 1.0),
                "images_per_s_per_accelerator": samples_per_s / dist_info.world_size,
                "nonfinite_steps_total": nonfinite_total,
                # logit_scale_exp left out: it is the logit_scale above as this step's loss used it, before the
                # update (two near-equal figures under two names)
                **{k: float(v) for k, v in loss_metrics.items() if k != "logit_scale_exp"},
            }
            if grad_norm is not None and not skipped:
                last_metrics["grad_norm"] = float(grad_norm)  # before clipping
            if scaler.is_enabled():  # fp16: a scale that keeps falling means gradients keep overflowing
                last_metrics["loss_scale"] = scaler.get_scale()
            if peak is not None:
                last_metrics["mfu"] = window.flops / max(elapsed, 1e-9) / dist_info.world_size / peak
            # Every rank's data counts, summed, and its wait (a collective: all ranks log at the same steps).
            reports = gather_objects((data.rank_report(), last_metrics["data_wait_fraction"]), dist_info)
            data_stats = merge_rank_reports([report for report, _ in reports])
            last_metrics["data_wait_fraction"] = max(wait for _, wait in reports)
            write_record({**last_metrics, "data": data_stats})
            if progress is not None:  # rank 0's
                progress.set_postfix(  # drawn with the step's update, below, when the bar is due to redraw
                    loss=f"{last_metrics['loss']:.3f}", lr=f"{lr:.2e}",
                    scale=f"{last_metrics['logit_scale']:.1f}", samples_s=f"{samples_per_s:.0f}", refresh=False,
                )
            elif dist_info.is_main:  # no bar to show the figures: the console and train.log get them instead
                log.info("step %d/%d: %s", step, total_steps, step_summary(last_metrics))
            window.start()
        if progress is not None:
            progress.update(1)

        # One process needs no agreement: a signal that came after this step's backward pass counts now.
        stop_now = stopping or (not dist_info.is_distributed and stop.requested)
        if evaluate_now and not stop_now:
            # A pre-empted run spends its grace period saving, not evaluating: a signal (also one after this
            # step's agreement) abandons the evaluation, and the run saves and stops.
            try:
                last_metrics.update(evaluate(step))
            except EvaluationInterrupted:
                stop_now = True
                if dist_info.is_main:
                    log.warning("step %d evaluation abandoned to stop: the resumed run makes it up first", step)
        # A checkpoint's counts include this step: its verdict, if it still waits (a stop, also one an evaluation
        # was abandoned for, comes at any step), is read first
        if in_flight is not None and (stop_now or checkpoint_due):
            count_verdicts([(step, in_flight.read(), in_flight.loss)])
            in_flight = None
        # Not while the losses are non-finite: the weights have not changed since they began, and each save
        # would prune an older checkpoint until only copies from that run of steps were left.
        periodic = checkpoint_due and step < last_step and nonfinite_in_a_row == 0
        if periodic or (stop_now and step < total_steps):
            # A periodic evaluation due now was skipped or abandoned only if the run is stopping
            owed = bool(evaluate_now) and stop_now
            save(step, {**last_metrics, "nonfinite_steps_total": nonfinite_total,
                        "nonfinite_steps_in_a_row": nonfinite_in_a_row}, evaluation_owed=owed)
        if stop_now:
            last_step = step
            break

    if progress is not None:
        progress.close()
    finished = step >= total_steps
    # The step reached, not the last logged one: `main` tells a finished run from a stopped one by it.
    final = {**last_metrics, "step": step, "nonfinite_steps_total": nonfinite_total}
    if last_metrics.get("step", step) != step:
        # The last logged step's loss, rate and speed, beside a later step: a run stopped between logging steps,
        # then evaluated only (schedule.steps lowered to its checkpoint's), read as that step's own figures
        final["training_figures_step"] = last_metrics["step"]
    # Saved before the final evaluation, so that an evaluation that fails (a dataset moved while training
    # ran) costs no trained weights. Decided from this run's own saves, not by looking at the file system:
    # every rank must agree, or the collectives inside save() would pair up with other calls.
    if saved_at["step"] != step or (made_up_evaluation and step == start_step):
        save(step, {**final, "nonfinite_steps_in_a_row": nonfinite_in_a_row})
    # Still under the same signal handling: a signal from the last step on abandons the final evaluation
    # (it may outlast the grace period; the weights are saved), `main` exits 75 and the run started again
    # only evaluates.
    if finished:
        try:
            final.update(evaluate(step))
        except EvaluationInterrupted:
            if dist_info.is_main:
                log.warning("final evaluation abandoned; the trained weights are saved: run again to evaluate")
            final["evaluation_interrupted"] = True
    complete = finished and not final.get("evaluation_interrupted")
    if complete and stop.requested:
        # The signal's line said "stopping at the next safe point", but none came: it arrived in the final save
        # of a run without evaluations, or after the final evaluation's last stop check (several ranks)
        log.warning("the signal came when only the final checkpoint and evaluation were left, and they are done: "
                    "the run is complete and exits as finished")
    # From here a signal cuts nothing short: the run only writes down its results
    with stop.finishing() if complete else contextlib.nullcontext():
        if data is not None:
            data_totals = merge_rank_reports(gather_objects(data.rank_report(), dist_info))
            if dist_info.is_main:
                # this rank's counts since this process started: a resumed run's first epoch only in part
                log.info("data since this start or resume: %s", data.summary_since_previous())
                log.info("data, %s, whole run: %s", ranks_phrase(dist_info.world_size, all_of=True),
                         counts_line(data_totals["sources"]))
        if dist_info.is_main:
            directory_kept = True
            try:
                run_directory.check(step)
            except (ckpt.CheckpointWriteError, RunDirectoryInUse) as error:  # the run itself is done: said, not raised
                log.warning("%s; results.json is not written (the final figures are in this log)", error)
                directory_kept = False
            if complete and directory_kept:
                # With the evaluations' settings: a finished run can be evaluated again with others
                write_results(run_dir / "results.json", {**final, "init_weights": init_weights,
                                                         "eval": config_dict["eval"]})
                if config.logging.plot:
                    plot_if_possible(run_dir)
            run_log.close()  # after the results: a results.json that cannot be written fails the W&B run too
    return final


def plot_if_possible(run_dir: Path) -> None:
    """The run's training.png; a full disk costs only the plot: the figures are in metrics.jsonl and
    results.json."""
    try:
        plot_run(run_dir)
    except OSError as error:
        log.warning("no training plot: %s could not be written (%s)", run_dir / "training.png", error.strerror or error)


def imported_whole(name: str) -> None:
    """Imports the module `name` with the stop signals held back until it is imported (in the main thread,
    where signals are handled): the optimizer's constructor imports torch._dynamo (and sympy) the first time,
    for seconds, and a Ctrl-C or SIGTERM then abandoned the start halfway through those imports, leaving the
    modules half made: every later train() of the notebook failed ("partially initialized module
    'torch._dynamo'"). A signal that comes meanwhile is noted, and raised again to the run's own handlers as the
    import ends. (Not by blocking it in this thread: the kernel then gives it to another thread, whose note of it
    makes Python run the handler here all the same.)"""
    if threading.current_thread() is not threading.main_thread():
        importlib.import_module(name)
        return
    noted: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in STOP_SIGNALS}
    try:
        importlib.import_module(name)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


def write_results(path: Path, final: dict) -> None:
    """Writes a finished run's results.json, whole or not at all (a kill mid-write tore it). Before the optional
    plot, which a full disk stopped first, so that it was never written."""
    try:
        write_json(path, final)
    except OSError as error:
        raise RunLogWriteError(
            f"could not write {path}: {error.strerror or error} (errno {error.errno}); the trained weights are saved "
            f"(step {final['step']}) and metrics.jsonl holds the figures: run the same command again once the file "
            f"can be written, which evaluates the finished run and writes it"
        ) from error
