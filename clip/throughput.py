"""Model FLOPs and utilisation (MFU): the fraction of the accelerator's peak matrix throughput that the
model's own arithmetic uses. Recomputation from gradient checkpointing is not counted, by convention.

The text encoder runs only up to each batch's last end-of-text token (see `CLIP.encode_text`), so the
FLOPs of a step depend on its text length: MFU counts the text at the length actually run, never at the
full context, which would overstate it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from .architectures import ModelConfig
from .model import CLIP

# Dense (no sparsity) peak tensor-core throughput in FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = {
    ("H200", torch.bfloat16): 989e12,
    ("H100", torch.bfloat16): 989e12,
    ("A100", torch.bfloat16): 312e12,
    ("H200", torch.float16): 989e12,
    ("H100", torch.float16): 989e12,
    ("A100", torch.float16): 312e12,
    ("H200", torch.float32): 67e12,  # no tensor cores for plain fp32 (TF32 aside)
    ("H100", torch.float32): 67e12,
    ("A100", torch.float32): 19.5e12,
}
# float32 work on the tensor cores (TF32): half the bf16 rate on Hopper and Ampere.
PEAK_TF32_FLOPS = {"H200": 494e12, "H100": 494e12, "A100": 156e12}
# A backward pass costs about twice the forward (gradients with respect to inputs and to weights).
TRAINING_FLOPS_PER_FORWARD_FLOP = 3.0


def _forward_flops(config: ModelConfig, run) -> int:
    # Counted on the meta device: nothing is allocated or computed.
    with torch.device("meta"):
        model = CLIP(config)
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        run(model)
    return counter.get_total_flops()


@lru_cache(maxsize=64)
def image_forward_flops(config: ModelConfig) -> int:
    size = config.vision.image_size
    return _forward_flops(config, lambda model: model.encode_image(torch.empty(1, 3, size, size)))


@lru_cache(maxsize=256)
def text_forward_flops(config: ModelConfig, length: int) -> int:
    return _forward_flops(config, lambda model: model.encode_text(torch.zeros(1, length, dtype=torch.long)))


def training_flops_per_sample(config: ModelConfig, text_length: int | None = None) -> float:
    """FLOPs of one image-text pair through forward and backward; the text at `text_length` tokens
    (default: the full context)."""
    length = config.text.context_length if text_length is None else text_length
    return TRAINING_FLOPS_PER_FORWARD_FLOP * (image_forward_flops(config) + text_forward_flops(config, length))


def peak_flops(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The device's peak FLOP/s for `dtype`, or None where unknown (e.g. CPUs). tf32: float32 matrix work
    runs on the tensor cores (`clip.cuda_backends`), whose peak is then the one that counts."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if dtype == torch.float32 and tf32:
        return next((flops for model_name, flops in PEAK_TF32_FLOPS.items() if model_name in name), None)
    for (model_name, table_dtype), flops in PEAK_FLOPS.items():
        if model_name in name and table_dtype == dtype:
            return flops
    return None
