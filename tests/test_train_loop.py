"""The training loop end to end on tiny models and the synthetic data: checkpoints, exact resume, fallback
from a corrupt checkpoint, atomic writes, non-finite losses, the demo recipe, and loading the result."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import clip
from clip import checkpoint as ckpt
from clip.config import TrainConfig, load_config
from clip.cli.train import headline, main
from clip.optim import learning_rate
from clip.run_start import BadTrainingInput
from clip.train import NonFiniteLossError, train

DEMO = Path(__file__).parent.parent / "configs" / "demo.toml"

# The demo recipe, shrunk: a few steps of a tiny model, 2 evaluations, checkpoints every 3 steps.
TINY = [
    "model.embed_dim=32",
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "train.batch_size=8",
    "schedule.steps=6",
    "schedule.warmup_steps=2",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_last=5",
    "logging.every_n_steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.plot=false",
    "data.workers=0",
    "eval.every_n_steps=3",
    "eval.zeroshot.0.num_samples=96",
    "train.device=cpu",  # also on a machine with a GPU: these tests compare runs bit for bit
]


def tiny_config(run_dir: Path, *extra: str) -> TrainConfig:
    return load_config(DEMO, TINY + [f"output_dir={run_dir}", *extra], TrainConfig)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[0][1])["model"]


def test_a_runs_thread_count_is_the_process_setting_again_once_it_ends(tmp_path):
    # train.threads sets torch's process-wide count: a notebook (or a later test) that called train() kept it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        train(tiny_config(tmp_path, "train.threads=1", "eval.every_n_steps=0", "schedule.steps=1"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_train_given_a_recipe_path_or_a_dict_says_how_to_make_its_config(tmp_path):
    # train("configs/finetune_vit_b32.toml") in a notebook failed as AttributeError: 'str' object has no
    # attribute 'train', from deep in the setup
    for given in (str(DEMO), DEMO, {"output_dir": str(tmp_path)}):
        with pytest.raises(TypeError, match=r"train\(\) takes a TrainConfig, not \w+: read a recipe with "
                                            r"clip\.config\.load_config\(path"):
            train(given)
    assert list(tmp_path.iterdir()) == []


def test_train_checks_a_value_set_after_the_config_was_built_before_it_starts(tmp_path):
    # A notebook's config.train.batch_size = "8" failed deep in the loader's set-up, after the run directory
    # was made; 8.0 or True went through to train something else
    from clip.config_io import ConfigError

    for key, value, error in (("batch_size", "8", r"^train\.batch_size: expected an integer, got '8'$"),
                              ("accumulation_steps", True, r"^train\.accumulation_steps: expected an integer, got True$"),
                              ("accumulation_steps", 3, r"^train\.batch_size must be divisible by accumulation_steps")):
        config = tiny_config(tmp_path / "run")
        setattr(config.train, key, value)
        with pytest.raises(ConfigError, match=error):
            train(config)
        assert not (tmp_path / "run").exists()


def test_a_path_set_after_the_config_was_built_is_taken_as_its_text(tmp_path):
    # The run held its directory, then failed to record its config: "cannot write PosixPath(...) to TOML"
    config = tiny_config(tmp_path / "unused", "eval.every_n_steps=0", "schedule.steps=1")
    config.output_dir = tmp_path / "run"
    assert train(config)["step"] == 1
    assert f'output_dir = "{tmp_path / "run"}"' in (tmp_path / "run" / "config.toml").read_text()
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("extra", [[], ["train.patch_dropout=0.5", "train.accumulation_steps=2"], ["loss.kind=siglip"]],
                         ids=["plain", "patch_dropout", "siglip"])
def test_resume_continues_exactly(tmp_path, extra):
    # With patch dropout the masks come from torch's generator, whose state the checkpoint restores. SigLIP's
    # learned bias is the loss's parameter, saved beside the weights.
    train(tiny_config(tmp_path / "straight", *extra))
    train(tiny_config(tmp_path / "resumed", *extra), stop_at_step=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed")] == [3]
    train(tiny_config(tmp_path / "resumed", *extra))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    def loss_parameters(run):
        return ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / run)[0][1])["loss_parameters"]
    torch.testing.assert_close(loss_parameters("resumed"), loss_parameters("straight"), rtol=0, atol=0)
    # the same batches were seen in the same order: the logged losses agree step by step
    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open()) if "loss" in r}
    assert losses("straight") == losses("resumed")


def test_generator_seeds_differ_by_rank_and_by_the_step_a_run_resumes_at():
    assert [ckpt.rank_seed(7, rank) for rank in range(3)] == [7, 8, 9]  # a new run's, as before
    resumed = {ckpt.rank_seed(7, rank, step) for rank in range(4) for step in (3, 6, 1000)}
    assert len(resumed) == 12 and not resumed & {7, 8, 9, 10}
    assert ckpt.rank_seed(7, 1, 3) == ckpt.rank_seed(7, 1, 3)  # reproducible
    torch.manual_seed(ckpt.rank_seed(-1, 0, 3))  # a negative train.seed is a valid torch seed too


def test_a_checkpoint_of_another_rank_count_seeds_the_generators_afresh(tmp_path, monkeypatch, caplog):
    # Its RNG states belong to other ranks. They were left as the model's initialisation had set them:
    # train.seed on every rank, so the ranks drew the same patch-dropout masks, the ones the run began with.
    extra = ("train.patch_dropout=0.5", "eval.every_n_steps=0")
    train(tiny_config(tmp_path, *extra), stop_at_step=3)
    path = ckpt.list_checkpoints(tmp_path)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["rng"], state["data"] = state["rng"] * 2, state["data"] * 2  # as if written by 2 ranks
    torch.save(state, path)
    seeds = []
    real_manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: (seeds.append(seed), real_manual_seed(seed))[1])
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path, *extra))
    # the warning also says that the global batch changed with the number of ranks (batch_size is per rank)
    assert ("checkpoint was written by 2 ranks, this run has 1: the global batch is 8, not 16 (at the learning rate "
            "as set), RNG states are seeded afresh") in caplog.text
    assert seeds[-1] == ckpt.rank_seed(0, 0, 3) != 0



def test_a_cpu_runs_checkpoint_resumed_on_a_gpu_seeds_each_ranks_cuda_generator_afresh(tmp_path, monkeypatch):
    # A CPU run saved no CUDA generator state. Left alone, every GPU rank's CUDA generator would be the
    # model initialisation's (train.seed on every rank): the same patch-dropout masks on every rank, the ones
    # the run began with. Here the device only says "cuda": the seeding is recorded, not done.
    from clip.distributed import DistributedInfo
    from clip.optim import build_optimizer
    from clip.resume import restore_training_state
    from clip.run_start import build_training_module

    config = tiny_config(tmp_path, "eval.every_n_steps=0")
    train(config, stop_at_step=2)
    state = ckpt.load_latest_checkpoint(tmp_path)
    state["rng"], state["data"] = state["rng"] * 2, state["data"] * 2  # as if written by 2 CPU ranks
    for rank in state["rng"]:
        rank.pop("cuda", None)
    seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    for rank in (0, 1):
        module = build_training_module(config, torch.device("cpu"))
        optimizer = build_optimizer(list(module.named_parameters()), config.optimizer, torch.device("cpu"))
        gpu_rank = DistributedInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cuda", rank))
        restore_training_state(state, config, tmp_path, module=module, optimizer=optimizer,
                               scaler=torch.amp.GradScaler("cpu", enabled=False), dist_info=gpu_rank)
    assert seeds == [ckpt.rank_seed(0, 0, 2), ckpt.rank_seed(0, 1, 2)] and seeds[0] != seeds[1]


def test_a_resume_on_other_ranks_with_the_same_global_batch_says_it_stays(tmp_path, caplog):
    # 2 ranks x 8 resumed on 1 rank x 16 (batch_size is per rank): the warning read "the global batch is 16, not 16"
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    path = ckpt.list_checkpoints(tmp_path)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["rng"], state["data"] = state["rng"] * 2, state["data"] * 2  # as if written by 2 ranks of batch 8
    torch.save(state, path)
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path, "eval.every_n_steps=0", "train.batch_size=16"), stop_at_step=4)
    assert ("checkpoint was written by 2 ranks, this run has 1: the global batch stays 16, RNG states are seeded "
            "afresh") in caplog.text
    assert "not 16" not in caplog.text


def test_a_one_process_runs_start_and_end_lines_say_1_rank(tmp_path, caplog):
    # They read "global batch 8 (1 ranks x 8, ...)" and "data, all 1 ranks, whole run"
    with caplog.at_level("INFO"):
        train(tiny_config(tmp_path, "eval.every_n_steps=0", "schedule.steps=1"))
    assert "(1 rank x " in caplog.text and "data, 1 rank, whole run" in caplog.text
    assert "1 ranks" not in caplog.text
    # rank 0's own line counts from this start, which a resume makes a part of its first epoch
    assert "data since this start or resume: data rank 0, epoch 0" in caplog.text


def test_logged_throughput_leaves_out_the_time_spent_evaluating_and_saving(tmp_path, monkeypatch):
    # The window after an evaluation or a checkpoint counted its time as training time: with ImageNet
    # evaluations, the next samples_per_s and mfu read far too low. A fake clock makes both take 1000 s.
    import time
    import types

    import clip.train as train_module

    offset = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])
    monkeypatch.setattr(train_module, "time", clock)

    def slow(real):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            offset[0] += 1000.0
            return result
        return wrapped

    monkeypatch.setattr(train_module, "run_evaluations", slow(train_module.run_evaluations))
    monkeypatch.setattr(ckpt, "save_checkpoint", slow(ckpt.save_checkpoint))
    train(tiny_config(tmp_path, "schedule.steps=5"))  # evaluates and saves at step 3, logs every step
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and offset[0] >= 2000.0
    # neither the fake 1000 s counted, nor more than was spent taken off (a window clamped at ~0 s)
    assert all(1.0 < r["samples_per_s"] < 1e6 for r in records), [r["samples_per_s"] for r in records]


def test_run_writes_results_metrics_config_and_loads_with_clip_load(tmp_path):
    results = train(tiny_config(tmp_path))
    assert (tmp_path / "config.toml").exists()
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert any(any(k.startswith("zeroshot/") for k in r) for r in records if r["step"] == 3)
    assert all(r["samples_per_s"] > 0 for r in records if "loss" in r)
    assert headline(results).startswith("zero-shot top-1: ")
    model, preprocess = clip.load(str(tmp_path), device="cpu")
    assert model.config.embed_dim == 32 and not model.training
    state = final_weights(tmp_path)
    torch.testing.assert_close(model.state_dict()["text_projection"], state["text_projection"])


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    train(tiny_config(tmp_path))
    newest_step, newest = ckpt.list_checkpoints(tmp_path)[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write
    with caplog.at_level(logging.WARNING):
        state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["step"] == 3 and newest_step == 6
    assert "unreadable" in caplog.text


def test_interrupted_write_leaves_no_broken_checkpoint(tmp_path, monkeypatch):
    def torn_save(obj, file):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 1}, tmp_path, 1, keep_last=3)
    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": 2}, tmp_path, 2, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 1


def test_keep_last(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint({"format": ckpt.CHECKPOINT_FORMAT, "step": step}, tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 4]


def test_a_run_keeps_its_last_keep_last_checkpoints(tmp_path):
    train(tiny_config(tmp_path, "schedule.steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2",
                      "eval.every_n_steps=0"))
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]


def poison_loss(monkeypatch, steps: set[int], gradients_only: bool = False) -> None:
    """Makes clip.train's loss NaN at the given steps (counted as calls; one micro-batch per step), or, with
    gradients_only, keeps it finite but gives its gradients NaN: sqrt(|x - x|) is 0 with an infinite slope."""
    import clip.train as train_module

    real_build_loss, calls = train_module.build_loss, {"n": 0}

    def poisoned_build_loss(config, distributed=False):
        loss_fn = real_build_loss(config, distributed=distributed)

        def wrapped(*args):
            calls["n"] += 1
            loss, metrics = loss_fn(*args)
            if calls["n"] in steps:
                features = args[0]
                loss = loss + torch.sqrt((features - features.detach()).abs().sum()) if gradients_only else loss * float("nan")
            return loss, metrics

        return wrapped

    monkeypatch.setattr(train_module, "build_loss", poisoned_build_loss)


@pytest.mark.parametrize("poisoned_steps", [{2, 4, 5, 6}, {1, 4, 5, 6}])  # the first step too: nothing logged yet
def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch, poisoned_steps):
    poison_loss(monkeypatch, poisoned_steps)  # one isolated, then three in a row
    config = tiny_config(
        tmp_path, "schedule.steps=10", "train.max_consecutive_nonfinite=3", "eval.every_n_steps=0",
        "optimizer.grad_clip_norm=1.0",
    )
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row at step 6"):
        train(config)
    # the last good checkpoint (step 3) is kept, and its weights are finite
    state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    totals = {r["step"]: r["nonfinite_steps_total"] for r in records if "loss" in r}
    assert totals[1] == (1 in poisoned_steps) and totals[3] == 1 and totals[5] == 3
    logged = [r for r in records if "loss" in r]
    assert all("logit_scale" in r and "logit_scale_exp" not in r for r in logged)  # one name for the figure


def test_a_run_of_non_finite_steps_continues_across_a_stop(tmp_path, monkeypatch):
    # The count in a row started from 0 again on resuming: each stop gave a diverged run more steps
    poison_loss(monkeypatch, {3, 4, 5})  # calls count on across the two train() calls: steps 3, 4, then 5
    config = tiny_config(tmp_path, "schedule.steps=8", "train.max_consecutive_nonfinite=3", "eval.every_n_steps=0")
    assert train(config, stop_at_step=4)["step"] == 4
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses or gradients in a row at step 5; stopping: "
                       r"the latest checkpoint, .*step_00000004\.pt, holds the weights from before them"):
        train(config)


def test_non_finite_gradients_of_a_finite_loss_skip_the_step(tmp_path, monkeypatch, caplog):
    # The loss alone was checked: a step with NaN gradients was taken and made the weights NaN for good.
    poison_loss(monkeypatch, {2}, gradients_only=True)
    with caplog.at_level(logging.WARNING):
        results = train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0", "optimizer.grad_clip_norm=none"))
    assert "step 2: non-finite gradients (loss " in caplog.text
    assert results["nonfinite_steps_total"] == 1 and math.isfinite(results["loss"])
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values() if t.is_floating_point())


def test_the_step_is_judged_once_after_all_its_backward_passes(tmp_path, monkeypatch):
    # The host read the loss before every micro-batch's backward pass (k + 1 device syncs per step: the GPU
    # idled while each backward pass was launched); the losses and the gradients are now judged together,
    # once per step, when every micro-batch's gradients exist.
    import clip.train as train_module

    real, seen = train_module.agreement_flags, []

    def recording(losses_finite, grad_norm, stop_requested, dist_info):
        have_gradients = any(p.grad is not None for p in trained["module"].parameters())
        seen.append((have_gradients, grad_norm is not None))
        return real(losses_finite, grad_norm, stop_requested, dist_info)

    real_step, trained = train_module.contrastive_step, {}

    def keeping_module(module, *args, **kwargs):
        trained["module"] = module
        return real_step(module, *args, **kwargs)

    monkeypatch.setattr(train_module, "agreement_flags", recording)
    monkeypatch.setattr(train_module, "contrastive_step", keeping_module)
    train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0", "train.accumulation_steps=2"))
    assert seen == [(True, True)] * 3


def test_a_non_finite_loss_in_one_micro_batch_skips_the_whole_step(tmp_path, monkeypatch, caplog):
    # Accumulation of 2: the loss of step 2's first micro-batch (the third loss computed) is NaN, its second
    # one finite; no gradient of that step may reach the weights.
    poison_loss(monkeypatch, {3})
    with caplog.at_level(logging.WARNING):
        results = train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0",
                                    "train.accumulation_steps=2", "optimizer.grad_clip_norm=none"))
    assert "step 2: non-finite loss (loss " in caplog.text
    assert results["nonfinite_steps_total"] == 1
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values() if t.is_floating_point())


def test_fp16_skips_a_non_finite_loss_without_touching_the_loss_scale(tmp_path, monkeypatch, caplog):
    # Its backward pass runs (the verdict comes after it), but the gradient scaler is not told of the step:
    # its scale stays, and the next step unscales and steps as usual.
    extra = ["train.precision=fp16", "schedule.steps=3", "eval.every_n_steps=0", "eval.zeroshot=[]",
             "logging.every_n_steps=1"]
    train(tiny_config(tmp_path / "clean", *extra))
    poison_loss(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        results = train(tiny_config(tmp_path / "poisoned", *extra))
    assert "step 2: non-finite loss (loss " in caplog.text and results["nonfinite_steps_total"] == 1

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open() if '"loss"' in line]

    assert [r["loss_scale"] for r in records("poisoned")] == [r["loss_scale"] for r in records("clean")]
    assert ["grad_norm" in r for r in records("poisoned")] == [True, False, True]  # none for the skipped step
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "poisoned").values() if t.is_floating_point())


# Each step's verdict read at once (it logs and saves), or a step late (clip.step_verdict)
VERDICT_READING = {"at once": ["checkpoint.every_n_steps=1"],
                   "late": ["checkpoint.every_n_steps=0", "logging.every_n_steps=10"]}


@pytest.mark.parametrize("reading", list(VERDICT_READING))
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_skipped_step_leaves_batch_norm_statistics_as_they_were(tmp_path, monkeypatch, caplog, accumulation,
                                                                  reading):
    # An image with an inf pixel (fp16 activations overflowing, on a GPU) made a ResNet's running statistics
    # NaN in the forward pass, before the loss was judged: the step was skipped, but every later checkpoint
    # held NaN buffers and was refused, and pruning deleted the good ones until the run could not resume.
    import clip.train as train_module

    real, calls = train_module.contrastive_step, {"n": 0}

    def inf_in_step_2(module, images, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            images = images.clone()
            images[0, 0, 0, 0] = float("inf")
        return real(module, images, *args, **kwargs)

    monkeypatch.setattr(train_module, "contrastive_step", inf_in_step_2)
    resnet = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8"]
    extra = [*resnet, "schedule.steps=3", "eval.every_n_steps=0", "eval.zeroshot=[]", *VERDICT_READING[reading],
             f"train.accumulation_steps={accumulation}"]
    with caplog.at_level(logging.WARNING):
        results = train(tiny_config(tmp_path, *extra))
    assert "step 2: non-finite loss" in caplog.text and results["nonfinite_steps_total"] == 1
    state = ckpt.load_latest_checkpoint(tmp_path)  # refused (non-finite weights) before the fix
    assert state["step"] == 3
    # the skipped step's updates of the statistics were undone, its step counter too: 2 steps' micro-batches
    assert state["model"]["visual.layer4.0.bn1.num_batches_tracked"].item() == 2 * accumulation


def test_a_run_that_raises_stops_its_data_workers(tmp_path, monkeypatch):
    # They were stopped at the end of a run that finished only: in a notebook, a failed run left them running.
    import multiprocessing

    poison_loss(monkeypatch, {1, 2})
    config = tiny_config(tmp_path, "train.max_consecutive_nonfinite=2", "eval.every_n_steps=0", "data.workers=1")
    with pytest.raises(NonFiniteLossError) as raised:
        train(config)
    # checked while the exception (and so the frames that hold the loader) is still referenced, as a
    # notebook's sys.last_traceback keeps it: otherwise the garbage collector stops the workers anyway
    assert raised.value is not None and multiprocessing.active_children() == []


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite_figures(tmp_path):
    # Python's NaN and Infinity extensions (a diverged step's loss or gradient norm) are refused by jq,
    # JavaScript and many readers of JSON lines
    from clip.run_log import RunLog

    run_log = RunLog(tmp_path, tensorboard=False, resumed_at=0)
    run_log.write({"step": 1, "loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "data": {"x": [1.5, -math.inf]}})
    run_log.close()

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "data": {"x": [1.5, None]}}


def test_a_resume_drops_the_later_records_and_a_reevaluation_the_evaluation_of_its_step(tmp_path):
    # Steps after the checkpoint run again, and so does its step's evaluation when it is evaluated again: each
    # would be in metrics.jsonl twice. The training record of the checkpoint's step stays, as does a torn line's
    # step (dropped: it is after any checkpoint).
    from clip.run_log import RunLog, read_metrics

    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "zeroshot/x/top1": 0.5},
               {"step": 3, "loss": 1.0}]
    lines = "".join(json.dumps(record) + "\n" for record in records) + '{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(lines)
    RunLog(tmp_path, tensorboard=False, resumed_at=2).close()
    assert read_metrics(tmp_path) == records[:3]
    RunLog(tmp_path, tensorboard=False, resumed_at=2, reevaluated=True).close()
    assert read_metrics(tmp_path) == records[:2]


def test_weights_and_biases_gets_the_finite_numbers_of_a_record_by_their_slash_joined_names(tmp_path):
    # A skipped step's non-finite loss is null in metrics.jsonl and left out of the charts; the step is the
    # x axis, not a chart of its own; flags (booleans) and text are no charts either
    from clip.run_log import RunLog

    fake = FakeWandb()
    run_log = RunLog(tmp_path, tensorboard=False, wandb_run=fake)
    run_log.write({"step": 3, "loss": float("nan"), "lr": 1e-4, "grad_norm": math.inf, "skipped": True,
                   "note": "text", "data": {"samples": 24, "wait": {"fraction": 0.25}}})
    run_log.close()
    assert fake.logged == [(3, {"lr": 1e-4, "data/samples": 24, "data/wait/fraction": 0.25})]
    assert fake.finished == 1


def test_a_resume_hides_the_tensorboard_events_of_the_steps_that_run_again_only(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clip.run_log import RunLog

    first = RunLog(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = RunLog(tmp_path, tensorboard=True, resumed_at=2)
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_temporaries_of_a_file_are_its_dot_name_pid_tmp_files_only(tmp_path):
    from clip.run_log import temporaries_of

    for name in (".x.pt.12.tmp", ".x.pt.34.tmp.bak", ".x.pt.abc.tmp", ".x.pt.7.tmp~", "x.pt.5.tmp", ".y.pt.6.tmp"):
        (tmp_path / name).write_text("")
    assert temporaries_of(tmp_path / "x.pt") == [(tmp_path / ".x.pt.12.tmp", 12)]


def test_strict_json_writes_a_one_element_tensor_as_its_number():
    from clip.run_log import strict_json

    assert strict_json({"lr": torch.tensor([2.5]), "n": torch.tensor(3), "path": Path("a")}) == (
        '{"lr": 2.5, "n": 3, "path": "a"}'
    )


def test_results_json_is_strict_json_too(tmp_path, monkeypatch):
    # A diverged model's final evaluation records NaN: results.json held a bare NaN, which jq refuses
    import clip.train as train_module

    monkeypatch.setattr(train_module, "run_evaluations", lambda *args, **kwargs: {"zeroshot/shapes/top1": float("nan")})
    train(tiny_config(tmp_path, "schedule.steps=2", "checkpoint.every_n_steps=0"))

    def refuse(constant):
        raise ValueError(f"{constant} in results.json")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results["zeroshot/shapes/top1"] is None and results["step"] == 2


def test_no_periodic_checkpoint_is_written_while_the_losses_are_non_finite(tmp_path, monkeypatch):
    # Each such save pruned an older checkpoint, until only copies from the bad steps were left, and the error
    # said that a good one was kept.
    poison_loss(monkeypatch, set(range(3, 9)))
    config = tiny_config(tmp_path, "schedule.steps=10", "train.max_consecutive_nonfinite=6", "eval.every_n_steps=0",
                         "checkpoint.every_n_steps=2", "checkpoint.keep_last=2")
    with pytest.raises(NonFiniteLossError,
                       match=r"the latest checkpoint, .*step_00000002\.pt, holds the weights from before them"):
        train(config)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2]


def test_the_model_gets_normalised_float_images_from_the_uint8_batches(tmp_path, monkeypatch):
    import clip.train as train_module

    real, seen = train_module.contrastive_step, []

    def recording(module, images, *args, **kwargs):
        seen.append(images)
        return real(module, images, *args, **kwargs)

    monkeypatch.setattr(train_module, "contrastive_step", recording)
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "eval.zeroshot=[]"))
    assert len(seen) == 2
    for images in seen:
        assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
        # CLIP's mean/std put pixels 0..255 in about -1.8..2.2 (not 0..255, not 0..1)
        assert -1.8 < images.min() < -0.5 and 1.0 < images.max() < 2.2


def signal_at_step(monkeypatch, step: int, signum: int = signal.SIGTERM, when: str = "before_forward") -> None:
    """Delivers `signum` to this process during the given step (as SLURM's pre-emption notice or a Ctrl-C
    would arrive): before its forward pass, or after its optimiser step (while its metrics are logged)."""
    import clip.train as train_module

    name = {"before_forward": "contrastive_step", "after_optimizer": "merge_rank_reports"}[when]
    real = getattr(train_module, name)
    calls = {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, name, signalling)


@pytest.mark.parametrize(("signum", "when"), [(signal.SIGTERM, "before_forward"), (signal.SIGINT, "before_forward"),
                                              (signal.SIGTERM, "after_optimizer"),
                                              # SLURM scripts written for other trainers ask for SIGUSR1
                                              (getattr(signal, "SIGUSR1", signal.SIGTERM), "before_forward")])
def test_a_signal_checkpoints_after_the_current_step_and_the_run_resumes_exactly(tmp_path, monkeypatch, signum, when):
    # Evaluation every 2 steps: the stopping step (4) skips its evaluation and only saves; the resumed run
    # makes it up before its first step.
    extra = ["eval.every_n_steps=2", "checkpoint.every_n_steps=0"]  # checkpoints only at the end, or when stopped
    train(tiny_config(tmp_path / "straight", *extra))
    handler_before = signal.getsignal(signum)
    signal_at_step(monkeypatch, 4, signum, when)
    stopped = train(tiny_config(tmp_path / "resumed", *extra))
    assert stopped["step"] == 4 and signal.getsignal(signum) is handler_before  # handlers are restored
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed")] == [4]
    assert not (tmp_path / "resumed" / "results.json").exists()  # not finished
    assert evaluated_steps(tmp_path / "resumed") == [2]
    monkeypatch.undo()
    assert train(tiny_config(tmp_path / "resumed", *extra))["step"] == 6
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # The skipped step-4 evaluation is made up when the run resumes: the same records as the straight run's
    def evaluations(run):
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").open())
        return [{k: v for k, v in r.items() if k.startswith("zeroshot/")} | {"step": r["step"]}
                for r in records if any(k.startswith("zeroshot/") for k in r)]
    assert [r["step"] for r in evaluations("resumed")] == [2, 4, 6]
    assert evaluations("resumed") == evaluations("straight")


def test_main_prints_the_headline_last(tmp_path, capsys):
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("zero-shot top-1: ")


def test_the_save_a_signal_asked_for_leaves_pruning_to_the_resumed_run(tmp_path, monkeypatch):
    # Pruning reads a kept checkpoint whole to check it (seconds for a large one on network storage), time
    # that the scheduler's grace period after its SIGTERM may not leave
    signal_at_step(monkeypatch, 3, signal.SIGTERM, "before_forward")
    config = tiny_config(tmp_path, "schedule.steps=5", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1",
                         "eval.every_n_steps=0")
    train(config)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [3, 2]
    monkeypatch.undo()
    train(config)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [5]


def test_main_exits_75_when_a_signal_stopped_the_run_early(tmp_path, monkeypatch, capsys):
    # 75 (EX_TEMPFAIL) tells a job script "checkpointed, run again to continue": slurm_train.sbatch requeues.
    from clip.stopping import STOPPED_EARLY_EXIT_CODE

    signal_at_step(monkeypatch, 2, signal.SIGTERM, "before_forward")
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]
    assert main(args) == STOPPED_EARLY_EXIT_CODE == 75
    # Said in words too: the status alone tells only those who know what 75 means
    assert f"stopped at step 2 of 6, with a checkpoint in {tmp_path}: run the same command again to continue " \
           "(exit status 75)" in (tmp_path / "train.log").read_text()
    monkeypatch.undo()
    assert main(args) == 0
    # Judged by the step reached, not the last logged one: stopped at step 2 with logging every 10 steps,
    # then started again as a 2-step run, it is finished (75 would make a job script requeue it forever).
    other = tmp_path / "other"
    logged_rarely = [str(DEMO), "--output-dir", str(other), *TINY, "eval.every_n_steps=0", "logging.every_n_steps=10"]
    signal_at_step(monkeypatch, 2, signal.SIGTERM, "before_forward")
    assert main(logged_rarely) == 75
    monkeypatch.undo()
    assert main([*logged_rarely, "schedule.steps=2"]) == 0


def test_a_signal_during_the_setup_abandons_it_and_exits_75(tmp_path, monkeypatch):
    # SLURM may pre-empt a requeued job while it starts (reading its checkpoint, building its data): the
    # default handler would end it with status 143, which the job script takes for a failure. Nothing is
    # trained yet, so the start is abandoned at once (a rank blocked in a rendezvous stops too).
    import clip.train as train_module

    real, reached = train_module.build_train_data, []

    def signalled_while_building(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")
        return real(*args, **kwargs)

    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    monkeypatch.setattr(train_module, "build_train_data", signalled_while_building)
    assert main(args) == 75 and reached == []  # raised from the handler, in the middle of the setup
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]  # the resumed run's checkpoint, untouched
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    assert main(args) == 0



@pytest.mark.skipif(sys.platform == "win32", reason="a pipe: command through a POSIX shell")
@pytest.mark.parametrize("workers", [1, 0])  # 0: the stalled read is the training process's own
def test_a_signal_while_one_process_waits_on_a_stalled_shard_saves_at_once_and_resumes_exactly(
    tmp_path, caplog, workers
):
    # A stalled download held the wait for the next batch until data.worker_timeout_s (30 minutes by default),
    # long past a scheduler's grace period: the run then failed without a checkpoint, losing every step since the
    # last. One process has not begun the step it waits for, so it saves the step it is at and stops.
    import threading
    import time

    from test_data_helpers import write_shards

    write_shards(tmp_path / "shards", 16, 8)  # two shards, a batch each
    serve = tmp_path / "serve.sh"  # the third shard it is asked for (epoch 1's first) stalls while "stall" exists
    # A stall of this test's own length: another suite running on the machine has its own "sleep 611"
    stall = f"sleep 611.{os.getpid():07d}"
    count, stall_file = shlex.quote(str(tmp_path / "count")), shlex.quote(str(tmp_path / "stall"))
    serve.write_text(f'n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n'
                     f'if [ -e {stall_file} ] && [ "$n" -ge 2 ]; then exec {stall}; fi\nexec cat "$1"\n')
    source = ["data.sources.0.kind=shards",
              f"data.sources.0.path=pipe:sh {shlex.quote(str(serve))} "
              f"{shlex.quote(str(tmp_path / 'shards'))}/s-{{000000..000001}}.tar",
              f"data.sources.0.size_index={tmp_path}/shards/sizes.json", "data.sources.0.num_samples=none",
              f"data.workers={workers}", "data.worker_timeout_s=60", "eval.every_n_steps=0",
              "checkpoint.every_n_steps=5"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main([str(DEMO), "--output-dir", str(straight), *TINY, *source]) == 0

    (tmp_path / "stall").touch()
    (tmp_path / "count").unlink()

    def signal_once_step_2_is_logged() -> None:
        metrics = stopped / "metrics.jsonl"
        while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
            time.sleep(0.05)
        time.sleep(1.0)  # into the wait for step 3's batch
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_step_2_is_logged, daemon=True).start()
    with caplog.at_level("WARNING"):
        assert main([str(DEMO), "--output-dir", str(stopped), *TINY, *source]) == 75
    assert "abandoning the wait for the next batch, to save and stop" in caplog.text
    assert "stopped while waiting for the batch of step 3: saving step 2" in caplog.text
    assert [step for step, _ in ckpt.list_checkpoints(stopped)] == [2]
    for _ in range(100):  # the stalled command is ended with the data worker that ran it
        if subprocess.run(["pgrep", "-f", stall], capture_output=True).returncode == 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stalled pipe: command outlived the run")

    (tmp_path / "stall").unlink()
    assert main([str(DEMO), "--output-dir", str(stopped), *TINY, *source]) == 0
    for name, tensor in final_weights(straight).items():
        assert torch.equal(tensor, final_weights(stopped)[name]), name


def test_compile_on_the_cpu_without_a_cpp_compiler_is_one_line_before_the_run_starts(tmp_path, monkeypatch, caplog):
    # Inductor's InvalidCxxCompiler came at the first step, after the setup, in a 110-line traceback that did not
    # name train.compile
    inductor = pytest.importorskip("torch._inductor.cpp_builder")
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler

    monkeypatch.setattr(inductor, "get_cpp_compiler", no_compiler)
    with caplog.at_level("ERROR"):
        assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "train.compile=true"]) == 1
    assert "train.compile = true on the CPU needs a C++ compiler" in caplog.text
    assert "Traceback" not in caplog.text and not (tmp_path / "config.toml").exists()
    # without train.compile nothing is asked of a compiler
    assert main([str(DEMO), "--output-dir", str(tmp_path / "eager"), *TINY, "schedule.steps=1",
                 "eval.every_n_steps=0"]) == 0


def test_the_compiler_check_says_only_what_inductor_says_of_a_missing_compiler(monkeypatch):
    # Another failure of inductor's search (its layout changed, a broken install) is left to the first step, where
    # inductor says what it is: called "needs a C++ compiler", it would send someone who has one looking for one
    inductor = pytest.importorskip("torch._inductor.cpp_builder")
    from clip.dependencies import MissingDependency, require_a_compiler_for_compile

    def broken():
        raise RuntimeError("something else")

    monkeypatch.setattr(inductor, "get_cpp_compiler", broken)
    require_a_compiler_for_compile("cpu")

    def none_found():
        raise __import__("torch._inductor.exc", fromlist=["x"]).InvalidCxxCompiler

    monkeypatch.setattr(inductor, "get_cpp_compiler", none_found)
    require_a_compiler_for_compile("cuda")  # not asked there
    with pytest.raises(MissingDependency, match="needs a C\\+\\+ compiler"):
        require_a_compiler_for_compile("cpu")


def test_compile_draws_patch_dropouts_masks_from_torchs_generator(tmp_path, monkeypatch):
    # Inductor's own random numbers drew other masks than eager mode: a compiled run differed from the same run
    # uncompiled (also after a resume turning compile off), and its accumulated micro-batches from one whole batch.
    # The option is checked here; test_a_compiled_run_with_patch_dropout_equals_the_eager_one compiles (slow).
    compiled = []

    def recording_compile(module, **options):
        compiled.append(options)
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    import clip.train

    monkeypatch.setattr(clip.train, "require_a_compiler_for_compile", lambda device_type: None)  # nothing compiles
    train(tiny_config(tmp_path, "train.compile=true", "schedule.steps=1", "eval.every_n_steps=0"))
    assert compiled == [{"options": {"fallback_random": True}}]


@pytest.mark.slow  # about 30 s on 2 cores: inductor compiles the step
def test_a_compiled_run_with_patch_dropout_equals_the_eager_one(tmp_path):
    losses = {}
    for name, extra in [("eager", []), ("compiled", ["train.compile=true"]),
                        ("compiled in two micro-batches", ["train.compile=true", "train.accumulation_steps=2"])]:
        run_dir = tmp_path / name.replace(" ", "_")
        train(tiny_config(run_dir, "train.patch_dropout=0.5", "schedule.steps=2", "eval.every_n_steps=0", *extra))
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]
        torch._dynamo.reset()
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=0)
    assert losses["compiled in two micro-batches"] == pytest.approx(losses["eager"], rel=1e-5, abs=0)

def signal_during_evaluation(monkeypatch, call: int, signum: int = signal.SIGTERM) -> None:
    """Delivers `signum` to this process inside the `call`-th evaluation, before it computes anything."""
    import clip.train as train_module

    real, calls = train_module.run_evaluations, {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_evaluations", signalling)


def stop_in_the_first_evaluation(args: list[str], monkeypatch, caplog, step: int) -> None:
    """main(args) signalled in its first evaluation, that of `step`: it saves that step owing it, exits 75."""
    signal_during_evaluation(monkeypatch, 1)
    with caplog.at_level("WARNING", logger="clip.train"):
        assert main(args) == 75
    assert f"step {step} evaluation abandoned to stop: the resumed run makes it up first" in caplog.text
    monkeypatch.undo()


def evaluated_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open() if "zeroshot/" in line]


def test_a_signal_in_the_final_evaluation_exits_75_and_the_next_start_evaluates(tmp_path, monkeypatch):
    # The evaluation may outlast the scheduler's grace period: it is abandoned (the weights are saved already),
    # the status asks for a requeue, and the requeued run only evaluates.
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "schedule.steps=2", "eval.every_n_steps=0"]
    signal_during_evaluation(monkeypatch, 1)
    assert main(args) == 75
    monkeypatch.undo()
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2 and not (tmp_path / "results.json").exists()
    assert not any("zeroshot/" in line for line in (tmp_path / "metrics.jsonl").open())
    assert main(args) == 0
    assert "zeroshot/" in (tmp_path / "results.json").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_signal_in_an_evaluation_during_training_saves_at_once_and_resumes(tmp_path, monkeypatch, caplog):
    # One process: the evaluation at step 3 is abandoned, step 3 is saved, and the run exits 75.
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "checkpoint.every_n_steps=0"]
    stop_in_the_first_evaluation(args, monkeypatch, caplog, 3)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    # Stopped again in the made-up step-3 evaluation, before any step: nothing is saved, it is still owed
    signal_during_evaluation(monkeypatch, 1)
    with caplog.at_level("WARNING", logger="clip.train"):
        assert main(args) == 75
    assert "step 3 evaluation abandoned again to stop: still owed" in caplog.text
    monkeypatch.undo()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert ckpt.load_latest_checkpoint(tmp_path)["evaluation_owed"]
    assert main(args) == 0
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 6
    assert evaluated_steps(tmp_path) == [3, 6]  # the abandoned evaluation, made up on resuming



def test_a_signal_in_the_first_wait_after_making_up_an_owed_evaluation_saves_it_made_up(tmp_path, monkeypatch, caplog):
    # The resumed run makes up the step-3 evaluation, then a signal comes while it waits for its first batch: the
    # step-3 checkpoint was left owing it, and the next start evaluated step 3 once more
    import contextlib

    from clip.data.loader import TrainData

    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "checkpoint.every_n_steps=0"]
    stop_in_the_first_evaluation(args, monkeypatch, caplog, 3)
    real_batches = TrainData.batches

    def signalled_in_the_first_wait(self, while_waiting=contextlib.nullcontext):
        @contextlib.contextmanager
        def signalled():
            with while_waiting():
                os.kill(os.getpid(), signal.SIGTERM)
                yield

        return real_batches(self, signalled)

    monkeypatch.setattr(TrainData, "batches", signalled_in_the_first_wait)
    with caplog.at_level("WARNING", logger="clip.train"):
        assert main(args) == 75
    assert "stopped while waiting for the batch of step 4: saving step 3" in caplog.text
    monkeypatch.undo()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert not ckpt.load_latest_checkpoint(tmp_path)["evaluation_owed"]
    evaluations = count_evaluations(monkeypatch)
    assert main(args) == 0
    assert evaluations == [6] and evaluated_steps(tmp_path) == [3, 6]


def signal_in_a_wait_for_a_batch(monkeypatch, wait: int) -> None:
    """Sends SIGTERM to this process in its `wait`-th wait for a training batch (that of step `wait`)."""
    import contextlib

    from clip.data.loader import TrainData

    real_batches, waits = TrainData.batches, {"n": 0}

    def signalled_in_that_wait(self, while_waiting=contextlib.nullcontext):
        @contextlib.contextmanager
        def signalled():
            with while_waiting():
                waits["n"] += 1
                if waits["n"] == wait:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield

        return real_batches(self, signalled)

    monkeypatch.setattr(TrainData, "batches", signalled_in_that_wait)


def test_a_stop_in_the_wait_after_a_skipped_step_counts_that_step_in_its_checkpoint(tmp_path, monkeypatch):
    # Logged every 10 steps, step 2's verdict (a non-finite loss, skipped on the device) is read a step late: a
    # stop in the wait for step 3's batch saves step 2, whose counts must include it
    poison_loss(monkeypatch, {2})
    signal_in_a_wait_for_a_batch(monkeypatch, 3)
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "logging.every_n_steps=10",
                 "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]) == 75
    state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["step"] == 2 and state["metrics"]["nonfinite_steps_total"] == 1


def count_evaluations(monkeypatch) -> list[int]:
    """The steps evaluated from now on, in order (run_evaluations wrapped)."""
    import clip.train as train_module

    real, steps = train_module.run_evaluations, []

    def counting(*args, step, **kwargs):
        steps.append(step)
        return real(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "run_evaluations", counting)
    return steps

def test_weights_and_biases_gets_the_evaluation_a_resumed_run_makes_up(tmp_path, monkeypatch, caplog):
    # The interrupted attempt logged step 3's training record, so the resumed W&B run starts at step 4, and the
    # made-up step-3 evaluation, logged at step 3, was dropped by W&B (metrics.jsonl and TensorBoard had it)
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "checkpoint.every_n_steps=0", "logging.wandb=true"]
    stop_in_the_first_evaluation(args, monkeypatch, caplog, 3)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(args) == 0
    evaluations = [(step, data["evaluation_step"]) for step, data in fake.logged if "zeroshot/synthetic/top1" in data]
    assert evaluations == [(4, 3), (6, 6)]  # at W&B's own step, drawn at the step it evaluates
    # Dropped only: the repeats of steps W&B has from before, if any; the training records after the made-up
    # evaluation, from W&B's own step on, were dropped when it was logged without a step, closing that step's row
    assert all(step <= 3 and "loss" in data for step, data in fake.ignored), fake.ignored
    assert [step for step, data in fake.logged if "loss" in data] == [1, 2, 3, 4, 5, 6]


def test_an_owed_evaluation_made_up_twice_is_recorded_once(tmp_path, monkeypatch):
    # Pre-empted in the step-3 evaluation (owed), resumed (made up, recorded), then killed before the next
    # checkpoint: the next start resumes from the same owing checkpoint and evaluates step 3 once more.
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "checkpoint.every_n_steps=0"]
    signal_during_evaluation(monkeypatch, 1)
    assert main(args) == 75
    monkeypatch.undo()
    config = tiny_config(tmp_path, "checkpoint.every_n_steps=0")
    train(config, stop_at_step=5)
    ckpt.checkpoint_path(tmp_path, 5).unlink()  # as if killed before it was saved
    assert ckpt.load_latest_checkpoint(tmp_path)["evaluation_owed"]
    train(config)
    assert evaluated_steps(tmp_path) == [3, 6]


def test_eval_at_start_evaluates_the_starting_weights_once_before_the_first_step(tmp_path, monkeypatch):
    # A fine-tuning run's baseline: without it the first evaluation came after every_n_steps of training, and
    # the starting weights' accuracy took a separate clip-zeroshot run over the same datasets
    import clip.train as train_module

    train(tiny_config(tmp_path / "pretrained", "schedule.steps=1", "eval.every_n_steps=0"))
    real, seen = train_module.run_evaluations, []

    def recording(model, *args, **kwargs):
        seen.append((kwargs["step"], {name: value.clone() for name, value in model.state_dict().items()}))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "run_evaluations", recording)
    tuned = tmp_path / "tuned"
    config = tiny_config(tuned, f"train.init_weights={tmp_path / 'pretrained'}", "eval.at_start=true")
    train(config, stop_at_step=3)
    train(config)  # resumed: the start is not evaluated again
    assert [step for step, _ in seen] == [0, 3, 6]
    pretrained = final_weights(tmp_path / "pretrained")
    assert all(torch.equal(seen[0][1][name], pretrained[name]) for name in pretrained)
    assert evaluated_steps(tuned) == [0, 3, 6]
    assert "zeroshot/" not in (tuned / "metrics.jsonl").read_text().splitlines()[1]  # step 1's training record
    seen.clear()
    train(tiny_config(tmp_path / "plain", "schedule.steps=3"))
    assert [step for step, _ in seen] == [3]  # off by default


def test_a_signal_in_the_starting_evaluation_saves_step_0_owing_it(tmp_path, monkeypatch, caplog):
    # Nothing was trained, but the run was stopped with status 75: the run started again makes the step-0
    # evaluation up first, and records it once
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.at_start=true"]
    stop_in_the_first_evaluation(args, monkeypatch, caplog, 0)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [0]
    assert ckpt.load_latest_checkpoint(tmp_path)["evaluation_owed"]
    assert main(args) == 0
    assert evaluated_steps(tmp_path) == [0, 3, 6]


def test_a_new_run_started_again_after_a_kill_before_its_first_checkpoint_records_its_start_evaluation_once(
    tmp_path, monkeypatch
):
    # The attempt killed (SIGKILL: no checkpoint) after its step-0 evaluation left that record; the run started
    # again evaluated step 0 anew and kept both
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.at_start=true", "schedule.steps=3"]

    def killed(*args, **kwargs):
        raise SystemExit("killed")  # at the first save, as a SIGKILL there would leave the run

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_checkpoint", killed)
        with pytest.raises(SystemExit):
            main(args)
    assert evaluated_steps(tmp_path) == [0] and not ckpt.list_checkpoints(tmp_path)
    assert main(args) == 0
    assert evaluated_steps(tmp_path) == [0, 3]


def test_a_signal_in_the_last_step_or_the_final_save_skips_the_final_evaluation(tmp_path, monkeypatch):
    # Both come before the evaluation, under the same signal handling: it is skipped, the status asks for a
    # requeue, and the run started again only evaluates.
    args = [str(DEMO), "--output-dir", str(tmp_path / "step"), *TINY, "schedule.steps=2", "eval.every_n_steps=0"]
    signal_at_step(monkeypatch, 2, signal.SIGTERM, "before_forward")
    assert main(args) == 75
    monkeypatch.undo()
    assert ckpt.load_latest_checkpoint(tmp_path / "step")["step"] == 2
    assert not (tmp_path / "step" / "results.json").exists()
    assert main(args) == 0 and (tmp_path / "step" / "results.json").exists()

    real_save = ckpt.save_checkpoint

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a default handler here would kill the process mid-save
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", signalled_save)
    args = [str(DEMO), "--output-dir", str(tmp_path / "save"), *TINY, "schedule.steps=2", "eval.every_n_steps=0",
            "checkpoint.every_n_steps=0"]
    assert main(args) == 75
    monkeypatch.undo()
    assert ckpt.load_latest_checkpoint(tmp_path / "save")["step"] == 2
    assert main(args) == 0 and (tmp_path / "save" / "results.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_once_the_final_evaluation_is_done_lets_the_run_finish_and_says_so(tmp_path, monkeypatch, signum):
    # The final checkpoint and evaluation are done, only results.json is left to write: nothing can be stopped
    # early any more, so the run finishes (status 0). The log said "stopping at the next safe point".
    import clip.train as train_module

    real_write_results = train_module.write_results

    def signalled_write_results(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real_write_results(*args, **kwargs)

    monkeypatch.setattr(train_module, "write_results", signalled_write_results)
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "schedule.steps=2", "eval.every_n_steps=0"]) == 0
    assert "zeroshot/" in (tmp_path / "results.json").read_text()
    logged = (tmp_path / "train.log").read_text()
    assert "stopping at the next safe point" not in logged
    assert (f"received signal {signum} after the run's final checkpoint and evaluation: it is complete, and exits "
            "as finished once its results are written") in logged


def test_a_signal_in_the_final_save_of_a_run_without_evaluations_lets_it_finish(tmp_path, monkeypatch):
    # Nothing to evaluate: once the final checkpoint is written the run is complete. It said "final evaluation
    # abandoned" and exited 75, for a rerun that had nothing left to do (several ranks exited 0).
    real_save = ckpt.save_checkpoint

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", signalled_save)
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "schedule.steps=2", "eval.every_n_steps=0",
            "eval.zeroshot=[]", "checkpoint.every_n_steps=0"]
    assert main(args) == 0
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 2
    logged = (tmp_path / "train.log").read_text()
    assert "abandoned" not in logged and "exit status 75" not in logged
    assert ("the signal came when only the final checkpoint and evaluation were left, and they are done: the run is "
            "complete and exits as finished") in logged


def test_an_evaluation_interruption_passes_an_except_exception_on_its_way(tmp_path, monkeypatch):
    # e.g. an image decoder's fallback around the moment the signal arrives: the evaluation is still abandoned
    import time

    import clip.train as train_module

    def evaluation_with_a_fallback(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, inside the try
        except Exception:
            pass
        return {"zeroshot/synthetic/top1": 1.0}

    monkeypatch.setattr(train_module, "run_evaluations", evaluation_with_a_fallback)
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "schedule.steps=2", "eval.every_n_steps=0"]
    assert main(args) == 75 and not (tmp_path / "results.json").exists()


def test_evaluating_a_finished_run_again_replaces_its_final_evaluation_record(tmp_path):
    config = tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0")
    train(config)
    train(config)  # finished: only evaluates
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    evaluations = [r for r in records if any(key.startswith("zeroshot/") for key in r)]
    assert [r["step"] for r in evaluations] == [2]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # the training records stay


def test_a_finished_run_evaluated_again_with_other_settings_keeps_the_earlier_results(tmp_path, caplog):
    # The new figures (here of twice the images) replaced results.json, while config.toml and the checkpoint
    # still named the earlier settings: nothing said which settings gave which figures
    config = tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0")
    train(config)
    first = json.loads((tmp_path / "results.json").read_text())
    assert first["eval"]["zeroshot"][0]["num_samples"] == config.eval.zeroshot[0].num_samples  # what gave them
    train(config)  # the same settings: replaced, as the rerun of an evaluation
    # so with settings that change no figure (a smaller batch after running out of memory)
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "eval.batch_size=3", "eval.workers=0"))
    assert not list(tmp_path.glob("results_kept_*.json"))
    first = json.loads((tmp_path / "results.json").read_text())
    more = config.eval.zeroshot[0].num_samples * 2
    with caplog.at_level(logging.INFO, logger="clip.train"):
        train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", f"eval.zeroshot.0.num_samples={more}"))
    (kept,) = tmp_path.glob("results_kept_*.json")
    assert json.loads(kept.read_text()) == first
    assert json.loads((tmp_path / "results.json").read_text())["eval"]["zeroshot"][0]["num_samples"] == more
    assert f"results.json holds the evaluation of other settings (eval.zeroshot.0.num_samples): kept as {kept.name}" \
        in caplog.text


def test_results_name_the_step_of_their_training_figures_where_it_is_not_their_step(tmp_path, monkeypatch):
    # Stopped at step 3, logged at step 2, then evaluated only (the run's length lowered to its checkpoint's):
    # results.json said step 3 beside step 2's loss and rate
    signal_in_a_wait_for_a_batch(monkeypatch, 4)
    common = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "logging.every_n_steps=2", "checkpoint.every_n_steps=0"]
    assert main([*common, "schedule.steps=6"]) == 75
    monkeypatch.undo()
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 3
    assert main([*common, "schedule.steps=3"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
    assert results["step"] == 3 and results.get("training_figures_step") == 2 == logged[-1]["step"]
    assert results["loss"] == logged[-1]["loss"]
    assert "training_figures_step" not in train(tiny_config(tmp_path / "whole", "schedule.steps=3"))


def test_lowering_the_steps_below_the_checkpoints_evaluates_it_and_says_so(tmp_path, caplog):
    # It read "finished its 3 steps already", of a run now configured for 2
    train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0", "eval.zeroshot=[]"))
    with caplog.at_level(logging.INFO, logger="clip.train"):
        results = train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "eval.zeroshot=[]"))
    assert results["step"] == 3 and "finished its" not in caplog.text
    assert "has a checkpoint at step 3, past schedule.steps = 2: evaluating that checkpoint only" in caplog.text


def test_rerunning_a_finished_run_with_other_settings_leaves_its_record_alone(tmp_path, caplog):
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0"))
    checkpoint = ckpt.list_checkpoints(tmp_path)[0][1]
    recorded = (checkpoint.read_bytes(), (tmp_path / "config.toml").read_text())
    with caplog.at_level(logging.INFO, logger="clip.train"):
        results = train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "optimizer.lr=5e-4"))
    assert results["step"] == 2 and "finished its 2 steps already" in caplog.text
    assert "optimizer.lr: 0.001 -> 0.0005" in caplog.text  # named, though nothing is trained under it
    assert (checkpoint.read_bytes(), (tmp_path / "config.toml").read_text()) == recorded


def test_resuming_with_another_loss_is_refused_by_name_and_keeps_the_config(tmp_path):
    train(tiny_config(tmp_path), stop_at_step=3)
    recorded = (tmp_path / "config.toml").read_text()
    with pytest.raises(ValueError, match="loss.kind='clip', not 'siglip'"):
        train(tiny_config(tmp_path, "loss.kind=siglip"))
    assert (tmp_path / "config.toml").read_text() == recorded


def test_resuming_with_the_embeddings_decayed_regroups_the_optimizer_state(tmp_path, caplog):
    # The optimizer state of a run trained without decay on the embeddings (as every run before the setting
    # existed) continues under the paper's grouping: torch's load_state_dict refuses groups of other sizes.
    train(tiny_config(tmp_path, "optimizer.decay_embeddings=false", "eval.every_n_steps=0"), stop_at_step=3)
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        assert train(tiny_config(tmp_path, "eval.every_n_steps=0"))["step"] == 6
    assert "optimizer.decay_embeddings: false -> true" in caplog.text
    assert "is from before optimizer.decay_embeddings" not in caplog.text  # its checkpoint names the setting


def test_a_checkpoint_without_parameter_names_is_regrouped_by_its_own_decay_embeddings(tmp_path, caplog):
    # Checkpoints from before optimizer_parameter_names was saved: the saved moments' order is the grouping
    # of the checkpoint's decay_embeddings, not this run's (taken from this run's, the group sizes disagree).
    train(tiny_config(tmp_path, "optimizer.decay_embeddings=false", "eval.every_n_steps=0"), stop_at_step=3)
    path = ckpt.list_checkpoints(tmp_path)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["optimizer_parameter_names"]
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        assert train(tiny_config(tmp_path, "eval.every_n_steps=0"))["step"] == 6
    assert "optimizer.decay_embeddings: false -> true" in caplog.text


def test_a_checkpoint_from_before_decay_embeddings_existed_counts_as_false(tmp_path, caplog):
    from clip.config import to_dict
    from clip.resume import check_resumable

    current = to_dict(tiny_config(tmp_path, "optimizer.decay_embeddings=false"))
    older = {**current, "optimizer": {k: v for k, v in current["optimizer"].items() if k != "decay_embeddings"},
             "train": {k: v for k, v in current["train"].items() if k not in ("lock_image", "lock_text")}}
    with caplog.at_level(logging.WARNING, logger="clip.resume"):
        check_resumable(older, current, tmp_path)
    # nothing changed: it was trained that way, and settings newer than it are at their defaults
    assert "differ" not in caplog.text
    # Resumed under today's default, the warning says how to keep the way it was trained
    with caplog.at_level(logging.WARNING, logger="clip.resume"):
        check_resumable(older, to_dict(tiny_config(tmp_path)), tmp_path)
    assert "optimizer.decay_embeddings: false -> true (the checkpoint is from before optimizer.decay_embeddings, " \
        "whose default is now true: optimizer.decay_embeddings=false keeps its embeddings undecayed)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.resume"):  # the initial weights: only a new run reads them
        check_resumable(current, {**current, "train": {**current["train"], "init_weights": "ViT-B/32"}}, tmp_path)
    assert "differ" not in caplog.text


def test_the_decay_embeddings_hint_is_only_for_a_checkpoint_from_before_the_setting_resumed_with_it_on(
    tmp_path, caplog,
):
    # Its advice to set optimizer.decay_embeddings=false is for an older checkpoint's run, going on with it true
    from clip.config import to_dict
    from clip.resume import check_resumable

    undecayed = to_dict(tiny_config(tmp_path, "optimizer.decay_embeddings=false"))
    with caplog.at_level(logging.WARNING, logger="clip.resume"):  # a checkpoint that names the setting
        check_resumable(undecayed, to_dict(tiny_config(tmp_path)), tmp_path)
    assert "optimizer.decay_embeddings: false -> true" in caplog.text and "is from before" not in caplog.text
    caplog.clear()
    older = {**undecayed, "optimizer": {k: v for k, v in undecayed["optimizer"].items() if k != "decay_embeddings"}}
    lower_lr = {**undecayed, "optimizer": {**undecayed["optimizer"], "lr": undecayed["optimizer"]["lr"] / 2}}
    with caplog.at_level(logging.WARNING, logger="clip.resume"):  # one from before it, resumed with it off
        check_resumable(older, lower_lr, tmp_path)
    assert "optimizer.lr:" in caplog.text and "is from before" not in caplog.text


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model a run starts from: its step-0 checkpoint (stop_at_step=0 saves before any step)."""
    return ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1][1])["model"]


