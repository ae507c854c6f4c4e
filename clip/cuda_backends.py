"""Process-wide CUDA math settings that a training run chooses once, at its start.

They are global switches of torch (not per model), so the trainer and the benchmarks call this one function
rather than setting them in several places.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def configure_cuda_backends(allow_tf32: bool) -> None:
    """TF32: float32 matrix products and convolutions run on the tensor cores with a 10-bit mantissa (the
    accumulation stays float32), several times faster than IEEE fp32; it only affects work that autocast
    leaves in float32 (all of it with precision = "fp32"). cuDNN autotuning: the convolutions of a ResNet
    see the same shapes at every step, so timing the algorithms once on the first step pays off; the
    algorithm chosen may differ between runs, but GPU training is not bitwise reproducible anyway (some
    backward kernels accumulate with atomic adds)."""
    if has_precision_api():
        # torch >= 2.9 raises when a process mixes these switches with the legacy allow_tf32 ones, and
        # recommends the new ones; a user's script or another library may already have used them.
        precision = "tf32" if allow_tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True


def has_precision_api() -> bool:
    """torch >= 2.9: per-backend `fp32_precision` switches ("ieee" / "tf32") replace `allow_tf32`."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full IEEE precision inside the block, whatever the process chose (TF32 for
    training): for work that compares a product's entries with values computed another way."""
    matmul = torch.backends.cuda.matmul
    switch, ieee = ("fp32_precision", "ieee") if has_precision_api() else ("allow_tf32", False)
    before = getattr(matmul, switch)
    setattr(matmul, switch, ieee)
    try:
        yield
    finally:
        setattr(matmul, switch, before)
