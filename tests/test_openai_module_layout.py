"""Code written against openai/CLIP's modules runs unchanged: `from clip import clip`, clip.model's
`build_model` and `convert_weights`, `clip.simple_tokenizer.SimpleTokenizer`."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from openai_layout import openai_state_dict

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig

TINY = ModelConfig(
    embed_dim=16,
    vision=VisionConfig(kind="vit", image_size=32, patch_size=16, width=64, layers=1, heads=1),  # heads = width // 64
    text=TextConfig(context_length=77, vocab_size=49408, width=64, layers=1, heads=1),
)


def test_from_clip_import_clip():
    from clip import clip as openai_style

    assert openai_style.load is clip.load and openai_style.tokenize is clip.tokenize
    assert list(openai_style._MODELS) == openai_style.available_models() == clip.available_models()
    assert all(url.startswith("https://") for url in openai_style._MODELS.values())
    with pytest.raises(ValueError, match="not one of the released models"):
        openai_style._download("https://example.com/other.pt")
    assert clip.clip is openai_style  # reachable after a plain `import clip`, as in openai/CLIP
    assert repr(openai_style._transform(64)) == repr(clip.image_transform(64))
    assert openai_style._tokenizer.encode("a cat") == [320, 2368]



def test_openai_submodules_are_attributes_after_a_plain_import_clip():
    # A fresh interpreter: in this one, other tests have imported the submodules already. Importing the package
    # and the trainer leaves torchvision alone (its import pulls in torch._dynamo: seconds in every process,
    # every training rank and DataLoader worker included); the preprocessing's names import it on first use.
    code = "\n".join([
        "import sys, clip, clip.train",
        "print(clip.simple_tokenizer.SimpleTokenizer, clip.model.build_model, clip.clip.load)",
        "assert 'torchvision' not in sys.modules, 'imported torchvision'",
        "from clip import image_transform",
        "from clip.clip import BICUBIC, _transform",
        "assert _transform(32).transforms[0].interpolation is BICUBIC, _transform(32)",
        "assert clip.image_transform is image_transform is clip.preprocess.image_transform",
        "assert 'image_transform' in dir(clip) and {'BICUBIC', '_tokenizer'} <= set(dir(clip.clip))",
    ])
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr

def test_build_model_and_convert_weights_as_openai_clip():
    from clip.model import build_model, convert_weights

    torch.manual_seed(0)
    original = clip.create_model(TINY).eval()
    model = build_model(openai_state_dict(original))  # OpenAI's layout, with its three integer entries
    assert not model.training and model.visual.conv1.weight.dtype == torch.float16  # as openai/CLIP's
    assert model.token_embedding.weight.dtype == torch.float32
    expected = convert_weights(original)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_simple_tokenizer_as_openai_clip():
    from clip.simple_tokenizer import SimpleTokenizer, default_bpe

    tokenizer = SimpleTokenizer(default_bpe())
    ids = tokenizer.encode("a photo of a cat")
    assert ids == clip.tokenize("a photo of a cat")[0, 1:6].tolist()
    assert tokenizer.encoder["<|startoftext|>"] == 49406 and tokenizer.decoder[49407] == "<|endoftext|>"
    framed = [49406, *ids, 49407]
    assert tokenizer.decode(framed) == "<|startoftext|>a photo of a cat <|endoftext|>"


def test_hooks_inside_the_blocks_see_openai_shapes():
    # Attention-map and dense-feature tools hook ln_1, attn and the MLP of OpenAI's blocks, which run
    # sequence-first (L, N, D); `attn` returns nn.MultiheadAttention's (output, weights) pair.
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    seen = {}

    def record(name):
        def hook(module, args, out):  # returns None: a hook's return value would replace the output
            if not isinstance(out, tuple):
                out.view(-1, out.shape[-1])  # contiguous, as OpenAI's: hooks may .view() them
            seen.setdefault(name, out if isinstance(out, tuple) else out.shape)

        return hook

    text_block, image_block = model.transformer.resblocks[0], model.visual.transformer.resblocks[0]
    for name, module in [("ln_1", text_block.ln_1), ("c_fc", text_block.mlp.c_fc), ("ln_final", model.ln_final),
                         ("text_attn", text_block.attn), ("image_attn", image_block.attn),
                         ("image_c_fc", image_block.mlp.c_fc), ("ln_post", model.visual.ln_post)]:
        module.register_forward_hook(record(name))
    with torch.no_grad():
        model.encode_text(clip.tokenize(["a cat", "a photo of a dog"]))  # hooked: all 77 positions, not cut
        model.encode_image(torch.randn(3, 3, 32, 32))
    assert seen["ln_1"] == (77, 2, 64) and seen["c_fc"] == (77, 2, 256) and seen["ln_final"] == (2, 77, 64)
    assert seen["text_attn"][0].shape == (77, 2, 64) and seen["text_attn"][1] is None
    assert seen["image_attn"][0].shape == (5, 3, 64) and seen["image_c_fc"] == (5, 3, 256)  # 4 patches + class
    assert seen["ln_post"] == (3, 64)


def test_attention_is_called_and_answers_like_nn_multihead_attention():
    from clip.transformer import MultiheadSelfAttention, causal_mask

    torch.manual_seed(0)
    ours = MultiheadSelfAttention(32, 4)
    torch.nn.init.normal_(ours.in_proj_weight, std=0.2)
    reference = torch.nn.MultiheadAttention(32, 4)
    reference.load_state_dict(ours.state_dict())
    assert (ours.embed_dim, ours.num_heads, ours.head_dim, ours.batch_first) == (32, 4, 8, False)
    x = torch.randn(7, 3, 32)  # L, N, D
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]])
    boolean = torch.rand(7, 7) > 0.7
    boolean.fill_diagonal_(False)  # every query keeps a key
    cases = [
        {},
        {"attn_mask": causal_mask(7)},
        {"attn_mask": boolean},
        {"key_padding_mask": padding},
        {"attn_mask": causal_mask(7), "key_padding_mask": padding},
        {"need_weights": True, "average_attn_weights": False, "attn_mask": causal_mask(7)},
        {"attn_mask": causal_mask(7), "is_causal": True, "key_padding_mask": padding},
        {"attn_mask": causal_mask(7), "is_causal": True, "key_padding_mask": padding, "need_weights": True},
        {"attn_mask": torch.randn(3 * 4, 7, 7)},  # one mask per sequence and head, (N * heads, L, L)
    ]
    batch_major = x.transpose(0, 1).contiguous().transpose(0, 1)  # the model's own layout: same answers
    for kwargs in cases:
        expected_out, expected_weights = reference(x, x, x, **{"need_weights": False, **kwargs})
        out, weights = ours(x, x, x, **{"need_weights": False, **kwargs})
        torch.testing.assert_close(ours(batch_major, **{"need_weights": False, **kwargs})[0], out)
        torch.testing.assert_close(out, expected_out, msg=str(kwargs))
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, msg=str(kwargs))
    out, weights = ours(x, x, x)  # nn.MultiheadAttention's default: the weights averaged over the heads
    expected_out, expected_weights = reference(x, x, x)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(weights, expected_weights)
    # OpenAI's context-sized mask on a shorter sequence is cut; is_causal takes the causal kernel
    expected_out, _ = reference(x, x, x, need_weights=False, attn_mask=causal_mask(7))
    torch.testing.assert_close(ours(x, x, x, need_weights=False, attn_mask=causal_mask(77))[0], expected_out)
    torch.testing.assert_close(ours(x, None, None, need_weights=False, is_causal=True)[0], expected_out)
    # Other keys and values (cross-attention, e.g. pooling queries over a layer's tokens): the same as
    # nn.MultiheadAttention with these weights, where it raised NotImplementedError
    queries, memory = torch.randn(2, 3, 32), torch.randn(7, 3, 32)
    for kwargs in [{}, {"key_padding_mask": padding}, {"need_weights": False}]:
        for (out, weights), (expected_out, expected_weights) in [
            (ours(queries, memory, memory, **kwargs), reference(queries, memory, memory, **kwargs)),
            (ours(x, x, memory, **kwargs), reference(x, x, memory, **kwargs)),
        ]:
            torch.testing.assert_close(out, expected_out, msg=str(kwargs))
            assert (weights is None) == (expected_weights is None)
            if weights is not None:
                torch.testing.assert_close(weights, expected_weights)


def test_replacing_a_blocks_attention_method_takes_effect():
    # Dense-prediction and attention-map tools replace ResidualAttentionBlock.attention, as in openai/CLIP, with
    # code that relies on OpenAI's tensors: contiguous (L, N, D) ones (`.view`) and the whole 77-token context
    # (OpenAI's 77 x 77 mask added to their own scores). The model then runs those towers as OpenAI's does.
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    images, texts = torch.randn(2, 3, 32, 32), clip.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
    maps = []
    for block in (model.visual.transformer.resblocks[-1], model.transformer.resblocks[-1]):
        def attention(x, block=block):  # OpenAI-style code: its own scores, the weights kept
            length, n, width = x.shape
            heads = block.attn.num_heads
            q, k, v = torch.nn.functional.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
            q, k, v = (t.view(length, n * heads, -1).transpose(0, 1) for t in (q, k, v))  # .view: contiguous x
            scores = q @ k.transpose(1, 2) * (width // heads) ** -0.5
            if block.attn_mask is not None:
                scores = scores + block.attn_mask  # OpenAI's [77, 77] mask
            weights = scores.softmax(dim=-1)
            maps.append(weights.shape)
            out = (weights @ v).transpose(0, 1).reshape(length, n, width)
            return block.attn.out_proj(out)

        block.attention = attention
    with torch.no_grad():
        after = model.encode_image(images), model.encode_text(texts)
    assert maps == [(2, 5, 5), (2, 77, 77)]  # batch x heads (1), the image's 5 tokens, all 77 text positions
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old)


@pytest.mark.parametrize("built_by", ["create_model", "clip.load"])
def test_a_replaced_attention_module_is_called_as_openai_calls_it(tmp_path, built_by):
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    if built_by == "clip.load":  # built on the meta device, then loaded: its mask must still be readable
        torch.save(model.state_dict(), tmp_path / "weights.pt")
        model, _ = clip.load(str(tmp_path / "weights.pt"), device="cpu")
    texts = clip.tokenize(["a cat", "a photo of a dog"])
    with torch.no_grad():
        before = model.encode_text(texts)
        for block in model.transformer.resblocks:
            replacement = torch.nn.MultiheadAttention(64, block.attn.num_heads)
            replacement.load_state_dict(block.attn.state_dict())
            block.attn = replacement  # OpenAI's own module: no is_causal keyword, a float mask on the CPU
        torch.testing.assert_close(model.encode_text(texts), before, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("mask", ["none", "custom"])
def test_a_text_attn_mask_set_by_outside_code_is_applied(mask):
    # As in openai/CLIP, a block applies whatever attn_mask it holds: prompt learners set None for
    # bidirectional text attention. Then padding past the end of text counts, so all 77 positions run.
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    texts = clip.tokenize(["a cat", "a photo of a dog"])
    new_mask = None if mask == "none" else torch.randn(77, 77)
    with torch.no_grad():
        causal = model.encode_text(texts)
        reference = copy.deepcopy(model)
        for ours, theirs in zip(model.transformer.resblocks, reference.transformer.resblocks, strict=True):
            ours.attn_mask = theirs.attn_mask = new_mask
            replacement = torch.nn.MultiheadAttention(64, theirs.attn.num_heads)
            replacement.load_state_dict(theirs.attn.state_dict())
            theirs.attn = replacement  # OpenAI's module, called with the block's mask
        expected = reference.encode_text(texts)
        assert not torch.allclose(expected, causal, atol=1e-3)
        torch.testing.assert_close(model.encode_text(texts), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_built_text_mask_edited_in_place_is_applied_as_in_openai_clip(mode):
    # openai/CLIP's blocks add self.attn_mask on every call, so code that zeroes it in place gets bidirectional
    # attention; the causal kernel went on running here as if the mask were unchanged. A mask made under
    # inference_mode has no version counter: its edit went unnoticed even after the counter was read
    torch.manual_seed(0)
    with getattr(torch, mode)():
        model = clip.create_model(TINY).eval()
        texts = clip.tokenize(["a cat", "a photo of a dog"])
        causal = model.encode_text(texts)
        assigned = copy.deepcopy(model)
        for block in assigned.transformer.resblocks:
            block.attn_mask = torch.zeros(77, 77)
        expected = assigned.encode_text(texts)
        for block in model.transformer.resblocks:
            block.attn_mask.zero_()
        assert not torch.allclose(expected, causal, atol=1e-3)
        torch.testing.assert_close(model.encode_text(texts), expected, atol=1e-5, rtol=1e-5)


def test_a_transformer_built_on_its_own_starts_from_initialised_weights():
    # Code written for openai/CLIP builds extra layers from clip.model.Transformer; its attention must start
    # as nn.MultiheadAttention's does, not from uninitialised memory
    torch.manual_seed(0)
    transformer = clip.model.Transformer(64, 2, 4)
    reference = torch.nn.MultiheadAttention(64, 4)
    for block in transformer.resblocks:
        weight = block.attn.in_proj_weight
        assert weight.abs().max() <= reference.in_proj_weight.abs().max() * 1.5
        assert weight.std() > reference.in_proj_weight.std() / 2
        assert not block.attn.in_proj_bias.any() and not block.attn.out_proj.bias.any()
    assert torch.isfinite(transformer(torch.randn(5, 2, 64))).all()

def test_openai_style_module_surgery():
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unprojected = model.encode_image_unprojected(images)
        model.visual.proj = None  # openai/CLIP code gets the class token's features this way
        torch.testing.assert_close(model.encode_image(images), unprojected)
    assert torch.equal(model.build_attention_mask(), torch.full((77, 77), float("-inf")).triu(1))
    assert model.initialize_parameters.__func__ is clip.model.CLIP.init_parameters
    for name in ("QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer", "ModifiedResNet",
                 "AttentionPool2d", "Bottleneck", "LayerNorm", "CLIP"):
        assert hasattr(clip.model, name), name


def tiny_resnet_model(width: int) -> torch.nn.Module:
    """A seeded ResNet CLIP for 64-pixel images, in eval mode."""
    resnet = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="resnet", image_size=64, width=width, layers=(1, 1, 1, 1), heads=2),
        text=TextConfig(context_length=77, vocab_size=49408, width=32, layers=1, heads=2),
    )
    torch.manual_seed(0)
    return clip.create_model(resnet).eval()


def test_resnet_modules_and_dtype_as_openai_clip():
    model = tiny_resnet_model(16)
    block = model.visual.layer2[0]
    assert block.stride == 2 and model.visual.attnpool.num_heads == 2
    fired = []
    block.relu3.register_forward_hook(lambda module, args, out: fired.append(out.shape) and None)
    model.visual.relu1.register_forward_hook(lambda module, args, out: fired.append(out.shape) and None)
    model.visual.to(torch.bfloat16)  # the image tower alone in half precision: images follow its dtype
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        features = model.visual(torch.randn(2, 3, 64, 64))  # float32 images, cast as openai/CLIP's ResNet does
    assert features.dtype == torch.bfloat16 and fired == [(2, 8, 32, 32), (2, 128, 8, 8)]


def test_a_resnets_replaced_attention_pool_takes_the_feature_map_as_in_openai_clip():
    # openai/CLIP's ModifiedResNet.forward only calls self.attnpool: code sets nn.Identity() to get layer4's
    # feature map, or another pooling, or resizes the pool's position embeddings in its own forward. Reading
    # the pool's position embeddings first failed on the first two and refused other sizes for the third
    import types

    model = tiny_resnet_model(8)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"this model takes \[N, 3, 64, 64\]"):  # our own pool: checked
            model.encode_image(torch.randn(2, 3, 128, 128))
        pool = model.visual.attnpool
        seen = []

        def any_size(self, x):
            seen.append(tuple(x.shape))
            return x.mean(dim=(2, 3))[:, :16]

        pool.forward = types.MethodType(any_size, pool)
        assert model.encode_image(torch.randn(2, 3, 128, 128)).shape == (2, 16) and seen == [(2, 256, 4, 4)]
        model.visual.attnpool = torch.nn.Identity()
        assert model.encode_image(images).shape == (2, 256, 2, 2)


def test_a_traced_text_encoder_keeps_every_position():
    # A length read from the example would be fixed in the trace, and wrong for a longer caption.
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    short, long = clip.tokenize(["a cat"]), clip.tokenize(["a photo of " + "a very big cat " * 8])
    with torch.no_grad():
        traced = torch.jit.trace_module(model, {"encode_text": short}, check_trace=False)
        torch.testing.assert_close(traced.encode_text(long), model.encode_text(long))


def test_clip_is_built_from_openai_constructor_arguments():
    vit = clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)  # ViT-B/32, as openai/CLIP builds it
    assert vit.config == clip.architectures.get_architecture("ViT-B/32")
    resnet = clip.model.CLIP(
        embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None,
        context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
    )
    assert resnet.config == clip.architectures.get_architecture("RN50")
    # openai/CLIP takes the stage depths as a list too (its own check is isinstance(vision_layers, (tuple, list)))
    listed = clip.architectures.openai_model_config(1024, 224, [3, 4, 6, 3], 64, None, 77, 49408, 512, 8, 12)
    assert listed == clip.architectures.get_architecture("RN50")


def test_simple_tokenizer_internals_as_openai_clip():
    from clip.simple_tokenizer import (
        SimpleTokenizer,
        basic_clean,
        bytes_to_unicode,
        default_bpe,
        get_pairs,
        whitespace_clean,
    )

    tokenizer = SimpleTokenizer()
    assert tokenizer.byte_decoder[tokenizer.byte_encoder[32]] == 32 and bytes_to_unicode()[32] == "Ġ"
    assert get_pairs(("a", "b", "c")) == {("a", "b"), ("b", "c")}
    assert whitespace_clean(basic_clean("  a &amp;amp;\n b ")) == "a & b"
    assert tokenizer.bpe_ranks[tokenizer.merges[0]] == 0 and tokenizer.cache["<|endoftext|>"] == "<|endoftext|>"
    from reference_tokenizer import ReferenceTokenizer  # the plain merge loop, written from the algorithm

    reference = ReferenceTokenizer(default_bpe())
    for text in ["photograph", "tokenizers", "a", "zzqxj", "naïve", "日本"]:
        for piece in tokenizer.pat.findall(text):
            spelled = "".join(tokenizer.byte_encoder[b] for b in piece.encode())
            assert tokenizer.bpe(spelled) == reference.bpe(spelled), piece
        pieces = tokenizer.pat.findall(text)
        symbols = [s for piece in pieces for s in tokenizer.bpe("".join(tokenizer.byte_encoder[b] for b in piece.encode())).split()]
        assert [tokenizer.encoder[s] for s in symbols] == tokenizer.encode(text), text


def test_the_models_batch_major_memory_saves_the_layout_copies():
    # The model's own callers hand the blocks (L, N, D) views of batch-major tensors: the attention's output
    # and its gradient then need no layout copy, which a sequence-major tensor costs in every block.
    from torch.profiler import ProfilerActivity, profile

    from clip.transformer import ResidualAttentionBlock, causal_mask

    def copies_and_output(x):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = block(x)
            out.sum().backward()
        return sum(e.name in ("aten::contiguous", "aten::clone", "aten::copy_") for e in prof.events()), out

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, causal_mask(9), causal=True).train()
    torch.nn.init.normal_(block.attn.in_proj_weight, std=0.1)
    x = torch.randn(3, 9, 64)
    batch_major, out = copies_and_output(x.clone().requires_grad_().transpose(0, 1))
    sequence_major, reference = copies_and_output(x.transpose(0, 1).contiguous().requires_grad_())
    assert batch_major < sequence_major and out.transpose(0, 1).is_contiguous()  # it stays batch-major
    torch.testing.assert_close(out, reference)


def test_tools_that_hook_every_module_see_the_model_run_as_it_does():
    # FlopCounterMode registers hooks for every module (its module tracker): counting must see the text cut
    # after its last end token, as the model runs it, not OpenAI's 77 positions.
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    short = clip.tokenize(["a cat"])
    with FlopCounterMode(display=False) as counted:
        model.encode_text(short)
    with FlopCounterMode(display=False) as whole_context:
        model.encode_text(short, trim=False)
    assert counted.get_total_flops() < whole_context.get_total_flops() / 4


def test_image_modules_are_built_from_openai_constructor_arguments():
    # Code written for openai/CLIP builds these directly, by position or by its names; ours keep working too
    from clip.model import (
        AttentionPool2d,
        Bottleneck,
        ModifiedResNet,
        ResidualAttentionBlock,
        VisionTransformer,
    )

    vit = VisionTransformer(input_resolution=32, patch_size=16, width=64, layers=1, heads=1, output_dim=16)
    assert (vit.input_resolution, vit.output_dim, vit.proj.shape) == (32, 16, (64, 16))
    vit.load_state_dict(clip.create_model(TINY).visual.state_dict())  # openai's layout, strictly
    VisionTransformer(32, 16, 64, 1, 1, 16).load_state_dict(vit.state_dict())
    assert VisionTransformer(TINY.vision, 16, "gelu").transformer.resblocks[0].mlp.gelu.__class__ is torch.nn.GELU
    assert isinstance(vit.transformer.resblocks[0].mlp.gelu, clip.model.QuickGELU)

    resnet_config = VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 2, 1, 1), heads=2)
    resnet = ModifiedResNet(layers=(1, 2, 1, 1), output_dim=16, heads=2, input_resolution=64, width=16)
    ModifiedResNet(resnet_config, 16).load_state_dict(resnet.state_dict())
    ModifiedResNet([1, 2, 1, 1], 16, 2, 64, 16).load_state_dict(resnet.state_dict())
    assert ModifiedResNet((1, 1, 1, 1), 1024, 32).input_resolution == 224  # openai's defaults: 224 px, width 64
    with torch.no_grad():
        assert resnet.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 16)

    pool = AttentionPool2d(spacial_dim=2, embed_dim=64, num_heads=4)  # output_dim=None: embed_dim wide
    assert pool.c_proj.out_features == 64 and pool.num_heads == 4 and pool.positional_embedding.shape == (5, 64)
    assert AttentionPool2d(2, 64, 4, 8).c_proj.out_features == 8
    assert AttentionPool2d(spatial_dim=2, embed_dim=64, heads=4, output_dim=8).num_heads == 4
    with pytest.raises(TypeError, match="both 'heads' and 'num_heads'"):
        AttentionPool2d(2, 64, 4, num_heads=4)

    block = Bottleneck(64, 16)  # openai's default stride of 1
    assert block.stride == 1 and block.downsample is None
    assert Bottleneck(inplanes=32, planes=16, stride=2).downsample[0].kernel_size == 2
    attention_block = ResidualAttentionBlock(d_model=64, n_head=4, attn_mask=None)
    assert attention_block.attn.num_heads == 4 and attention_block.mlp.c_fc.out_features == 256
    with pytest.raises(TypeError, match="missing required argument 'heads'"):
        ResidualAttentionBlock(64)


@pytest.mark.parametrize("signature", ["openai", "ours"])
def test_modules_built_on_their_own_start_from_initialised_weights(monkeypatch, signature):
    # torch.empty that leaves NaN, so a parameter that is never initialised cannot pass for one by chance
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)
    model = clip.model
    resnet_config = VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=2)
    if signature == "openai":
        towers = [model.VisionTransformer(32, 16, 64, 1, 1, 16), model.ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 16),
                  model.CLIP(16, 32, 1, 64, 16, 77, 49408, 64, 1, 1)]
    else:
        towers = [model.VisionTransformer(TINY.vision, 16, "quick_gelu"), model.ModifiedResNet(resnet_config, 16),
                  model.CLIP(TINY)]
    modules = [*towers, model.AttentionPool2d(2, 64, 4, 16), model.Bottleneck(32, 16, 2), model.LayerNorm(64),
               model.QuickGELU(), model.ResidualAttentionBlock(64, 4), model.Transformer(64, 2, 4)]
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert torch.isfinite(tensor).all(), f"{type(module).__name__}.{name}"
    with torch.no_grad():
        assert torch.isfinite(towers[0](torch.randn(2, 3, 32, 32))).all()
        assert torch.isfinite(towers[1].eval()(torch.randn(2, 3, 64, 64))).all()
        assert torch.isfinite(modules[3](torch.randn(2, 64, 2, 2))).all()


def test_clip_draws_each_towers_embeddings_once(monkeypatch):
    # A seeded CLIP keeps its weights: its towers leave the embeddings and attention to CLIP.init_parameters,
    # so building them inside CLIP draws no extra random numbers (which would shift every draw after them)
    from clip.model import AttentionPool2d, VisionTransformer

    calls = []
    for cls, name in [(VisionTransformer, "init_embeddings"), (AttentionPool2d, "init_positional_embedding")]:
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, original=original: calls.append(type(self)) or original(self))
    xavier = torch.nn.init.xavier_uniform_  # the attention's own initialisation, for blocks built on their own
    monkeypatch.setattr(torch.nn.init, "xavier_uniform_", lambda tensor: calls.append("xavier") or xavier(tensor))
    resnet = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=2),
        text=TextConfig(context_length=77, vocab_size=49408, width=32, layers=1, heads=2),
    )
    clip.create_model(TINY)
    clip.model.CLIP(resnet)
    assert calls == [VisionTransformer, AttentionPool2d]
    clip.model.Transformer(64, 1, 4)
    assert calls[2:] == ["xavier"]


def test_convert_weights_converts_torchs_own_attention_too():
    # Code written for openai/CLIP swaps nn.MultiheadAttention into the blocks (or adds its own) and then calls
    # convert_weights, which there converts every projection of it; left float32 beside a float16 out_proj,
    # its forward fails on the dtype mismatch
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    for block in model.transformer.resblocks:
        replacement = torch.nn.MultiheadAttention(64, block.attn.num_heads)
        replacement.load_state_dict(block.attn.state_dict())
        block.attn = replacement
    extra = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4, add_bias_kv=True)
    clip.model.convert_weights(model)
    clip.model.convert_weights(extra)
    for name, parameter in [*model.transformer.named_parameters(), *extra.named_parameters()]:
        expected = torch.float32 if ".ln_" in name else torch.float16
        assert parameter.dtype == expected, name


@pytest.mark.parametrize("build, called", [
    (lambda: clip.model.VisionTransformer(32, 16, 64, 1, 2), "VisionTransformer()"),
    (lambda: clip.model.ModifiedResNet((1, 1, 1, 1)), "ModifiedResNet()"),
    (lambda: clip.model.CLIP(512), "CLIP()"),
])
def test_a_missing_constructor_argument_names_the_class_called(build, called):
    # It named the helper that reads openai/CLIP's arguments (openai_vision_config()), which the caller never called
    with pytest.raises(TypeError, match=r"missing \d required positional argument") as raised:
        build()
    assert str(raised.value).startswith(called)


def test_a_bottleneck_without_its_planes_names_the_argument():
    # Both are optional for the two names of the first (in_channels, openai's inplanes): without the check it
    # failed on `None * 4` ("unsupported operand type(s) for *"), with no word of the argument missing
    with pytest.raises(TypeError, match=re.escape("Bottleneck() missing required argument: 'planes'")):
        clip.model.Bottleneck(64)


class _LoRAAttention(torch.nn.Module):
    """What LoRA libraries for openai/CLIP (CLIP-LoRA and kin) put in place of each nn.MultiheadAttention they
    find: the attention recomputed from the module's own weights, plus a low-rank update of the queries and
    values that starts at zero."""

    def __init__(self, attention: torch.nn.MultiheadAttention, rank: int = 2) -> None:
        super().__init__()
        width = attention.embed_dim
        self.num_heads, self.batch_first, self.dropout = attention.num_heads, attention.batch_first, attention.dropout
        self.in_proj_weight, self.in_proj_bias, self.out_proj = (
            attention.in_proj_weight, attention.in_proj_bias, attention.out_proj)
        self.down = torch.nn.Parameter(torch.randn(2, rank, width) * 0.1)
        self.up = torch.nn.Parameter(torch.zeros(2, width, rank))

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
        length, n, width = query.shape
        q, k, v = torch.nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q + query @ self.down[0].t() @ self.up[0].t()
        v = v + query @ self.down[1].t() @ self.up[1].t()
        q, k, v = (t.reshape(length, n * self.num_heads, -1).transpose(0, 1) for t in (q, k, v))
        scores = q @ k.transpose(1, 2) * (width // self.num_heads) ** -0.5
        if attn_mask is not None:
            scores = scores + attn_mask[:length, :length]
        out = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(length, n, width)
        return self.out_proj(out), None


def test_attention_layers_are_found_as_nn_multihead_attention():
    # openai/CLIP's blocks hold torch's nn.MultiheadAttention, and LoRA libraries written for it find the layers to
    # adapt with isinstance(module, nn.MultiheadAttention). These were another nn.Module: nothing was found, no
    # adapter put in place, and a fine-tuning run trained nothing (or only what it had not frozen)
    torch.manual_seed(0)
    model = clip.create_model(TINY).eval()
    images, texts = torch.randn(2, 3, 32, 32), clip.tokenize(["a cat", "a photo of a dog"])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
    adapted = 0
    for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
        for block in blocks:
            for name, child in list(block.named_children()):
                if isinstance(child, torch.nn.MultiheadAttention):
                    setattr(block, name, _LoRAAttention(child))
                    adapted += 1
    assert adapted == 2  # one block per tower
    with torch.no_grad():
        after = model.encode_image(images), model.encode_text(texts)
    for old, new in zip(before, after, strict=True):  # the update starts at zero
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    model.encode_text(texts).sum().backward()
    assert model.transformer.resblocks[0].attn.up.grad.abs().sum() > 0


def test_attention_has_nn_multihead_attentions_attributes():
    attention = clip.create_model(TINY).visual.transformer.resblocks[0].attn
    assert (attention.embed_dim, attention.kdim, attention.vdim, attention.num_heads, attention.head_dim) == (64, 64, 64, 1, 64)
    assert attention._qkv_same_embed_dim and not attention.batch_first and not attention.add_zero_attn
    assert attention.q_proj_weight is None and attention.bias_k is None and attention.dropout == 0.0
    assert [name for name, _ in attention.named_parameters()] == [
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]


def test_clip_clip_has_the_preprocessing_pieces_code_builds_its_own_transforms_from():
    # `from clip.clip import BICUBIC, _convert_image_to_rgb` (for a preprocessing at another size, or with
    # augmentations) was an ImportError
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

    from clip.clip import BICUBIC, _convert_image_to_rgb, _transform

    normalize = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    own = Compose([Resize(32, interpolation=BICUBIC), CenterCrop(32), _convert_image_to_rgb, ToTensor(), normalize])
    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(own(image), _transform(32)(image), atol=0, rtol=0)
    assert _convert_image_to_rgb(image.convert("L")).mode == "RGB"
