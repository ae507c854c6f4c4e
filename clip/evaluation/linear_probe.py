"""Linear probe: multinomial logistic regression on frozen image features, as in the CLIP paper.

The classifier minimises   sum of cross-entropies + (l2 / 2) * ||W||^2   (the bias is not penalised), i.e.
scikit-learn's LogisticRegression objective with l2 = 1 / C, which the paper used (for 2 classes, scikit-learn
fits one weight vector where this fits two, and its C = 2 / l2); it is computed as the mean cross-entropy +
(l2 / 2N) ||W||^2, the same minimum. Full-batch L-BFGS with a strong-Wolfe line search, from zeros, so a fit is
deterministic: torch's L-BFGS in float64, as scikit-learn's (SciPy's) is, whatever the features' dtype (float32 on
Apple's GPU, which has none). In float32 its stopping rule read a loss change below one rounding step as none and
stopped early, up to 10% from the optimum's weights. The price is time: about 5x float32's on a CPU, more on
GPUs with little float64 throughput (most consumer cards); data-centre GPUs run float64 near float32's speed. A fit
that ends at max_iter iterations is counted as unconverged and reported.

The L2 strength is chosen on a validation split as in the paper: a log-spaced sweep over [1e-6, 1e6], then
a few rounds of halving the step around the best value (its "parametric binary search"), ranking by the
validation metric (accuracy, or mean per-class accuracy as the paper reports for some datasets) and
breaking ties by validation loss. The probe is then refitted on train + validation with that strength.
The paper probes a ViT's features before the projection to the embedding space: `extract_features(...,
unprojected=True)`, which the command line (`clip-linear-probe`) uses by default; the function's default is
`encode_image`'s embedding, which any CLIP-like model has.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .features import (
    encode_image_batches,
    eval_mode,
    log_skipped,
    make_loader,
    model_device,
    nonfinite_causes,
    refuse_nonfinite_features,
    unwrap_model,
)

logger = logging.getLogger(__name__)


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    normalize: bool = False,
    unprojected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 image features [N, D], labels [N]) on the CPU, from the frozen encoder in eval mode.

    unprojected: a ViT's class token before the projection to the embedding space (the paper's probe
    features; `CLIP.encode_image_unprojected`) instead of the embedding.
    Items whose image cannot be read are left out (logged), so N may be less than len(dataset). NaN or inf
    features (a diverged model, float16 overflow) are a `NonFiniteFeaturesError`.
    """
    model = unwrap_model(model)
    device = device or model_device(model)
    features, labels, skipped = [], [], []
    with eval_mode(model):
        loader = make_loader(dataset, batch_size, workers, device)
        batches = encode_image_batches(model, loader, device=device, precision=precision, normalize=normalize,
                                       skipped=skipped, unprojected=unprojected)
        with contextlib.closing(batches):  # its DataLoader's workers end with an error here too
            for batch_features, batch_labels in batches:
                features.append(batch_features.cpu())
                labels.append(batch_labels.cpu())
    log_skipped("feature extraction", len(skipped), skipped)
    if not features:
        reason = f"none of its {len(skipped)} images is readable" if skipped else "it is empty"
        raise ValueError(f"no image features to probe: {reason}")
    features = torch.cat(features)
    # A NaN training feature made L-BFGS fail with a RuntimeError deep inside torch; a NaN test feature was
    # scored as a prediction (argmax takes NaN for the largest)
    refuse_nonfinite_features(features, "linear-probe image", nonfinite_causes(model, precision))
    return features, torch.cat(labels).long()


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [C, D], float64 (`fit_dtype`)
    bias: torch.Tensor  # [C], float64
    iterations: int = 0  # L-BFGS iterations of the fit
    converged: bool = True  # False: the fit ended at its max_iter, short of the tolerances

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.t() + self.bias

    def predictions(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted class of each row, on the CPU, from row chunks (`row_chunks`): the whole set's logits
        at once were N x classes (ImageNet's 1.28M x 1000: 5 GB in float32, 10 GB in float64)."""
        chunks = row_chunks(len(features), len(self.bias), features.shape[-1])
        return torch.cat([self.logits(features[chunk]).argmax(dim=1).cpu() for chunk in chunks]
                         or [torch.zeros(0, dtype=torch.long)])

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        # Counted and divided in Python: a float32 mean gave 12/18 as 0.6666666865348816 in the results
        return int((self.predictions(features) == labels.cpu()).sum()) / len(labels)

    def mean_per_class_accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The accuracy of each class that has examples here, averaged over those classes."""
        labels = labels.cpu()
        correct = (self.predictions(features) == labels).double()
        per_class_correct = torch.bincount(labels, weights=correct)
        per_class_count = torch.bincount(labels)
        present = per_class_count > 0
        return (per_class_correct[present] / per_class_count[present]).mean().item()

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        labels = labels.to(self.weight.device)
        total = sum(nn.functional.cross_entropy(self.logits(features[chunk]), labels[chunk], reduction="sum").item()
                    for chunk in row_chunks(len(labels), len(self.bias), features.shape[-1]))
        return total / len(labels)


# The most logits (rows x classes) one evaluation of the probe's loss holds at once, and the most feature elements
# it converts to float64 at once: 128 MB each. The loss is summed over row chunks within both.
LOSS_CHUNK_ELEMENTS = 1 << 24


def row_chunks(num_rows: int, num_classes: int, dim: int) -> list[slice]:
    """Row chunks of at most LOSS_CHUNK_ELEMENTS logits and as many feature elements; one for a small set."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(num_classes, dim, 1))
    return [slice(start, start + rows) for start in range(0, num_rows, rows)]


def fit_dtype(device: torch.device) -> torch.dtype:
    """float64, as scikit-learn fits; float32 on Apple's GPU (MPS), which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """A ValueError unless `labels` are class indices in [0, num_classes). Others failed deep inside torch
    (float labels, a label of num_classes or more in training), or were scored without a word: a test label past
    the classes counted as a wrong answer and as a class of its own in the mean per-class accuracy, and
    cross-entropy skips the rows labelled -100."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"the {what} labels must be integer class indices, got {labels.dtype}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"the {what} labels must be class indices in [0, {num_classes - 1}] ({num_classes} "
                         f"classes), found labels from {int(labels.min())} to {int(labels.max())}")


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = 1000
) -> LogisticRegression:
    """Full-batch L-BFGS on sum of cross-entropies + (l2 / 2) ||W||^2 (scikit-learn's objective with
    l2 = 1 / C), on the features' device, in `fit_dtype` (float64; the features converted a chunk at a time)."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"need features [N, D] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:  # the L2 term is scaled by 1 / N below
        raise ValueError("no training examples to fit the probe on")
    check_labels(labels, num_classes, "training")
    labels = labels.to(features.device).long()
    present = torch.bincount(labels, minlength=num_classes) > 0
    if not present.all():
        # A class without examples is fitted as scikit-learn does, not at all: it is never predicted (weights 0,
        # bias -inf). Fitted, its bias only fell without end, and how far it got by the fit's stop set the
        # validation loss of its images, which broke the sweep's accuracy ties by chance.
        fitted = fit_logistic_regression(features, (torch.cumsum(present, 0) - 1)[labels], int(present.sum()), l2,
                                         max_iter=max_iter)
        weight = torch.zeros(num_classes, features.shape[1], dtype=fitted.weight.dtype, device=features.device)
        bias = torch.full((num_classes,), -math.inf, dtype=fitted.bias.dtype, device=features.device)
        weight[present], bias[present] = fitted.weight, fitted.bias
        return LogisticRegression(weight, bias, fitted.iterations, fitted.converged)
    dtype = fit_dtype(features.device)
    weight = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=features.device, requires_grad=True)
    # Scaled by the number of examples: the mean keeps the loss and gradients O(1) for the tolerances.
    per_example_l2 = l2 / len(labels)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        # Line searches take several evaluations per iteration; torch's default (1.25 x max_iter) could end
        # the fit well before max_iter iterations.
        max_eval=4 * max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    # Row chunks, their gradients summed: the full batch's logits, log-softmax and gradient are three
    # N x classes temporaries (ImageNet's 1.28M x 1000: 15 GB on the fitting device, over what most GPUs hold),
    # and its features in float64 a copy twice their float32 size
    chunks = row_chunks(len(labels), num_classes, features.shape[1])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), dtype=dtype, device=features.device)
        for chunk in chunks:
            logits = features[chunk].to(dtype) @ weight.t() + bias
            part = nn.functional.cross_entropy(logits, labels[chunk], reduction="sum") / len(labels)
            part.backward()
            total += part.detach()
        penalty = 0.5 * per_example_l2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.enable_grad():
        optimizer.step(closure)  # one call runs up to max_iter L-BFGS iterations
    iterations = optimizer.state[weight].get("n_iter", 0)  # torch's L-BFGS keeps its state under the first tensor
    return LogisticRegression(weight.detach(), bias.detach(), iterations, converged=iterations < max_iter)


@dataclass
class SweepPoint:
    l2: float
    val_accuracy: float
    val_loss: float
    val_mean_per_class: float
    converged: bool = True  # the fit ended within max_iter (`LogisticRegression.converged`)

    def key(self, metric: str) -> tuple[float, float]:
        """Larger is better: the validation metric, then the lower validation loss."""
        return (getattr(self, VALIDATION_FIELD[metric]), -self.val_loss)


# The metrics that may choose the L2 strength, and the validation field each one reads
VALIDATION_FIELD = {"accuracy": "val_accuracy", "mean_per_class": "val_mean_per_class"}


def select_l2(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    low: float = 1e-6,
    high: float = 1e6,
    coarse_points: int = 7,
    refine_steps: int = 4,
    max_iter: int = 1000,
    metric: str = "accuracy",
) -> tuple[float, list[SweepPoint]]:
    """The L2 strength with the best validation (metric, -loss), and every point evaluated (in order).
    metric: "accuracy" or "mean_per_class"."""
    if metric not in VALIDATION_FIELD:
        raise ValueError(f"metric must be 'accuracy' or 'mean_per_class', got {metric!r}")
    log_low, log_high = math.log10(low), math.log10(high)
    evaluated: dict[float, SweepPoint] = {}
    # The validation loss leaves out the images of classes without training examples: no fit predicts those
    # (`fit_logistic_regression`), and their loss is infinite at every strength
    trained = torch.bincount(train[1].cpu(), minlength=num_classes)[val[1].cpu()] > 0
    scored = (val[0][trained.to(val[0].device)], val[1][trained.to(val[1].device)])

    def evaluate(log_l2: float) -> None:
        log_l2 = round(min(max(log_l2, log_low), log_high), 6)
        if log_l2 not in evaluated:
            probe = fit_logistic_regression(*train, num_classes, 10.0**log_l2, max_iter=max_iter)
            evaluated[log_l2] = SweepPoint(
                10.0**log_l2, probe.accuracy(*val), probe.loss(*scored) if len(scored[1]) else 0.0,
                probe.mean_per_class_accuracy(*val), probe.converged,
            )

    def best() -> float:
        return max(evaluated, key=lambda k: evaluated[k].key(metric))

    step = (log_high - log_low) / max(coarse_points - 1, 1)
    for i in range(coarse_points):
        evaluate(log_low + i * step)
    for _ in range(refine_steps):
        step /= 2
        centre = best()
        evaluate(centre - step)
        evaluate(centre + step)
    return evaluated[best()].l2, list(evaluated.values())


@dataclass
class LinearProbeResult:
    l2: float  # the L2 strength lambda = scikit-learn's 1 / C (2 / C for 2 classes; before 2026-11-30: per example)
    train_accuracy: float  # on train + validation, after the refit
    val_accuracy: float  # of the chosen l2, fitted on train only
    test_accuracy: float
    num_train: int
    num_val: int
    num_test: int
    standardize: bool
    sweep: list[SweepPoint] = field(default_factory=list)
    metric: str = "accuracy"  # what chose l2: "accuracy" or "mean_per_class"
    val_mean_per_class: float = 0.0
    test_mean_per_class: float = 0.0
    # The fits (the sweep's and the refit) that ended at max_iter short of L-BFGS's tolerances: their weights,
    # and the choice of l2 among them, may be off
    unconverged_fits: int = 0
    refit_converged: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The share of the training rows held out for choosing the L2 strength when no validation split is given
DEFAULT_VAL_FRACTION = 0.2


def validation_count(num_examples: int, fraction: float) -> int:
    """How many of `num_examples` training examples `split_validation` holds out: at least 1, and it must leave
    at least 1 to fit on (a ValueError that gives the counts otherwise)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, round(fraction * num_examples))
    if n_val >= num_examples:
        raise ValueError(
            f"holding out {n_val} of {num_examples} training example(s) for validation (fraction {fraction}) "
            "leaves none to fit the probe on; use more training data, a smaller validation fraction or a "
            "separate validation split"
        )
    return n_val


