"""The model itself: shapes, the paper's initialisation, text trimming, gradient checkpointing."""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import clip.model as model_module
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.model import CLIP

TINY = {
    "vit": ModelConfig(
        embed_dim=24,
        vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=20, vocab_size=50, width=32, layers=2, heads=2),
    ),
    "resnet": ModelConfig(
        embed_dim=24,
        vision=VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=4),
        text=TextConfig(context_length=20, vocab_size=50, width=32, layers=2, heads=2),
    ),
}


def texts_with_lengths(lengths: list[int], context: int = 20, eot: int = 49) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, : length - 1] = torch.randint(1, eot, (length - 1,), generator=generator)
        tokens[row, length - 1] = eot
    return tokens


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_forward_shapes_and_logits(kind):
    torch.manual_seed(0)
    model = CLIP(TINY[kind]).eval()
    size = TINY[kind].vision.image_size
    images, texts = torch.randn(3, 3, size, size), texts_with_lengths([4, 9, 20])
    logits_per_image, logits_per_text = model(images, texts)
    assert logits_per_image.shape == (3, 3) and torch.equal(logits_per_text, logits_per_image.t())
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(texts, normalize=True)
    torch.testing.assert_close(logits_per_image, math.exp(model.logit_scale.item()) * image @ text.t())
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_text_features_ignore_positions_after_end_of_text():
    # Trimming to the batch's longest caption must give exactly what the full context gives.
    torch.manual_seed(0)
    model = CLIP(TINY["vit"]).eval()
    texts = texts_with_lengths([3, 5, 11])
    trimmed = model.encode_text(texts)
    padded = texts.clone()
    padded[:, 12:] = 7  # garbage after every end-of-text token
    original = model_module.TEXT_LENGTH_MULTIPLE
    try:
        model_module.TEXT_LENGTH_MULTIPLE = 20  # no trimming: the full context
        full = model.encode_text(padded)
    finally:
        model_module.TEXT_LENGTH_MULTIPLE = original
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
    # and one row's features do not depend on the other rows' lengths
    torch.testing.assert_close(model.encode_text(texts[:1]), trimmed[:1], rtol=1e-5, atol=1e-6)


def test_trimming_on_the_host_gives_the_same_features():
    torch.manual_seed(0)
    model = CLIP(TINY["vit"]).eval()
    texts = texts_with_lengths([3, 5, 11])
    cut = model_module.trim_text_batch(texts)
    assert cut.shape[-1] == 16  # the last end-of-text token at 10, rounded up to a multiple of 8
    torch.testing.assert_close(model.encode_text(cut, trim=False), model.encode_text(texts), rtol=0, atol=0)
    assert model.encode_text(texts, trim=False).shape == (3, model.config.embed_dim)  # all 20 positions run