def test_fine_tuning_at_another_image_size_starts_from_the_runs_weights_with_a_resampled_position_grid(
    tmp_path, caplog
):
    # As the paper's ViT-L/14@336px was made: another run's weights, trained on at a higher resolution
    from clip.position_grid import resize_position_embedding

    train(tiny_config(tmp_path / "pretrained", "schedule.steps=1", "schedule.warmup_steps=0", "eval.every_n_steps=0"))
    pretrained = final_weights(tmp_path / "pretrained")
    tuned = tmp_path / "tuned"
    tuning = [f"train.init_weights={tmp_path / 'pretrained'}", "model.vision.image_size=48", "eval.every_n_steps=0",
              "schedule.steps=2", "schedule.warmup_steps=1"]
    with caplog.at_level(logging.INFO, logger="clip"):
        train(tiny_config(tuned, *tuning), stop_at_step=0)
    start, grid = initial_weights(tuned), "visual.positional_embedding"
    assert torch.equal(start[grid], resize_position_embedding(pretrained[grid], 6))
    assert all(torch.equal(start[name], value) for name, value in pretrained.items() if name != grid)
    assert "its image position embeddings are resampled from a 4x4 grid to the configured 48 px's 6x6" in caplog.text
    results = train(tiny_config(tuned, *tuning))
    assert results["step"] == 2 and clip.load(tuned, device="cpu")[0].visual.input_resolution == 48


