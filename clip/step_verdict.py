"""A training step taken or skipped on the device, and its verdict read by the host a step later.

The verdict (`clip.distributed.agreement_flags`: every loss finite, the gradients finite, some rank stopping)
decides whether the optimiser steps. Read on the host straight away, it makes the host wait for the device at
the end of every step, and the device then idles while the host launches the next step's first kernels:
measured on an H200 (docs/benchmarks.md), 4% of a compiled ViT-B/16 step at batch 256 and 9% of an eager one.

The fused AdamW can skip an update by itself: given a `found_inf` flag on the device, its kernel leaves the
parameters, the moments and the step counts as they were when the flag is set (fp16's gradient scaler skips
steps this way). With the BatchNorm statistics put back by a torch.where on the same flag, the whole step is
decided on the device, and the host learns the verdict one step later (`VerdictInFlight`): its bookkeeping
(the warning, the counts, giving up after too many, stopping) comes then, and the result is the same.
"""

from __future__ import annotations

import torch

from .distributed import StepAgreement
from .train_step import BatchNormSnapshot


# The devices whose fused AdamW kernel honours found_inf. Others accept fused=True too, but MPS's, for one, is
# handed the flag and (in PyTorch's source as read) does not pass it to its kernel: the update would be applied
# while the step counts were put back. Elsewhere the verdict is read at once, on the host.
FOUND_INF_DEVICES = ("cuda", "cpu")


def skips_on_device(optimizer: torch.optim.Optimizer, gradient_scaler_enabled: bool) -> bool:
    """Whether a non-finite step can be skipped without the host reading its verdict first: the optimiser is
    the fused AdamW (the foreach and for-loop ones have no `found_inf`) with its parameters where its kernel
    honours the flag, and no fp16 gradient scaler runs (it judges the gradients itself, from a host read of
    its own)."""
    if not isinstance(optimizer, torch.optim.AdamW) or not optimizer.defaults.get("fused") or gradient_scaler_enabled:
        return False
    return all(p.device.type in FOUND_INF_DEVICES for group in optimizer.param_groups for p in group["params"])


def step_or_skip_on_device(optimizer: torch.optim.AdamW, flags: torch.Tensor, batch_norms: BatchNormSnapshot) -> None:
    """The optimiser's step, skipped on the device when `flags` (`agreement_flags`) say a loss or the gradients
    were not finite: the BatchNorm statistics are put back then, as a skip read on the host does. Nothing is
    read on the host. `found_inf` and `grad_scale` are the attributes by which torch's gradient scaler hands
    its verdict to a fused optimiser's step; they are cleared again after it."""
    skipped = StepAgreement.skipped_on_device(flags)
    batch_norms.restore_if(skipped)
    optimizer.grad_scale, optimizer.found_inf = None, skipped.to(torch.float32)
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None


class VerdictInFlight:
    """One step's verdict on its way to the host, with what its warning needs (the step, its loss).

    On a GPU the flags are copied into pinned host memory right behind the step's work, and an event marks
    the copy's end: `read` waits for that point only. A plain read later on would be queued on the stream
    behind the next step's work as well, and wait for all of it."""

    def __init__(self, step: int, flags: torch.Tensor, loss: torch.Tensor) -> None:
        self.step, self.loss = step, loss
        self._copied = None
        if flags.device.type == "cuda":
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(flags.device))  # the stream the copy was queued on
        else:  # read as it is (on the CPU the values are there already)
            self._flags = flags

    def read(self) -> StepAgreement:
        if self._copied is not None:
            self._copied.synchronize()
        return StepAgreement.read(self._flags)