def test_over_long_text_is_a_clear_error_and_padding_past_the_context_is_dropped():
    model = CLIP(TINY["vit"]).eval()
    texts = torch.zeros(2, 77, dtype=torch.long)  # clip.tokenize's default length, for a context of 20
    texts[0, :4] = torch.tensor([47, 3, 5, 49])
    texts[1, :20] = torch.arange(1, 21) % 49
    texts[1, 19] = 49  # its end token in the context's last position
    with torch.no_grad():
        assert torch.equal(model.encode_text(texts), model.encode_text(texts[:, :20]))
    texts[1, 20] = 7  # a token past the context: the text does not fit
    # The text's own length (21: up to that token), not the tensor's 77 positions of width
    with pytest.raises(ValueError, match=r"text has 21 tokens, more than this model's context length 20: tokenize "
                                         r"with clip.tokenize\(texts, context_length=model.context_length\)"):
        model.encode_text(texts)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_images_of_another_size_are_a_clear_error(kind):
    # They failed on the positional embedding: "The size of tensor a (785) must match ... (37)".
    model = CLIP(TINY[kind]).eval()
    size = model.visual.input_resolution
    for shape in [(1, 3, size * 2, size * 2), (1, 3, size, size + 32), (1, 3, size // 2, size // 2)]:
        with pytest.raises(ValueError, match=rf"this model takes \[N, 3, {size}, {size}\] "
                                             rf"\(model.visual.input_resolution = {size}\): resize them"):
            model.encode_image(torch.randn(shape))
        with pytest.raises(ValueError, match="resize them"):
            model.encode_image_unprojected(torch.randn(shape))
    # A size that gives the same grid of positions runs, as in openai/CLIP (the convolutions drop the rest)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, size + 5, size + 5)).shape == (1, TINY[kind].embed_dim)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_integer_pixels_are_a_clear_error(kind):
    # torchvision.io.read_image's uint8 [3, H, W] pixels, batched and resized: they were cast to float and run as
    # values up to 255, neither scaled nor normalised, giving features of nothing the model was trained on
    model = CLIP(TINY[kind]).eval()
    size = model.visual.input_resolution
    for encode in (model.encode_image, model.encode_image_unprojected):
        with pytest.raises(TypeError, match=r"images of dtype torch.uint8; this model takes float images.*preprocess"):
            encode(torch.zeros(1, 3, size, size, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_an_image_or_a_text_without_its_batch_dimension_is_a_clear_error(kind):
    # preprocess(image) without .unsqueeze(0): the ViT blamed its size ("resize them"), the ResNet failed in
    # BatchNorm; a row of clip.tokenize's output failed with "too many indices for tensor of dimension 1".
    model = CLIP(TINY[kind]).eval()
    size = model.visual.input_resolution
    for encode in (model.encode_image, model.encode_image_unprojected):
        with pytest.raises(ValueError, match=rf"images of shape \(3, {size}, {size}\); this model takes a batch "
                                             rf"\[N, 3, {size}, {size}\]: for one image, add the batch dimension"):
            encode(torch.randn(3, size, size))
    with pytest.raises(ValueError, match=rf"images of shape \(2, 2, 3, {size}, {size}\); this model takes a batch "
                                         rf"\[N, 3, {size}, {size}\]$"):
        model.encode_image(torch.randn(2, 2, 3, size, size))
    # A 2-D tensor (one grey image without its channels) is not helped by the batch dimension: no such hint
    with pytest.raises(ValueError, match=rf"images of shape \({size}, {size}\); this model takes a batch "
                                         rf"\[N, 3, {size}, {size}\]$"):
        model.encode_image(torch.randn(size, size))
    texts = texts_with_lengths([3, 5])
    for text in (texts[0], texts[None]):
        with pytest.raises(ValueError, match=rf"text of shape {re.escape(str(tuple(text.shape)))}; this model takes "
                                             r"token ids \[N, L\], as clip.tokenize returns them"):
            model.encode_text(text)
    with torch.no_grad():  # the batch as it should be runs
        assert model(torch.randn(1, 3, size, size), texts[:1])[0].shape == (1, 1)


def test_text_features_under_vmap_and_per_sample_gradients():
    # torch.func's vmap cannot read a batched tensor's values: the trimming's longest caption (an .item())
    # raised there, where openai/CLIP's encode_text runs; the texts keep their length instead.
    torch.manual_seed(0)
    model = CLIP(TINY["vit"]).eval()
    texts = texts_with_lengths([3, 5, 11])
    per_text = torch.func.vmap(lambda text: model.encode_text(text.unsqueeze(0)).squeeze(0))(texts)
    torch.testing.assert_close(per_text, model.encode_text(texts), rtol=1e-5, atol=1e-6)

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model

        def forward(self, text):
            return self.clip.encode_text(text)

    def text_loss(parameters, text):  # one text's loss, for per-sample gradients
        return torch.func.functional_call(TextTower(), parameters, (text.unsqueeze(0),)).square().sum()

    parameters = {f"clip.{name}": p.detach() for name, p in model.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(text_loss), in_dims=(None, 0))(parameters, texts)
    model.encode_text(texts[1:2]).square().sum().backward()
    torch.testing.assert_close(per_sample["clip.text_projection"][1], model.text_projection.grad, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = CLIP(TINY["vit"]).train()
        model.set_grad_checkpointing(checkpointing)
        images, texts = torch.randn(2, 3, 32, 32), texts_with_lengths([6, 8])
        logits, _ = model(images, texts)
        logits.sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = CLIP(TINY["resnet"])
    for stage in (model.visual.layer1, model.visual.layer4):
        assert torch.count_nonzero(stage[0].bn3.weight) == 0  # residual branches start as the identity
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.2)
    width, layers = 32, 2
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    out_proj = torch.cat([b.attn.out_proj.weight.flatten() for b in model.transformer.resblocks])
    assert out_proj.std().item() == pytest.approx(proj_std, rel=0.1)
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.resblocks])
    assert c_fc.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.1)
    # A ViT's class and position embeddings and its projection: N(0, width**-0.5)
    visual = CLIP(TINY["vit"]).visual
    embeddings = torch.cat([visual.class_embedding, visual.positional_embedding.flatten(), visual.proj.flatten()])
    assert embeddings.std().item() == pytest.approx(32**-0.5, rel=0.1)


def test_resnet_attention_pool_initialisation():
    # openai/CLIP's: the pool's projections and position embedding N(0, width**-0.5) at the pool's own width
    # (the last stage's channels, not the output's), biases zero
    torch.manual_seed(0)
    pool = CLIP(TINY["resnet"]).visual.attnpool
    width = pool.c_proj.in_features
    assert width != pool.c_proj.out_features
    for name, tensor in [("positional_embedding", pool.positional_embedding), ("q_proj", pool.q_proj.weight),
                         ("k_proj", pool.k_proj.weight), ("v_proj", pool.v_proj.weight), ("c_proj", pool.c_proj.weight)]:
        assert tensor.std().item() == pytest.approx(width**-0.5, rel=0.1), name
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        assert torch.count_nonzero(linear.bias) == 0


def test_fp16_weights_run_through_float32_layer_norms():
    torch.manual_seed(0)
    model = CLIP(TINY["vit"]).eval()
    texts = texts_with_lengths([5])
    reference = model.encode_text(texts)
    half = CLIP(TINY["vit"]).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)  # CPU matmuls support bfloat16; the same code path as float16 on a GPU
    assert half.dtype == torch.bfloat16
    out = half.encode_text(texts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_folded_quick_gelu_mlp_is_the_written_form_with_the_same_gradients():
    from torch import nn

    from clip.transformer import quick_gelu_mlp

    torch.manual_seed(0)
    c_fc, c_proj = nn.Linear(16, 64).double(), nn.Linear(64, 16).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    parameters = [x, c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias]
    grad_output = torch.randn(3, 7, 16, dtype=torch.float64)

    hidden = c_fc(x)
    written = c_proj(hidden * torch.sigmoid(1.702 * hidden))  # OpenAI's QuickGELU as written
    written_grads = torch.autograd.grad(written, parameters, grad_output)
    folded = quick_gelu_mlp(x, c_fc, c_proj)
    folded_grads = torch.autograd.grad(folded, parameters, grad_output)
    torch.testing.assert_close(folded, written, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(folded_grads, written_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("replaced", ["c_fc", "gelu", "mlp", "QuickGELU's class"])
def test_a_forward_replaced_in_the_mlp_runs_rather_than_being_folded_away(replaced, monkeypatch):
    # Tools that wrap modules set `module.forward` on the instance: the folded MLP (eval mode) computed c_fc,
    # QuickGELU and c_proj as one formula and skipped it
    from clip.transformer import QuickGELU, ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 2, activation="quick_gelu").eval()
    x = torch.randn(5, 2, 32)  # L, N, D
    expected = block(x)
    calls = []
    if replaced == "QuickGELU's class":
        forward = QuickGELU.forward
        monkeypatch.setattr(QuickGELU, "forward", lambda module, x: calls.append(1) or forward(module, x))
    else:
        module = {"c_fc": block.mlp.c_fc, "gelu": block.mlp.gelu, "mlp": block.mlp}[replaced]
        module.forward = lambda x, forward=module.forward: calls.append(1) or forward(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_a_folded_mlp_without_biases_runs():
    # A c_fc whose bias was removed (bias = None) made the fold multiply None by QuickGELU's constant
    from clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 2, activation="quick_gelu").eval()
    block.mlp.c_fc.bias = None
    block.mlp.c_proj.bias = None
    x = torch.randn(5, 2, 32)  # L, N, D
    with torch.no_grad():
        residual = x + block.attention(block.ln_1(x))
        hidden = block.mlp.c_fc(block.ln_2(residual))
        expected = residual + block.mlp.c_proj(hidden * torch.sigmoid(1.702 * hidden))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_blocks_fold_quick_gelu_where_it_keeps_no_extra_weight_copies(monkeypatch):
    import clip.transformer as transformer_module

    folded_calls = []
    original = transformer_module.quick_gelu_mlp
    monkeypatch.setattr(transformer_module, "quick_gelu_mlp", lambda *a: folded_calls.append(1) or original(*a))
    torch.manual_seed(0)
    block = transformer_module.ResidualAttentionBlock(32, 2, activation="quick_gelu")
    torch.nn.init.normal_(block.attn.in_proj_weight, std=0.2)  # created empty; Transformer initialises it
    x = torch.randn(2, 5, 32)  # L, N, D

    trained_fp32 = block(x)  # float32 training: the module as written
    with torch.no_grad():
        block(x)  # still training mode: as gradient accumulation's caching pass runs
    assert folded_calls == []
    block.eval()
    inference = block(x)
    assert len(folded_calls) == 1
    block.train()
    torch.testing.assert_close(inference, trained_fp32.detach(), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = block(x)
    assert len(folded_calls) == 2
    torch.testing.assert_close(mixed.float(), trained_fp32.detach(), rtol=0.05, atol=0.05)

    # A hook on the MLP (attribution tools, pruning) must see its call: such layers run as written.
    seen = []
    handle = block.mlp.c_fc.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    block.eval()(x)
    handle.remove()
    assert len(folded_calls) == 2 and seen == [(2, 5, 128)]  # the layout the block was given (L, N), as OpenAI's
    block.train()

    gelu_block = transformer_module.ResidualAttentionBlock(32, 2, activation="gelu").eval()
    torch.nn.init.normal_(gelu_block.attn.in_proj_weight, std=0.2)
    with torch.no_grad():
        gelu_block(x)
        assert len(folded_calls) == 2  # exact GELU has nothing to fold
        block.eval().to(torch.bfloat16)(x.bfloat16())
        assert len(folded_calls) == 2  # half-precision weights are not scaled (no second rounding)


def test_a_replaced_activation_or_an_added_layer_is_not_folded_away():
    from torch import nn

    from clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 2, activation="quick_gelu").eval()
    torch.nn.init.normal_(block.attn.in_proj_weight, std=0.2)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        folded = block(x)
        block.mlp.gelu = nn.ReLU()  # an ablation: the block must run the ReLU, not the folded QuickGELU
        relu = block(x)
    assert not torch.allclose(relu, folded, atol=1e-3)
    hidden = x + block.attention(block.ln_1(x))
    expected = hidden + block.mlp.c_proj(torch.relu(block.mlp.c_fc(block.ln_2(hidden))))
    torch.testing.assert_close(relu, expected)

    from clip.transformer import QuickGELU

    block.mlp = nn.Sequential(block.mlp.c_fc, nn.GELU(), block.mlp.c_proj)  # a whole new MLP: runs as given
    with torch.no_grad():
        expected = hidden + block.mlp(block.ln_2(hidden))
        torch.testing.assert_close(block(x), expected)
    block.mlp = nn.Sequential(OrderedDict(c_fc=block.mlp[0], gelu=QuickGELU(), c_proj=block.mlp[2]))

    silencer = nn.Linear(32, 32)  # an appended layer (say, a pruning mask) that zeroes the MLP's output
    nn.init.zeros_(silencer.weight)
    nn.init.zeros_(silencer.bias)
    block.mlp.append(silencer)
    with torch.no_grad():
        attention_only = x + block.attention(block.ln_1(x))
        torch.testing.assert_close(block(x), attention_only)


def test_blocks_and_transformer_take_openai_sequence_first_layout():
    # Prompt learners (CoOp and its kin) run the text transformer on their own embeddings, permuting to
    # (L, N, D) as openai/CLIP requires, and hooks on the blocks read (L, N, D) outputs.
    torch.manual_seed(0)
    model = CLIP(TINY["vit"]).eval()
    texts = texts_with_lengths([3, 20, 9])
    seen = []
    model.transformer.resblocks[-1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        x = model.token_embedding(texts) + model.positional_embedding
        x = model.transformer(x.permute(1, 0, 2).contiguous()).permute(1, 0, 2)  # a caller's own LND tensor
        x = model.ln_final(x)
        prompt_learner = x[torch.arange(3), texts.argmax(dim=-1)] @ model.text_projection
        seen.clear()
        torch.testing.assert_close(prompt_learner, model.encode_text(texts, trim=False))
    assert seen == [torch.Size([20, 3, 32])]  # L, N, D
    image_seen = []
    model.visual.transformer.resblocks[0].register_forward_hook(lambda module, args, out: image_seen.append(out.shape))
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32))
    assert image_seen == [torch.Size([17, 2, 32])]  # 16 patches + the class token, batch 2, width 32


def test_empty_text_batch():
    model = CLIP(TINY["vit"]).eval()
    with torch.no_grad():
        assert model.encode_text(torch.zeros(0, 20, dtype=torch.int32)).shape == (0, 24)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("training", [False, True])
def test_empty_image_batch(kind, training):
    # An empty batch (a caller's filtered-out list) gives empty features, as the text encoder's does; the
    # ResNet's attention pool inferred a view's length from zero elements and raised
    model = CLIP(TINY[kind]).train(training)
    size = TINY[kind].vision.image_size
    features = model.encode_image(torch.zeros(0, 3, size, size))
    assert features.shape == (0, 24)
    if training:
        features.sum().backward()


def test_layer_norm_runs_half_inputs_natively_only_under_autocast_with_float32_weights():
    from torch.utils._python_dispatch import TorchDispatchMode

    from clip.transformer import LayerNorm

    class RecordLayerNormInputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_layer_norm.default:
                self.dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    norm = LayerNorm(32)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    x = torch.randn(4, 7, 32)
    reference = norm(x)

    with RecordLayerNormInputs() as mixed, torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())  # a half-precision residual stream under autocast (the ViT's)
    assert mixed.dtypes == [torch.bfloat16] and out.dtype == torch.bfloat16  # no float32 round trip
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.02)

    half_model = LayerNorm(32)
    half_model.load_state_dict(norm.state_dict())
    half_model.to(torch.bfloat16)
    with RecordLayerNormInputs() as openai_style, torch.autocast("cpu", dtype=torch.bfloat16):
        half_model(x.bfloat16())
    assert openai_style.dtypes == [torch.float32]  # half-precision weights: OpenAI's float32 arithmetic
    with RecordLayerNormInputs() as full:
        norm(x)
    assert full.dtypes == [torch.float32]


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_scripting_is_refused_with_what_to_do_and_tracing_works(kind):
    # torch.jit.script failed deep inside ("method 'forward' is called recursively" in LayerNorm, "Unknown type
    # constructor Iterable" in the ResNet): the model's code paths are chosen in Python
    torch.manual_seed(0)
    model = CLIP(TINY[kind]).eval()
    for module in (model, model.visual, model.transformer.resblocks[0], nn.Sequential(model.visual)):
        # torch.jit.script's own deprecation warning: a DeprecationWarning up to torch 2.10, a FutureWarning since
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"cannot compile clip's .*torch.jit.trace"):
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            torch.jit.script(module)
    size = TINY[kind].vision.image_size
    images, texts = torch.randn(3, 3, size, size), texts_with_lengths([4, 9, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.export
        traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (texts,)}, check_trace=False)
    # Other batch sizes and longer texts than the example's: nothing of the example is fixed in the trace
    other_images, other_texts = torch.randn(2, 3, size, size), texts_with_lengths([20, 2])
    with torch.no_grad():
        torch.testing.assert_close(traced.encode_image(other_images), model.encode_image(other_images))
        torch.testing.assert_close(traced.encode_text(other_texts), model.encode_text(other_texts))