def split_validation(
    features: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A seeded (train, validation) split holding out `fraction` of the rows, stratified by class: each class
    gives the validation set its share of the rows (within one), and keeps a training row while any class can
    spare one. A plain random hold-out could take a rare class's every row, so the strength sweep never fitted
    it, or none of them, so the sweep never scored it."""
    n_val = validation_count(len(labels), fraction)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    cpu_labels = labels.cpu()[order]
    # Each row's place within its class (in the shuffled order), as a fraction of the class: holding out the
    # n_val rows of smallest place takes every class's rows in proportion. A class's last row goes last.
    by_class = torch.argsort(cpu_labels, stable=True)
    class_sizes = torch.bincount(cpu_labels)
    starts = torch.cumsum(class_sizes, 0) - class_sizes
    place_in_class = torch.empty(len(labels), dtype=torch.float64)
    index_in_class = torch.arange(len(labels)) - starts[cpu_labels[by_class]]
    size = class_sizes[cpu_labels[by_class]].double()
    place_in_class[by_class] = torch.where(index_in_class == size - 1, torch.inf, (index_in_class + 0.5) / size)
    # Ties (classes of one size) are broken by the shuffled order, so which class gives the odd row is seeded
    ranked = order[torch.argsort(place_in_class, stable=True)]
    val, train = ranked[:n_val].to(features.device), ranked[n_val:].to(features.device)
    return (features[train], labels[train]), (features[val], labels[val])


def _to(split: tuple[torch.Tensor, torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    return split[0].to(device), split[1].to(device)


# A feature column whose std is below this fraction of its magnitude (plus 1) counts as constant.
CONSTANT_RELATIVE_SPREAD = 1e-6


def _standardizer(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every feature column. A column without a measurable spread -- constant (its std then
    only float rounding: 7e-9 for a float32 column of 0.1), or of a single example, whose sample std is
    undefined (NaN) -- is only centred (std 1): dividing by ~0 would blow up its test values, and a NaN would
    stop the fit."""
    mean = features.mean(dim=0)
    std = features.std(dim=0) if len(features) > 1 else torch.zeros_like(features[0])
    measurable = std > CONSTANT_RELATIVE_SPREAD * (mean.abs() + 1)
    return mean, torch.where(measurable, std, torch.ones_like(std))


def run_linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    standardize: bool = False,
    device: torch.device | str | None = None,
    metric: str = "accuracy",
    **sweep_options: Any,
) -> LinearProbeResult:
    """Chooses l2 on `val` (or a held-out `val_fraction` of `train`) by `metric` ("accuracy" or
    "mean_per_class"), refits on train + val, scores `test` (both metrics are reported).

    standardize: z-score features with statistics of the data being fitted (the paper did not).
    device: where to fit (a GPU makes full-batch L-BFGS on large feature sets fast); default: where they are.
    sweep_options: passed to `select_l2` (low, high, coarse_points, refine_steps, max_iter).
    """
    if num_classes < 2:  # one class: every prediction is right, 100% whatever the features
        raise ValueError(f"a linear probe needs at least 2 classes to tell apart, got {num_classes}")
    for what, split in (("train", train), ("test", test), ("validation", val)):
        if split is not None:
            refuse_nonfinite_features(split[0], f"linear-probe {what}")
            check_labels(split[1], num_classes, what)
    if len(test[1]) == 0:  # its accuracies would be a mean over nothing
        raise ValueError("the test split has no examples")
    # int32, int16 or uint8 labels pass the check, and failed inside torch (uint8 indexes as a mask)
    train, test = (train[0], train[1].long()), (test[0], test[1].long())
    val = None if val is None else (val[0], val[1].long())
    if device is not None:
        train, test = _to(train, device), _to(test, device)
        val = None if val is None else _to(val, device)
    # The refit's train + validation rows: the given training rows themselves where the validation split was
    # taken from them (concatenating the split's two copies made a third copy of the features)
    refit_rows = None
    if val is None:
        refit_rows = train
        train, val = split_validation(*train, val_fraction, seed)
    if len(val[1]) == 0:  # every validation score would be a mean over nothing
        raise ValueError("the validation split has no examples")

    def scaled(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return x if stats is None else (x - stats[0]) / stats[1]

    stats = _standardizer(train[0]) if standardize else None
    l2, sweep = select_l2(
        (scaled(train[0], stats), train[1]), (scaled(val[0], stats), val[1]), num_classes, metric=metric,
        **sweep_options,
    )
    chosen = next(point for point in sweep if point.l2 == l2)
    if len(sweep) > 1 and len({point.key(metric) for point in sweep}) == 1:
        # Every strength scored alike (validation images of classes with no training image, or too few to differ):
        # the sweep's first strength was taken, as if chosen
        logger.warning(
            "the validation split scored every L2 strength alike (%s %.4f, loss %.4g): l2 = %.3g is not chosen by "
            "it. A validation split whose classes all have training images, and more of them, lets it choose",
            metric, getattr(chosen, VALIDATION_FIELD[metric]), chosen.val_loss, l2,
        )
    num_train, num_val = len(train[1]), len(val[1])
    if refit_rows is None:
        refit_rows = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    full_x, full_y = refit_rows
    del train, val  # the split's copies, no longer needed during the refit
    stats = _standardizer(full_x) if standardize else None
    max_iter = sweep_options.get("max_iter", 1000)  # select_l2's default
    probe = fit_logistic_regression(scaled(full_x, stats), full_y, num_classes, l2, max_iter=max_iter)
    test_x = scaled(test[0].to(full_x.device), stats)
    unconverged = sum(not point.converged for point in sweep) + (not probe.converged)
    if unconverged:
        logger.warning(
            "%d of the linear probe's %d fits ended at max_iter = %d iterations, short of convergence (the "
            "refit on train + validation %s): their weights and the l2 chosen may be off. Features of widely "
            "different scales converge slowly: standardize them (--standardize), or raise max_iter (--max-iter)",
            unconverged, len(sweep) + 1, max_iter,
            "among them" if not probe.converged else "converged",
        )
    return LinearProbeResult(
        l2=l2,
        metric=metric,
        train_accuracy=probe.accuracy(scaled(full_x, stats), full_y),
        val_accuracy=chosen.val_accuracy,
        val_mean_per_class=chosen.val_mean_per_class,
        test_accuracy=probe.accuracy(test_x, test[1]),
        test_mean_per_class=probe.mean_per_class_accuracy(test_x, test[1]),
        num_train=num_train,
        num_val=num_val,
        num_test=len(test[1]),
        standardize=standardize,
        sweep=sweep,
        unconverged_fits=unconverged,
        refit_converged=probe.converged,
    )
