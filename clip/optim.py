"""AdamW with the paper's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


def is_decayed(name: str, parameter: torch.Tensor, decay_embeddings: bool) -> bool:
    """The CLIP paper (section 2.5) decays "all weights that are not gains or biases": every parameter of
    two or more dimensions, the token and position embeddings included, and none of one dimension (gains,
    biases, the class token) or none (the temperature). decay_embeddings=False also spares the token and
    position embeddings, as GPT-2 does."""
    if parameter.ndim < 2:
        return False
    if decay_embeddings:
        return True
    return not (name.endswith("embedding") or name.endswith("token_embedding.weight"))


def parameter_groups(
    named_parameters: list[tuple[str, nn.Parameter]], decay_embeddings: bool, include_frozen: bool = False
) -> tuple[list[str], list[str]]:
    """The names of the trainable parameters with weight decay and of those without, in the optimizer's order.
    include_frozen: count every parameter as trainable (the layout of checkpoints from before towers could
    be locked)."""
    trainable = [(n, p) for n, p in named_parameters if p.requires_grad or include_frozen]
    return (
        [n for n, p in trainable if is_decayed(n, p, decay_embeddings)],
        [n for n, p in trainable if not is_decayed(n, p, decay_embeddings)],
    )


def build_optimizer(
    named_parameters: list[tuple[str, nn.Parameter]], config: OptimizerConfig, device: torch.device
) -> torch.optim.AdamW:
    by_name = dict(named_parameters)
    decay, no_decay = parameter_groups(named_parameters, config.decay_embeddings)
    groups = [
        {"params": [by_name[n] for n in decay], "weight_decay": config.weight_decay},
        {"params": [by_name[n] for n in no_decay], "weight_decay": 0.0},
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


def optimizer_parameter_names(named_parameters: list[tuple[str, nn.Parameter]], decay_embeddings: bool) -> list[str]:
    """The name of each parameter in the order of the optimizer's state dict (its groups, one after the
    other): saved beside that state, so that a resume matches it to parameters by name."""
    return [name for names in parameter_groups(named_parameters, decay_embeddings) for name in names]


class OptimizerStateMismatch(ValueError):
    """A checkpoint's optimizer state does not fit the model: groups of other sizes, state for a parameter the
    model lacks, a moment of another shape."""


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    saved: dict,
    named_parameters: list[tuple[str, nn.Parameter]],
    saved_names: list[str] | None,
    decay_embeddings: bool,
    saved_decay_embeddings: bool,
) -> list[str]:
    """Loads a checkpoint's per-parameter state (AdamW's moments and step counts) into `optimizer`, which keeps
    its own parameter groups and hyperparameters.

    torch's `load_state_dict` would also bring back the checkpoint's weight decay, betas and eps, so a
    resumed run whose config changed them would silently go on with the old ones; and it refuses groups of
    other sizes, which another `decay_embeddings` makes. The state is matched to parameters by name instead:
    `saved_names` as saved with it (`optimizer_parameter_names`), or for a checkpoint from before those were
    saved, the order its grouping gives (`saved_decay_embeddings`, as the checkpoint's config says).

    Returns the names whose saved state was left out: parameters this run does not train (a tower locked
    since). A parameter without saved state (unlocked since) starts with fresh moments."""
    if saved_names is None:
        saved_groups = parameter_groups(named_parameters, saved_decay_embeddings, include_frozen=True)
        saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
        if saved_sizes != [len(names) for names in saved_groups]:
            raise OptimizerStateMismatch(
                f"the checkpoint's optimizer groups hold {saved_sizes} parameters, but this model grouped with "
                f"decay_embeddings={saved_decay_embeddings} gives {[len(names) for names in saved_groups]}"
            )
        saved_names = [name for names in saved_groups for name in names]
    parameters = dict(named_parameters)
    current_index = {name: i for i, name in enumerate(optimizer_parameter_names(named_parameters, decay_embeddings))}
    state, left_out = {}, []
    for index, value in saved["state"].items():
        name = saved_names[int(index)]
        if name not in parameters:
            raise OptimizerStateMismatch(f"the checkpoint's optimizer has state for {name!r}, which this model does not have")
        if name not in current_index:  # a parameter this run does not train
            left_out.append(name)
            continue
        for key, tensor in value.items():  # moments are parameter-shaped; step counts are scalars
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape != parameters[name].shape:
                raise OptimizerStateMismatch(
                    f"the checkpoint's optimizer state {key!r} of {name!r} has shape {tuple(tensor.shape)}, the "
                    f"parameter {tuple(parameters[name].shape)}"
                )
        state[current_index[name]] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    match_state_layout_to_parameters(optimizer)
    return left_out


def match_state_layout_to_parameters(optimizer: torch.optim.Optimizer) -> None:
    """After loading optimizer state (`load_optimizer_state` does this): give every parameter-shaped state
    tensor its parameter's memory layout.

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
    """The rate of step `step` (0-based): linear warmup to `peak` over `warmup_steps`, then the schedule's
    kind: a cosine from `peak` to `peak * min_lr_ratio` at `steps`; a constant `peak`; or a constant `peak`,
    then the last `cooldown_steps` in equal decrements on a line that reaches `peak * min_lr_ratio` at
    `steps`: every cooldown step is below the peak, and, as with the cosine, the floor comes only after the
    run's last step (which is not taken at a rate of 0); past `steps` the rate stays there."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    floor = peak * schedule.min_lr_ratio
    if schedule.kind == "constant":
        return peak
    if schedule.kind == "constant_cooldown":
        cooldown_start = schedule.steps - schedule.cooldown_steps
        progress = min(max(step + 1 - cooldown_start, 0) / (schedule.cooldown_steps + 1), 1.0)
        return peak - (peak - floor) * progress
    if schedule.kind != "cosine":
        raise ValueError(f"unknown schedule kind {schedule.kind!r}")
    decay_steps = max(schedule.steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / decay_steps, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
