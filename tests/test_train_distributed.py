"""The training loop under two gloo processes (as torchrun would start them): DDP, the distributed loss,
per-rank data positions in checkpoints, and a resumed distributed run that matches an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from clip import checkpoint as ckpt
from clip.train import train

from multiprocess import free_port, spawn_ranks
from test_train_loop import slow_the_loader, tiny_config


def _worker(rank: int, world_size: int, port: int, run_dir: str, stop_at_step, extra) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
         "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
    )
    torch.set_num_threads(1)
    train(tiny_config(Path(run_dir), "train.device=cpu", "train.batch_size=4", *extra), stop_at_step=stop_at_step)


def run_two_ranks(run_dir: Path, stop_at_step=None, extra=()) -> None:
    spawn_ranks(_worker, (2, free_port(), str(run_dir), stop_at_step, list(extra)))


def _signalled_worker(
    rank: int, world_size: int, port: int, run_dir: str, extra, patched: str = "contrastive_step", call: int = 2
) -> None:
    # Only rank 1 is signalled, at its `call`-th call of clip.train's `patched` (by default during its second
    # step, before the forward pass): every rank must still stop after the same step.
    import signal

    import clip.train as train_module

    real = getattr(train_module, patched)
    calls = {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    setattr(train_module, patched, signalling)
    _worker(rank, world_size, port, run_dir, None, extra)


def _signalled_in_evaluation_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # Only rank 1 is signalled, after the first image batch of its first zero-shot evaluation.
    import signal

    import clip.evaluation.zeroshot as zeroshot

    real = zeroshot.encode_image_batches
    sent = {"done": False}

    def signalling(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield batch
            if rank == 1 and not sent["done"]:
                sent["done"] = True
                os.kill(os.getpid(), signal.SIGTERM)

    zeroshot.encode_image_batches = signalling
    _worker(rank, world_size, port, run_dir, None, extra)


def _logging_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # Each rank's warnings, into a file of its own beside the run directory
    import logging

    handler = logging.FileHandler(Path(run_dir).parent / f"rank{rank}.log")
    handler.setLevel(logging.WARNING)
    logging.getLogger("clip").addHandler(handler)
    _worker(rank, world_size, port, run_dir, None, extra)


def _refused_worker(rank: int, world_size: int, port: int, run_dir: str, extra, sabotage: str = "") -> None:
    # What each rank raised, into a file of its own beside the run directory: every rank must raise, none wait.
    # sabotage: "full_disk" (rank 0's saves fail), "unlistable" (rank 0 cannot list the checkpoints) or
    # "full_disk_for_metrics" (rank 0 cannot append to metrics.jsonl)
    from clip import checkpoint, run_log
    from clip.run_lock import RunDirectoryInUse

    if rank == 0 and sabotage == "full_disk_for_metrics":
        def no_space(self, record):
            raise run_log.RunLogWriteError(f"could not write {self.path}: No space left on device (errno 28)")

        run_log.RunLog.write = no_space
        sabotage = ""

    if rank == 0 and sabotage:
        def fail(*args, **kwargs):
            if sabotage == "full_disk":
                raise checkpoint.CheckpointWriteError("could not write: No space left on device (errno 28)")
            raise PermissionError(13, "Permission denied", run_dir)

        setattr(checkpoint, {"full_disk": "save_checkpoint", "unlistable": "list_checkpoints"}[sabotage], fail)
    try:
        _worker(rank, world_size, port, run_dir, None, extra)
    except (RunDirectoryInUse, checkpoint.NoReadableCheckpointError, checkpoint.CheckpointWriteError,
            run_log.RunLogWriteError, PermissionError) as error:
        (Path(run_dir).parent / f"refused{rank}").write_text(f"{type(error).__name__}: {error}")
    # The run's DDP module (which holds the process group) is gone once train() has raised: kept alive by the
    # exception's frames, it was destroyed at interpreter exit, after its process group, where gloo's threads
    # sometimes aborted the process (SIGABRT, "terminate called without an active exception").
    import gc

    from torch.nn.parallel import DistributedDataParallel

    alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
    (Path(run_dir).parent / f"ddp_alive{rank}").write_text(str(len(alive)))


def assert_same_final_weights(straight_dir: Path, resumed_dir: Path, step: int) -> None:
    straight = ckpt.load_latest_checkpoint(straight_dir)
    resumed = ckpt.load_latest_checkpoint(resumed_dir)
    assert straight["step"] == resumed["step"] == step
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_two_ranks_train_checkpoint_and_resume_exactly(tmp_path):
    extra = ["eval.every_n_steps=0", "schedule.steps=4", "checkpoint.every_n_steps=2"]
    run_two_ranks(tmp_path / "straight", extra=extra)
    run_two_ranks(tmp_path / "resumed", stop_at_step=2, extra=extra)
    state = ckpt.load_latest_checkpoint(tmp_path / "resumed")
    assert state["step"] == 2 and len(state["rng"]) == 2 and len(state["data"]) == 2
    assert state["data"][0] != state["data"][1]  # each rank records its own position
    run_two_ranks(tmp_path / "resumed", extra=extra)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed", step=4)
    # Each rank went on from its own generators and data position. The weights alone would not tell a rank
    # that resumed from rank 0's: this run draws no random numbers while it trains (no patch dropout), and
    # rank 0's state (which lists every rank's position) leads rank 1 to the same samples, but through a
    # needless layout handover that its later states carry (one more per resume, until the handovers run
    # out and an epoch restarts). The states each rank saved at the end tell.
    straight, resumed = (ckpt.load_latest_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert resumed["data"] == straight["data"]
    # torch's generator (python's and numpy's are not seeded: the run does not draw from them)
    assert len(resumed["rng"]) == 2 and not torch.equal(straight["rng"][0]["torch"], straight["rng"][1]["torch"])
    for before, after in zip(straight["rng"], resumed["rng"]):
        assert torch.equal(before["torch"], after["torch"])
    assert (tmp_path / "straight" / "results.json").exists()
    # metrics.jsonl (written by rank 0) counts both ranks' samples: 4 steps x 2 ranks x 4
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    last = [r["data"] for r in records if "data" in r][-1]
    assert last["ranks"] == 2 and last["samples"] == 32


def test_a_one_rank_checkpoint_resumed_on_two_ranks_counts_its_samples_once(tmp_path):
    # Under another rank count, rank 0 carries on the saved ranks' sample counts and the others start from
    # none: a rank that took rank 0's state as its own counted the samples read before the resume again.
    extra = ["eval.every_n_steps=0", "schedule.steps=4", "checkpoint.every_n_steps=2"]
    train(tiny_config(tmp_path, "train.device=cpu", *extra), stop_at_step=2)  # 2 steps x 8 on one rank
    run_two_ranks(tmp_path, extra=extra)  # then 2 steps x 2 ranks x 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    last = [r["data"] for r in records if "data" in r][-1]
    assert last["ranks"] == 2 and last["samples"] == 16 + 16
    state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["step"] == 4 and [rank["counts"]["0:synthetic"]["samples"] for rank in state["data"]] == [24, 8]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    extra = ["eval.every_n_steps=0", "schedule.steps=4", "checkpoint.every_n_steps=0"]
    run_two_ranks(tmp_path / "straight", extra=extra)
    spawn_ranks(_signalled_worker, (2, free_port(), str(tmp_path / "resumed"), extra))
    state = ckpt.load_latest_checkpoint(tmp_path / "resumed")
    assert state["step"] == 2 and len(state["data"]) == 2  # saved by both ranks together, after step 2
    assert not (tmp_path / "resumed" / "results.json").exists()
    run_two_ranks(tmp_path / "resumed", extra=extra)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed", step=4)


def _signalled_in_rank_0s_own_setup_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # A scheduler's SIGTERM to every rank while rank 0 does its own part of the start (its run record) and rank 1
    # has begun its first step: rank 1 leaves its pid as it does; rank 0, recording the run's start, waits for it
    # and signals both.
    import signal
    import time

    import clip.train as train_module

    marker = Path(run_dir).parent / "rank_1_stepping"
    if rank == 0:
        real_record = train_module.record_run_start

        def signalled(*args, **kwargs):
            while not marker.exists():
                time.sleep(0.01)
            os.kill(int(marker.read_text()), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            return real_record(*args, **kwargs)

        train_module.record_run_start = signalled
    else:
        real_step = train_module.contrastive_step

        def stepping(*args, **kwargs):
            marker.write_text(str(os.getpid()))
            return real_step(*args, **kwargs)

        train_module.contrastive_step = stepping
    _worker(rank, world_size, port, run_dir, None, extra)


def test_a_signal_to_every_rank_in_rank_0s_own_part_of_the_start_stops_them_together(tmp_path):
    # Rank 0 abandoned its start (status 75) while rank 1 went on into the first step and failed in its collective
    # (status 1, no checkpoint): the ranks now take the first step and stop after it together, with a checkpoint
    extra = ["eval.every_n_steps=0", "schedule.steps=4", "checkpoint.every_n_steps=0"]
    spawn_ranks(_signalled_in_rank_0s_own_setup_worker, (2, free_port(), str(tmp_path / "run"), extra))
    state = ckpt.load_latest_checkpoint(tmp_path / "run")
    assert state["step"] == 1 and len(state["data"]) == 2
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_signal_to_one_rank_at_a_step_whose_verdict_waits_stops_every_rank_after_the_next_step(tmp_path):
    # No step logs before the last: step 2's verdict, with rank 1's stop in it, is read by both ranks once step 3
    # is launched (clip.step_verdict). Both stop after step 3 and save it together; resumed, the run ends as a
    # straight one does.
    extra = ["eval.every_n_steps=0", "schedule.steps=5", "checkpoint.every_n_steps=0", "logging.every_n_steps=10"]
    run_two_ranks(tmp_path / "straight", extra=extra)
    spawn_ranks(_signalled_worker, (2, free_port(), str(tmp_path / "resumed"), extra))
    state = ckpt.load_latest_checkpoint(tmp_path / "resumed")
    assert state["step"] == 3 and len(state["data"]) == 2
    run_two_ranks(tmp_path / "resumed", extra=extra)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed", step=5)


def test_a_signal_to_one_rank_in_the_last_step_skips_the_final_evaluation_on_every_rank(tmp_path):
    # Ranks evaluate together or not at all (the evaluation's collectives must pair up); the run started
    # again only evaluates.
    extra = ["schedule.steps=2", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    spawn_ranks(_signalled_worker, (2, free_port(), str(tmp_path), extra))
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2
    assert not (tmp_path / "results.json").exists()
    run_two_ranks(tmp_path, extra=extra)
    assert "zeroshot/" in (tmp_path / "results.json").read_text()


def test_two_ranks_fine_tune_from_another_run(tmp_path):
    # Rank 0 alone reads the initial weights; DDP's constructor gives them to the other rank.
    run_two_ranks(tmp_path / "pretrained", extra=["eval.every_n_steps=0", "schedule.steps=2", "eval.at_start=true"])
    records = [json.loads(line) for line in (tmp_path / "pretrained" / "metrics.jsonl").open()]
    assert [record["step"] for record in records if "zeroshot/synthetic/top1" in record] == [0, 2]  # both ranks'
    extra = ["eval.every_n_steps=0", "schedule.steps=2", f"train.init_weights={tmp_path / 'pretrained'}"]
    run_two_ranks(tmp_path / "tuned", stop_at_step=0, extra=extra)
    start = ckpt.load_latest_checkpoint(tmp_path / "tuned")
    pretrained = ckpt.load_latest_checkpoint(tmp_path / "pretrained")
    assert start["step"] == 0
    assert all(torch.equal(start["model"][name], value) for name, value in pretrained["model"].items())


def test_a_signal_after_the_agreement_skips_that_steps_evaluation_on_every_rank(tmp_path):
    # The evaluation due at step 3 would run into the grace period: the ranks agree to save instead.
    extra = ["eval.every_n_steps=3", "schedule.steps=6", "checkpoint.every_n_steps=0"]
    # merge_rank_reports runs while a step is logged (every step here): after that step's agreement
    spawn_ranks(_signalled_worker, (2, free_port(), str(tmp_path), extra, "merge_rank_reports", 3))
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert not any(key.startswith("zeroshot/") for record in records for key in record)


def test_a_signal_to_one_rank_during_an_evaluation_abandons_it_on_every_rank(tmp_path):
    # 96 images at 2 per batch: 24 batches per rank, checks before the 10th and 20th. Both ranks abandon the
    # step-3 evaluation at the first check, save and stop; without the checks they would finish it first.
    extra = ["eval.every_n_steps=3", "eval.batch_size=2", "schedule.steps=6", "checkpoint.every_n_steps=0"]
    spawn_ranks(_signalled_in_evaluation_worker, (2, free_port(), str(tmp_path / "mid"), extra))
    state = ckpt.load_latest_checkpoint(tmp_path / "mid")
    assert state["step"] == 3 and len(state["data"]) == 2  # saved by both ranks together
    records = [json.loads(line) for line in (tmp_path / "mid" / "metrics.jsonl").open()]
    assert not any(key.startswith("zeroshot/") for record in records for key in record)

    # The final evaluation likewise: the weights are saved, results.json is not written, a rerun evaluates.
    extra = ["eval.every_n_steps=0", "eval.batch_size=2", "schedule.steps=2", "checkpoint.every_n_steps=0"]
    spawn_ranks(_signalled_in_evaluation_worker, (2, free_port(), str(tmp_path / "final"), extra))
    assert ckpt.load_latest_checkpoint(tmp_path / "final")["step"] == 2
    assert not (tmp_path / "final" / "results.json").exists()
    run_two_ranks(tmp_path / "final", extra=extra)
    assert "zeroshot/" in (tmp_path / "final" / "results.json").read_text()


def test_warnings_every_rank_would_give_alike_are_given_by_rank_0_alone(tmp_path):
    # A resume under changed settings, past a torn newer checkpoint, with non-finite losses: each was said
    # once per rank, hundreds of times over in a cluster job.
    extra = ["eval.every_n_steps=0", "schedule.steps=4", "checkpoint.every_n_steps=2"]
    run_two_ranks(tmp_path / "run", stop_at_step=2, extra=extra)
    (tmp_path / "run" / ckpt.CHECKPOINT_DIR / "step_00000003.pt").write_bytes(b"torn")
    changed = [*extra, "logging.every_n_steps=2", "optimizer.lr=1e30", "train.max_consecutive_nonfinite=100"]
    spawn_ranks(_logging_worker, (2, free_port(), str(tmp_path / "run"), changed))
    rank0, rank1 = ((tmp_path / f"rank{rank}.log").read_text() for rank in (0, 1))
    for warning in ("is unreadable and skipped", "settings that differ from its checkpoint's", "non-finite loss"):
        assert warning in rank0 and warning not in rank1, warning


def test_a_run_directory_in_use_stops_every_rank_at_once(tmp_path):
    # Rank 0 alone takes the lock; without agreeing, rank 1 would wait for it in the next collective.
    from multiprocess import lock_held_by_another_process

    with lock_held_by_another_process(tmp_path / "run"):
        spawn_ranks(_refused_worker, (2, free_port(), str(tmp_path / "run"), ["eval.every_n_steps=0"]), timeout_s=120)
    assert "is in use by another run (host " in (tmp_path / "refused0").read_text()
    assert "rank 0 could not take" in (tmp_path / "refused1").read_text()


def _data_missing_on_rank_1_worker(rank: int, world_size: int, port: int, run_dir: str, extra, reading: str) -> None:
    # Rank 1 alone cannot find a file that `reading` (clip.train's name for it) opens: a path on rank 0's node only.
    # What each rank raised goes into a file of its own beside the run directory.
    import clip.train as train_module
    from clip.run_start import BadTrainingInput

    if rank == 1:
        def missing(*args, **kwargs):
            raise FileNotFoundError(f"manifest node-local.tsv does not exist (rank {rank})")

        setattr(train_module, reading, missing)
    try:
        _worker(rank, world_size, port, run_dir, None, extra)
    except BadTrainingInput as error:
        (Path(run_dir).parent / f"refused{rank}").write_text(str(error))


@pytest.mark.parametrize("reading, what", [("build_train_data", "its training data"),
                                           ("check_evaluation_datasets", "the evaluation datasets")])
def test_data_that_one_rank_cannot_find_stops_every_rank_as_bad_input(tmp_path, reading, what):
    # Each rank reads its data itself: rank 1 stopped (status 2), and rank 0 went on into its next collective and
    # waited there for it (NCCL: 30 minutes; gloo: a "Connection closed by peer" traceback, with exit status 1,
    # after writing the run's config.toml as if it had started)
    spawn_ranks(_data_missing_on_rank_1_worker, (2, free_port(), str(tmp_path / "run"), [], reading),
                timeout_s=120)
    assert (tmp_path / "refused1").read_text() == "manifest node-local.tsv does not exist (rank 1)"
    assert (tmp_path / "refused0").read_text() == f"another rank could not use {what} (its error says why)"
    assert not (tmp_path / "run" / "config.toml").exists()


def _data_unusable_on_every_rank_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # Both ranks refuse the same data for the same reason; whether each left its error to rank 0 goes into a file
    # of its own beside the run directory.
    from clip.distributed import failed_on_another_rank
    from clip.run_start import BadTrainingInput

    try:
        _worker(rank, world_size, port, run_dir, None, extra)
    except BadTrainingInput as error:
        (Path(run_dir).parent / f"refused{rank}").write_text(f"{failed_on_another_rank(error)} {error}")


def test_bad_input_that_every_rank_finds_alike_is_said_by_rank_0_alone(tmp_path):
    # An epoch with fewer samples than the data workers of all ranks: every rank works it out from the same config
    # and printed the same line, 256 of them in a 32-node job. A rank whose own error is not rank 0's still says it
    # (test_data_that_one_rank_cannot_find_stops_every_rank_as_bad_input).
    extra = ["data.sources.0.num_samples=3", "data.workers=2"]
    spawn_ranks(_data_unusable_on_every_rank_worker, (2, free_port(), str(tmp_path / "run"), extra), timeout_s=120)
    rank0, rank1 = ((tmp_path / f"refused{rank}").read_text() for rank in (0, 1))
    assert rank0.startswith("False an epoch plans 3 samples") and "fewer than the 4 data workers" in rank0
    assert rank1 == rank0.replace("False", "True", 1)


def _config_differs_on_rank_1_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    from clip.distributed import failed_on_another_rank
    from clip.run_start import BadTrainingInput

    try:
        # Per-process settings may differ (threads, the device's spelling, rank 0's displays); the rest may not
        per_rank = ["train.threads=2", "logging.progress_bar=false", "optimizer.lr=0.003"] if rank == 1 else []
        _worker(rank, world_size, port, run_dir, None, [*extra, *per_rank])
    except BadTrainingInput as error:
        (Path(run_dir).parent / f"refused{rank}").write_text(f"{failed_on_another_rank(error)} {error}")


def test_ranks_started_with_different_configs_are_refused_naming_the_setting(tmp_path):
    # Each rank reads the config and command line itself: a learning rate given to one node's ranks only trained
    # different weights on each rank, without a word, and a batch size ended in gloo's collective mismatch
    spawn_ranks(_config_differs_on_rank_1_worker, (2, free_port(), str(tmp_path / "run"), []), timeout_s=120)
    rank0, rank1 = ((tmp_path / f"refused{rank}").read_text() for rank in (0, 1))
    assert rank0.startswith("False the ranks were started with different configs: rank 1 has optimizer.lr = 0.003 ")
    assert rank1 == rank0.replace("False", "True", 1)  # said by rank 0 alone
    assert not (tmp_path / "run" / "config.toml").exists()


def _resume_refused_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # What each rank raised, into a file of its own beside the run directory
    from clip.resume import ResumeRefused

    try:
        _worker(rank, world_size, port, run_dir, None, extra)
    except ResumeRefused as error:
        (Path(run_dir).parent / f"refused{rank}").write_text(str(error))


def _init_weights_unreachable_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    # Rank 0's read of train.init_weights fails as a download does; what each rank raised, into a file of its own
    import clip.run_start as run_start
    from clip.download import DownloadError
    from clip.weights_file import WeightsFileError

    def unreachable(*args, **kwargs):
        raise DownloadError("could not download ViT-B/32: Temporary failure in name resolution (simulated)")

    run_start.load_weights_with_source = unreachable
    try:
        _worker(rank, world_size, port, run_dir, None, extra)
    except (DownloadError, WeightsFileError) as error:
        (Path(run_dir).parent / f"raised{rank}").write_text(f"{type(error).__name__}: {error}")


def test_a_download_failure_of_the_initial_weights_is_the_same_kind_of_failure_on_every_rank(tmp_path):
    # The other ranks raised WeightsFileError (clip-train's status 2, bad input) for rank 0's DownloadError (status
    # 1, a failure worth trying again): srun reports the highest status, and the job read as bad input
    extra = ["eval.every_n_steps=0", "schedule.steps=2", "train.init_weights=ViT-B/32"]
    spawn_ranks(_init_weights_unreachable_worker, (2, free_port(), str(tmp_path / "run"), extra), timeout_s=120)
    assert (tmp_path / "raised0").read_text().startswith("DownloadError: could not download ViT-B/32")
    assert (tmp_path / "raised1").read_text() == (
        "DownloadError: rank 0 could not download train.init_weights (its log says why)")


def test_a_checkpoint_entry_that_one_rank_cannot_restore_stops_every_rank_at_once(tmp_path):
    # Each rank restores its own random generators: rank 1 alone refused its damaged entry, and rank 0 went on
    # into DDP's constructor and waited there for it until the collectives' timeout.
    extra = ["eval.every_n_steps=0", "schedule.steps=4"]
    run_two_ranks(tmp_path / "run", stop_at_step=2, extra=extra)
    path = ckpt.list_checkpoints(tmp_path / "run")[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["rng"][1]["torch"] = torch.zeros(3, dtype=torch.uint8)  # the keys are there, the value is no state
    torch.save(state, path)
    spawn_ranks(_resume_refused_worker, (2, free_port(), str(tmp_path / "run"), extra), timeout_s=120)
    assert "rank 1's 'rng' entry does not fit this run" in (tmp_path / "refused1").read_text()
    assert "another rank could not restore its part of the checkpoint" in (tmp_path / "refused0").read_text()


def test_when_rank_0_finds_no_readable_checkpoint_or_cannot_save_every_rank_stops(tmp_path):
    # Rank 0 alone chooses (and verifies) the checkpoint to resume from, and alone writes them: the others
    # hear of its failure instead of waiting for it in their next collective.
    extra = ["eval.every_n_steps=0", "schedule.steps=2", "checkpoint.every_n_steps=1"]
    run_two_ranks(tmp_path / "run", extra=extra, stop_at_step=1)
    for _, path in ckpt.list_checkpoints(tmp_path / "run"):
        path.write_bytes(path.read_bytes()[:100])  # torn
    spawn_ranks(_refused_worker, (2, free_port(), str(tmp_path / "run"), extra), timeout_s=120)
    assert "NoReadableCheckpointError: none of the checkpoints" in (tmp_path / "refused0").read_text()
    assert "NoReadableCheckpointError: rank 0 could not resume from" in (tmp_path / "refused1").read_text()

    spawn_ranks(_refused_worker, (2, free_port(), str(tmp_path / "full"), extra, "full_disk"), timeout_s=120)
    assert "No space left on device" in (tmp_path / "refused0").read_text()
    assert "rank 0 could not write the step 1 checkpoint" in (tmp_path / "refused1").read_text()
    assert (tmp_path / "ddp_alive0").read_text() == (tmp_path / "ddp_alive1").read_text() == "0"

    # A metrics.jsonl that rank 0 cannot append to: rank 1 waited in its next step's all-reduce
    spawn_ranks(_refused_worker, (2, free_port(), str(tmp_path / "full_metrics"), extra, "full_disk_for_metrics"),
                timeout_s=120)
    assert "RunLogWriteError: could not write" in (tmp_path / "refused0").read_text()
    assert "RunLogWriteError: rank 0 could not write" in (tmp_path / "refused1").read_text()

    # Any error of rank 0's choice, not only "none readable": rank 1 waited in the broadcast
    spawn_ranks(_refused_worker, (2, free_port(), str(tmp_path / "run"), extra, "unlistable"), timeout_s=120)
    assert "PermissionError: [Errno 13] Permission denied" in (tmp_path / "refused0").read_text()
    assert "rank 0 could not resume from" in (tmp_path / "refused1").read_text()


def test_a_failed_runs_frames_are_released_also_through_chained_errors():
    # What the frames of a failed run hold (its DDP module and so the process group) must be freed before the
    # process group is destroyed, also where an error was raised `from` another or while handling one.
    import weakref

    from clip.distributed import release_run_objects

    class Held:
        pass

    def fails_with(kind: str, refs: list):
        held = Held()  # kept alive by this frame, as _train's locals are
        refs.append(weakref.ref(held))
        if kind == "cause":
            try:
                raise KeyError("inner")
            except KeyError as inner:
                raise ValueError("outer") from inner
        raise RuntimeError("plain")

    for kind in ("cause", "plain"):
        refs = []
        try:
            fails_with(kind, refs)
        except Exception as error:
            if kind == "cause":  # the frame is then reachable through the cause's traceback only
                error.__traceback__.tb_next = None
            release_run_objects(error)
            assert refs[0]() is None, kind


def _buffers_at_evaluation_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    import clip.train as train_module

    real = train_module.run_evaluations

    def recording(model, *args, **kwargs):
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}
        torch.save(buffers, Path(run_dir) / f"buffers_rank{rank}_{kwargs['step']}.pt")
        return real(model, *args, **kwargs)

    train_module.run_evaluations = recording
    _worker(rank, world_size, port, run_dir, None, extra)


def test_ranks_evaluate_with_rank_zeros_batch_norm_statistics(tmp_path):
    # Each rank updates its BatchNorm statistics with its own batch after DDP's broadcast at the start of the
    # forward pass: every rank evaluated its share of the images with other statistics, none of them the saved
    # model's.
    extra = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8",
             "schedule.steps=2", "eval.every_n_steps=1", "checkpoint.every_n_steps=1"]
    spawn_ranks(_buffers_at_evaluation_worker, (2, free_port(), str(tmp_path), extra))
    saved = ckpt.read_checkpoint(ckpt.checkpoint_path(tmp_path, 1))["model"]
    for step in (1, 2):
        rank0, rank1 = (torch.load(tmp_path / f"buffers_rank{r}_{step}.pt") for r in (0, 1))
        assert rank0.keys() == rank1.keys() and len(rank0) > 0
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (step, name)
    for name, value in torch.load(tmp_path / "buffers_rank1_1.pt").items():
        assert torch.equal(value, saved[name]), name  # the model saved at step 1


def _one_slow_loader_worker(rank: int, world_size: int, port: int, run_dir: str, extra) -> None:
    slow_the_loader(setattr, 10.0 if rank == 1 else 0.0)  # rank 1's loader only
    _worker(rank, world_size, port, run_dir, None, extra)


def test_the_logged_data_wait_is_the_slowest_ranks(tmp_path):
    # Rank 0 logs; a rank whose loader is slow makes rank 0 wait in the all-reduce, not for its data.
    extra = ["schedule.steps=2", "eval.every_n_steps=0", "eval.zeroshot=[]", "logging.every_n_steps=2"]
    spawn_ranks(_one_slow_loader_worker, (2, free_port(), str(tmp_path), extra))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
    assert len(records) == 1 and records[0]["data_wait_fraction"] > 0.95
