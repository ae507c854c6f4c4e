"""build_train_data end to end on tiny shards and manifests: exactly-once epochs over ranks and workers,
determinism, exact resume, several weighted sources, resampling."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_helpers import IMAGE_SIZE, build, caption_of, captions, image_bytes, take, write_manifest, write_shards

from clip.data import PixelNormalizer, SourceConfig


def shards_source(folder: Path, num_samples: int, per_shard: int, **fields) -> SourceConfig:
    return SourceConfig(kind="shards", path=write_shards(folder, num_samples, per_shard), **fields)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path: Path) -> None:
    # 40 samples over 2 ranks x 2 workers = 10 per worker = 2 batches of 5: batches end exactly at epoch ends.
    # Shards of 6 do not line up with the workers' ranges, so some shards are read by two workers.
    source = shards_source(tmp_path, 40, 6)
    epochs: list[Counter] = [Counter(), Counter()]
    for rank in range(2):
        data = build([source], batch_size=5, rank=rank, world_size=2, workers=2)
        assert data.samples_per_epoch == 40 and data.batches_per_epoch == 4
        batches = take(data, 8)
        for epoch in range(2):
            epochs[epoch].update(captions(batches[4 * epoch : 4 * epoch + 4]))
        assert data.stats()["epoch"] == 2
        data.close()
    every_sample = Counter(caption_of(i) for i in range(40))
    assert epochs[0] == every_sample and epochs[1] == every_sample


def test_same_seed_same_batches_other_seed_other_order(tmp_path: Path) -> None:
    source = shards_source(tmp_path, 30, 7)
    runs = []
    for seed in (0, 0, 1):
        data = build([source], batch_size=4, seed=seed, workers=2)
        runs.append(take(data, 6))
        data.close()
    assert captions(runs[0]) == captions(runs[1])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(runs[0], runs[1]))
    assert captions(runs[0]) != captions(runs[2])


@pytest.mark.parametrize("kind", ["manifest", "shards", "both resampled"])
@pytest.mark.parametrize("augment", [False, True, "random_square_crop"])
def test_resume_mid_epoch_continues_exactly(tmp_path: Path, kind: str, augment: bool | str) -> None:
    # 23 samples, 2 workers, batches of 4: batches straddle epoch ends; one sample is broken (skipped).
    manifest = write_manifest(tmp_path / "m", range(23))
    (tmp_path / "m" / "images" / "5.jpg").write_bytes(b"not a jpeg")
    sources = {
        "manifest": [SourceConfig(kind="manifest", path=str(manifest))],
        "shards": [shards_source(tmp_path / "s", 23, 5)],
        "both resampled": [SourceConfig(kind="manifest", path=str(manifest)), shards_source(tmp_path / "s", 23, 5)],
    }[kind]
    settings = dict(batch_size=4, workers=2, prefetch_factor=2, augment=augment, shuffle_buffer=4)
    if kind == "both resampled":
        settings.update(resampled=True, epoch_samples=30)

    uninterrupted = build(sources, **settings)
    expected = take(uninterrupted, 14)
    expected_stats = uninterrupted.stats()
    uninterrupted.close()

    first = build(sources, **settings)
    head = take(first, 5)  # the workers have prefetched further; the state must not count that
    state = first.state_dict()
    first.close()
    resumed = build(sources, **settings)
    resumed.load_state_dict(state)
    tail = take(resumed, 9)
    assert captions(head + tail) == captions(expected)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(head + tail, expected))
    assert resumed.stats() == expected_stats
    resumed.close()


@pytest.mark.parametrize("resampled", [False, True])
def test_a_state_from_an_earlier_plan_version_that_plans_alike_resumes_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, resampled: bool
) -> None:
    # Version 4 changed only how resampled shards are drawn: a version 3 checkpoint of exact epochs restarted its
    # epoch in progress ("other samples are planned") and read it again for nothing
    source = shards_source(tmp_path, 20, 5)
    settings = dict(batch_size=4, workers=2, resampled=resampled, epoch_samples=20 if resampled else None)
    uninterrupted = build([source], **settings)
    expected = captions(take(uninterrupted, 9))
    uninterrupted.close()
    first = build([source], **settings)
    head = captions(take(first, 5))
    state = first.state_dict()
    first.close()
    state["layout"]["plan_version"] = 3
    resumed = build([source], **settings)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    if resampled:  # drawn otherwise under version 3: it cannot continue exactly
        assert "plan_version changed" in caplog.text
    else:
        assert caplog.text == "" and head + captions(take(resumed, 4)) == expected
    resumed.close()


def test_resume_under_another_layout_continues_the_epoch_or_restarts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = shards_source(tmp_path, 20, 5)
    data = build([source], batch_size=4, workers=2)
    take(data, 7)  # 28 samples into epochs of 20: both workers in epoch 1, 8 of it read
    state = data.state_dict()
    data.close()
    assert sorted(epoch for epoch, _ in state["positions"]) == [1, 1]
    # Other workers: a one-rank state holds every slot's position, so the epoch goes on (tests/test_data_elastic.py)
    other = build([source], batch_size=4, workers=1)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "(workers changed); continuing epoch 1 under the new layout: 12 samples of epoch 1 left, none read " \
           "twice" in caplog.text
    assert other.state_dict()["positions"] == [[1, 0]] and other.state_dict()["handovers"]
    # Another seed plans other samples: the epoch restarts, and how much is read twice is said
    caplog.clear()
    reseeded = build([source], batch_size=4, workers=2, seed=1)
    with caplog.at_level(logging.WARNING):
        reseeded.load_state_dict(state)
    assert "seed changed; other samples are planned); restarting epoch 1 from its beginning: at least 8 samples of " \
           "it that the saved rank 0 had read" in caplog.text
    assert reseeded.state_dict()["positions"] == [[1, 0], [1, 0]]



def _with_handover(state: dict) -> dict:
    """`state` as a resume under another number of workers saves it: with the layout it left."""
    return {**state, "handovers": [{"world_size": 1, "workers": 3, "shuffle_buffer": 8, "positions": [[0, 4]] * 3}]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(positions=[[0, -100]]), r"positions holds \[0, -100\], not an \[epoch, offset\] pair"),
        (lambda s: s.update(positions=[[-1, 4]]), r"positions holds \[-1, 4\]"),
        (lambda s: s.update(positions=[[0, 4, 9]]), r"positions holds \[0, 4, 9\]"),
        (lambda s: s.update(positions=[[0, "4"]]), r"positions holds \[0, '4'\]"),
        (lambda s: s.update(positions=5), r"positions is int, not a list of positions"),
        (lambda s: s["layout"].update(shuffle_buffer=0), r"layout\.shuffle_buffer is 0, not a count >= 1"),
        (lambda s: s["layout"].update(workers=-2), r"layout\.workers is -2"),
        (lambda s: s.update(_with_handover(s)) or s["handovers"][0].update(shuffle_buffer=0),
         r"handovers\[0\]\.shuffle_buffer is 0"),
        (lambda s: s.update(_with_handover(s)) or s["handovers"][0].update(positions=[[0, -1]] * 3),
         r"handovers\[0\]\.positions holds \[0, -1\]"),
    ],
    ids=["negative offset", "negative epoch", "three numbers", "a string", "not a list", "no shuffle window",
         "negative workers", "handover without a shuffle window", "handover's negative offset"],
)
def test_a_state_with_positions_no_run_saves_is_refused(tmp_path: Path, change, expected: str) -> None:
    # A checkpoint edited or written by another program: a negative offset read other samples than planned
    # without a word, and a shuffle_buffer of 0 stopped the first batch with a ZeroDivisionError traceback
    source = shards_source(tmp_path, 20, 5)
    data = build([source], batch_size=4, workers=1)
    take(data, 1)
    state = data.state_dict()
    change(state)
    with pytest.raises(ValueError, match=r"the data state's " + expected):
        data.load_state_dict(state)
    data.close()


def test_several_sources_with_weights(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m", range(100, 110))
    sources = [
        SourceConfig(kind="manifest", path=str(manifest), name="manifest", weight=2.0),
        SourceConfig(kind="shards", path=write_shards(tmp_path / "s", 12, 5), name="shards", weight=0.5),
    ]
    data = build(sources, batch_size=13)  # one worker: an epoch of 10 * 2 + 12 * 0.5 = 26 samples is 2 batches
    assert data.samples_per_epoch == 26 and data.batches_per_epoch == 2
    batches = take(data, 4)
    first, second = Counter(captions(batches[:2])), Counter(captions(batches[2:]))
    for epoch in (first, second):
        assert all(epoch[caption_of(i)] == 2 for i in range(100, 110))
        assert sum(n for caption, n in epoch.items() if int(caption.split()[1]) < 100) == 6
    shard_captions = {c for c in first + second if int(c.split()[1]) < 100}
    assert shard_captions == {caption_of(i) for i in range(12)}  # the other half in the second epoch
    stats = data.stats()
    assert stats["sources"]["manifest"]["samples"] == 40 and stats["sources"]["shards"]["samples"] == 12
    data.close()


def test_a_weight_that_rounds_a_source_away_is_refused_and_a_skewed_one_said(tmp_path: Path, caplog) -> None:
    # An exact epoch reads round(weight x size) samples of a source: 4 rows at weight 0.1 rounded to none, and
    # the source was silently never read, epoch after epoch (as a weight of 0, which the config refuses)
    big, small = write_manifest(tmp_path / "big", range(40)), write_manifest(tmp_path / "small", range(100, 105))
    mix = [SourceConfig(kind="manifest", path=str(big), name="big"),
           SourceConfig(kind="manifest", path=str(small), name="small", weight=0.05)]
    with pytest.raises(ValueError, match=r"data source small: weight x size = 0.05 x 5 = 0.25 rounds to 0 samples per "
                                         r"epoch, so it would never be read: raise its weight to at least 0.2"):
        build(mix, batch_size=4)
    # The weight it names reads the source (0.1 x 5 = 0.5 rounds, half to even, to 0 again)
    build([mix[0], SourceConfig(kind="manifest", path=str(small), name="small", weight=0.2)], batch_size=4).close()
    # 5 x 0.5 = 2.5 is read as 2 per epoch: said, 20% fewer. 5 x 0.4 = 2 exactly, or draws by weight: nothing said
    with caplog.at_level(logging.WARNING, logger="clip.data"):
        build([mix[0], SourceConfig(kind="manifest", path=str(small), name="small", weight=0.5)], batch_size=4).close()
    assert "data source small: weight x size = 2.5 is read as 2 samples per exact epoch (-20% of what its weight " \
           "asks; data.resampled = true draws by weight)" in caplog.text and "source big" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.data"):
        build([mix[0], SourceConfig(kind="manifest", path=str(small), name="small", weight=0.4)], batch_size=4).close()
        build(mix, batch_size=4, resampled=True, epoch_samples=40).close()
    assert "weight x size" not in caplog.text


def test_rows_left_out_of_a_manifest_are_said_by_rank_0_alone(tmp_path: Path, caplog) -> None:
    # Every rank reads the whole manifest: each of a job's ranks said the same warning
    manifest = write_manifest(tmp_path, range(8))
    manifest.write_text(manifest.read_text() + ",a row without an image\n")
    for rank in (0, 1):
        with caplog.at_level(logging.WARNING, logger="clip.data"):
            build([SourceConfig(kind="manifest", path=str(manifest))], batch_size=2, rank=rank, world_size=2).close()
        said = "1 rows without a usable image path or caption were left out" in caplog.text
        assert said == (rank == 0), rank
        caplog.clear()


def test_a_source_none_of_whose_samples_can_be_used_stops_a_mix(tmp_path: Path) -> None:
    # Its failures were hidden by the other sources' samples: the run went on with a silently changed mix,
    # one warning a minute. Dirty sources that deliver some samples go on.
    good = write_manifest(tmp_path / "good", range(40))
    bad = write_manifest(tmp_path / "bad", range(1000, 1600))
    for image in (tmp_path / "bad" / "images").iterdir():
        image.unlink()
    dirty = write_manifest(tmp_path / "dirty", range(200, 220))
    for i in range(200, 220, 2):
        (tmp_path / "dirty" / "images" / f"{i}.jpg").unlink()
    mixed = [SourceConfig(kind="manifest", path=str(good), name="good"),
             SourceConfig(kind="manifest", path=str(dirty), name="dirty")]
    assert len(take(build(mixed, batch_size=10), 20)) == 20  # 5 epochs, half of "dirty" skipped each
    data = build([*mixed, SourceConfig(kind="manifest", path=str(bad), name="bad")], batch_size=10)
    with pytest.raises(RuntimeError, match=r"source bad: none of its first 1001 samples could be used \(missing_file "
                                           r"1001\), while other sources' samples could -- a manifest's image paths are read "
                                           r"relative to the manifest's own folder"):
        take(data, 400)
    data.close()
    # With more slots each sees its share of the source (150 of its 600 rows an epoch at 4 ranks), and the
    # limit is its own: two epochs of its share, but not fewer than 1000 rows
    data = build([*mixed, SourceConfig(kind="manifest", path=str(bad), name="bad")], batch_size=5, world_size=4)
    with pytest.raises(RuntimeError, match=r"source bad: none of its first 1001 samples could be used"):
        take(data, 400)
    data.close()


def test_resampled_mode_follows_the_weights(tmp_path: Path) -> None:
    sources = [
        SourceConfig(kind="shards", path=write_shards(tmp_path / "a", 20, 5), name="a", weight=3.0),
        SourceConfig(kind="manifest", path=str(write_manifest(tmp_path / "b", range(100, 120))), name="b"),
    ]
    data = build(sources, batch_size=50, resampled=True, epoch_samples=200)
    assert data.samples_per_epoch == 200 and data.batches_per_epoch == 4
    seen = captions(take(data, 16))  # 800 samples
    share_a = data.stats()["sources"]["a"]["samples"] / 800
    assert share_a == pytest.approx(0.75, abs=0.05)
    assert max(Counter(seen).values()) > 2  # drawn with replacement
    data.close()


def test_too_little_data_for_the_workers_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than"):
        build([shards_source(tmp_path, 3, 2)], world_size=2, workers=2)


def test_one_sample_per_worker_is_enough_and_an_epochs_batches_are_rounded_up(tmp_path: Path) -> None:
    # 4 samples for 2 ranks x 2 workers: each slot reads one an epoch
    data = build([shards_source(tmp_path, 4, 2)], batch_size=3, world_size=2, workers=2)
    assert data.samples_per_epoch == 4
    data.close()
    # 10 samples in batches of 4: the third batch holds the last two and the next epoch's first two
    data = build([shards_source(tmp_path / "ten", 10, 5)], batch_size=4)
    assert data.batches_per_epoch == 3
    data.close()


@pytest.mark.parametrize(("rank", "world_size", "batch_size", "expected"), [
    (2, 2, 4, r"rank 2 is not in 0\.\.1"),
    (-1, 2, 4, r"rank -1 is not in 0\.\.1"),
    (0, 1, 0, "batch_size must be positive, got 0"),
])
def test_a_rank_outside_the_world_or_an_empty_batch_is_refused(tmp_path, rank, world_size, batch_size, expected):
    with pytest.raises(ValueError, match=expected):
        build([shards_source(tmp_path, 8, 4)], batch_size=batch_size, rank=rank, world_size=world_size)


def test_a_resume_with_three_workers_starts_the_cycle_at_the_worker_whose_batch_was_due(tmp_path: Path) -> None:
    # With two workers one step forward or back through the cycle lands on the same worker: three tell them apart
    source = shards_source(tmp_path, 30, 4)
    settings = dict(batch_size=2, workers=3, prefetch_factor=1)
    uninterrupted = build([source], **settings)
    expected = captions(take(uninterrupted, 7))
    uninterrupted.close()
    first = build([source], **settings)
    head = captions(take(first, 4))  # worker 1's batch is due next
    state = first.state_dict()
    first.close()
    assert state["next_worker"] == 1
    resumed = build([source], **settings)
    resumed.load_state_dict(state)
    assert head + captions(take(resumed, 3)) == expected
    resumed.close()


def test_rank_reports_merge_into_whole_run_counts(tmp_path: Path) -> None:
    # 40 samples over 2 ranks: 20 per rank per epoch, 4 batches of 5. Rank 0 is one epoch ahead of rank 1;
    # the merged finished epoch is the latest both have finished, with both ranks' counts.
    from clip.data import merge_rank_reports

    source = shards_source(tmp_path, 40, 6, name="s")
    reports = []
    for rank, batches in ((0, 9), (1, 5)):
        data = build([source], batch_size=5, rank=rank, world_size=2)
        take(data, batches)
        reports.append(data.rank_report())
        data.close()
    merged = merge_rank_reports(reports)
    assert merged["ranks"] == 2 and merged["epoch"] == 1
    assert merged["samples"] == merged["sources"]["s"]["samples"] == 70 and merged["batches"] == 9 + 5
    assert merged["finished_epoch"]["epoch"] == 0
    assert merged["finished_epoch"]["sources"]["s"]["samples"] == 40
    assert reports[0]["stats"]["finished_epoch"]["epoch"] == 1  # each rank's own view


@pytest.mark.parametrize("new_world_size", [3, 1])
def test_resuming_on_another_number_of_ranks_keeps_the_run_totals(tmp_path: Path, new_world_size: int) -> None:
    from clip.data import data_state_for_other_world_size, merge_rank_reports

    source = shards_source(tmp_path, 40, 6, name="s")
    saved = []
    for rank in range(2):
        data = build([source], batch_size=5, rank=rank, world_size=2)
        take(data, 6)  # one epoch (4 batches) and half of the next
        saved.append(data.state_dict())
        data.close()
    reports = []
    for rank in range(new_world_size):
        data = build([source], batch_size=5, rank=rank, world_size=new_world_size)
        data.load_state_dict(data_state_for_other_world_size(saved, rank))
        reports.append(data.rank_report())
        data.close()
    merged = merge_rank_reports(reports)
    assert merged["samples"] == 2 * 6 * 5 and merged["batches"] == 12  # not multiplied by the ranks
    # rank 0 takes the saved ranks' sums and the others start at none: a copy of rank 0's on each would multiply
    # the epochs they finished in the merged counts
    assert all(report["stats"]["samples"] == report["stats"]["batches"] == 0 and not report["finished_epochs"]
               for report in reports[1:])
    # only epoch 1 is still in progress: epoch 0, finished by both, is not reopened (it would never finish again)
    assert [epoch for epoch, _ in data_state_for_other_world_size(saved, 0)["open_epochs"]] == [1]
    # epoch 0, which both saved ranks had finished, stays finished on rank 0 with both ranks' counts
    assert reports[0]["finished_epochs"][0]["s"]["samples"] == 40
    if new_world_size == 1:
        assert merged["finished_epoch"] == {"epoch": 0, "sources": {"s": {"samples": 40, "skipped": {},
                                                                          "repaired": {}}}}


def test_merged_skips_and_repairs_are_summed_over_ranks() -> None:
    from clip.data import merge_rank_reports

    def report(skipped: dict, repaired: dict) -> dict:  # a rank_report() with one source, in epoch 1
        counts = {"samples": 10, "skipped": skipped, "repaired": repaired}
        stats = {"epoch": 1, "batches": 2, "samples": 10, "skipped": sum(skipped.values()), "sources": {"s": counts},
                 "finished_epoch": {"epoch": 0, "sources": {"s": counts}}}
        return {"stats": stats, "finished_epochs": {0: {"s": counts}}}

    merged = merge_rank_reports([report({"bad_image": 1}, {}),
                                 report({"bad_image": 2, "missing_file": 1}, {"exif_rotated": 1})])
    whole = {"samples": 20, "skipped": {"bad_image": 3, "missing_file": 1}, "repaired": {"exif_rotated": 1}}
    assert merged["skipped"] == 4
    assert merged["sources"] == {"s": whole}
    assert merged["finished_epoch"] == {"epoch": 0, "sources": {"s": whole}}
    # every rank reads the same manifests, so the rows they leave out are rank 0's, not a sum
    reports = [report({}, {}), report({}, {})]
    for rank_report in reports:
        rank_report["stats"]["manifest_rows_dropped"] = {"s": {"no_caption": 2}}
    assert merge_rank_reports(reports)["manifest_rows_dropped"] == {"s": {"no_caption": 2}}


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_a_dataset_moved_to_another_folder_still_resumes_exactly(tmp_path: Path, kind: str) -> None:
    import shutil

    if kind == "manifest":
        write_manifest(tmp_path / "old", range(20))
        config = lambda folder: SourceConfig(kind="manifest", path=str(folder / "train.csv"))  # noqa: E731
    else:
        write_shards(tmp_path / "old", 20, 5)
        config = lambda folder: SourceConfig(kind="shards", path=str(folder / "s-{000000..000003}.tar"))  # noqa: E731
    expected = take(build([config(tmp_path / "old")], batch_size=4), 4)
    first = build([config(tmp_path / "old")], batch_size=4)
    head = take(first, 2)
    state = first.state_dict()
    shutil.move(tmp_path / "old", tmp_path / "new")
    resumed = build([config(tmp_path / "new")], batch_size=4)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["positions"] == state["positions"]  # not restarted
    assert captions(head + take(resumed, 2)) == captions(expected)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers keep torch's signal handling here")
@pytest.mark.parametrize("default_start_method", ["fork", "spawn"])  # Python 3.14's default is forkserver
def test_workers_outlive_a_schedulers_signals_and_stop_on_close(tmp_path: Path, default_start_method: str) -> None:
    # SLURM's pre-emption signals every process of the job: a worker that died of it would make torch raise
    # "DataLoader worker killed" in the trainer, in the middle of the checkpoint save the signal asked for.
    # Whatever the process-wide start method, the training workers are forked (a spawned one has threads
    # that take the signal before it can be shielded).
    import multiprocessing

    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(default_start_method, force=True)
    try:
        check_workers_outlive_signals(tmp_path)
    finally:
        multiprocessing.set_start_method(previous, force=True)


def check_workers_outlive_signals(tmp_path: Path) -> None:
    data = build([shards_source(tmp_path, 40, 6)], batch_size=4, workers=2)
    batches = iter(data)
    next(batches)
    workers = list(data._loader_iterator._workers)  # torch's worker processes
    for worker in workers:
        for name in ("TERM", "INT", "USR1"):  # sent by another process, as a scheduler's are
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    time.sleep(0.5)
    for _ in range(8):  # two epochs: both workers keep serving
        next(batches)
    assert all(worker.is_alive() for worker in workers)
    data.close()
    for worker in workers:
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in workers)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers keep torch's signal handling here")
@pytest.mark.parametrize("loader", ["training", "evaluation"])
def test_a_signal_while_workers_start_is_acted_on_once_the_iterator_is_whole(
    tmp_path: Path, monkeypatch, loader: str
) -> None:
    # The trainer's handler raises to abandon the start of a run (iter(data) is part of it) or an evaluation.
    # Raised inside torch's iterator constructor, it left a started worker running outside the iterator's list,
    # and the iterator's __del__ printed "AttributeError: ... '_workers_status'" with a traceback.
    import gc
    import os
    import sys

    from clip.data import worker_signals
    from clip.evaluation.features import make_loader
    from clip.stopping import EvaluationInterrupted, SetupInterrupted, StopRequest

    started, unraisable = [], []
    start = worker_signals.ForkWithJobSignalsHeld.Process.start

    def start_then_signal(process) -> None:
        start(process)
        started.append(process)
        if len(started) == 2:  # one worker in the iterator's list, the other started
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(worker_signals.ForkWithJobSignalsHeld.Process, "start", start_then_signal)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    if loader == "training":
        data, abandoned = build([shards_source(tmp_path, 40, 6)], batch_size=4, workers=2), SetupInterrupted
    else:
        dataset = torch.utils.data.TensorDataset(torch.zeros(8))
        data, abandoned = make_loader(dataset, batch_size=2, workers=2, device="cpu"), EvaluationInterrupted
    with StopRequest() as stop, pytest.raises(abandoned), stop.interrupting(abandoned):
        iter(data)
    if loader == "training":
        data.close()
    gc.collect()
    for process in started:
        process.join(timeout=10)
    assert len(started) == 2 and not any(process.is_alive() for process in started)
    assert unraisable == []


def test_workers_hand_over_uint8_pixels_the_normalizer_turns_into_clip_input(tmp_path: Path) -> None:
    # A quarter of a float batch's bytes through shared memory and the host-to-device copy; the trainer
    # normalises on its device. The workers' shared-memory batches hold the same pixels as the main process's.
    source = SourceConfig(kind="manifest", path=str(write_manifest(tmp_path / "m", range(8))))
    pixels_by_caption = {}
    for workers in (0, 2):
        data = build([source], batch_size=4, workers=workers)
        one_epoch = take(data, 2)
        data.close()
        for images, texts in one_epoch:
            assert images.dtype == torch.uint8 and images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
        pixels_by_caption[workers] = {c: images[i] for images, texts in one_epoch for i, c in enumerate(texts)}
    assert pixels_by_caption[0].keys() == pixels_by_caption[2].keys() == {caption_of(i) for i in range(8)}
    assert all(torch.equal(pixels_by_caption[0][c], pixels_by_caption[2][c]) for c in pixels_by_caption[0])
    images = torch.stack(list(pixels_by_caption[2].values()))
    assert images.float().std() > 10  # real pixel values, not a zero-filled buffer
    normalized = PixelNormalizer("cpu")(images)
    assert normalized.dtype == torch.float32 and -2.0 < normalized.min() < normalized.max() < 2.7


@pytest.mark.parametrize(("augment", "varies"), [(False, False), ("random_square_crop", True), (True, True)])
def test_random_crops_differ_between_epochs_and_the_center_crop_does_not(tmp_path: Path, augment, varies) -> None:
    # 24x20 images: the paper's square crop can sit at 5 places along the width.
    source = SourceConfig(kind="manifest", path=str(write_manifest(tmp_path / "m", range(8))))
    data = build([source], batch_size=4, augment=augment)
    epochs = [take(data, 2), take(data, 2)]  # take() iterates afresh: the second call reads the next epoch
    data.close()
    pixels = [{c: images[i] for images, texts in epoch for i, c in enumerate(texts)} for epoch in epochs]
    assert pixels[0].keys() == pixels[1].keys()
    differing = sum(not torch.equal(pixels[0][c], pixels[1][c]) for c in pixels[0])
    assert (differing >= 4) if varies else (differing == 0)


@pytest.mark.parametrize("augment", ["random_square_crop", True])
def test_random_crops_differ_between_the_samples_of_one_batch(tmp_path: Path, augment) -> None:
    # Eight rows of one image: with the sample's index left out of the crop's seed, every sample that a worker
    # reads in an epoch got the same crop box, and the batch held eight copies of one crop
    manifest = write_manifest(tmp_path / "m", range(1))
    manifest.write_text("image,caption\n" + "".join(f"images/0.jpg,{caption_of(i)}\n" for i in range(8)))
    data = build([SourceConfig(kind="manifest", path=str(manifest))], batch_size=8, augment=augment)
    images, _ = take(data, 1)[0]
    data.close()
    assert len({images[i].numpy().tobytes() for i in range(8)}) >= 3  # 5 places along the width, or more


def test_a_signal_met_by_the_held_handler_after_the_block_goes_to_the_handler_it_held_for():
    # Put back one signal at a time: one whose handler raised while the other was not yet put back left that
    # other with the noting handler for good, its signals noted and never acted on
    from clip.data.worker_signals import job_signals_held

    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with job_signals_held():
            holding = signal.getsignal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            assert received == []  # noted
        assert received == [signal.SIGTERM]  # acted on once the block ended
        holding(signal.SIGINT, None)  # as if it arrived before SIGINT's handler was put back
        assert received == [signal.SIGTERM, signal.SIGINT]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_signal_left_with_the_held_handler_after_the_block_takes_its_default_action():
    # Passed on to SIG_DFL with the noting handler still in place, raise_signal met that handler again, and again:
    # a RecursionError where SIGTERM should have ended the process. In a process of its own, which it ends.
    code = (
        "import signal\n"
        "from clip.data.worker_signals import job_signals_held\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with job_signals_held():\n"
        "    holding = signal.getsignal(signal.SIGTERM)\n"
        "signal.signal(signal.SIGTERM, holding)  # as if its handler had not been put back yet\n"
        "holding(signal.SIGTERM, None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM, result.stderr[-500:]


def test_a_signal_whose_handler_was_installed_outside_python_is_left_alone(monkeypatch):
    # Where a program embedding Python installed SIGTERM's handler in C, Python sees it as None: replaced by the
    # noting handler, it could not be put back (signal.signal(SIGTERM, None) is a TypeError as the block ends).
    # Faked here: getsignal and the previous handler signal.signal returns are None for SIGTERM.
    from clip.data.worker_signals import job_signals_held

    real_signal, real_getsignal = signal.signal, signal.getsignal
    before = {sig: real_getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def signal_from_outside(sig, handler):
        previous = real_signal(sig, handler)
        return None if sig == signal.SIGTERM else previous

    monkeypatch.setattr(signal, "getsignal", lambda sig: None if sig == signal.SIGTERM else real_getsignal(sig))
    monkeypatch.setattr(signal, "signal", signal_from_outside)
    try:
        with job_signals_held():
            assert real_getsignal(signal.SIGTERM) is before[signal.SIGTERM]  # not taken over
            assert real_getsignal(signal.SIGINT) is not before[signal.SIGINT]  # held as usual
    finally:
        for sig, handler in before.items():
            real_signal(sig, handler)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's dispositions from /proc")
def test_a_signal_ignored_before_the_block_stays_ignored_for_a_process_started_inside_it():
    # A data worker ignores SIGINT and SIGUSR1: its pipe: commands, started inside the block, inherited them
    # ignored until the block put a handler in their place, which their exec resets to the default action (a
    # job's SIGINT then killed a command before its shell's trap)
    from clip.data.worker_signals import job_signals_held

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with job_signals_held():
            status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
    finally:
        signal.signal(signal.SIGINT, previous)
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1))


def test_signals_are_not_held_outside_the_main_thread_and_the_block_still_runs():
    # Python signal handlers can only be installed from the main thread (a ValueError elsewhere), and they run
    # there only: an evaluation's loader built in another thread has no handler to hold
    import threading

    from clip.data.worker_signals import job_signals_held

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ran, errors = [], []

    def build_a_loader():
        try:
            with job_signals_held():
                ran.append(True)
        except Exception as error:  # noqa: BLE001 -- reported to the test's thread
            errors.append(error)

    thread = threading.Thread(target=build_a_loader)
    thread.start()
    thread.join(timeout=30)
    assert errors == [] and ran == [True]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _shielded_until_told(ready) -> None:
    # As a freshly started process would have them, whatever the test process installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from clip.data.worker_signals import shield_worker_from_job_signals

    shield_worker_from_job_signals(0)
    ready.send(True)
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers keep torch's signal handling here")
def test_a_shielded_worker_ignores_signals_from_outside_and_exits_at_its_parents_sigterm():
    # The shield on its own, in a plainly forked process (no signals held since the fork): a scheduler's SIGTERM
    # and SIGINT leave it running; its parent's SIGTERM (torch's shutdown of a worker that does not stop in
    # time) ends it at once, with status 0 as torch's own worker handler would
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    worker = context.Process(target=_shielded_until_told, args=(sending,))
    worker.start()
    try:
        assert receiving.poll(30) and receiving.recv()
        for name in ("TERM", "INT", "USR1"):  # sent by another process, as a scheduler's are
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
        worker.join(timeout=0.5)
        assert worker.is_alive(), f"the worker ended with status {worker.exitcode}"
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=10)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()


def test_dirty_data_with_long_runs_of_bad_rows_between_usable_ones_goes_on(tmp_path: Path) -> None:
    # One usable row in 1200 (the rest name missing files): a run of skips between two uses is up to two
    # passes long, which is dirty data, not unusable data. Neither the early limit for data of which nothing
    # could be used yet (1000 rows) nor a count of misses that is not reset by a use may stop it.
    manifest = write_manifest(tmp_path, range(1))
    rows = manifest.read_text() + "".join(f"images/missing-{i}.jpg,row {i}\n" for i in range(1199))
    manifest.write_text(rows)
    data = build([SourceConfig(kind="manifest", path=str(manifest))], batch_size=1)
    try:
        assert [texts for _, texts in take(data, 4)] == [[caption_of(0)]] * 4
    finally:
        data.close()


def byte_tokenizing_builder(context_length: int):
    """A worker's batch builder with only what its `_tokenize` reads: the context length and a byte tokenizer."""
    from types import SimpleNamespace

    from test_data_helpers import ByteTokenizer

    from clip.data.stream import _BatchBuilder

    builder = object.__new__(_BatchBuilder)
    builder.settings = SimpleNamespace(context_length=context_length)
    builder.stream = SimpleNamespace(tokenizer=ByteTokenizer())
    return builder


