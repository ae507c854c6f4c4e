"""Zero-shot classification: prompt-ensemble math on planted embeddings, streamed metrics against a direct
computation, JSON output, the confusion PNG, and the notebook helper on a tiny real model."""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.evaluation import (
    build_zeroshot_classifier,
    evaluate_zeroshot,
    format_table,
    save_confusion_png,
    zeroshot_classify,
    zeroshot_classify_images,
)
from clip.evaluation.datasets import ImageFolderDataset
from clip.evaluation.features import NonFiniteFeaturesError
from clip.evaluation.templates import (
    DEFAULT_TEMPLATES,
    builtin_templates,
    load_classnames,
    load_templates,
    resolve_templates,
    validate_template,
)
from partly_unreadable import PartlyUnreadable


pytestmark = pytest.mark.usefixtures("single_torch_thread")


class PlantedTextModel(nn.Module):
    """encode_text returns a planted vector per prompt; encode_image passes features through. Records the
    train/eval mode and grad mode it was called in."""

    context_length = 8

    def __init__(self, planted: dict[str, list[float]]):
        super().__init__()
        self.prompts = list(planted)
        self.vectors = torch.tensor([planted[p] for p in self.prompts], dtype=torch.float32)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.seen_modes: list[tuple[bool, bool]] = []
        self.text_batches: list[int] = []

    def tokenize(self, texts: list[str], context_length: int) -> torch.Tensor:
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
        tokens[:, 0] = torch.tensor([self.prompts.index(t) for t in texts])
        return tokens

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.seen_modes.append((self.training, torch.is_grad_enabled()))
        self.text_batches.append(len(tokens))
        return self.vectors[tokens[:, 0]]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.seen_modes.append((self.training, torch.is_grad_enabled()))
        return images.float()


def planted_two_classes() -> tuple[PlantedTextModel, list[str], list[str]]:
    templates = ["a {}.", "the {}!", "{}?"]
    planted = {
        "a cat.": [3.0, 4.0],
        "the cat!": [0.0, 2.0],
        "cat?": [5.0, 0.0],
        "a dog.": [-1.0, 0.0],
        "the dog!": [0.0, -7.0],
        "dog?": [-2.0, -2.0],
    }
    return PlantedTextModel(planted), ["cat", "dog"], templates


def test_prompt_ensemble_matches_hand_computation():
    model, classnames, templates = planted_two_classes()
    weights = build_zeroshot_classifier(model, classnames, templates, model.tokenize, batch_size=100)
    assert weights.shape == (2, 2)  # D, C
    # cat: unit vectors (0.6, 0.8), (0, 1), (1, 0) -> mean (1.6, 1.8) / 3 -> renormalised.
    cat = torch.tensor([1.6, 1.8]) / math.sqrt(1.6**2 + 1.8**2)
    # dog: (-1, 0), (0, -1), (-1/sqrt2, -1/sqrt2) -> mean direction (-(1 + r), -(1 + r)), r = 1/sqrt2.
    dog = torch.tensor([-1.0, -1.0]) / math.sqrt(2.0)
    torch.testing.assert_close(weights[:, 0], cat)
    torch.testing.assert_close(weights[:, 1], dog)
    # Averaging the raw vectors instead would point elsewhere: (8/3, 6/3) -> (0.8, 0.6).
    assert not torch.allclose(weights[:, 0], torch.tensor([0.8, 0.6]), atol=1e-2)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 7])
def test_classifier_is_independent_of_batching_and_accepts_callables(batch_size):
    model, classnames, templates = planted_two_classes()
    reference = build_zeroshot_classifier(model, classnames, templates, model.tokenize, batch_size=100)
    model.text_batches.clear()
    batched = build_zeroshot_classifier(model, classnames, templates, model.tokenize, batch_size=batch_size)
    torch.testing.assert_close(batched, reference)
    # Whole classes' prompts a group at a time (3 templates: a batch of 4 holds one class's, 7 both classes'),
    # each group in batches of at most batch_size
    expected_batches = {1: [1] * 6, 2: [2, 1] * 2, 4: [3, 3], 7: [6]}[batch_size]
    assert model.text_batches == expected_batches
    callables = [lambda c: f"a {c}.", lambda c: f"the {c}!", lambda c: f"{c}?"]
    torch.testing.assert_close(build_zeroshot_classifier(model, classnames, callables, model.tokenize), reference)


def test_no_class_names_and_non_finite_class_embeddings_are_refused_by_the_classifier_builder():
    model, classnames, templates = planted_two_classes()
    # No classes: torch.cat of no columns failed with "expected a non-empty list of Tensors"
    with pytest.raises(ValueError, match="no class names given"):
        build_zeroshot_classifier(model, [], templates, model.tokenize)
    model.vectors[4, 1] = float("inf")  # "the dog!": the dog's prompt ensemble
    with pytest.raises(NonFiniteFeaturesError, match=r"1 of 2 class \(prompt ensemble\) features are NaN or inf"):
        build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    # evaluate_zeroshot judges them itself, after its all-reduce: the builder hands them over uncounted
    unchecked = build_zeroshot_classifier(model, classnames, templates, model.tokenize, check_finite=False)
    assert torch.isfinite(unchecked[:, 0]).all() and not torch.isfinite(unchecked[:, 1]).all()


def test_model_is_evaluated_in_eval_mode_without_grad_and_restored():
    model, classnames, templates = planted_two_classes()
    model.train()
    classifier = build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    zeroshot_classify(model, classifier, torch.randn(3, 2))
    assert model.seen_modes and all(mode == (False, False) for mode in model.seen_modes)
    assert model.training


def test_logits_are_cosine_similarities_times_the_models_logit_scale():
    # What the probabilities (the notebook helper's output) are the softmax of, as in openai/CLIP's model(image, text)
    model, classnames, templates = planted_two_classes()
    classifier = build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    images = torch.tensor([[3.0, 4.0], [-2.0, 0.5], [0.0, -10.0]])
    output = zeroshot_classify(model, classifier, images)
    expected = 10.0 * nn.functional.normalize(images, dim=-1) @ classifier  # exp(logit_scale) = 10
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(output.probabilities, expected.softmax(dim=1))
    assert output.predictions.tolist() == [0, 1, 1]  # one class per image
    # A model without a learned temperature gets CLIP's trained one, 100
    del model.logit_scale
    torch.testing.assert_close(zeroshot_classify(model, classifier, images).logits, expected * 10.0)


def test_classify_passes_a_loaders_labels_through_and_refuses_no_images():
    model, classnames, templates = planted_two_classes()
    classifier = build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    images, labels = torch.tensor([[3.0, 4.0], [-2.0, 0.5], [0.0, -10.0]]), torch.tensor([0, 1, 1])
    loader = torch.utils.data.DataLoader(list(zip(images, labels, strict=True)), batch_size=2)
    output = zeroshot_classify(model, classifier, loader)
    assert output.labels.tolist() == [0, 1, 1]
    torch.testing.assert_close(output.logits, zeroshot_classify(model, classifier, images).logits)
    assert zeroshot_classify(model, classifier, images).labels is None  # a bare tensor carries none
    # torch.cat of no logits failed with "expected a non-empty list of Tensors"
    with pytest.raises(ValueError, match="no images to classify"):
        zeroshot_classify(model, classifier, torch.zeros(0, 2))


