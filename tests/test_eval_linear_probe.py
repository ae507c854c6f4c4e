"""Linear probe: accuracy on separable features, an L2 sweep that must land inside a planted window (both
too little and too much regularisation fail there), determinism, and feature extraction from a model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clip.evaluation.linear_probe import (
    extract_features,
    fit_logistic_regression,
    run_linear_probe,
    select_l2,
    split_validation,
)
from partly_unreadable import PartlyUnreadable


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def gaussian_classes(n_per_class: int, seed: int, num_classes: int = 4, dim: int = 8, separation: float = 6.0):
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    means = separation * means / means.norm(dim=1, keepdim=True)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = means[labels] + torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return features.double(), labels


def test_separable_features_are_classified():
    result = run_linear_probe(gaussian_classes(40, 1), gaussian_classes(100, 2), 4, max_iter=300)
    assert result.test_accuracy >= 0.97
    assert result.num_train + result.num_val == 160 and result.num_val == 32
    assert result.l2 in [point.l2 for point in result.sweep]


def planted_window(n: int, seed: int, shortcut: bool):
    """Two classes, three features:
    x0 = s + nuisance + 1.0 * noise, x1 = nuisance (std 5): the true signal is x0 - x1, which needs
        opposite weights on two features; the class means differ only along x0.
    x2 = 0.1 * s in the training split (a perfect but tiny shortcut), a random +-0.1 elsewhere.
    Too little L2 puts a huge weight on the shortcut (chance on validation); too much L2 shrinks the
    weights toward the class-mean difference, i.e. x0 alone, drowned by the nuisance. Only a middle
    range of L2 learns x0 - x1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    sign = 2.0 * labels - 1
    nuisance = 5.0 * torch.randn(n, generator=generator)
    x0 = sign + nuisance + torch.randn(n, generator=generator)
    random_sign = 2.0 * (torch.rand(n, generator=generator) < 0.5) - 1
    x2 = 0.1 * (sign if shortcut else random_sign)
    return torch.stack([x0, nuisance, x2], dim=1).double(), labels


def test_sweep_lands_in_the_planted_window():
    train, val, test = planted_window(200, 1, True), planted_window(200, 2, False), planted_window(1000, 3, False)
    # The trap is real: both ends of the range are bad on held-out data.
    for extreme in (1e-6, 1e6):
        assert fit_logistic_regression(*train, 2, extreme, max_iter=300).accuracy(*test) < 0.7
    l2, sweep = select_l2(train, val, 2, max_iter=300)
    assert 2.0 <= l2 <= 600.0, [(p.l2, p.val_accuracy) for p in sweep]  # 1/C, with 200 training examples
    assert len(sweep) > 7  # the refinement evaluated points beyond the coarse grid
    assert fit_logistic_regression(*train, 2, l2, max_iter=300).accuracy(*test) > 0.8
    best = max(sweep, key=lambda p: (p.val_accuracy, -p.val_loss))
    assert best.l2 == l2


def test_light_regularisation_wins_on_clean_data():
    # Same features without the shortcut or noise: x0 - x1 = s separates perfectly, heavy L2 still fails.
    def clean(n, seed):
        features, labels = planted_window(n, seed, False)
        features[:, 0] = (2.0 * labels - 1) + features[:, 1]
        return features, labels

    l2, _ = select_l2(clean(200, 1), clean(200, 2), 2, max_iter=300)
    assert l2 <= 0.2
    result = run_linear_probe(clean(200, 1), clean(500, 3), 2, val=clean(200, 2), max_iter=300)
    assert result.test_accuracy == 1.0


def test_probe_is_deterministic_and_standardisation_is_optional():
    train, test = gaussian_classes(20, 4), gaussian_classes(20, 5)
    first = run_linear_probe(train, test, 4, coarse_points=5, refine_steps=2, max_iter=200)
    second = run_linear_probe(train, test, 4, coarse_points=5, refine_steps=2, max_iter=200)
    assert first.to_dict() == second.to_dict()
    scaled = (1000.0 * train[0], train[1]), (1000.0 * test[0], test[1])
    standardized = run_linear_probe(*scaled, 4, standardize=True, coarse_points=5, refine_steps=2, max_iter=200)
    assert standardized.standardize and standardized.test_accuracy >= 0.9