def test_only_a_caption_longer_than_the_context_is_counted_as_cut() -> None:
    # A caption that fills the context exactly (its end token in the last slot) is whole, not caption_truncated
    builder = byte_tokenizing_builder(context_length=24)
    meta: dict = {"counts": {}}
    texts = ["a" * 22, "b" * 23, "c"]  # 24 tokens with the start and end tokens, 25, 3
    tokens = builder._tokenize(texts, [(0, "src"), (0, "src"), (1, "src")], meta)
    assert tokens.shape == (3, 24)
    assert meta["counts"] == {0: {"src": {"samples": 0, "skipped": {}, "repaired": {"caption_truncated": 1}}}}


def test_a_rank_keeps_the_counts_of_its_last_few_finished_epochs() -> None:
    # merge_rank_reports needs the epochs every rank has finished, ranks a batch or so apart: the latest few
    # are kept, the older ones dropped, and the latest is the rank's `finished_epoch`
    from clip.data.epoch_counts import EpochCounts

    counts = EpochCounts(["s"])
    for epoch in range(6):
        counts.add({epoch: {"s": {"samples": 10 + epoch, "skipped": {}, "repaired": {}}}})
        counts.finish(epoch)
    assert sorted(counts.finished) == [2, 3, 4, 5]
    assert counts.latest_finished() == {"epoch": 5, "sources": {"s": {"samples": 15, "skipped": {}, "repaired": {}}}}
    assert counts.total["s"]["samples"] == sum(range(10, 16)) and counts.open == {}


