"""Recover a `ModelConfig` from the tensor shapes of a CLIP state dict with OpenAI's key names.

This is the one place in the library that infers an architecture; it exists because OpenAI's released
files (and plain `torch.save(model.state_dict())` files) carry weights but no config. Checkpoints written by
our trainer carry their config and never come here.

What shapes cannot tell:
- the number of attention heads: we use OpenAI's convention, one head per 64 channels (`width // 64`) for
  the text transformer, the ViT and the ResNet's attention pool. All nine released checkpoints follow it;
  a model trained with another head count must be loaded from a checkpoint that carries its config.
- the activation: OpenAI's models use QuickGELU, so that is what we assume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from .architectures import ModelConfig, TextConfig, VisionConfig

# OpenAI's convention for the released checkpoints: attention heads of 64 channels each.
HEAD_WIDTH = 64
VIT_MARKER = "visual.proj"
RESNET_MARKER = "visual.layer1.0.conv1.weight"
RESNET_DOWNSAMPLING = 32


class ArchitectureInferenceError(ValueError):
    """The state dict is not a CLIP state dict in OpenAI's layout, or its shapes are inconsistent."""


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The architecture whose `CLIP(config).state_dict()` has these keys and shapes (see the module doc for
    the two conventions assumed). Works on tensors of any device, `meta` included."""
    try:
        return _infer_model_config(state_dict)
    except ArchitectureInferenceError:
        raise
    except ValueError as error:  # shapes no config admits (a context of 1): the config's own words, as ours
        raise ArchitectureInferenceError(f"its tensor shapes give no valid architecture: {error}") from error


def _infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    if VIT_MARKER in state_dict:
        vision = _infer_vit(state_dict)
    elif RESNET_MARKER in state_dict:
        vision = _infer_resnet(state_dict)
    else:
        raise ArchitectureInferenceError(
            f"cannot tell the image encoder: neither {VIT_MARKER!r} (Vision Transformer) nor {RESNET_MARKER!r} "
            f"(ModifiedResNet) is present; found keys like {_sample(state_dict)}"
        )
    text = _infer_text(state_dict)
    embed_dim = _shape(state_dict, "text_projection", ndim=2)[1]
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text, activation="quick_gelu")


def _infer_vit(state_dict: Mapping[str, torch.Tensor]) -> VisionConfig:
    width, _, patch_size, _ = _shape(state_dict, "visual.conv1.weight", ndim=4)
    tokens = _shape(state_dict, "visual.positional_embedding", ndim=2)[0]
    grid = _exact_sqrt(tokens - 1, "visual.positional_embedding has {} rows: not 1 + a square number of patches")
    layers = _count_blocks(state_dict, "visual.transformer.resblocks")
    mlp_hidden = _shape(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight", ndim=2)[0]
    return VisionConfig(
        kind="vit",
        image_size=grid * patch_size,
        width=width,
        layers=layers,
        heads=_heads(width, "visual.conv1.weight"),
        patch_size=patch_size,
        mlp_ratio=_mlp_ratio(mlp_hidden, width),
    )


def _infer_resnet(state_dict: Mapping[str, torch.Tensor]) -> VisionConfig:
    width = _shape(state_dict, RESNET_MARKER, ndim=4)[0]
    stages = tuple(_count_blocks(state_dict, f"visual.layer{stage}") for stage in (1, 2, 3, 4))
    tokens = _shape(state_dict, "visual.attnpool.positional_embedding", ndim=2)[0]
    grid = _exact_sqrt(tokens - 1, "visual.attnpool.positional_embedding has {} rows: not 1 + a square number")
    pool_width = width * 32  # the last stage's channels: 8x the stem width, times the bottleneck expansion 4
    return VisionConfig(
        kind="resnet",
        image_size=grid * RESNET_DOWNSAMPLING,
        width=width,
        layers=stages,
        heads=_heads(pool_width, "visual.attnpool.c_proj.weight"),
    )


def _infer_text(state_dict: Mapping[str, torch.Tensor]) -> TextConfig:
    context_length, width = _shape(state_dict, "positional_embedding", ndim=2)
    vocab_size = _shape(state_dict, "token_embedding.weight", ndim=2)[0]
    mlp_hidden = _shape(state_dict, "transformer.resblocks.0.mlp.c_fc.weight", ndim=2)[0]
    return TextConfig(
        context_length=context_length,
        vocab_size=vocab_size,
        width=width,
        layers=_count_blocks(state_dict, "transformer.resblocks"),
        heads=_heads(width, "positional_embedding"),
        mlp_ratio=_mlp_ratio(mlp_hidden, width),
    )


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise ArchitectureInferenceError(f"the state dict lacks {key!r}; found keys like {_sample(state_dict)}")
    value = state_dict[key]
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ArchitectureInferenceError(f"{key!r} should be a {ndim}-d tensor, found {found}")
    if 0 in value.shape:  # a width of 0 divided by zero in the head count
        raise ArchitectureInferenceError(f"{key!r} is empty (shape {tuple(value.shape)})")
    return tuple(value.shape)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive numbered blocks `prefix.0`, `prefix.1`, ... present in the keys."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    # Compared as strings: a key's index is the file's word, and int() of 5000 digits raises a ValueError
    numbers = {match.group(1) for key in state_dict if (match := pattern.match(key))}
    if not numbers:
        raise ArchitectureInferenceError(f"the state dict has no {prefix}.0.* entries")
    if numbers != {str(index) for index in range(len(numbers))}:
        # The first five absent indices are below len + 5; listing every index up to the largest one built
        # a set of 10**11 indices for a 1 KB file with one key of block 99999999999
        # Only indices below the largest one present are missing ({0, 2, 3, 4} lacks block 1, not 5 to 8 too)
        digits = max((number.lstrip("0") or "0" for number in numbers), key=lambda number: (len(number), number))
        below = len(numbers) + 5 if len(digits) > len(str(len(numbers) + 5)) else int(digits)
        missing = [index for index in range(min(below, len(numbers) + 5)) if str(index) not in numbers][:5]
        if not missing:  # every index there, one also written another way: "01" beside "1"
            odd = sorted(number for number in numbers if number.startswith("0") and number != "0")[:5]
            raise ArchitectureInferenceError(f"{prefix} has block numbers written with leading zeros: {odd}")
        raise ArchitectureInferenceError(f"{prefix} has {len(numbers)} numbered blocks but lacks block(s) {missing}")
    return len(numbers)


def _heads(width: int, source: str) -> int:
    if width % HEAD_WIDTH:
        raise ArchitectureInferenceError(
            f"width {width} (from {source}) is not a multiple of {HEAD_WIDTH}, so the head count cannot be "
            f"inferred by the released checkpoints' convention (heads = width // {HEAD_WIDTH}); load a "
            f"checkpoint that carries its config instead"
        )
    return width // HEAD_WIDTH


def _mlp_ratio(hidden: int, width: int) -> float:
    """The ratio from which a model builds `hidden` MLP units (int(width * ratio)). hidden / width, rounded to a
    float, can fall short of it (1952 / 448 gives 1951): then the next floats up."""
    ratio = hidden / width
    for _ in range(4):
        if int(width * ratio) == hidden:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ArchitectureInferenceError(f"MLP width {hidden} is not expressible as a ratio of the width {width}")


def _exact_sqrt(value: int, message: str) -> int:
    root = math.isqrt(value) if value >= 0 else -1
    if root < 1 or root * root != value:
        raise ArchitectureInferenceError(message.format(value + 1))
    return root


def _sample(state_dict: Mapping[str, object], count: int = 5) -> str:
    keys = list(state_dict)
    shown = ", ".join(repr(key) for key in keys[:count])
    return f"{shown}{', ...' if len(keys) > count else ''} ({len(keys)} entries)"