def test_an_evaluation_stopped_by_an_error_ends_its_data_loaders_workers_at_once(monkeypatch):
    # The workers ended with the loader's iterator, which the kept error (a notebook keeps the last one) held
    # inside a suspended generator: two worker processes stayed alive after a Ctrl-C until it was dropped
    import multiprocessing

    import clip.evaluation.zeroshot as zeroshot_module

    model, classnames, templates = planted_two_classes()
    classifier = build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    data = [(torch.tensor([1.0, float(i)]), 0) for i in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, multiprocessing_context="fork")

    def interrupted(*args):
        raise KeyboardInterrupt

    # A user's loader with persistent workers keeps them for its next pass: ended after one, the next failed
    persistent = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, multiprocessing_context="fork",
                                             persistent_workers=True)
    for _ in range(2):
        assert len(zeroshot_classify(model, classifier, persistent).logits) == 16
    del persistent
    monkeypatch.setattr(zeroshot_module, "_class_scores", interrupted)
    for evaluation in (lambda: zeroshot_classify(model, classifier, loader),
                       # its loader is wrapped in the stop checks' generator
                       lambda: evaluate_zeroshot(model, loader, classnames, classifier=classifier)):
        kept = None
        try:
            evaluation()
        except KeyboardInterrupt as error:
            kept = error  # as a notebook keeps it: its traceback holds the evaluation's frames
            assert multiprocessing.active_children() == []
        assert kept is not None


def test_eval_mode_restores_each_submodules_own_mode():
    # A part kept in eval mode inside a training model (a locked tower) stays in eval mode afterwards.
    from torch import nn

    from clip.evaluation.features import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    model[1].eval()
    with eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training and not model[1].training


def brute_force_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int):
    top1 = (logits.argmax(1) == labels).float().mean().item()
    ranked = logits.argsort(dim=1, descending=True)[:, :k]
    topk = (ranked == labels[:, None]).any(1).float().mean().item()
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append((logits[mask].argmax(1) == c).float().mean().item() if mask.any() else None)
    return top1, topk, per_class


def test_metrics_match_a_direct_computation_on_planted_features():
    generator = torch.Generator().manual_seed(0)
    num_classes, dim = 7, 5
    classifier = nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1).t()
    labels = torch.randint(0, num_classes - 1, (60,), generator=generator)  # the last class has no images
    features = classifier.t()[labels] + 0.9 * torch.randn(60, dim, generator=generator)
    dataset = list(zip(features, labels.tolist(), strict=True))
    model, _, _ = planted_two_classes()
    classnames = [f"class {c}" for c in range(num_classes)]
    result = evaluate_zeroshot(
        model, dataset, classnames, classifier=classifier, batch_size=8, subsets={"odd": [1, 3, 5]}, name="planted"
    )
    # A precomputed classifier in half precision is used as float32 (it failed: "expected m1 and m2 to have the
    # same dtype"); its rounding may move a few predictions, not the order of the accuracy
    half = evaluate_zeroshot(model, dataset, classnames, classifier=classifier.half(), batch_size=8, name="half")
    assert half.top1 == pytest.approx(result.top1, abs=0.05)
    logits = nn.functional.normalize(features, dim=-1) @ classifier
    top1, top5, per_class = brute_force_metrics(logits, labels, num_classes, 5)
    assert 0.2 < top1 < 0.95  # neither trivial nor hopeless, so the comparison means something
    assert result.top1 == pytest.approx(top1)
    assert result.top5 == pytest.approx(top5) and result.top5_k == 5
    assert result.per_class_accuracy[-1] is None
    assert result.per_class_accuracy[:-1] == pytest.approx(per_class[:-1])
    present = [a for a in per_class if a is not None]
    assert result.mean_per_class_accuracy == pytest.approx(sum(present) / len(present))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for true, predicted in zip(labels, logits.argmax(1), strict=True):
        confusion[true, predicted] += 1
    assert result.confusion_matrix == confusion.tolist()
    odd = torch.isin(labels, torch.tensor([1, 3, 5]))
    assert result.subsets["odd"].num_samples == int(odd.sum())
    assert result.subsets["odd"].top1 == pytest.approx((logits[odd].argmax(1) == labels[odd]).float().mean().item())
    metrics = result.metrics()
    assert set(metrics) == {"top1", "top5", "mean_per_class", "odd/top1", "odd/top5", "odd/mean_per_class"}
    assert json.loads(json.dumps(result.to_dict()))["confusion_matrix"] == confusion.tolist()


def test_a_subset_without_images_has_no_accuracies_not_zero(caplog):
    from clip.evaluation.results import ClassificationCounts, summarize

    # With a few evaluation images a subset can have none: it reported 0% top-1, like a model that got all wrong
    model, _, _ = planted_two_classes()
    classifier = torch.eye(3)
    dataset = [(torch.tensor([1.0, 0.0, 0.0]), 0), (torch.tensor([0.0, 1.0, 0.0]), 1)]
    with caplog.at_level("WARNING"):
        result = evaluate_zeroshot(model, dataset, ["a", "b", "c"], classifier=classifier,
                                   subsets={"seen": [0, 1], "unseen": [2]}, name="few")
    unseen = result.subsets["unseen"]
    assert unseen.num_samples == 0 and unseen.top1 is None and unseen.mean_per_class_accuracy is None
    assert "few: subset unseen has no images; its accuracies are left out" in caplog.text
    assert "unseen/top1" not in result.metrics() and result.metrics()["seen/top1"] == 1.0
    # each subset metric is its own: a subset whose top-2 differs from its top-1
    counts = ClassificationCounts(3, top_k=2)
    counts.update(torch.tensor([[1.0, 2.0, 0.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 1]))
    metrics = summarize(counts, ["a", "b", "c"], {"ab": [0, 1]}).metrics()
    assert (metrics["ab/top1"], metrics["ab/top5"], metrics["ab/mean_per_class"]) == (0.5, 1.0, 0.5)
    assert json.loads(json.dumps(result.to_dict()))["subsets"]["unseen"]["top1"] is None
    row = [line for line in format_table([result]).splitlines() if "few/unseen" in line][0]
    assert row.split()[1:] == ["0", "1", "-", "-", "-"]
    # Every rank summarises the all-reduced counts alike: rank 0 alone says it (warn=False elsewhere)

    caplog.clear()
    counts = ClassificationCounts(3)
    counts.update(torch.eye(3)[:2], torch.tensor([0, 1]))
    with caplog.at_level("WARNING"):
        quiet = summarize(counts, ["a", "b", "c"], {"unseen": [2]}, "few", warn=False)
    assert quiet.subsets["unseen"].top1 is None and caplog.text == ""
    # A subset naming a class past the last is refused by name (not an IndexError from the counts)
    for outside in (3, -1):
        with pytest.raises(ValueError, match=r"subset 'typo' names classes outside 0\.\.2"):
            summarize(counts, ["a", "b", "c"], {"typo": [0, outside]})


def test_a_subset_naming_a_class_twice_is_refused():
    from clip.evaluation.results import ClassificationCounts, summarize

    # Its images were counted twice: 3 images, one of them wrong, made a subset of 5 samples
    counts = ClassificationCounts(2)
    counts.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"^subset 's' names class 1 more than once$"):
        summarize(counts, ["a", "b"], {"s": [1, 1, 0]})


def test_counts_round_trip_through_the_flat_tensor_ranks_all_reduce():
    # Every rank loads the summed as_tensor() back: the skipped count is part of it, and the counts are the
    # loaded values, not views of a tensor the caller may reuse
    from clip.evaluation.results import ClassificationCounts, summarize

    counts = ClassificationCounts(3, top_k=2)
    counts.update(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), torch.tensor([0, 1, 2]))
    counts.add_skipped(3)
    summed = ClassificationCounts(3, top_k=2)
    flat = counts.as_tensor() * 2  # two ranks that counted alike
    summed.load_tensor(flat)
    flat.zero_()
    assert summed.confusion.tolist() == [[2, 0, 0], [2, 0, 0], [2, 0, 0]]
    assert summed.topk_hits.tolist() == [2, 2, 0] and int(summed.skipped.sum()) == 6
    assert summarize(summed, ["a", "b", "c"]).num_skipped == 6
    with pytest.raises(ValueError, match="need at least one class"):
        ClassificationCounts(0)


