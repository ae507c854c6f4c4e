"""The training step: exact gradient accumulation, optimiser groups, the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.config import LossConfig, OptimizerConfig, ScheduleConfig
from clip.loss import build_loss
from clip.model import CLIP
from clip.optim import build_optimizer, is_decayed, learning_rate, load_optimizer_state, optimizer_parameter_names
from clip.train_step import ContrastiveModel, contrastive_step

TINY_VIT = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="vit", image_size=16, patch_size=8, width=32, layers=2, heads=2),
    text=TextConfig(context_length=8, vocab_size=100, width=32, layers=2, heads=2),
)


def gradients_of(micro_batches: int, kind: str, chunk_size=None) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=kind == "siglip").double()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=generator, dtype=torch.float64)
    texts = torch.randint(1, 99, (12, 8), generator=generator)
    texts[:, -1] = 99  # the end-of-text token has the largest id
    loss_fn = build_loss(LossConfig(kind=kind, chunk_size=chunk_size))
    loss, metrics = contrastive_step(
        module, images, texts, micro_batches, loss_fn, contextlib.nullcontext, lambda l: l.backward(), False
    )
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, chunk", [("clip", None), ("clip", 5), ("siglip", None)])
@pytest.mark.parametrize("micro_batches", [2, 3, 4])
def test_accumulation_equals_the_full_batch(kind, chunk, micro_batches):
    full_loss, full_grads = gradients_of(1, kind, chunk)
    loss, grads = gradients_of(micro_batches, kind, chunk)
    assert loss == pytest.approx(full_loss, abs=1e-6)
    assert grads.keys() == full_grads.keys()
    assert "clip.logit_scale" in grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_batch_that_does_not_split_into_equal_micro_batches_is_refused():
    # 12 rows in 5 micro-batches: Tensor.chunk made 4 of 3, and the fifth, the one DDP all-reduces after, never
    # came (every backward pass ran under no_sync)
    with pytest.raises(ValueError, match="12 images and 12 texts cannot be split into 5 equal micro-batches"):
        gradients_of(5, "clip")


@pytest.mark.parametrize("tower", ["image", "text"])
def test_accumulation_reuses_a_locked_towers_cached_features(tower):
    # The caching pass's features of a locked tower are what its gradient pass would compute: reused, the
    # tower runs once per micro-batch instead of twice, with the same gradients for the other tower.
    def run(reuse: bool):
        torch.manual_seed(0)
        module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).double()
        module.clip.lock(image=tower == "image", text=tower == "text")
        for locked_module in [module.clip.visual] if tower == "image" else module.clip.text_tower():
            locked_module.eval()  # as the trainer keeps a locked tower
        calls = {"n": 0}
        hooked = module.clip.visual if tower == "image" else module.clip.transformer
        hooked.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(12, 3, 16, 16, generator=generator, dtype=torch.float64)
        texts = torch.randint(1, 99, (12, 8), generator=generator)
        texts[:, -1] = 99
        contrastive_step(module, images, texts, 3, build_loss(LossConfig()), contextlib.nullcontext,
                         lambda l: l.backward(), False, locked_image=reuse and tower == "image",
                         locked_text=reuse and tower == "text")
        return calls["n"], {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    (reused_calls, reused), (recomputed_calls, recomputed) = run(True), run(False)
    assert (reused_calls, recomputed_calls) == (3, 6)
    assert reused.keys() == recomputed.keys() and reused
    assert not any(name.startswith("clip.visual.") == (tower == "image") for name in reused if "logit" not in name)
    for name, grad in recomputed.items():
        torch.testing.assert_close(reused[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_patch_dropout_keeps_a_random_subset_of_patches_in_training_only():
    from clip.vision_transformer import kept_patch_count

    torch.manual_seed(0)
    model = CLIP(TINY_VIT)
    visual = model.visual  # 16 px, patch 8: 4 patches + the class token
    images = torch.randn(3, 3, 16, 16)
    lengths = []
    visual.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[0]))  # LND
    visual.eval()
    reference = visual(images)
    model.set_patch_dropout(0.5)
    torch.testing.assert_close(visual(images), reference)  # evaluation sees every patch
    visual.train()
    torch.manual_seed(1)
    first = visual(images)
    torch.manual_seed(1)
    again = visual(images)
    assert lengths == [5, 5, 3, 3] and kept_patch_count(4, 0.5) == 2 and kept_patch_count(4, 0.99) == 1
    torch.testing.assert_close(first, again)  # the masks come from torch's generator
    assert not torch.allclose(first, reference)
    model.set_patch_dropout(0.0)
    torch.testing.assert_close(visual(images), reference)  # off: a ViT without dropout trains as it evaluates
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        model.set_patch_dropout(1.0)
    resnet = ModelConfig(embed_dim=32, vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1),
                                                           heads=2), text=TINY_VIT.text)
    with pytest.raises(ValueError, match="ViT image towers only"):
        CLIP(resnet).set_patch_dropout(0.5)


@pytest.mark.parametrize("device", [
    "cpu",
    # On a GPU the masks come from the GPU's generator, whose state the step keeps as well (run where there is one)
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_accumulation_replays_patch_dropout_masks_in_the_gradient_pass(device):
    # The caching pass and each micro-batch's gradient pass must compute the same image features, masks
    # included: otherwise the cached negatives and the recomputed rows would disagree.
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).double().to(device)
    module.clip.set_patch_dropout(0.5)
    outputs = []
    module.clip.visual.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=generator, dtype=torch.float64).to(device)
    texts = torch.randint(1, 99, (12, 8), generator=generator)
    texts[:, -1] = 99
    texts = texts.to(device)
    contrastive_step(module, images, texts, 3, build_loss(LossConfig()), contextlib.nullcontext,
                     lambda l: l.backward(), False)
    cached, recomputed = outputs[:3], outputs[3:]
    for index in range(3):
        torch.testing.assert_close(recomputed[index], cached[index], rtol=0, atol=0)
    assert not torch.equal(cached[0], cached[1])


def test_patch_dropout_is_a_vit_setting_and_counts_fewer_flops():
    from clip.architectures import get_architecture
    from clip.config import TrainConfig, from_dict
    from clip.config_io import ConfigError
    from clip.throughput import image_forward_flops, training_flops_per_sample

    with pytest.raises(ConfigError, match="train.patch_dropout"):
        from_dict(TrainConfig, {"model": {"vision": {"kind": "resnet", "layers": [3, 4, 6, 3], "width": 64, "heads": 32}},
                                "train": {"patch_dropout": 0.5}})
    with pytest.raises(ConfigError, match="patch_dropout"):
        from_dict(TrainConfig, {"train": {"patch_dropout": 1.0}})
    with pytest.raises(ConfigError, match="locked image tower"):  # kept in eval mode: nothing would be dropped
        from_dict(TrainConfig, {"train": {"patch_dropout": 0.5, "lock_image": True}})
    config = get_architecture("ViT-B/16")  # 196 patches: 98 kept at 0.5
    assert image_forward_flops(config, 0.5) < 0.51 * image_forward_flops(config)
    assert training_flops_per_sample(config, 20, patch_dropout=0.5) < training_flops_per_sample(config, 20)


def test_accumulation_updates_batch_norm_statistics_once_per_micro_batch():
    # The feature-caching pass runs in training mode too; it must leave a ResNet's running statistics as
    # they were, so they are updated by the gradient pass only (once per micro-batch, as without caching).
    tiny_resnet = ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2),
        text=TextConfig(context_length=8, vocab_size=100, width=32, layers=1, heads=2),
    )
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(tiny_resnet), with_logit_bias=False)
    images = torch.randn(8, 3, 32, 32)
    texts = torch.randint(1, 99, (8, 8))
    texts[:, -1] = 99
    norm = module.clip.visual.bn1  # the stem's first BatchNorm, right after the first convolution
    start = norm.running_mean.clone()
    with torch.no_grad():
        for chunk in images.chunk(2):  # what the two micro-batches' gradient passes do to its statistics
            norm(module.clip.visual.conv1(chunk))
    expected_mean = norm.running_mean.clone()
    norm.running_mean.copy_(start)
    norm.num_batches_tracked.zero_()
    contrastive_step(module, images, texts, 2, build_loss(LossConfig()), contextlib.nullcontext, lambda l: l.backward(), False)
    assert norm.num_batches_tracked.item() == 2
    torch.testing.assert_close(norm.running_mean, expected_mean)


def test_statistics_synchronised_inside_the_caching_pass_are_kept():
    # Under DDP the caching pass's first forward overwrites every rank's BatchNorm buffers with rank 0's;
    # restoring a copy taken before it would undo that, leaving each rank with statistics of its own.
    from clip.train_step import batch_norm_statistics_kept

    norm = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad(), batch_norm_statistics_kept(norm):
        norm.running_mean.fill_(7.0)  # what DDP's buffer broadcast does at the first forward
        norm(torch.randn(4, 3, 5, 5))
    assert torch.equal(norm.running_mean, torch.full((3,), 7.0)) and norm.num_batches_tracked.item() == 0
    assert norm.momentum == 0.1


def test_accumulation_differs_from_averaging_small_losses():
    # The naive alternative (mean of per-micro-batch losses) sees fewer negatives: a different loss.
    full_loss, _ = gradients_of(1, "clip")
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).double()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=generator, dtype=torch.float64)
    texts = torch.randint(1, 99, (12, 8), generator=generator)
    texts[:, -1] = 99
    loss_fn = build_loss(LossConfig())
    small = [loss_fn(*module(i, t)[:3])[0].item() for i, t in zip(images.chunk(3), texts.chunk(3))]
    assert abs(sum(small) / 3 - full_loss) > 1e-3


def test_weight_decay_groups():
    # The paper: "all weights that are not gains or biases", embeddings included; GPT-2's practice spares those.
    module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False)
    named = dict(module.named_parameters())
    embeddings = {"clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.positional_embedding"}
    never = {"clip.logit_scale", "clip.visual.class_embedding", "clip.ln_final.weight", "clip.visual.ln_pre.bias",
             "clip.transformer.resblocks.0.mlp.c_fc.bias"}
    for decay_embeddings in (True, False):
        decayed = {n for n, p in named.items() if is_decayed(n, p, decay_embeddings)}
        assert {"clip.visual.conv1.weight", "clip.transformer.resblocks.0.attn.in_proj_weight",
                "clip.text_projection", "clip.visual.proj"} <= decayed
        assert not never & decayed
        assert (embeddings <= decayed) if decay_embeddings else not (embeddings & decayed)
        config = OptimizerConfig(weight_decay=0.1, decay_embeddings=decay_embeddings)
        optimizer = build_optimizer(list(named.items()), config, torch.device("cpu"))
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
        assert [len(g["params"]) for g in optimizer.param_groups] == [len(decayed), len(named) - len(decayed)]
    assert OptimizerConfig().decay_embeddings is True


def test_only_names_that_end_in_an_embedding_are_spared_as_embeddings():
    # A projection or norm named after the embedding it follows is a weight like any other
    matrix = torch.nn.Parameter(torch.zeros(4, 4))
    for name in ("clip.embedding_projection.weight", "clip.token_embedding_norm.weight"):
        assert is_decayed(name, matrix, decay_embeddings=False), name
    assert not is_decayed("clip.token_embedding.weight", matrix, decay_embeddings=False)


def test_auto_is_the_foreach_implementation_off_the_cpu_and_cuda():
    # The fused kernel exists for CUDA and the CPU; elsewhere (mps, xpu, ...) auto takes foreach
    named = list(ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).named_parameters())
    optimizer = build_optimizer(named, OptimizerConfig(implementation="auto"), torch.device("mps"))
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (None, True)

@pytest.mark.parametrize(
    "implementation, fused, foreach",
    [("auto", True, None), ("fused", True, None), ("foreach", None, True), ("for-loop", None, False)],
)
def test_the_optimizer_implementation_follows_the_config(implementation, fused, foreach):
    # auto is the fused kernel also on the CPU: foreach's temporaries are as large as all the parameters
    named = list(ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).named_parameters())
    optimizer = build_optimizer(named, OptimizerConfig(implementation=implementation), torch.device("cpu"))
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["eps"]) == (5e-4, (0.9, 0.98), 1e-6)


@pytest.mark.parametrize(("saved_decay", "decay"), [(False, True), (True, True), (True, False)])
def test_optimizer_state_loads_by_name_under_this_runs_groups_and_hyperparameters(saved_decay, decay):
    torch.manual_seed(0)
    named = list(ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).named_parameters())
    saved_config = OptimizerConfig(weight_decay=0.2, beta2=0.98, eps=1e-6, decay_embeddings=saved_decay)
    saved = build_optimizer(named, saved_config, torch.device("cpu"))
    for _, parameter in named:
        parameter.grad = torch.randn_like(parameter)
    saved.step()
    checkpoint = saved.state_dict()

    names = optimizer_parameter_names(named, saved_decay)  # saved beside the state since 2026-11-30
    config = OptimizerConfig(weight_decay=0.05, beta2=0.95, eps=1e-8, decay_embeddings=decay)
    for saved_names in (names, None):  # None: an older checkpoint, whose order its grouping gives
        resumed = build_optimizer(named, config, torch.device("cpu"))
        load_optimizer_state(resumed, checkpoint, named, saved_names, decay, saved_decay_embeddings=saved_decay)
        # this run's settings, not the checkpoint's (torch's load_state_dict would restore 0.2, 0.98 and 1e-6)
        assert [(g["weight_decay"], g["betas"], g["eps"]) for g in resumed.param_groups] == [
            (0.05, (0.9, 0.95), 1e-8), (0.0, (0.9, 0.95), 1e-8)]
        for _, parameter in named:  # every parameter keeps its own moments, whichever group it is in now
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(resumed.state[parameter][key], saved.state[parameter][key])
    with pytest.raises(ValueError, match="decay_embeddings"):  # told the wrong grouping of an older checkpoint
        load_optimizer_state(resumed, checkpoint, named, None, decay, saved_decay_embeddings=not saved_decay)
    # Names that do not fit: moments of another shape, or of a parameter this model does not have
    shapes = {name: parameter.shape for name, parameter in named}
    first, other = names[0], next(n for n in names if shapes[n] != shapes[names[0]])
    swapped = [other if n == first else first if n == other else n for n in names]
    with pytest.raises(ValueError, match="has shape"):
        load_optimizer_state(resumed, checkpoint, named, swapped, decay, saved_decay_embeddings=saved_decay)
    with pytest.raises(ValueError, match="does not have"):  # a name this model does not have at all
        load_optimizer_state(resumed, checkpoint, named, ["gone", *names[1:]], decay, saved_decay_embeddings=saved_decay)
    # an older checkpoint (no names, every parameter trained) resumed with the text tower locked
    text = {n for n, _ in named if n.startswith("clip.") and not n.startswith("clip.visual.") and "logit" not in n}
    for name, parameter in named:
        parameter.requires_grad_(name not in text)
    locked = build_optimizer(named, config, torch.device("cpu"))
    left_out = load_optimizer_state(locked, checkpoint, named, None, decay, saved_decay_embeddings=saved_decay)
    assert set(left_out) == text
    for name, parameter in named:
        if name not in text:
            assert torch.equal(locked.state[parameter]["exp_avg"], saved.state[parameter]["exp_avg"]), name


def test_weight_decay_groups_of_a_resnet_decay_the_attention_pool_position_embedding():
    from clip.architectures import ModelConfig, VisionConfig

    resnet = ModelConfig(embed_dim=16, vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1),
                                                           heads=2), text=TINY_VIT.text)
    named = dict(CLIP(resnet).named_parameters())
    position = named["visual.attnpool.positional_embedding"]
    assert is_decayed("visual.attnpool.positional_embedding", position, decay_embeddings=True)
    assert not is_decayed("visual.attnpool.positional_embedding", position, decay_embeddings=False)
    assert not is_decayed("visual.bn1.weight", named["visual.bn1.weight"], decay_embeddings=True)


def test_gradient_norm_is_the_norm_before_clipping_and_clips_to_the_given_norm():
    from clip.train import gradient_norm

    module = torch.nn.Linear(2, 1)
    for clip_to, after in [(None, 13.0), (1.0, 1.0), (100.0, 13.0)]:
        module.weight.grad, module.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([12.0])  # norm 13
        assert gradient_norm(module, clip_to).item() == pytest.approx(13.0)
        clipped = torch.cat([module.weight.grad.flatten(), module.bias.grad])
        assert clipped.norm().item() == pytest.approx(after, rel=1e-5)
        torch.testing.assert_close(clipped / clipped.norm(), torch.tensor([3.0, 4.0, 12.0]) / 13)


def test_learning_rate_schedule():
    schedule = ScheduleConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, 1.0, schedule) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, schedule) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, schedule) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, 1.0, schedule) == pytest.approx(0.1)
    values = [learning_rate(s, 1.0, schedule) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(learning_rate(500, 1.0, schedule), 0.1)


def test_the_trainers_module_traces_as_one_graph_when_texts_are_cut_on_the_host():
    # The trainer cuts texts on the host and builds ContrastiveModel(trim_text=False): torch.compile then
    # sees one graph, with no device-to-host read (and no graph break) in the middle of the forward pass.
    from torch._dynamo import explain

    from clip.model import trim_text_batch

    torch.manual_seed(0)
    texts = torch.randint(1, 98, (4, 8))
    texts[:, 5] = 99  # the end-of-text token (the largest id) at position 5
    images = torch.randn(4, 3, 16, 16)
    host_cut = explain(ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False, trim_text=False))(images, trim_text_batch(texts))
    assert host_cut.graph_break_count == 0 and host_cut.graph_count == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision (the folded QuickGELU MLP) too
        mixed = explain(ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False, trim_text=False))(images, trim_text_batch(texts))
    assert mixed.graph_break_count == 0 and mixed.graph_count == 1
    # (The cut inside encode_text reads the length back from the device: torch 2.14's dynamo breaks the graph
    # there, 2.10's traces it whole. The host cut is one graph with either.)


def test_loaded_optimizer_moments_take_their_parameters_memory_layout():
    # Moments saved by a CPU run are contiguous; a channels-last parameter (a ResNet on a GPU) needs them
    # channels-last too, or the fused kernel updates the wrong elements (CPU) or refuses them (CUDA)
    parameter = torch.nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [], "weight_decay": 0.0}], lr=1e-3)
    moments = {"exp_avg": torch.randn(2, 3, 4, 4), "exp_avg_sq": torch.rand(2, 3, 4, 4)}
    saved = {"state": {0: {"step": torch.tensor(3.0), **moments}}, "param_groups": []}
    load_optimizer_state(optimizer, saved, [("conv.weight", parameter)], ["conv.weight"], True, True)
    state = optimizer.state[parameter]
    for name, moment in moments.items():
        assert state[name].stride() == parameter.stride() and torch.equal(state[name], moment)


def test_a_cosine_schedule_whose_warmup_fills_the_run_is_at_its_floor_after_it():
    # warmup_steps == steps leaves no decay steps: the rate divided by zero once past the warmup
    schedule = ScheduleConfig(steps=4, warmup_steps=4, min_lr_ratio=0.1)
    assert [learning_rate(step, 2.0, schedule) for step in range(7)] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 0.2, 0.2])


def test_image_forward_flops_are_per_image():
    # Counted on two images at once (BatchNorm): the count is halved back to one image's
    from torch.utils.flop_counter import FlopCounterMode

    from clip.throughput import image_forward_flops

    with torch.device("meta"):
        model = CLIP(TINY_VIT)
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        model.encode_image(torch.empty(1, 3, TINY_VIT.vision.image_size, TINY_VIT.vision.image_size))
    assert image_forward_flops(TINY_VIT) == counter.get_total_flops()


def _transformer_matmul_flops(positions: int, width: int, hidden: int, layers: int) -> tuple[int, int]:
    """A pre-LN transformer's matrix-product FLOPs (2 per multiply-add), counted by hand: (every block at every
    position, the same with the last block run at one position's query only, as `Transformer.forward_at` does)."""
    def block(queries: int) -> int:
        key_value = 2 * positions * 2 * width * width  # k and v projections: every position is attended to
        query_out_mlp = 2 * queries * (2 * width * width + 2 * width * hidden)
        attention = 2 * 2 * queries * positions * width  # scores, then the weighted sum of values
        return key_value + query_out_mlp + attention

    return layers * block(positions), (layers - 1) * block(positions) + block(1)


