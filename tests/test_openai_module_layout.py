"""Code written against openai/CLIP's modules runs unchanged: `from clip import clip`, clip.model's
`build_model` and `convert_weights`, `clip.simple_tokenizer.SimpleTokenizer`."""

from __future__ import annotations

import pytest
import torch
from openai_layout import openai_state_dict

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig

TINY = ModelConfig(
    embed_dim=16,
    vision=VisionConfig(kind="vit", image_size=32, patch_size=16, width=64, layers=1, heads=1),  # heads = width // 64
    text=TextConfig(context_length=77, vocab_size=49408, width=64, layers=1, heads=1),
)


def test_from_clip_import_clip():
    from clip import clip as openai_style

    assert openai_style.load is clip.load and openai_style.tokenize is clip.tokenize
    assert list(openai_style._MODELS) == openai_style.available_models() == clip.available_models()
    assert all(url.startswith("https://") for url in openai_style._MODELS.values())
    with pytest.raises(ValueError, match="not one of the released models"):
        openai_style._download("https://example.com/other.pt")
    assert clip.clip is openai_style  # reachable after a plain `import clip`, as in openai/CLIP
    assert repr(openai_style._transform(64)) == repr(clip.image_transform(64))
    assert openai_style._tokenizer.encode("a cat") == [320, 2368]


def test_build_model_and_convert_weights_as_openai_clip():
    from clip.model import build_model, convert_weights

    torch.manual_seed(0)
    original = clip.create_model(TINY).eval()
    model = build_model(openai_state_dict(original))  # OpenAI's layout, with its three integer entries
    assert not model.training and model.visual.conv1.weight.dtype == torch.float16  # as openai/CLIP's
    assert model.token_embedding.weight.dtype == torch.float32
    expected = convert_weights(original)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_simple_tokenizer_as_openai_clip():
    from clip.simple_tokenizer import SimpleTokenizer, default_bpe

    tokenizer = SimpleTokenizer(default_bpe())
    ids = tokenizer.encode("a photo of a cat")
    assert ids == clip.tokenize("a photo of a cat")[0, 1:6].tolist()
    assert tokenizer.encoder["<|startoftext|>"] == 49406 and tokenizer.decoder[49407] == "<|endoftext|>"
    framed = [49406, *ids, 49407]
    assert tokenizer.decode(framed) == "<|startoftext|>a photo of a cat <|endoftext|>"
