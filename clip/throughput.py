"""Model FLOPs and utilisation (MFU): the fraction of the accelerator's peak matrix throughput that the
model's own arithmetic uses. Recomputation from gradient checkpointing is not counted, by convention.

The text encoder runs only up to each batch's last end-of-text token (see `CLIP.encode_text`), so the
FLOPs of a step depend on its text length: MFU counts the text at the length actually run, never at the
full context, which would overstate it. Likewise the towers' last blocks are counted at the one position per
sequence they compute (`Transformer.forward_at`): the FLOPs are those the model runs, counted on it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode

from .architectures import ModelConfig
from .model import CLIP

# Dense (no sparsity) peak throughput in FLOP/s from the vendors' data sheets: bf16/fp16 on the tensor cores,
# "tf32" (float32 matrix work on the tensor cores, `clip.cuda_backends`) and plain IEEE float32. Looked up
# by the first entry whose name is in torch's device name, so the lower-clocked PCIe / NVL cards come
# before the SXM parts ("NVIDIA H100 80GB HBM3", "NVIDIA H200") that share their model number.
_BF16 = (torch.bfloat16, torch.float16)
PEAK_FLOPS_BY_DEVICE: tuple[tuple[str, dict], ...] = (
    ("H200 NVL", {_BF16: 835e12, "tf32": 418e12, torch.float32: 60e12}),
    ("H200", {_BF16: 989e12, "tf32": 494e12, torch.float32: 67e12}),
    ("GH200", {_BF16: 989e12, "tf32": 494e12, torch.float32: 67e12}),  # Grace Hopper: an H100/H200-class GPU
    ("H100 NVL", {_BF16: 835e12, "tf32": 418e12, torch.float32: 60e12}),
    ("H100 PCIe", {_BF16: 756e12, "tf32": 378e12, torch.float32: 51e12}),
    ("H100", {_BF16: 989e12, "tf32": 494e12, torch.float32: 67e12}),
    ("A100", {_BF16: 312e12, "tf32": 156e12, torch.float32: 19.5e12}),
)
# A backward pass costs about twice the forward (gradients with respect to inputs and to weights).
TRAINING_FLOPS_PER_FORWARD_FLOP = 3.0
# Images are counted two at a time (FLOPs grow linearly with the batch): BatchNorm in training mode refuses a
# batch of one image where a stage's output is 1 x 1 pixels (a 32-pixel ResNet's last stage).
IMAGES_COUNTED = 2


def _forward_flops(config: ModelConfig, run, samples: int = 1, top: tuple[str, int] | None = None) -> int:
    """The FLOPs per sample of `run(model)` on `samples` samples; with `top` = (tower, layers), only those of that
    tower's top (`CLIP.tower_top`)."""
    # Counted on the meta device: nothing is allocated or computed.
    with torch.device("meta"):
        model = CLIP(config)
    counter = FlopCounterMode(display=False)
    modules, projections = model.tower_top(*top) if top is not None else ([], [])
    # The count's growth while each module of the top runs; the projection (a bare matrix product) is added.
    # Hooks for every module, not on the top's own modules: those would make the towers run as openai/CLIP's,
    # every position of the last block included (`clip.transformer.runs_as_openai`), which training does not
    top_modules = set(modules)
    within, started = [0], {}

    def enter(module, args) -> None:
        if module in top_modules:
            started[module] = counter.get_total_flops()

    def leave(module, args, output) -> None:
        if module in top_modules:
            within[0] += counter.get_total_flops() - started[module]

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)] if top_modules else []
    try:
        with counter, torch.device("meta"):
            run(model)
    finally:
        for hook in hooks:
            hook.remove()
    if top is None:
        return counter.get_total_flops() // samples
    return within[0] // samples + sum(2 * projection.shape[0] * projection.shape[1] for projection in projections)


@lru_cache(maxsize=64)
def image_forward_flops(config: ModelConfig, patch_dropout: float = 0.0, top_layers: int | None = None) -> int:
    """With patch dropout (a ViT in training), counted at the number of patches the transformer sees. With
    `top_layers`, only those of the image tower's top (`CLIP.tower_top`)."""
    size = config.vision.image_size

    def run(model: CLIP) -> None:
        if patch_dropout:
            model.set_patch_dropout(patch_dropout)
        model.encode_image(torch.empty(IMAGES_COUNTED, 3, size, size))  # in training mode, as a new module is

    top = None if top_layers is None else ("image", top_layers)
    return _forward_flops(config, run, IMAGES_COUNTED, top)


@lru_cache(maxsize=256)
def text_forward_flops(config: ModelConfig, length: int, top_layers: int | None = None) -> int:
    """With `top_layers`, only those of the text tower's top (`CLIP.tower_top`)."""
    top = None if top_layers is None else ("text", top_layers)
    return _forward_flops(config, lambda model: model.encode_text(torch.zeros(1, length, dtype=torch.long)), 1, top)


def training_flops_per_sample(
    config: ModelConfig,
    text_length: int | None = None,
    lock_image: bool = False,
    lock_text: bool = False,
    patch_dropout: float = 0.0,
    image_unlocked_layers: int = 0,
    text_unlocked_layers: int = 0,
) -> float:
    """FLOPs of one image-text pair through forward and backward; the text at `text_length` tokens
    (default: the full context), the image at the patches patch dropout keeps. A locked tower
    (`CLIP.lock`) runs forward only, and the backward pass of its unlocked top (*_unlocked_layers)."""
    length = config.text.context_length if text_length is None else text_length
    backward_factor = TRAINING_FLOPS_PER_FORWARD_FLOP - 1.0
    image = image_forward_flops(config, patch_dropout)
    if not lock_image:
        image *= TRAINING_FLOPS_PER_FORWARD_FLOP
    elif image_unlocked_layers:
        image += backward_factor * image_forward_flops(config, top_layers=image_unlocked_layers)
    text = text_forward_flops(config, length)
    if not lock_text:
        text *= TRAINING_FLOPS_PER_FORWARD_FLOP
    elif text_unlocked_layers:
        text += backward_factor * text_forward_flops(config, length, text_unlocked_layers)
    return image + text


def peak_flops(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The device's peak FLOP/s for `dtype`, or None where unknown (e.g. CPUs). tf32: float32 matrix work
    runs on the tensor cores (`clip.cuda_backends`), whose peak is then the one that counts."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Whole words: "A100" is in "NVIDIA RTX A1000" too, a card of a small fraction of its throughput
    peaks = next((peaks for model_name, peaks in PEAK_FLOPS_BY_DEVICE
                  if re.search(rf"\b{re.escape(model_name)}\b", name)), None)
    if peaks is None:
        return None
    if dtype in _BF16:
        return peaks[_BF16]
    if dtype == torch.float32:
        return peaks["tf32" if tf32 else torch.float32]
    return None