def test_the_counted_flops_are_the_matrix_products_counted_by_hand_and_open_clips_published_ones():
    # The MFU target (>= 45%) is only as good as the FLOPs it divides: counted per image and per text, at every
    # token, forward only. open_clip's model profile publishes a whole ViT-B/16 at 35.13 image and 5.96 text
    # GFLOPs (224 pixels, 77 tokens); ours runs the last blocks at the one position that is read.
    from clip.architectures import get_architecture
    from clip.throughput import image_forward_flops, text_forward_flops

    config = get_architecture("ViT-B/16")
    vision, text = config.vision, config.text
    patches = (vision.image_size // vision.patch_size) ** 2
    image_full, image_run = _transformer_matmul_flops(patches + 1, vision.width, 4 * vision.width, vision.layers)
    ends = 2 * patches * 3 * vision.patch_size**2 * vision.width + 2 * vision.width * config.embed_dim
    assert round((image_full + ends) / 1e9, 2) == 35.13
    assert image_forward_flops(config) == pytest.approx(image_run + ends, rel=1e-6)
    text_full, text_run = _transformer_matmul_flops(text.context_length, text.width, 4 * text.width, text.layers)
    assert round((text_full + 2 * text.width * config.embed_dim) / 1e9, 2) == 5.96
    assert text_forward_flops(config, 77) == pytest.approx(text_run + 2 * text.width * config.embed_dim, rel=1e-6)
    # RN50: open_clip's 12.22 GFLOPs run the attention pool's query and output projection at all 7 x 7 + 1
    # positions; ours at the pooled one (the keys and values are at every position in both)
    pool, out, positions = 2048, 1024, 50
    pool_queries_not_run = (positions - 1) * (2 * pool * pool + 2 * pool * out + 2 * 2 * positions * pool)
    assert round((image_forward_flops(get_architecture("RN50")) + pool_queries_not_run) / 1e9, 2) == 12.22


def _twelve_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=generator)
    texts = torch.randint(1, 99, (12, 8), generator=generator)
    texts[:, -1] = 99  # the end-of-text token has the largest id
    return images, texts


