"""The ViT's patch embedding as one matrix product (clip.vision_transformer.embed_patches): the convolution's
values and gradients in half precision, and the convolution itself in float32 and wherever it was replaced,
watched or configured otherwise."""

from __future__ import annotations

import pytest
import torch
from aten_calls import AtenCalls
from torch import nn

from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.model import CLIP
from clip.vision_transformer import embed_patches, patch_rows_times_filters


def convolved(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    return conv(images).flatten(2).transpose(1, 2)


def ran_convolution(function, *args) -> tuple[torch.Tensor, bool]:
    with AtenCalls() as calls:
        out = function(*args)
    return out, "convolution" in calls.names


@pytest.mark.parametrize(
    "patch, size, channels_last, bias",
    [(16, 224, False, False), (32, 230, False, False), (8, 40, True, False), (4, 18, False, True), (7, 7, False, False)],
    ids=["vit-b16", "remainder-left-out", "channels-last", "bias", "one-patch"],
)
def test_the_matrix_product_gives_the_convolutions_values_and_gradients(patch, size, channels_last, bias):
    # float64, so any difference beyond rounding is a patch or a weight in the wrong place
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, patch, patch, bias=bias).double()
    images = torch.randn(2, 3, size, size + patch, dtype=torch.float64)  # not square: rows and columns kept apart
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)  # a model moved to channels-last: its filters too
    images.requires_grad_()
    expected = convolved(conv, images)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [images, *conv.parameters()], upstream)
    actual, convolution = ran_convolution(patch_rows_times_filters, conv, images)
    assert not convolution
    actual_grads = torch.autograd.grad(actual, [images, *conv.parameters()], upstream)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_half_precision_runs_the_matrix_product_and_float32_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 8, 8, bias=False)
    images = torch.randn(2, 3, 32, 40)
    # float32: the convolution, exactly as before
    out, convolution = ran_convolution(embed_patches, conv, images)
    assert convolution and torch.equal(out, convolved(conv, images))
    # autocast (bf16 on the CPU, as bf16 or fp16 on a GPU): the product, in the autocast dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, convolution = ran_convolution(embed_patches, conv, images)
        reference = convolved(conv, images)
    assert not convolution and out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), convolved(conv, images), rtol=0.02, atol=0.02)
    # half-precision images and filters without autocast (a model cast with .half() or .bfloat16())
    half = nn.Conv2d(3, 16, 8, 8, bias=False).bfloat16()
    half.load_state_dict(conv.state_dict())
    out, convolution = ran_convolution(embed_patches, half, images.bfloat16())
    assert not convolution and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), convolved(conv, images), rtol=0.02, atol=0.02)


@pytest.mark.parametrize(
    "conv_dtype, images",
    [
        (torch.float32, torch.randn(2, 1, 16, 16)),  # grayscale, not converted to RGB
        (torch.bfloat16, torch.randn(2, 1, 16, 16, dtype=torch.bfloat16)),
        (torch.bfloat16, torch.randn(2, 3, 3, 16, dtype=torch.bfloat16)),  # smaller than one patch
        (torch.float32, torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)),  # half-precision images, float32 filters
        (torch.bfloat16, torch.randn(2, 3, 16, 16)),  # the other way round
    ],
    ids=["grayscale", "grayscale-half", "too-small", "half-images", "half-filters"],
)
def test_inputs_the_convolution_refuses_get_its_own_error(conv_dtype, images):
    conv = nn.Conv2d(3, 8, 4, 4, bias=False).to(conv_dtype)
    with pytest.raises(RuntimeError) as own:
        convolved(conv, images)
    with pytest.raises(RuntimeError) as ours:
        embed_patches(conv, images)
    assert str(ours.value) == str(own.value)


@pytest.mark.parametrize(
    "make_conv",
    [
        pytest.param(lambda: nn.Conv2d(3, 8, 4, 2, bias=False), id="overlapping-stride"),
        pytest.param(lambda: nn.Conv2d(3, 8, 4, 4, padding=1, bias=False), id="padding"),
        pytest.param(lambda: nn.Conv2d(3, 8, (4, 2), (4, 2), bias=False), id="rectangular"),
        pytest.param(lambda: type("LoRAConv", (nn.Conv2d,), {})(3, 8, 4, 4, bias=False), id="subclass"),
    ],
)
def test_other_convolutions_run_as_themselves(make_conv):
    torch.manual_seed(0)
    conv = make_conv()
    images = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, convolution = ran_convolution(embed_patches, conv, images)
        assert convolution
        torch.testing.assert_close(out, convolved(conv, images))


def test_a_replaced_or_hooked_patch_convolution_is_called_and_global_hooks_change_nothing():
    # Tools that watch or wrap visual.conv1 (feature hooks, adapters) see it run as before; whole-program
    # tools (global module hooks: FLOP counters, memory trackers) see the model run as it does without them
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16, vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, layers=1, heads=2),
        text=TextConfig(context_length=20, vocab_size=64, width=32, layers=1, heads=2),
    )
    model = CLIP(config).eval()
    images = torch.randn(2, 3, 32, 32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        plain, convolution = ran_convolution(model.encode_image, images)
    assert not convolution  # the model's own patch embedding is the matrix product

    seen_by_global = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen_by_global.append(module))
    try:
        with torch.no_grad(), autocast:
            _, convolution = ran_convolution(model.encode_image, images)
    finally:
        handle.remove()
    assert not convolution and model.visual.conv1 not in seen_by_global and model.visual in seen_by_global

    calls = []
    hook = model.visual.conv1.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad(), autocast:
        hooked = model.encode_image(images)
    hook.remove()
    assert calls == [torch.Size([2, 32, 4, 4])]
    torch.testing.assert_close(hooked, plain, rtol=0.05, atol=0.05)  # bf16: another order of the same sums

    seen = []
    own_forward = model.visual.conv1.forward
    model.visual.conv1.forward = lambda x: seen.append(x.shape) or own_forward(x)
    with torch.no_grad(), autocast:
        model.encode_image(images)
    assert seen == [torch.Size([2, 3, 32, 32])]


def test_a_conv2d_forward_replaced_on_the_class_is_called(monkeypatch):
    conv = nn.Conv2d(3, 8, 4, 4, bias=False).bfloat16()
    calls = []
    torch_forward = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: calls.append(x.shape) or torch_forward(self, x))
    embed_patches(conv, torch.randn(2, 3, 16, 16).bfloat16())
    assert calls == [torch.Size([2, 3, 16, 16])]
