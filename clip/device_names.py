"""Which device names the library computes on, checked by name before anything is placed there.

clip.load, a training config's train.device and the evaluation commands' --device share this check, so each
refuses the same names in one line instead of failing later: a name torch cannot parse ("gpu") raised
torch's RuntimeError; "meta" (shapes without data) failed in the first step or batch with a traceback; and
an index on the CPU ("cpu:1") was taken silently for "cpu", as torch has one CPU device, so the index promised
a choice of processor that nothing made.

Whether this machine has the device is a second check (`available_device`), for the callers that compute here
and now: clip.load and the evaluation commands. clip.load(device="cuda") without a GPU read the file and built
the model (after a download, for a released name) before torch's "Found no NVIDIA driver on your system" came
from the first tensor moved there. A training config is only checked by name here: it may be written on another
machine than the one it runs on, and each rank checks its own device when the run starts (`clip.distributed`):
with `device_availability_problem` for kinds other than CUDA, whose GPU it picks by the rank's LOCAL_RANK.
"""

from __future__ import annotations

import torch


def device_name_problem(name: str | torch.device) -> str | None:
    """Why `name` is no device to compute on, as a phrase that follows it ("'gpu' is not a torch device"), or
    None when it is one."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return "is not a torch device"
    if device.type == "meta":
        return "holds no data to compute with"
    if device.type == "cpu" and device.index not in (None, 0):
        return "names no device of its own: torch has one CPU device, 'cpu', which uses all the cores it is given"
    return None


def parse_device(name: str | torch.device, accepted: str) -> torch.device:
    """torch.device(name), or a one-line ValueError saying why not and what is `accepted` (the caller's
    spelling of its choices, such as "'auto', 'cpu', 'cuda' or 'cuda:N'")."""
    problem = device_name_problem(name)
    if problem is not None:
        raise ValueError(f"device {str(name)!r} {problem}; use {accepted}")
    return torch.device(name)


class DeviceNotAvailableError(ValueError, RuntimeError):
    """A device named as torch names them that this machine does not have (clip.load(device="cuda") without a
    GPU). A ValueError, as the other device errors here are; a RuntimeError, as torch's own error from the first
    tensor moved there was, which code around clip.load may catch."""


def available_device(name: str | torch.device, accepted: str) -> torch.device:
    """`parse_device(name, accepted)`, and a one-line DeviceNotAvailableError where this machine lacks that
    device, saying what it has."""
    device = parse_device(name, accepted)
    problem = device_availability_problem(device)
    if problem is not None:
        raise DeviceNotAvailableError(
            f"device {str(name)!r} is not available: {problem}; devices here: {', '.join(devices_here())}"
        )
    return device


def device_availability_problem(device: torch.device) -> str | None:
    """Why this machine cannot compute on `device`, as a clause ("CUDA is not available on this machine ..."), or
    None where it can, or where torch gives no way to ask: a kind that a plugin adds without an `is_available`
    (torch_xla's "xla") is left to the plugin, which would be refused here while it works."""
    if device.type == "cpu":
        return None
    available = device_kind_available(device.type)
    if available is None:
        return None
    if not available:
        if device.type == "cuda":  # torch's own words for it, which the user may search for
            return "CUDA is not available on this machine (torch.cuda.is_available() is False)"
        return f"this machine has no {device.type} device"
    count = _device_count(device.type)
    if device.index is not None and count is not None and device.index >= count:
        # "this process": CUDA_VISIBLE_DEVICES (or SLURM's binding) may hide the machine's other GPUs
        kind = "CUDA" if device.type == "cuda" else device.type
        return f"this process sees {count} {kind} device(s), numbered from 0"
    return None


def devices_here() -> list[str]:
    """The devices this process can compute on, as names to pass: 'cpu', then each GPU ('cuda:0', 'cuda:1') or
    the one device of a kind ('mps')."""
    names = ["'cpu'"]
    for kind in ("cuda", "xpu", "mps"):
        if not device_kind_available(kind):
            continue
        count = _device_count(kind) or 1
        if count == 1:
            names.append(f"'{kind}'")
        elif count == 2:
            names.append(f"'{kind}:0', '{kind}:1'")
        else:
            names.append(f"'{kind}:0' to '{kind}:{count - 1}'")
    return names


def device_kind_available(kind: str) -> bool | None:
    """Whether tensors can be placed on devices of this kind here; None where torch has no way to ask (a kind a
    plugin adds, such as torch_xla's "xla"). Training asks it too (`clip.distributed`), and refuses the None."""
    if kind == "mps":  # torch.mps.is_available is recent; torch.backends.mps's is in every supported torch
        return torch.backends.mps.is_available()
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    return bool(is_available()) if callable(is_available) else None


def _device_count(kind: str) -> int | None:
    """How many devices of an available kind this process sees; None where torch does not say."""
    device_count = getattr(getattr(torch, kind, None), "device_count", None)
    return int(device_count()) if callable(device_count) else None