def test_accumulation_caches_features_without_a_graph_and_under_autocast_in_both_passes():
    # The caching pass must build no autograd graph (it would hold every micro-batch's activations at once),
    # and both passes must run under the step's autocast: cached negatives computed in another precision
    # than the recomputed rows would not be the features the gradient pass produces.
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False)
    passes = []  # the image tower's (grad enabled, output dtype), a matrix product's: bfloat16 under autocast
    module.clip.visual.register_forward_hook(
        lambda _module, _args, output: passes.append((torch.is_grad_enabled(), output.dtype)))
    images, texts = _twelve_pairs()

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    contrastive_step(module, images, texts, 3, build_loss(LossConfig()), bf16, lambda l: l.backward(), False)
    assert passes == [(False, torch.bfloat16)] * 3 + [(True, torch.bfloat16)] * 3  # 3 caching, 3 gradient passes


class _RecordingDDP(ContrastiveModel):
    """Stands in for DistributedDataParallel: records whether each backward pass ran inside no_sync()."""

    def __init__(self) -> None:
        super().__init__(CLIP(TINY_VIT), with_logit_bias=False)
        self.in_no_sync = False
        self.backward_in_no_sync = []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_accumulation_all_reduces_only_after_the_last_micro_batch(micro_batches):
    # DDP all-reduces gradients in every backward pass outside no_sync(): each micro-batch but the last must
    # backward inside it (one all-reduce per step, not k), and the last outside it (else no rank ever syncs).
    torch.manual_seed(0)
    module = _RecordingDDP()
    images, texts = _twelve_pairs()

    def backward(loss):
        module.backward_in_no_sync.append(module.in_no_sync)
        loss.backward()

    contrastive_step(module, images, texts, micro_batches, build_loss(LossConfig()), contextlib.nullcontext,
                     backward, True)
    assert module.backward_in_no_sync == [True] * (micro_batches - 1) + [False]
    module.backward_in_no_sync.clear()
    contrastive_step(module, images, texts, micro_batches, build_loss(LossConfig()), contextlib.nullcontext,
                     backward, False)  # not distributed: no_sync() is never entered (plain modules lack it)
    assert module.backward_in_no_sync == [False] * micro_batches