def test_top_k_is_capped_at_the_number_of_classes():
    model, classnames, templates = planted_two_classes()
    dataset = [(torch.tensor([1.0, 1.0]), 0), (torch.tensor([-1.0, -1.0]), 0), (torch.tensor([1.0, 0.5]), 1)]
    result = evaluate_zeroshot(model, dataset, classnames, templates, tokenizer=model.tokenize)
    assert result.top5_k == 2 and result.top5 == 1.0
    assert result.top1 == pytest.approx(1 / 3)
    assert result.confusion_matrix == [[1, 1], [1, 0]]


def test_tied_logits_rank_the_true_class_as_argmax_does_so_top_k_is_never_below_top_1():
    # topk broke ties its own way: a collapsed model, whose logits all tie, scored top-1 100% and top-5 0% on
    # images of class 0 (argmax takes the first of the tied classes, topk took others)
    from clip.evaluation.results import ClassificationCounts, summarize

    counts = ClassificationCounts(10, top_k=5)
    labels = torch.tensor([0, 0, 4, 5, 9])
    counts.update(torch.zeros(5, 10), labels)
    result = summarize(counts, [f"class {c}" for c in range(10)])
    assert result.top1 == pytest.approx(2 / 5)  # argmax: class 0
    assert result.top5 == pytest.approx(3 / 5)  # ranks 1, 1, 5, 6, 10
    # a tie with the true class below it: ranked after the lower-indexed class, as argmax ranks it
    counts = ClassificationCounts(3, top_k=1)
    counts.update(torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]]), torch.tensor([0, 1]))
    assert counts.topk_hits.tolist() == [1, 0, 0] and counts.confusion.diagonal().tolist() == [1, 0, 0]


def test_logits_within_a_millionth_of_each_other_tie_so_a_name_given_twice_goes_to_its_first_class():
    # The float32 product rounds two identical class columns (ImageNet's two "missile" classes) apart by up to
    # 6e-8 of the score, by the batch size and the thread count: compared exactly, their images went to either
    # class by those (a review found top-1 0.10 to 0.22 on one set across batch sizes)
    from clip.evaluation.results import ClassificationCounts
    from clip.evaluation.zeroshot import ZeroShotOutput

    logits = torch.tensor([[20.0, 20.0 + 1e-5, 3.0], [20.0 + 1e-5, 20.0, 3.0], [20.0, 20.0 + 1e-3, 3.0]])
    counts = ClassificationCounts(3, top_k=1)
    counts.update(logits, torch.tensor([0, 1, 1]))
    assert counts.confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]  # 1e-3 of 20 is no tie: class 1
    assert counts.topk_hits.tolist() == [1, 1, 0]
    assert ZeroShotOutput(logits, None).predictions.tolist() == [0, 0, 1]
    # A masked class's -inf is no scale for the ties: every score tied with an infinite margin, class 0 won
    masked = torch.tensor([[1.0, 5.0, -math.inf]])
    assert ZeroShotOutput(masked, None).predictions.tolist() == [1]
    # Scores a tie apart from the best and from the truth, not from each other: the predicted true class is in
    # the top k (it was ranked past k, top-5 below top-1)
    counts = ClassificationCounts(7, top_k=5)
    counts.update(torch.tensor([[25.0 - 3e-5] * 5 + [25.0 - 1.2e-5, 25.0]]), torch.tensor([5]))
    assert counts.confusion[5, 5] == 1 and counts.topk_hits[5] == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_says_that_a_subset_has_no_images(monkeypatch, caplog, rank):
    # Every rank summarises the same all-reduced counts: each saying so repeated the line once per rank
    model, _, _ = planted_two_classes()
    as_two_identical_ranks(monkeypatch, rank)
    dataset = [(torch.tensor([1.0, 0.0]), 0), (torch.tensor([0.0, 1.0]), 1)] * 2
    with caplog.at_level("WARNING"):
        result = evaluate_zeroshot(model, dataset, ["cat", "dog", "bird"], classifier=torch.eye(2, 3),
                                   subsets={"birds": [2]}, name="d", dist_info=object())
    assert result.subsets["birds"].top1 is None and result.num_samples == 4
    said = "d: subset birds has no images; its accuracies are left out" in caplog.text
    assert said == (rank == 0)


def test_the_table_names_the_real_k():
    model, classnames, templates = planted_two_classes()
    result = evaluate_zeroshot(model, [(torch.ones(2), 0)], classnames, templates, tokenizer=model.tokenize, name="x")
    header = format_table([result]).splitlines()[0].split()
    assert header == ["dataset", "images", "classes", "top1", "top2", "mean/cls"]
    five = type(result)(**{**result.to_dict(), "name": "y", "top5_k": 5, "subsets": {}})
    mixed = format_table([result, five])
    assert mixed.splitlines()[0].split()[4] == "top-k" and "k = min(5, number of classes)" in mixed


def colour_features(image: Image.Image) -> torch.Tensor:
    """The planted models' 2-d image features: red and green of the first pixel, centred."""
    red, green = image.getpixel((0, 0))[:2]
    return torch.tensor([red - 128.0, green - 128.0])



def test_the_table_names_only_the_datasets_that_skipped_images():
    from clip.evaluation.results import ClassificationCounts, summarize

    clean, skipping = ClassificationCounts(2), ClassificationCounts(2)
    for counts in (clean, skipping):
        counts.update(torch.eye(2), torch.tensor([0, 1]))
    skipping.add_skipped(3)
    results = [summarize(clean, ["a", "b"], name="clean"), summarize(skipping, ["a", "b"], name="skipping")]
    assert format_table(results).splitlines()[-1] == "unreadable images skipped: skipping: 3"
    assert "unreadable" not in format_table(results[:1])