def test_create_model_refuses_a_config_dict_key_it_would_ignore():
    # README's way to a GELU model is create_model({**config.to_dict(), "activation": "gelu"}): with the key
    # misspelt, the dict built a QuickGELU model without a word, whose features are wrong for GELU weights
    config = TINY["vit"].to_dict()
    with pytest.raises(TypeError, match=r"'activaton'.*did you mean 'activation'\?"):
        model_module.create_model({**config, "activaton": "gelu"})
    assert model_module.create_model({**config, "activation": "gelu"}).config.activation == "gelu"
    assert model_module.create_model(config).config == TINY["vit"]


def test_create_model_names_what_a_config_dict_lacks():
    # {} and {"vision": 1} failed with a bare KeyError('embed_dim'), naming nothing of what a dict needs
    config = TINY["vit"].to_dict()
    with pytest.raises(TypeError, match=r"model config dict has no 'embed_dim', 'vision', 'text': it needs embed_dim, "
                                        r"vision and text \(activation is 'quick_gelu' unless given\)"):
        model_module.create_model({})
    with pytest.raises(TypeError, match=r"model config dict has no 'text': "):
        model_module.create_model({key: value for key, value in config.items() if key != "text"})
    with pytest.raises(TypeError, match=r"model config 'vision' must be a dict of VisionConfig fields, got 1"):
        model_module.create_model({**config, "vision": 1})
    without_activation = {key: value for key, value in config.items() if key != "activation"}
    assert model_module.create_model(without_activation).config.activation == "quick_gelu"


