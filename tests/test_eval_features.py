"""The evaluation's shared helpers (clip.evaluation.features) on their own: what the zero-shot, retrieval and
linear-probe tests go through only on their usual paths."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from clip.evaluation.features import (
    CutTexts,
    ReadableBatch,
    SkippedImage,
    SkipUnreadable,
    autocast,
    collate_readable,
    encode_image_batches,
    encode_texts,
    iterate_batches,
    log_skipped,
    make_loader,
    model_device,
    nonfinite_causes,
    unwrap_model,
)
from clip.evaluation.image_files import UnreadableImageError


class TextModel(nn.Module):
    """encode_text gives each text's first token id times a fixed vector: features of a known length."""

    context_length, vocab_size = 4, 10

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, :1].float() * torch.tensor([3.0, 4.0])


def first_token_tokenizer(texts, context_length, truncate=False):
    """Each text's token ids: its length, then zeros."""
    tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
    tokens[:, 0] = torch.tensor([len(text) for text in texts])
    return tokens


def test_a_compiled_model_is_unwrapped_to_the_model_it_compiles():
    # torch.compile's wrapper keeps the model as _orig_mod (a stand-in here: importing dynamo takes seconds)
    model, compiled = nn.Linear(2, 2), nn.Module()
    compiled._orig_mod = model
    assert unwrap_model(compiled) is model


def test_a_model_is_evaluated_on_its_parameters_device():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    assert model_device(model) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters


def test_no_warning_when_no_image_was_skipped(caplog):
    with caplog.at_level(logging.WARNING):
        log_skipped("zero-shot", 0, [])
        assert caplog.records == []
        log_skipped("zero-shot", 2, ["a.jpg: truncated"])
    assert "zero-shot: skipped 2 unreadable image(s); e.g. a.jpg: truncated" in caplog.text


def test_batches_of_images_alone_have_no_labels():
    # A loader's batches of 1-tuples (a TensorDataset of images), and a dataset of bare images collated
    one_tuples = [(torch.zeros(2, 3),), (torch.ones(1, 3),)]
    assert [labels for _, labels in iterate_batches(one_tuples, 2)] == [None, None]
    batch = collate_readable([torch.zeros(3), torch.ones(3)])
    assert batch.labels is None and batch.images.shape == (2, 3)
    images, labels = next(iterate_batches([ReadableBatch(batch.images, batch.labels, [])], 2))
    assert labels is None and torch.equal(images, batch.images)


def test_image_features_are_float32_under_bf16_autocast():
    model = nn.Module()
    model.encode_image = nn.Linear(3, 2)
    for normalize in (True, False):
        (features, _), = encode_image_batches(
            model, torch.ones(2, 3), device="cpu", precision="bf16", normalize=normalize
        )
        assert features.dtype == torch.float32


def test_text_features_normalized_only_when_asked():
    texts = ["a", "bb"]
    raw = encode_texts(TextModel(), texts, first_token_tokenizer, device="cpu", normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    unit = encode_texts(TextModel(), texts, first_token_tokenizer, device="cpu")
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [0.6, 0.8]]))


def test_text_encoding_refuses_no_texts_and_a_batch_size_of_zero():
    with pytest.raises(ValueError, match="no texts to encode"):
        encode_texts(TextModel(), [], first_token_tokenizer, device="cpu")
    with pytest.raises(ValueError, match="the text batch size must be >= 1, got 0"):
        encode_texts(TextModel(), ["a"], first_token_tokenizer, device="cpu", batch_size=0)


def test_a_token_id_equal_to_the_vocabulary_size_is_beyond_it():
    # ids run 0..vocab_size-1: the embedding has no row vocab_size
    encode_texts(TextModel(), ["a" * 9], first_token_tokenizer, device="cpu")
    with pytest.raises(ValueError, match="token id 10, but the model's vocabulary has 10 tokens"):
        encode_texts(TextModel(), ["a" * 10], first_token_tokenizer, device="cpu")


def test_the_causes_of_nonfinite_features_are_left_open_without_the_models_weights_dtype():
    unknown = nonfinite_causes()
    assert "precision fp16, or float16 weights" in unknown
    assert nonfinite_causes(None, "fp32") == unknown
    assert nonfinite_causes(nn.ReLU(), "fp32") == unknown  # no floating-point parameter to tell
    assert "a diverged run" in nonfinite_causes(nn.Linear(2, 2), "fp32")


