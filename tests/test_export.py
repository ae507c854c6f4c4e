"""clip.export and clip-export: a model's weights alone, in this library's layout or OpenAI's."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

import clip
import clip.export
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.cli.export import main
from clip.export import ExportError, export_weights
from clip.loading import load_with_source
from clip.model import CLIP
from clip.weights_file import CHECKPOINT_FORMAT

TEXT = TextConfig(context_length=16, vocab_size=120, width=64, heads=1, layers=1)
# OpenAI's conventions: one head per 64 channels, QuickGELU, MLP ratio 4
CONVENTIONAL = ModelConfig(embed_dim=32, text=TEXT,
                           vision=VisionConfig(kind="vit", image_size=32, width=64, layers=1, heads=1, patch_size=8))
RESNET = ModelConfig(embed_dim=32, text=TEXT,
                     vision=VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4))
OTHER_HEADS = dataclasses.replace(CONVENTIONAL, vision=dataclasses.replace(CONVENTIONAL.vision, heads=2))


def training_checkpoint(config: ModelConfig, path: Path, step: int = 40, logit_bias: float | None = None) -> CLIP:
    """A checkpoint as the trainer writes it, optimizer state and all; returns its model."""
    torch.manual_seed(step)
    model = CLIP(config).eval()
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
        "config": {"model": config.to_dict(), "optimizer": {"lr": 5e-4}},
        "optimizer": {"state": {i: {"exp_avg": torch.randn(64, 64)} for i in range(8)}, "param_groups": []},
    }
    if logit_bias is not None:
        state["loss_parameters"] = {"logit_bias": torch.tensor(logit_bias)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return model


def features(model: CLIP, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=generator)
    text = torch.randint(1, config.text.vocab_size - 1, (2, config.text.context_length), generator=generator)
    text[:, 5] = config.text.vocab_size - 1
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def test_the_clip_layout_keeps_the_weights_and_architecture_without_the_training_state(tmp_path):
    original = training_checkpoint(OTHER_HEADS, tmp_path / "run" / "checkpoints" / "step_00000040.pt")
    exported = export_weights(tmp_path / "run", tmp_path / "model.pt")
    content = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(content) == {"format", "step", "model", "config", "exported_from", "trained_here"}  # no optimizer
    assert content["config"] == {"model": OTHER_HEADS.to_dict()} and content["step"] == 40
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000040.pt"
    # The file's name, not the exporter's folders: the file is for others
    # and its SHA256, by which the file it came from can be told without its folders
    assert content["exported_from"] == {"path": "step_00000040.pt", "step": 40, "released": None,
                                        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert exported.sha256 == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    assert exported.size_bytes == (tmp_path / "model.pt").stat().st_size < checkpoint.stat().st_size
    # Heads that shapes do not show are recorded: the same model comes back, bit for bit, with its step
    model, _, source = load_with_source(tmp_path / "model.pt", device="cpu")
    assert model.config == OTHER_HEADS and source.step == 40
    for ours, theirs in zip(features(model, OTHER_HEADS), features(original, OTHER_HEADS)):
        assert torch.equal(ours, theirs)


@pytest.mark.filterwarnings("ignore:.*records no architecture")
def test_the_clip_layout_keeps_the_preprocessing_of_weights_trained_here_or_elsewhere(tmp_path):
    # clip.load composites transparent images onto white for a model the trainer wrote (a file recording its
    # architecture), not for OpenAI's: an export of OpenAI's weights records the architecture too, and loaded
    # with the trainer's preprocessing
    from clip.preprocess import TRAINING_ALPHA_BACKGROUND

    original = training_checkpoint(CONVENTIONAL, tmp_path / "step_00000001.pt", step=1)
    torch.save(original.state_dict(), tmp_path / "openai_weights.pt")  # a plain state dict, as OpenAI's
    for source, background in (("step_00000001.pt", TRAINING_ALPHA_BACKGROUND), ("openai_weights.pt", None)):
        assert load_with_source(tmp_path / source, device="cpu")[1].alpha_background == background
        export_weights(tmp_path / source, tmp_path / f"exported_{source}")
        assert clip.load(tmp_path / f"exported_{source}", device="cpu")[1].alpha_background == background, source


def test_an_export_of_weights_that_record_no_architecture_loads_with_the_sources_warnings(tmp_path):
    # The architecture clip.load inferred from the shapes (OpenAI's conventions) was recorded as the export's
    # config: an open_clip GELU checkpoint's export then loaded as QuickGELU without a word, and
    # load_weights_into refused the right (GELU) model for it
    from clip.loading import load_weights_into

    gelu = dataclasses.replace(CONVENTIONAL, activation="gelu")
    torch.manual_seed(0)
    original = CLIP(gelu).eval()
    open_clip_epoch = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}
    torch.save(open_clip_epoch, tmp_path / "epoch_3.pt")
    with pytest.warns(UserWarning, match="is an open_clip training checkpoint, which records no architecture"):
        export_weights(tmp_path / "epoch_3.pt", tmp_path / "exported.pt")
    content = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert content["architecture_inferred"] is True
    assert content["open_clip_origin"] == "an open_clip training checkpoint"
    with pytest.warns(UserWarning, match="is an open_clip training checkpoint, which records no architecture"):
        model, _, source = load_with_source(tmp_path / "exported.pt", device="cpu")
    assert source.architecture_inferred and source.to_dict().keys() == {"path", "step", "released", "sha256"}
    right = CLIP(gelu).eval()
    load_weights_into(right, str(tmp_path / "exported.pt"))
    for ours, theirs in zip(features(right, gelu), features(original, gelu)):
        assert torch.equal(ours, theirs)
    # A run's own checkpoint records its architecture: nothing inferred, nothing marked
    training_checkpoint(OTHER_HEADS, tmp_path / "run" / "checkpoints" / "step_00000040.pt")
    export_weights(tmp_path / "run", tmp_path / "run.pt")
    assert "architecture_inferred" not in torch.load(tmp_path / "run.pt", weights_only=True)


def test_open_clips_hub_pickle_of_a_released_size_is_said_to_be_open_clips(tmp_path):
    # open_clip's Hub repositories ship open_clip_pytorch_model.bin beside the safetensors file: at OpenAI's
    # released sizes (most of its GELU models), it loaded as QuickGELU without the safetensors file's warning
    from clip.weights_file import read_weights

    torch.save({"visual.proj": torch.zeros(1)}, tmp_path / "open_clip_pytorch_model.bin")
    torch.save({"visual.proj": torch.zeros(1)}, tmp_path / "weights.bin")
    assert read_weights(tmp_path / "open_clip_pytorch_model.bin").open_clip_origin.startswith(
        "open_clip's open_clip_pytorch_model.bin")
    assert read_weights(tmp_path / "weights.bin").open_clip_origin is None


def test_an_output_folder_that_is_missing_or_read_only_is_said_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded before the output was checked")

    monkeypatch.setattr(clip.export, "load_with_source", no_load)
    with pytest.raises(ExportError, match=r"the folder .*typo does not exist"):
        export_weights("RN50", tmp_path / "typo" / "model.pt")
    assert not (tmp_path / "typo").exists()  # a mistyped folder is not made
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="file is a file, not a folder$"):
        export_weights("RN50", tmp_path / "file" / "model.pt")
    monkeypatch.setattr(clip.export.os, "access", lambda path, mode: False)
    with pytest.raises(ExportError, match="is not writable"):
        export_weights("RN50", tmp_path / "model.pt")


def test_a_half_precision_export_keeps_integer_counters_and_loads_as_float32(tmp_path):
    original = training_checkpoint(RESNET, tmp_path / "step_00000007.pt", step=7)
    export_weights(tmp_path / "step_00000007.pt", tmp_path / "half.pt", dtype="float16")
    state = torch.load(tmp_path / "half.pt", weights_only=True)["model"]
    assert {value.dtype for name, value in state.items() if not name.endswith("num_batches_tracked")} == {torch.float16}
    assert {value.dtype for name, value in state.items() if name.endswith("num_batches_tracked")} == {torch.long}
    model, _ = clip.load(tmp_path / "half.pt", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    for ours, theirs in zip(features(model, RESNET), features(original, RESNET)):
        torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)


def test_the_openai_layout_is_a_plain_state_dict_under_openais_names(tmp_path):
    original = training_checkpoint(CONVENTIONAL, tmp_path / "step_00000003.pt", step=3)
    export_weights(tmp_path / "step_00000003.pt", tmp_path / "openai.pt", layout="openai")
    state = torch.load(tmp_path / "openai.pt", weights_only=True)
    assert set(state) == set(original.state_dict()) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(torch.equal(state[name], value) for name, value in original.state_dict().items())
    # Read back by shapes, as openai/CLIP reads it (this library says that the heads are guessed)
    with pytest.warns(UserWarning, match="records no architecture"):
        model, _ = clip.load(tmp_path / "openai.pt", device="cpu")
    assert model.config == CONVENTIONAL


def refused_in_the_openai_layout(config: ModelConfig, folder: Path, match: str) -> None:
    """A checkpoint of `config` is refused by the openai layout with a message matching `match`, writing nothing."""
    training_checkpoint(config, folder / "step_00000001.pt", step=1)
    with pytest.raises(ExportError, match=match):
        export_weights(folder / "step_00000001.pt", folder / "openai.pt", layout="openai")
    assert not (folder / "openai.pt").exists()


def test_the_openai_layout_is_refused_for_a_model_openai_would_read_as_another(tmp_path):
    # openai/CLIP's build_model reads heads as width // 64: a two-head model would load there as a one-head
    # model and compute other features without a word
    refused_in_the_openai_layout(OTHER_HEADS, tmp_path, r"model\.vision\.heads: it would read 1, the model has 2\. "
                                                        r"Export it with the clip layout")
    refused_in_the_openai_layout(dataclasses.replace(CONVENTIONAL, activation="gelu"), tmp_path,
                                 r"model\.activation: it would read 'quick_gelu', the model has 'gelu'")


def test_the_openai_layout_is_refused_for_an_mlp_openai_would_not_build(tmp_path):
    # openai/CLIP's blocks have an MLP of 4x the width whatever the shapes say: a file of another ratio fails
    # in its load_state_dict, so it is no file for openai/CLIP (a ResNet's text tower has one as well)
    narrow_text = dataclasses.replace(RESNET, text=dataclasses.replace(TEXT, mlp_ratio=2.0))
    refused_in_the_openai_layout(narrow_text, tmp_path,
                                 r"model\.text\.mlp_ratio: it would read 4\.0, the model has 2\.0")
    narrow_vit = dataclasses.replace(CONVENTIONAL, vision=dataclasses.replace(CONVENTIONAL.vision, mlp_ratio=2.0))
    refused_in_the_openai_layout(narrow_vit, tmp_path,
                                 r"model\.vision\.mlp_ratio: it would read 4\.0, the model has 2\.0")


def test_the_openai_layout_is_refused_for_widths_openai_cannot_split_into_heads(tmp_path):
    # A text width of 48 is no whole number of 64-channel heads: openai/CLIP cannot build the model at all,
    # and the refusal is an ExportError naming the way out, not the inference's own error
    narrow = dataclasses.replace(CONVENTIONAL, text=dataclasses.replace(TEXT, width=48))
    refused_in_the_openai_layout(narrow, tmp_path, r"openai/CLIP could not read this model's architecture from its "
                                                   r"shapes \(.*\); export it with the clip layout")


def test_a_siglip_models_bias_is_kept_by_the_clip_layout_and_warned_of_by_the_openai_one(tmp_path):
    training_checkpoint(CONVENTIONAL, tmp_path / "step_00000005.pt", step=5, logit_bias=-7.5)
    export_weights(tmp_path / "step_00000005.pt", tmp_path / "siglip.pt")
    siglip = clip.load(tmp_path / "siglip.pt", device="cpu")[0]
    assert siglip.logit_bias.item() == -7.5
    # The model's logits carry it, so that their sigmoid is the match probability the model learned
    size = CONVENTIONAL.vision.image_size
    images, texts = torch.randn(2, 3, size, size), torch.randint(1, 100, (3, TEXT.context_length))
    with torch.no_grad():
        logits_per_image, logits_per_text = siglip(images, texts)
        cosines = siglip.encode_image(images, normalize=True) @ siglip.encode_text(texts, normalize=True).t()
    torch.testing.assert_close(logits_per_image, siglip.logit_scale.exp() * cosines - 7.5)
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    with pytest.warns(UserWarning, match=r"no place for this SigLIP model's learned logit bias \(-7\.5\)"):
        export_weights(tmp_path / "step_00000005.pt", tmp_path / "openai.pt", layout="openai")
    with pytest.warns(UserWarning, match="records no architecture"):
        assert clip.load(tmp_path / "openai.pt", device="cpu")[0].logit_bias is None


def test_an_existing_output_is_kept_unless_overwrite_is_asked(tmp_path):
    training_checkpoint(CONVENTIONAL, tmp_path / "step_00000001.pt", step=1)
    (tmp_path / "model.pt").write_bytes(b"someone's file")
    with pytest.raises(ExportError, match=r"model.pt exists; pass overwrite=True to replace it$"):  # no CLI flag
        export_weights(tmp_path / "step_00000001.pt", tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == b"someone's file"
    export_weights(tmp_path / "step_00000001.pt", tmp_path / "model.pt", overwrite=True)
    assert clip.load(tmp_path / "model.pt", device="cpu")[0].config == CONVENTIONAL
    with pytest.raises(ExportError, match="is a directory"):
        export_weights(tmp_path / "step_00000001.pt", tmp_path)
    for bad in ({"layout": "hf"}, {"dtype": "int8"}):
        with pytest.raises(ExportError, match="must be one of"):
            export_weights(tmp_path / "step_00000001.pt", tmp_path / "other.pt", **bad)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt", "step_00000001.pt"]  # no temporaries


def test_clip_export_prints_the_files_sha256_and_says_an_input_error_in_one_line(tmp_path, capsys):
    training_checkpoint(CONVENTIONAL, tmp_path / "run" / "checkpoints" / "step_00000009.pt", step=9)
    assert main([str(tmp_path / "run"), str(tmp_path / "model.pt"), "--dtype", "float16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'model.pt'}  clip layout, float16, ")
    assert out[1] == "sha256 " + hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    assert main([str(tmp_path / "run"), str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"clip-export: {tmp_path / 'model.pt'} exists; pass --overwrite to replace it"]  # not overwrite=True
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "other.pt")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 and not (tmp_path / "other.pt").exists()


def test_clip_export_replaces_an_existing_output_only_with_overwrite(tmp_path, capsys):
    training_checkpoint(CONVENTIONAL, tmp_path / "step_00000004.pt", step=4)
    (tmp_path / "model.pt").write_bytes(b"someone's file")
    assert main([str(tmp_path / "step_00000004.pt"), str(tmp_path / "model.pt")]) == 2
    assert (tmp_path / "model.pt").read_bytes() == b"someone's file"
    assert main([str(tmp_path / "step_00000004.pt"), str(tmp_path / "model.pt"), "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'model.pt'}  clip layout, float32, ")
    assert clip.load(tmp_path / "model.pt", device="cpu")[0].config == CONVENTIONAL


def test_scripts_export_runs_from_a_source_checkout(tmp_path):
    import subprocess
    import sys

    training_checkpoint(CONVENTIONAL, tmp_path / "step_00000002.pt", step=2)
    script = Path(__file__).resolve().parent.parent / "scripts" / "export.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "step_00000002.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("sha256 ") and clip.load(tmp_path / "out.pt", device="cpu")


def test_an_export_over_a_runs_checkpoint_or_under_a_safetensors_name_is_refused(tmp_path):
    # --overwrite replaced a run's checkpoint with the weights alone (the run could not resume from it), and a
    # .safetensors name made torch.load read the export as safetensors: "damaged or truncated"
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    training_checkpoint(CONVENTIONAL, checkpoint, step=2)
    whole = checkpoint.read_bytes()
    for source in (checkpoint, tmp_path / "run"):
        with pytest.raises(ExportError, match=f"is a checkpoint of the run in {tmp_path / 'run'}, which resumes from "
                                              f"it; give another OUTPUT$"):
            export_weights(source, checkpoint, overwrite=True)
    assert checkpoint.read_bytes() == whole
    with pytest.raises(ExportError, match=r"m\.safetensors: the export is a PyTorch file .* name it m\.pt$"):
        export_weights(checkpoint, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    (tmp_path / "weights.pt").write_bytes(b"")  # a weights file of one's own, outside a run: replaced as asked
    export_weights(checkpoint, tmp_path / "weights.pt", overwrite=True)
    assert clip.load(tmp_path / "weights.pt", device="cpu")[0].config == CONVENTIONAL


def test_an_output_whose_folder_is_a_file_is_said_to_be_one(tmp_path):
    training_checkpoint(CONVENTIONAL, tmp_path / "step_00000001.pt", step=1)
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(ExportError, match=r"notes is a file, not a folder$"):
        export_weights(tmp_path / "step_00000001.pt", tmp_path / "notes" / "model.pt")
