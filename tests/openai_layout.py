"""Test helpers: write a `clip.CLIP` model to files laid out like OpenAI's released weights.

OpenAI's release files are TorchScript archives whose `state_dict()` has our model's keys; the weights of
convolutions, linear layers, the attention input projections and the two projection matrices
(`text_projection`, `visual.proj`) are float16, everything else (embeddings, LayerNorm, BatchNorm,
`logit_scale`) float32; and three 0-dim integer entries `input_resolution`, `context_length` and
`vocab_size` sit beside the weights. Nothing here can reach the real files, so tests write their own.

This module decides which entries are float16 independently of `clip.loading`, by OpenAI's description of
its `convert_weights`, so that the loader is tested against the layout rather than against itself.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from clip.model import CLIP

EXTRA_ENTRIES = ("input_resolution", "context_length", "vocab_size")
_HALF_LEAF_NAMES = ("in_proj_weight", "in_proj_bias", "text_projection", "proj")


def half_precision_names(model: CLIP) -> set[str]:
    """State-dict keys that OpenAI's files store in float16."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names |= {prefix + name for name, value in module.named_parameters(recurse=False) if value is not None}
    names |= {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in _HALF_LEAF_NAMES}
    return names


def extra_entries(model: CLIP) -> dict[str, torch.Tensor]:
    return {
        "input_resolution": torch.tensor(model.visual.input_resolution),
        "context_length": torch.tensor(model.context_length),
        "vocab_size": torch.tensor(model.vocab_size),
    }


def openai_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The model's state dict as OpenAI's files hold it: the mixed float16/float32 weights plus the extras."""
    half = half_precision_names(model)
    state = {
        name: (value.detach().half() if name in half else value.detach().clone())
        for name, value in model.state_dict().items()
    }
    return state | extra_entries(model)


def half_round_trip(model: CLIP) -> CLIP:
    """A float32 copy of `model` whose float16-stored weights went through float16 and back: what a correct
    loader must reproduce exactly from a file written by this module."""
    rounded = copy.deepcopy(model).float().eval()
    half = half_precision_names(rounded)
    with torch.no_grad():
        for name, value in rounded.state_dict().items():
            if name in half:
                value.copy_(value.half().float())
    return rounded


def write_openai_state_dict(model: CLIP, path: str | Path) -> Path:
    """`torch.save` of `openai_state_dict(model)`: the layout of `torch.save(jit_model.state_dict())`."""
    torch.save(openai_state_dict(model), path)
    return Path(path)


def write_openai_archive(model: CLIP, path: str | Path) -> Path:
    """A TorchScript archive like OpenAI's: `forward`, `encode_image` and `encode_text` traced from a float16
    copy of `model`, with the three extra entries registered as buffers so they appear in `state_dict()`."""
    scripted_source = copy.deepcopy(model).eval()
    half = half_precision_names(scripted_source)
    with torch.no_grad():
        for name, parameter in scripted_source.named_parameters():
            if name in half:
                parameter.data = parameter.data.half()
    for name, value in extra_entries(model).items():
        if hasattr(scripted_source, name):  # CLIP keeps context_length and vocab_size as plain ints
            delattr(scripted_source, name)
        scripted_source.register_buffer(name, value)
    size = model.visual.input_resolution
    image = torch.zeros(1, 3, size, size)
    # Start-of-text, words, and end-of-text (the largest id) at the last position: tracing records the
    # sequence length the model runs to, which must be the whole context for the archive to serve any text.
    text = torch.ones(1, model.context_length, dtype=torch.long)
    text[0, 0], text[0, -1] = model.vocab_size - 2, model.vocab_size - 1
    inputs = {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.export
        traced = torch.jit.trace_module(scripted_source, inputs, check_trace=False)
        traced.save(str(path))
    return Path(path)