def test_a_reopened_epoch_is_open_again_and_no_longer_finished() -> None:
    # Left in the finished epochs too, a reopened epoch would be reported finished with partial counts, and a
    # resume under another world size (which sums open and finished epochs) would count it twice
    from clip.data.epoch_counts import EpochCounts

    counts = EpochCounts(["s"])
    for epoch in range(3):
        counts.add({epoch: {"s": {"samples": 10, "skipped": {}, "repaired": {"cmyk": 1}}}})
        counts.finish(epoch)
    counts.reopen(1)
    assert sorted(counts.finished) == [0] and sorted(counts.open) == [1, 2]
    assert counts.open[2] == {"s": {"samples": 10, "skipped": {}, "repaired": {"cmyk": 1}}}
    assert counts.latest_finished()["epoch"] == 0
    assert [epoch for epoch, _ in counts.state_dict()["finished_epochs"]] == [0]
    # an epoch this rank read nothing of (as after a resume on more ranks) finishes with zero counts per source
    assert counts.finish(7) == {"s": {"samples": 0, "skipped": {}, "repaired": {}}}


def test_a_resume_continues_the_counts_of_the_finished_and_open_epochs(tmp_path: Path) -> None:
    source = shards_source(tmp_path, 40, 6, name="s")
    data = build([source], batch_size=5)
    take(data, 10)  # 50 samples: epoch 0 finished, epoch 1 open
    state, report = data.state_dict(), data.rank_report()
    data.close()
    assert report["stats"]["finished_epoch"]["epoch"] == 0 and state["open_epochs"][0][0] == 1
    # a source the run no longer reads: its counts are left out
    state["counts"]["gone"] = {"samples": 3, "skipped": {}, "repaired": {}}
    resumed = build([source], batch_size=5)
    resumed.load_state_dict(state)
    assert resumed.rank_report() == report
    assert resumed.state_dict() == {**state, "counts": report["stats"]["sources"]}