def test_fine_tuning_starts_from_another_runs_weights_and_resumes_from_its_own(tmp_path):
    train(tiny_config(tmp_path / "pretrained", "schedule.steps=2", "eval.every_n_steps=0"))
    pretrained = final_weights(tmp_path / "pretrained")
    tuned = tmp_path / "tuned"
    extra = [f"train.init_weights={tmp_path / 'pretrained'}", "eval.every_n_steps=0", "train.seed=7"]
    train(tiny_config(tuned, *extra), stop_at_step=0)
    start = initial_weights(tuned)
    assert start.keys() == pretrained.keys()
    assert all(torch.equal(start[name], pretrained[name]) for name in pretrained)
    # A resume reads its own checkpoint, never the initial weights again (they may be gone by then).
    (tmp_path / "pretrained" / "checkpoints").rename(tmp_path / "moved")
    assert train(tiny_config(tuned, *extra))["step"] == 6


def test_a_fine_tuning_run_records_which_initial_weights_it_started_from(tmp_path):
    # train.init_weights names a run directory, whose newest checkpoint moves on, or a file that may be replaced:
    # the fine-tuned run's checkpoints and results.json kept only the name as given (config.toml), so which
    # weights it had started from was nowhere but in train.log
    pretrained = tmp_path / "pretrained"
    train(tiny_config(pretrained, "schedule.steps=2", "eval.every_n_steps=0"))
    tuned = tmp_path / "tuned"
    extra = [f"train.init_weights={pretrained}", "eval.every_n_steps=0"]
    train(tiny_config(tuned, *extra), stop_at_step=0)
    train(tiny_config(pretrained, "schedule.steps=4", "eval.every_n_steps=0"))  # its newest checkpoint moves on
    train(tiny_config(tuned, *extra))  # resumed: the record comes from its own checkpoint
    started_from = ckpt.checkpoint_path(pretrained, 2)
    expected = {"given": str(pretrained), "path": str(started_from.resolve()), "step": 2, "released": None,
                "sha256": hashlib.sha256(started_from.read_bytes()).hexdigest()}
    assert json.loads((tuned / "results.json").read_text())["init_weights"] == expected
    assert ckpt.read_checkpoint(ckpt.list_checkpoints(tuned)[0][1])["init_weights"] == expected
    assert json.loads((pretrained / "results.json").read_text())["init_weights"] is None  # from scratch


