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

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def can_rebuild_activations(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward through `modules` (the convolutions, BatchNorms, ReLUs and pools of a ResNet block or
    stem) may store BatchNorm-ReLU outputs as recipes.

    Only in eager autograd with gradients on, and only where the rebuild is what the forward computed and our
    hooks displace nobody's:
    - not under torch.compile (its partitioner makes its own recompute choices) or jit tracing;
    - not where saved-tensor hooks are disabled (torch.func's transforms disable them: their tensors have no
      memory address to recognise), nor inside a caller's hooks (activation checkpointing or `save_on_cpu`
      around the model), which ours, sitting closer to the operations, would take precedence over;
    - not with forward hooks on these modules or global ones: a hook may change an output that the rebuild
      would not change (and with a saved tensor's hooks, autograd skips the in-place-modification check).
    Reading the caller's hooks needs torch's private `_top_saved_tensors_default_hooks` (torch 2.13 and 2.14
    have it; older releases may not, and then keep the activations as before)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not torch.is_grad_enabled():
        return False
    autograd = torch._C._autograd
    top_hooks = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    disabled_message = getattr(autograd, "_saved_tensors_hooks_get_disabled_error_message", None)
    if top_hooks is None or disabled_message is None or disabled_message() is not None or top_hooks(False):
        return False
    if any(getattr(nn.modules.module, name, None) for name in _GLOBAL_FORWARD_HOOKS):
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks for module in modules)


_GLOBAL_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


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
    recipe = _BatchNormReluRecipe(x, batch_norm.weight, batch_norm.bias, batch_norm.eps)
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
    functions that read it (the ReLU's and the consumer's); freed with them.

    The affine parameters are the ones the forward used (torch.func.functional_call, for one, swaps a
    module's parameters only for the call); BatchNorm's backward keeps the same tensors."""

    __slots__ = ("bias", "bn_input", "eps", "value", "weight")

    def __init__(
        self, bn_input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    ) -> None:
        # BatchNorm's backward keeps it as well (where BatchNorm records one: else it stands in for the
        # activation, which is as large)
        self.bn_input = bn_input
        self.weight, self.bias, self.eps = weight, bias, eps
        self.value: torch.Tensor | None = None

    def rebuilt(self) -> torch.Tensor:
        if self.value is None:
            # Without a graph even under create_graph=True: autograd attaches what an unpack hook returns to
            # the saved tensor's original graph (the ReLU's), which carries any second-order terms.
            with torch.no_grad():
                value = F.batch_norm(self.bn_input, None, None, self.weight, self.bias, True, 0.0, self.eps)
                self.value = value.relu_()
        return self.value
