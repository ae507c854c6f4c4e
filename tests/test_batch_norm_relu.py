"""BatchNorm-ReLU outputs rebuilt in backward: not kept after the forward, and the same gradients bit for bit."""

import copy
import weakref

import pytest
import torch
from torch import nn

from clip.architectures import VisionConfig
from clip.batch_norm_relu import batch_norm_relu_into, can_rebuild_activations
from clip.modified_resnet import ModifiedResNet


def _rebuild_off():
    """The reference path: a caller's saved-tensor hooks (here identity ones) turn the rebuild off."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _layer(channels=6):
    torch.manual_seed(0)
    return nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, 5, 3, padding=1)


def _run_layer(rebuild, create_graph=False):
    bn, relu, conv = _layer()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    torch.manual_seed(1)
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    activations = []

    def consumer(activation):
        activations.append(weakref.ref(activation))
        return conv(activation)

    out = batch_norm_relu_into(x * 1.0, bn, relu, consumer, rebuild)
    kept = activations[0]() is not None
    loss = out.square().sum()
    parameters = [x, bn.weight, bn.bias, conv.weight]
    grads = torch.autograd.grad(loss, parameters, create_graph=create_graph)
    if create_graph:  # a gradient penalty: second-order terms through the rebuilt activation
        grads = torch.autograd.grad(sum(g.square().sum() for g in grads), parameters)
    return kept, out, grads, bn.running_mean


@pytest.mark.parametrize("create_graph", [False, True])
def test_rebuilt_activation_is_not_kept_and_gives_the_same_gradients(create_graph):
    kept, out, grads, running_mean = _run_layer(rebuild=True, create_graph=create_graph)
    plain_kept, plain_out, plain_grads, plain_running_mean = _run_layer(rebuild=False, create_graph=create_graph)
    assert plain_kept and not kept
    assert torch.equal(out, plain_out)
    assert torch.equal(running_mean, plain_running_mean)  # updated once, by the forward only
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        assert torch.equal(grad, plain_grad)


def _tiny_resnet():
    torch.manual_seed(0)
    config = VisionConfig(kind="resnet", image_size=64, width=16, layers=(2, 1, 2, 1), heads=4)
    model = ModifiedResNet(config, 32).train()
    for module in model.modules():  # away from the initial identity so that every branch carries gradient
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model


def _relu_outputs_alive(model, images):
    """The model's features, and how many of its ReLU outputs outlive the forward (kept for backward)."""
    outputs = []
    relu_forward = nn.ReLU.forward

    def recording_forward(relu, input):  # not a forward hook: those turn the rebuild off
        output = relu_forward(relu, input)
        outputs.append(weakref.ref(output))
        return output

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.ReLU, "forward", recording_forward)
        features = model(images)
    return features, sum(ref() is not None for ref in outputs), len(outputs)


def test_resnet_keeps_only_block_outputs_and_its_gradients_are_unchanged():
    model = _tiny_resnet()
    plain = copy.deepcopy(model)
    torch.manual_seed(2)
    images = torch.randn(3, 3, 64, 64)

    features, alive, relus = _relu_outputs_alive(model, images)
    # Blocks' last ReLUs stay (each output is the next block's input; the last block's goes into the attention
    # pool, which keeps only what it derives from it); the stem's three and each block's first two are rebuilt.
    blocks = 6
    assert relus == 3 + 3 * blocks and alive == blocks - 1

    with _rebuild_off():
        plain_features, plain_alive, _ = _relu_outputs_alive(plain, images)
    assert plain_alive == relus
    assert torch.equal(features, plain_features)

    features.square().sum().backward()
    plain_features.square().sum().backward()
    for (name, parameter), plain_parameter in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(parameter.grad, plain_parameter.grad), name
    for (name, buffer), plain_buffer in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(buffer, plain_buffer), name


def test_rebuild_only_in_eager_autograd_without_anyone_elses_hooks():
    model = _tiny_resnet()
    modules = list(model.children())
    assert can_rebuild_activations(modules)
    with torch.no_grad():
        assert not can_rebuild_activations(modules)
    with torch.autograd.graph.save_on_cpu():  # the caller's offloading applies, not bypassed by ours
        assert not can_rebuild_activations(modules)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):  # as torch.func's transforms do
        assert not can_rebuild_activations(modules)
    handle = model.bn2.register_forward_hook(lambda _module, _input, output: output * 2)
    assert not can_rebuild_activations(modules)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda _module, _input: None)
    assert not can_rebuild_activations(modules)
    handle.remove()
    assert can_rebuild_activations(modules)


def test_a_hook_that_changes_an_output_gives_the_gradients_of_what_it_computed():
    model, plain = _tiny_resnet(), _tiny_resnet()
    images = torch.randn(2, 3, 64, 64)
    for tower in (model, plain):
        tower.layer1[0].bn1.register_forward_hook(lambda _module, _input, output: output * 0.5)
    model(images).square().sum().backward()
    with _rebuild_off():
        plain(images).square().sum().backward()
    for (name, parameter), plain_parameter in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(parameter.grad, plain_parameter.grad), name


def test_torch_func_gradients_with_parameters_given_for_the_call():
    model = _tiny_resnet()
    images = torch.randn(2, 3, 64, 64)
    # Parameters other than the module's own, for this call only: the rebuild must use these.
    parameters = {name: (parameter * 1.1).detach().requires_grad_() for name, parameter in model.named_parameters()}

    def loss(parameters, buffers):  # training-mode BatchNorm updates the buffers: an input of the call
        return torch.func.functional_call(model, (parameters, buffers), (images,)).square().sum()

    def fresh_buffers():
        return {name: buffer.clone() for name, buffer in model.named_buffers()}

    loss(parameters, fresh_buffers()).backward()
    # Saved-tensor hooks are disabled inside torch.func's transforms: the plain path.
    func_grads = torch.func.grad(loss)(parameters, fresh_buffers())
    with _rebuild_off():
        plain_grads = torch.autograd.grad(loss(parameters, fresh_buffers()), list(parameters.values()))
    for (name, parameter), plain_grad in zip(parameters.items(), plain_grads, strict=True):
        assert torch.equal(parameter.grad, plain_grad), name
        assert torch.allclose(func_grads[name], plain_grad, rtol=1e-4, atol=1e-6), name


def test_sync_batch_norm_and_out_of_place_relu_are_left_as_they_are():
    bn, _, conv = _layer()
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    kept, outputs = [], []

    def consumer(activation):
        kept.append(weakref.ref(activation))
        return conv(activation)

    # SyncBatchNorm's statistics would span processes: never replayed locally.
    sync_bn = nn.SyncBatchNorm(6)
    sync_bn.forward = bn.forward  # no process group here: run as the local BatchNorm would
    outputs.append(batch_norm_relu_into(x, sync_bn, nn.ReLU(inplace=True), consumer, True))
    # An out-of-place ReLU's output is a new tensor: nothing is recognised, nothing changes.
    outputs.append(batch_norm_relu_into(x, bn, nn.ReLU(), consumer, True))
    # In eval mode BatchNorm normalises with its running statistics: left to autograd as well.
    outputs.append(batch_norm_relu_into(x, bn.eval(), nn.ReLU(inplace=True), consumer, True))
    assert len(kept) == 3 and all(ref() is not None for ref in kept)
