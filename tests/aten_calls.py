"""A record of the aten operators a computation runs (its backward pass included), for tests of what work
the model does rather than what it returns."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AtenCalls(TorchDispatchMode):
    """`with AtenCalls() as calls: ...`, then `calls.names` (every operator, e.g. "convolution") and
    `calls.new_tensor_sizes` (the element count of each tensor an operator wrote anew; views left out)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.new_tensor_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func.overloadpacket.__name__)
        if not func.is_view:
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.new_tensor_sizes.extend(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out