def test_standardised_test_features_are_scaled_as_the_fitted_ones():
    # Far from the origin (offset 5000): test features left unscaled would all fall on one side of the boundary
    train, test = gaussian_classes(20, 4), gaussian_classes(20, 5)
    shifted = (1000.0 * train[0] + 5000.0, train[1]), (1000.0 * test[0] + 5000.0, test[1])
    result = run_linear_probe(*shifted, 4, standardize=True, coarse_points=5, refine_steps=0, max_iter=200)
    assert result.test_accuracy >= 0.9


def test_the_sweep_spans_the_range_then_halves_its_step_around_the_best():
    train, val = gaussian_classes(5, 1, num_classes=2), gaussian_classes(5, 2, num_classes=2)
    _, sweep = select_l2(train, val, 2, low=1e-2, high=1e2, coarse_points=5, refine_steps=0, max_iter=20)
    assert [point.l2 for point in sweep] == pytest.approx([1e-2, 1e-1, 1.0, 1e1, 1e2])
    l2, sweep = select_l2(train, val, 2, low=1e-2, high=1e2, coarse_points=5, refine_steps=1, max_iter=20)
    coarse_best = max(sweep[:5], key=lambda p: (p.val_accuracy, -p.val_loss)).l2
    # one refinement: half a coarse step (a factor sqrt(10)) either side of the best, within the range
    refined = sorted(point.l2 for point in sweep[5:])
    expected = sorted(v for v in (coarse_best / math.sqrt(10), coarse_best * math.sqrt(10)) if 0.0099 < v < 101)
    assert refined == pytest.approx(expected)
    assert l2 == max(sweep, key=lambda p: (p.val_accuracy, -p.val_loss)).l2
    # An interior best gets both neighbours: the planted window's middle strength wins this coarse grid
    train, val = planted_window(200, 1, True), planted_window(200, 2, False)
    _, sweep = select_l2(train, val, 2, low=1e-2, high=1e4, coarse_points=4, refine_steps=1, max_iter=300)
    coarse_best = max(sweep[:4], key=lambda p: (p.val_accuracy, -p.val_loss)).l2
    assert 1e-2 < coarse_best < 1e4
    assert sorted(point.l2 for point in sweep[4:]) == pytest.approx([coarse_best / 10, coarse_best * 10])


def test_train_accuracy_is_that_of_the_refit_on_train_and_validation():
    # One feature; the validation split holds 2 examples labelled against the side they lie on, which no
    # linear boundary can fit: the refit gets 20 of the 22 train + validation examples right.
    labels = torch.arange(20) % 2
    train = ((4.0 * labels - 2.0 + 0.1 * torch.arange(20) / 20)[:, None].double(), labels)
    val = (torch.tensor([[-3.0], [3.0]], dtype=torch.float64), torch.tensor([1, 0]))
    result = run_linear_probe(train, train, 2, val=val, coarse_points=3, refine_steps=0, max_iter=100)
    assert result.train_accuracy == pytest.approx(20 / 22)
    assert (result.num_train, result.num_val, result.test_accuracy) == (20, 2, 1.0)


def test_the_validation_scores_are_the_chosen_fits_not_the_refits_that_saw_them():
    # Train: class 0 near -2, class 1 near 2. Validation: class 1 near 3, half of class 0 near -2 and half near
    # 1, past the training boundary (0): fitted on train, 3 of 4 right; the refit on both separates them all.
    labels = torch.arange(20) % 2
    train = ((4.0 * labels - 2.0 + 0.1 * torch.arange(20) / 20)[:, None].double(), labels)
    val = (torch.tensor([[-2.0], [1.0], [3.0], [3.0]] * 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1] * 2))
    result = run_linear_probe(train, val, 2, val=val, coarse_points=3, refine_steps=0, max_iter=100)
    chosen = next(point for point in result.sweep if point.l2 == result.l2)
    reported = (result.val_accuracy, result.val_mean_per_class)
    assert reported == (chosen.val_accuracy, chosen.val_mean_per_class) == (0.75, 0.75)
    assert (result.test_accuracy, result.test_mean_per_class) == (1.0, 1.0)  # the refit, scored on the same rows


