"""BatchNorm -> in-place ReLU whose output autograd does not keep: backward rebuilds it from BatchNorm's input.

In a ResNet's conv -> BatchNorm -> ReLU -> conv chain, autograd keeps two feature maps per layer: BatchNorm's
input (BatchNorm's backward reads it) and the ReLU's output (the ReLU's backward and the next layer's read it).
The second is a function of the first and BatchNorm's affine parameters. `batch_norm_relu_into` stores it as
a recipe instead, and backward rebuilds it, once, from the BatchNorm input that is kept anyway. RN50's image
tower at batch 16 keeps ~0.3 GiB less this way (fp32), for one BatchNorm forward per layer in backward, a few
per cent of a step that convolutions dominate.

The rebuild runs BatchNorm's own training-mode forward on the same input (batch statistics, no running-stat
update), so the rebuilt map is bitwise the one the forward produced wherever that kernel is deterministic (the
tests check it on the CPU); a formula from the saved mean and inverse deviation would differ in the last bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def can_rebuild_activations(module: nn.Module) -> bool:
    """Whether this forward of `module` (an image tower) may store BatchNorm-ReLU outputs as recipes.

    Only in eager training with gradients: torch.compile's partitioner makes its own recompute choices, and a
    caller's saved-tensor hooks (activation checkpointing or `save_on_cpu` around the model) would be bypassed
    by ours, which sit closer to the operations and so take precedence over theirs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not (module.training and torch.is_grad_enabled()):
        return False
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private, since 2.0
    return top_hooks is not None and top_hooks(False) is None


def batch_norm_relu_into(
    x: torch.Tensor, batch_norm: nn.Module, relu: nn.Module, consumer: Callable[[torch.Tensor], torch.Tensor],
    rebuild: bool,
) -> torch.Tensor:
    """`consumer(relu(batch_norm(x)))`; with `rebuild` (see `can_rebuild_activations`) the ReLU's output, which
    the ReLU and the consumer save for backward, is kept as a recipe and rebuilt from `x` in backward.

    Only an in-place `relu` saves anything this way (its output shares the BatchNorm output's memory, which is
    what a saved tensor is recognised by), and only a training-mode `nn.BatchNorm2d` is replayed (a
    SyncBatchNorm's statistics span processes). BatchNorm keeps its input's dtype under autocast on the CPU
    and CUDA, so the rebuild, which runs outside autocast in backward, gives the forward's dtype."""
    normalized = batch_norm(x)
    if not (rebuild and type(batch_norm) is nn.BatchNorm2d and batch_norm.training):
        return consumer(relu(normalized))
    recipe = _BatchNormReluRecipe(x, batch_norm)
    # Identified by address, shape and strides, not by the tensor: a hook that held `normalized` would keep
    # it alive. `normalized` is alive until this function returns, so no other tensor can take its address.
    key = (normalized.data_ptr(), normalized.shape, normalized.stride(), normalized.dtype)

    def pack(saved: torch.Tensor) -> torch.Tensor | _BatchNormReluRecipe:
        if (saved.data_ptr(), saved.shape, saved.stride(), saved.dtype) == key:
            return recipe
        return saved  # the consumer's weights, and anything else it saves

    def unpack(packed: torch.Tensor | _BatchNormReluRecipe) -> torch.Tensor:
        return packed.rebuilt() if packed is recipe else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return consumer(relu(normalized))


class _BatchNormReluRecipe:
    """relu(batch_norm(x)) in training mode, rebuilt on first use in backward and shared by the backward
    functions that read it (the ReLU's and the consumer's); freed with them."""

    __slots__ = ("batch_norm", "bn_input", "value")

    def __init__(self, bn_input: torch.Tensor, batch_norm: nn.BatchNorm2d) -> None:
        self.bn_input = bn_input  # BatchNorm's backward keeps it as well: no extra memory
        self.batch_norm = batch_norm
        self.value: torch.Tensor | None = None

    def rebuilt(self) -> torch.Tensor:
        if self.value is None:
            # Under the ambient grad mode: off in an ordinary backward, on with create_graph=True, where the
            # rebuild's own graph carries the second-order terms through BatchNorm.
            bn = self.batch_norm
            self.value = F.batch_norm(self.bn_input, None, None, bn.weight, bn.bias, True, 0.0, bn.eps).relu_()
        return self.value