def test_the_siglip_bias_starts_at_the_papers_value_and_precision_names_its_autocast_dtype():
    # SigLIP's bias starts at -10 (not +10: every negative pair would start with a large loss); only SigLIP
    # has one. Each train.precision autocasts to the dtype it names (bf16 and fp16 differ in range).
    from clip.loss import SIGLIP_INITIAL_LOGIT_BIAS
    from clip.train import AUTOCAST_DTYPES

    assert ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=True).logit_bias.item() == SIGLIP_INITIAL_LOGIT_BIAS == -10
    assert ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).logit_bias is None
    assert AUTOCAST_DTYPES == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_patch_dropout_keeps_the_class_token_and_a_subset_of_patches_in_order_per_image():
    from clip.vision_transformer import keep_random_patches

    torch.manual_seed(0)
    n, patches = 16, 8
    x = torch.arange(n * (patches + 1), dtype=torch.float32).view(n, patches + 1, 1).expand(n, patches + 1, 3)
    kept = keep_random_patches(x, 0.5)
    assert kept.shape == (n, 1 + 4, 3)
    assert torch.equal(kept[:, 0], x[:, 0])  # the class token, first
    subsets = set()
    for row in range(n):
        values = kept[row, 1:, 0].tolist()
        assert set(values) <= set(x[row, 1:, 0].tolist()) and values == sorted(set(values)), row
        subsets.add(tuple(value - row * (patches + 1) for value in values))
    assert len(subsets) > 1  # a subset drawn for each image, not one for the batch