def test_fit_reaches_a_stationary_point_of_scikit_learns_objective():
    # sum of cross-entropies + (l2 / 2) ||W||^2, i.e. LogisticRegression(C=1 / l2): the paper's lambda
    features, labels = gaussian_classes(10, 6, separation=1.0)
    l2 = 4.0
    probe = fit_logistic_regression(features, labels, 4, l2)
    weight = probe.weight.clone().requires_grad_(True)
    bias = probe.bias.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(features @ weight.t() + bias, labels, reduction="sum")
    (loss + 0.5 * l2 * weight.pow(2).sum()).backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    # the same C on twice the data (each example twice) is the same classifier: per-example strength halves
    doubled = fit_logistic_regression(features.repeat(2, 1), labels.repeat(2), 4, 2 * l2)
    torch.testing.assert_close(doubled.weight, probe.weight, rtol=1e-5, atol=1e-6)


def test_a_fit_over_row_chunks_reaches_the_same_stationary_point_in_bounded_memory(monkeypatch):
    # The full batch's logits, log-softmax and their gradient were three N x classes temporaries: ImageNet's
    # 1.28M x 1000 needed ~15 GB on the fitting device for them alone. Past LOSS_CHUNK_ELEMENTS logits (or feature
    # elements, converted to float64) the loss is summed over row chunks, to the same optimum
    import clip.evaluation.linear_probe as probe_module

    features, labels = gaussian_classes(10, 6, separation=1.0)
    l2 = 4.0
    whole = fit_logistic_regression(features, labels, 4, l2)
    assert len(features) == 40 and features.shape[1] >= 4
    # chunks of 7 rows, the last one of 5
    monkeypatch.setattr(probe_module, "LOSS_CHUNK_ELEMENTS", 7 * features.shape[1])
    seen_rows = []
    real_cross_entropy = nn.functional.cross_entropy

    def recording(logits, *args, **kwargs):
        seen_rows.append(len(logits))
        return real_cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "cross_entropy", recording)
    chunked = fit_logistic_regression(features, labels, 4, l2)
    assert max(seen_rows) == 7 and 5 in seen_rows
    torch.testing.assert_close(chunked.weight, whole.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.bias, whole.bias, rtol=1e-5, atol=1e-6)
    # Its scores too: the whole set's logits at once were N x classes (ImageNet's train set: 5 GB in float32)
    seen_rows.clear()
    monkeypatch.setattr(nn.functional, "cross_entropy", real_cross_entropy)
    monkeypatch.setattr(probe_module.LogisticRegression, "logits",
                        lambda self, rows: seen_rows.append(len(rows)) or rows.to(self.weight) @ self.weight.t() + self.bias)
    accuracy, per_class, loss = (whole.accuracy(features, labels), whole.mean_per_class_accuracy(features, labels),
                                 whole.loss(features, labels))
    assert max(seen_rows) == 7
    monkeypatch.undo()
    assert (accuracy, per_class) == (whole.accuracy(features, labels), whole.mean_per_class_accuracy(features, labels))
    assert loss == pytest.approx(whole.loss(features, labels), rel=1e-12)


def test_mean_per_class_accuracy_is_reported_and_can_choose_the_strength():
    from clip.evaluation.linear_probe import SweepPoint

    # A majority-class answer (90% of the examples) against a useful classifier: each metric prefers its own.
    majority = SweepPoint(1e4, val_accuracy=0.90, val_loss=0.3, val_mean_per_class=0.50)
    useful = SweepPoint(1.0, val_accuracy=0.85, val_loss=0.4, val_mean_per_class=0.80)
    assert max([majority, useful], key=lambda p: p.key("accuracy")) is majority
    assert max([majority, useful], key=lambda p: p.key("mean_per_class")) is useful

    def imbalanced(seed):  # 90 of class 0, 10 of class 1
        labels = torch.cat([torch.zeros(90), torch.ones(10)]).long()
        noise = torch.randn(100, 1, generator=torch.Generator().manual_seed(seed))
        return (2.0 * labels[:, None] + 0.8 * noise).double(), labels

    result = run_linear_probe(imbalanced(1), imbalanced(2), 2, val=imbalanced(3), max_iter=200, metric="mean_per_class")
    assert result.metric == "mean_per_class"
    chosen = next(point for point in result.sweep if point.l2 == result.l2)
    assert chosen.key("mean_per_class") == max(point.key("mean_per_class") for point in result.sweep)
    # class 1's accuracy weighs as much as class 0's: below the plain accuracy, which the majority dominates
    assert 0.5 < result.test_mean_per_class < result.test_accuracy <= 1.0
    with pytest.raises(ValueError, match="metric"):
        run_linear_probe(imbalanced(1), imbalanced(2), 2, metric="top5")


