"""Linear probe: accuracy on separable features, an L2 sweep that must land inside a planted window (both
too little and too much regularisation fail there), determinism, and feature extraction from a model."""

from __future__ import annotations

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
    assert 1e-2 <= l2 <= 3.0, [(p.l2, p.val_accuracy) for p in sweep]
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
    assert l2 <= 1e-3
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


def test_fit_reaches_a_stationary_point():
    features, labels = gaussian_classes(10, 6, separation=1.0)
    l2 = 0.1
    probe = fit_logistic_regression(features, labels, 4, l2)
    weight = probe.weight.clone().requires_grad_(True)
    bias = probe.bias.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(features @ weight.t() + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5


def test_validation_split_is_seeded_and_disjoint():
    features, labels = torch.arange(20.0)[:, None], torch.zeros(20, dtype=torch.long)
    (train_x, _), (val_x, _) = split_validation(features, labels, 0.25, seed=3)
    (train_y, _), (val_y, _) = split_validation(features, labels, 0.25, seed=3)
    assert torch.equal(val_x, val_y) and len(val_x) == 5
    assert sorted(train_x.flatten().tolist() + val_x.flatten().tolist()) == list(range(20))
    with pytest.raises(ValueError):
        split_validation(features, labels, 1.0, seed=0)


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
