"""Which device names the library computes on, checked by name before anything is placed there.

clip.load, a training config's train.device and the evaluation commands' --device share this check, so each
refuses the same names in one line instead of failing later: a name torch cannot parse ("gpu") raised
torch's RuntimeError; "meta" (shapes without data) failed in the first step or batch with a traceback; and
an index on the CPU ("cpu:1") was taken silently for "cpu", as torch has one CPU device, so the index promised
a choice of processor that nothing made. Whether the machine has the device is its callers' question: a
config may be written on another machine than the one it runs on.
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