def test_renamed_sources_resume_exactly_and_keep_their_counts(tmp_path: Path, caplog) -> None:
    # A source's name labels its counts and logs; renaming one between a run and its resume restarted the epoch
    # in progress ("other samples are planned") and dropped the whole run's counts kept under the old name
    def sources(first: str, second: str) -> list[SourceConfig]:
        return [shards_source(tmp_path / "a", 20, 5, name=first), shards_source(tmp_path / "b", 12, 4, name=second)]

    expected = take(build(sources("a", "b"), batch_size=4), 6)
    first = build(sources("a", "b"), batch_size=4)
    head = take(first, 3)
    state = first.state_dict()
    first.close()
    resumed = build(sources("b", "web"), batch_size=4)  # "a" now "b", "b" now "web": no mix-up
    with caplog.at_level(logging.INFO):
        resumed.load_state_dict(state)
    assert "sources renamed since the checkpoint (a -> b, b -> web): their position and counts carry over" in caplog.text
    assert "restarting" not in caplog.text
    assert resumed.state_dict()["positions"] == state["positions"]
    assert resumed.stats()["sources"] == {"b": state["counts"]["a"], "web": state["counts"]["b"]}
    assert captions(head + take(resumed, 3)) == captions(expected)
    resumed.close()


@pytest.mark.parametrize("augment", ["random_square_crop", True])
def test_random_crops_differ_between_workers_and_ranks(tmp_path: Path, augment) -> None:
    # Every row the same image: a crop seed without the worker or the rank gave the n-th sample of every worker
    # of every rank the same box, so their batches held the same crops
    manifest = write_manifest(tmp_path / "m", range(1))
    manifest.write_text("image,caption\n" + "".join(f"images/0.jpg,{caption_of(i)}\n" for i in range(16)))
    batches = []
    for rank in range(2):
        data = build([SourceConfig(kind="manifest", path=str(manifest))], batch_size=4, rank=rank, world_size=2,
                     workers=2, augment=augment)
        batches += [images for images, _ in take(data, 2)]  # one batch of each worker
        data.close()
    assert len({images.numpy().tobytes() for images in batches}) == 4