def test_a_block_takes_a_strided_input_other_than_the_models_layout():
    # Neither contiguous nor the transposed view of a contiguous (N, L, D) tensor (a slice of a prompt
    # learner's batch): worked on as given, not mistaken for the model's own batch-major layout
    from clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4).double()
    x = torch.randn(6, 8, 16, dtype=torch.float64)[:, ::2]
    torch.testing.assert_close(block(x), block(x.contiguous()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["models-layout", "contiguous-LND", "attend-from"])
def test_attention_backward_writes_the_projection_gradient_in_one_copy(case):
    # The q/k/v gradients go into the fused input projection's gradient: one [N, L, 3D] tensor written once
    # (stacked in the projection output's own layout), not stacked elsewhere and then copied into it.
    from aten_calls import AtenCalls

    from clip.transformer import MultiheadSelfAttention

    torch.manual_seed(0)
    n, length, width = 3, 10, 32
    attention = MultiheadSelfAttention(width, 4)
    rows = torch.randn(n, length, width)
    # (L, N, D): the model's own view of a contiguous (N, L, D) tensor, or a caller's contiguous one
    x = (rows.transpose(0, 1).contiguous() if case == "contiguous-LND" else rows.transpose(0, 1)).requires_grad_()
    if case == "attend-from":  # the last block, at the read positions only
        out, fused = attention.attend_from(x, torch.tensor([0, 4, 9])), 2  # keys and values: [N, L, 2D]
    else:
        out, fused = attention(x, need_weights=False)[0], 3
    with AtenCalls() as calls:
        out.backward(torch.randn_like(out))
    # Written once: stacked straight into the layout the projection's weight and input gradients read
    assert calls.new_tensor_sizes.count(n * length * fused * width) == 1


def test_every_kind_of_hook_counts_as_watching_a_module():
    from torch.nn.modules import module as module_internals

    from clip.transformer import has_hooks

    def hook(*args):
        return None

    layer = nn.Linear(2, 2)
    assert not has_hooks(layer)
    for register in (layer.register_forward_hook, layer.register_forward_pre_hook,
                     layer.register_full_backward_hook, layer.register_full_backward_pre_hook):
        handle = register(hook)
        assert has_hooks(layer) and has_hooks(layer, count_global=False), register.__name__
        handle.remove()
    for register in (module_internals.register_module_forward_hook, module_internals.register_module_forward_pre_hook,
                     module_internals.register_module_full_backward_hook,
                     module_internals.register_module_full_backward_pre_hook):
        handle = register(hook)
        try:
            assert has_hooks(layer) and not has_hooks(layer, count_global=False), register.__name__
        finally:
            handle.remove()
    assert not has_hooks(layer)


def test_attention_refuses_a_width_its_heads_do_not_divide():
    from clip.transformer import MultiheadSelfAttention

    with pytest.raises(ValueError, match="width 10 is not divisible by 3 heads"):
        MultiheadSelfAttention(10, 3)


def test_hooks_on_the_mlp_see_openai_shapes_when_a_block_is_given_the_models_layout():
    from clip.transformer import ResidualAttentionBlock

    block = ResidualAttentionBlock(16, 4)
    shapes = []
    block.mlp.c_fc.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    x = torch.randn(3, 6, 16).transpose(0, 1)  # (L, N, D), the view the model's own callers pass
    block(x)
    assert shapes == [(6, 3, 64)]


def test_gradient_checkpointing_recomputes_the_training_blocks_only():
    # Checkpointed blocks run again in the backward pass; a block in eval mode (a locked lower block of a
    # partly locked tower) is not checkpointed, and nothing is under no_grad
    from clip.transformer import Transformer

    torch.manual_seed(0)
    transformer = Transformer(16, 3, 4).train()
    transformer.resblocks[0].eval()
    transformer.grad_checkpointing = True
    calls = []
    for index, block in enumerate(transformer.resblocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    x = torch.randn(5, 2, 16, requires_grad=True)
    transformer(x).sum().backward()
    assert sorted(calls) == [0, 1, 1, 2, 2]
    calls.clear()
    with torch.no_grad():
        transformer(x)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("name", [" RN50", "ViT-B/32 ", "\tViT-L/14@336px\n"])
def test_a_released_name_with_whitespace_around_it_is_pointed_at_the_name_without(name):
    # " RN50" was said to be open_clip's RN50 with GELU, and "ViT-B/32 " got difflib's guess, which happened to fit
    with pytest.raises(ValueError) as raised:
        model_module.create_model(name)
    assert str(raised.value).startswith(
        f"Unknown architecture {name!r}. Did you mean {name.strip()!r}, without the whitespace around it? Known: RN50")
    assert "open_clip" not in str(raised.value)


def test_common_notebook_slips_are_errors_that_say_the_fix():
    # A PIL image, a caption string or channels-last pixels failed inside torch ("'Image' object has no attribute
    # 'is_floating_point'", "'str' object has no attribute 'dim'", "expected input to have 3 channels, but got 32")
    from PIL import Image

    model = CLIP(TINY["vit"]).eval()
    size = model.visual.input_resolution
    with pytest.raises(TypeError, match=r"images of type Image; .*preprocess\(image\)\.unsqueeze\(0\)"):
        model.encode_image(Image.new("RGB", (size, size)))
    with pytest.raises(ValueError, match=r"takes channels first, .*images\.permute\(0, 3, 1, 2\)"):
        model.encode_image(torch.zeros(2, size, size, 3))
    with pytest.raises(TypeError, match=r"text of type str; .*clip\.tokenize\(texts\)"):
        model.encode_text("a cat")
    with pytest.raises(TypeError, match=r"text of dtype torch\.float32; this model takes integer token ids"):
        model.encode_text(torch.ones(1, 5))
    assert model.encode_image(torch.zeros(2, 3, size, size)).shape[0] == 2
