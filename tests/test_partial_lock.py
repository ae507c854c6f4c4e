"""Partly locked towers (train.lock_*_unlocked_layers): which parameters train, the modes the trainer keeps,
exact gradient accumulation without reusing the tower's cached features, and the FLOPs MFU counts."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from clip import checkpoint as ckpt
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.config import LossConfig, TrainConfig, load_config
from clip.loss import build_loss
from clip.model import CLIP
from clip.throughput import image_forward_flops, text_forward_flops, training_flops_per_sample
from clip.train import train
from clip.train_step import ContrastiveModel, contrastive_step

DEMO = Path(__file__).parent.parent / "configs" / "demo.toml"
TEXT = TextConfig(context_length=8, vocab_size=100, width=16, layers=3, heads=2)
VIT = ModelConfig(embed_dim=16, text=TEXT,
                  vision=VisionConfig(kind="vit", image_size=16, patch_size=8, width=16, layers=3, heads=2))
RESNET = ModelConfig(embed_dim=16, text=TEXT,
                     vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2))


def trainable(model: CLIP) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_the_unlocked_top_of_each_tower_is_its_last_layers_and_what_follows():
    torch.manual_seed(0)
    vit = CLIP(VIT)
    vit.lock(image=True, image_unlocked_layers=1)
    image = {n for n in trainable(vit) if n.startswith("visual.")}
    assert image == {n for n, _ in vit.named_parameters()
                     if n.startswith(("visual.transformer.resblocks.2.", "visual.ln_post.")) or n == "visual.proj"}
    assert "token_embedding.weight" in trainable(vit)  # the other tower trains whole

    resnet = CLIP(RESNET)
    resnet.lock(image=True, image_unlocked_layers=2)
    top = ("visual.layer3.", "visual.layer4.", "visual.attnpool.")
    assert {n for n in trainable(resnet) if n.startswith("visual.")} == {
        n for n, _ in resnet.named_parameters() if n.startswith(top)
    }

    vit.lock(text=True, text_unlocked_layers=2)  # locking again replaces the earlier locks
    text = {n for n in trainable(vit) if not n.startswith("visual.")} - {"logit_scale"}
    assert text == {n for n, _ in vit.named_parameters() if n.startswith(
        ("transformer.resblocks.1.", "transformer.resblocks.2.", "ln_final.")) or n == "text_projection"}
    assert all(n in trainable(vit) for n, _ in vit.visual.named_parameters(prefix="visual"))

    vit.lock(image=True)  # 0 unlocked layers: the whole tower
    assert not any(n.startswith("visual.") for n in trainable(vit))
    with pytest.raises(ValueError, match="text_unlocked_layers=1 applies to a locked tower"):
        vit.lock(image=True, text_unlocked_layers=1)
    vit.visual.proj = None  # as for unprojected features
    vit.lock(image=True, image_unlocked_layers=1)
    assert {n for n in trainable(vit) if n.startswith("visual.")} == {
        n for n, _ in vit.named_parameters() if n.startswith(("visual.transformer.resblocks.2.", "visual.ln_post."))}
    with pytest.raises(ValueError, match="the image tower has 4 layers; 5 cannot be unlocked"):
        resnet.tower_top("image", 5)
    with pytest.raises(ValueError, match='tower must be "image" or "text"'):
        resnet.tower_top("audio", 1)


def tiny_config(run_dir: Path, *extra: str) -> TrainConfig:
    base = [
        "model.embed_dim=16", "model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8",
        "model.vision.heads=2", "model.vision.image_size=32", "model.text.width=16", "model.text.layers=2",
        "model.text.heads=2", "train.batch_size=8", "schedule.steps=2", "schedule.warmup_steps=1", "optimizer.lr=1e-2",
        "checkpoint.every_n_steps=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        "data.workers=0", "eval.every_n_steps=0", "eval.zeroshot=[]", "train.device=cpu", f"output_dir={run_dir}",
    ]
    return load_config(DEMO, [*base, *extra], TrainConfig)


def test_the_trainer_trains_a_locked_resnets_last_stage_and_leaves_the_rest_as_loaded(tmp_path):
    # Its BatchNorm statistics too: the unlocked stage runs in training mode, the locked ones in eval mode.
    config = tiny_config(tmp_path / "run", "train.lock_image=true", "train.lock_image_unlocked_layers=1",
                         "train.accumulation_steps=2")
    torch.manual_seed(3)
    initial = CLIP(config.model).state_dict()
    torch.save(initial, tmp_path / "initial.pt")
    config.train.init_weights = str(tmp_path / "initial.pt")
    train(config)
    state = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[0][1])
    final = state["model"]
    top = ("visual.layer4.", "visual.attnpool.")
    for name, value in initial.items():
        changed = not torch.equal(final[name], value)
        if name.startswith("visual.") and not name.endswith("num_batches_tracked") and "bn" not in name.split(".")[-2]:
            assert changed == name.startswith(top), name  # weights of the top change, the rest not
    assert not torch.equal(final["visual.layer4.0.bn1.running_mean"], initial["visual.layer4.0.bn1.running_mean"])
    assert torch.equal(final["visual.layer3.0.bn1.running_mean"], initial["visual.layer3.0.bn1.running_mean"])
    assert torch.equal(final["visual.bn1.running_var"], initial["visual.bn1.running_var"])
    # the step counter counts once per micro-batch (the caching pass leaves statistics alone): 2 steps x 2
    assert final["visual.layer4.0.bn1.num_batches_tracked"].item() == 4
    assert not torch.equal(final["text_projection"], initial["text_projection"])


def module_and_gradients(config: ModelConfig, micro_batches: int, lock: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    clip = CLIP(config)
    clip.lock(**lock)
    module = ContrastiveModel(clip, with_logit_bias=False).double()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=generator, dtype=torch.float64)
    texts = torch.randint(1, 99, (8, 8), generator=generator)
    texts[:, -1] = 99
    contrastive_step(module, images, texts, micro_batches, build_loss(LossConfig()), contextlib.nullcontext,
                     lambda loss: loss.backward(), False)
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lock", [{"image": True, "image_unlocked_layers": 1},
                                  {"text": True, "text_unlocked_layers": 2}], ids=["image", "text"])
def test_accumulation_over_a_partly_locked_tower_gives_the_full_batchs_gradients(lock):
    full = module_and_gradients(VIT, 1, lock)
    accumulated = module_and_gradients(VIT, 4, lock)
    assert full.keys() == accumulated.keys()
    tower = "clip.visual." if "image" in lock else "clip.transformer."
    assert any(n.startswith(tower) for n in full) and not any(n.startswith(tower + "resblocks.0.") for n in full)
    for name, gradient in full.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", [VIT, RESNET], ids=["vit", "resnet"])
def test_the_mfu_counts_a_backward_pass_through_the_unlocked_top_only(config):
    depth = 4 if config.vision.kind == "resnet" else config.vision.layers
    image = image_forward_flops(config)
    tops = [image_forward_flops(config, top_layers=layers) for layers in range(depth + 1)]
    assert tops[0] == 0 and all(a < b for a, b in zip(tops, tops[1:])) and tops[-1] < image  # the stem stays locked
    locked = training_flops_per_sample(config, 8, lock_image=True)
    assert training_flops_per_sample(config, 8, lock_image=True, image_unlocked_layers=1) == locked + 2 * tops[1]
    assert locked + 2 * tops[-1] < training_flops_per_sample(config, 8)
    text = text_forward_flops(config, 8)
    assert text_forward_flops(config, 8, TEXT.layers) == text  # all of it: embeddings are lookups, no FLOPs
    assert 0 < text_forward_flops(config, 8, 1) < text_forward_flops(config, 8, 2) < text
    assert training_flops_per_sample(config, 8, lock_text=True, text_unlocked_layers=1) == pytest.approx(
        3 * image + text + 2 * text_forward_flops(config, 8, 1))
    # a batch's texts cut short of the context: the unlocked top's backward pass too at the length run
    assert text_forward_flops(config, 5, 1) < text_forward_flops(config, 8, 1)
    assert training_flops_per_sample(config, 5, lock_text=True, text_unlocked_layers=1) == pytest.approx(
        3 * image + text_forward_flops(config, 5) + 2 * text_forward_flops(config, 5, 1))


def test_a_resume_that_unlocks_another_stage_trains_it_with_fresh_moments(tmp_path, caplog):
    run = tmp_path / "run"
    locked = ["train.lock_image=true", "schedule.steps=4"]
    train(tiny_config(run, *locked, "train.lock_image_unlocked_layers=1"), stop_at_step=2)
    at_stop = ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0][1])["model"]
    with caplog.at_level("WARNING"):
        train(tiny_config(run, *locked, "train.lock_image_unlocked_layers=2"))
    assert "train.lock_image_unlocked_layers" in caplog.text  # a changed setting, named
    state = ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0][1])
    final = state["model"]
    assert not torch.equal(final["visual.layer3.0.conv1.weight"], at_stop["visual.layer3.0.conv1.weight"])
    assert torch.equal(final["visual.layer2.0.conv1.weight"], at_stop["visual.layer2.0.conv1.weight"])
    # AdamW's state of the newly unlocked stage counts the 2 steps since the resume; the stage unlocked before, 4
    names = state["optimizer_parameter_names"]

    def adam_steps(name: str) -> float:
        return float(state["optimizer"]["state"][names.index(name)]["step"])

    assert adam_steps("clip.visual.layer3.0.conv1.weight") == 2 and adam_steps("clip.visual.layer4.0.conv1.weight") == 4
    assert not any(name.startswith("clip.visual.layer2.") for name in names)


def test_gradient_checkpointing_reaches_the_unlocked_blocks_of_a_partly_locked_tower(tmp_path, monkeypatch):
    # The tower's Transformer is in eval mode (locked), its top blocks in training mode: checkpointing looked at
    # the Transformer's mode and so never ran for them.
    import clip.transformer as transformer

    real, checkpointed = transformer.checkpoint, []

    def counting(block, *args, **kwargs):
        checkpointed.append(block)
        return real(block, *args, **kwargs)

    monkeypatch.setattr(transformer, "checkpoint", counting)
    train(tiny_config(tmp_path, "train.lock_text=true", "train.lock_text_unlocked_layers=1", "schedule.steps=1",
                      "train.grad_checkpointing=true"))
    assert len(checkpointed) == 1 and checkpointed[0].training  # the text tower's last block, once


def test_the_runs_first_lines_say_which_towers_are_locked_and_how_much_trains(tmp_path, caplog):
    # The model line gave the parameter count alone: nothing a new run logged showed that lock_image or
    # lock_text had taken effect, nor how much of the model a partly locked tower leaves to train.
    def model_line(run: str, *extra: str) -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="clip.train"):
            train(tiny_config(tmp_path / run, "schedule.steps=1", *extra))
        return next(record.getMessage() for record in caplog.records if record.getMessage().startswith("model: "))

    assert "trained" not in model_line("unlocked")
    model = CLIP(tiny_config(tmp_path / "x").model)
    model.lock(image=True, image_unlocked_layers=1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    line = model_line("partly", "train.lock_image=true", "train.lock_image_unlocked_layers=1")
    assert f" ({trained:.2f}M trained: image tower locked except its last 1 layer);" in line
    model.lock(text=True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert f" ({trained:.2f}M trained: text tower locked);" in model_line("text", "train.lock_text=true")
