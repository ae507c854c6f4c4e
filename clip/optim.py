"""AdamW with the paper's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


def is_decayed(name: str, parameter: torch.Tensor, decay_embeddings: bool = True) -> bool:
    """The CLIP paper (section 2.5) decays "all weights that are not gains or biases": every parameter of
    two or more dimensions, the token and position embeddings included, and none of one dimension (gains,
    biases, the class token) or none (the temperature). decay_embeddings=False also spares the token and
    position embeddings, as GPT-2 does."""
    if parameter.ndim < 2:
        return False
    if decay_embeddings:
        return True
    return not (name.endswith("embedding") or name.endswith("token_embedding.weight"))


def build_optimizer(named_parameters: list[tuple[str, nn.Parameter]], config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    decayed = {n for n, p in named_parameters if is_decayed(n, p, config.decay_embeddings)}
    decay = [p for n, p in named_parameters if p.requires_grad and n in decayed]
    no_decay = [p for n, p in named_parameters if p.requires_grad and n not in decayed]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    implementation = config.implementation
    if implementation == "auto":
        # The fused kernel updates each parameter in one pass with no temporaries. On CUDA that is a few
        # launches; on the CPU it is also the fastest (the others read and write the state several times)
        # and the smallest: foreach allocates temporaries as large as all the parameters together (the
        # square roots of exp_avg_sq, for one). See benchmarks/train_step.py.
        implementation = "fused" if device.type in ("cuda", "cpu") else "foreach"
    kwargs = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[implementation]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kwargs)


def match_state_layout_to_parameters(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: give every parameter-shaped state tensor its parameter's memory layout.

    torch.save keeps strides, so AdamW moments saved by a channels-last run (ResNets on a GPU) come back
    channels-last, and those saved on the CPU come back contiguous. The fused kernels take a parameter and
    its moments as flat memory of the same layout: CUDA's refuses a mismatch, the CPU's silently updates
    the wrong elements. Loading in another setting than the one that saved (a CPU run resumed on GPUs)
    would hit either. Copies only the tensors whose strides differ."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                        and value.stride() != parameter.stride()):
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def learning_rate(step: int, peak: float, schedule: ScheduleConfig) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to `peak * min_lr_ratio` at `steps`."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    decay_steps = max(schedule.steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / decay_steps, 1.0)
    floor = peak * schedule.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