@pytest.mark.parametrize("warmup", [3, 4])
def test_the_warning_of_a_warmup_as_long_as_the_run_says_what_its_rates_are(tmp_path, caplog, warmup):
    # A warmup of exactly `steps` reaches the peak at the last step; the warning said it never did.
    from clip.run_start import warn_about_unlikely_settings

    config = tiny_config(tmp_path, "schedule.steps=3", f"schedule.warmup_steps={warmup}")
    rates = [learning_rate(step, 1.0, config.schedule) for step in range(3)]
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        warn_about_unlikely_settings(config, 8, 100, None, torch.device("cpu"))
    if warmup == 3:
        assert rates[-1] == 1.0 and "never reaches" not in caplog.text
        assert "reaches optimizer.lr at the last step only and the cosine decay never starts" in caplog.text
    else:
        assert rates[-1] == 0.75 and "never reaches optimizer.lr (the last step's is 0.75 of it)" in caplog.text


def test_fine_tuning_on_synthetic_data_only_is_named(tmp_path, caplog):
    # [data] left at its default (a config built in Python, the demo recipe given init_weights) tuned the
    # pretrained weights to the demo's shapes without a word
    from clip.run_start import warn_about_unlikely_settings

    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,caption\n")
    cases = [("synthetic", [f"train.init_weights={tmp_path}"], None, True),
             ("from scratch", [], None, False),
             ("resumed", [f"train.init_weights={tmp_path}"], {"train": {"init_weights": str(tmp_path)}}, False),
             ("own pairs", [f"train.init_weights={tmp_path}", "data.sources.0.kind=manifest",
                            f"data.sources.0.path={manifest}", "data.sources.0.num_samples=none"], None, False)]
    for name, extra, saved, warned in cases:
        caplog.clear()
        config = tiny_config(tmp_path, *extra)
        with caplog.at_level(logging.WARNING, logger="clip.train"):
            warn_about_unlikely_settings(config, 8, 100, saved, torch.device("cpu"))
        named = f"train.init_weights with synthetic data only: {tmp_path} is fine-tuned on the demo's generated shapes"
        assert (named in caplog.text) == warned, name


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_global_batch_of_one_pair_is_refused(tmp_path, loss):
    # The CLIP loss of one pair is log(1) = 0: a fine-tune at batch 1 ran every step with loss 0.0 and
    # returned its initial weights (decayed), without a word
    with pytest.raises(BadTrainingInput, match="a global batch of one image-text pair has no negatives"):
        train(tiny_config(tmp_path / "run", "train.batch_size=1", f"loss.kind={loss}", "eval.every_n_steps=0"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_siglip_run_starts_from_siglips_temperature_also_over_loaded_weights(tmp_path):
    from clip.loss import SIGLIP_INITIAL_LOGIT_SCALE

    train(tiny_config(tmp_path / "pretrained", "schedule.steps=2", "eval.every_n_steps=0"))
    for run, extra in (("fresh", []), ("tuned", [f"train.init_weights={tmp_path / 'pretrained'}"])):
        train(tiny_config(tmp_path / run, "loss.kind=siglip", "eval.every_n_steps=0", *extra), stop_at_step=0)
        assert initial_weights(tmp_path / run)["logit_scale"].item() == pytest.approx(SIGLIP_INITIAL_LOGIT_SCALE)


def test_fine_tuning_a_siglip_model_with_siglip_keeps_its_learned_temperature_and_bias(tmp_path):
    # The reset to SigLIP's starting values is for weights trained without a bias (a CLIP-loss model); a SigLIP
    # model's own temperature and bias (its checkpoint's loss_parameters) were reset too, so the fine-tune did
    # not start from its logits.
    train(tiny_config(tmp_path / "pretrained", "loss.kind=siglip", "optimizer.lr=0.05", "schedule.steps=2",
                      "eval.every_n_steps=0"))
    pretrained = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / "pretrained")[0][1])
    bias = pretrained["loss_parameters"]["logit_bias"]
    assert pretrained["model"]["logit_scale"].exp().item() != pytest.approx(10) and bias.item() != pytest.approx(-10)
    tuned = tmp_path / "tuned"
    init = f"train.init_weights={tmp_path / 'pretrained'}"
    train(tiny_config(tuned, "loss.kind=siglip", "eval.every_n_steps=0", init), stop_at_step=0)
    start = ckpt.read_checkpoint(ckpt.list_checkpoints(tuned)[-1][1])
    assert torch.equal(start["model"]["logit_scale"], pretrained["model"]["logit_scale"])
    assert torch.equal(start["loss_parameters"]["logit_bias"], bias)


def test_a_siglip_run_loads_with_its_learned_bias_in_the_logits(tmp_path):
    # The bias is the loss's parameter, saved beside the weights: clip.load dropped it, so the sigmoid of the
    # logits was no match probability.
    from clip.loss import SIGLIP_INITIAL_LOGIT_BIAS

    train(tiny_config(tmp_path / "siglip", "loss.kind=siglip", "eval.every_n_steps=0", "schedule.steps=2"))
    saved = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / "siglip")[0][1])["loss_parameters"]["logit_bias"]
    model, preprocess = clip.load(tmp_path / "siglip", device="cpu")
    assert model.logit_bias.item() == saved.item() != 0 and abs(saved.item() - SIGLIP_INITIAL_LOGIT_BIAS) < 1
    assert "logit_bias" not in model.state_dict()  # the state dict keeps OpenAI's keys
    images = torch.rand(2, 3, 32, 32)
    texts = clip.tokenize(["a red circle", "a blue square"], context_length=model.context_length)
    with torch.no_grad():
        logits, _ = model(images, texts)
        cosine = model.encode_image(images, normalize=True) @ model.encode_text(texts, normalize=True).t()
    torch.testing.assert_close(logits, model.logit_scale.exp() * cosine + saved)
    train(tiny_config(tmp_path / "clip", "eval.every_n_steps=0", "schedule.steps=1"))
    assert clip.load(tmp_path / "clip", device="cpu")[0].logit_bias is None  # the CLIP loss has none


WIDE = ["model.vision.width=64", "model.vision.heads=1", "model.text.width=64", "model.text.heads=1"]


@pytest.mark.parametrize("widths", [WIDE, []], ids=["inferable", "narrow"])
def test_fine_tuning_from_a_weights_file_in_openais_layout(tmp_path, monkeypatch, capsys, widths):
    # A plain state dict records no architecture: heads and activation are the configured ones, the rest must
    # fit (compared field by field where OpenAI's one-head-per-64-channels convention reads the shapes).
    source = clip.create_model(tiny_config(tmp_path / "unused", *widths).model)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    config = tiny_config(tmp_path / "run", *widths, f"train.init_weights={tmp_path / 'weights.pt'}")
    train(config, stop_at_step=0)
    start = initial_weights(tmp_path / "run")
    assert all(torch.equal(start[name], value) for name, value in source.state_dict().items())
    # A released name is downloaded (here from a file:// URL) and checked against its SHA256 first.
    import hashlib

    from clip.released import RELEASED_WEIGHTS, ReleasedWeights

    from clip.architectures import RELEASED_ARCHITECTURES

    digest = hashlib.sha256((tmp_path / "weights.pt").read_bytes()).hexdigest()
    monkeypatch.setitem(RELEASED_WEIGHTS, "RN50", ReleasedWeights(url=(tmp_path / "weights.pt").as_uri(), sha256=digest))
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "RN50", source.config)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    train(tiny_config(tmp_path / "released", *widths, "train.init_weights=RN50"), stop_at_step=0)
    assert (tmp_path / "cache" / "weights.pt").exists()
    assert all(torch.equal(initial_weights(tmp_path / "released")[n], v) for n, v in source.state_dict().items())
    # A released model's architecture is known whole: another activation is refused, not loaded silently
    with pytest.raises(clip.weights_file.WeightsFileError, match="model.activation: 'gelu' there, 'quick_gelu' here"):
        train(tiny_config(tmp_path / "act", *widths, "model.activation=quick_gelu", "train.init_weights=RN50"))
    # A download that fails (here: the file no longer matches its SHA256) is one error line, status 1
    monkeypatch.setitem(RELEASED_WEIGHTS, "RN50", ReleasedWeights(url=(tmp_path / "weights.pt").as_uri(), sha256="0" * 64))
    args = [str(DEMO), "--output-dir", str(tmp_path / "bad"), *TINY, *widths, "train.init_weights=RN50"]
    assert main(args) == 1
    # The cached copy no longer matches either: said as a log line, in train.log too, not as Python's warning
    # with the library's source line
    logged = (tmp_path / "bad" / "train.log").read_text()
    assert re.search(r"WARNING py\.warnings: .+weights\.pt exists but its SHA256 is \w+, not the expected 0+; "
                     r"downloading it again\n", logged)
    assert "warnings.warn(" not in capsys.readouterr().err
    # A narrow plain file of other shapes fails on them
    other = clip.create_model(tiny_config(tmp_path / "unused", *widths, "model.embed_dim=16").model)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(clip.weights_file.WeightsFileError, match="embed_dim|text_projection"):
        train(tiny_config(tmp_path / "mismatch", *widths, f"train.init_weights={tmp_path / 'other.pt'}"))


def test_fine_tuning_weights_of_another_architecture_are_refused_by_name(tmp_path, capsys):
    source = clip.create_model(tiny_config(tmp_path / "unused", *WIDE).model)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    overrides = [*WIDE, "model.vision.layers=2", f"train.init_weights={tmp_path / 'weights.pt'}"]
    with pytest.raises(clip.weights_file.WeightsFileError, match="model.vision.layers: 1 there, 2 here"):
        train(tiny_config(tmp_path / "run", *overrides))
    args = [str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, *overrides]
    capsys.readouterr()
    assert main(args) == 2  # bad input: one error line, no traceback
    assert main([*args[:-1], "train.init_weights=ViT-B/33"]) == 2  # not a released name, not a file
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("clip-train: ") for line in errors), errors
    assert "model.vision.layers: 1 there, 2 here" in errors[0] and "ViT-B/33" in errors[1]


