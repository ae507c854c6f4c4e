"""Single-process tests of clip.loss against naive float64 references written out here."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip.loss import (
    SIGLIP_INITIAL_LOGIT_BIAS,
    SIGLIP_INITIAL_LOGIT_SCALE,
    ContrastiveLoss,
    LossConfig,
    build_loss,
    contrastive_loss,
    contrastive_loss_with_cached_features,
    sigmoid_loss,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def naive_clip_loss(image, text, logit_scale):
    """The CLIP paper's pseudo-code, in float64."""
    image = F.normalize(image.double(), dim=-1)
    text = F.normalize(text.double(), dim=-1)
    logits = logit_scale.double().exp() * image @ text.t()
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def naive_sigmoid_loss(image, text, logit_scale, logit_bias):
    """The SigLIP paper's pseudo-code, in float64."""
    image = F.normalize(image.double(), dim=-1)
    text = F.normalize(text.double(), dim=-1)
    logits = logit_scale.double().exp() * image @ text.t() + logit_bias.double()
    signs = 2 * torch.eye(image.shape[0], dtype=torch.float64) - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def make_inputs(n=13, dim=8, seed=0, scale=math.log(1 / 0.07)):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=generator, requires_grad=True)
    # Correlated texts so that the positives matter and accuracies are neither 0 nor 1.
    text = (image.detach() + 1.5 * torch.randn(n, dim, generator=generator)).requires_grad_()
    logit_scale = torch.tensor(scale, requires_grad=True)
    return image, text, logit_scale


def loss_and_grads(fn, *inputs):
    for tensor in inputs:
        tensor.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach().double(), [tensor.grad.clone().double() for tensor in inputs]


def assert_same(result, reference):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE)


def test_clip_loss_matches_naive_including_logit_scale_gradient():
    inputs = make_inputs()
    assert_same(loss_and_grads(contrastive_loss, *inputs), loss_and_grads(naive_clip_loss, *inputs))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 13, 64])
def test_chunked_clip_loss_matches_naive(chunk_size):
    inputs = make_inputs(n=13, dim=16, seed=chunk_size)
    chunked = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, chunk_size=chunk_size), *inputs)
    assert_same(chunked, loss_and_grads(naive_clip_loss, *inputs))


def test_chunked_clip_loss_matches_unchunked_at_a_large_temperature():
    # logit_scale at CLIP's clamp, log(100): logits up to 100 test the logsumexp's stability. Each text is
    # its image slightly perturbed, so that the positive logits are near 100, past float32's exp() range
    # (exp(88.7)): random pairs' cosines stay below 0.7 and never reached it.
    image, text, logit_scale = make_inputs(n=50, dim=32, seed=3, scale=math.log(100))
    text = (image.detach() + 0.01 * text.detach()).requires_grad_()
    inputs = image, text, logit_scale
    chunked = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, chunk_size=16), *inputs)
    assert_same(chunked, loss_and_grads(contrastive_loss, *inputs))
    assert_same(chunked, loss_and_grads(naive_clip_loss, *inputs))


def test_the_chunked_loss_keeps_its_precision_when_every_pair_is_matched_confidently():
    # At scale 100 with well-separated pairs the loss is ~1e-9 and so are its gradients. Computed as
    # logsumexp(row) - positive logit, two float32 numbers near 100, they were rounding noise: the temperature's
    # gradient came out 180x too large with the wrong sign (which Adam's normalised step takes at full size).
    # Relative to float64's exact values, to the float32 loss's own relative precision.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(512, 64, generator=generator, dtype=torch.float64)
    image = base + 0.5 * torch.randn(512, 64, generator=generator, dtype=torch.float64)
    text = base + 0.5 * torch.randn(512, 64, generator=generator, dtype=torch.float64)
    exact_loss, exact = loss_and_grads(naive_clip_loss, image.clone().requires_grad_(), text.clone().requires_grad_(),
                                       torch.tensor(math.log(100), dtype=torch.float64, requires_grad=True))
    assert 1e-12 < exact_loss < 1e-6 and abs(exact[2]) > 0  # the regime meant: tiny, not zero
    logit_scale = torch.tensor(math.log(100), requires_grad=True)
    inputs = image.float().requires_grad_(), text.float().requires_grad_(), logit_scale
    loss, grads = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, chunk_size=100), *inputs)
    torch.testing.assert_close(loss, exact_loss, rtol=1e-4, atol=0)
    for grad, exact_grad in zip(grads, exact):
        assert (grad - exact_grad).norm() <= 1e-4 * exact_grad.norm(), (grad - exact_grad).norm() / exact_grad.norm()


