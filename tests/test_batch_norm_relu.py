"""BatchNorm-ReLU outputs rebuilt in backward: not kept after the forward, and the same gradients bit for bit."""

import copy
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip.architectures import VisionConfig
from clip.batch_norm_relu import batch_norm_relu_into, can_call_forward_directly, can_rebuild_activations
from clip.modified_resnet import Bottleneck, ModifiedResNet


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


def test_backward_replays_the_batch_norm_once_for_both_of_its_readers(monkeypatch):
    # The ReLU's backward and the consumer's both read the rebuilt activation: one replay between them, not
    # one each (a BatchNorm forward per reader in every step's backward)
    import clip.batch_norm_relu

    replays = []
    batch_norm = clip.batch_norm_relu.F.batch_norm

    def counting_batch_norm(*arguments, **keywords):
        replays.append(1)
        return batch_norm(*arguments, **keywords)

    bn, relu, conv = _layer()
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    out = batch_norm_relu_into(x * 1.0, bn, relu, conv, True)
    monkeypatch.setattr(clip.batch_norm_relu.F, "batch_norm", counting_batch_norm)
    out.sum().backward()
    assert len(replays) == 1


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


def test_resnet_keeps_no_relu_output_and_its_gradients_are_unchanged():
    model = _tiny_resnet()
    plain = copy.deepcopy(model)
    torch.manual_seed(2)
    images = torch.randn(3, 3, 64, 64)

    features, alive, relus = _relu_outputs_alive(model, images)
    # The stem's three and each block's three are rebuilt: the blocks' outputs, the next blocks' inputs, in
    # chains from each stage's first block (the last block's goes into the attention pool, which keeps only
    # what it derives from it).
    blocks = 6
    assert relus == 3 + 3 * blocks and alive == 0

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


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of the attention pool's kernel
def test_vmap_over_a_training_resnet_gives_the_gradients_of_the_plain_path():
    # torch.func's way to run training-mode BatchNorm under vmap (model ensembles, several batches at once):
    # vmap's batched tensors have no memory address, which recognising a save by address read ("Cannot access
    # data pointer of Tensor that doesn't have storage")
    model = _tiny_resnet()
    torch.func.replace_all_batch_norm_modules_(model)  # batch statistics only, no running ones to update
    plain = copy.deepcopy(model)
    batches = torch.randn(2, 2, 3, 64, 64)  # two batches of two images, each normalised by its own statistics
    features = torch.func.vmap(model)(batches)
    with _rebuild_off():
        plain_features = torch.func.vmap(plain)(batches)
    assert torch.equal(features, plain_features)
    torch.testing.assert_close(features, torch.stack([model(batch) for batch in batches]), rtol=1e-4, atol=1e-5)
    features.square().sum().backward()
    plain_features.square().sum().backward()
    for (name, parameter), plain_parameter in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(parameter.grad, plain_parameter.grad), name


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


def _gradients_match_the_plain_path(model, images, create_graph=False):
    """The model's features and parameter gradients equal, bit for bit, those of a copy run with the rebuild
    off; the number of ReLU outputs alive after the forward."""
    plain = copy.deepcopy(model)
    features, alive, _ = _relu_outputs_alive(model, images)
    with _rebuild_off():
        plain_features, _, _ = _relu_outputs_alive(plain, images)
    assert torch.equal(features, plain_features)
    for tower, output in ((model, features), (plain, plain_features)):
        loss = output.square().sum()
        if create_graph:  # a gradient penalty: second-order terms through the rebuilt activations
            grads = torch.autograd.grad(loss, list(tower.parameters()), create_graph=True)
            loss = sum(grad.square().sum() for grad in grads)
        loss.backward()
    for (name, parameter), plain_parameter in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(parameter.grad, plain_parameter.grad), name
    return alive


def test_block_outputs_rebuilt_in_chains_with_second_order_gradients():
    images = torch.randn(2, 3, 64, 64)
    # The attention pool's CPU flash-attention kernel has no second derivative; the math one has.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert _gradients_match_the_plain_path(_tiny_resnet(), images, create_graph=True) == 0


def test_a_block_whose_batch_norm_cannot_be_replayed_keeps_its_output_and_breaks_the_chain():
    images = torch.randn(2, 3, 64, 64)
    model = _tiny_resnet()
    model.layer1[1].bn3.eval()  # frozen: normalises with running statistics
    model.layer3[0].downsample[2].eval()  # the shortcut's BatchNorm of a downsampling block
    # layer1[1]'s output (kept by layer2[0]) and layer3[0]'s (kept by layer3[1]) stay; layer3[1]'s is the
    # tower's last, never kept; the stem's other ReLU outputs and all first and second ReLUs are rebuilt.
    assert _gradients_match_the_plain_path(model, images) == 2


