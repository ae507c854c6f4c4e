"""Image-text retrieval: recall@K in both directions, with several captions per image.

Ranks are exact and memory is bounded: the similarity matrix is visited one [chunk x chunk] block at a
time, and for every query we only count the candidates that score above its ground truth.

Rank of the ground truth (1-based), for a query q with ground-truth score g:
    pessimistic (default): 1 + #{non-ground-truth candidates c : s(q, c) >= g}  -- ties count against it
    optimistic:            1 + #{non-ground-truth candidates c : s(q, c) >  g}  -- ties favour the truth
Pessimistic is the default because under the optimistic rule a collapsed model, whose features are all
equal, ties everything and would score a perfect recall. The price: an image query also counts against
its ground truth another image's caption that repeats a true caption word for word (COCO has a few),
whenever the two encode to near-identical features. "Equal" is within `TIE_TOLERANCE`: the scores are
computed in float64, and two that differ by less than a millionth of the largest possible score (float32
features carry no more precision than that) are a tie -- an exact comparison let a collapsed model's truth
win by a last-bit rounding difference between two computations of the same dot product. An image query has
several true captions; g is the best of their scores (R@K: any true caption in the top K). Recall@K is the
fraction of queries whose rank is <= K. Non-finite features are refused: every comparison with NaN is
false, which ranked each NaN truth first.

An image that cannot be decoded is left out with its captions and counted in `num_skipped`. The images and
captions come as RetrievalData, read from annotation files by `clip.evaluation.retrieval_data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from clip.cuda_backends import ieee_float32_matmul

from .features import (
    StopCheck,
    Tokenizer,
    all_gather_rows,
    batches_on_every_rank,
    default_tokenizer,
    distributed_world,
    encode_image_batches,
    encode_texts,
    eval_mode,
    log_skipped,
    make_loader,
    model_device,
    nonfinite_causes,
    refuse_nonfinite_features,
    shard,
    shard_bounds,
    unwrap_model,
    with_stop_checks,
)

from .retrieval_data import ImagePathDataset, RetrievalData

Ties = Literal["optimistic", "pessimistic"]
# Scores closer than this fraction of the largest possible one (|text| x the largest |image|) are a tie.
TIE_TOLERANCE = 1e-6


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    *,
    chunk_size: int = 4096,
    ties: Ties = "pessimistic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the ground truth: (per image query [I] over texts, per text query [T] over images).

    Scores are dot products (pass normalised features for cosine similarity), compared within `TIE_TOLERANCE`.
    Memory: one [chunk_size x chunk_size] float64 block of scores, float64 copies of the features and O(I + T)
    counters. Non-finite features are a ValueError.
    """
    if ties not in ("optimistic", "pessimistic"):
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for what, features in (("image", image_features), ("text", text_features)):
        refuse_nonfinite_features(features, what)
    device = image_features.device
    # float64 where the device has it (not MPS), so that the products add no rounding of their own
    precise = torch.float32 if device.type == "mps" else torch.float64
    image_features, text_features = image_features.to(precise), text_features.to(precise)
    caption_image = caption_image.to(device).long()
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    # T: score of each caption's image, a chunk of captions at a time (whole, two T x D float64 temporaries)
    truth = torch.cat([
        (text_features[start:start + chunk_size] * image_features[caption_image[start:start + chunk_size]]).sum(-1)
        for start in range(0, num_texts, chunk_size)
    ]) if num_texts else text_features.new_zeros(0)
    best_truth = torch.full((num_images,), float("-inf"), device=device, dtype=truth.dtype)
    best_truth.scatter_reduce_(0, caption_image, truth, reduce="amax")  # I: best true caption per image
    # A candidate beats a ground truth g when its score is >= g - tolerance (pessimistic: ties count against
    # the truth) or > g + tolerance (optimistic); the tolerance scales with the largest score the query can get.
    image_norms, text_norms = image_features.norm(dim=-1), text_features.norm(dim=-1)
    text_tolerance = TIE_TOLERANCE * text_norms * (image_norms.max() if num_images else 0.0)
    image_tolerance = TIE_TOLERANCE * image_norms * (text_norms.max() if num_texts else 0.0)
    sign = -1.0 if ties == "pessimistic" else 1.0
    text_bar, image_bar = truth + sign * text_tolerance, best_truth + sign * image_tolerance
    beats = torch.gt if ties == "optimistic" else torch.ge
    texts_above = torch.zeros(num_texts, dtype=torch.long, device=device)
    images_above = torch.zeros(num_images, dtype=torch.long, device=device)
    # Full float32 even where training chose TF32 (train.tf32), should the products run in float32 (MPS)
    with ieee_float32_matmul():
        for t0 in range(0, num_texts, chunk_size):
            t1 = min(t0 + chunk_size, num_texts)
            rows = torch.arange(t1 - t0, device=device)
            for i0 in range(0, num_images, chunk_size):
                i1 = min(i0 + chunk_size, num_images)
                scores = text_features[t0:t1] @ image_features[i0:i1].t()  # t, i
                # Ground-truth pairs never compete: -inf loses to any finite score, under either tie rule
                columns = caption_image[t0:t1] - i0
                inside = (columns >= 0) & (columns < i1 - i0)
                scores[rows[inside], columns[inside]] = float("-inf")
                texts_above[t0:t1] += beats(scores, text_bar[t0:t1, None]).sum(dim=1)
                images_above[i0:i1] += beats(scores, image_bar[None, i0:i1]).sum(dim=0)
    return images_above + 1, texts_above + 1


