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

A residual block's output, relu(BatchNorm(branch) + shortcut), is the next block's input, kept by its first
convolution. `ResidualReluRecipe` rebuilds it the same way, from the branch's BatchNorm input (kept) and the
shortcut: the block's input (kept, or itself a recipe: the rebuilds chain back to the stage's first block) or,
in a downsampling block, the BatchNorm of the shortcut convolution's output (kept). Autograd then keeps ~22 MB
less per RN50 sample at 224 pixels (fp32); the training step's measured peak fell less (on the CPU at one
thread: 0.11-0.19 GiB at batch 16, 0.4-0.5 GiB at batch 32), for ~2% more step time (the replays in backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn


def can_rebuild_activations(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward through `modules` (the convolutions, BatchNorms, ReLUs and pools of a ResNet block or
    stem) may store BatchNorm-ReLU outputs as recipes.

    Only in eager autograd with gradients on, and only where the rebuild is what the forward computed and our
    hooks displace nobody's:
    - not under torch.compile (its partitioner makes its own recompute choices) or jit tracing;
    - not where saved-tensor hooks are disabled (torch.func's grad, vjp and jacrev disable them; vmap does not,
      and `saved_as_recipe` keeps its batched tensors, which have no memory address to recognise, as they are),
      nor inside a caller's hooks (activation checkpointing or `save_on_cpu` around the model), which ours,
      sitting closer to the operations, would take precedence over;
    - not with forward hooks on these modules or global ones, nor with a `forward` replaced on one of them
      (`module.forward = ...`, as tools that wrap modules do): either may change an output that the rebuild
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
    return not any(
        module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module) for module in modules
    )


_GLOBAL_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def can_call_forward_directly(modules: Iterable[nn.Module]) -> bool:
    """Whether calling these modules' `forward` (or a method beside it) instead of the module itself skips
    nothing that `Module.__call__` would do: no forward or backward hooks, on them or global, no `forward`
    replaced on one of them, and no `Module.compile()`."""
    modules = list(modules)
    if not can_rebuild_activations(modules):
        return False
    if any(getattr(nn.modules.module, name, None) for name in _GLOBAL_BACKWARD_HOOKS):
        return False
    return not any(
        module._backward_hooks or module._backward_pre_hooks or getattr(module, "_compiled_call_impl", None)
        for module in modules
    )


_GLOBAL_BACKWARD_HOOKS = ("_global_backward_hooks", "_global_backward_pre_hooks")


def is_plain_relu(relu: nn.Module) -> bool:
    """Whether `relu` is `nn.ReLU` itself, what a rebuild applies: another activation put in its place (GELU,
    SiLU, ReLU6, a subclass) would be rebuilt as a ReLU, and its saved tensors (its input, for most) with it."""
    return type(relu) is nn.ReLU


def is_replayable(batch_norm: nn.Module) -> bool:
    """Whether backward may run this BatchNorm's forward again: a training-mode `nn.BatchNorm2d` (its batch
    statistics are the forward's; a SyncBatchNorm's span processes, an eval-mode one reads running statistics
    that the forward may have updated since)."""
    return type(batch_norm) is nn.BatchNorm2d and batch_norm.training


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
    if not (rebuild and is_replayable(batch_norm) and is_plain_relu(relu)):
        return consumer(relu(normalized))
    recipe = _BatchNormReluRecipe(BatchNormReplay(x, batch_norm))
    # `normalized` is alive until this function returns, so no other tensor can take its address.
    with saved_as_recipe(normalized, recipe, changed_in_place=1):  # the ReLU
        return consumer(relu(normalized))


Recipe = Union["_BatchNormReluRecipe", "ResidualReluRecipe"]


@contextmanager
def saved_as_recipe(tensor: torch.Tensor, recipe: Recipe | None, changed_in_place: int = 0) -> Iterator[None]:
    """Within the block, what autograd saves of `tensor` is kept as `recipe` (None: kept as it is).

    The tensor must outlive the block. It is recognised by address, shape, strides and dtype, not held: a
    hook that held it would keep it alive. In-place operations return the same tensor, so an in-place ReLU
    saving its output is recognised. `changed_in_place`: how many in-place operations make the value that the
    recipe rebuilds (1: the in-place ReLU that the block runs on `tensor`). A save of the tensor changed
    further (by a module put before a consumer, such as an inserted Dropout(inplace=True)) is kept as it is:
    the recipe would give back the value from before the change, and wrong gradients, where autograd without
    hooks would have raised."""
    if recipe is None or is_torch_func_wrapped(tensor):
        # (vmap's batched tensors have no memory of their own, hence no address: kept as they are)
        yield
        return
    key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
    version = tensor._version + changed_in_place

    def pack(saved: torch.Tensor) -> torch.Tensor | Recipe:
        if (saved.data_ptr(), saved.shape, saved.stride(), saved.dtype) == key and saved._version == version:
            return recipe
        return saved  # weights, and anything else the operations save

    def unpack(packed: torch.Tensor | Recipe) -> torch.Tensor:
        return packed.rebuilt() if packed is recipe else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def is_torch_func_wrapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is wrapped by a torch.func transform (vmap, grad), whose values and memory cannot be
    read. torch's check is private: where a release lacks it, this says no."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(tensor)) if check is not None else False


class BatchNormReplay:
    """A training-mode BatchNorm's forward on `bn_input`, to run again in backward: batch statistics, running
    statistics left alone. Not cached (see the recipes below, which are).

    The affine parameters are the ones the forward used (torch.func.functional_call, for one, swaps a
    module's parameters only for the call); BatchNorm's backward keeps the same tensors, and `bn_input` as well
    (where BatchNorm records one: else it stands in for the activation, which is as large)."""

    __slots__ = ("bias", "bn_input", "eps", "weight")

    def __init__(self, bn_input: torch.Tensor, batch_norm: nn.Module) -> None:
        self.bn_input = bn_input
        self.weight, self.bias, self.eps = batch_norm.weight, batch_norm.bias, batch_norm.eps

    def rebuilt(self) -> torch.Tensor:
        # Without a graph even under create_graph=True: autograd attaches what an unpack hook returns to the
        # saved tensor's original graph, which carries any second-order terms.
        with torch.no_grad():
            return F.batch_norm(self.bn_input, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _BatchNormReluRecipe:
    """relu(batch_norm(x)) in training mode, rebuilt on first use in backward and shared by the backward
    functions that read it (the ReLU's and the consumer's); freed with them."""

    __slots__ = ("batch_norm", "value")

    def __init__(self, batch_norm: BatchNormReplay) -> None:
        self.batch_norm = batch_norm
        self.value: torch.Tensor | None = None

    def rebuilt(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.batch_norm.rebuilt().relu_()
        return self.value


class ResidualReluRecipe:
    """relu(batch_norm(branch) + shortcut) in training mode, a residual block's output, rebuilt on first use in
    backward and shared by the backward functions that read it (the block's last ReLU's, the next block's first
    convolution's and shortcut pool's); freed with them.

    `branch` replays the branch's last BatchNorm. `shortcut` is what the forward added: a tensor that autograd
    keeps anyway (the block's input), the recipe of the block's input (rebuilt first, so a stage's outputs are
    rebuilt together, from its first block's, when the last one's is first needed), or the replay of a
    downsampling block's shortcut BatchNorm."""

    __slots__ = ("branch", "shortcut", "value")

    def __init__(
        self, branch: BatchNormReplay, shortcut: torch.Tensor | ResidualReluRecipe | BatchNormReplay,
    ) -> None:
        self.branch = branch
        self.shortcut: torch.Tensor | ResidualReluRecipe | BatchNormReplay | None = shortcut
        self.value: torch.Tensor | None = None

    def rebuilt(self) -> torch.Tensor:
        if self.value is None:
            shortcut = self.shortcut if isinstance(self.shortcut, torch.Tensor) else self.shortcut.rebuilt()
            value = self.branch.rebuilt()
            with torch.no_grad():  # the kept shortcut may require grad: no graph, as in BatchNormReplay
                value += shortcut  # the forward's order: the shortcut added to the BatchNorm output in place
                self.value = value.relu_()
            # The previous block's output stays with the backward functions that read it, not with this one.
            self.shortcut = None
        return self.value
