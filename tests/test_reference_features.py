"""Our model against open_clip, an independent implementation, on files in OpenAI's released layout.

For each architecture: random weights (perturbed so that every parameter and BatchNorm statistic matters),
written like OpenAI's files, then loaded both by `clip.load` and by open_clip's OpenAI loader, which infers
the architecture by its own code. Image and text features on the same inputs must agree to 1e-4 relative
error (max |ours - theirs| / max |theirs|).

The two smallest released architectures run by default; the other seven are marked slow (`--runslow`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from openai_layout import write_openai_archive, write_openai_state_dict

import clip.loading
from clip.architectures import RELEASED_ARCHITECTURES, ModelConfig, TextConfig, VisionConfig
from clip.model import CLIP

open_clip = pytest.importorskip("open_clip")

RELATIVE_TOLERANCE = 1e-4
DEFAULT_ARCHITECTURES = ("RN50", "ViT-B/32")
TINY_TEXT = TextConfig(context_length=16, vocab_size=200, width=64, heads=1, layers=2)
TINY_CONFIGS = {
    "tiny-vit": ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="vit", image_size=32, width=64, layers=2, heads=1, patch_size=8),
        text=TINY_TEXT,
    ),
    "tiny-resnet": ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 2, 1, 1), heads=4),
        text=TINY_TEXT,
    ),
}


def perturbed_model(config: ModelConfig, seed: int = 0) -> CLIP:
    """A model whose every weight influences the output: the paper's initialisation zeroes biases and the
    last BatchNorm gain of each ResNet block (which would make most of a ResNet an identity), so those and
    the normalisation statistics get random values of moderate size."""
    torch.manual_seed(seed)
    model = CLIP(config).eval()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                continue
            if leaf == "running_var":
                value.uniform_(0.5, 2.0)
            elif leaf == "running_mean":
                value.normal_(0.0, 0.1)
            elif value.ndim == 1 and leaf == "weight":  # BatchNorm and LayerNorm gains
                value.uniform_(0.1, 0.3) if ".bn3." in name else value.uniform_(0.5, 1.5)
            elif value.ndim == 1 and leaf in ("bias", "in_proj_bias"):
                value.normal_(0.0, 0.05)
    return model


def example_inputs(config: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    # Token ids as the tokenizer makes them: start-of-text, words, end-of-text (the largest id), padding.
    vocab, length = config.text.vocab_size, config.text.context_length
    text = torch.zeros(batch, length, dtype=torch.long)
    for row, words in enumerate((5, length - 2)[:batch]):
        text[row, 0] = vocab - 2
        text[row, 1 : 1 + words] = torch.randint(1, vocab - 2, (words,), generator=generator)
        text[row, 1 + words] = vocab - 1
    return images, text


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def compare_with_open_clip(config: ModelConfig, path: Path, write) -> tuple[float, float]:
    write(perturbed_model(config), path)
    ours, _ = clip.loading.load(path, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    images, text = example_inputs(config)
    with torch.no_grad():
        image_error = relative_error(ours.encode_image(images), theirs.encode_image(images))
        text_error = relative_error(ours.encode_text(text), theirs.encode_text(text))
    return image_error, text_error


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_models_from_a_torchscript_archive_match_open_clip(name: str, tmp_path: Path) -> None:
    image_error, text_error = compare_with_open_clip(TINY_CONFIGS[name], tmp_path / "tiny.pt", write_openai_archive)
    assert image_error <= RELATIVE_TOLERANCE
    assert text_error <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    "name",
    [
        name if name in DEFAULT_ARCHITECTURES else pytest.param(name, marks=pytest.mark.slow)
        for name in RELEASED_ARCHITECTURES
    ],
)
def test_released_architectures_match_open_clip(name: str, tmp_path: Path) -> None:
    # A plain state dict in OpenAI's layout: tracing a full-size model into an archive costs ~15 s on a CPU,
    # and the archive reader is covered by the tiny models above and by tests/test_loading.py.
    image_error, text_error = compare_with_open_clip(
        RELEASED_ARCHITECTURES[name], tmp_path / "weights.pt", write_openai_state_dict
    )
    print(f"{name}: relative error image {image_error:.2e}, text {text_error:.2e}")
    assert image_error <= RELATIVE_TOLERANCE
    assert text_error <= RELATIVE_TOLERANCE
