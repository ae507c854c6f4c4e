"""Model FLOPs and utilisation (MFU): the fraction of the accelerator's peak matrix throughput that the
model's own arithmetic uses. Recomputation from gradient checkpointing is not counted, by convention."""

from __future__ import annotations

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


def training_flops_per_sample(config: ModelConfig) -> float:
    """FLOPs of one image-text pair through forward and backward (backward ~ 2x forward), counted once on
    the meta device so nothing is allocated or computed."""
    with torch.device("meta"):
        model = CLIP(config)
        image = torch.empty(1, 3, config.vision.image_size, config.vision.image_size)
        text = torch.zeros(1, config.text.context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(image)
        model.encode_text(text)
    return 3.0 * counter.get_total_flops()


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for `dtype`, or None where unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (model_name, table_dtype), flops in PEAK_FLOPS.items():
        if model_name in name and table_dtype == dtype:
            return flops
    return None