@pytest.mark.parametrize("variables", [
    {"RANK": "0", "WORLD_SIZE": "2"},  # no LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    {"RANK": "0"},  # no WORLD_SIZE either: it ran as one process
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[1-"},
    {"SLURM_PROCID": "first", "SLURM_NTASKS": "2", "MASTER_ADDR": "node1"},
])
def test_launcher_variables_that_make_no_run_are_one_error_line(tmp_path, capsys, monkeypatch, variables):
    # They were tracebacks, raised before logging was set up
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURMD_NODENAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("clip-train: "), errors
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_a_device_this_machine_lacks_is_one_error_line(tmp_path, capsys):
    # It was torch's RuntimeError traceback from init_distributed, with exit status 1 (a failure, not bad input)
    capsys.readouterr()
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, "train.device=cuda:1"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["clip-train: train.device = 'cuda:1', but CUDA is not available on this machine"], errors


RESNET = ["model.vision.kind=resnet", "model.vision.width=8", "model.vision.layers=[1, 1, 1, 1]",
          "model.vision.heads=2"]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_locked_tower_keeps_its_weights_and_statistics_while_the_other_learns(tmp_path, tower):
    # LiT: a ResNet image tower (with BatchNorm) or the text tower locked; evaluations every 3 steps put the
    # model through eval mode and back, which must leave the locked tower's statistics alone.
    extra = [*RESNET, f"train.lock_{tower}=true", "schedule.steps=6"]
    train(tiny_config(tmp_path, *extra), stop_at_step=0)
    start = initial_weights(tmp_path)
    train(tiny_config(tmp_path, *extra))
    state = ckpt.load_latest_checkpoint(tmp_path)
    end = state["model"]
    locked = (lambda name: name.startswith("visual.")) if tower == "image" else (
        lambda name: not name.startswith("visual.") and name != "logit_scale")
    assert any(locked(name) and "running_mean" in name for name in end) or tower == "text"
    for name, value in end.items():
        if locked(name):  # weights and BatchNorm buffers as they started
            assert torch.equal(value, start[name]), name
    moved = [name for name, value in end.items() if not locked(name) and not torch.equal(value, start[name])]
    assert any(name.startswith("visual.") != (tower == "image") for name in moved)
    # the optimizer holds state for the trained parameters only
    names = state["optimizer_parameter_names"]
    assert names and not any(locked(name.removeprefix("clip.")) for name in names)


def test_a_run_may_lock_or_unlock_a_tower_when_it_resumes(tmp_path, caplog):
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_config(tmp_path, "eval.every_n_steps=0", "train.lock_image=true", "schedule.steps=4"))
    assert "train.lock_image: false -> true" in caplog.text and "left out" in caplog.text
    assert train(tiny_config(tmp_path, "eval.every_n_steps=0", "schedule.steps=5"))["step"] == 5  # unlocked again


def test_both_towers_locked_is_refused(tmp_path):
    from clip.config_io import ConfigError

    with pytest.raises(ConfigError, match="lock_text"):
        tiny_config(tmp_path, "train.lock_image=true", "train.lock_text=true")


def test_steps_logged_after_the_last_checkpoint_are_logged_once_after_resuming(tmp_path):
    # A run killed after step 5 whose last checkpoint is step 3: steps 4-5 run again on resume.
    extra = ["eval.every_n_steps=0", "checkpoint.every_n_steps=3"]
    train(tiny_config(tmp_path, *extra), stop_at_step=5)
    for step, path in ckpt.list_checkpoints(tmp_path):
        if step > 3:
            path.unlink()  # as if killed before the save at step 5
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 6, "loss": 1.')  # and in the middle of writing a record
    train(tiny_config(tmp_path, *extra))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_config_error_is_one_line_and_status_2(tmp_path, capsys):
    assert main([str(DEMO), "--output-dir", str(tmp_path), "train.batch_sise=8"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clip-train: ") and "batch_size" in error and "Traceback" not in error


def test_help_says_how_to_override_and_what_the_exit_statuses_mean(capsys):
    # The statuses (75: run again) were in the README alone; a missing config also named the optional overrides as
    # required ("the following arguments are required: config, section.key=value")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "data.sources.0.weight=2" in text and "75 stopped early with a checkpoint" in text and "CLIP_DEBUG=1" in text
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: config")


def test_an_empty_output_dir_option_is_a_config_error_not_the_configs_folder(tmp_path, monkeypatch, capsys):
    # `--output-dir "$RUN"` with RUN unset went on in the config's output_dir, perhaps another run's
    monkeypatch.chdir(tmp_path)
    assert main([str(DEMO), "--output-dir", "", *TINY, "schedule.steps=1", "eval.every_n_steps=0"]) == 2
    assert capsys.readouterr().err.strip() == "clip-train: output_dir must be a folder for the run, got ''"


def test_a_config_error_shows_its_traceback_under_clip_debug(tmp_path, monkeypatch, capsys):
    # The README's promise for every command's bad input: CLIP_DEBUG=1 adds the traceback to the line.
    monkeypatch.setenv("CLIP_DEBUG", "1")
    assert main([str(DEMO), "--output-dir", str(tmp_path), "train.batch_size=0"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and error.strip().splitlines()[-1].startswith("clip-train: train.batch_size")


def launched_as_rank(monkeypatch, rank: int) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(name, str(value))


def test_the_run_directory_keeps_the_log_of_every_start(tmp_path, caplog):
    # What happened to a run (resumes, signals, changed settings) was only in the scheduler's output files.
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]
    with caplog.at_level(logging.INFO):
        assert main([*args, "schedule.steps=3"]) == 0
        assert main([*args, "schedule.steps=4"]) == 0
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert any("INFO clip.train: model: " in line for line in lines)
    assert any("WARNING clip.resume: resuming " in line and "schedule.steps: 3 -> 4" in line for line in lines)
    assert lines.index(next(line for line in lines if "saved " in line and "step_00000004.pt" in line)) > 0
    # main's handler is gone once it returns (in-process callers do not gather one per call)
    assert not [h for h in logging.getLogger().handlers if str(tmp_path) in getattr(h, "baseFilename", "")]


def test_a_run_refused_after_its_log_began_says_why_in_train_log_too(tmp_path, capsys):
    # Bad input found once the run had started (init weights naming nothing, a resume refused) was printed to
    # stderr alone: train.log, where a requeued job's starts are kept, ended with a start line and no reason.
    args = [str(DEMO), "--output-dir", str(tmp_path), *TINY, f"train.init_weights={tmp_path / 'nowhere.pt'}"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("clip-train: ") and "nowhere.pt" in error[0]
    logged = (tmp_path / "train.log").read_text().splitlines()
    assert "ERROR clip.cli.train: " + error[0].removeprefix("clip-train: ") in logged[-1]


def test_a_config_error_under_a_launcher_is_said_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    # Every rank reads the same config: a 256-process job printed the same line 256 times.
    launched_as_rank(monkeypatch, 1)
    assert main([str(DEMO), "--output-dir", str(tmp_path), "train.batch_sise=8"]) == 2
    assert capsys.readouterr().err == ""
    launched_as_rank(monkeypatch, 0)
    assert main([str(DEMO), "--output-dir", str(tmp_path), "train.batch_sise=8"]) == 2
    assert capsys.readouterr().err.startswith("clip-train: ")
    # A config file that only rank 0's node has: the other rank says so itself, or nobody would
    launched_as_rank(monkeypatch, 1)
    assert main([str(tmp_path / "on_another_node.toml")]) == 2
    assert capsys.readouterr().err.startswith("clip-train (rank 1): config file ")


def test_another_ranks_failure_is_said_by_rank_0_alone(tmp_path, monkeypatch, capsys, caplog):
    # Every rank that did not fail raises the same pointer to the one that did (raise_on_every_rank): a 256-process
    # job printed "rank 0 could not take RUN_DIR (its error says why)" 255 times, rank 0's own line among them.
    import clip.cli.train as cli
    import clip.distributed
    from clip.distributed import DistributedInfo, raise_on_every_rank
    from clip.launcher import LauncherEnvironment
    from clip.run_lock import RunDirectoryInUse

    monkeypatch.setattr(clip.distributed, "any_rank", lambda flag, dist_info: True)  # some rank failed
    said_by_rank_0 = {"line": None}  # what rank 0 failed with: nothing (it did not fail), until set below
    monkeypatch.setattr(clip.distributed, "from_rank_zero", lambda value, dist_info: said_by_rank_0["line"])
    other = DistributedInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))

    def failing(own: BaseException | None, elsewhere: BaseException):
        def train(config, on_run_directory_held=None):
            raise_on_every_rank(own, other, elsewhere)
        return train

    config = tiny_config(tmp_path / "run")
    pointers = [RunDirectoryInUse("rank 0 could not take RUN_DIR (its error says why)"),  # status 2
                ckpt.CheckpointWriteError("rank 0 could not write the step 3 checkpoint (its log says why)")]  # 1
    for rank in (1, 0):  # rank 0 says the pointer where it did not fail itself
        launcher = LauncherEnvironment(rank=rank, world_size=2, local_rank=rank, master_addr="h", master_port=1,
                                       launcher="torchrun")
        for pointer, status in zip(pointers, (2, 1)):
            monkeypatch.setattr(cli, "train", failing(None, pointer))
            caplog.clear()
            assert cli.run(config, launcher) == status
            said = capsys.readouterr().err + caplog.text  # status 2's line is printed, status 1's logged
            assert (str(pointer) in said) == (rank == 0), (rank, said)
    # a rank's own failure is said by that rank
    monkeypatch.setattr(cli, "train", failing(BadTrainingInput("manifest m.tsv does not exist"), pointers[0]))
    assert cli.run(config, LauncherEnvironment(rank=1, world_size=2, local_rank=1, master_addr="h", master_port=1,
                                               launcher="torchrun")) == 2
    assert capsys.readouterr().err == "clip-train (rank 1): manifest m.tsv does not exist\n"
    # ... unless rank 0 failed with the same words: then it is rank 0's to say
    said_by_rank_0["line"] = "manifest m.tsv does not exist"
    assert cli.run(config, LauncherEnvironment(rank=1, world_size=2, local_rank=1, master_addr="h", master_port=1,
                                               launcher="torchrun")) == 2
    assert capsys.readouterr().err == ""


def test_other_ranks_name_themselves_in_their_log_lines_and_errors():
    from clip.cli.train import log_format, program_name
    from clip.launcher import read_launcher_environment

    def launcher(rank):
        return read_launcher_environment({"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank),
                                          "MASTER_ADDR": "h", "MASTER_PORT": "1"})

    record = logging.LogRecord("clip.data", logging.WARNING, __file__, 1, "shard %s is short", ("a.tar",), None)
    lines = {rank: logging.Formatter(log_format(launcher(rank))).format(record) for rank in (0, 3)}
    assert lines[0].endswith(" WARNING clip.data: shard a.tar is short")
    assert lines[3].endswith(" WARNING rank 3 clip.data: shard a.tar is short")
    assert logging.Formatter(log_format(None)).format(record) == lines[0]
    assert [program_name(launcher(3)), program_name(launcher(0)), program_name(None)] == [
        "clip-train (rank 3)", "clip-train", "clip-train"]


def test_a_run_directory_in_use_by_another_run_is_refused_naming_it(tmp_path, capsys):
    # A second run in the same directory resumed from the first's checkpoint, wrote its metrics twice, and
    # removed its half-written checkpoint as a leftover (the first then died renaming it into place).
    from multiprocess import lock_held_by_another_process

    with lock_held_by_another_process(tmp_path / "run") as holder:
        assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"clip-train: {tmp_path / 'run'} is in use by another run (host ")
        assert f"pid {holder}, since " in error and "\n" not in error
        assert not (tmp_path / "run" / "config.toml").exists()
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, "schedule.steps=1"]) == 0  # released


def test_a_run_refused_its_directory_writes_nothing_into_the_running_runs_files(tmp_path, capsys):
    # The refused start's log lines and its refusal were appended to the running run's train.log (the log file
    # was opened before the lock was taken): its own lines, between the other run's. Stderr alone has them now.
    from multiprocess import lock_held_by_another_process

    run_dir = tmp_path / "run"
    args = [str(DEMO), "--output-dir", str(run_dir), *TINY, "schedule.steps=1", "eval.every_n_steps=0"]
    assert main(args) == 0
    capsys.readouterr()

    def contents() -> dict:
        return {path: path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}

    with lock_held_by_another_process(run_dir):
        before = contents()
        assert {"train.log", "metrics.jsonl", "config.toml", "results.json"} <= {path.name for path in before}
        assert main([*args, "schedule.steps=2"]) == 2
        assert contents() == before
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"clip-train: {run_dir} is in use by another run (host ")
    assert main([*args, "schedule.steps=2"]) == 0  # released: this start holds it and logs there
    logged = (run_dir / "train.log").read_text()
    assert "in use by another run" not in logged and "WARNING clip.resume: resuming " in logged


def test_train_log_keeps_the_lines_logged_before_the_directory_was_held_and_a_refused_start_writes_none(tmp_path):
    from clip.cli.train import keep_log_in

    def logged_around(run_dir, held: bool) -> None:
        handler = keep_log_in(run_dir)
        try:
            logging.getLogger("clip.test").warning("before the lock")
            assert not (run_dir / "train.log").exists()
            if held:
                handler.open()
            logging.getLogger("clip.test").warning("after it")
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    (tmp_path / "held").mkdir()  # as taking its lock makes it
    logged_around(tmp_path / "held", held=True)
    lines = (tmp_path / "held" / "train.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["WARNING clip.test: before the lock", "WARNING clip.test: after it"]
    (tmp_path / "refused").mkdir()
    logged_around(tmp_path / "refused", held=False)
    assert list((tmp_path / "refused").iterdir()) == []


def test_train_log_on_a_full_disk_is_given_up_with_one_warning_and_closes_without_raising(tmp_path, capsys, caplog):
    # logging's own handling printed "--- Logging error ---" and a traceback to stderr for every line from the moment
    # the disk filled, and closing train.log raised an OSError over the error the run ended on (seen mid-run on
    # a full tmpfs)
    import errno

    from clip.cli.train import keep_log_in

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = lambda self: FullDisk.write(self, "")

    handler = keep_log_in(tmp_path)
    try:
        handler.open()
        logging.getLogger("clip.test").warning("written")
        handler.file.stream.close()
        handler.file.stream = FullDisk()
        with caplog.at_level(logging.WARNING):
            for line in range(3):
                logging.getLogger("clip.test").warning("line %d", line)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    gave_up = [record.getMessage() for record in caplog.records if "cannot append to" in record.getMessage()]
    assert gave_up == [f"cannot append to {tmp_path / 'train.log'} (No space left on device): the log goes to stderr "
                       f"only"]
    assert "Logging error" not in capsys.readouterr().err
    assert (tmp_path / "train.log").read_text().endswith("WARNING clip.test: written\n")


def test_a_second_run_in_the_same_process_is_refused_and_leaves_the_first_locked(tmp_path):
    # A POSIX lock never conflicts with its own process: a notebook's second train() on the directory was
    # let in, and its end released the first one's lock.
    from multiprocess import HOLD_LOCK, run_lock_command
    from clip.run_lock import RunDirectoryInUse, locked_run_directory

    with locked_run_directory(tmp_path):
        with pytest.raises(RunDirectoryInUse, match=f"in use by another run of this process \\(pid {os.getpid()}\\)"):
            with locked_run_directory(tmp_path):
                pass
        other = subprocess.run(run_lock_command(HOLD_LOCK, tmp_path), input="", capture_output=True, text=True,
                               timeout=60)
        assert "RunDirectoryInUse" in other.stderr  # still held against other processes
    with locked_run_directory(tmp_path):  # released at the end
        pass


def test_a_run_directory_is_one_run_directory_however_its_path_is_spelled(tmp_path, monkeypatch):
    # The same folder named relatively, absolutely or through a link is one directory; and a second run's
    # refusal leaves the first one holding it (its end must not release the hold of the run still going).
    from clip.run_lock import RunDirectoryInUse, locked_run_directory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    with locked_run_directory(Path("run")):
        for spelled in (tmp_path / "run", tmp_path / "link", tmp_path / "run"):
            with pytest.raises(RunDirectoryInUse, match="in use by another run of this process"):
                with locked_run_directory(spelled):
                    pass


def test_the_lock_file_names_only_its_holder_and_a_refusal_reads_it(tmp_path, monkeypatch, caplog):
    # lockf's answers stood in for: a lock held elsewhere (EAGAIN, or EACCES as POSIX also allows), a mount
    # without locks (ENOLCK: warned of, the run goes on)
    import errno
    import types

    from clip import run_lock

    (tmp_path / ".lock").write_text("host old, pid 1, since long ago\n" + "x" * 500)
    with run_lock.locked_run_directory(tmp_path):
        written = (tmp_path / ".lock").read_text()
    assert written.startswith("host ") and f"pid {os.getpid()}, since " in written and written.count("\n") == 1

    def locks(errno_code):
        def lockf(file, flags):
            raise OSError(errno_code, os.strerror(errno_code))
        return types.SimpleNamespace(lockf=lockf, LOCK_EX=0, LOCK_NB=0)

    for held in (errno.EAGAIN, errno.EACCES):
        monkeypatch.setattr(run_lock, "fcntl", locks(held))
        with pytest.raises(run_lock.RunDirectoryInUse, match=r"in use by another run \(host .*, pid "):
            with run_lock.locked_run_directory(tmp_path):
                pass
    # A holder on another host may be a failed node whose lock a network file system kept: what to do is said
    (tmp_path / ".lock").write_text("host node-that-died, pid 7, since long ago\n")
    with pytest.raises(run_lock.RunDirectoryInUse) as refused:
        with run_lock.locked_run_directory(tmp_path):
            pass
    assert str(refused.value).endswith(
        f"(host node-that-died, pid 7, since long ago); wait for it to end, or use another --output-dir; if that "
        f"host is down (its process cannot be running), delete {tmp_path / '.lock'} and start again")
    (tmp_path / ".lock").write_text(f"host {socket.gethostname()}, pid 7, since long ago\n")  # this host's: no hint
    with pytest.raises(run_lock.RunDirectoryInUse, match=r"use another --output-dir$"):
        with run_lock.locked_run_directory(tmp_path):
            pass
    (tmp_path / ".lock").write_text("")
    with pytest.raises(run_lock.RunDirectoryInUse, match=r"another run \(a process that has not written its name"):
        with run_lock.locked_run_directory(tmp_path):
            pass
    monkeypatch.setattr(run_lock, "fcntl", locks(errno.ENOLCK))
    with caplog.at_level(logging.WARNING), run_lock.locked_run_directory(tmp_path):
        pass
    assert "nothing stops a second run from using it at once" in caplog.text
    caplog.clear()
    monkeypatch.setattr(run_lock, "fcntl", None)  # a platform without fcntl (Windows): warned of, unlocked
    with caplog.at_level(logging.WARNING), run_lock.locked_run_directory(tmp_path):
        pass
    assert "on this platform: nothing stops a second run from using it at once" in caplog.text


def test_the_lock_ends_with_the_process_that_took_it_not_with_its_children(tmp_path):
    # The data loader's workers are forked children: a lock they inherited (flock's) outlived a killed run
    # by as long as they took to exit, and its restart was refused naming the dead process.
    from multiprocess import run_lock_command
    from clip.run_lock import locked_run_directory

    script = ("import os, time\n"
              "with run_lock.locked_run_directory(sys.argv[1]):\n"
              "    child = os.fork()\n"
              "    if child == 0:\n        os.close(1)\n        os.close(2)\n        time.sleep(60)\n        os._exit(0)\n"
              "    print(child, flush=True)\n    os._exit(0)\n")
    parent = subprocess.run(run_lock_command(script, tmp_path), capture_output=True, text=True, timeout=60)
    child = int(parent.stdout)
    try:
        os.kill(child, 0)  # still running, its parent gone
        with locked_run_directory(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["inside_a_file", "a_file"])
def test_an_output_dir_that_cannot_be_created_is_one_line_and_status_2(tmp_path, capsys, kind):
    (tmp_path / "file").write_text("")
    output_dir = tmp_path / "file" / "run" if kind == "inside_a_file" else tmp_path / "file"
    assert main([str(DEMO), "--output-dir", str(output_dir), *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"clip-train: cannot use {output_dir} as the run directory: ") and "\n" not in error
    assert ("Not a directory" if kind == "inside_a_file" else "File exists") in error


def test_a_checkpoint_that_cannot_be_written_is_one_error_line_and_status_1(tmp_path, monkeypatch, capsys, caplog):
    def full_disk(state, run_dir, step, keep_last, **kwargs):
        raise ckpt.CheckpointWriteError(f"could not write step {step}: No space left on device (errno 28)")

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    with caplog.at_level(logging.ERROR):
        assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]) == 1
    assert "could not write step 3: No space left on device (errno 28)" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def errors_of_a_failing_run(run_dir: Path, caplog) -> list[str]:
    """The error lines of the tiny demo run in `run_dir`, which must end with status 1."""
    with caplog.at_level(logging.ERROR):
        assert main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0"]) == 1
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]