@dataclass
class RetrievalResult:
    """Recalls are fractions in [0, 1], keyed like "image_to_text_R@1"; ranks are 1-based. num_images and
    num_texts count what was evaluated; num_skipped the unreadable images left out (with their captions)."""

    name: str
    num_images: int
    num_texts: int
    ties: str
    recalls: dict[str, float]
    image_to_text_median_rank: float
    text_to_image_median_rank: float
    image_to_text_mean_rank: float
    text_to_image_mean_rank: float
    num_skipped: int = 0

    def metrics(self) -> dict[str, float]:
        """Recalls and ranks, and num_skipped when images were left out (only then, so a clean run logs
        recalls alone)."""
        ranks = {k: v for k, v in asdict(self).items() if k.endswith("_rank")}
        skipped = {"num_skipped": self.num_skipped} if self.num_skipped else {}  # a count, as to_dict's
        return {**self.recalls, **ranks, **skipped}

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_ranks(
    image_ranks: torch.Tensor,
    text_ranks: torch.Tensor,
    *,
    ties: Ties,
    ks: Sequence[int] = (1, 5, 10),
    name: str = "",
    num_skipped: int = 0,
) -> RetrievalResult:
    """Recall@k and median/mean ranks, computed in integers and divided once: exact Python floats (2/3 is
    0.6666666666666666, not float32's 0.6666666865348816), identical however the ranks were batched.

    ties: the rule `retrieval_ranks` ranked by, recorded in the result. Required, so that the recorded rule
    cannot fall out of step with the one used (`retrieval_ranks` holds the one default)."""

    def fraction_within(ranks: torch.Tensor, k: int) -> float:
        return int((ranks <= k).sum()) / len(ranks)

    def mean(ranks: torch.Tensor) -> float:
        return int(ranks.sum()) / len(ranks)

    def median(ranks: torch.Tensor) -> float:
        # Of an even count, the mean of the two middle ranks, as numpy's median and the papers' "MedR" (COCO's
        # 5,000 images and Flickr30k's 1,000 are even counts): torch's median took the lower one
        ordered = ranks.sort().values
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return float(int(ordered[middle]))
        return (int(ordered[middle - 1]) + int(ordered[middle])) / 2

    recalls = {}
    for direction, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            recalls[f"{direction}_R@{k}"] = fraction_within(ranks, k)
    return RetrievalResult(
        name=name,
        num_images=len(image_ranks),
        num_texts=len(text_ranks),
        ties=ties,
        recalls=recalls,
        image_to_text_median_rank=median(image_ranks),
        text_to_image_median_rank=median(text_ranks),
        image_to_text_mean_rank=mean(image_ranks),
        text_to_image_mean_rank=mean(text_ranks),
        num_skipped=num_skipped,
    )