def test_mean_per_class_accuracy_averages_only_the_classes_present():
    from clip.evaluation.linear_probe import LogisticRegression

    # Predicts the feature's one-hot index. Labels 0, 0, 2: class 0 is half right, class 2 right, class 1 absent
    probe = LogisticRegression(torch.eye(3), torch.zeros(3))
    features, labels = torch.eye(3)[[0, 1, 2]], torch.tensor([0, 0, 2])
    assert probe.accuracy(features, labels) == 2 / 3  # the exact fraction (a float32 mean gave 0.66666669)
    assert probe.mean_per_class_accuracy(features, labels) == pytest.approx((1 / 2 + 1) / 2)  # not NaN, not / 3


def test_the_sweep_chooses_by_the_metric_it_is_given(monkeypatch):
    from clip.evaluation import linear_probe
    from clip.evaluation.linear_probe import LogisticRegression

    # Planted fits: a strong L2 gives the majority answer (accuracy 0.9, mean per class 0.5), a weak one a
    # classifier of accuracy 0.85 and mean per class (80/90 + 5/10) / 2 = 0.69
    labels = torch.cat([torch.zeros(90), torch.ones(10)]).long()
    useful_prediction = torch.cat([torch.zeros(80), torch.ones(10), torch.ones(5), torch.zeros(5)]).long()
    val = (torch.nn.functional.one_hot(useful_prediction, 2).double(), labels)
    majority = LogisticRegression(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    useful = LogisticRegression(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))

    def planted_fit(features, labels, num_classes, l2, **options):
        return majority if l2 > 1 else useful

    monkeypatch.setattr(linear_probe, "fit_logistic_regression", planted_fit)
    options = dict(low=1e-2, high=1e2, coarse_points=5, refine_steps=0)
    assert select_l2(val, val, 2, metric="accuracy", **options)[0] > 1
    assert select_l2(val, val, 2, metric="mean_per_class", **options)[0] <= 1


def test_validation_split_is_seeded_and_disjoint():
    features, labels = torch.arange(20.0)[:, None], torch.zeros(20, dtype=torch.long)
    (train_x, _), (val_x, _) = split_validation(features, labels, 0.25, seed=3)
    (train_y, _), (val_y, _) = split_validation(features, labels, 0.25, seed=3)
    assert torch.equal(val_x, val_y) and len(val_x) == 5
    assert sorted(train_x.flatten().tolist() + val_x.flatten().tolist()) == list(range(20))
    # shuffled: another seed holds out other rows, and not just the first of a class's rows in file order
    (_, _), (other_x, _) = split_validation(features, labels, 0.25, seed=4)
    assert not torch.equal(other_x, val_x) and sorted(val_x.flatten().tolist()) != [0.0, 1.0, 2.0, 3.0, 4.0]
    for fraction in (0.0, 1.0):  # no hold-out, or nothing left to fit: a fraction of 0 held out a row anyway
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
            split_validation(features, labels, fraction, seed=0)