def test_a_full_disk_for_metrics_jsonl_is_one_error_line_and_status_1_and_the_run_resumes(
    tmp_path, monkeypatch, capsys, caplog
):
    # It was an OSError's traceback, which said neither which file nor that the step 3 checkpoint is kept.
    import errno

    real_open = Path.open

    def full_disk_after_a_checkpoint(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode and (self.parent / "full").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    real_write = ckpt.save_checkpoint

    def then_the_disk_fills(state, run_dir, step, keep_last, **kwargs):
        saved = real_write(state, run_dir, step, keep_last, **kwargs)
        (run_dir / "full").touch()
        return saved

    monkeypatch.setattr(Path, "open", full_disk_after_a_checkpoint)
    monkeypatch.setattr(ckpt, "save_checkpoint", then_the_disk_fills)
    errors = errors_of_a_failing_run(tmp_path, caplog)
    assert errors == [(
        f"could not write {tmp_path / 'metrics.jsonl'}: No space left on device (errno {errno.ENOSPC}); the latest "
        f"checkpoint, {ckpt.checkpoint_path(tmp_path, 3)}, is kept: run the same command again to continue from it"
    )]
    assert "Traceback" not in capsys.readouterr().err
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    monkeypatch.undo()
    (tmp_path / "full").unlink()
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_when_a_resume_drops_records_is_one_error_line_and_status_1_and_the_run_resumes(
    tmp_path, monkeypatch, capsys, caplog
):
    # A run that stopped on a full disk (its checkpoint could not be written) had logged steps past its latest
    # checkpoint; the same command again, on the still full disk, ended in an OSError's traceback from rewriting
    # metrics.jsonl without them, and left an empty temporary file behind.
    import errno

    from clip import run_log

    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]) == 0
    ckpt.checkpoint_path(tmp_path, 6).unlink()  # steps 4-6 are logged, the latest checkpoint is step 3's
    before = (tmp_path / "metrics.jsonl").read_text()
    created_afresh = run_log._created_afresh

    def full_disk(path):  # the rewrite's temporary file
        if Path(path).name.startswith(".metrics.jsonl"):
            Path(path).write_text("")  # as a full disk leaves it: created, nothing written
            raise OSError(errno.ENOSPC, "No space left on device")
        return created_afresh(path)

    monkeypatch.setattr(run_log, "_created_afresh", full_disk)
    errors = errors_of_a_failing_run(tmp_path, caplog)
    assert errors == [(
        f"could not rewrite {tmp_path / 'metrics.jsonl'} without the records of the steps that run again: No space "
        f"left on device (errno {errno.ENOSPC}); the checkpoint of step 3 is kept: run the same command again once "
        f"the file can be written"
    )]
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert run_log.temporaries_of(tmp_path / "metrics.jsonl") == []
    monkeypatch.undo()
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4, 5, 6]



def test_a_full_disk_at_the_end_is_one_error_line_and_the_run_started_again_writes_its_results(
    tmp_path, monkeypatch, capsys, caplog
):
    # results.json that could not be written was an OSError's traceback; and the optional training plot, written
    # first, stopped the run there on a full disk, so that results.json was never written, an empty training.png left
    import errno

    import clip.train as train_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module, "write_json", full_disk)
    errors = errors_of_a_failing_run(tmp_path, caplog)
    assert len(errors) == 1 and errors[0].startswith(
        f"could not write {tmp_path / 'results.json'}: No space left on device (errno {errno.ENOSPC}); the trained "
        "weights are saved (step 6)")
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "plot_run", full_disk)
    with caplog.at_level(logging.WARNING):
        assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0", "logging.plot=true"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 6
    assert f"no training plot: {tmp_path / 'training.png'} could not be written (No space left on device)" in caplog.text
    assert max(step for step, _ in ckpt.list_checkpoints(tmp_path)) == 6

def test_unusable_data_is_one_line_and_status_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.csv"
    data = ["data.sources.0.kind=manifest", f"data.sources.0.path={missing}", "data.sources.0.num_samples=none"]
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, *data]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"clip-train: manifest {missing} does not exist"
    evaluation = ["eval.zeroshot.0.kind=imagefolder", f"eval.zeroshot.0.root={tmp_path / 'no_images'}"]
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, *evaluation]) == 2
    assert capsys.readouterr().err.startswith("clip-train: ")


@pytest.mark.parametrize("workers", [0, 1])
def test_data_whose_samples_all_fail_is_one_line_with_a_hint_and_status_2(tmp_path, capsys, workers):
    # Found by the loader once training runs (in a worker process, or in this one): it was ~40 lines of
    # traceback and a dump of counts, status 1, with a hint that missed the usual cause.
    from test_data_helpers import write_manifest

    manifest = write_manifest(tmp_path / "data", range(12))
    for image in (tmp_path / "data" / "images").iterdir():
        image.unlink()
    data = ["data.sources.0.kind=manifest", f"data.sources.0.path={manifest}", "data.sources.0.num_samples=none",
            f"data.workers={workers}", "eval.every_n_steps=0"]
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, *data]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("clip-train: data rank 0 worker 0: none of the first ")
    assert "samples could be used (missing_file " in errors[0]
    assert "a manifest's image paths are read relative to the manifest's own folder" in errors[0]


def test_a_finished_run_started_again_evaluates_without_its_training_data(tmp_path, monkeypatch):
    # It built, restored and iterated its training data first: with the data gone (a scratch area purged after
    # the job), the evaluation the rerun makes up was refused as bad input, status 2
    import shutil

    from test_data_helpers import write_manifest

    import clip.train as train_module

    manifest = write_manifest(tmp_path / "data", range(8))
    args = [str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, "schedule.steps=2", "eval.every_n_steps=0",
            "data.sources.0.kind=manifest", f"data.sources.0.path={manifest}", "data.sources.0.num_samples=none"]
    assert main(args) == 0
    finished = json.loads((tmp_path / "run" / "results.json").read_text())
    shutil.rmtree(tmp_path / "data")
    monkeypatch.setattr(train_module, "build_train_data", None)  # not called at all
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == finished
    assert evaluated_steps(tmp_path / "run") == [2]  # the final evaluation again, replacing its record


def test_what_is_odd_about_the_evaluation_data_is_said_once_not_at_every_evaluation(tmp_path, caplog):
    # The demo's synthetic evaluation turned into an image folder by overrides keeps its synthetic settings
    # (ignored, with a warning): said when the datasets are checked before the first step, not 3 times more.
    from test_eval_datasets import write_image_folder

    write_image_folder(tmp_path / "folder", {"red": 2, "blue": 2})
    evaluation = ["eval.zeroshot.0.kind=imagefolder", f"eval.zeroshot.0.root={tmp_path / 'folder'}"]
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path / "run", *evaluation))  # evaluates at steps 3 and 6
    assert evaluated_steps(tmp_path / "run") == [3, 6]
    assert caplog.text.count("read by kind = \"synthetic\" only and ignored for imagefolder") == 1


def test_settings_that_are_likely_mistakes_are_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_config(tmp_path, "schedule.warmup_steps=6", "eval.every_n_steps=0", "data.sources.0.num_samples=4"))
        assert "schedule.warmup_steps = schedule.steps (6): the whole run is warmup" in caplog.text
        assert "an epoch holds 4 samples, fewer than the global batch of 8" in caplog.text
        caplog.clear()
        train(tiny_config(tmp_path, "schedule.steps=7", "eval.every_n_steps=0", f"train.init_weights={tmp_path}"))
        assert "train.init_weights changed to" in caplog.text
        assert "on the CPU" not in caplog.text
        caplog.clear()
        # a GPU recipe's bf16 run on a CPU as written: 20-50x slower than fp32 without a word
        train(tiny_config(tmp_path / "bf16", "schedule.steps=1", "eval.every_n_steps=0", "train.precision=bf16"))
        assert "train.precision = 'bf16' on the CPU" in caplog.text


def test_a_new_run_under_home_names_the_literal_tilde_folder_an_earlier_version_trained_in(
    tmp_path, monkeypatch, caplog
):
    # output_dir = "~/runs/x" in a recipe made ./~/runs/x before "~" meant the home folder; the same recipe
    # then started over in $HOME/runs/x without a word
    home, work = tmp_path / "home", tmp_path / "work"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work.mkdir() or work)
    train(tiny_config(work / "~" / "runs" / "x", "eval.every_n_steps=0"), stop_at_step=2)
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_config("~/runs/x", "eval.every_n_steps=0"), stop_at_step=1)
    assert (home / "runs" / "x" / "checkpoints").is_dir()
    assert f"--output-dir {work / '~' / 'runs' / 'x'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(tiny_config(tmp_path / "elsewhere", "eval.every_n_steps=0"), stop_at_step=1)
    assert "named '~'" not in caplog.text


def test_extending_a_finished_run_names_the_learning_rate_jump_and_keeps_its_results_aside(tmp_path, caplog):
    # The cosine restarts from near the peak with only "schedule.steps: 6 -> 12" said, and results.json kept
    # saying the run had finished at step 6 while the extension ran (or after it was stopped).
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    with caplog.at_level(logging.WARNING):
        train(tiny_config(tmp_path, "eval.every_n_steps=0"))
    assert "learning rate" not in caplog.text  # the same schedule: no jump
    finished = json.loads((tmp_path / "results.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(tiny_config(tmp_path, "eval.every_n_steps=0", "schedule.steps=12"), stop_at_step=8)
    saved_lr = learning_rate(6, 1e-3, tiny_config(tmp_path).schedule)  # the demo's optimizer.lr
    extended_lr = learning_rate(6, 1e-3, tiny_config(tmp_path, "schedule.steps=12").schedule)
    assert (f"the learning rate of step 7 is {extended_lr:.3g} under this config's schedule, {saved_lr:.3g} under "
            "the checkpoint's: it jumps there") in caplog.text
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "results_step_6.json").read_text()) == finished
    # Shortened below its checkpoint, the run only evaluates: no step comes, and no jump is said (it was)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(tiny_config(tmp_path, "eval.every_n_steps=0", "schedule.steps=7"))
    assert "evaluating that checkpoint only" in caplog.text and "jumps there" not in caplog.text


def test_a_finished_run_restarted_at_its_last_step_under_another_schedule_names_no_learning_rate_jump(
    tmp_path, caplog
):
    # schedule.steps equal to the checkpoint's step: the run only evaluates, no step comes, so the rate of "step
    # 7" is never used. The check stopped at steps below the checkpoint's: at the step itself it said a jump
    train(tiny_config(tmp_path, "eval.every_n_steps=0"))  # finished at step 6
    floor = tiny_config(tmp_path, "eval.every_n_steps=0", "schedule.min_lr_ratio=0.5")
    assert floor.schedule.steps == 6 and ckpt.list_checkpoints(tmp_path)[0][0] == 6
    # the two schedules do differ after step 6: only the missing step keeps the warning away
    assert learning_rate(6, 1e-3, floor.schedule) != learning_rate(6, 1e-3, tiny_config(tmp_path).schedule)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(floor)
    assert "jumps there" not in caplog.text and "learning rate" not in caplog.text

def test_results_moved_aside_are_named_after_their_own_step_when_the_run_resumes_below_it(tmp_path):
    # A finished run, extended, whose last checkpoint was then found torn, resumes from an earlier one: its
    # results.json was renamed after the checkpoint's step, not its own, replacing the results of that step
    # which an earlier extension had kept under that name.
    train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0"))
    train(tiny_config(tmp_path, "eval.every_n_steps=0"))  # extended to 6 steps
    at_3, at_6 = (json.loads((tmp_path / f"results{name}.json").read_text()) for name in ("_step_3", ""))
    assert (at_3["step"], at_6["step"]) == (3, 6)
    newest = ckpt.checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:1000])  # torn: the run resumes from step 3
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=4)
    assert json.loads((tmp_path / "results_step_3.json").read_text()) == at_3
    assert json.loads((tmp_path / "results_step_6.json").read_text()) == at_6


def test_an_extension_whose_data_cannot_be_used_leaves_the_runs_config_and_results_alone(tmp_path):
    # config.toml was written and results.json moved aside before the data was opened: a mistyped path in the
    # command that extends a finished run left them so, and the finished run, started again, kept them.
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0"))
    recorded = ((tmp_path / "config.toml").read_text(), (tmp_path / "results.json").read_text())
    missing = ["data.sources.0.kind=manifest", f"data.sources.0.path={tmp_path / 'nowhere.csv'}",
               "data.sources.0.num_samples=none"]
    with pytest.raises(BadTrainingInput, match="nowhere.csv"):
        train(tiny_config(tmp_path, "schedule.steps=4", "eval.every_n_steps=0", *missing))
    assert ((tmp_path / "config.toml").read_text(), (tmp_path / "results.json").read_text()) == recorded
    assert not (tmp_path / "results_step_2.json").exists()


def test_a_constant_rate_run_extended_before_its_cooldown_continues_without_a_jump(tmp_path, caplog):
    # The point of warmup-stable-decay: more steps move the cooldown later, and the steps run so far keep
    # their rate (the cosine of a longer run would be higher at every step).
    schedule = ["eval.every_n_steps=0", "eval.zeroshot=[]", "logging.every_n_steps=1", "schedule.warmup_steps=2",
                "schedule.kind=constant_cooldown", "schedule.cooldown_steps=2", "schedule.min_lr_ratio=0.5"]
    train(tiny_config(tmp_path, *schedule, "schedule.steps=6"), stop_at_step=3)
    with caplog.at_level(logging.WARNING):
        train(tiny_config(tmp_path, *schedule, "schedule.steps=8"))
    assert "schedule.steps" in caplog.text and "learning rate" not in caplog.text
    logged = [json.loads(line)["lr"] / 1e-3 for line in (tmp_path / "metrics.jsonl").open() if '"lr"' in line]
    assert logged == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 5 / 6, 4 / 6])  # steps 1..8 (the demo's lr 1e-3)


def test_a_resumed_run_lets_go_of_its_checkpoints_weights(tmp_path, monkeypatch):
    # The checkpoint read to resume stayed referenced for the whole run: a CPU copy of every weight (and, on a
    # GPU, of the optimizer's moments) on every rank, 5 GB for ViT-L/14.
    import gc
    import weakref

    import clip.train as train_module

    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=2)
    real_restore, real_step, alive = train_module.restore_training_state, train_module.contrastive_step, []

    def watching_restore(state, *args, **kwargs):
        watched = [weakref.ref(tensor) for tensor in state["model"].values()]
        result = real_restore(state, *args, **kwargs)
        alive.append(lambda: sum(ref() is not None for ref in watched))
        return result

    def counting_step(*args, **kwargs):
        gc.collect()
        alive.append(alive[0]())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "restore_training_state", watching_restore)
    monkeypatch.setattr(train_module, "contrastive_step", counting_step)
    train(tiny_config(tmp_path, "eval.every_n_steps=0"))
    assert alive[1:] == [0] * 4  # steps 3..6: none of the checkpoint's weight tensors is alive


def slow_the_loader(set_attribute, seconds_per_batch: float) -> None:
    """Replaces clip.train's clock: each batch costs the data loader `seconds_per_batch` of it, everything else
    a thousandth of the real time it takes (so that a busy machine's slow steps do not count).
    `set_attribute(obj, name, value)`: monkeypatch.setattr, or setattr in a process of its own."""
    import time
    import types

    import clip.train as train_module

    real_build, waited = train_module.build_train_data, {"s": 0.0}

    class SlowData:
        def __init__(self, data):
            self.data = data

        def __getattr__(self, name):
            return getattr(self.data, name)

        def __iter__(self):
            return self.batches()

        def batches(self, *args, **kwargs):
            for batch in self.data.batches(*args, **kwargs):
                waited["s"] += seconds_per_batch
                yield batch

    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() * 1e-3 + waited["s"])
    set_attribute(train_module, "time", clock)
    set_attribute(train_module, "build_train_data", lambda *args, **kwargs: SlowData(real_build(*args, **kwargs)))


