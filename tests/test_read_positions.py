"""The towers' last block computes only the positions read from it (the class token, the end-of-text tokens):
the same features and gradients as the whole block, for less work."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.model import CLIP
from clip.transformer import MultiheadSelfAttention, Transformer, causal_mask

from test_model import texts_with_lengths

CONFIG = ModelConfig(
    embed_dim=24,
    vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2),
    text=TextConfig(context_length=20, vocab_size=50, width=32, layers=2, heads=2),
)


def features_and_gradients(model: CLIP, images: torch.Tensor, texts: torch.Tensor):
    model.zero_grad(set_to_none=True)
    image_features, text_features = model.encode_image(images), model.encode_text(texts)
    # Weights that differ per row and column, so that a wrong row or column changes the gradients
    image_weights = torch.linspace(-1, 2, image_features.numel(), dtype=image_features.dtype)
    text_weights = torch.linspace(2, -1, text_features.numel(), dtype=text_features.dtype)
    loss = (image_features.flatten() * image_weights).sum() + (text_features.flatten() * text_weights).sum() ** 2
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return image_features.detach(), text_features.detach(), gradients


def run_whole(model: CLIP):
    """Hooks on the towers make them run every position of every block, as openai/CLIP's."""
    return [tower.register_forward_hook(lambda *args: None) for tower in (model.transformer, model.visual.transformer)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_towers_reading_only_their_output_positions_give_the_whole_towers_features_and_gradients(checkpointing):
    torch.manual_seed(0)
    model = CLIP(CONFIG).double().train()
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    texts = texts_with_lengths([3, 17, 8])  # end-of-text tokens at different positions
    fast = features_and_gradients(model, images, texts)
    hooks = run_whole(model)
    whole = features_and_gradients(model, images, texts)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(fast[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], whole[1], rtol=1e-12, atol=1e-12)
    assert fast[2].keys() == whole[2].keys() and len(fast[2]) > 20
    for name in whole[2]:
        torch.testing.assert_close(fast[2][name], whole[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_the_last_blocks_queries_and_mlp_run_on_the_read_positions_only():
    model = CLIP(CONFIG).eval()
    images, texts = torch.randn(4, 3, 32, 32), texts_with_lengths([5, 9, 16, 20])

    def flops() -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.encode_image(images)
            model.encode_text(texts)
        return counter.get_total_flops()

    fast = flops()
    hooks = run_whole(model)
    whole = flops()
    for hook in hooks:
        hook.remove()
    # At least the last block's MLP over the positions not read: 16 patch tokens per image and, over the 20
    # text positions run (no trimming: one caption fills the context), 19 per caption; 4 sequences each.
    width, hidden = 32, 128
    mlp_flops_per_position = 2 * 2 * width * hidden
    assert whole - fast >= (16 + 19) * 4 * mlp_flops_per_position


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_forward_at_is_forward_read_at_those_positions(causal):
    torch.manual_seed(0)
    mask = causal_mask(9) if causal else None
    transformer = Transformer(16, 3, 4, mask, causal=causal).double()
    x = torch.randn(5, 9, 16, dtype=torch.float64).transpose(0, 1)  # LND, as the model's own callers pass it
    positions = torch.tensor([0, 8, 3, 3, 6])
    expected = transformer(x)[positions, torch.arange(5)]
    torch.testing.assert_close(transformer.forward_at(x, positions), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(transformer.forward_at(x.contiguous(), positions), expected, rtol=1e-12, atol=1e-12)


def test_a_block_changed_from_outside_runs_whole_in_forward_at():
    torch.manual_seed(0)
    transformer = Transformer(16, 2, 4, causal_mask(6), causal=True).double()
    x = torch.randn(6, 3, 16, dtype=torch.float64)
    positions = torch.tensor([1, 5, 2])
    # Bidirectional attention, as prompt learners set it: later positions now count
    transformer.resblocks[-1].attn_mask = None
    expected = transformer(x)[positions, torch.arange(3)]
    torch.testing.assert_close(transformer.forward_at(x, positions), expected, rtol=1e-12, atol=1e-12)
    # A block replaced by another module
    transformer.resblocks[-1] = torch.nn.Linear(16, 16).double()
    expected = transformer(x)[positions, torch.arange(3)]
    torch.testing.assert_close(transformer.forward_at(x, positions), expected, rtol=1e-12, atol=1e-12)


def test_forward_at_of_an_empty_transformer_reads_its_input():
    x = torch.randn(4, 2, 8)
    positions = torch.tensor([3, 1])
    assert torch.equal(Transformer(8, 0, 2).forward_at(x, positions), x[positions, torch.arange(2)])


class OwnTower(torch.nn.Module):
    """A text or image transformer replaced by outside code: a module of its own, without forward_at."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_a_transformer_replaced_by_another_module_runs_as_called():
    torch.manual_seed(0)
    model = CLIP(CONFIG).eval()
    model.transformer, model.visual.transformer = OwnTower(32), OwnTower(32)
    images, texts = torch.randn(2, 3, 32, 32), texts_with_lengths([4, 7])
    assert model.encode_image(images).shape == model.encode_text(texts).shape == (2, 24)


@pytest.mark.parametrize("replaced_on", ["module", "class"])
def test_an_attention_forward_replaced_by_outside_code_is_called_in_the_last_block(replaced_on, monkeypatch):
    # Attention-map tools replace `attn.forward` to ask for need_weights=True: the last block must still call it
    torch.manual_seed(0)
    model = CLIP(CONFIG).eval()
    images, texts = torch.randn(2, 3, 32, 32), texts_with_lengths([4, 7])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
    maps = []
    own_forward = MultiheadSelfAttention.forward

    def forward_keeping_weights(attn, query, key=None, value=None, need_weights=True, **kwargs):
        out, weights = own_forward(attn, query, key, value, need_weights=True, **kwargs)
        maps.append(weights.shape)
        return out, weights

    last_blocks = (model.visual.transformer.resblocks[-1], model.transformer.resblocks[-1])
    if replaced_on == "module":
        for block in last_blocks:
            block.attn.forward = types.MethodType(forward_keeping_weights, block.attn)
    else:
        monkeypatch.setattr(MultiheadSelfAttention, "forward", forward_keeping_weights)
    with torch.no_grad():
        after = model.encode_image(images), model.encode_text(texts)
    layers = 1 if replaced_on == "module" else 2
    assert maps == [(2, 17, 17)] * layers + [(2, 20, 20)] * layers  # the class token and patches; the context
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old)


def test_a_mask_or_hook_on_a_bidirectional_block_is_honoured_in_forward_at():
    torch.manual_seed(0)
    transformer = Transformer(16, 2, 4).double()  # no mask, as the image tower's
    x = torch.randn(6, 3, 16, dtype=torch.float64)
    positions = torch.tensor([1, 5, 2])
    transformer.resblocks[-1].attn_mask = causal_mask(6)  # set by outside code
    expected = transformer(x)[positions, torch.arange(3)]
    torch.testing.assert_close(transformer.forward_at(x, positions), expected, rtol=1e-12, atol=1e-12)
    transformer.resblocks[-1].attn_mask = None
    shapes = []
    transformer.resblocks[-1].register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    expected = transformer(x)[positions, torch.arange(3)]
    torch.testing.assert_close(transformer.forward_at(x, positions), expected, rtol=1e-12, atol=1e-12)
    assert shapes == [(6, 3, 16)] * 2  # the hooked block ran whole, in forward_at too


def test_a_transformer_subclass_with_its_own_forward_is_called_by_the_towers():
    torch.manual_seed(0)
    model = CLIP(CONFIG).eval()
    calls = []

    class Recording(Transformer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return super().forward(x)

    model.visual.transformer.__class__ = Recording
    model.transformer.__class__ = Recording
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_text(texts_with_lengths([4, 7]))
    assert calls[0] == (17, 2, 32) and len(calls) == 2