def test_jpeg_draft_false_decodes_jpegs_at_full_size(tmp_path: Path) -> None:
    # A 128x96 JPEG for 16-pixel crops may be decoded at 1/4 scale with jpeg_draft; without, it must not be
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "big.jpg").write_bytes(image_bytes(0, size=(128, 96)))
    (tmp_path / "train.csv").write_text("image,caption\nimages/big.jpg,big\n")
    source = SourceConfig(kind="manifest", path=str(tmp_path / "train.csv"))
    pixels = {}
    for draft in (True, False):
        data = build([source], batch_size=1, jpeg_draft=draft)
        pixels[draft] = take(data, 1)[0][0]
        data.close()
    assert not torch.equal(pixels[True], pixels[False])


def test_a_restart_under_another_seed_goes_back_to_the_earliest_epoch_in_progress(tmp_path: Path, caplog) -> None:
    # Saved with one worker already in the next epoch: the restart must begin the epoch the other was still in,
    # or that worker's unread rest of it would never be read
    source = shards_source(tmp_path, 20, 5)
    state = build([source], batch_size=4, workers=2).state_dict()
    state["positions"] = [[1, 3], [2, 2]]  # the 2 read of epoch 2 are not read again: the restart is at epoch 1
    reseeded = build([source], batch_size=4, workers=2, seed=1)
    with caplog.at_level(logging.WARNING):
        reseeded.load_state_dict(state)
    assert reseeded.state_dict()["positions"] == [[1, 0], [1, 0]]
    assert "restarting epoch 1 from its beginning: at least 3 samples of it" in caplog.text