def test_pinned_memory_only_for_a_gpu():
    dataset = torch.utils.data.TensorDataset(torch.zeros(4))
    assert make_loader(dataset, 2, 0, "cuda").pin_memory  # built, not iterated: no GPU needed
    assert not make_loader(dataset, 2, 0, "cpu").pin_memory


def test_texts_cut_to_the_context_are_counted_in_one_warning(caplog):
    # A line per batch of texts was about a hundred lines for COCO's captions on a small-context model
    def refusing_long_texts(texts, context_length, truncate=False):
        if not truncate and any(len(text) > 3 for text in texts):
            raise ValueError(f"text {max(texts, key=len)!r} is too long")
        return first_token_tokenizer([text[:3] for text in texts], context_length)

    texts = ["a", "long one", "bb", "longer one", "c", "longest one"]
    with caplog.at_level("WARNING"):
        features = encode_texts(TextModel(), texts, refusing_long_texts, device="cpu", batch_size=2, normalize=False)
    assert features[:, 0].tolist() == [3.0, 9.0, 6.0, 9.0, 3.0, 9.0]  # each long one cut to 3 characters
    assert [r.getMessage() for r in caplog.records] == [
        "3 of 6 texts are longer than the model's context and were cut to 4 tokens (the end token kept); the "
        "first: text 'long one' is too long"
    ]
    # A caller's CutTexts collects them over its calls, and warns when it says
    caplog.clear()
    cut = CutTexts()
    with caplog.at_level("WARNING"):
        for batch in (texts[:3], texts[3:]):
            encode_texts(TextModel(), batch, refusing_long_texts, device="cpu", batch_size=2, cut=cut)
    assert not caplog.records and cut.count == 3


def test_an_object_that_merely_has_an_orig_mod_attribute_is_not_unwrapped():
    # Only a module under _orig_mod is a compiled model's; any other value there is the model's own business
    model = nn.Linear(2, 2)
    model._orig_mod = "not a module"
    assert unwrap_model(model) is model


def test_autocast_computes_in_the_precision_asked_for_and_refuses_others():
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        with autocast("cpu", precision):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\], got 'fp8'"):
        autocast("cpu", "fp8")


def test_only_an_unreadable_image_is_skipped_not_any_error_of_the_dataset():
    # A bug in a dataset (or a missing file system) must stop the evaluation, not be counted as a skipped image
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            if index == 0:
                raise UnreadableImageError("a.jpg", "truncated")
            raise KeyError("a bug")

    assert isinstance(SkipUnreadable(Broken())[0], SkippedImage)
    with pytest.raises(KeyError, match="a bug"):
        SkipUnreadable(Broken())[1]


def test_a_single_loader_worker_is_shielded_from_the_jobs_signals_too():
    # One worker dies of a scheduler's SIGTERM as surely as several; only workers=0 runs in the trainer itself
    from clip.data.worker_signals import shield_worker_from_job_signals

    dataset = torch.utils.data.TensorDataset(torch.zeros(4))
    expected = shield_worker_from_job_signals if hasattr(__import__("signal"), "sigwaitinfo") else None
    assert make_loader(dataset, 2, 1, "cpu").worker_init_fn is expected
    assert make_loader(dataset, 2, 0, "cpu").worker_init_fn is None


def test_a_stacked_image_tensor_is_cut_into_consecutive_batches_without_labels():
    batches = list(iterate_batches(torch.arange(5), 2))
    assert [images.tolist() for images, _ in batches] == [[0, 1], [2, 3], [4]]
    assert [labels for _, labels in batches] == [None, None, None]


def test_a_loaders_image_label_pairs_keep_their_labels():
    pairs = [(torch.zeros(2, 3), torch.tensor([4, 7]))]
    (images, labels), = iterate_batches(pairs, 2)
    assert images.shape == (2, 3) and labels.tolist() == [4, 7]


def test_features_before_the_projection_need_a_model_of_this_library():
    # A TorchScript model from clip.load(jit=True) has only encode_image: an AttributeError said nothing of why
    model = nn.Module()
    model.encode_image = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="features before the projection need a model built by this library"):
        next(encode_image_batches(model, torch.ones(2, 3), device="cpu", unprojected=True))