def test_the_validation_hold_out_takes_each_class_in_proportion_and_leaves_every_class_a_training_row():
    # Three classes of 20: a plain random quarter rarely held out exactly 5 of each
    labels = torch.arange(3).repeat_interleave(20)
    for seed in range(5):
        (_, train_labels), (_, val_labels) = split_validation(labels[:, None].float(), labels, 0.25, seed=seed)
        assert torch.bincount(val_labels, minlength=3).tolist() == [5, 5, 5]
        assert torch.bincount(train_labels, minlength=3).tolist() == [15, 15, 15]
    # A class of two rows beside one of 40 keeps a training row; held out at random, both of its rows went to
    # validation for some seeds, and the final probe was refitted without the sweep ever fitting it
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    for seed in range(40):
        (_, train_labels), (_, val_labels) = split_validation(labels[:, None].float(), labels, 0.25, seed=seed)
        assert len(val_labels) == 10 and torch.bincount(train_labels, minlength=2).min() >= 1
    # Singleton classes stay in training while any class can spare a row
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 3])
    (_, train_labels), (_, val_labels) = split_validation(labels[:, None].float(), labels, 0.3, seed=0)
    assert val_labels.tolist() == [3, 3] and sorted(train_labels.tolist()) == [0, 1, 2, 3, 3]
    # A singleton class's row goes after every other class's last-but-one, however large a share is held out
    labels = torch.tensor([0, 1, 1, 1, 1])
    for seed in range(5):
        (_, train_labels), _ = split_validation(labels[:, None].float(), labels, 0.6, seed=seed)
        assert sorted(train_labels.tolist()) == [0, 1]
    # Shares are rounded to the nearest row (0.3 of a class of 3 is none), not up, which favoured small classes
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    for seed in range(10):
        _, (_, val_labels) = split_validation(labels[:, None].float(), labels, 0.1, seed=seed)
        assert torch.bincount(val_labels, minlength=3).tolist() == [1, 1, 0], seed


class RecordingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.modes: list[tuple[bool, bool]] = []

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.modes.append((self.training, torch.is_grad_enabled()))
        return self.linear(images)


def test_features_come_from_the_frozen_encoder_in_eval_mode():
    model = RecordingEncoder().train()
    dataset = [(torch.randn(3), i % 2) for i in range(7)]
    features, labels = extract_features(model, dataset, batch_size=3)
    assert features.shape == (7, 2) and labels.tolist() == [i % 2 for i in range(7)]
    assert model.modes == [(False, False)] * 3 and model.training
    expected = model.linear(torch.stack([x for x, _ in dataset])).detach()
    torch.testing.assert_close(features, expected)


def partly_unreadable(unreadable: set[int]) -> PartlyUnreadable:
    """Seven (image, label) items; those at `unreadable` raise as an undecodable file does."""
    return PartlyUnreadable([(torch.full((3,), float(i)), i % 2) for i in range(7)], unreadable, prefix="broken_")


def test_unreadable_images_are_left_out_and_logged_once_with_an_example(caplog):
    model = RecordingEncoder()
    with caplog.at_level("WARNING", logger="clip"):
        features, labels = extract_features(model, partly_unreadable({1, 5}), batch_size=3)
    readable = [0, 2, 3, 4, 6]
    assert labels.tolist() == [i % 2 for i in readable]
    expected = model.linear(torch.stack([torch.full((3,), float(i)) for i in readable])).detach()
    torch.testing.assert_close(features, expected)
    # A skipped image must not pass silently: the count, and one reason naming the file
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == ["feature extraction: skipped 2 unreadable image(s); e.g. cannot read image broken_1.png: "
                        "not an image"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="clip"):
        extract_features(model, partly_unreadable(set()), batch_size=3)
    assert caplog.records == []  # nothing skipped, nothing said


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_unprojected_features_are_a_vits_class_token_before_its_projection(kind):
    from clip.architectures import ModelConfig, TextConfig, VisionConfig
    from clip.model import CLIP

    vision = (VisionConfig(kind="vit", image_size=16, patch_size=8, width=24, layers=1, heads=2) if kind == "vit"
              else VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2))
    torch.manual_seed(0)
    model = CLIP(ModelConfig(embed_dim=16, vision=vision, text=TextConfig(context_length=8, vocab_size=50, width=16,
                                                                         layers=1, heads=2))).eval()
    size = vision.image_size
    dataset = [(torch.randn(3, size, size), i % 2) for i in range(5)]
    unprojected, _ = extract_features(model, dataset, batch_size=2, unprojected=True)
    embedding, _ = extract_features(model, dataset, batch_size=2)
    assert embedding.shape == (5, 16)
    if kind == "vit":  # the paper's I_f: `width` wide, and the embedding is its projection
        assert unprojected.shape == (5, 24)
        torch.testing.assert_close(unprojected @ model.visual.proj.detach(), embedding)
    else:  # the attention pool is a ResNet's last layer: its output is both
        torch.testing.assert_close(unprojected, embedding)