def test_a_data_epoch_is_finished_only_once_every_worker_has_left_it(tmp_path: Path) -> None:
    # 10 samples per worker an epoch in batches of 4: after 5 batches worker 0 has read 12 (into epoch 1), worker 1 8
    data = build([shards_source(tmp_path, 20, 5)], batch_size=4, workers=2)
    take(data, 5)
    stats = data.stats()
    data.close()
    assert sorted(epoch for epoch, _ in data.state_dict()["positions"]) == [0, 1]
    assert stats["epoch"] == 0 and stats["finished_epoch"] is None


def test_each_data_summary_counts_since_the_previous_one_or_the_resume(tmp_path: Path) -> None:
    # 20 samples, one worker, batches of 4: five batches are exactly data epoch 0
    source = shards_source(tmp_path, 20, 5, name="s")
    data = build([source], batch_size=4)
    take(data, 5)
    assert data.summary_since_previous() == "data rank 0, epoch 0-1: s: 20 samples"
    take(data, 2)  # the mark must be a copy of the counts, or this summary would count nothing
    assert data.summary_since_previous() == "data rank 0, epoch 1: s: 8 samples"
    state = data.state_dict()
    data.close()
    # After a resume the next summary counts from the resumed position, in its epoch
    resumed = build([source], batch_size=4)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert resumed.summary_since_previous() == "data rank 0, epoch 1: s: 4 samples"
    resumed.close()


