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

An image that cannot be decoded is left out with its captions and counted in `num_skipped`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from clip.cuda_backends import ieee_float32_matmul
from clip.data.manifest import FIELD_LIMIT, MANIFEST_SUFFIXES, is_json_lines, manifest_rows

from .config import RetrievalDatasetConfig
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
from .image_files import read_image

Ties = Literal["optimistic", "pessimistic"]
# Scores closer than this fraction of the largest possible one (|text| x the largest |image|) are a tie.
TIE_TOLERANCE = 1e-6


@dataclass
class RetrievalData:
    """Unique images, all captions, and which image each caption describes (caption_image[t] = image index)."""

    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_image):
            raise ValueError("need one image index per caption")
        described = set(self.caption_image)
        if len(described) != len(self.image_paths) or not described <= set(range(len(self.image_paths))):
            raise ValueError("every image needs at least one caption, and every caption a valid image index")

    def first_images(self, count: int) -> RetrievalData:
        """The first `count` images and all of their captions."""
        keep = [t for t, i in enumerate(self.caption_image) if i < count]
        return RetrievalData(
            self.image_paths[:count], [self.captions[t] for t in keep], [self.caption_image[t] for t in keep]
        )


def _grouped(pairs: Sequence[tuple[str, str]], image_root: Path, source: Path) -> RetrievalData:
    """(image path, caption) pairs of the annotations file `source` -> RetrievalData; images in order of first
    appearance. Paths are grouped as spelled out in full ("a.png", "./a.png" and "x/../a.png" are one image:
    as two, each was the other's tie). An image missing is an error naming `source` and `image_root`: unlike
    training, which skips such a pair, an evaluation set is scored whole or not at all, as its recalls are
    only comparable over the same images."""
    index_of: dict[str, int] = {}
    captions, caption_image = [], []
    for image, caption in pairs:
        captions.append(caption)
        caption_image.append(index_of.setdefault(os.path.normpath(image), len(index_of)))
    paths = [image_root / image for image in index_of]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} of its {len(paths)} images are not found under {image_root} (the image "
            f"root; by default the file's folder), e.g. {missing[:3]}"
        )
    return RetrievalData(paths, captions, caption_image)


def _utf8_caption(caption: str, where: str) -> str:
    """`caption`, or a ValueError naming `where` when it holds lone surrogates, which the tokenizer cannot take
    (undecodable bytes kept by the manifest reader, escapes like "\\ud800" in JSON)."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: the caption is not valid UTF-8: {caption!r}") from None
    return caption


def _read_json_file(path: Path) -> Any:
    """A JSON file's content; a file that is not UTF-8 JSON is a ValueError naming it (a byte-order mark is
    allowed, as in the manifests)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except ValueError as error:  # JSONDecodeError, and an integer of more than 4300 digits
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:  # json parses nested arrays and objects recursively
        raise ValueError(f"{path}: not valid JSON (its arrays or objects nest too deeply)") from None


def _karpathy_captions(path: Path, number: int, sentences: Any) -> list[str]:
    """The stripped "raw" captions of image #`number`. As in a manifest, a caption that is missing, not a
    string or blank is an error naming it: an evaluation set is read whole or not at all."""
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{path}: image #{number}: 'sentences' must be a non-empty list, got {sentences!r}")
    captions = []
    for position, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        caption = raw.strip() if isinstance(raw, str) else ""
        if not caption:
            raise ValueError(
                f"{path}: image #{number}, sentence #{position} needs a non-empty 'raw' caption, got {sentence!r}"
            )
        captions.append(_utf8_caption(caption, f"{path}: image #{number}, sentence #{position}"))
    return captions