@pytest.mark.parametrize("hooked", ["stage", "block", "block backward", "block backward pre", "global forward"])
def test_blocks_are_called_as_modules_where_calling_forward_would_skip_a_hook(hooked):
    images = torch.randn(2, 3, 64, 64)
    model = _tiny_resnet()
    calls = []
    if hooked == "stage":
        handle = model.layer2.register_forward_hook(lambda _module, _input, _output: calls.append(1))
    elif hooked == "block":
        handle = model.layer3[1].register_forward_pre_hook(lambda _module, _input: calls.append(1))
    elif hooked == "block backward":
        handle = model.layer1[0].register_full_backward_hook(lambda _module, _grad_in, _grad_out: calls.append(1))
    elif hooked == "block backward pre":
        handle = model.layer2[0].register_full_backward_pre_hook(lambda _module, _grad_out: calls.append(1))
    else:  # (a global full backward hook would fail at the in-place ReLUs, as in any model that has them)
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, _input, _output: calls.append(1) if module is model.layer4[0] else None)
    try:
        assert not can_call_forward_directly(module for stage in _stages(model) for module in stage.modules())
        # Blocks' outputs are kept again, except the last (the attention pool does not keep it); a global hook
        # turns every rebuild off.
        rebuilt_elsewhere = 0 if hooked == "global forward" else 3 + 2 * 6
        assert _gradients_match_the_plain_path(model, images) == 3 + 3 * 6 - 1 - rebuilt_elsewhere
        assert calls
    finally:
        handle.remove()
    assert can_call_forward_directly(module for stage in _stages(model) for module in stage.modules())


def test_a_compiled_block_is_called_as_a_module():
    model = _tiny_resnet()
    assert can_call_forward_directly(model.layer2.modules())
    model.layer2[0].compile()  # compiles on its first call, which would be skipped
    assert not can_call_forward_directly(model.layer2.modules())


def _stages(model):
    return model.layer1, model.layer2, model.layer3, model.layer4


@pytest.mark.parametrize("replaced", ["batch norm", "block", "stage"])
def test_a_forward_replaced_on_a_module_runs_and_gives_the_gradients_of_what_it_computed(replaced):
    # Tools that wrap modules set `module.forward` on the instance: a BatchNorm's was rebuilt without it (wrong
    # gradients, no error), and a block's or a stage's was skipped for the blocks' own work
    model, plain = _tiny_resnet(), _tiny_resnet()
    calls = []
    for tower in (model, plain):
        module = {"batch norm": tower.layer1[0].bn1, "block": tower.layer2[0], "stage": tower.layer3}[replaced]

        def halved(x, forward=module.forward):
            calls.append(1)
            return forward(x) * 0.5

        module.forward = halved
    images = torch.randn(2, 3, 64, 64)
    model(images).square().sum().backward()
    with _rebuild_off():
        plain(images).square().sum().backward()
    assert len(calls) == 2
    for (name, parameter), plain_parameter in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(parameter.grad, plain_parameter.grad), name


class _Doubling(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2) if self.inplace else x * 2


@pytest.mark.parametrize("where", ["a block's conv2", "the next block's conv1"])
def test_a_rebuilt_output_changed_in_place_by_an_inserted_module_is_kept_as_changed(where):
    # A module put before a consumer that changes its input in place (Dropout(inplace=True), here a doubling):
    # the consumer saved the changed tensor, which was recognised by its address and rebuilt as it was before
    # the change, so the consumer's weight gradient was silently wrong (autograd without hooks would raise)
    torch.manual_seed(0)
    model = _tiny_resnet()
    reference = copy.deepcopy(model)
    for tower, inplace in ((model, True), (reference, False)):
        block = tower.layer1[0] if where == "a block's conv2" else tower.layer2[0]
        name = "conv2" if where == "a block's conv2" else "conv1"
        setattr(block, name, nn.Sequential(_Doubling(inplace), getattr(block, name)))
    images = torch.randn(2, 3, 64, 64)
    model(images).square().sum().backward()
    reference(images).square().sum().backward()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_block_forward_replaced_on_the_class_runs(monkeypatch):
    model = _tiny_resnet()
    forward, calls = Bottleneck.forward, []

    def recording_forward(block, x):
        calls.append(block)
        return forward(block, x)

    monkeypatch.setattr(Bottleneck, "forward", recording_forward)
    model(torch.randn(2, 3, 64, 64))
    assert len(calls) == 6


def test_a_replaced_stage_runs_as_it_is():
    model = _tiny_resnet()

    class Wrapped(nn.Module):  # a stage in a wrapper of the user's: a module, not a sequence of blocks
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            return self.stage(x)

    model.layer2 = Wrapped(model.layer2)
    images = torch.randn(2, 3, 64, 64)
    features = model(images)
    with _rebuild_off():
        assert torch.equal(model(images), features)


