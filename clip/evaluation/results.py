"""Classification metrics: streamed counts -> `ZeroShotResult` (JSON-serialisable), and a confusion PNG."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..run_log import replaced_atomically

logger = logging.getLogger(__name__)

# Logits closer than this fraction of the image's largest |logit| are a tie, which goes to the lowest class index.
# The float32 product rounds the scores of identical class embeddings (one name given to two classes, ImageNet's
# two "missile" classes) apart by their columns and the batch's shape: compared exactly, the images of such
# classes went to one or the other by the batch size and the thread count.
TIE_TOLERANCE = 1e-6


def tie_tolerances(logits: torch.Tensor) -> torch.Tensor:
    """[N, 1]: how close to a row's score another counts as tied with it (`TIE_TOLERANCE`), from its finite scores
    (a masked class's -inf made every score a tie)."""
    finite = torch.where(logits.isfinite(), logits.abs(), torch.zeros_like(logits))
    return TIE_TOLERANCE * finite.amax(dim=1, keepdim=True)


def predicted_classes(logits: torch.Tensor, tolerance: torch.Tensor | None = None) -> torch.Tensor:
    """[N]: each row's lowest class index among its top scores, those within `tie_tolerances` of the best (given
    as `tolerance` where the caller has it already)."""
    best = logits.amax(dim=1, keepdim=True)
    tolerance = tie_tolerances(logits) if tolerance is None else tolerance
    return (logits >= best - tolerance).to(torch.int32).argmax(dim=1)  # argmax: the first largest


class ClassificationCounts:
    """Accumulates a confusion matrix and per-class top-k hits batch by batch, so the logits of a large
    dataset never have to be held at once; the counts are sums, so ranks can all-reduce them."""

    def __init__(self, num_classes: int, top_k: int = 5, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError("need at least one class")
        self.num_classes = num_classes
        self.k = min(top_k, num_classes)  # top-5 of a 3-class problem is top-3
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [true, predicted]
        self.topk_hits = torch.zeros(num_classes, dtype=torch.int64, device=device)  # per true class
        self.skipped = torch.zeros(1, dtype=torch.int64, device=device)  # unreadable images left out

    def add_skipped(self, count: int) -> None:
        self.skipped += count

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.confusion.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        logits = logits.to(self.confusion.device)
        tolerance = tie_tolerances(logits)
        predicted = predicted_classes(logits, tolerance)
        # Added pair by pair: a bincount over C*C cells allocated that many counts per batch (ImageNet-21k: 3.8 GB)
        self.confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        # The true class's rank as the prediction breaks ties (to the lower index), not topk's: among tied logits
        # topk picks whichever its kernel finds (differently on CPU and GPU), and a collapsed model whose logits
        # all tie scored top-1 100% and top-5 0% on images of class 0
        true_logits = logits.gather(1, labels[:, None])  # B, 1
        before = torch.arange(self.num_classes, device=logits.device) < labels[:, None]  # B, C
        ranked_above = (logits > true_logits + tolerance) | ((logits >= true_logits - tolerance) & before)
        # The prediction counts as within the top k: scores a tie apart from the best and from the truth, but
        # not from each other, could rank the predicted true class past k
        in_top_k = (ranked_above.sum(dim=1) < self.k) | (predicted == labels)
        self.topk_hits += torch.bincount(labels[in_top_k], minlength=self.num_classes)

    def as_tensor(self) -> torch.Tensor:
        """One flat tensor ([C*C confusion | C top-k hits | skipped]) for a single all-reduce."""
        return torch.cat([self.confusion.flatten(), self.topk_hits, self.skipped])

    def load_tensor(self, flat: torch.Tensor) -> None:
        c = self.num_classes
        self.confusion = flat[: c * c].view(c, c).clone()
        self.topk_hits = flat[c * c : c * c + c].clone()
        self.skipped = flat[c * c + c :].clone()


@dataclass
class SubsetResult:
    """Accuracies over the images of some classes; None when none of them has an image (not 0%)."""

    class_indices: list[int]
    num_samples: int
    top1: float | None
    top5: float | None
    mean_per_class_accuracy: float | None


@dataclass
class ZeroShotResult:
    """Accuracies are fractions in [0, 1]; `top5` is top-min(5, C). per_class_accuracy is None for a class
    without test images; the mean per-class accuracy averages the classes that have images.
    confusion_matrix[i][j] counts images of class i predicted as class j. num_skipped counts the unreadable
    images left out (not part of num_samples)."""

    name: str
    classnames: list[str]
    num_samples: int
    top1: float
    top5: float
    top5_k: int
    mean_per_class_accuracy: float
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]
    subsets: dict[str, SubsetResult] = field(default_factory=dict)
    num_skipped: int = 0

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics: top1, top5, mean_per_class, <subset>/<metric> for each subset that has images, and
        num_skipped when images were left out (only then, so a clean run logs accuracies alone)."""
        flat = {"top1": self.top1, "top5": self.top5, "mean_per_class": self.mean_per_class_accuracy}
        if self.num_skipped:
            flat["num_skipped"] = self.num_skipped  # a count: written 3, as to_dict gives it, not 3.0
        for subset_name, subset in self.subsets.items():
            if not subset.num_samples:
                continue
            flat[f"{subset_name}/top1"] = subset.top1
            flat[f"{subset_name}/top5"] = subset.top5
            flat[f"{subset_name}/mean_per_class"] = subset.mean_per_class_accuracy
        return flat

    def to_dict(self) -> dict:
        return asdict(self)


def _accuracies(counts: ClassificationCounts, classes: Sequence[int]) -> tuple[int, float, float, float, list]:
    """(samples, top1, top-k, mean per-class accuracy, per-class accuracies) over images of `classes`."""
    index = torch.as_tensor(list(classes), dtype=torch.long)
    confusion = counts.confusion.cpu()
    totals = confusion.sum(dim=1)[index]
    correct = confusion.diagonal()[index]
    topk = counts.topk_hits.cpu()[index]
    n = int(totals.sum())
    per_class = [int(c) / int(t) if t > 0 else None for c, t in zip(correct, totals, strict=True)]
    present = [a for a in per_class if a is not None]
    top1 = int(correct.sum()) / n if n else 0.0
    top_k = int(topk.sum()) / n if n else 0.0
    mean_per_class = sum(present) / len(present) if present else 0.0
    return n, top1, top_k, mean_per_class, per_class


def summarize(
    counts: ClassificationCounts, classnames: Sequence[str], subsets: dict[str, list[int]] | None = None, name: str = "",
    warn: bool = True,
) -> ZeroShotResult:
    """warn: say which subsets have no images (the caller's rank 0 alone, where every rank summarises alike)."""
    n, top1, top_k, mean_per_class, per_class = _accuracies(counts, range(counts.num_classes))
    subset_results = {}
    for subset_name, class_indices in (subsets or {}).items():
        if any(not 0 <= c < counts.num_classes for c in class_indices):
            raise ValueError(f"subset {subset_name!r} names classes outside 0..{counts.num_classes - 1}")
        # A class named twice would have its images counted twice in the subset's samples and accuracies
        repeated = [c for c, times in Counter(class_indices).items() if times > 1]
        if repeated:
            raise ValueError(f"subset {subset_name!r} names class {repeated[0]} more than once")
        sn, s1, sk, smean, _ = _accuracies(counts, class_indices)
        if sn == 0:  # a few evaluation images (max_samples) can miss every class of a subset
            if warn:
                logger.warning("%s: subset %s has no images; its accuracies are left out", name or "dataset",
                               subset_name)
            s1 = sk = smean = None
        subset_results[subset_name] = SubsetResult(list(class_indices), sn, s1, sk, smean)
    return ZeroShotResult(
        name=name,
        classnames=list(classnames),
        num_samples=n,
        top1=top1,
        top5=top_k,
        top5_k=counts.k,
        mean_per_class_accuracy=mean_per_class,
        per_class_accuracy=per_class,
        confusion_matrix=counts.confusion.cpu().tolist(),
        subsets=subset_results,
        num_skipped=int(counts.skipped.sum()),
    )


def top_k_label(results: Sequence[ZeroShotResult]) -> str:
    """The top-k column's heading: "top5", or "top3" when every dataset has 3 classes; "top-k" when the
    datasets' k differ."""
    ks = {r.top5_k for r in results}
    return f"top{ks.pop()}" if len(ks) == 1 else "top-k"


def format_table(results: Sequence[ZeroShotResult]) -> str:
    """A plain-text table, one row per dataset and subset, accuracies in percent."""
    top_k = top_k_label(results)
    header = f"{'dataset':<28} {'images':>8} {'classes':>8} {'top1':>7} {top_k:>7} {'mean/cls':>8}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.name:<28} {r.num_samples:>8} {len(r.classnames):>8} "
            f"{100 * r.top1:>7.2f} {100 * r.top5:>7.2f} {100 * r.mean_per_class_accuracy:>8.2f}"
        )
        for subset_name, s in r.subsets.items():
            label = f"  {r.name}/{subset_name}"
            if not s.num_samples:
                rows.append(f"{label:<28} {0:>8} {len(s.class_indices):>8} {'-':>7} {'-':>7} {'-':>8}")
                continue
            rows.append(
                f"{label:<28} {s.num_samples:>8} {len(s.class_indices):>8} "
                f"{100 * s.top1:>7.2f} {100 * s.top5:>7.2f} {100 * s.mean_per_class_accuracy:>8.2f}"
            )
    if top_k == "top-k":
        rows.append("top-k: k = min(5, number of classes) for each dataset")
    skipped = [f"{r.name}: {r.num_skipped}" for r in results if r.num_skipped]
    if skipped:
        rows.append(f"unreadable images skipped: {', '.join(skipped)}")
    # A class folder left empty, or holding only files of other extensions, gave the table's class count and
    # a mean/cls over fewer classes without a word (torchvision's ImageFolder refuses such a folder)
    imageless = [f"{r.name}: {_classes_without_images(r)}" for r in results if None in r.per_class_accuracy]
    if imageless:
        rows.append(f"classes without images (mean/cls averages the others): {'; '.join(imageless)}")
    return "\n".join(rows)


def _classes_without_images(result: ZeroShotResult, shown: int = 3) -> str:
    """"1 of 10 (ship)": how many of `result`'s classes had no image evaluated, and the first `shown` names."""
    names = [name for name, accuracy in zip(result.classnames, result.per_class_accuracy, strict=True)
             if accuracy is None]
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} of {len(result.classnames)} ({listed})"