def test_the_metrics_say_how_much_of_the_time_went_to_waiting_for_data(tmp_path, monkeypatch):
    # A data-bound run showed only a low samples/s and MFU, with nothing saying why.
    slow_the_loader(monkeypatch.setattr, 10.0)
    train(tiny_config(tmp_path, "schedule.steps=4", "eval.every_n_steps=0", "eval.zeroshot=[]",
                      "logging.every_n_steps=2"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
    assert [r["step"] for r in records] == [2, 4] and all(0.95 < r["data_wait_fraction"] <= 1.0 for r in records), records
    assert all(r["samples_per_s"] < 8 / 10 for r in records)  # batch 8 per 10 s: the throughput counts the wait


def test_a_save_killed_mid_write_leaves_no_temporary_file_after_the_next_start(tmp_path):
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    stray = tmp_path / ckpt.CHECKPOINT_DIR / ".step_00000004.pt.abcd1234.tmp"  # as save_checkpoint names them
    stray.write_bytes(b"half a checkpoint")
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=4)
    assert not stray.exists()


def test_a_resumed_run_names_an_older_checkpoint_that_is_not_whole_which_it_keeps(tmp_path, caplog):
    # Pruning neither counts nor deletes a torn file (it would take a good checkpoint's place), and a resume reads
    # the newest whole one: a torn older file stayed in the run directory for good without a word
    settings = ("eval.every_n_steps=0", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2")
    train(tiny_config(tmp_path, *settings), stop_at_step=3)
    torn = ckpt.checkpoint_path(tmp_path, 2)
    torn.write_bytes(torn.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="clip"):
        train(tiny_config(tmp_path, *settings), stop_at_step=4)
    warnings = [record.getMessage() for record in caplog.records if "not a whole checkpoint" in record.getMessage()]
    assert warnings == [f"{torn} is not a whole checkpoint (cut short by a storage fault, or not written by a save): "
                        "runs neither resume from it nor delete it; delete it once you have looked at it"]
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3, 2]


def test_a_run_file_write_killed_before_its_rename_leaves_no_temporary_after_the_next_start(tmp_path, caplog):
    # config.toml, results.json and training.png are replaced whole through `.NAME.PID.tmp` files: a kill just
    # before the rename left them in the run directory for good (found by a SIGKILL fuzz)
    train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=3)
    strays = [tmp_path / f".{name}.{pid}.tmp" for name, pid in
              (("config.toml", 1234), ("results.json", 99), ("training.png", 1234))]
    for stray in strays:
        stray.write_text("half a file")
    others = [tmp_path / ".notes.txt.1234.tmp", tmp_path / ".results.json.tmp"]  # not the pattern: not ours
    for other in others:
        other.write_text("someone else's")
    with caplog.at_level(logging.INFO, logger="clip"):
        train(tiny_config(tmp_path, "eval.every_n_steps=0"), stop_at_step=4)
    assert not any(stray.exists() for stray in strays) and all(other.exists() for other in others)
    assert sum("left by an interrupted write" in record.getMessage() for record in caplog.records) == 3


def test_resuming_with_another_model_is_refused_naming_what_differs(tmp_path, capsys):
    train(tiny_config(tmp_path), stop_at_step=3)
    with pytest.raises(ValueError, match=r"different model \(model.activation: 'gelu' there, 'quick_gelu' here; "
                                         r"model.embed_dim: 32 there, 48 here\)"):
        train(tiny_config(tmp_path, "model.embed_dim=48", "model.activation=quick_gelu"))
    # from the command line: one error line and status 2 (a config that does not fit the run), no traceback
    capsys.readouterr()
    assert main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "model.embed_dim=48"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clip-train: ") and error.count("\n") == 1 and "model.embed_dim: 32 there, 48 here" in error


def test_a_resnet_run_resumes_with_vit_only_settings_changed(tmp_path, caplog):
    # patch_size and mlp_ratio do not shape a ResNet: the same model, resumed (the change is reported).
    train(tiny_config(tmp_path, *RESNET), stop_at_step=2)
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path, *RESNET, "model.vision.patch_size=16", "schedule.steps=3"))
    assert ckpt.list_checkpoints(tmp_path)[0][0] == 3
    assert "model.vision.patch_size: 8 -> 16" in caplog.text


def test_mfu_is_logged_when_the_peak_is_known(tmp_path, monkeypatch):
    import clip.train as train_module
    from clip.throughput import training_flops_per_sample

    monkeypatch.setattr(train_module, "peak_flops", lambda device, dtype, tf32=False: 1e12)
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "logging.every_n_steps=2"))
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line][-1]
    config = tiny_config(tmp_path)
    # the demo's captions stop well before the 16-token context, and the MFU counts only what ran
    assert training_flops_per_sample(config.model, 8) < training_flops_per_sample(config.model)
    expected_max = training_flops_per_sample(config.model) * record["samples_per_s"] / 1e12
    assert 0 < record["mfu"] <= expected_max * (1 + 1e-9)  # equal when every batch ran the full context
    # a locked tower runs forward only: a third of its training FLOPs
    from clip.throughput import image_forward_flops, text_forward_flops

    image, text = image_forward_flops(config.model), text_forward_flops(config.model, 8)
    assert training_flops_per_sample(config.model, 8) == 3 * (image + text)
    assert training_flops_per_sample(config.model, 8, lock_image=True) == image + 3 * text
    assert training_flops_per_sample(config.model, 8, lock_text=True) == 3 * image + text


def test_the_mfu_is_the_flops_of_the_samples_run_at_the_runs_own_settings(tmp_path, monkeypatch):
    # mfu x peak / samples_per_s is the FLOPs of the window's average sample (one process): each step's count
    # at the text length it ran and with the run's locks and patch dropout, for every sample of the batch
    import inspect

    import clip.train as train_module
    from clip.throughput import training_flops_per_sample

    monkeypatch.setattr(train_module, "peak_flops", lambda device, dtype, tf32=False: 1e12)
    counted, lengths_run = [], []

    def recording_flops(*args, **kwargs):
        bound = inspect.signature(training_flops_per_sample).bind(*args, **kwargs)
        bound.apply_defaults()
        counted.append(dict(bound.arguments))
        return training_flops_per_sample(*args, **kwargs)

    real_length = train_module.trimmed_text_length

    def recording_length(*args, **kwargs):
        lengths_run.append(real_length(*args, **kwargs))
        return lengths_run[-1]

    monkeypatch.setattr(train_module, "training_flops_per_sample", recording_flops)
    monkeypatch.setattr(train_module, "trimmed_text_length", recording_length)
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "logging.every_n_steps=2",
                      "model.text.layers=2", "train.lock_text=true", "train.lock_text_unlocked_layers=1",
                      "train.patch_dropout=0.5"))
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line][-1]
    assert [c["text_length"] for c in counted] == lengths_run and len(lengths_run) == 2
    for c in counted:
        assert (c["lock_image"], c["lock_text"], c["patch_dropout"]) == (False, True, 0.5)
        assert (c["image_unlocked_layers"], c["text_unlocked_layers"]) == (0, 1)
    per_sample = sum(training_flops_per_sample(**c) for c in counted) / len(counted)
    assert record["mfu"] * 1e12 / record["samples_per_s"] == pytest.approx(per_sample, rel=1e-9)


class FakeWandb:
    """What the trainer asks of the wandb package (init, Run.define_metric, Run.step, Run.log, Run.finish),
    recorded, with W&B's rule for steps: a log at a step below the run's own is dropped (in `ignored`), one
    without a step is at the run's own step and moves it on, and a resumed run starts at the step after its last.
    The real package (wandb 0.31, WANDB_MODE=offline) ran the same calls when this was written; it is not a test
    dependency."""

    def __init__(self) -> None:
        self.inits, self.logged, self.finished, self.exit_codes = [], [], 0, []
        self.metrics, self.ignored, self.step = {}, [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.step = max((step for step, _ in self.logged), default=-1) + 1
        return self

    def define_metric(self, name: str, **kwargs) -> None:
        self.metrics[name] = kwargs

    def log(self, data: dict, step: int | None = None) -> None:
        if step is None:
            self.logged.append((self.step, data))
            self.step += 1
        elif step < self.step:
            self.ignored.append((step, data))
        else:
            self.step = step
            self.logged.append((step, data))

    def finish(self, exit_code: int | None = None) -> None:
        self.finished += 1
        self.exit_codes.append(exit_code)


def test_weights_and_biases_gets_the_metrics_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch):
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    extra = ["logging.wandb=true", "logging.wandb_project=tests", "schedule.steps=4", "eval.every_n_steps=2"]
    train(tiny_config(tmp_path, *extra), stop_at_step=2)
    train(tiny_config(tmp_path, *extra))
    first, second = fake.inits
    assert first["id"] == second["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first["resume"] == "allow" and first["project"] == "tests" and first["name"] == tmp_path.name
    assert first["config"]["train"]["batch_size"] == 8 and fake.finished == 2 and fake.exit_codes == [0, 0]
    steps = [step for step, _ in fake.logged]
    assert steps == sorted(steps) and steps[-1] == 4
    assert fake.metrics["zeroshot/*"] == {"step_metric": "evaluation_step"}  # the evaluations' x axis
    assert [data["evaluation_step"] for step, data in fake.logged if "zeroshot/synthetic/top1" in data] == [2, 4]
    last = [data for step, data in fake.logged if step == 4]
    assert any("loss" in data for data in last) and any("zeroshot/synthetic/top1" in data for data in last)
    assert all(isinstance(v, (int, float)) for _, data in fake.logged for v in data.values())
    # A run that ends on an error is finished as failed: a finish without an exit code, while the error was on its
    # way out, was recorded by W&B as a success
    import clip.train as train_module

    real_step = train_module.contrastive_step

    def failing(*args, **kwargs):
        raise RuntimeError("a failure inside the step")

    monkeypatch.setattr(train_module, "contrastive_step", failing)
    with pytest.raises(RuntimeError, match="a failure inside the step"):
        train(tiny_config(tmp_path / "failing", *extra))
    assert fake.exit_codes == [0, 0, 1]
    # A second Ctrl-C is no failure (clip-train exits 130 for it, as the shell does)
    from clip.stopping import StoppedAtOnce

    def stopped(*args, **kwargs):
        raise StoppedAtOnce

    monkeypatch.setattr(train_module, "contrastive_step", stopped)
    with pytest.raises(StoppedAtOnce):
        train(tiny_config(tmp_path / "stopped", *extra))
    assert fake.exit_codes == [0, 0, 1, 0]
    # The results written last: a results.json that cannot be written fails the W&B run as well
    monkeypatch.setattr(train_module, "contrastive_step", real_step)

    def unwritable(*args, **kwargs):
        raise train_module.RunLogWriteError("could not write results.json: No space left on device")

    monkeypatch.setattr(train_module, "write_results", unwritable)
    with pytest.raises(train_module.RunLogWriteError):
        train(tiny_config(tmp_path / "no_results", *extra))
    assert fake.exit_codes == [0, 0, 1, 0, 1]
    monkeypatch.undo()
    # Without the package: one error line before training starts
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = [str(DEMO), "--output-dir", str(tmp_path / "other"), *TINY, "logging.wandb=true"]
    assert main(args) == 1
    assert not (tmp_path / "other" / "checkpoints").exists()
    # A W&B run that cannot start (no API key, no network): one error line too, status 1, not a traceback

    class NoKeyWandb:
        def init(self, **kwargs):
            raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", NoKeyWandb())
    args = [str(DEMO), "--output-dir", str(tmp_path / "no_key"), *TINY, "logging.wandb=true"]
    assert main(args) == 1


def test_tensorboard_events_and_training_plot(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "logging.tensorboard=true",
                      "logging.plot=true"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "training.png").stat().st_size > 0


def test_bf16_with_checkpointing_and_accumulation_trains(tmp_path):
    results = train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0", "train.precision=bf16",
                                "train.grad_checkpointing=true", "train.accumulation_steps=2"))
    assert results["step"] == 3 and results["loss"] == results["loss"]  # finite, not NaN


def test_fp16_with_loss_scaling_trains_and_resumes_exactly(tmp_path):
    # fp16 autocast with GradScaler (here on the CPU): the scaler's state is in the checkpoint, so a resumed
    # run scales, skips and steps exactly as an uninterrupted one.
    extra = ["train.precision=fp16", "schedule.steps=4", "checkpoint.every_n_steps=2", "eval.every_n_steps=0"]
    train(tiny_config(tmp_path / "straight", *extra))
    train(tiny_config(tmp_path / "resumed", *extra), stop_at_step=2)
    assert ckpt.load_latest_checkpoint(tmp_path / "resumed")["scaler"]["scale"] > 0
    train(tiny_config(tmp_path / "resumed", *extra))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
        assert torch.isfinite(straight[name]).all() or not straight[name].is_floating_point()