@pytest.mark.parametrize(("num_train", "fraction"), [(1, 0.2), (12, 0.99)])
def test_a_hold_out_that_leaves_no_training_example_is_a_clear_error(num_train, fraction):
    train = gaussian_classes(num_train, seed=0, num_classes=1)
    test = gaussian_classes(2, seed=1, num_classes=1)
    with pytest.raises(ValueError, match=rf"holding out {num_train} of {num_train} training example\(s\)"):
        run_linear_probe(train, test, 2, val_fraction=fraction)
    with pytest.raises(ValueError, match="no training examples"):
        fit_logistic_regression(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 2, 1.0)


def test_a_single_class_is_refused():
    # With one class every prediction is right: the probe reported 100% accuracy, whatever the features
    train, test = gaussian_classes(10, seed=0, num_classes=1), gaussian_classes(4, seed=1, num_classes=1)
    with pytest.raises(ValueError, match="a linear probe needs at least 2 classes to tell apart, got 1"):
        run_linear_probe(train, test, 1, coarse_points=3, refine_steps=0, max_iter=20)


def test_standardising_a_single_training_example_is_safe():
    # A sample std of one example is NaN; a constant column's is 0: neither may reach the fit.
    train = (torch.tensor([[1.0, 5.0]], dtype=torch.float64), torch.tensor([0]))
    val = (torch.tensor([[-1.0, 5.0]], dtype=torch.float64), torch.tensor([1]))
    test = (torch.tensor([[2.0, 5.0], [-2.0, 5.0]], dtype=torch.float64), torch.tensor([0, 1]))
    result = run_linear_probe(train, test, 2, val=val, standardize=True, coarse_points=3, refine_steps=0, max_iter=50)
    assert all(math.isfinite(point.val_loss) for point in result.sweep)
    assert result.test_accuracy == 1.0


