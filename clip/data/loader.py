"""`build_train_data`: the training loop's view of the data -- endless batches, exact resume, skip counts.

    data = build_train_data(config.data, image_size=224, context_length=77, tokenizer=get_tokenizer(),
                            batch_size=256, rank=rank, world_size=world_size, seed=seed)
    data.load_state_dict(data_state_for_rank(checkpoint["data"], rank))  # optional, before iter()
    batches = iter(data)                              # endless: epochs follow each other seamlessly
    normalize = PixelNormalizer(device)               # uint8 pixels -> the model's float input, on the device
    images, texts = next(batches)                     # ByteTensor[B, 3, H, W], IntTensor[B, context_length]
    images = normalize(images.to(device))
    checkpoint["data"][rank] = data.state_dict()      # the position after the last batch received
    metrics["data"] = data.stats()                    # counts of samples used, skipped and repaired per source
    data.close()                                      # stops the worker processes

All counts and positions are this rank's; each rank saves its own state. A resume under another world size
or number of workers continues the epochs in progress from every saved rank's positions
(`data_state_for_rank`, `data_state_for_other_world_size`; see `handover.py`).
The counts are kept in `epoch_counts.py`; the workers' handling of a scheduler's signals is in
`worker_signals.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import re
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from ..exception_chain import first_in_chain
from .config import DataConfig
from .epoch_counts import EpochCounts, counts_line
from .handover import (
    MAX_HANDOVERS,
    Handover,
    SlotLayout,
    SlotStreams,
    needed_handovers,
    resampled_positions,
)
from .rank_states import every_slot_position
from .sampling import PLAN_VERSION, Planner
from .shards import read_through_a_network_or_command
from .sources import ManifestSource, ShardSource, Source, build_source
from .stream import Position, SampleStream, StreamSettings
from .worker_signals import job_signals_held, signal_safe_worker_options

if hasattr(signal, "sigwaitinfo"):  # where worker_signals defines it; importable from here as before
    from .worker_signals import ForkWithJobSignalsHeld as ForkWithJobSignalsHeld

log = logging.getLogger(__name__)

# 2: positions may refer to transition streams after an elastic resume ("handovers"); 1 is read as well.
STATE_FORMAT = 2
_READABLE_FORMATS = (1, 2)
# The most samples one data worker's plan of an epoch may hold: a plan lists each of its samples (a 2-byte source
# label, and an 8-byte row for a manifest or synthetic source), so 2**32 is 8.6 GB (shards) to 43 GB in one worker.
# A weight of 1e308 made weight x size infinite (an OverflowError, with a traceback), and one of 1e15 planned
# without end.
MAX_SAMPLES_PER_SLOT = 2**32
# What the plans depend on besides the slot layout: under another of these, saved positions mean nothing.
_PLAN_KEYS = ("plan_version", "seed", "resampled", "epoch_samples", "sources")
# Plan versions (sampling.PLAN_VERSION) that plan exact epochs alike: 4 and 5 changed only how resampled shards are
# drawn
_SAME_EXACT_EPOCHS = frozenset({3, 4, 5})
# How every line on a resume under another layout begins; its %s is the settings that changed
_OTHER_LAYOUT = "data: the saved position was for another layout (%s changed"


# How torch reports a data worker process that died: a plain RuntimeError (torch has no type of its own for it),
# raised by its SIGCHLD handler wherever the training process is ("DataLoader worker (pid 123) is killed by signal:
# Killed." or "... exited unexpectedly with exit code 1. ...") or by the loader's wait for the next batch
# ("DataLoader worker (pid(s) 123, 456) exited unexpectedly")
_WORKER_DEATH = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? \d+(?:, \d+)*\) (?:is killed by signal|exited unexpectedly)"
)


def worker_death(error: BaseException) -> BaseException | None:
    """torch's report that a data worker process died (the out-of-memory killer's SIGKILL, a crash in an image
    decoder), when `error` is one or was raised from one or while one was handled; None otherwise."""
    return first_in_chain(error, lambda link: isinstance(link, RuntimeError) and bool(_WORKER_DEATH.match(str(link))))


def _how_workers_ended(iterator: Iterator) -> str | None:
    """The signal or exit status of each of the loader's worker processes that ended with one ("pid 123 is killed
    by signal: Killed"); None when there is none, or the loader does not say. Where torch finds a dead worker
    while it waits for a batch, its message names the pid alone; its SIGCHLD handler's, where that comes first,
    names the signal. Read from torch's iterator's private list of its processes."""
    ended = [worker for worker in getattr(iterator, "_workers", ()) if worker.exitcode not in (None, 0)]
    return ", ".join(f"pid {worker.pid} {_how_ended(worker.exitcode)}" for worker in ended) or None


def _how_ended(exitcode: int) -> str:
    """A process's end as multiprocessing gives it (-N: signal N), in the words of torch's SIGCHLD handler."""
    if exitcode > 0:
        return f"exited with exit code {exitcode}"
    return f"is killed by signal: {signal.strsignal(-exitcode) or -exitcode}"


def check_saved_positions(state: dict) -> None:
    """Refuses a data state whose positions no run saves: an epoch or offset below 0, or a layout of no slots
    or no shuffle window. A checkpoint edited or written by another program got through: a negative offset
    read other samples than planned without a word, and a shuffle_buffer of 0 stopped the first step with a
    ZeroDivisionError traceback."""
    layouts = [("layout", state.get("layout"))]
    positions = [("positions", state.get("positions")), ("every_slot_position", state.get("every_slot_position"))]
    for index, handover in enumerate(state.get("handovers") or []):
        where = f"handovers[{index}]"
        layouts.append((where, handover if isinstance(handover, dict) else None))
        positions.append((f"{where}.positions", handover.get("positions") if isinstance(handover, dict) else None))
    for where, layout in layouts:
        if not isinstance(layout, dict):
            raise ValueError(f"the data state's {where} is {type(layout).__name__}, not a layout")
        for key in ("world_size", "workers", "shuffle_buffer"):
            value = layout.get(key)
            if key in layout and not (_is_count(value) and value >= 1):
                raise ValueError(f"the data state's {where}.{key} is {value!r}, not a count >= 1")
    for where, listed in positions:
        if listed is None and where == "every_slot_position":
            continue  # added on resume only
        if not isinstance(listed, (list, tuple)):
            raise ValueError(f"the data state's {where} is {type(listed).__name__}, not a list of positions")
        for position in listed:
            if not (isinstance(position, (list, tuple)) and len(position) == 2
                    and all(_is_count(value) and value >= 0 for value in position)):
                raise ValueError(f"the data state's {where} holds {position!r}, not an [epoch, offset] pair of "
                                 f"counts >= 0")


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


class TrainData:
    """See the module docstring. Build it with `build_train_data`."""

    def __init__(
        self,
        config: DataConfig,
        *,
        image_size: int,
        context_length: int,
        tokenizer: object,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not config.sources:
            raise ValueError("data.sources is empty: add at least one [[data.sources]] table")
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sources: list[Source] = [
            build_source(source, i, image_size, said_once=self._said_once) for i, source in enumerate(config.sources)
        ]
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names must be unique, got {names}")
        self._warn_of_reads_without_timeout(config)
        self.slots_per_rank = max(1, config.workers)
        self.planner = Planner(
            sources=tuple(source.layout for source in self.sources),
            seed=seed,
            world_size=world_size,
            workers_per_rank=self.slots_per_rank,
            resampled=config.resampled,
            epoch_samples=config.epoch_samples if config.resampled else None,
        )
        self._check_epoch_fits(config)
        if not config.resampled:
            self._check_rounded_weights()
        planned = self.planner.samples_per_pass
        if planned < self.planner.slots:
            what, remedy = (("data.epoch_samples", "raise data.epoch_samples") if self.planner.epoch_samples is not None
                            else ("sum of weight x size over the sources", "add data"))
            raise ValueError(
                f"an epoch plans {planned} samples ({what}), fewer than the {self.planner.slots} data workers over "
                f"all ranks ({world_size} ranks x {self.slots_per_rank}): {remedy} or lower data.workers"
            )
        self.samples_per_epoch = config.epoch_samples or planned
        # Batches are full and straddle epoch ends (nothing is dropped), so an epoch is this many batches
        # on average; rounding up means every sample is seen by the time the trainer's epoch ends.
        self.batches_per_epoch = max(1, math.ceil(self.samples_per_epoch / (world_size * batch_size)))
        self.settings = StreamSettings(
            rank=rank,
            batch_size=batch_size,
            image_size=image_size,
            context_length=context_length,
            shuffle_window=config.shuffle_buffer,
            crop=config.crop,
            jpeg_draft=config.jpeg_draft,
            max_image_pixels=config.max_image_pixels,
            log_every_s=config.log_every_s,
        )
        # Manifest rows unusable already when the file was read (no image path, a broken JSONL line): they are
        # not in any epoch, so they are reported apart from the per-sample counts.
        self._rows_dropped = {
            source.name: source.manifest.bad_rows for source in self.sources
            if isinstance(source, ManifestSource) and source.manifest.bad_rows
        }
        self._positions: list[Position] = [(0, 0)] * self.slots_per_rank
        # The layouts earlier resumes left while epochs were in progress (see handover.py), oldest first
        self._handovers: tuple[Handover, ...] = ()
        self._next_worker = 0
        self._batches = 0
        # Samples used, skipped and repaired per source: since the start, and by data epoch
        self._counts = EpochCounts(names)
        self._summary_mark = (0, copy.deepcopy(self._counts.total))  # (epoch, counts) at the previous summary
        self._loader_iterator: Iterator | None = None
        self._generation = 0  # bumped by every iter() and close(); older batch generators stop
        self._warned_order = False

    # ---- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(
        self, while_waiting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches from this data position on, as iter() gives them. `while_waiting` makes the context each
        wait for a batch runs in, and only the wait: one that raises there (the trainer's stop on a signal) leaves
        the position at the last batch handed out, never between a batch's arrival and its recording."""
        self._stop_workers()
        stream = SampleStream(
            self.sources, self.planner, self.settings, self.tokenizer, self._positions, rotation=self._next_worker,
            handovers=self._handovers,
        )
        workers = self.config.workers
        loader = DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            pin_memory=self.config.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.config.prefetch_factor if workers > 0 else None,
            timeout=self.config.worker_timeout_s if workers > 0 else 0,  # a hung read becomes an error
            # The loader draws its workers' base seed from this generator instead of torch's global RNG,
            # so creating it does not change the trainer's random numbers. (Our workers use no torch RNG.)
            generator=torch.Generator().manual_seed(self.seed),
            **(signal_safe_worker_options() if workers > 0 else {}),
        )
        with job_signals_held():  # while the workers start (see there)
            self._loader_iterator = iter(loader)
        self._generation += 1
        return self._batches_from(self._loader_iterator, self._generation, while_waiting)

    def _batches_from(
        self, iterator: Iterator, generation: int, while_waiting: Callable[[], contextlib.AbstractContextManager]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while generation == self._generation:
            try:
                with while_waiting():
                    images, tokens, meta = next(iterator)
            except RuntimeError as error:
                how = _how_workers_ended(iterator) if worker_death(error) is error else None
                if how is not None and "(pid(s) " in str(error):  # torch's own words name the pids alone
                    raise RuntimeError(f"{str(error).rstrip()}; {how}") from error
                if "DataLoader timed out" not in str(error):  # torch's message for worker_timeout_s
                    raise
                raise RuntimeError(
                    f"data rank {self.rank}: no batch from the data workers in data.worker_timeout_s="
                    f"{self.config.worker_timeout_s:g} s (a hung read of a remote or pipe: shard?). Resume from the "
                    f"last checkpoint; raise data.worker_timeout_s if loading is just that slow."
                ) from error
            self._record(meta)
            yield images, tokens

    def _record(self, meta: dict) -> None:
        worker = meta["worker"]
        if worker != self._next_worker and not self._warned_order:
            self._warned_order = True
            log.warning(
                "data: batch from worker %d where %d was due; a resume may reorder batches", worker, self._next_worker
            )
        epoch_before = self.epoch
        self._positions[worker] = tuple(meta["position"])
        self._next_worker = (worker + 1) % self.slots_per_rank
        self._batches += 1
        self._counts.add(meta["counts"])
        for epoch in range(epoch_before, self.epoch):  # every worker of this rank has finished these data epochs
            sources = self._counts.finish(epoch)
            log.log(
                logging.INFO if self.rank == 0 else logging.DEBUG,
                "data rank %d, epoch %d done: %s", self.rank, epoch, counts_line(sources),
            )

    def _stop_workers(self) -> None:
        self._generation += 1
        iterator, self._loader_iterator = self._loader_iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # otherwise the worker processes live until the iterator is garbage collected

    def close(self) -> None:
        """Stops the worker processes. The position is kept: iter() again continues where it stopped."""
        self._stop_workers()

    # ---- resume --------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        """Everything the per-worker positions depend on; a state saved under another layout cannot resume exactly."""
        return {
            "plan_version": PLAN_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.slots_per_rank,
            "resampled": self.config.resampled,
            "epoch_samples": self.planner.epoch_samples,
            "shuffle_buffer": self.config.shuffle_buffer,
            "sources": [[s.name, s.fingerprint(), s.layout.weight] for s in self.sources],
        }

    def state_dict(self) -> dict:
        """The position right after the last batch the trainer received (prefetched batches are not in it)."""
        return {
            "format": STATE_FORMAT,
            "layout": self._layout(),
            "positions": [list(position) for position in self._positions],
            "next_worker": self._next_worker,
            "batches": self._batches,
            **self._counts.state_dict(),  # "counts", "open_epochs", "finished_epochs"
            "handovers": [handover.to_state() for handover in needed_handovers(self._handovers, self.epoch)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`'s output. With the same layout the following batches are exactly the
        ones the saved run would have produced.

        Under another world size, number of workers or shuffle_buffer, exact epochs continue: the samples the
        saved slots had not read of the epochs in progress are divided among this layout's slots, each read
        once, then this layout's own plans follow (see `handover.py`). That needs every saved slot's position:
        a state from `data_state_for_other_world_size` or `data_state_for_rank` (the trainer's resume), or a
        single rank's. Resampled epochs continue at the saved slots' average fraction of their epoch. Without
        the positions, or under another seed or sources, every worker restarts at the beginning of the
        earliest epoch in progress, with a warning."""
        if state.get("format") not in _READABLE_FORMATS:
            raise ValueError(f"unknown data state format {state.get('format')!r} (expected one of {_READABLE_FORMATS})")
        check_saved_positions(state)
        self._stop_workers()
        state = self._with_sources_renamed(state)
        state = self._with_the_same_exact_plan(state)
        saved_layout, layout = state["layout"], self._layout()
        handovers = tuple(Handover.from_state(handover) for handover in state.get("handovers", []))
        self._counts.load_state_dict(state)  # before the positions, which may reopen finished epochs
        if saved_layout == layout:
            self._positions = [tuple(position) for position in state["positions"]]
            self._next_worker, self._handovers = state["next_worker"], handovers
        else:
            why_not = self._continue_under_this_layout(state, handovers)
            if why_not is None:
                self._counts.reopen(self.epoch)
            else:
                self._restart_earliest_epoch(state, why_not)
        self._batches = state["batches"]
        self._summary_mark = (self.epoch, copy.deepcopy(self._counts.total))

    def _with_sources_renamed(self, state: dict) -> dict:
        """`state` under this run's source names where only names changed since it was saved (the same sources,
        fingerprints and weights, in the same order). A name is a label of counts and logs, not of the plan:
        renaming one restarted the epoch in progress ("other samples are planned", its samples read again) and
        dropped the whole run's counts kept under the old name."""
        saved, ours = state["layout"].get("sources"), self._layout()["sources"]
        if not isinstance(saved, list) or len(saved) != len(ours):
            return state
        if any(not isinstance(entry, list) or entry[1:] != mine[1:] for entry, mine in zip(saved, ours, strict=True)):
            return state
        renames = {entry[0]: mine[0] for entry, mine in zip(saved, ours, strict=True) if entry[0] != mine[0]}
        if not renames:
            return state

        def renamed(counts: dict) -> dict:
            return {renames.get(name, name): source_counts for name, source_counts in counts.items()}

        state = {**state, "layout": {**state["layout"], "sources": ours}, "counts": renamed(state["counts"]),
                 "open_epochs": [[epoch, renamed(counts)] for epoch, counts in state.get("open_epochs", [])],
                 "finished_epochs": [[epoch, renamed(counts)] for epoch, counts in state.get("finished_epochs", [])]}
        log.log(self._said_once, "data: sources renamed since the checkpoint (%s): their position and counts "
                "carry over", ", ".join(f"{old} -> {new}" for old, new in renames.items()))
        return state

    def _with_the_same_exact_plan(self, state: dict) -> dict:
        """A state saved under a plan version that plans exact epochs as this one does, as if saved under this one:
        a checkpoint written before the resampled shards' change (version 3) restarted its epoch in progress and
        read it again, for nothing, its position being as good as ever."""
        saved = state["layout"]
        if (saved.get("plan_version") != PLAN_VERSION and saved.get("plan_version") in _SAME_EXACT_EPOCHS
                and PLAN_VERSION in _SAME_EXACT_EPOCHS and not saved.get("resampled") and not self.config.resampled):
            return {**state, "layout": {**saved, "plan_version": PLAN_VERSION}}
        return state

    def _slot_layout(self) -> SlotLayout:
        return SlotLayout(self.world_size, self.slots_per_rank, self.config.shuffle_buffer)

    def _continue_under_this_layout(self, state: dict, handovers: tuple[Handover, ...]) -> str | None:
        """Sets the positions that continue the saved epochs under this layout; where it cannot, says why."""
        saved_layout, layout = state["layout"], self._layout()
        if any(saved_layout.get(key) != layout[key] for key in _PLAN_KEYS):
            return "other samples are planned"
        saved = SlotLayout(saved_layout["world_size"], saved_layout["workers"], saved_layout["shuffle_buffer"])
        everyone = every_slot_position(state)
        changed = self._changed_settings(saved_layout)
        if self.config.resampled:
            first_slot = saved_layout.get("rank", 0) * saved.workers
            saved_slots = list(range(saved.slots)) if everyone else list(range(first_slot, first_slot + saved.workers))
            saved_planner = dataclasses.replace(self.planner, world_size=saved.world_size,
                                                workers_per_rank=saved.workers)
            slots = range(self.rank * self.slots_per_rank, (self.rank + 1) * self.slots_per_rank)
            self._positions = resampled_positions(everyone or [tuple(p) for p in state["positions"]], saved_slots,
                                                  saved_planner, self.planner, list(slots))
            self._next_worker, self._handovers = 0, ()
            log.log(self._said_once, f"{_OTHER_LAYOUT}); continuing the resampled epochs at the saved workers' "
                    "average progress, epoch %d", changed, self.epoch)
            return None
        if everyone is None:
            return "the state lacks the other saved ranks' positions"
        handover = Handover(saved, tuple(everyone))
        chain = needed_handovers(handovers + (handover,), handover.first_epoch)
        if len(chain) > MAX_HANDOVERS:
            return (f"{len(chain)} layout changes within the epochs in progress are more than the {MAX_HANDOVERS} "
                    f"followed")
        self._handovers, self._next_worker = chain, 0
        self._positions = [(handover.first_epoch, 0)] * self.slots_per_rank
        if not chain:  # every saved slot had just finished the same epoch
            log.log(self._said_once, f"{_OTHER_LAYOUT}); continuing at the beginning of epoch %d under the new "
                    "layout, none read twice", changed, handover.first_epoch)
            return None
        streams = SlotStreams(self.sources, self.planner, self._slot_layout(), chain)
        left = {epoch: int(streams.remainders(len(chain) - 1, epoch).sum())
                for epoch in range(handover.first_epoch, streams.ends[-1])}
        log.log(
            self._said_once,
            f"{_OTHER_LAYOUT}); continuing %s under the new layout: %s left, none read twice", changed,
            _epochs_named(list(left)), ", ".join(f"{count} samples of epoch {epoch}" for epoch, count in left.items()),
        )
        return None

    @property
    def _said_once(self) -> int:
        """The level of a line every rank would log alike: a warning from rank 0, INFO from the others."""
        return logging.WARNING if self.rank == 0 else logging.INFO

    def _warn_of_reads_without_timeout(self, config: DataConfig) -> None:
        """data.worker_timeout_s times out data workers only: without them a hung read hangs the run, and over
        several ranks the signal that would stop it (SIGTERM) is only acted on after the read (one process's
        trainer stops in the wait, `batches`)."""
        if config.workers > 0 or config.worker_timeout_s == 0:
            return
        hanging = [
            source.name for source in self.sources
            if isinstance(source, ShardSource) and any(map(read_through_a_network_or_command, source.urls))
        ]
        if hanging:
            log.log(self._said_once, "data.workers = 0: the training process reads source(s) %s itself, where "
                    "data.worker_timeout_s does not apply: a hung download or pipe: command would hang the run "
                    "(over several ranks also past a SIGTERM); set data.workers >= 1", ", ".join(hanging))

    def _check_epoch_fits(self, config: DataConfig) -> None:
        """Refuses an epoch too large for each data worker's plan of it (MAX_SAMPLES_PER_SLOT), before it is
        rounded to a count of samples (which an infinite weight x size is not)."""
        asked = float(sum(source.layout.weight * source.layout.size for source in self.sources))
        # A resampled epoch draws data.epoch_samples by the weights' ratios (which an infinite sum has none of)
        if config.resampled and config.epoch_samples is not None and math.isfinite(asked):
            asked, epoch = float(config.epoch_samples), "data.epoch_samples"
            # The weights only share that count out between the sources: lowering them changed nothing
            remedy = "Lower data.epoch_samples"
        else:
            epoch = "weight x size summed over the sources"
            remedy = "Lower the weights (a source's weight is how many times an epoch reads it)"
            if not config.resampled:
                remedy += ", or set data.resampled = true with data.epoch_samples for a corpus that large"
        if asked / self.planner.slots <= MAX_SAMPLES_PER_SLOT:
            return
        if math.isfinite(asked):  # each worker plans its own share
            remedy += f", or share the epoch among more data workers (data.workers = {config.workers} per rank)"
        sizes = ", ".join(f"{source.name}: {source.layout.weight:g} x {source.layout.size}" for source in self.sources)
        raise ValueError(
            f"an epoch of {asked:.3g} samples ({epoch}; {sizes}) is too large: each of the "
            f"{self.planner.slots} data workers over all ranks plans its share of an epoch, at most "
            f"{MAX_SAMPLES_PER_SLOT} samples (2**32). {remedy}"
        )

    def _check_rounded_weights(self) -> None:
        """An exact epoch reads round(weight x size) samples of each source: refuses a source that rounds to
        none (never read, like a weight of 0), and says when the rounding moves a source's share by over 1%
        (weight x size = 2.5 reads 2 per epoch). Only small sources are affected."""
        for source in self.sources:
            asked, read = source.layout.weight * source.layout.size, source.layout.samples_per_epoch
            if source.layout.size == 0:  # nothing to read at any weight (shards that hold no sample)
                continue
            if read == 0:
                # 1 / size: one sample an epoch (0.5 / size would round, half to even, to none again)
                raise ValueError(
                    f"data source {source.name}: weight x size = {source.layout.weight:g} x {source.layout.size} = "
                    f"{asked:.3g} rounds to 0 samples per epoch, so it would never be read: raise its weight to at "
                    f"least {1 / source.layout.size:.3g}, or set data.resampled = true (draws by weight)"
                )
            if abs(read - asked) > 0.01 * asked:
                log.log(self._said_once, "data source %s: weight x size = %.3g is read as %d samples per exact epoch "
                        "(%+.0f%% of what its weight asks; data.resampled = true draws by weight)",
                        source.name, asked, read, 100 * (read - asked) / asked)

    def _changed_settings(self, saved_layout: dict) -> str:
        """The layout settings that differ from the saved state's, for the log. Not the rank: every rank of
        another world size loads rank 0's state, with everyone's positions."""
        layout = self._layout()
        return ", ".join(sorted(key for key in layout if key != "rank" and saved_layout.get(key) != layout[key]))

    def _restart_earliest_epoch(self, state: dict, why: str) -> None:
        saved_layout = state["layout"]
        positions = [tuple(position) for position in state["positions"]]
        epoch = min(epoch for epoch, _ in positions)
        # Slots already past that epoch read their whole share of it, which the state does not record
        reread = sum(offset for slot_epoch, offset in positions if slot_epoch == epoch)
        log.warning(
            f"{_OTHER_LAYOUT}; %s); restarting epoch %d from its beginning: at least %d samples of it that the "
            "saved rank %d had read are read again",
            self._changed_settings(saved_layout), why, epoch, reread, saved_layout.get("rank", 0),
        )
        self._positions, self._next_worker, self._handovers = [(epoch, 0)] * self.slots_per_rank, 0, ()
        self._counts.open = {}

    # ---- reporting -----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The earliest data epoch a worker of this rank is still in (0-based)."""
        return min(epoch for epoch, _ in self._positions)

    def stats(self) -> dict:
        """This rank's counts since the start of training (kept across resumes), JSON-ready, and under
        "finished_epoch" the exact counts of the last data epoch all its workers finished (None before)."""
        sources = copy.deepcopy(self._counts.total)
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "samples": sum(counts["samples"] for counts in sources.values()),
            "skipped": sum(sum(counts["skipped"].values()) for counts in sources.values()),
            "sources": sources,
            "finished_epoch": self._counts.latest_finished(),
            "manifest_rows_dropped": dict(self._rows_dropped),
        }

    def rank_report(self) -> dict:
        """What `merge_rank_reports` needs from this rank: `stats()` and the last few finished epochs' counts."""
        return {"stats": self.stats(), "finished_epochs": copy.deepcopy(self._counts.finished)}

    def summary_since_previous(self) -> str:
        """One line on what happened since the previous call (or the start): samples, skips and repairs by
        source and kind, e.g. for the trainer's log at the end of its epochs, which need not coincide with data
        epochs. (Independently of these calls, each data epoch's exact counts are logged -- INFO on rank 0 --
        once every worker has finished it.)"""
        since_epoch, before = self._summary_mark
        self._summary_mark = (self.epoch, copy.deepcopy(self._counts.total))
        epochs = f"epoch {since_epoch}" + (f"-{self.epoch}" if self.epoch != since_epoch else "")
        return f"data rank {self.rank}, {epochs}: " + counts_line(self._counts.total, before)


def _epochs_named(epochs: list[int]) -> str:
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"


def build_train_data(
    config: DataConfig,
    *,
    image_size: int,
    context_length: int,
    tokenizer: object,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TrainData:
    """The training data of one rank; see `TrainData`. `tokenizer(texts, context_length=..., truncate=True)`
    must return an integer tensor [N, context_length] (int32 from clip's tokenizer) padded with 0 and be picklable (it runs in the workers)."""
    return TrainData(
        config,
        image_size=image_size,
        context_length=context_length,
        tokenizer=tokenizer,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