def test_the_table_names_the_classes_that_had_no_images():
    # An empty class folder (or one of .heic files only) made mean/cls an average over fewer classes than
    # the table's class count, without a word
    from clip.evaluation.results import ClassificationCounts, summarize

    complete, missing = ClassificationCounts(3), ClassificationCounts(6)
    complete.update(torch.eye(3), torch.tensor([0, 1, 2]))
    missing.update(torch.eye(6)[:2], torch.tensor([0, 1]))
    names = ["cat", "dog", "ship", "car", "bus", "owl"]
    results = [summarize(complete, names[:3], name="complete"), summarize(missing, names, name="missing")]
    assert format_table(results).splitlines()[-1] == (
        "classes without images (mean/cls averages the others): missing: 4 of 6 (ship, car, bus, ...)"
    )
    # exactly as many as shown: all listed, none left for "..."
    three_missing = ClassificationCounts(4)
    three_missing.update(torch.eye(4)[:1], torch.tensor([0]))
    assert format_table([summarize(three_missing, names[:4], name="three")]).splitlines()[-1].endswith(
        "three: 3 of 4 (dog, ship, car)")
    assert "without images" not in format_table(results[:1])


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    model, classnames, templates = planted_two_classes()
    colours = {"cat": [(255, 255, 0), (255, 0, 0), (0, 0, 0)], "dog": [(0, 0, 0), (0, 255, 0), (255, 255, 0)]}
    for folder, pixels in colours.items():
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i, pixel in enumerate(pixels):
            Image.new("RGB", (2, 2), pixel).save(tmp_path / "data" / folder / f"{i}.png")
    clean = evaluate_zeroshot(
        model, ImageFolderDataset(tmp_path / "data", colour_features), classnames, templates, tokenizer=model.tokenize
    )
    (tmp_path / "data" / "cat" / "1b_truncated.png").write_bytes(
        (tmp_path / "data" / "cat" / "1.png").read_bytes()[:40]
    )
    (tmp_path / "data" / "dog" / "0a_text.png").write_text("<html>not found</html>")
    (tmp_path / "data" / "dog" / "3_empty.png").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path / "data", colour_features)
    assert len(dataset) == 9
    with caplog.at_level("WARNING"):
        results = [
            evaluate_zeroshot(model, dataset, classnames, templates, tokenizer=model.tokenize, batch_size=b, name="d")
            for b in (1, 2, 3, 9)
        ]
    assert "zero-shot d: skipped 3 unreadable image(s)" in caplog.text
    for result in results:
        # The same numbers as without the broken files, whatever the batch size.
        assert result.num_skipped == 3 and result.num_samples == clean.num_samples == 6
        assert result.confusion_matrix == clean.confusion_matrix and result.top1 == clean.top1
        assert result.metrics()["num_skipped"] == 3 and result.to_dict()["num_skipped"] == 3
    assert "unreadable images skipped: d: 3" in format_table(results[:1])
    assert clean.num_skipped == 0 and "num_skipped" not in clean.metrics()


def partly_unreadable(unreadable: set[int]) -> PartlyUnreadable:
    """Five (features, label) items; those at `unreadable` raise as an undecodable file does."""
    items = [(torch.tensor([1.0, 0.0]) if i % 2 else torch.tensor([0.0, -1.0]), i % 2) for i in range(5)]
    return PartlyUnreadable(items, unreadable)


def test_progress_counts_the_images_read_so_far_skipped_ones_included():
    # The CLI's progress line says "N of <dataset size> images": skipped images are part of that size
    model, classnames, templates = planted_two_classes()
    done: list[int] = []
    result = evaluate_zeroshot(model, partly_unreadable({1, 3}), classnames, templates, tokenizer=model.tokenize,
                               batch_size=3, progress=done.append)
    assert done == [3, 5]  # batch 0..2: 2 read + 1 skipped; batch 3..4: 1 more read + 1 more skipped
    assert result.num_samples == 3 and result.num_skipped == 2


def test_unlabelled_images_are_a_clear_error():
    # A dataset of bare images failed inside the counts with "'NoneType' object has no attribute 'to'"
    model, classnames, templates = planted_two_classes()
    with pytest.raises(ValueError, match=r"evaluate_zeroshot needs labelled data: \(image, label\) pairs"):
        evaluate_zeroshot(model, [torch.ones(2), -torch.ones(2)], classnames, templates, tokenizer=model.tokenize)


def test_no_readable_image_is_an_error_not_zero_accuracy(tmp_path):
    model, classnames, templates = planted_two_classes()
    for folder in classnames:
        (tmp_path / "data" / folder).mkdir(parents=True)
        (tmp_path / "data" / folder / "0.png").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path / "data", colour_features)
    with pytest.raises(ValueError, match="zero-shot d: none of its 2 images is readable"):
        evaluate_zeroshot(model, dataset, classnames, templates, tokenizer=model.tokenize, name="d")
    with pytest.raises(ValueError, match="zero-shot dataset: no images"):
        evaluate_zeroshot(model, [], classnames, templates, tokenizer=model.tokenize)


def test_non_finite_features_are_an_error_not_a_prediction():
    # argmax takes NaN for the largest value: a NaN image was "predicted" as its first NaN class, and an
    # all-NaN model scored whatever share of images class 0 had
    model, classnames, templates = planted_two_classes()
    images = [(torch.tensor([1.0, 0.0]), 0), (torch.tensor([float("nan"), 0.0]), 0), (torch.tensor([0.0, -1.0]), 1)]
    with pytest.raises(ValueError, match="1 of 3 zero-shot d image features are NaN or inf, which no evaluation can "
                                         "use: a model whose weights are non-finite"):
        evaluate_zeroshot(model, images, classnames, templates, tokenizer=model.tokenize, name="d")
    model.vectors[4, 1] = float("inf")  # "the dog!": the dog's prompt ensemble
    with pytest.raises(ValueError, match=r"1 of 2 class \(prompt ensemble\) features are NaN or inf"):
        evaluate_zeroshot(model, images[:1], classnames, templates, tokenizer=model.tokenize)


def as_two_identical_ranks(monkeypatch, rank: int = 0) -> None:
    """evaluate_zeroshot in this process as `rank` of two, the other rank's counts a copy of this one's."""
    import clip.evaluation.zeroshot as zeroshot_module

    monkeypatch.setattr(zeroshot_module, "distributed_world", lambda dist_info: (rank, 2))
    monkeypatch.setattr(zeroshot_module, "all_reduce_sum", lambda tensor, world_size: tensor * world_size)


def test_non_finite_class_embeddings_are_counted_once_however_many_ranks_built_them(monkeypatch):
    # Every rank builds the whole classifier: summed over two ranks, one NaN class of two read "2 of 2"
    model, classnames, templates = planted_two_classes()
    model.vectors[4, 1] = float("inf")  # "the dog!": the dog's prompt ensemble
    as_two_identical_ranks(monkeypatch)
    dataset = [(torch.ones(2), 0), (-torch.ones(2), 1)]
    with pytest.raises(NonFiniteFeaturesError, match=r"^1 of 2 class \(prompt ensemble\) features are NaN or inf"):
        evaluate_zeroshot(model, dataset, classnames, templates, tokenizer=model.tokenize, dist_info=object())


def test_the_advice_for_non_finite_features_fits_the_models_dtype_and_the_precision():
    # "evaluate with precision fp32" was given to every model: clip.load's float16 weights on CUDA overflow
    # under any precision setting (fp32 being no autocast), and fp32 was often the precision already in use
    model, classnames, templates = planted_two_classes()
    images = [(torch.tensor([float("inf"), 0.0]), 0)]

    def error(precision: str) -> str:
        with pytest.raises(NonFiniteFeaturesError) as raised:
            evaluate_zeroshot(model, images, classnames, templates, tokenizer=model.tokenize, precision=precision)
        return str(raised.value)

    assert error("fp16").endswith("activations beyond float16's range (evaluate with precision fp32)")
    for precision in ("fp32", "bf16"):
        assert error(precision).endswith(": a model whose weights are non-finite or too large (a diverged run)")
    model.half()  # as clip.load gives on CUDA
    for precision in ("fp32", "bf16", "fp16"):
        assert error(precision).endswith(
            "activations beyond the range of its float16 weights (clip.load's on CUDA): evaluate float32 weights, "
            "model.float()"
        )


def test_labels_outside_the_classes_are_an_error():
    model, classnames, templates = planted_two_classes()
    for label in (2, -1):
        with pytest.raises(ValueError, match=rf"labels must lie in 0\.\.1, got {label}\.\.{label}"):
            evaluate_zeroshot(model, [(torch.ones(2), label)], classnames, templates, tokenizer=model.tokenize)