def drop_unreadable_images(
    caption_image: torch.Tensor, num_images: int, readable: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(which captions to keep [T] bool, their images' positions among the `readable` image indices).

    `readable` lists the indices of the images that were encoded, in the order of their feature rows; a
    caption of a left-out image has nothing to be retrieved against, so it is left out too.
    """
    position = torch.full((num_images,), -1, dtype=torch.long, device=readable.device)
    position[readable.long()] = torch.arange(len(readable), device=readable.device)
    caption_position = position[caption_image.to(readable.device).long()]
    keep = caption_position >= 0
    return keep, caption_position[keep]


def evaluate_retrieval(
    model: nn.Module,
    data: RetrievalData,
    transform: Callable,
    *,
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    text_batch_size: int = 256,
    precision: str = "fp32",
    chunk_size: int = 4096,
    ties: Ties = "pessimistic",
    ks: Sequence[int] = (1, 5, 10),
    name: str = "",
    dist_info: Any | None = None,
    stop_check: StopCheck | None = None,
) -> RetrievalResult:
    """Encodes every image and caption (each rank a slice when distributed; features are then gathered, so
    every rank returns the full result) and computes recall@K in both directions. Unreadable images are
    left out with their captions and counted. `stop_check` is called between the captions and the images
    and every few image batches, as in `evaluate_zeroshot`."""
    model = unwrap_model(model)
    device = device or model_device(model)
    tokenizer = tokenizer or default_tokenizer()
    rank, world_size = distributed_world(dist_info)
    logging_rank = rank  # kept for logging: the line below makes every rank rank 0 of 1
    if len(data.image_paths) < world_size:  # too small to give every rank a slice: each rank does it all
        rank, world_size = 0, 1
    images = shard(ImagePathDataset(data.image_paths, transform), rank, world_size)
    captions = data.captions[slice(*shard_bounds(len(data.captions), rank, world_size))]
    skipped: list[str] = []
    with eval_mode(model):
        text_features = encode_texts(
            model, captions, tokenizer, device=device, batch_size=text_batch_size, precision=precision
        )
        if stop_check is not None:
            stop_check()
        loader = make_loader(images, batch_size, workers, device)
        checked_batches = batches_on_every_rank(len(data.image_paths), world_size, batch_size)
        loader = with_stop_checks(loader, stop_check, checked_batches)
        encoded = list(encode_image_batches(model, loader, device=device, precision=precision, skipped=skipped))
    # A rank whose images were all unreadable still takes part in the gathers, with zero rows.
    image_features = (
        torch.cat([f for f, _ in encoded]) if encoded else text_features.new_zeros(0, text_features.shape[1])
    )
    image_index = torch.cat([i for _, i in encoded]) if encoded else torch.zeros(0, dtype=torch.long, device=device)
    image_features = all_gather_rows(image_features, world_size)
    image_index = all_gather_rows(image_index.to(image_features.device), world_size)
    text_features = all_gather_rows(text_features, world_size)
    num_skipped = len(data.image_paths) - len(image_index)
    # The count is global now; a dataset every rank did whole (world_size 1 here) has every reason on each rank.
    log_skipped(f"retrieval {name or 'dataset'}", num_skipped, skipped, logging_rank, world_size)
    if len(image_index) == 0:
        raise ValueError(f"retrieval {name or 'dataset'}: none of the {len(data.image_paths)} images is readable")
    if len(image_index) == 1:
        # load_retrieval_data refuses a set of one image; one left readable scored every recall 100% as well
        raise ValueError(
            f"retrieval {name or 'dataset'}: only 1 of the {len(data.image_paths)} images is readable; retrieval "
            "needs at least 2 to choose between (with one, every recall is 100%)"
        )
    keep_text, caption_image = drop_unreadable_images(
        torch.tensor(data.caption_image), len(data.image_paths), image_index
    )
    text_features = text_features[keep_text.to(text_features.device)]  # the captions of readable images
    for what, features in (("image", image_features), ("caption", text_features)):
        # named here, with the dataset and what gave the features
        refuse_nonfinite_features(features, f"retrieval {name or 'dataset'} {what}", nonfinite_causes(model, precision))
    image_ranks, text_ranks = retrieval_ranks(
        image_features,
        text_features,
        caption_image,
        chunk_size=chunk_size,
        ties=ties,
    )
    return summarize_ranks(image_ranks.cpu(), text_ranks.cpu(), ties=ties, ks=ks, name=name, num_skipped=num_skipped)