def test_stats_and_rank_reports_are_copies_a_caller_may_change(tmp_path: Path) -> None:
    # The trainer sums and logs them; a change made there must not reach the rank's own counts
    data = build([shards_source(tmp_path, 20, 5, name="s")], batch_size=4)
    take(data, 6)  # epoch 0 finished, epoch 1 open
    stats, report = data.stats(), data.rank_report()
    stats["sources"]["s"]["samples"] += 100
    report["finished_epochs"][0]["s"]["skipped"]["missing_file"] = 1
    assert data.stats()["sources"]["s"] == {"samples": 24, "skipped": {}, "repaired": {}}
    assert data.rank_report()["finished_epochs"][0]["s"] == {"samples": 20, "skipped": {}, "repaired": {}}
    data.close()


def test_a_batch_from_a_worker_out_of_turn_is_warned_about_once(tmp_path: Path, caplog) -> None:
    # torch hands batches over strictly in worker order; should that ever change, one line says so, not one a batch
    data = build([shards_source(tmp_path, 20, 5)], batch_size=4, workers=2)
    with caplog.at_level(logging.WARNING, logger="clip.data"):
        for _ in range(3):
            data._record({"worker": 1, "position": (0, 4), "counts": {}})
            data._record({"worker": 1, "position": (0, 8), "counts": {}})
    assert caplog.text.count("a resume may reorder batches") == 1


def test_a_finished_data_epoch_is_said_at_info_by_rank_0_alone(tmp_path: Path, caplog) -> None:
    source = shards_source(tmp_path, 20, 5, name="s")
    for rank in range(2):
        data = build([source], batch_size=5, rank=rank, world_size=2)
        with caplog.at_level(logging.INFO, logger="clip.data"):
            take(data, 2)  # this rank's 10 samples of epoch 0
        data.close()
        said = f"data rank {rank}, epoch 0 done: s: 10 samples" in caplog.text
        assert said == (rank == 0), rank
        caplog.clear()