def test_the_refit_is_standardised_with_the_statistics_of_train_and_validation(monkeypatch):
    from clip.evaluation import linear_probe

    fitted = []
    fit = linear_probe.fit_logistic_regression

    def recording_fit(features, *args, **options):
        fitted.append(features)
        return fit(features, *args, **options)

    monkeypatch.setattr(linear_probe, "fit_logistic_regression", recording_fit)
    train, val, test = gaussian_classes(10, 1), gaussian_classes(10, 2), gaussian_classes(5, 3)
    val = (val[0] + 3.0, val[1])  # shifted: statistics of train alone would not centre train + validation
    run_linear_probe(train, test, 4, val=val, standardize=True, coarse_points=2, refine_steps=0, max_iter=50)
    refit = fitted[-1]
    assert len(refit) == 80
    torch.testing.assert_close(refit.mean(dim=0), torch.zeros(8, dtype=refit.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(refit.std(dim=0), torch.ones(8, dtype=refit.dtype))


def test_an_empty_validation_split_is_refused():
    # Every validation score would be NaN, the mean of nothing
    train, test = gaussian_classes(5, 1), gaussian_classes(5, 2)
    empty = (torch.zeros(0, 8, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="the validation split has no examples"):
        run_linear_probe(train, test, 4, val=empty, coarse_points=2, refine_steps=0, max_iter=20)


def test_a_constant_column_with_rounding_noise_is_only_centred():
    from clip.evaluation.linear_probe import _standardizer

    column = torch.full((7,), 0.1, dtype=torch.float32) + torch.tensor([0, 1, 0, 0, 1, 0, 0]) * 1e-8  # rounding
    features = torch.stack([column, torch.arange(7.0)], dim=1)
    mean, std = _standardizer(features)
    assert std[0] == 1.0 and std[1] == pytest.approx(torch.arange(7.0).std().item())
    assert ((features - mean) / std)[:, 0].abs().max() < 1e-6  # not blown up to ~1 by a 1e-8 spread


class NaNEncoder(RecordingEncoder):
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = super().encode_image(images)
        return torch.where(images[:, :1] > 0, float("nan"), features)  # a diverged model, an fp16 overflow


def test_nonfinite_features_are_refused_not_fitted():
    from clip.evaluation.features import NonFiniteFeaturesError

    # A NaN training feature: a RuntimeError from inside torch's L-BFGS; a NaN test feature: scored as a prediction
    dataset = [(torch.full((3,), 1.0 if i == 4 else -1.0), i % 2) for i in range(7)]
    with pytest.raises(NonFiniteFeaturesError, match="1 of 7 linear-probe image features are NaN or inf"):
        extract_features(NaNEncoder(), dataset, batch_size=3)
    train, test = gaussian_classes(10, 1), gaussian_classes(10, 2)
    test[0][3, 0] = float("inf")
    with pytest.raises(NonFiniteFeaturesError, match="1 of 40 linear-probe test features"):
        run_linear_probe(train, test, 4, coarse_points=3, refine_steps=0, max_iter=20)


def badly_scaled_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes in 64 float32 dimensions, three of them 300 times the others' scale, all offset: features
    such as a model's unnormalised activations, on which L-BFGS needs many iterations."""
    generator = torch.Generator().manual_seed(1)
    means = 0.3 * torch.randn(10, 64, generator=generator, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(50)
    features = means[labels] + torch.randn(len(labels), 64, generator=generator, dtype=torch.float64)
    scale = torch.ones(64, dtype=torch.float64)
    scale[:3] = 300.0
    offset = 5 * torch.randn(64, generator=generator, dtype=torch.float64)
    return (features * scale + offset).float(), labels


def test_a_fit_on_float32_features_is_the_float64_fit_of_the_same_values():
    # Fitted in the features' dtype, float32 L-BFGS read a loss change below one float32 rounding step as none
    # and stopped after 145 of 1000 iterations here, its weights 9.5% from the optimum's (a review against
    # scikit-learn, which fits in float64)
    features, labels = badly_scaled_classes()
    in_float32 = fit_logistic_regression(features, labels, 10, 100.0, max_iter=300)
    in_float64 = fit_logistic_regression(features.double(), labels, 10, 100.0, max_iter=300)
    assert in_float32.weight.dtype == in_float32.bias.dtype == torch.float64
    assert torch.equal(in_float32.weight, in_float64.weight) and torch.equal(in_float32.bias, in_float64.bias)
    assert in_float32.iterations == 300


def test_a_fit_that_ends_at_max_iter_is_reported_as_unconverged(caplog):
    # It returned its last iterate without a word: on badly scaled features most of a sweep's fits did
    features, labels = badly_scaled_classes()
    short = fit_logistic_regression(features, labels, 10, 100.0, max_iter=5)
    assert (short.iterations, short.converged) == (5, False)
    easy = fit_logistic_regression(*gaussian_classes(20, 1), 4, 1.0, max_iter=300)
    assert easy.converged and 0 < easy.iterations < 300
    with caplog.at_level("WARNING", logger="clip.evaluation.linear_probe"):
        result = run_linear_probe((features, labels), (features, labels), 10, max_iter=5, coarse_points=3,
                                  refine_steps=0)
    assert (result.unconverged_fits, result.refit_converged) == (4, False)
    assert not any(point.converged for point in result.sweep)
    assert result.to_dict()["unconverged_fits"] == 4
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith("4 of the linear probe's 4 fits ended at max_iter = 5 iterations, short of "
                              "convergence (the refit on train + validation among them)")
    assert "--standardize" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="clip.evaluation.linear_probe"):
        result = run_linear_probe(gaussian_classes(40, 1), gaussian_classes(20, 2), 4, max_iter=300)
    assert (result.unconverged_fits, result.refit_converged, caplog.records) == (0, True, [])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_of_any_integer_type_are_class_indices(dtype):
    # They passed the label check and failed inside torch (cross-entropy's "expected Long", uint8 indexing as a mask)
    train, test = gaussian_classes(20, 1), gaussian_classes(20, 2)
    as_long = run_linear_probe(train, test, 4, max_iter=50, coarse_points=3, refine_steps=0)
    typed = run_linear_probe((train[0], train[1].to(dtype)), (test[0], test[1].to(dtype)), 4, max_iter=50,
                             coarse_points=3, refine_steps=0)
    assert typed == as_long


def test_the_fit_is_float64_except_on_apples_gpu_which_has_none():
    from clip.evaluation.linear_probe import fit_dtype

    assert [fit_dtype(torch.device(kind)) for kind in ("cpu", "cuda", "mps")] == [torch.float64] * 2 + [torch.float32]


@pytest.mark.parametrize(
    ("split", "labels", "message"),
    [
        ("train", lambda y: y.float(), r"the train labels must be integer class indices, got torch.float32"),
        ("train", lambda y: torch.where(y == 0, -100, y),
         r"the train labels must be class indices in \[0, 3\] \(4 classes\), found labels from -100 to 3"),
        ("test", lambda y: torch.where(y == 0, 5, y),
         r"the test labels must be class indices in \[0, 3\] \(4 classes\), found labels from 1 to 5"),
        ("test", lambda y: y[:0], r"the test split has no examples"),
    ],
    ids=["float", "negative_train", "past_the_classes_in_test", "empty_test"],
)
def test_labels_that_are_not_class_indices_are_refused_naming_the_split(split, labels, message):
    # Float labels and a training label past the classes failed deep inside torch; a test label past them
    # counted as a wrong answer and as a class of its own; cross-entropy skipped the rows labelled -100; an
    # empty test split divided by zero
    train, test = gaussian_classes(20, 1), gaussian_classes(20, 2)
    if split == "train":
        train = (train[0], labels(train[1]))
    else:
        test = (test[0][: len(labels(test[1]))], labels(test[1]))
    with pytest.raises(ValueError, match=rf"^{message}$"):
        run_linear_probe(train, test, 4, max_iter=50)


def test_a_class_without_training_examples_is_never_predicted_and_leaves_the_sweeps_loss_finite():
    # Fitted, such a class's bias only fell without end: the fit ran to max_iter, and how far the bias got set
    # the validation loss of the class's images, which broke the sweep's accuracy ties by chance (a CLI test's
    # probe chose 1e6 or 1e-5 by it). scikit-learn fits only the classes it sees; so does the probe now.
    features, labels = gaussian_classes(20, 1)
    seen = labels != 2
    probe = fit_logistic_regression(features[seen], labels[seen], 4, 1.0, max_iter=300)
    without = fit_logistic_regression(features[seen], torch.tensor([0, 1, 0, 2])[labels[seen]], 3, 1.0, max_iter=300)
    assert probe.converged and probe.bias[2] == -math.inf and not probe.weight[2].any()
    assert torch.equal(probe.weight[[0, 1, 3]], without.weight) and torch.equal(probe.bias[[0, 1, 3]], without.bias)
    assert 2 not in probe.predictions(features).tolist()
    val = gaussian_classes(10, 2)
    _, sweep = select_l2((features[seen], labels[seen]), val, 4, coarse_points=3, refine_steps=0, max_iter=300)
    assert all(math.isfinite(point.val_loss) and point.converged for point in sweep)
    assert all(point.val_accuracy <= 0.75 for point in sweep)  # class 2's images are all missed


def test_a_validation_split_that_scores_every_strength_alike_is_said_not_to_choose(caplog):
    # One image per class: the validation images' classes had no training image, every strength scored 0% with
    # no loss to break the tie, and the sweep's first strength was reported as chosen
    features, labels = gaussian_classes(1, 0)
    val = gaussian_classes(1, 1)
    with caplog.at_level("WARNING", logger="clip.evaluation.linear_probe"):
        result = run_linear_probe((features[:2], labels[:2]), val, 4, val=(val[0][2:], val[1][2:]), max_iter=50)
    assert result.l2 == 1e-6
    assert "the validation split scored every L2 strength alike (accuracy 0.0000, loss 0): l2 = 1e-06 is not " \
        "chosen by it" in caplog.text
    caplog.clear()
    features, labels = gaussian_classes(20, 0)  # one that chooses: no such warning
    with caplog.at_level("WARNING", logger="clip.evaluation.linear_probe"):
        run_linear_probe((features, labels), gaussian_classes(5, 1), 4, max_iter=50)
    assert "alike" not in caplog.text
    # Nor a sweep of one strength (low = high), which was not asked to choose: "every strength alike" of one
    features, labels = gaussian_classes(1, 0)
    with caplog.at_level("WARNING", logger="clip.evaluation.linear_probe"):
        result = run_linear_probe((features[:2], labels[:2]), val, 4, val=(val[0][2:], val[1][2:]), max_iter=50,
                                  low=1e-2, high=1e-2)
    assert result.l2 == pytest.approx(1e-2) and "alike" not in caplog.text
