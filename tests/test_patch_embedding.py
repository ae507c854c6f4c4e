"""The ViT's patch embedding as one matrix product (clip.vision_transformer.embed_patches): the convolution's
values and gradients, the convolution itself wherever it was replaced, watched or configured otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.model import CLIP
from clip.vision_transformer import embed_patches


class _OperatorNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def convolved(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    return conv(images).flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    "patch, size, channels_last, bias",
    [(16, 224, False, False), (32, 230, False, False), (8, 40, True, False), (4, 18, False, True), (7, 7, False, False)],
    ids=["vit-b16", "remainder-left-out", "channels-last", "bias", "one-patch"],
)
def test_patch_embedding_matches_the_convolution_and_its_gradients(patch, size, channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, patch, patch, bias=bias).double()
    images = torch.randn(2, 3, size, size + patch, dtype=torch.float64)  # not square: rows and columns kept apart
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    images.requires_grad_()
    expected = convolved(conv, images)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [images, *conv.parameters()], upstream)
    with _OperatorNames() as ops:
        actual = embed_patches(conv, images)
    assert "convolution" not in ops.names  # the matrix product ran, not the convolution
    actual_grads = torch.autograd.grad(actual, [images, *conv.parameters()], upstream)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _hooked(conv: nn.Conv2d) -> list:
    calls = []
    conv.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    return calls


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
    with _OperatorNames() as ops:
        out = embed_patches(conv, images)
    assert "convolution" in ops.names
    torch.testing.assert_close(out, convolved(conv, images))


def test_a_replaced_or_hooked_patch_convolution_is_called():
    # Tools that watch or wrap visual.conv1 (feature hooks, adapters) see it run as before
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16, vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, layers=1, heads=2),
        text=TextConfig(context_length=20, vocab_size=64, width=32, layers=1, heads=2),
    )
    model = CLIP(config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), _OperatorNames() as ops:
        plain = model.encode_image(images)
    assert "convolution" not in ops.names  # the model's own patch embedding is the matrix product
    with torch.no_grad():
        calls = _hooked(model.visual.conv1)
        hooked = model.encode_image(images)
    assert calls == [torch.Size([2, 32, 4, 4])]
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)

    other = CLIP(config).eval()
    other.load_state_dict(model.state_dict())
    seen = []
    own_forward = other.visual.conv1.forward
    other.visual.conv1.forward = lambda x: seen.append(x.shape) or own_forward(x)
    with torch.no_grad():
        replaced = other.encode_image(images)
    assert seen == [torch.Size([2, 3, 32, 32])]
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-6)


def test_images_the_convolution_refuses_get_its_error():
    conv = nn.Conv2d(3, 8, 4, 4, bias=False)
    with pytest.raises(RuntimeError, match="channels"):
        embed_patches(conv, torch.randn(2, 1, 16, 16))  # grayscale, not converted to RGB
    with pytest.raises(RuntimeError, match="[Kk]ernel size"):
        embed_patches(conv, torch.randn(2, 3, 3, 16))  # smaller than one patch