def test_subsets_and_a_classifier_that_do_not_fit_the_class_names_are_errors():
    model, classnames, templates = planted_two_classes()
    dataset = [(torch.ones(2), 0), (-torch.ones(2), 1)]
    # -1 would index the last class from the end, silently
    for outside in ([-1], [2]):
        with pytest.raises(ValueError, match=r"subset 'bad' names classes outside 0..1"):
            evaluate_zeroshot(model, dataset, classnames, templates, tokenizer=model.tokenize, subsets={"bad": outside})
    with pytest.raises(ValueError, match="classifier has 3 classes, but 2 class names were given"):
        evaluate_zeroshot(model, dataset, classnames, classifier=torch.eye(2, 3))


def test_a_ready_loader_cannot_be_sharded_across_ranks(monkeypatch):
    # Its batches are already made: each rank would classify all of them and the all-reduce count them twice
    model, classnames, templates = planted_two_classes()
    as_two_identical_ranks(monkeypatch)
    loader = torch.utils.data.DataLoader([(torch.ones(2), 0), (-torch.ones(2), 1)], batch_size=2)
    with pytest.raises(ValueError, match="pass a Dataset, not a DataLoader, to shard evaluation across ranks"):
        evaluate_zeroshot(model, loader, classnames, templates, tokenizer=model.tokenize, dist_info=object())


def test_confusion_png_is_written_or_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    model, classnames, templates = planted_two_classes()
    result = evaluate_zeroshot(model, [(torch.ones(2), 0)], classnames, templates, tokenizer=model.tokenize, name="x")
    path = save_confusion_png(result, tmp_path / "confusion.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level("INFO"):
        assert save_confusion_png(result, tmp_path / "skipped.png") is None
    assert not (tmp_path / "skipped.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_templates_are_checked_and_read_from_files(tmp_path):
    for template in DEFAULT_TEMPLATES:
        validate_template(template)
    # Each refused by the validator, in its own words: "{0" made str.format raise a ValueError of its own, so
    # without a match that case passed whatever the validator did
    for bad, message in [
        ("no placeholder", "template 'no placeholder' must contain exactly one '{}' for the class name"),
        ("{} and {}", "template '{} and {}' must contain exactly one '{}' for the class name"),
        ("{name}", "template '{name}' is not a format string with one '{}': its field '{name}' must be a plain '{}'"),
        ("{0", "template '{0' is not a format string with one '{}': "),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            validate_template(bad)
    (tmp_path / "t.json").write_text('["a photo of a {}.", "art of the {}"]')
    (tmp_path / "t.txt").write_text("# my prompts\na photo of a {}.\n\nart of the {}\n")
    assert (
        load_templates(tmp_path / "t.json")
        == load_templates(tmp_path / "t.txt")
        == ["a photo of a {}.", "art of the {}"]
    )
    assert resolve_templates("simple") == ["a photo of a {}."]
    (tmp_path / "bad.txt").write_text("a photo\n")
    # The file is named: clip-zeroshot said only "template 'a photo' must contain ..." for a templates_file
    with pytest.raises(ValueError, match=r"bad\.txt: template 'a photo' must contain exactly one"):
        load_templates(tmp_path / "bad.txt")
    # A file whose name holds "{}" is still read as a file, not refused as a single template
    (tmp_path / "for {}.txt").write_text("a photo of a {}.\n")
    assert resolve_templates(str(tmp_path / "for {}.txt")) == ["a photo of a {}."]
    # A folder is not a templates or class names file: said so, not an IsADirectoryError
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        load_classnames(tmp_path / "nowhere.txt")
    with pytest.raises(IsADirectoryError, match="class names file .* is a folder; give the file"):
        load_classnames(tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_first_entry(tmp_path):
    (tmp_path / "names.txt").write_text("\ufefftench\ngoldfish\n", encoding="utf-8")
    assert load_classnames(tmp_path / "names.txt") == ["tench", "goldfish"]
    (tmp_path / "t.json").write_text('\ufeff["a photo of a {}."]', encoding="utf-8")
    assert load_templates(tmp_path / "t.json") == ["a photo of a {}."]


def test_lines_copied_from_a_python_list_are_unquoted(tmp_path):
    # What users copy out of the CLIP paper's prompts.md: one quoted string per line, with a comma.
    (tmp_path / "t.txt").write_text("# CIFAR templates\n    'a photo of a {}.',\n    \"a {}'s photo.\",\n'the {}.'\n")
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}.", "a {}'s photo.", "the {}."]
    (tmp_path / "names.txt").write_text("    \"Cote d'Ivoire\",\n    'colt\\'s foot',\n")
    assert load_classnames(tmp_path / "names.txt") == ["Cote d'Ivoire", "colt's foot"]
    # The list's last line copied along: half code, half strings, is refused with the reason.
    (tmp_path / "code.txt").write_text("    'a photo of a {}.',\n]\n")
    with pytest.raises(ValueError, match="some lines are quoted Python strings .* and some are not .*']'"):
        load_templates(tmp_path / "code.txt")
    # A list wrapped several strings to a line (as OpenAI's ImageNet class names are written) gives each; they
    # kept their quotes and commas, one "class name" per line
    (tmp_path / "two.txt").write_text("'tench',\n'goldfish', \"carp\",\n\"great white shark\", 'tiger shark'\n")
    assert load_classnames(tmp_path / "two.txt") == ["tench", "goldfish", "carp", "great white shark", "tiger shark"]
    (tmp_path / "one.txt").write_text("'tench, Tinca tinca',\n'goldfish, Carassius auratus'\n")  # commas inside
    assert load_classnames(tmp_path / "one.txt") == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    # A line that is more than quoted strings is no list line: with quoted lines beside it, refused
    for line in ("'goldfish', carp", "'goldfish' + 'carp'", "'goldfish', 3", "('goldfish', 'carp')"):
        (tmp_path / "mixed.txt").write_text(f"'tench',\n{line}\n")
        with pytest.raises(ValueError, match="some lines are quoted Python strings .* and some are not .*goldfish"):
            load_classnames(tmp_path / "mixed.txt")
    # Plain templates that merely contain quotes are not touched.
    (tmp_path / "plain.txt").write_text("a \"{}\" sign\n'{}' in quotes, said twice\n")
    assert load_templates(tmp_path / "plain.txt") == ['a "{}" sign', "'{}' in quotes, said twice"]
    # A line Python's parser runs out of memory on is not a list's line, but a line as it stands
    deep = "'tench', " + "-" * 100_000 + "1"
    (tmp_path / "deep.txt").write_text(deep + "\n")
    assert load_classnames(tmp_path / "deep.txt") == [deep]


def test_a_python_list_copied_whole_is_read_as_its_strings(tmp_path):
    # The CLIP paper's prompts.md writes each list in Python, single-quoted: copied with its brackets it was
    # refused as "not valid JSON"
    (tmp_path / "t.txt").write_text("[\n    'a photo of a {}.',\n    \"a {}'s photo.\",  # a comment\n]\n")
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}.", "a {}'s photo."]
    (tmp_path / "names.json").write_text("['airplane', 'automobile',]")
    assert load_classnames(tmp_path / "names.json") == ["airplane", "automobile"]
    # Copied indented, after a blank line: Python reads an indented first line as an IndentationError
    (tmp_path / "indented.txt").write_text("\n    ['a photo of a {}.',\n     'a {}.']\n")
    assert load_templates(tmp_path / "indented.txt") == ["a photo of a {}.", "a {}."]
    # Anything but a list of strings is still not valid JSON: a number among them, a call, a name
    # and neither is one Python's parser fails on otherwise: an unhashable key, a nesting beyond its memory
    unparsable = ("['a {}.', {[]: 1}]", "['a {}.', " + "-" * 100_000 + "1]")
    for text in ("['a {}.', 3]", "['a {}.'] + ['b {}.']", "[print('a {}.')]", "[x]", "['a {}.'", *unparsable):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=r"bad\.txt: not valid JSON"):
            load_templates(tmp_path / "bad.txt")


def test_a_python_list_copied_with_its_assignment_is_read_as_its_strings(tmp_path):
    # prompts.md and OpenAI's ImageNet notebook write every list as an assignment; copied along with the list,
    # `templates = [` was refused as a line that is not a quoted string among lines that are
    (tmp_path / "templates.txt").write_text("templates = [\n    'a photo of a {}.',\n    'a blurry photo of a {}.',\n]\n")
    assert load_templates(tmp_path / "templates.txt") == ["a photo of a {}.", "a blurry photo of a {}."]
    # The notebook's 1000 names are one line of double-quoted strings, some with an apostrophe
    (tmp_path / "names.txt").write_text('imagenet_classes = ["tench", "Geoffroy\'s spider monkey", "missile"]')
    assert load_classnames(tmp_path / "names.txt") == ["tench", "Geoffroy's spider monkey", "missile"]
    # Annotated, as typed code writes it: it ended in the error for a mix of quoted and unquoted lines
    (tmp_path / "typed.txt").write_text("templates: list[str] = [\n    'a photo of a {}.',\n]\n")
    assert load_templates(tmp_path / "typed.txt") == ["a photo of a {}."]
    # What follows the assignment must be one whole list of strings: not cut short, nor followed by code or
    # another list (the whole of a prompts.md block), which would be read as templates, line by line
    for text in ("templates = [\n    'a photo of a {}.',\n", "templates = ['a {}.'] + more\n",
                 "classes = [\n    'cat',\n]\n\ntemplates = [\n    'a photo of a {}.',\n]\n"):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=r"bad\.txt: starts as a Python list's assignment \('(templates|classes) "
                                             r"='\), but what follows is not one whole list of strings"):
            load_templates(tmp_path / "bad.txt")