def test_a_large_sources_own_limit_is_two_epochs_of_its_share_when_that_is_over_1000_rows(tmp_path: Path) -> None:
    # A source of 901 missing rows beside shards of 100 samples (whose size lifts the other limits to 2000), on
    # two ranks: each reads ceil(901 / 2) = 451 of its rows an epoch, and its limit is two such epochs plus 100
    good = shards_source(tmp_path / "good", 100, 100, name="good")
    manifest = write_manifest(tmp_path / "bad", range(1))
    manifest.write_text("image,caption\n" + "".join(f"images/missing-{i}.jpg,row {i}\n" for i in range(901)))
    data = build([good, SourceConfig(kind="manifest", path=str(manifest), name="bad")], batch_size=10,
                 world_size=2)
    with pytest.raises(RuntimeError, match=r"source bad: none of its first 1003 samples could be used \(missing_file "
                                           r"1003\), while other sources' samples could"):
        take(data, 100)
    data.close()


def test_several_sources_none_of_which_could_be_used_are_not_blamed_one_by_one(tmp_path: Path) -> None:
    # A missing shard of 1000 samples (read 50 an epoch: weight 0.05) and a manifest of 450 rows that name no
    # file: nothing could be used, so it is the data's limit (two of the largest shard, plus 100: 2100) that
    # speaks, not the manifest's own limit (1000), which would say that the other sources' samples could be used
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "sizes.json").write_text('{"s-000000.tar": 1000}')
    shards = SourceConfig(kind="shards", path=str(tmp_path / "shards" / "s-000000.tar"), name="shards", weight=0.05)
    manifest = write_manifest(tmp_path / "rows", range(1))
    manifest.write_text("image,caption\n" + "".join(f"images/missing-{i}.jpg,row {i}\n" for i in range(450)))
    data = build([shards, SourceConfig(kind="manifest", path=str(manifest), name="rows")], batch_size=4)
    with pytest.raises(RuntimeError, match=r"none of the first 2101 samples could be used \(missing_file \d+, "
                                           r"missing_shard \d+\)"):
        take(data, 1)
    data.close()


def test_a_cut_caption_is_counted_for_its_own_samples_epoch_and_source() -> None:
    builder = byte_tokenizing_builder(context_length=24)
    meta: dict = {"counts": {}}
    builder._tokenize(["a", "c" * 30, "b" * 23], [(0, "short"), (1, "long"), (1, "longer")], meta)
    cut = {"samples": 0, "skipped": {}, "repaired": {"caption_truncated": 1}}
    assert meta["counts"] == {1: {"long": cut, "longer": cut}}


def test_data_that_becomes_unusable_mid_run_stops_after_two_passes_of_failures_in_a_row(tmp_path: Path) -> None:
    # Images gone after the first batch (a storage mount lost, say): every sample has been used before, so
    # neither the limit for data none of which was used nor a source's own limit applies. The run stops after
    # more failures in a row than two passes over the 10 rows, plus 100: 121.
    manifest = write_manifest(tmp_path, range(10))
    data = build([SourceConfig(kind="manifest", path=str(manifest))], batch_size=2)
    batches = iter(data)
    next(batches)
    for image in (tmp_path / "images").iterdir():
        image.unlink()
    with pytest.raises(RuntimeError, match=r"^data rank 0 worker 0: 121 samples in a row could not be used \(more "
                                           r"than two passes over all the data; missing_file 121\) -- a manifest's"):
        next(batches)
    data.close()


@pytest.mark.parametrize("weight, epoch", [(1e308, "inf"), (1e15, "6.4e+16")])
def test_an_epoch_too_large_to_plan_is_refused_naming_its_sources(weight: float, epoch: str) -> None:
    # weight x size = inf failed with "OverflowError: cannot convert float infinity to integer" and a traceback,
    # and 1e15 x 64 samples were planned for ever, without a word
    source = SourceConfig(kind="synthetic", num_samples=64, name="shapes", weight=weight)
    with pytest.raises(ValueError) as refused:
        build([source], batch_size=4)
    assert str(refused.value).startswith(
        f"an epoch of {epoch} samples (weight x size summed over the sources; shapes: {weight:g} x 64) is too large: "
        "each of the 1 data workers over all ranks plans its share of an epoch, at most 4294967296 samples (2**32). "
        "Lower the weights"), str(refused.value)
    # Each worker plans its own share: more of them is a way out, except from an endless epoch
    assert ("more data workers (data.workers = 0 per rank)" in str(refused.value)) == (epoch != "inf")



def test_an_epoch_smaller_than_the_data_workers_names_what_sets_its_size() -> None:
    shapes = SourceConfig(kind="synthetic", num_samples=3)
    with pytest.raises(ValueError, match=re.escape("an epoch plans 3 samples (sum of weight x size over the sources), "
                                                   "fewer than the 4 data workers over all ranks (1 ranks x 4): add "
                                                   "data or lower data.workers")):
        build([shapes], batch_size=4, workers=4)
    # resampled, data.epoch_samples sets it: more data changed nothing, as that error said it would
    many = SourceConfig(kind="synthetic", num_samples=64)
    with pytest.raises(ValueError, match=re.escape("an epoch plans 3 samples (data.epoch_samples), fewer than the 4 data "
                                                   "workers over all ranks (1 ranks x 4): raise data.epoch_samples or "
                                                   "lower data.workers")):
        build([many], batch_size=4, workers=4, resampled=True, epoch_samples=3)

def test_a_resampled_epoch_too_large_to_plan_is_refused() -> None:
    # A resampled epoch is data.epoch_samples long, whatever the weights: their ratios alone are read
    shapes = SourceConfig(kind="synthetic", num_samples=64, weight=1e15)
    build([shapes], batch_size=4, resampled=True, epoch_samples=64).close()
    with pytest.raises(ValueError, match=re.escape("an epoch of 1e+18 samples (data.epoch_samples; 0:synthetic: ")) \
            as refused:
        build([shapes], batch_size=4, resampled=True, epoch_samples=10**18)
    # The weights only share data.epoch_samples out: lowering them, as the error said, changed nothing
    assert "(2**32). Lower data.epoch_samples, or share the epoch among more data workers" in str(refused.value)
    # ... which an infinite sum has none of
    endless = SourceConfig(kind="synthetic", num_samples=64, weight=1e308)
    with pytest.raises(ValueError, match=re.escape("an epoch of inf samples (weight x size summed over the sources")):
        build([endless], batch_size=4, resampled=True, epoch_samples=64)
