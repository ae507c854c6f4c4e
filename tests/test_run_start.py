"""What a run does before its first step (`clip.run_start`), called directly: the warnings about unlikely
settings, the earlier version's literal "~" folder, the step a results.json records, and the module as built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from clip import checkpoint as ckpt
from clip.config import TrainConfig, load_config
from clip.distributed import DistributedInfo
from clip.run_start import (
    BadTrainingInput,
    bad_input_reported_as,
    build_training_module,
    results_step,
    start_new_run,
    warn_about_unlikely_settings,
    warn_of_a_literal_tilde_folder,
    warn_of_run_directories_inside,
)

DEMO = Path(__file__).parent.parent / "configs" / "demo.toml"
TINY = ["model.embed_dim=32", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32",
        "model.vision.layers=1", "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "train.batch_size=8", "schedule.steps=6", "schedule.warmup_steps=2",
        "train.device=cpu"]
CPU = torch.device("cpu")


def tiny_config(run_dir: Path, *extra: str) -> TrainConfig:
    return load_config(DEMO, [*TINY, f"output_dir={run_dir}", *extra], TrainConfig)


def warnings_of(caplog, config: TrainConfig, global_batch: int = 8, samples_per_epoch: int = 100,
                saved_config: dict | None = None) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        warn_about_unlikely_settings(config, global_batch, samples_per_epoch, saved_config, CPU)
    return caplog.text


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_either_16_bit_precision_on_the_cpu_is_named(tmp_path, caplog, precision):
    # Both autocast to a 16-bit type that only CPUs with native 16-bit matrix instructions run fast
    named = f"train.precision = '{precision}' on the CPU"
    assert named in warnings_of(caplog, tiny_config(tmp_path, f"train.precision={precision}"))
    assert "on the CPU" not in warnings_of(caplog, tiny_config(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        warn_about_unlikely_settings(tiny_config(tmp_path, f"train.precision={precision}"), 8, 100, None,
                                     torch.device("cuda"))
    assert "on the CPU" not in caplog.text


def test_gradient_checkpointing_of_a_trained_resnet_image_tower_is_named_as_not_done(tmp_path, caplog):
    # Only transformer blocks are recomputed (a ResNet's BatchNorm would update its statistics twice): the flag
    # said nothing, and the image tower, where a ResNet's activation memory is, kept its activations
    resnet = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8"]
    said = "train.grad_checkpointing recomputes transformer blocks only: this ResNet image tower keeps"
    assert said in warnings_of(caplog, tiny_config(tmp_path, *resnet, "train.grad_checkpointing=true"))
    assert said not in warnings_of(caplog, tiny_config(tmp_path, "train.grad_checkpointing=true"))  # a ViT
    assert said not in warnings_of(caplog, tiny_config(tmp_path, *resnet))
    locked = tiny_config(tmp_path, *resnet, "train.grad_checkpointing=true", "train.lock_image=true")
    assert said not in warnings_of(caplog, locked)  # no activations kept for a tower that is not trained
    partly = tiny_config(tmp_path, *resnet, "train.grad_checkpointing=true", "train.lock_image=true",
                         "train.lock_image_unlocked_layers=1")
    assert said in warnings_of(caplog, partly)  # its last stage trains

def test_a_warmup_as_long_as_a_constant_rate_run_is_not_named(tmp_path, caplog):
    # A constant schedule has no decay that the warmup could keep from starting
    warmup = ["schedule.steps=3", "schedule.warmup_steps=3"]
    assert "the whole run is warmup" in warnings_of(caplog, tiny_config(tmp_path, *warmup))
    constant = tiny_config(tmp_path, *warmup, "schedule.kind=constant", "schedule.min_lr_ratio=0")
    assert "the whole run is warmup" not in warnings_of(caplog, constant)


def test_an_epoch_of_exactly_one_global_batch_repeats_no_pair(tmp_path, caplog):
    config = tiny_config(tmp_path)
    assert "fewer than the global batch" not in warnings_of(caplog, config, global_batch=8, samples_per_epoch=8)
    assert "an epoch holds 7 samples, fewer than the global batch of 8" in warnings_of(
        caplog, config, global_batch=8, samples_per_epoch=7)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_tower_locked_at_its_random_initialisation_is_named_in_a_new_run_only(tmp_path, caplog, tower):
    # LiT locks a pretrained tower; one locked from scratch stays random for the whole run
    named = f"train.lock_{tower} without train.init_weights: the locked tower keeps its random initialisation"
    locked = [f"train.lock_{tower}=true"]
    assert named in warnings_of(caplog, tiny_config(tmp_path, *locked))
    assert named not in warnings_of(caplog, tiny_config(tmp_path, *locked), saved_config={"train": {}})
    assert "random initialisation" not in warnings_of(
        caplog, tiny_config(tmp_path, *locked, f"train.init_weights={tmp_path}"))
    assert "random initialisation" not in warnings_of(caplog, tiny_config(tmp_path))


def test_fine_tuning_on_the_users_pairs_beside_synthetic_ones_is_not_named(tmp_path, caplog):
    # The warning is for synthetic data alone: a synthetic source added to the user's own is their choice
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,caption\n")
    mixed = tiny_config(tmp_path, f"train.init_weights={tmp_path}", "data.sources.0.kind=manifest",
                        f"data.sources.0.path={manifest}", "data.sources.0.num_samples=none")
    mixed.data.sources.insert(0, tiny_config(tmp_path).data.sources[0])
    assert [source.kind for source in mixed.data.sources] == ["synthetic", "manifest"]
    assert "with synthetic data only" not in warnings_of(caplog, mixed)


def test_a_resume_names_init_weights_only_when_they_changed_to_other_weights(tmp_path, caplog):
    # A requeued job gives the same train.init_weights again; a resume without any is no change of weights either
    saved = {"train": {"init_weights": str(tmp_path / "a")}}
    changed = "train.init_weights changed to"
    assert changed in warnings_of(caplog, tiny_config(tmp_path, f"train.init_weights={tmp_path / 'b'}"),
                                  saved_config=saved)
    assert changed not in warnings_of(caplog, tiny_config(tmp_path, f"train.init_weights={tmp_path / 'a'}"),
                                      saved_config=saved)
    assert changed not in warnings_of(caplog, tiny_config(tmp_path), saved_config=saved)


def test_the_literal_tilde_folder_is_named_only_when_it_holds_checkpoints_and_never_stops_the_run(
    tmp_path, monkeypatch, caplog
):
    home, work = tmp_path / "home", tmp_path / "work"
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(work.mkdir() or work)
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        warn_of_a_literal_tilde_folder(home / "runs" / "x")  # no ./~/runs/x
        assert caplog.text == ""
        (work / "~" / "runs" / "x" / ckpt.CHECKPOINT_DIR).mkdir(parents=True)
        warn_of_a_literal_tilde_folder(home / "runs" / "x")  # the folder, but no checkpoint in it
        assert caplog.text == ""

        def unreadable(run_dir):
            raise PermissionError(f"{run_dir}: permission denied")

        monkeypatch.setattr(ckpt, "list_checkpoints", unreadable)
        warn_of_a_literal_tilde_folder(home / "runs" / "x")  # a warning's check: no reason to stop the run
        assert caplog.text == ""

        def homeless(cls):
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", classmethod(homeless))
        warn_of_a_literal_tilde_folder(home / "runs" / "x")
        assert caplog.text == ""


def test_a_new_run_in_a_folder_of_runs_names_them_and_never_stops_the_run(tmp_path, monkeypatch, caplog):
    # --output-dir runs, meant as runs/my_run (to resume it, or beside it): a new run from scratch started in the
    # folder of runs itself, its checkpoints and results mixed with the runs' folders, without a word
    runs = tmp_path / "runs"
    (runs / "images" / "cats").mkdir(parents=True)  # a folder that is no run
    (runs / "empty_run" / ckpt.CHECKPOINT_DIR).mkdir(parents=True)  # no checkpoint in it
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        warn_of_run_directories_inside(runs)
        assert caplog.text == ""
        ckpt.checkpoint_path(runs / "my_run", 4).parent.mkdir(parents=True)
        ckpt.checkpoint_path(runs / "my_run", 4).write_bytes(b"")
        warn_of_run_directories_inside(runs)
        assert f"{runs} starts a new run, but it holds run directories: {runs / 'my_run'}" in caplog.text
        assert f"--output-dir {runs / 'my_run'}" in caplog.text
        caplog.clear()
        warn_of_run_directories_inside(tmp_path / "not_there")  # a new folder: nothing inside to name
        assert caplog.text == ""

        def unreadable(path):
            raise PermissionError(f"{path}: permission denied")

        monkeypatch.setattr(Path, "iterdir", unreadable)
        warn_of_run_directories_inside(runs)  # a warning's check: no reason to stop the run
        assert caplog.text == ""


@pytest.mark.parametrize(("text", "step"), [
    ('{"step": 6}', 6), ('{"step": 0}', 0), ('{"step": true}', 3), ('{"step": -1}', 3), ('{"step": 6.0}', 3),
    ("[6]", 3), ('"6"', 3), ("{", 3), ("{}", 3),
], ids=["step", "zero", "bool", "negative", "float", "list", "string", "torn", "none"])
def test_results_step_is_a_results_files_whole_step_or_the_default(tmp_path, text, step):
    (tmp_path / "results.json").write_text(text)
    assert results_step(tmp_path / "results.json", default=3) == step
    assert results_step(tmp_path / "missing.json", default=3) == 3


def test_the_module_is_built_with_the_runs_checkpointing_and_patch_dropout(tmp_path):
    plain = build_training_module(tiny_config(tmp_path), CPU)
    assert not plain.clip.transformer.grad_checkpointing and not plain.clip.visual.transformer.grad_checkpointing
    assert plain.clip.visual.patch_dropout == 0
    set_ = build_training_module(tiny_config(tmp_path, "train.grad_checkpointing=true", "train.patch_dropout=0.5"), CPU)
    assert set_.clip.transformer.grad_checkpointing and set_.clip.visual.transformer.grad_checkpointing
    assert set_.clip.visual.patch_dropout == 0.5
    # The trainer cuts each batch's texts on the host (`trim_text_batch`): the model must not read the
    # length off the device again
    assert plain.trim_text is False


def test_a_resnet_on_the_cpu_keeps_the_layout_it_was_built_in(tmp_path):
    # channels_last is cuDNN's fastest layout for convolutions, and is taken on a GPU only
    resnet = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8",
              "model.vision.heads=2"]
    module = build_training_module(tiny_config(tmp_path, *resnet), CPU)
    assert module.clip.visual.conv1.weight.is_contiguous()
    assert not module.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_new_run_takes_the_loaded_siglip_bias_out_of_the_model(tmp_path, loss):
    # The bias is the loss's parameter while the run trains (SigLIP's goes on from it). Left in the model as the
    # buffer loading set, it would be a constant the run never trains, and on rank 0 alone (which loads the weights)
    config = tiny_config(tmp_path, f"loss.kind={loss}")
    module = build_training_module(config, CPU)
    module.clip.logit_bias = torch.tensor(-3.0)  # as loading weights trained with SigLIP sets it
    start_new_run(module, config, DistributedInfo(rank=0, world_size=1, local_rank=0, device=CPU))
    assert module.clip.logit_bias is None and "logit_bias" not in dict(module.clip.named_buffers())
    assert (module.logit_bias is None) if loss == "clip" else (module.logit_bias.item() == -3.0)


@pytest.mark.parametrize("error", [FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError])
def test_a_wrong_path_or_file_is_bad_input_with_its_error_chained(error):
    with pytest.raises(BadTrainingInput, match="^pairs.csv: no$") as raised:
        with bad_input_reported_as(BadTrainingInput):
            raise error("pairs.csv: no")
    assert type(raised.value.__cause__) is error


@pytest.mark.parametrize("error", [ConnectionResetError, TimeoutError, OSError])
def test_an_object_stores_failure_is_no_bad_input_and_keeps_its_traceback(error):
    # A rerun may well succeed: not the one-line "fix your data" of BadTrainingInput
    with pytest.raises(error):
        with bad_input_reported_as(BadTrainingInput):
            raise error("connection reset by peer")