def test_fp16_resumes_with_the_loss_scale_it_had_reached(tmp_path, monkeypatch):
    # The tiny run above never moves the scale from its initial 65536 in 4 steps (it grows every 2000 steps
    # without an overflow), so a resume that started the scaler afresh matched it. Starting low (no overflow)
    # and growing every step, the scale has moved by the checkpoint: the resumed run must go on from there.
    class GrowingEveryStep(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=2.0**10, growth_interval=1, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", GrowingEveryStep)
    extra = ["train.precision=fp16", "schedule.steps=4", "checkpoint.every_n_steps=2", "eval.every_n_steps=0"]
    train(tiny_config(tmp_path / "straight", *extra))
    train(tiny_config(tmp_path / "resumed", *extra), stop_at_step=2)
    saved = ckpt.load_latest_checkpoint(tmp_path / "resumed")["scaler"]
    assert saved["scale"] == 2.0**12  # it moved before the checkpoint
    train(tiny_config(tmp_path / "resumed", *extra))

    def loss_scales(run_dir):
        return [json.loads(line)["loss_scale"] for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]

    assert loss_scales(tmp_path / "resumed") == loss_scales(tmp_path / "straight")
    straight, resumed = (ckpt.load_latest_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 4 and straight["scaler"] == resumed["scaler"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_switching_to_fp16_on_resume_starts_a_fresh_loss_scale(tmp_path):
    # The bf16 run saved no scaler state; fp16 loss scaling then starts at its initial scale.
    train(tiny_config(tmp_path, "schedule.steps=4", "eval.every_n_steps=0", "train.precision=bf16"), stop_at_step=2)
    results = train(tiny_config(tmp_path, "schedule.steps=4", "eval.every_n_steps=0", "train.precision=fp16"))
    assert results["step"] == 4 and ckpt.load_latest_checkpoint(tmp_path)["scaler"]["scale"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
    assert [("loss_scale" in r) for r in records] == [False, False, True, True]  # logged under fp16 only
    assert records[-1]["loss_scale"] == ckpt.load_latest_checkpoint(tmp_path)["scaler"]["scale"]


def test_a_missing_evaluation_dataset_fails_before_training(tmp_path):
    from clip.run_start import BadTrainingInput

    with pytest.raises(BadTrainingInput) as raised:
        train(tiny_config(tmp_path, "eval.zeroshot.0.kind=imagefolder", f"eval.zeroshot.0.root={tmp_path / 'nowhere'}"))
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()  # not a single step was spent


def test_an_evaluation_dataset_of_unreadable_files_fails_before_training(tmp_path):
    # Git LFS pointers checked out without LFS: files named .jpg that hold text. Found at the first
    # evaluation, they would stop the run there (on every rank) and again after every resume.
    for name in ("cat", "dog"):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "0.jpg").write_text("version https://git-lfs.github.com/spec/v1\n")
    overrides = ["eval.zeroshot.0.kind=imagefolder", f"eval.zeroshot.0.root={tmp_path / 'eval'}"]
    with pytest.raises(ValueError, match="none of the 2 images tried can be read"):
        train(tiny_config(tmp_path / "run", *overrides))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()


def test_a_failing_final_evaluation_keeps_the_trained_weights(tmp_path, monkeypatch):
    import clip.train as train_module

    def dataset_gone(*args, **kwargs):
        raise FileNotFoundError("the evaluation images were moved while the run trained")

    monkeypatch.setattr(train_module, "run_evaluations", dataset_gone)
    with pytest.raises(FileNotFoundError):
        train(tiny_config(tmp_path, "schedule.steps=2", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"))
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2


def test_optimizer_state_takes_its_parameters_layout_after_loading():
    from clip.optim import match_state_layout_to_parameters

    # A ResNet's convolution weights are channels-last on a GPU: moments saved on the CPU are contiguous.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=0.1)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    channels_last = conv.to(memory_format=torch.channels_last)
    resumed = torch.optim.AdamW(channels_last.parameters(), lr=0.1, fused=True)
    resumed.load_state_dict(saved)
    match_state_layout_to_parameters(resumed)
    for index, parameter in enumerate(channels_last.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            moment = resumed.state[parameter][key]
            assert moment.stride() == parameter.stride()
            assert torch.equal(moment, saved["state"][index][key])


@pytest.mark.slow  # compiling on the CPU takes about half a minute per precision
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the folded QuickGELU MLP, compiled
def test_compiled_training_runs(tmp_path, monkeypatch, precision):
    import clip.transformer as transformer_module

    traced = []  # training-time calls of the folded MLP (as torch.compile traces the model); not the evaluation's
    original = transformer_module.quick_gelu_mlp
    monkeypatch.setattr(transformer_module, "quick_gelu_mlp",
                        lambda *a: (torch.is_grad_enabled() and traced.append(1)) or original(*a))
    results = train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0", "train.compile=true",
                                f"train.precision={precision}", "model.activation=quick_gelu"))  # the demo's is gelu
    assert results["step"] == 3 and math.isfinite(results["loss"])
    assert bool(traced) == (precision == "bf16")  # float32 training runs the MLP as written


# ---- checkpoint files that cannot be read ------------------------------------------------------------------


def test_a_run_whose_checkpoints_all_fail_to_load_stops_instead_of_restarting_at_step_0(tmp_path):
    # Every checkpoint truncated (a disk or file system fault, or files of an incompatible version). The run
    # used to restart at step 0 with warnings only, and keep_last pruning then deleted its new checkpoints,
    # as the unreadable old ones had the higher step numbers.
    config = tiny_config(tmp_path, "eval.every_n_steps=0", "checkpoint.keep_last=2")
    train(config)
    for _, path in ckpt.list_checkpoints(tmp_path):
        os.truncate(path, 1000)
    with pytest.raises(ckpt.NoReadableCheckpointError, match=r"step_00000006\.pt(.|\n)*move them aside"):
        train(config, stop_at_step=4)
    assert [(s, p.stat().st_size) for s, p in ckpt.list_checkpoints(tmp_path)] == [(6, 1000), (3, 1000)]


def test_both_output_dir_forms_given_say_which_is_used(tmp_path, capsys):
    args = [str(DEMO), "--output-dir", str(tmp_path / "a"), *TINY, "schedule.steps=1", "eval.every_n_steps=0",
            f"output_dir={tmp_path / 'b'}"]
    assert main(args) == 0
    assert "--output-dir is used" in capsys.readouterr().err
    assert (tmp_path / "a" / "config.toml").exists() and not (tmp_path / "b").exists()


def test_both_output_dir_forms_are_said_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    # Every rank gets the same command line: a 256-process job printed the same line 256 times. (A config
    # error ends main before the ranks meet; rank 0 alone says that too.)
    args = [str(DEMO), "--output-dir", str(tmp_path / "a"), f"output_dir={tmp_path / 'b'}", "train.batch_sise=8"]
    launched_as_rank(monkeypatch, 1)
    assert main(args) == 2
    assert capsys.readouterr().err == ""
    launched_as_rank(monkeypatch, 0)
    assert main(args) == 2
    assert "--output-dir is used" in capsys.readouterr().err


def test_a_second_sigterm_is_the_same_request_but_a_second_ctrl_c_stops_at_once():
    # Under srun every process gets the pre-emption's SIGTERM, and torchrun forwards its own copy to its
    # workers: one pre-emption can arrive twice, and must still end in a checkpoint.
    from clip.stopping import StopRequest

    with StopRequest() as stop:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM was taken for a second Ctrl-C")
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_sigterm_says_that_a_ctrl_c_after_it_stops_without_saving(caplog):
    # A Ctrl-C after a scheduler's SIGTERM stops at once (above), which the SIGTERM's line did not say
    from clip.stopping import StopRequest

    with caplog.at_level(logging.WARNING, logger="clip.stopping"), StopRequest():
        os.kill(os.getpid(), signal.SIGTERM)
    assert "stopping at the next safe point (the weights are saved first) (a Ctrl-C now stops at once, without " \
        "saving)" in caplog.text


def test_an_abandoned_evaluation_is_raised_once_and_its_cleanup_runs_through_a_second_signal():
    # One pre-emption can arrive twice (srun, torchrun): the second copy, arriving while the abandoned
    # evaluation's cleanup runs (closing its loader's workers), is the same request and must not raise again.
    from clip.stopping import EvaluationInterrupted, StopRequest

    cleaned_up = False
    with StopRequest() as stop, pytest.raises(EvaluationInterrupted), stop.interrupting():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            cleaned_up = True
    assert cleaned_up and stop.requested


def test_a_signal_after_an_inner_abandoned_block_abandons_the_outer_one():
    # interrupting() blocks nest (an evaluation inside the start of a run): the inner one's end puts the outer
    # one's exception back, so a signal then abandons the outer block too instead of waiting for a step.
    from clip.stopping import EvaluationInterrupted, SetupInterrupted, StopRequest

    with StopRequest() as stop, pytest.raises(SetupInterrupted), stop.interrupting(SetupInterrupted):
        with pytest.raises(EvaluationInterrupted), stop.interrupting(EvaluationInterrupted):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the signal after the inner block did not abandon the outer one")


def test_the_first_ctrl_c_says_that_a_second_stops_without_saving(caplog):
    # A second Ctrl-C, pressed while the stop's checkpoint was written, lost the steps since the last one with a
    # traceback; nothing had said what it would do.
    from clip.stopping import StopRequest

    with caplog.at_level(logging.WARNING, logger="clip.stopping"), StopRequest():
        os.kill(os.getpid(), signal.SIGINT)
        assert "(a second Ctrl-C stops at once, without saving)" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "second Ctrl-C: stopping at once, without saving; the run resumes from its latest checkpoint" in caplog.text


def test_a_signal_before_an_abandonable_block_abandons_it_on_entry():
    # A signal that came while nothing could be abandoned (a training step) still abandons the evaluation that
    # follows: started anyway, it could outlast the scheduler's grace period before the checkpoint is written.
    from clip.stopping import EvaluationInterrupted, StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(EvaluationInterrupted), stop.interrupting():
            pytest.fail("the evaluation started although a stop was already requested")


@pytest.mark.parametrize(("abandoned", "said"), [("SetupInterrupted", "abandoning the start of the run"),
                                                 ("EvaluationInterrupted", "abandoning the evaluation, to save and stop")])
def test_an_abandoned_block_is_named_in_the_log(caplog, abandoned, said):
    # The start of a run saves nothing (nothing is trained yet); an evaluation's abandon saves first
    import clip.stopping as stopping

    exception = getattr(stopping, abandoned)
    with caplog.at_level(logging.WARNING, logger="clip.stopping"), stopping.StopRequest() as stop:
        with pytest.raises(exception), stop.interrupting(exception):
            os.kill(os.getpid(), signal.SIGTERM)
    assert f"received signal {int(signal.SIGTERM)}: {said}" in caplog.text
    assert ("abandoning the evaluation" in caplog.text) == (abandoned == "EvaluationInterrupted")


def test_a_ctrl_c_while_the_results_are_written_says_that_a_second_stops_without_writing_them(caplog):
    from clip.stopping import StopRequest

    with caplog.at_level(logging.WARNING, logger="clip.stopping"), StopRequest() as stop, stop.finishing():
        os.kill(os.getpid(), signal.SIGINT)
        assert "(a second Ctrl-C stops at once, without writing them)" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.stopping"), StopRequest() as stop, stop.finishing():
        os.kill(os.getpid(), signal.SIGTERM)  # no Ctrl-C to press twice
    assert "exits as finished once its results are written" in caplog.text and "Ctrl-C" not in caplog.text


def test_a_signal_after_a_finishing_block_is_a_stop_again(caplog):
    # finishing() covers only its block: a signal after it has work left to stop before
    from clip.stopping import StopRequest

    with caplog.at_level(logging.WARNING, logger="clip.stopping"), StopRequest() as stop:
        with stop.finishing():
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    assert "stopping at the next safe point" in caplog.text and "complete" not in caplog.text


def test_a_stop_request_outside_the_main_thread_leaves_signals_alone():
    # e.g. training started from a notebook's background thread: Python lets only the main thread set signal
    # handlers, and the run goes on without them rather than failing at its start
    import threading

    from clip.stopping import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    outcome = {}

    def run():
        try:
            with StopRequest() as stop:
                outcome["requested"] = stop.requested
        except BaseException as error:  # reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert outcome == {"requested": False}
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_second_ctrl_c_ends_clip_train_with_status_130_and_no_traceback(tmp_path, monkeypatch, capsys, caplog):
    # The warning said what happened ("stopping at once, without saving; the run resumes from its latest
    # checkpoint"); Python's KeyboardInterrupt traceback through torch's modules then followed it, read as a crash.
    import clip.train as train_module

    real = train_module.contrastive_step
    calls = {"n": 0}

    def pressed_twice(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "contrastive_step", pressed_twice)
    with caplog.at_level(logging.WARNING, logger="clip.stopping"):
        try:
            status = main([str(DEMO), "--output-dir", str(tmp_path), *TINY, "eval.every_n_steps=0"])
        except KeyboardInterrupt:  # escaping, it would end the whole test session
            pytest.fail("the second Ctrl-C's KeyboardInterrupt escaped clip-train's main")
    assert status == 130
    assert "received a second Ctrl-C: stopping at once, without saving" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*.pt"))


def test_an_output_dir_outside_unicodes_first_plane_is_used_as_given(tmp_path, monkeypatch):
    # --output-dir went into an override through json.dumps, whose escapes of such a character (a surrogate
    # pair) TOML refuses: the override's value was then its raw text, quotes and escapes included, a relative
    # folder in the working directory
    import clip.cli.train as train_cli

    monkeypatch.chdir(tmp_path)  # where the wrong folder was made
    started = []
    monkeypatch.setattr(train_cli, "run",
                        lambda config, launcher, log_file, run_took_over: started.append((config.output_dir,
                                                                                          log_file.path)) or 0)
    run_dir = str(tmp_path / "run \U0001f600")
    assert main([str(DEMO), "--output-dir", run_dir]) == 0
    assert started == [(run_dir, tmp_path / "run \U0001f600" / "train.log")]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A tiny run stopped at step 3, with its checkpoint; copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny_config(run_dir, "eval.every_n_steps=0"), stop_at_step=3)
    return run_dir


def _first_moments(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda s: s.update(step=-5), r"not a whole checkpoint .*'step' is -5, not a step count"),
        (lambda s: s.update(metrics=[1]), r"not a whole checkpoint .*'metrics' is of type list, not dict"),
        (lambda s: s["rng"][0].pop("torch"), r"not a whole checkpoint .*'rng' of rank 0 lacks 'torch'"),
        (lambda s: s.update(data=[5]), r"not a whole checkpoint .*'data' of rank 0 is of type int, not dict"),
        (lambda s: s.update(data=[]), r"not a whole checkpoint .*'rng' holds 1 ranks' states but 'data' 0"),
        (lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)),
         r"rank 0's 'rng' entry does not fit this run \(RuntimeError: Expected a CPUGeneratorImplState"),
        (lambda s: s["rng"][0].update(python=[1, 2, 3]),
         r"rank 0's 'rng' entry does not fit this run \(ValueError: state vector is the wrong size"),
        (lambda s: s["model"].update(text_projection=torch.zeros(3, 3)),
         r"its 'model' entry does not fit this run \(RuntimeError: .* size mismatch for text_projection"),
        (lambda s: s.update(optimizer={}), r"its 'optimizer' entry does not fit this run \(KeyError: 'state'"),
        (lambda s: _first_moments(s).update(step="x"), r"its 'optimizer' entry does not fit this run \(ValueError"),
        (lambda s: s["data"][0].pop("layout"), r"its 'data' entry does not fit this run \(KeyError: 'layout'"),
    ],
    ids=["negative step", "metrics a list", "rng without torch's", "data not a dict", "no data", "torch rng size",
         "python rng size", "weight shape", "optimizer without state", "optimizer step a string", "data layout"],
)
def test_a_checkpoint_whose_entries_cannot_be_restored_is_refused_in_one_line(
    stopped_run, tmp_path, capsys, damage, expected
):
    # Entries that contradict the checkpoint's config (edited, or written by another program) stopped clip-train
    # with a traceback from torch's load_state_dict, random.setstate, numpy's seeding or the data state's reader
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    path = ckpt.list_checkpoints(run_dir)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    damage(state)
    torch.save(state, path)
    assert main([str(DEMO), *TINY, f"output_dir={run_dir}", "eval.every_n_steps=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert re.search(rf"^clip-train: {re.escape(str(run_dir))}: the checkpoint of step .*{expected}", error), error
    assert error.endswith("move it aside to resume from an earlier one") and "\n" not in error


def test_an_optimizer_state_of_other_shapes_is_said_without_sending_the_user_to_an_earlier_checkpoint(
    stopped_run, tmp_path, capsys
):
    # The optimizer's own mismatches (a moment of another shape) hold for every checkpoint of the run: the
    # advice to resume from an earlier one, which the other refusals give, would send the user in circles
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    path = ckpt.list_checkpoints(run_dir)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    _first_moments(state)["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, path)
    assert main([str(DEMO), *TINY, f"output_dir={run_dir}", "eval.every_n_steps=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"clip-train: {re.escape(str(run_dir))}: the checkpoint's optimizer state 'exp_avg' of "
                        r"'\S+' has shape \(3, 3\), the parameter \(\d+(, \d+)*\)", error), error


def test_the_trainer_clips_the_unscaled_gradients_to_grad_clip_norm(tmp_path, monkeypatch):
    # optimizer.grad_clip_norm must reach the step, and under fp16 the gradients must be unscaled before they
    # are measured and clipped: else the clip and the logged norm apply to gradients 2^16 times too large
    # (and the clipped ones shrink by as much once the scaler unscales them in its step).
    import clip.train as train_module

    seen = {}
    measure = train_module.gradient_norm

    def recording(module, clip_to):
        norm = measure(module, clip_to)
        after = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).norm()
        seen[precision] = (clip_to, norm.item(), after.item())
        return norm

    monkeypatch.setattr(train_module, "gradient_norm", recording)
    for precision in ("fp32", "fp16"):
        train(tiny_config(tmp_path / precision, "schedule.steps=1", "eval.every_n_steps=0", "eval.zeroshot=[]",
                          f"train.precision={precision}", "optimizer.grad_clip_norm=0.01"))
    for clip_to, norm, after in seen.values():
        assert clip_to == 0.01 and norm > 0.02 and after == pytest.approx(0.01, rel=1e-3)
    assert seen["fp16"][1] == pytest.approx(seen["fp32"][1], rel=0.05)  # the same batch, the same weights


def test_every_optimizer_step_takes_the_scheduled_learning_rate(tmp_path, monkeypatch):
    # The logged "lr" is the schedule's value; the optimizer's groups must be given it before every step
    # (both groups: with and without weight decay), or the run trains at the constant optimizer.lr.
    import clip.train as train_module

    rates = []
    build = train_module.build_optimizer

    def recording_build_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: rates.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording_build_optimizer)
    config = tiny_config(tmp_path, "schedule.steps=5", "eval.every_n_steps=0", "eval.zeroshot=[]")
    train(config)
    expected = [learning_rate(step, config.optimizer.lr, config.schedule) for step in range(5)]  # 2 warmup steps
    assert rates == [[rate, rate] for rate in expected] and len(set(expected)) == 4


def test_the_progress_bar_redraws_once_a_minute_into_a_file_and_as_often_as_tqdm_on_a_terminal(tmp_path, monkeypatch):
    # A scheduler's output file (slurm-%j.out) kept tqdm's every redraw, 0.1 s apart: a copy of the bar per step,
    # after a carriage return, one line of tens of megabytes over a long run with the log lines glued to it
    import io

    import tqdm

    redraw_intervals = []

    class RecordedBar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            redraw_intervals.append(self.mininterval)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(tqdm, "tqdm", RecordedBar)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # pytest run from a notebook's kernel
    for stream, run in ((io.StringIO(), "file"), (Terminal(), "terminal")):
        monkeypatch.setattr(sys, "stderr", stream)
        train(tiny_config(tmp_path / run, "logging.progress_bar=true", "schedule.steps=1", "eval.every_n_steps=0",
                          "eval.zeroshot=[]", "checkpoint.every_n_steps=0"))
        assert "train: 100%" in stream.getvalue()
    assert redraw_intervals == [60, 0.1]  # seconds: once a minute into the file, tqdm's default on the terminal


def test_without_a_progress_bar_each_logged_steps_figures_are_a_log_line(tmp_path, caplog):
    # logging.progress_bar = false (a batch job's log) left nothing per step on the console or in train.log:
    # only metrics.jsonl showed whether the run was learning
    steps = ["schedule.steps=4", "logging.every_n_steps=2", "eval.every_n_steps=0", "eval.zeroshot=[]",
             "checkpoint.every_n_steps=0"]
    with caplog.at_level("INFO", logger="clip.train"):
        train(tiny_config(tmp_path / "plain", "logging.progress_bar=false", *steps))
    lines = [record.getMessage() for record in caplog.records if re.match(r"step \d+/4: ", record.getMessage())]
    assert len(lines) == 2, lines
    pattern = r"step {}/4: loss \d+\.\d{{4}}, lr \d\.\d\de-\d\d, logit scale \d+\.\d, \d+\.\d samples/s, data wait \d+%"
    assert re.fullmatch(pattern.format(2), lines[0]) and re.fullmatch(pattern.format(4), lines[1]), lines
    first = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert f"loss {first['loss']:.4f}, lr {first['lr']:.2e}" in lines[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="clip.train"):  # the bar shows them: not said twice
        train(tiny_config(tmp_path / "bar", "logging.progress_bar=true", *steps))
    assert not [record for record in caplog.records if re.match(r"step \d+/4: ", record.getMessage())]


def test_shards_whose_fsspec_backend_is_missing_end_the_command_with_one_line(tmp_path, capsys, caplog, monkeypatch):
    # s3:// shards without s3fs: fsspec's ImportError came with a traceback, from the data's set-up
    registry = pytest.importorskip("fsspec.registry")
    monkeypatch.setitem(registry.known_implementations, "nobackend",
                        {"class": "no_such_backend_package.FileSystem", "err": "Install no_such_backend_package"})
    capsys.readouterr()
    shards = 'data.sources=[{kind="shards", path="nobackend://bucket/{0..1}.tar"}]'
    assert main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, shards]) == 1
    assert "Traceback" not in capsys.readouterr().err
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "Install no_such_backend_package" in errors[0].getMessage()
    assert errors[0].exc_info is None


def test_a_module_the_start_imports_is_imported_whole_through_a_signal(tmp_path, monkeypatch):
    # The optimizer's constructor imports torch._dynamo (and sympy) the first time, for seconds: a notebook's Ctrl-C
    # then abandoned the start halfway through those imports, and every later train() of the process failed on
    # the half-made modules ("partially initialized module 'torch._dynamo'"). The start imports it first, with the
    # signals held until the import ends; here a module that is signalled halfway through its own code.
    import signal as signals

    from clip.train import imported_whole

    (tmp_path / "signalled_while_imported.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nwhole = True\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signals.signal(signals.SIGINT, signals.default_int_handler)
    # Another thread, as a process running earlier runs has (TensorBoard's writer): a signal blocked in this one
    # went to it, and Python ran the handler here mid-import all the same
    other_thread_ends = threading.Event()
    other_thread = threading.Thread(target=other_thread_ends.wait)
    other_thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):  # the signal, handled as the import ends
            imported_whole("signalled_while_imported")
    finally:
        signals.signal(signals.SIGINT, previous)
        other_thread_ends.set()
        other_thread.join()
    assert sys.modules.pop("signalled_while_imported").whole
    assert signals.getsignal(signals.SIGTERM) is not None  # the handlers are put back (checked by conftest too)
