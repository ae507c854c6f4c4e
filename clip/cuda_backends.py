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
    # The whole-process setters, not torch >= 2.9's per-backend `fp32_precision` ones: once those were written,
    # reading the older getters raises ("mix of the legacy and new APIs"), and torch.compile's inductor reads
    # them (torch 2.9 to 2.13 on every CUDA compile, later versions' autotune caches: pytorch/pytorch#166387).
    # Written through these setters, the old and the new getters all read consistently, also after a script
    # or another library used the new ones.
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True


def has_precision_api() -> bool:
    """torch >= 2.9: per-backend `fp32_precision` switches ("ieee" / "tf32") replace `allow_tf32`."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full IEEE precision inside the block, whatever the process chose (TF32 for
    training): for work that compares a product's entries with values computed another way. Through the
    whole-process setter, for the reason `configure_cuda_backends` gives."""
    before = float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def float32_matmul_precision() -> str:
    """The float32 matrix-product precision in force, named as `torch.set_float32_matmul_precision` takes it.
    Where torch has per-backend switches, CUDA's is read: after a script wrote it, the whole-process getter can
    still name the value from before."""
    by_backend_name = {"ieee": "highest", "tf32": "high", "bf16": "medium"}
    if has_precision_api() and torch.backends.cuda.matmul.fp32_precision in by_backend_name:
        return by_backend_name[torch.backends.cuda.matmul.fp32_precision]
    return torch.get_float32_matmul_precision()