def read_karpathy_json(path: str | Path, image_root: str | Path | None = None, split: str = "test") -> RetrievalData:
    """Karpathy-style split file: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}.
    Entries are numbered from 0 in errors ("image #3, sentence #1")."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    content = _read_json_file(path)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list")
    pairs = []
    for number, entry in enumerate(content["images"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: image #{number} must be a JSON object, got {entry!r}")
        if split and entry.get("split") != split:
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
            raise ValueError(
                f"{path}: image #{number} needs a non-empty 'filename' string (and 'filepath', if given, a "
                f"string), got filename {filename!r}, filepath {filepath!r}"
            )
        image = str(Path(filepath) / filename)
        pairs.extend((image, caption) for caption in _karpathy_captions(path, number, entry.get("sentences")))
    if not pairs:
        raise ValueError(f"{path}: no images in split {split!r}")
    return _grouped(pairs, root, path)


def _manifest_pair(
    path: Path, number: int, row: tuple[str, str] | None, image_column: str, caption_column: str
) -> tuple[str, str]:
    """(image path, stripped caption) of manifest row `number`. The training loader skips a row it cannot
    use; an evaluation set is read whole or not at all, so such a row is an error naming it."""
    caption = row[1].strip() if row else ""
    if not caption:
        jsonl = is_json_lines(path)
        needs = "needs to be a JSON object with" if jsonl else "needs"
        # The reader hands over no reason for a row it could not split: a 300 KB caption read as an empty one
        malformed = "" if row or jsonl else (
            f" (or it is malformed: an unbalanced quote, or a field longer than the {FIELD_LIMIT} characters a "
            f"manifest field may hold)"
        )
        raise ValueError(
            f"{path}: row {number} {needs} a non-empty {image_column!r} and {caption_column!r}{malformed}"
        )
    return row[0], _utf8_caption(caption, f"{path}: row {number}")


def read_caption_manifest(
    path: str | Path,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    quoting: str = "auto",
) -> RetrievalData:
    """A CSV/TSV (with a header) or JSONL manifest of (image, caption) rows; rows of one image need not be
    adjacent. Read by the training loader's reader (`clip.data.manifest.manifest_rows`), so both take the
    same files: byte-order marks, any case of suffix, `quoting` ("auto": CSV rules for .csv, none for .tsv;
    "csv" for a TSV that a CSV writer such as pandas quoted; "none")."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise ValueError(f"{path}: a .json file is read as Karpathy's format; rename a JSON-lines manifest to .jsonl")
    # Other unknown suffixes (.txt, none) are read as comma-separated, as `format = "manifest"` asks.
    separator = "" if suffix in MANIFEST_SUFFIXES else ","
    rows = manifest_rows(str(path), image_column, caption_column, separator=separator, quoting=quoting)
    pairs = [_manifest_pair(path, number, row, image_column, caption_column) for number, row in enumerate(rows, 1)]
    if not pairs:
        raise ValueError(f"{path}: no rows")
    return _grouped(pairs, root, path)


def annotations_format(config: RetrievalDatasetConfig) -> Literal["karpathy", "manifest"]:
    """How `config.annotations` is read: its `format`, or for "auto" by the file's suffix."""
    if config.format != "auto":
        return config.format
    return "manifest" if Path(config.annotations).suffix.lower() in MANIFEST_SUFFIXES else "karpathy"


def load_retrieval_data(config: RetrievalDatasetConfig) -> RetrievalData:
    if not config.annotations:
        raise ValueError("a retrieval dataset needs `annotations`")
    kind = annotations_format(config)
    if kind == "manifest" and config.split not in ("test", ""):  # not the default or "all"
        # Ignored, it evaluated every row of the manifest under the name of a split
        raise ValueError(
            f"retrieval dataset {config.resolved_name()!r}: split = {config.split!r}, but {config.annotations} is a "
            "manifest, whose rows are all evaluated; a split selects images of a Karpathy JSON file"
        )
    if kind == "karpathy":
        data = read_karpathy_json(config.annotations, config.image_root or None, config.split)
    else:
        data = read_caption_manifest(
            config.annotations, config.image_root or None, config.image_column, config.caption_column, config.quoting
        )
    if config.caption_template:
        data = RetrievalData(
            data.image_paths, [config.caption_template.replace("{}", c) for c in data.captions], data.caption_image
        )
    available = len(data.image_paths)
    data = data.first_images(config.max_images) if config.max_images > 0 else data
    if len(data.image_paths) == 1:  # every caption's image, and every image's caption, would be found first
        # A dataset of many images cut to one was said to "have 1 image", sending the user to its annotations
        held = "has 1 image" if available == 1 else f"has {available} images, of which max_images = 1 keeps 1"
        raise ValueError(
            f"retrieval dataset {config.resolved_name()!r} {held}; retrieval needs at least 2 to choose "
            "between (with one, every recall is 100%)"
        )
    return data


class ImagePathDataset(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.paths[index])), index


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
    truth = (text_features * image_features[caption_image]).sum(dim=-1)  # T: score of each caption's image
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
        skipped = {"num_skipped": float(self.num_skipped)} if self.num_skipped else {}
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
        return float(int(ranks.median()))  # the lower of the two middle ranks for an even count

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
