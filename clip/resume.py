"""What a run directory's checkpoint allows a new start to do: continue (with every changed setting named),
or refuse (another model or loss); and the continuing itself, `restore_training_state`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint as ckpt
from .architectures import architecture_differences
from .config import TrainConfig, from_dict, to_dict
from .config_io import ConfigError, as_toml, differences
from .data import data_state_for_other_world_size, data_state_for_rank
from .data.config import synthetic_sample_count
from .distributed import DistributedInfo, from_rank_zero, raise_on_every_rank, ranks_phrase
from .optim import OptimizerStateMismatch, learning_rate, load_optimizer_state
from .train_step import ContrastiveModel

log = logging.getLogger(__name__)


class ResumeRefused(ValueError):
    """The run directory holds a run this config cannot continue (another model or loss)."""


def check_resumable(saved: dict, current: dict, run_dir: Path, warn: bool = True) -> None:
    """Refuses to resume what cannot be (another model, another loss and so other trained parameters); warns
    (if `warn`) about every other setting that differs from the checkpoint's, since the run then continues
    under them."""
    saved_as_written, saved = saved, with_decay_embeddings(saved)
    try:  # settings newer than the checkpoint take their defaults, so that they are not reported as changed
        saved = to_dict(from_dict(TrainConfig, saved))
    except ConfigError:
        pass  # a config this version cannot read as such (a setting since removed): compared as written
    # A synthetic source's size as it renders it (checkpoints before 2026-11-30 wrote the default out)
    saved, current = with_synthetic_sizes(saved), with_synthetic_sizes(current)
    saved, current = with_evaluation_splits_named(saved), with_evaluation_splits_named(current)
    other_model = architecture_differences(saved["model"], current["model"])
    if other_model:
        raise ResumeRefused(
            f"{run_dir} holds a run of a different model ("
            + "; ".join(f"model.{key}: {there!r} there, {here!r} here" for key, there, here in other_model)
            + "); use a new --output-dir or the same model config"
        )
    if saved["loss"]["kind"] != current["loss"]["kind"]:
        raise ResumeRefused(
            f"{run_dir} was trained with loss.kind={saved['loss']['kind']!r}, not {current['loss']['kind']!r} (their "
            f"parameters differ); use a new --output-dir or the same loss"
        )
    # Not settings a resumed run goes on under: a run directory moved or copied; the initial weights, which
    # only a new run reads
    not_applied = ("output_dir", "train.init_weights")
    changed = [
        f"{key}: {as_toml(before)} -> {as_toml(after)}" for key, before, after in differences(saved, current)
        if key not in not_applied
    ]
    if changed and warn:
        note = ""
        if "decay_embeddings" not in saved_as_written.get("optimizer", {}) and current["optimizer"]["decay_embeddings"]:
            # The default changed after the checkpoint was written: its run would go on decaying what it had not
            note = (" (the checkpoint is from before optimizer.decay_embeddings, whose default is now true: "
                    "optimizer.decay_embeddings=false keeps its embeddings undecayed)")
        log.warning("resuming %s with settings that differ from its checkpoint's: %s%s", run_dir, "; ".join(changed),
                    note)


def checkpoint_to_resume(run_dir: Path, dist_info: DistributedInfo) -> dict | None:
    """The run's latest readable checkpoint (see `checkpoint.latest_readable_checkpoint`), None for a new run.

    Rank 0 chooses and verifies it, and the other ranks load that file: choosing each for themselves, a
    rank that saw a file differently (a read error, a file system's stale view) would resume from another
    step than the rest and pair its collectives with theirs wrongly; and every rank would read every file
    twice. The ranks agree on any failure, or the others would wait for rank 0 until a timeout."""
    failure, state, chosen = None, None, None
    if dist_info.is_main:
        try:
            found = ckpt.latest_readable_checkpoint(run_dir)
        except Exception as error:  # re-raised below, once every rank knows
            failure, chosen = error, FAILED
        else:
            if found is not None:
                path, state = found
                chosen = path.name
    chosen = from_rank_zero(chosen, dist_info)
    if failure is not None:
        raise failure
    if chosen == FAILED:
        raise ckpt.NoReadableCheckpointError(f"rank 0 could not resume from {run_dir} (its log says why)")
    if chosen is None and not dist_info.is_main and ckpt.list_checkpoints(run_dir):
        # Every rank starts afresh together (rank 0 decides); a run directory on storage local to each node
        # would otherwise restart a run without a word
        log.warning("rank %d sees checkpoints in %s that rank 0 does not: the run starts from step 0 (is "
                    "output_dir on storage that every node shares?)", dist_info.rank, run_dir)
    if not dist_info.is_main and chosen is not None:
        path = Path(run_dir) / ckpt.CHECKPOINT_DIR / chosen
        try:
            state = ckpt.read_checkpoint(path, verify=False)  # verified by rank 0
        except Exception as error:  # re-raised below, after the ranks agree
            failure = ckpt.NoReadableCheckpointError(f"rank {dist_info.rank} could not read {path}, which rank 0 "
                                                     f"resumes from: {error}")
    if chosen is not None:
        raise_on_every_rank(failure, dist_info, ckpt.NoReadableCheckpointError(
            f"a rank could not read checkpoint {chosen} (its log says why)"))
    return state


# What rank 0 sends the others when it could not choose a checkpoint (no file name has this form)
FAILED = "/failed"


class ResumePoint(NamedTuple):
    step: int
    data_state: dict  # this rank's data position, for TrainData.load_state_dict
    metrics: dict  # the last logged metrics, as saved


def restore_training_state(
    state: dict, config: TrainConfig, run_dir: Path, *, module: ContrastiveModel, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, dist_info: DistributedInfo,
) -> ResumePoint:
    """Puts a checkpoint's weights, optimizer moments, loss scale and this rank's random generators into
    the run (after `check_resumable`); returns where it continues. Warnings are given by rank 0 alone: every
    rank would give them alike."""
    problems = incomplete_entries(state)
    if problems:  # every rank reads the same file, so every rank refuses alike
        raise ResumeRefused(
            f"{run_dir}: the checkpoint of step {state.get('step')!r} it would resume from is not a whole "
            f"checkpoint of this trainer ({'; '.join(problems)}); move it aside to resume from an earlier one"
        )
    check_resumable(state["config"], to_dict(config), run_dir, warn=dist_info.is_main)
    step = state["step"]
    with entry_restored("its 'model' entry", run_dir, step):
        module.clip.load_state_dict(state["model"])
    with entry_restored("its 'loss_parameters' entry", run_dir, step):
        if module.logit_bias is not None and "logit_bias" in state.get("loss_parameters", {}):
            module.logit_bias.data.copy_(state["loss_parameters"]["logit_bias"])
    # This run's groups and hyperparameters, the checkpoint's moments (torch's load_state_dict would
    # restore the saved weight decay, betas and eps over a changed config's)
    with entry_restored("its 'optimizer' entry", run_dir, step):
        try:
            left_out = load_optimizer_state(
                optimizer, state["optimizer"], list(module.named_parameters()),
                saved_names=state.get("optimizer_parameter_names"),  # absent from checkpoints before 2026-11-30
                decay_embeddings=config.optimizer.decay_embeddings,
                saved_decay_embeddings=with_decay_embeddings(state["config"])["optimizer"]["decay_embeddings"],
            )
        except OptimizerStateMismatch as error:
            # Said as they are, without entry_restored's "move it aside": the run's earlier checkpoints have
            # the same layout
            raise ResumeRefused(f"{run_dir}: {error}") from error
    if left_out and dist_info.is_main:
        log.warning("optimizer state of %d parameters this run does not train (locked) left out", len(left_out))
    if state["scaler"]:  # empty when the checkpoint's run had no fp16 loss scaling
        with entry_restored("its 'scaler' entry", run_dir, step):
            scaler.load_state_dict(state["scaler"])
    fresh_seed = ckpt.rank_seed(config.train.seed, dist_info.rank, step)
    if len(state["rng"]) == dist_info.world_size:
        with entry_restored(f"rank {dist_info.rank}'s 'rng' entry", run_dir, step):
            ckpt.restore_rng_state(state["rng"][dist_info.rank])
        if dist_info.device.type == "cuda" and "cuda" not in state["rng"][dist_info.rank]:  # a CPU run's checkpoint
            torch.cuda.manual_seed(fresh_seed)
        with entry_restored("its 'data' entry", run_dir, step):
            data_state = data_state_for_rank(state["data"], dist_info.rank)  # with every rank's data position
    else:
        torch.manual_seed(fresh_seed)
        # The data loader continues the epochs in progress under this layout (its own warning says how).
        saved_ranks = len(state["rng"])
        saved_batch = state["config"]["train"]["batch_size"] * saved_ranks  # batch_size is per rank
        global_batch = config.train.batch_size * dist_info.world_size
        if dist_info.is_main:
            # A train.batch_size scaled with the rank count keeps the global batch: said so, not "16, not 16"
            batch = (f"the global batch is {global_batch}, not {saved_batch} (at the learning rate as set)"
                     if global_batch != saved_batch else f"the global batch stays {global_batch}")
            log.warning("checkpoint was written by %s, this run has %d: %s, RNG states are seeded afresh",
                        ranks_phrase(saved_ranks), dist_info.world_size, batch)
        with entry_restored("its 'data' entry", run_dir, step):
            data_state = data_state_for_other_world_size(state["data"], dist_info.rank)
    # Not for a run that only evaluates (schedule.steps lowered to or below the checkpoint's step): no step comes
    jump = learning_rate_jump(state["config"], config, step) if step < config.schedule.steps else None
    if jump is not None and dist_info.is_main:
        log.warning("the learning rate of step %d is %.3g under this config's schedule, %.3g under the checkpoint's: "
                    "it jumps there", step + 1, jump[1], jump[0])
    log.info("resumed %s at step %d", run_dir, step)
    return ResumePoint(step, data_state, state.get("metrics", {}))


# What restore_training_state reads, and the type it must have: a checkpoint with the format marker but
# without these (hand-made, or damaged by another program) stopped resuming with a KeyError traceback
_RESUMED_ENTRIES = {"step": int, "model": dict, "config": dict, "optimizer": dict, "scaler": dict, "rng": list,
                    "data": list}
_RESUMED_CONFIG_SECTIONS = ("model", "loss", "optimizer", "train")
# The keys of each rank's "rng" entry (checkpoint.capture_rng_state; "cuda" only where CUDA was there)
_RNG_KEYS = ("python", "python_version", "python_gauss", "numpy_keys", "numpy_pos", "numpy_gauss", "torch")


def incomplete_entries(state: dict) -> list[str]:
    """What a checkpoint lacks for a resume, said in words; empty for a whole one. Every rank's entries are
    looked at, so that every rank refuses alike."""
    problems = [
        f"{key!r} {'missing' if key not in state else f'is of type {type(state[key]).__name__}, not {kind.__name__}'}"
        for key, kind in _RESUMED_ENTRIES.items()
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool))
    ]
    config = state.get("config")
    if isinstance(config, dict):
        problems += [f"config section {section!r} missing" for section in _RESUMED_CONFIG_SECTIONS
                     if not isinstance(config.get(section), dict)]
    # A negative step reached the generators' seeding as a numpy ValueError traceback
    if isinstance(state.get("step"), int) and state["step"] < 0:
        problems.append(f"'step' is {state['step']}, not a step count")
    if "metrics" in state and not isinstance(state["metrics"], dict):  # read as a dict once training starts
        problems.append(f"'metrics' is of type {type(state['metrics']).__name__}, not dict")
    rng, data = state.get("rng"), state.get("data")
    if isinstance(rng, list) and isinstance(data, list) and len(rng) != len(data):  # one of each per saved rank
        problems.append(f"'rng' holds {len(rng)} ranks' states but 'data' {len(data)}")
    for key, wanted in (("rng", _RNG_KEYS), ("data", ())):
        for rank, entry in enumerate(state.get(key) if isinstance(state.get(key), list) else []):
            if not isinstance(entry, dict):
                problems.append(f"{key!r} of rank {rank} is of type {type(entry).__name__}, not dict")
            elif any(name not in entry for name in wanted):
                absent = ", ".join(repr(name) for name in wanted if name not in entry)
                problems.append(f"{key!r} of rank {rank} lacks {absent}")
    return problems


@contextlib.contextmanager
def entry_restored(entry: str, run_dir: Path, step: object) -> Iterator[None]:
    """Within the block, a checkpoint's entry (`entry`: words naming it) is put into the run: what that raises
    for an entry of the wrong shape, type or size (torch's load_state_dict, the generators' setstate, a data
    position without its keys) becomes a ResumeRefused naming the entry. A checkpoint whose entries contradict
    its config (edited, or written by another program) stopped clip-train with a traceback from deep in torch,
    numpy or random."""
    try:
        yield
    except ResumeRefused:
        raise
    except torch.OutOfMemoryError:  # no fault of the file's
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        raise ResumeRefused(
            f"{run_dir}: the checkpoint of step {step!r} it would resume from cannot be restored: {entry} does not "
            f"fit this run ({_gist(error)}); move it aside to resume from an earlier one"
        ) from error


@contextlib.contextmanager
def refused_on_every_rank(run_dir: Path, dist_info: DistributedInfo) -> Iterator[None]:
    """Within the block, a ResumeRefused raised on some ranks only is raised on every rank: its own where it
    has one, else one that points at the other rank's. A rank's own part of a checkpoint (its 'rng' entry, its
    data position) is put into the run by that rank alone: one that failed there stopped, and the others went
    on into their next collective (DDP's constructor, the first step) and waited for it there until the
    timeout. Every rank enters the block at the same point: its end is a collective."""
    refusal = None
    try:
        yield
    except ResumeRefused as error:  # re-raised below, after the ranks agree
        refusal = error
    raise_on_every_rank(refusal, dist_info, ResumeRefused(
        f"{run_dir}: another rank could not restore its part of the checkpoint it would resume from (its error "
        f"says which entry, and why)"
    ))


def _gist(error: BaseException) -> str:
    """An error's message in one line: torch's load_state_dict lists its mismatches on the lines after a
    headline, and its C++ errors end with the lines of the source that raised them."""
    lines = []
    for line in str(error).splitlines():
        if line.strip().startswith("Exception raised from"):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines) or type(error).__name__
    return f"{type(error).__name__}: {text if len(text) <= 400 else text[:400] + '...'}"


def learning_rate_jump(saved: dict, config: TrainConfig, step: int) -> tuple[float, float] | None:
    """(the checkpoint's, this config's) learning rate for the step after `step` when they differ: extending a
    finished run (more schedule.steps) goes from the end of its cosine back up near the peak. None when they
    agree or the checkpoint's config cannot be read as such."""
    try:
        saved_config = from_dict(TrainConfig, with_decay_embeddings(saved))
    except ConfigError:
        return None
    before = learning_rate(step, saved_config.optimizer.lr, saved_config.schedule)
    after = learning_rate(step, config.optimizer.lr, config.schedule)
    return None if math.isclose(before, after, rel_tol=1e-6, abs_tol=0.0) else (before, after)


def with_decay_embeddings(saved: dict) -> dict:
    """A checkpoint's config with optimizer.decay_embeddings, which checkpoints from before the setting lack:
    they were trained with the embeddings undecayed."""
    return {**saved, "optimizer": {"decay_embeddings": False, **saved["optimizer"]}}


def with_synthetic_sizes(config: dict) -> dict:
    """`config` with every synthetic source's num_samples as the source reads it (`synthetic_sample_count`), so
    that the default written out and the default left unset compare equal."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        return config
    sources = [
        {**source, "num_samples": synthetic_sample_count(source.get("num_samples"))}
        if isinstance(source, dict) and source.get("kind") == "synthetic"
        else source
        for source in data["sources"]
    ]
    return {**config, "data": {**data, "sources": sources}}


# Datasets whose split "" (the default since 2026-11-30) means "test", the default written out before
EVALUATION_SPLIT_NAMED_TEST = ("synthetic", "cifar10", "cifar100")


def with_evaluation_splits_named(config: dict) -> dict:
    """`config` with every zero-shot dataset's empty split written "test" where the two are the same images
    (synthetic, CIFAR), so that a checkpoint's "test" and the default left empty compare equal. An image
    folder's "" (its root) and "test" (its test/ subfolder) differ, and stay as written."""
    evaluation = config.get("eval")
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("zeroshot"), list):
        return config
    datasets = [
        {**dataset, "split": "test"}
        if isinstance(dataset, dict)
        and dataset.get("kind", "synthetic") in EVALUATION_SPLIT_NAMED_TEST
        and dataset.get("split", "") == ""
        else dataset
        for dataset in evaluation["zeroshot"]
    ]
    return {**config, "eval": {**evaluation, "zeroshot": datasets}}
