"""What the trainer does with every rank's data state and report: the run-wide counts (`merge_rank_reports`),
and the state each rank resumes from (`data_state_for_rank`, `data_state_for_other_world_size`), which holds
every saved slot's position so that a resume under another layout continues the epochs in progress."""

from __future__ import annotations

import copy

from .stream import Position, empty_counts


def _add(into: dict, counts: dict) -> None:
    for kind, amount in counts.items():
        into[kind] = into.get(kind, 0) + amount


def add_source_counts(into: dict, counts: dict) -> None:
    """Adds one source's {"samples", "skipped", "repaired"} counts to another's."""
    into["samples"] += counts["samples"]
    for field in ("skipped", "repaired"):
        _add(into[field], counts[field])


def _summed_sources(per_rank: list[dict]) -> dict:
    total: dict = {}
    for sources in per_rank:
        for name, counts in sources.items():
            add_source_counts(total.setdefault(name, empty_counts()), counts)
    return total


def _finished_by_all(finished_per_rank: list[dict[int, dict]]) -> dict[int, dict]:
    """{epoch: counts summed over ranks} for the data epochs that every rank has finished."""
    common = set.intersection(*map(set, finished_per_rank)) if finished_per_rank else set()
    return {epoch: _summed_sources([finished[epoch] for finished in finished_per_rank]) for epoch in sorted(common)}


def merge_rank_reports(reports: list[dict]) -> dict:
    """All ranks' `rank_report()`s as one `stats()`-shaped dict for the whole run: counts summed over ranks,
    `epoch` the earliest any rank is in, and `finished_epoch` the latest data epoch every rank has finished
    (ranks finish it a batch or so apart), with its exact counts summed over ranks."""
    stats = [report["stats"] for report in reports]
    sources = _summed_sources([s["sources"] for s in stats])
    by_all = _finished_by_all([report["finished_epochs"] for report in reports])
    finished = None
    if by_all:
        epoch = max(by_all)
        finished = {"epoch": epoch, "sources": by_all[epoch]}
    return {
        "epoch": min(s["epoch"] for s in stats),
        "batches": sum(s["batches"] for s in stats),
        "samples": sum(s["samples"] for s in stats),
        "skipped": sum(s["skipped"] for s in stats),
        "sources": sources,
        "finished_epoch": finished,
        "manifest_rows_dropped": stats[0].get("manifest_rows_dropped", {}),  # every rank reads the same files
        "ranks": len(reports),
    }


def every_slot_position(state: dict) -> list[Position] | None:
    """Every saved slot's position, in slot order, where the state has them: added by the resume helpers
    below, or the state's own where its run had one rank."""
    layout = state["layout"]
    everyone = state.get("every_slot_position")
    if everyone is None and layout.get("world_size") == 1:
        everyone = state["positions"]
    if everyone is None or len(everyone) != layout.get("world_size", 0) * layout.get("workers", 0):
        return None
    return [(int(epoch), int(offset)) for epoch, offset in everyone]


def _with_every_slot_position(state: dict, states: list[dict]) -> dict:
    """`state` with every saved slot's position (states: one per saved rank, in rank order) and the longest
    chain of handovers any rank kept (ranks past a transition drop theirs; the chains are suffixes of one)."""
    state = {**state}
    layouts = [{key: value for key, value in saved["layout"].items() if key != "rank"} for saved in states]
    if all(layout == layouts[0] for layout in layouts) and [s["layout"].get("rank") for s in states] == list(
        range(len(states))
    ):
        state["every_slot_position"] = [list(position) for saved in states for position in saved["positions"]]
    state["handovers"] = max((saved.get("handovers", []) for saved in states), key=len)
    return state


def states_to_save(states: list[dict]) -> list[dict]:
    """Every rank's data state (one per rank, in rank order) as a checkpoint keeps them: the chain of
    handovers once, in the state of a rank with the longest (the resume helpers below give every rank that
    one). Every rank's copy of it, each listing every slot of the layouts left, grew with the square of the
    number of ranks: about 1 GB per checkpoint at 1024 ranks of 8 workers after 8 layout changes."""
    if not states:
        return states
    longest = max(range(len(states)), key=lambda rank: len(states[rank].get("handovers", [])))
    return [state if rank == longest or "handovers" not in state else {**state, "handovers": []}
            for rank, state in enumerate(states)]


def data_state_for_rank(states: list[dict], rank: int) -> dict:
    """The state to resume rank `rank` from when the checkpoint has as many ranks as this run (`states`, one
    per saved rank): its own, with every saved rank's positions, which a resume under another number of
    workers needs to continue the epochs in progress (see `TrainData.load_state_dict`)."""
    return _with_every_slot_position(states[rank], states)


def data_state_for_other_world_size(states: list[dict], rank: int) -> dict:
    """The state to resume rank `rank` from when the checkpoint's ranks (`states`, one per saved rank, in rank
    order) differ from this run's. It holds every saved slot's position, from which the loader continues the
    epochs in progress under this run's layout (see `TrainData.load_state_dict`); the counts must not be
    multiplied: rank 0 takes the sum of every saved rank's counts -- for the epochs still in progress, their
    counts so far, which the new ranks complete -- and the others none."""
    state = _with_every_slot_position(copy.deepcopy(states[0]), states)
    empty = {name: empty_counts() for name in state["counts"]}
    if rank == 0:
        state["counts"] = _summed_sources([saved["counts"] for saved in states])
        state["batches"] = sum(saved["batches"] for saved in states)
        finished = _finished_by_all([{int(e): c for e, c in saved.get("finished_epochs", [])} for saved in states])
        state["finished_epochs"] = [[epoch, counts] for epoch, counts in finished.items()]
        state["open_epochs"] = _counts_of_epochs_in_progress(states)
    else:
        state.update(counts=empty, batches=0, finished_epochs=[], open_epochs=[])
    return state


def _counts_of_epochs_in_progress(states: list[dict]) -> list:
    """[[epoch, counts summed over the saved ranks]] for the epochs some saved slot had not finished, from
    the ranks still in them and those that had finished them."""
    earliest = min(epoch for saved in states for epoch, _ in saved["positions"])
    per_epoch: dict[int, list[dict]] = {}
    for saved in states:
        for epoch, counts in [*saved.get("open_epochs", []), *saved.get("finished_epochs", [])]:
            if int(epoch) >= earliest:
                per_epoch.setdefault(int(epoch), []).append(counts)
    return [[epoch, _summed_sources(counts)] for epoch, counts in sorted(per_epoch.items())]