def save_confusion_png(result: ZeroShotResult, path: str | Path, max_labelled_classes: int = 50) -> Path | None:
    """Row-normalised confusion matrix as a PNG; returns None (and logs why) when matplotlib is missing or the
    file cannot be written. A plot is a by-product: its failure (a folder that cannot be created) came right
    after the dataset's evaluation and ended the run there, before the other datasets and results.json."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed; skipping the confusion-matrix plot for %s", result.name)
        return None
    try:
        return _draw_confusion(result, Path(path), max_labelled_classes, Figure, FigureCanvasAgg)
    except (OSError, ValueError, RuntimeError) as error:
        logger.warning("could not write the confusion-matrix plot %s: %s", path, error)
        return None


def _plain_label(text: str) -> str:
    """`text` as matplotlib shows it literally: '$' starts its math mode, and a class name such as '$5 bill'
    or '$x^{$' failed to parse (ValueError) when the figure was drawn. A folder name's bytes that are not UTF-8
    (kept as surrogates) are shown as U+FFFD: matplotlib's font code refused the string (TypeError)."""
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return shown.replace("$", r"\$")


def _draw_confusion(
    result: ZeroShotResult, path: Path, max_labelled_classes: int, Figure: type, FigureCanvasAgg: type
) -> Path:
    confusion = torch.tensor(result.confusion_matrix, dtype=torch.float64)
    rates = confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    num_classes = len(result.classnames)
    size = min(4 + 0.25 * num_classes, 30)
    # The object-oriented API: no pyplot global state, no GUI backend needed.
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046)
    if num_classes <= max_labelled_classes:  # beyond this, tick labels are unreadable
        labels = [_plain_label(name) for name in result.classnames]
        axes.set_xticks(range(num_classes), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(num_classes), labels, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{_plain_label(result.name)}: top-1 {100 * result.top1:.2f}%")
    figure.tight_layout()
    # Replaced whole: a Ctrl-C (which the evaluation commands report as leaving their files whole) or a full
    # disk during the drawing, seconds for a thousand classes, left a torn PNG in place of the previous one
    with replaced_atomically(path, "wb") as file:
        figure.savefig(file, format="png", dpi=100)
    return path
