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
    with _unset_cpu_matmul_precision_kept():
        torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if has_precision_api() and not allow_tf32:
        # False writes "none" to cuDNN's own switches, which then inherit torch.backends.fp32_precision: a
        # script's "tf32" there would make convolutions TF32 and the getter above raise
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        if hasattr(torch.backends.cudnn, "rnn"):
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def cuda_backends_restored() -> Iterator[None]:
    """Every switch `configure_cuda_backends` writes is as it was after the block: the trainer's, for a process
    that outlives its run (a notebook that trains, then evaluates or trains again). After a GPU run its cuDNN
    autotuning stayed on, and convolutions stayed in IEEE float32 where torch's default is TF32."""
    switches = _every_per_backend_switch()
    per_backend = [switch.fp32_precision for switch in switches]
    matmul = _whole_process_matmul_precision()
    try:
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # a script mixed the two APIs: the per-backend values, put back below, are what counts
        cudnn_tf32 = None
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        _write_back(switches, per_backend)
        torch.backends.cudnn.benchmark = benchmark


def _whole_process_matmul_precision() -> str:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # a script mixed the two APIs: the per-backend values are what the kernels use
        return "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"


def _every_per_backend_switch() -> list:
    """torch >= 2.9's fp32_precision switches that `configure_cuda_backends` may change, the generic one (which
    the others left at "none" inherit) first."""
    if not has_precision_api():
        return []
    backends = torch.backends
    generic = [backends] if hasattr(backends, "fp32_precision") else []
    rnn = [backends.cudnn.rnn] if hasattr(backends.cudnn, "rnn") else []
    return [*generic, *_per_backend_matmul_switches(), backends.cudnn.conv, *rnn]


def has_precision_api() -> bool:
    """torch >= 2.9: per-backend `fp32_precision` switches ("ieee" / "tf32") replace `allow_tf32`."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full IEEE precision inside the block, whatever the process chose (TF32 for
    training): for work that compares a product's entries with values computed another way. Through the
    whole-process setter, for the reason `configure_cuda_backends` gives; afterwards every switch is as it
    was, the per-backend ones included (the whole-process getter does not see what they were set to)."""
    switches = _per_backend_matmul_switches()
    per_backend = [switch.fp32_precision for switch in switches]
    before = _whole_process_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        _write_back(switches, per_backend)


@contextlib.contextmanager
def _unset_cpu_matmul_precision_kept() -> Iterator[None]:
    """The whole-process setter also writes the CPU's (oneDNN) switch: TF32 for CUDA would make the host's
    float32 matmuls TF32 too where oneDNN can. A CPU switch unset ("none", the default) or at full precision
    ("ieee") is put back; a reduced one a script chose (bf16, tf32) is left as the setter wrote it, since it
    would not match CUDA's choice and the whole-process getter (which inductor reads) would raise."""
    switches = [switch for switch in _per_backend_matmul_switches() if switch is not torch.backends.cuda.matmul]
    kept = [(switch, switch.fp32_precision) for switch in switches if switch.fp32_precision in ("none", "ieee")]
    yield
    _write_back([switch for switch, _ in kept], [value for _, value in kept])


def _per_backend_matmul_switches() -> list:
    """torch >= 2.9's float32 matmul switches of CUDA and of the CPU (oneDNN): the whole-process setter writes
    both (torch 2.14: "high" makes CPU matmuls TF32 where oneDNN can, "medium" bf16)."""
    if not has_precision_api():
        return []
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return [torch.backends.cuda.matmul, *([mkldnn] if hasattr(mkldnn, "fp32_precision") else [])]


def _write_back(switches: list, values: list[str]) -> None:
    for switch, value in zip(switches, values):
        if switch.fp32_precision != value:  # written only where it changed: each write is a "new API" use
            switch.fp32_precision = value