def test_a_subclassed_block_runs_its_own_forward():
    model = _tiny_resnet()

    class Scaled(type(model.layer3[1])):
        def forward(self, x):
            return super().forward(x) * 0.5

    model.layer3[1].__class__ = Scaled
    images = torch.randn(2, 3, 64, 64)
    with _rebuild_off():  # blocks called as modules
        expected = model(images)
    assert torch.equal(model(images), expected)


class _CappedReLU(nn.ReLU):
    """A ReLU subclass of the user's that caps its output too: not the ReLU a rebuild would apply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, 0.0, 0.5, inplace=self.inplace)


@pytest.mark.parametrize("activation", ["GELU", "ReLU6 in place", "SiLU in place", "ReLU subclass in place"])
def test_an_activation_put_in_a_relus_place_is_kept_not_rebuilt_as_a_relu(activation):
    model = _tiny_resnet()
    make = {"GELU": nn.GELU, "ReLU6 in place": lambda: nn.ReLU6(inplace=True),
            "SiLU in place": lambda: nn.SiLU(inplace=True),
            "ReLU subclass in place": lambda: _CappedReLU(inplace=True)}[activation]
    for block in model.layer1:  # a block's output into the next block, and a BatchNorm's into a convolution
        block.relu1, block.relu3 = make(), make()
    _gradients_match_the_plain_path(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("replaced", ["regrouped", "own module"])
def test_a_downsample_put_in_its_place_runs_as_it_is(replaced):
    model = _tiny_resnet()
    pool, conv, batch_norm = model.layer2[0].downsample
    if replaced == "regrouped":
        model.layer2[0].downsample = nn.Sequential(pool, nn.Sequential(conv, batch_norm))
    else:
        class Shortcut(nn.Module):
            def __init__(self):
                super().__init__()
                self.pool, self.conv, self.bn = pool, conv, batch_norm

            def forward(self, x):
                return self.bn(self.conv(self.pool(x)))

        model.layer2[0].downsample = Shortcut()
    # layer2[0]'s output is kept (its shortcut is not replayed); the rest are rebuilt as before
    assert _gradients_match_the_plain_path(model, torch.randn(2, 3, 64, 64)) == 1


def test_a_frozen_stage_below_trained_ones_hands_on_no_recipe():
    model = _tiny_resnet()  # BatchNorms in training mode, as model.lock leaves them outside the trainer
    for module in (model.conv1, model.bn1, model.conv2, model.bn2, model.conv3, model.bn3, model.layer1,
                   model.layer2, model.layer3):
        module.requires_grad_(False)
    frozen = {id(module) for stage in (model.layer1, model.layer2, model.layer3) for module in stage.modules()}
    outputs = []
    conv_forward = nn.Conv2d.forward

    def recording_forward(conv, input):
        output = conv_forward(conv, input)
        if id(conv) in frozen:
            outputs.append(weakref.ref(output))
        return output

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.Conv2d, "forward", recording_forward)
        features = model(torch.randn(2, 3, 64, 64))
    # Without a graph the frozen stages' BatchNorms keep nothing: layer3's output is kept by layer4 as it is,
    # not as a recipe that would keep layer3's BatchNorm inputs (its convolutions' outputs) alive.
    assert outputs and not any(ref() is not None for ref in outputs)
    features.square().sum().backward()


class _HalvedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward does more than BatchNorm: a replay would leave that out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


def test_a_batch_norm_subclass_is_kept_not_replayed_as_a_batch_norm():
    model = _tiny_resnet()
    block = model.layer1[1]  # its bn1 feeds conv2, its bn3 the block's output (the next block's input)
    for name in ("bn1", "bn3"):
        replaced = _HalvedBatchNorm(getattr(block, name).num_features)
        replaced.load_state_dict(getattr(block, name).state_dict())
        setattr(block, name, replaced)
    # the two BatchNorms' ReLU outputs are kept; the rest are rebuilt as before
    assert _gradients_match_the_plain_path(model, torch.randn(2, 3, 64, 64)) == 2


def test_the_rebuild_normalises_with_the_batch_norms_own_eps():
    model = _tiny_resnet()
    for module in model.modules():  # a large eps, so that another one changes the activations
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.5
    assert _gradients_match_the_plain_path(model, torch.randn(2, 3, 64, 64)) == 0


def test_no_rebuild_while_torch_compile_or_jit_trace_records_the_model(monkeypatch):
    model = _tiny_resnet()
    modules = list(model.children())
    images = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, (images,), check_trace=False)
    # The rebuild's hooks compare saved tensors' shapes and versions in Python: recorded by a trace, they said
    # the trace might be incorrect ("Converting a tensor to a Python boolean"), once per saved tensor
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "batch_norm_relu" in w.filename]
    assert not ours, ours[0].message
    # torch.compile's partitioner makes its own recompute choices (and Dynamo breaks its graph on the hooks)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not can_rebuild_activations(modules)