def test_several_names_per_class_are_read_as_each_classes_names(tmp_path):
    # prompts.md gives FER2013 several names for some classes, a list of lists: it was refused ("not supported")
    fer = "[\n    ['angry'],\n    ['happy', 'smiling'],\n]\n"
    for text in (fer, "classes = " + fer, '[["angry"], ["happy", "smiling"]]', '["angry", ["happy", "smiling"]]'):
        (tmp_path / "names.txt").write_text(text)
        assert load_classnames(tmp_path / "names.txt") == ["angry", ["happy", "smiling"]]
    # Templates take one string each still; a class with no names at all is no class
    (tmp_path / "t.txt").write_text("[['a photo of a {}.'], ['a {}.', 'the {}.']]")
    with pytest.raises(ValueError, match=r"t\.txt: a list of lists, several templates to an entry .* not supported"):
        load_templates(tmp_path / "t.txt")
    # The lines of the paper's list copied without its brackets
    (tmp_path / "names.txt").write_text("    ['angry'],\n    ['happy', 'smiling'],\n")
    assert load_classnames(tmp_path / "names.txt") == ["angry", ["happy", "smiling"]]
    # A malformed entry is named: was "expected a JSON list of strings"
    for text, entry in [('[["angry"], []]', "entry 1 ([])"), ('[["angry"], [["happy"]]]', "entry 1 ([['happy']])"),
                        ('[["angry"], ["happy", 3]]', "entry 1 (['happy', 3])"), ('[{"a": 1}, ["b"]]', "entry 0 ({'a': 1})")]:
        (tmp_path / "names.txt").write_text(text)
        with pytest.raises(ValueError, match=rf"names\.txt: {re.escape(entry)} is neither a name nor a list of names"):
            load_classnames(tmp_path / "names.txt")
    # A blank name, alone or among a class's names, is said as the file is read, not when it is first prompted
    for text in ('["angry", ""]', '[["angry"], ["happy", " "]]'):
        (tmp_path / "names.txt").write_text(text)
        with pytest.raises(ValueError, match=r"names\.txt: entry 1 .* holds a blank name"):
            load_classnames(tmp_path / "names.txt")


def test_a_class_of_several_names_is_the_mean_of_all_their_prompts():
    # The CLIP paper's FER2013 classes: ['happy', 'smiling'] averages the prompts of both names
    templates = ["a {}.", "the {}!"]
    planted = {"a cat.": [3.0, 4.0], "the cat!": [0.0, 2.0], "a kitten.": [1.0, 0.0], "the kitten!": [0.0, -5.0],
               "a dog.": [-1.0, 0.0], "the dog!": [0.0, -7.0]}
    model = PlantedTextModel(planted)
    weights = build_zeroshot_classifier(model, [["cat", "kitten"], "dog"], templates, model.tokenize, batch_size=100)
    # cat: unit vectors (0.6, 0.8), (0, 1), (1, 0), (0, -1) -> mean (1.6, 0.8) / 4 -> renormalised
    torch.testing.assert_close(weights[:, 0], torch.tensor([1.6, 0.8]) / math.sqrt(1.6**2 + 0.8**2))
    torch.testing.assert_close(weights[:, 1], torch.tensor([-1.0, -1.0]) / math.sqrt(2.0))
    # Whatever the batching (a class of 4 prompts alone when the batch holds 2 or 3), a tuple as a list, one
    # name in a list as that name
    for batch_size in (1, 2, 3, 5):
        torch.testing.assert_close(build_zeroshot_classifier(
            model, [("cat", "kitten"), ["dog"]], templates, model.tokenize, batch_size=batch_size), weights)
    model.text_batches.clear()
    build_zeroshot_classifier(model, [["cat", "kitten"], "dog"], templates, model.tokenize, batch_size=5)
    assert model.text_batches == [4, 2]  # whole classes a group at a time: 4 + 2 prompts are more than 5
    # The result names the class by its first name; what is wrong in the names is said where it is
    features = torch.tensor([[1.0, 0.2], [-1.0, -1.0]])
    result = evaluate_zeroshot(model, list(zip(features, [0, 1], strict=True)), [["cat", "kitten"], "dog"],
                               templates, tokenizer=model.tokenize)
    assert result.classnames == ["cat", "dog"] and result.top1 == 1.0
    with pytest.raises(ValueError, match=r"classnames\[0\] is an empty list"):
        build_zeroshot_classifier(model, [[], "dog"], templates, model.tokenize)
    with pytest.raises(TypeError, match=r"classnames\[0\]\[1\] is None"):
        build_zeroshot_classifier(model, [["cat", None], "dog"], templates, model.tokenize)


def test_a_mapping_of_labels_to_names_is_refused_not_read_line_by_line(tmp_path):
    # ImageNet's widely copied {0: 'tench, Tinca tinca', ...} gave one "name" per line of its source, as many
    # as the classes, so the count check passed and every prompt held a line of Python
    refusal = (r"a mapping \(\{...\}\), not a list: class names are read from a JSON list of strings or from one per "
               r"line, in label order$")
    for name, text in [
        ("imagenet1000_clsidx_to_labels.txt", "{0: 'tench, Tinca tinca',\n 1: 'goldfish, Carassius auratus'}\n"),
        ("class_index.json", '{"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}'),
        ("opened.txt", '{\n  "0": "tench",\n  "1": "goldfish"\n}\n'),
        ("synonyms.txt", "{0: ['tench', 'Tinca tinca'],\n 1: ['goldfish']}\n"),  # a list of names per label
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=refusal):
            load_classnames(tmp_path / name)
    # A templates file is told the same, without a label order it does not have
    (tmp_path / "templates.txt").write_text("{'a photo of a {}.',\n 'a drawing of a {}.'}\n")
    with pytest.raises(ValueError) as raised:
        load_templates(tmp_path / "templates.txt")
    assert str(raised.value).endswith("not a list: templates are read from a JSON list of strings or from one per line")
    # A template that starts with its placeholder is not a mapping
    (tmp_path / "t.txt").write_text("{} in a photo.\n")
    assert load_templates(tmp_path / "t.txt") == ["{} in a photo."]