def test_sigmoid_loss_matches_naive():
    image, text, _ = make_inputs(n=11, dim=8, seed=1)
    logit_scale = torch.tensor(SIGLIP_INITIAL_LOGIT_SCALE, requires_grad=True)
    logit_bias = torch.tensor(SIGLIP_INITIAL_LOGIT_BIAS, requires_grad=True)
    inputs = (image, text, logit_scale, logit_bias)
    assert_same(loss_and_grads(sigmoid_loss, *inputs), loss_and_grads(naive_sigmoid_loss, *inputs))


def test_siglip_initial_values_are_the_papers():
    assert math.exp(SIGLIP_INITIAL_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INITIAL_LOGIT_BIAS == -10.0


def test_losses_agree_with_open_clip_reference():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text, logit_scale = make_inputs(n=9, dim=8, seed=4)
    unit_image, unit_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    reference = open_clip_loss.ClipLoss()(unit_image, unit_text, logit_scale.exp())
    torch.testing.assert_close(contrastive_loss(image, text, logit_scale), reference, **TOLERANCE)
    bias = torch.tensor(-3.0)
    reference = open_clip_loss.SigLipLoss()(unit_image, unit_text, logit_scale.exp(), bias)
    torch.testing.assert_close(sigmoid_loss(image, text, logit_scale, bias), reference, **TOLERANCE)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_metrics_report_accuracy_and_temperature(chunk_size):
    loss_fn = ContrastiveLoss("clip", chunk_size=chunk_size)
    features = torch.randn(12, 8)
    loss, metrics = loss_fn(features, features.clone(), torch.tensor(math.log(100.0)))
    assert metrics["image_to_text_accuracy"].item() == 1.0
    assert metrics["text_to_image_accuracy"].item() == 1.0
    assert metrics["logit_scale_exp"].item() == pytest.approx(100.0)
    assert metrics["loss"].item() == pytest.approx(loss.item())

    swapped = torch.cat([features[6:], features[:6]])  # no row matches its own pair
    _, metrics = loss_fn(features, swapped, torch.tensor(math.log(100.0)))
    assert metrics["image_to_text_accuracy"].item() == 0.0

    # Every image finds its text, but text 1 lies nearer image 0 than image 1: the directions differ.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    _, metrics = loss_fn(images, texts, torch.tensor(0.0))
    assert metrics["image_to_text_accuracy"].item() == 1.0
    assert metrics["text_to_image_accuracy"].item() == pytest.approx(2 / 3)


def test_siglip_metrics_report_image_to_text_accuracy_temperature_and_bias():
    # The asymmetric case above: each image's best text is its own, though text 1 lies nearer image 0. The
    # accuracy is the image->text one (per row of the logits), and the bias is logged beside the temperature.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    loss, metrics = ContrastiveLoss("siglip")(images, texts, torch.tensor(math.log(10.0)), torch.tensor(-4.0))
    assert set(metrics) == {"loss", "image_to_text_accuracy", "logit_scale_exp", "logit_bias"}
    assert metrics["image_to_text_accuracy"].item() == 1.0
    assert metrics["logit_scale_exp"].item() == pytest.approx(10.0)
    assert metrics["logit_bias"].item() == -4.0
    assert metrics["loss"].item() == pytest.approx(loss.item())


def test_bad_inputs_give_clear_errors():
    image, text, logit_scale = make_inputs(n=4)
    with pytest.raises(ValueError, match="same shape|one shape"):
        contrastive_loss(image, text[:3], logit_scale)
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_loss(image, text, logit_scale, chunk_size=0)
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")(image, text, logit_scale)
    with pytest.raises(ValueError, match="unknown loss kind"):
        ContrastiveLoss("triplet")
    with pytest.raises(ValueError, match="CLIP loss only"):
        build_loss(LossConfig(kind="siglip", chunk_size=8))
    with pytest.raises(ValueError, match="CLIP loss only"):  # built directly, not through LossConfig's check
        ContrastiveLoss("siglip", chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):  # when the loss is built, not at the first step
        ContrastiveLoss("clip", chunk_size=0)
    # Without the check an empty batch failed inside argmax, with an IndexError about a reduction dim
    with pytest.raises(ValueError, match="batch is empty"):
        contrastive_loss(image[:0], text[:0], logit_scale)
    with pytest.raises(ValueError, match="batch is empty"):
        sigmoid_loss(image[:0], text[:0], logit_scale, torch.tensor(-10.0))
    # One scale per row (shape [B]) broadcasts over the [B, B] logits into a wrong loss without the check
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        contrastive_loss(image, text, logit_scale.detach().expand(4))


class TinyTwoTower(nn.Module):
    """Two linear encoders: enough to check that gradients reach parameters through features."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = nn.Linear(6, 8)
        self.text_encoder = nn.Linear(5, 8)
        if kind == "siglip":
            self.logit_scale = nn.Parameter(torch.tensor(SIGLIP_INITIAL_LOGIT_SCALE))
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INITIAL_LOGIT_BIAS))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.logit_bias = None


@pytest.mark.parametrize("cached_with_graph", [False, True], ids=["cached_without_graph", "cached_with_graph"])
@pytest.mark.parametrize("kind, chunk_size", [("clip", None), ("clip", 5), ("siglip", None)])
def test_cached_feature_accumulation_equals_full_batch(kind, chunk_size, cached_with_graph):
    # cached_with_graph: cached features that still carry their autograd graph count as constants too (the
    # function detaches them); backpropagated through, every pass would add the other rows' gradients again.
    model, loss_fn = TinyTwoTower(kind), ContrastiveLoss(kind, chunk_size=chunk_size)
    images, texts = torch.randn(12, 6), torch.randn(12, 5)
    micro_batches = 3

    full_loss, _ = loss_fn(model.image_encoder(images), model.text_encoder(texts), model.logit_scale, model.logit_bias)
    full_loss.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    with torch.set_grad_enabled(cached_with_graph):
        cached_images, cached_texts = model.image_encoder(images), model.text_encoder(texts)
    losses = []
    for index, (image_chunk, text_chunk) in enumerate(zip(images.chunk(micro_batches), texts.chunk(micro_batches))):
        loss, metrics = contrastive_loss_with_cached_features(
            loss_fn,
            cached_images,
            cached_texts,
            model.image_encoder(image_chunk),
            model.text_encoder(text_chunk),
            index,
            model.logit_scale,
            model.logit_bias,
        )
        loss.backward()
        losses.append(metrics["loss"])

    for loss in losses:
        torch.testing.assert_close(loss, full_loss.detach(), **TOLERANCE)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, full_grads[name], **TOLERANCE, msg=name)


def test_cached_features_reject_unequal_micro_batches():
    cached = torch.randn(10, 4)
    with pytest.raises(ValueError, match="equal micro-batches"):
        contrastive_loss_with_cached_features(
            ContrastiveLoss(), cached, cached, cached[:3], cached[:3], 0, torch.tensor(1.0)
        )
    with pytest.raises(ValueError, match="outside"):
        contrastive_loss_with_cached_features(
            ContrastiveLoss(), cached, cached, cached[:5], cached[:5], 2, torch.tensor(1.0)
        )


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_loss_stays_float32_under_autocast(chunk_size):
    image, text, logit_scale = make_inputs(n=10, dim=16, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(image.bfloat16(), text.bfloat16(), logit_scale, chunk_size=chunk_size)
    assert loss.dtype == torch.float32
    # Only the rounding of the inputs to bfloat16 differs, not the precision of the logits.
    reference = naive_clip_loss(image.bfloat16().float(), text.bfloat16().float(), logit_scale)
    torch.testing.assert_close(loss.double(), reference, **TOLERANCE)


def test_sigmoid_loss_stays_float32_under_autocast():
    # As the CLIP loss: the logits are computed in float32 also inside a bfloat16 autocast region.
    image, text, logit_scale = make_inputs(n=10, dim=16, seed=6)
    bias = torch.tensor(-3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_loss(image.bfloat16(), text.bfloat16(), logit_scale, bias)
    assert loss.dtype == torch.float32
    reference = naive_sigmoid_loss(image.bfloat16().float(), text.bfloat16().float(), logit_scale, bias)
    torch.testing.assert_close(loss.double(), reference, **TOLERANCE)


@pytest.mark.parametrize("loss", ["clip", "clip_chunked", "siglip"])
def test_float64_features_keep_float64_and_pass_a_gradient_check(loss):
    # The losses cast features to float32 for range under autocast; float64 ones were cast down too, so a
    # float64 model's loss (and every gradient check of it, the chunked backward's included) was float32.
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    text = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    logit_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    functions = {
        "clip": lambda i, t, s, b: contrastive_loss(i, t, s),
        "clip_chunked": lambda i, t, s, b: contrastive_loss(i, t, s, chunk_size=4),
        "siglip": sigmoid_loss,
    }
    assert functions[loss](image, text, logit_scale, logit_bias).dtype == torch.float64
    assert torch.autograd.gradcheck(functions[loss], (image, text, logit_scale, logit_bias))


def test_a_logit_scale_or_bias_that_is_no_one_element_tensor_is_refused_by_name():
    # A bias of the batch's length was broadcast over the columns (a different bias per text) without a word;
    # None and a float were AttributeErrors of their own
    from clip.loss import contrastive_loss, sigmoid_loss

    features = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    with pytest.raises(ValueError, match=r"^logit_bias must be a scalar, got shape \(2,\)$"):
        sigmoid_loss(features, features, torch.tensor(1.0), torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="^logit_bias must be a one-element tensor .* got NoneType$"):
        sigmoid_loss(features, features, torch.tensor(1.0), None)
    with pytest.raises(TypeError, match="^logit_scale must be a one-element tensor .* got float$"):
        contrastive_loss(features, features, 2.0)
    assert torch.isfinite(sigmoid_loss(features, features, torch.tensor(1.0), torch.tensor([-10.0])))
