"""One rank's counts of the samples its data workers used, skipped and repaired, per source: since the start
of training and by data epoch, saved in the data state so that a resume continues them (see loader.py);
`counts_line` writes them for the log. The run-wide sums over ranks are in rank_states.py."""

from __future__ import annotations

import copy

from .rank_states import add_source_counts
from .stream import empty_counts

# A resume under another world size sums the saved ranks' counts of the epochs in progress, finished ones
# included: exact while the ranks are fewer than this many data epochs apart (DDP's ranks step together, so
# they are at most about one apart)
_FINISHED_EPOCHS_KEPT = 4


def counts_line(counts: dict, before: dict | None = None) -> str:
    """'name: N samples, skipped K (kind k, ...), repaired ...' per source, for counts minus `before`."""
    parts = []
    for name, now in counts.items():
        then = (before or {}).get(name, empty_counts())
        line = f"{name}: {now['samples'] - then['samples']} samples"
        for field in ("skipped", "repaired"):
            delta = {k: v - then[field].get(k, 0) for k, v in sorted(now[field].items())}
            delta = {k: v for k, v in delta.items() if v}
            if delta:
                line += f", {field} {sum(delta.values())} ({', '.join(f'{k} {v}' for k, v in delta.items())})"
        parts.append(line)
    return "; ".join(parts)


class EpochCounts:
    """Counts by source, {source: {"samples": n, "skipped": {kind: n}, "repaired": {kind: n}}}:

    total: since the start of training (kept across resumes).
    open: the data epochs some worker of this rank is still in, {epoch: {source: counts}}.
    finished: the last few data epochs every worker of this rank finished, {epoch: {source: counts}}, for
        merging ranks that finish at different steps.
    """

    def __init__(self, names: list[str]) -> None:
        self.total = {name: empty_counts() for name in names}
        self.open: dict[int, dict] = {}
        self.finished: dict[int, dict] = {}

    def _no_counts(self) -> dict:
        return {name: empty_counts() for name in self.total}

    def add(self, batch_counts: dict) -> None:
        """Adds the counts of one batch, {epoch: {source: counts}}."""
        for epoch, sources in batch_counts.items():
            if epoch not in self.open:
                self.open[epoch] = self._no_counts()
            for name, counts in sources.items():
                add_source_counts(self.total[name], counts)
                add_source_counts(self.open[epoch][name], counts)

    def finish(self, epoch: int) -> dict:
        """Moves `epoch`, which every worker of this rank has finished, among the finished epochs; its counts."""
        sources = self.open.pop(epoch) if epoch in self.open else self._no_counts()
        self.finished[epoch] = sources
        for old_epoch in sorted(self.finished)[:-_FINISHED_EPOCHS_KEPT]:
            del self.finished[old_epoch]
        return sources

    def reopen(self, earliest_epoch: int) -> None:
        """Epochs this rank had finished that other ranks had not are continued by this layout's slots: their
        counts so far go back into the open epochs, so that the epoch's count summed over ranks stays exact."""
        for epoch in [epoch for epoch in self.finished if epoch >= earliest_epoch]:
            sources = self.finished.pop(epoch)
            into = self.open.setdefault(epoch, self._no_counts())
            for name, counts in sources.items():
                add_source_counts(into.setdefault(name, empty_counts()), counts)

    def latest_finished(self) -> dict | None:
        if not self.finished:
            return None
        epoch = max(self.finished)
        return {"epoch": epoch, "sources": copy.deepcopy(self.finished[epoch])}

    def state_dict(self) -> dict:
        return {
            "counts": copy.deepcopy(self.total),
            "open_epochs": [[epoch, copy.deepcopy(counts)] for epoch, counts in sorted(self.open.items())],
            "finished_epochs": [[epoch, copy.deepcopy(c)] for epoch, c in sorted(self.finished.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        """Reads `state_dict()`'s keys from a data state; counts of sources this run no longer has are left out."""
        # States saved before per-epoch counts existed lack these; epoch summaries then start afresh.
        self.open = {int(epoch): copy.deepcopy(counts) for epoch, counts in state.get("open_epochs", [])}
        self.finished = {int(epoch): copy.deepcopy(c) for epoch, c in state.get("finished_epochs", [])}
        for name, counts in state["counts"].items():
            if name in self.total:
                self.total[name] = copy.deepcopy(counts)