def test_a_templates_file_starting_with_a_numbered_placeholder_is_not_taken_for_a_mapping(tmp_path):
    # "{0}" is a template's placeholder as "{}" is: a file whose first template began with it was refused as a
    # mapping ({0: 'tench', ...}), for the digit after the brace
    (tmp_path / "t.txt").write_text("{0}\n{0} on a table.\n")
    assert load_templates(tmp_path / "t.txt") == ["{0}", "{0} on a table."]
    (tmp_path / "spec.txt").write_text("{0:>5} in a photo.\n")  # refused as the template it is, not as a mapping
    with pytest.raises(ValueError, match="must be a plain"):
        load_templates(tmp_path / "spec.txt")


def test_templates_given_by_name_or_as_a_list_are_checked():
    assert builtin_templates("simple") == ["a photo of a {}."]
    with pytest.raises(ValueError, match=r"unknown built-in template set 'fancy'; choose one of \['default', 'simple'\]"):
        builtin_templates("fancy")
    # A list from the notebook helpers or the Python API is checked as a templates file is
    with pytest.raises(ValueError, match="no templates given"):
        resolve_templates([])
    with pytest.raises(ValueError, match=r"template 'a \{\} and \{\}' must contain exactly one"):
        resolve_templates(["a photo of a {}.", "a {} and {}"])
    template = "a sketch of a {}.".format
    assert resolve_templates(["a {}.", template]) == ["a {}.", template]  # a callable is taken as it is
    with pytest.raises(ValueError, match="template 5 is a int, not a string"):  # nor a callable
        resolve_templates(["a {}.", 5])


def test_class_names_files_in_each_form_they_are_read_from(tmp_path):
    # A JSON list is recognised by its opening bracket whatever the file's name
    (tmp_path / "names.txt").write_text('["tench", "goldfish"]\n')
    assert load_classnames(tmp_path / "names.txt") == ["tench", "goldfish"]
    # One per line: the spaces around a name and blank lines are not part of the names
    (tmp_path / "spaced.txt").write_text("tench  \n\n   \n  goldfish\n")
    assert load_classnames(tmp_path / "spaced.txt") == ["tench", "goldfish"]
    # Class names have no comment lines: a name that starts with '#' is a name
    (tmp_path / "hash.txt").write_text("#1 pencil\ntench\n")
    assert load_classnames(tmp_path / "hash.txt") == ["#1 pencil", "tench"]
    # A JSON list of anything but strings is refused, not turned into prompts made of numbers
    for name, text in [("numbers.json", '["tench", 3]'), ("string.json", '"tench"')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: expected a JSON list of strings"):
            load_classnames(tmp_path / name)
    # A mapping whose opening brace has a line of its own is refused as one, whatever its keys look like
    (tmp_path / "mapping.txt").write_text("{\n  tench: 0,\n  goldfish: 1\n}\n")
    with pytest.raises(ValueError, match=r"mapping\.txt: a mapping"):
        load_classnames(tmp_path / "mapping.txt")
    # A file with no entries is an error, not zero classes or templates
    (tmp_path / "empty.txt").write_text("# no templates yet\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: no templates entries found"):
        load_templates(tmp_path / "empty.txt")


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=32, width=32, layers=1, heads=2),
    )
    return clip.create_model(config).eval()


def test_notebook_helper_on_a_tiny_model():
    from clip.preprocess import image_transform

    model = tiny_clip()
    images = [Image.new("RGB", (40, 30), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 128, 0)]]
    classnames = ["red square", "blue square", "green square"]
    probabilities, names = zeroshot_classify_images(model, image_transform(32), images, classnames)
    assert probabilities.shape == (3, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    assert names == [classnames[i] for i in probabilities.argmax(1).tolist()]


def test_a_single_template_string_and_no_images_are_clear_errors():
    from clip.preprocess import image_transform

    with pytest.raises(ValueError, match=r"pass a single template as a list: \['a photo of a \{\}\.'\]"):
        resolve_templates("a photo of a {}.")
    with pytest.raises(ValueError, match="no images"):
        zeroshot_classify_images(tiny_clip(), image_transform(32), [], ["cat", "dog"])


def test_notebook_mistakes_are_named_before_any_work():
    # Each of these failed deep inside (len() of an Image, torchvision's "Unexpected type <class 'str'>"),
    # or, for a class name given as one string, ran on one class per character.
    from clip.preprocess import image_transform

    model, preprocess, image = tiny_clip(), image_transform(32), Image.new("RGB", (40, 30))
    with pytest.raises(TypeError, match=r"single PIL image; pass a list of images, e.g. \[image\]"):
        zeroshot_classify_images(model, preprocess, image, ["cat", "dog"])
    with pytest.raises(TypeError, match=r"images\[1\] is a file path \('b.png'\), not an image: open it first"):
        zeroshot_classify_images(model, preprocess, [image, "b.png"], ["cat", "dog"])
    with pytest.raises(TypeError, match=r"images\[0\] is a file path \(\w*Path\('a.png'\)\), not an image"):
        zeroshot_classify_images(model, preprocess, [pathlib.Path("a.png")], ["cat", "dog"])  # as glob() gives
    with pytest.raises(TypeError, match="images must be a list of PIL images, got generator"):
        zeroshot_classify_images(model, preprocess, (image for _ in range(2)), ["cat", "dog"])
    with pytest.raises(TypeError, match=r"classnames='cat' is a string; pass a list of class names, e.g. \['cat'\]"):
        zeroshot_classify_images(model, preprocess, [image], "cat")


def test_a_notebook_image_that_cannot_be_decoded_is_named(tmp_path):
    # Image.open reads only the header: a truncated file failed inside the resize with PIL's "image file is
    # truncated", naming neither the image nor its place in the list
    from clip.preprocess import image_transform

    Image.new("RGB", (400, 400), (200, 30, 30)).save(tmp_path / "whole.jpg")  # half of it is past the header
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    images = [Image.open(tmp_path / "whole.jpg"), Image.open(tmp_path / "cut.jpg")]
    with pytest.raises(OSError, match=r"images\[1\] \(.*cut\.jpg\) cannot be decoded: image file is truncated"):
        zeroshot_classify_images(tiny_clip(), image_transform(32), images, ["red", "blue"])


def test_an_undecodable_image_whose_error_has_no_message_is_named_with_the_errors_kind():
    # A plugin's bare EOFError() (an exception is always true, so `error or its name` gave the empty message):
    # the line ended 'cannot be decoded: ' with nothing after it
    def preprocess(image):
        raise EOFError()

    with pytest.raises(OSError, match=r"images\[0\] cannot be decoded: EOFError$"):
        zeroshot_classify_images(tiny_clip(), preprocess, [Image.new("RGB", (40, 30))], ["red", "blue"])


def test_a_missing_or_blank_class_name_is_refused_naming_its_place():
    # A name list read from a table with a gap gave None or "" a class of its own, prompted as 'a photo of a None.'
    # or 'a photo of a .', and predicted None for the images nearest it
    from clip.preprocess import image_transform

    model, preprocess, images = tiny_clip(), image_transform(32), [Image.new("RGB", (40, 30))]
    with pytest.raises(TypeError, match=r"classnames\[1\] is None, not a string"):
        zeroshot_classify_images(model, preprocess, images, ["cat", None, "dog"])
    with pytest.raises(ValueError, match=r"classnames\[2\] is blank \(' '\)"):
        zeroshot_classify_images(model, preprocess, images, ["cat", "dog", " "])
    with pytest.raises(ValueError, match=r"classnames\[0\] is blank \(''\)"):
        build_zeroshot_classifier(model, ["", "dog"])


@pytest.mark.parametrize("precomputed", [False, True], ids=["prompted", "precomputed classifier"])
def test_class_names_are_refused_alike_with_and_without_a_precomputed_classifier(precomputed):
    # Label numbers failed as "classnames[0] is 0, not a string: every class needs its name"; a class_to_idx dict
    # gave its names in insertion order, not label order, and a set in its hashes' order, each without a word
    # (label 0 scored under another class's name and, prompted, with its prompts)
    model = tiny_clip()
    dataset = torch.utils.data.TensorDataset(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    options = {"classifier": torch.nn.functional.normalize(torch.randn(16, 3), dim=0)} if precomputed else {}
    use = "labels the precomputed classifier's column" if precomputed else "is the text of its prompts"
    for names, message in [
        ([0, 1, 2], rf"^classnames\[0\] is 0 \(int\), not a str: a class name {use}.*\[str\(name\) for name in "
                    r"classnames\]\)$"),
        (np.arange(3), r"^classnames\[0\] is np.int64\(0\) \(int64\), not a str"),
        (["red", np.float32("nan"), "blue"], r"^classnames\[1\] is np.float32\(nan\), not a string: every class"),
        ({"blue": 2, "red": 0, "green": 1}, r"^classnames is a dict; pass a list of names in label order: for a dict "
                                            r"of name -> label \(class_to_idx\) sorted\(names, key=names.get\)"),
        ({0: "red", 1: "green", 2: "blue"}, r"^classnames is a dict; pass a list of names in label order"),
        ({"red", "green", "blue"}, r"^classnames is a set, which has no order"),
    ]:
        with pytest.raises(TypeError, match=message) as raised:
            evaluate_zeroshot(model, dataset, names, **options)
        assert "\n" not in str(raised.value)
    assert evaluate_zeroshot(model, dataset, ("red", "green", "blue"), **options).classnames == ["red", "green", "blue"]


def test_the_notebook_helper_refuses_a_single_class_name():
    # With one name every image came back as that class with probability 1: a question ("is this a cat?") that
    # zero-shot classification answers only against other names, as a config's dataset of one class is refused
    from clip.preprocess import image_transform

    with pytest.raises(ValueError, match=r"one class name \('cat'\).*at least 2.*add the names to tell it apart from$"):
        zeroshot_classify_images(tiny_clip(), image_transform(32), [Image.new("RGB", (40, 30))], ["cat"])


def test_the_notebook_helper_warns_of_class_names_it_cannot_tell_apart(caplog):
    # Two classes of one name get the same prompts: the second was never predicted, without a word (a config's
    # dataset is warned of)
    from clip.preprocess import image_transform

    with caplog.at_level(logging.WARNING, logger="clip.evaluation.datasets"):
        zeroshot_classify_images(tiny_clip(), image_transform(32), [Image.new("RGB", (40, 30))], ["cat", "dog", "Cat"])
    assert "zeroshot_classify_images: class names that differ only in case" in caplog.text and "'Cat' = 'cat'" in \
        caplog.text


def test_class_names_in_a_numpy_array_work_as_a_list_does():
    # LabelEncoder.classes_ and np.unique(labels) are arrays, which tokenize takes: "if not classnames" made
    # them "The truth value of an array with more than one element is ambiguous"
    from clip.preprocess import image_transform

    model, classnames, templates = planted_two_classes()
    reference = build_zeroshot_classifier(model, classnames, templates, model.tokenize)
    torch.testing.assert_close(build_zeroshot_classifier(model, np.array(classnames), templates, model.tokenize),
                               reference)
    model, images = tiny_clip(), [Image.new("RGB", (40, 30), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    listed = zeroshot_classify_images(model, image_transform(32), images, ["red", "blue", "green"])
    arrayed = zeroshot_classify_images(model, image_transform(32), images, np.array(["red", "blue", "green"]))
    torch.testing.assert_close(arrayed[0], listed[0])
    assert arrayed[1] == listed[1]


def test_class_names_from_a_numpy_array_come_back_as_plain_str():
    # An array's items are np.str_: handed back, they print as np.str_('red') and yaml.safe_dump refuses them
    from clip.preprocess import image_transform

    model, images = tiny_clip(), [Image.new("RGB", (40, 30), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    _, names = zeroshot_classify_images(model, image_transform(32), images, np.array(["red", "blue", "green"]))
    assert [type(name) for name in names] == [str, str]
    model, classnames, templates = planted_two_classes()
    dataset = [(torch.tensor([1.0, 1.0]), 0), (torch.tensor([-1.0, -1.0]), 1)]
    result = evaluate_zeroshot(model, dataset, np.array(classnames), templates, tokenizer=model.tokenize)
    assert result.classnames == classnames and [type(name) for name in result.classnames] == [str, str]
    seen = []  # a callable template is given each class name
    build_zeroshot_classifier(model, np.array(classnames), [lambda name: seen.append(name) or f"a {name}."],
                              model.tokenize)
    assert seen == classnames and [type(name) for name in seen] == [str, str]

def test_a_template_set_name_that_is_not_built_in_names_the_built_in_ones():
    with pytest.raises(FileNotFoundError, match=r"templates='imagenet' is neither a built-in template set \(default, "
                       r"simple\) nor an existing file"):
        resolve_templates("imagenet")


def test_prompts_longer_than_the_context_are_truncated_with_a_warning(caplog):
    model = tiny_clip()
    long_template = "a photo of a " + "very " * 40 + "small {}."  # 40+ tokens; the context holds 32
    with caplog.at_level("WARNING"):
        weights = build_zeroshot_classifier(model, ["cat", "dog"], [long_template, "a {}."])
    assert weights.shape == (16, 2) and torch.isfinite(weights).all()
    assert "2 of 4 texts are longer than the model's context and were cut to 32 tokens (the end token kept); " \
           "the first: Text 'a photo of a very very" in caplog.text
    assert "more than context_length=32" in caplog.text
    assert "truncate=True" not in caplog.text  # advice to a Python caller, which an evaluation's user is not
    # Said once for the whole classifier: a line per group of classes (here one class a group) was a
    # thousand lines for ImageNet on a small-context model
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_zeroshot_classifier(model, ["cat", "dog", "bird"], [long_template, "a {}."], batch_size=2)
    assert [r.getMessage()[:35] for r in caplog.records] == ["3 of 6 texts are longer than the mo"]


def test_an_interrupted_confusion_png_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    # Ctrl-C while a large confusion matrix was drawn (seconds for a thousand classes) left a torn PNG, where
    # the evaluation commands say that the files written before an interruption are kept whole
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    model, classnames, templates = planted_two_classes()
    result = evaluate_zeroshot(model, [(torch.ones(2), 0)], classnames, templates, tokenizer=model.tokenize, name="x")
    path = save_confusion_png(result, tmp_path / "confusion.png")
    previous = path.read_bytes()
    real_savefig = Figure.savefig

    def interrupted_savefig(self, target, *args, **kwargs):
        real_savefig(self, target, *args, **kwargs)
        written = target if isinstance(target, (str, os.PathLike)) else target.name
        with open(written, "r+b") as file:
            file.truncate(20)  # the drawing stopped part way
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        save_confusion_png(result, path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]  # no temporary file left
