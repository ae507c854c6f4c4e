"""Image-text retrieval's evaluation sets, read from local files: a Karpathy-style split file (COCO's and
Flickr30k's `dataset_*.json`) or a CSV/TSV/JSONL caption manifest, as RetrievalData (the unique images, every
caption, and which image each caption describes), and those images as a dataset to encode. A set is read whole
or not at all: a missing image or an unusable caption is an error naming the file, since recalls are only
comparable over the same images. Ranking and recall@K are `clip.evaluation.retrieval`'s.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from clip.config_io import relative_path_note
from clip.data.manifest import FIELD_LIMIT, MANIFEST_SUFFIXES, is_json_lines, manifest_rows_with_problems
from clip.tokenizer import cleans_to_nothing

from .config import RetrievalDatasetConfig
from .image_files import read_image

logger = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """Unique images, all captions, and which image each caption describes (caption_image[t] = image index)."""

    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]
    # "coco_captions" where read from COCO's own captions file (by read_karpathy_json, as a Karpathy file is),
    # for the results' record, which would call it a Karpathy file's test split; "" otherwise
    layout: str = ""

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
            self.image_paths[:count], [self.captions[t] for t in keep], [self.caption_image[t] for t in keep],
            self.layout,
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
        if not caption or cleans_to_nothing(caption):  # ("&nbsp;": evaluated as an empty text, [start, end])
            raise ValueError(
                f"{path}: image #{number}, sentence #{position} needs a non-empty 'raw' caption (also once cleaned "
                f"as the tokenizer cleans it), got {sentence!r}"
            )
        captions.append(_utf8_caption(caption, f"{path}: image #{number}, sentence #{position}"))
    return captions


def read_karpathy_json(
    path: str | Path, image_root: str | Path | None = None, split: str = "test", warn: bool = True
) -> RetrievalData:
    """Karpathy-style split file: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}, or
    COCO's own captions file (`_coco_caption_pairs`), which is one split. Entries are numbered from 0 in errors
    ("image #3, sentence #1"). `warn`: about an image listed in several entries (the trainer's evaluations say
    it once, before training)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    content = _read_json_file(path)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list")
    first = content["images"][0] if content["images"] else None
    if isinstance(content.get("annotations"), list) and isinstance(first, dict) and "sentences" not in first:
        # COCO's own captions_val2017.json: it was read as a Karpathy file with no splits, whose hint (split '')
        # then failed on the images' missing 'filename'
        if split not in ("test", ""):
            raise ValueError(f"{path}: a COCO captions file (images and annotations) holds one split, the one its "
                             f"name says, and has no split {split!r} to select: leave split out")
        return dataclasses.replace(_grouped(_coco_caption_pairs(path, content), root, path), layout="coco_captions")
    pairs = []
    images_per_split: Counter[str] = Counter()  # of every entry, to name the splits when `split` has none
    entries_of: Counter[str] = Counter()  # of the split's images
    for number, entry in enumerate(content["images"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: image #{number} must be a JSON object, got {entry!r}")
        images_per_split[repr(entry["split"]) if "split" in entry else "no 'split'"] += 1
        if split and entry.get("split") != split:
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
            raise ValueError(
                f"{path}: image #{number} needs a non-empty 'filename' string (and 'filepath', if given, a "
                f"string), got filename {filename!r}, filepath {filepath!r}"
            )
        image = str(Path(filepath) / filename)
        entries_of[os.path.normpath(image)] += 1
        pairs.extend((image, caption) for caption in _karpathy_captions(path, number, entry.get("sentences")))
    repeated = sorted(image for image, count in entries_of.items() if count > 1)
    if repeated and warn:
        # One image with the captions of every entry: its captions counted twice in text->image recall, unsaid
        logger.warning("%s: %d image(s) listed in more than one entry, each evaluated once with the captions of "
                       "all its entries, e.g. %s", path, len(repeated), repeated[:3])
    if not pairs:
        # "no images in split 'test'" alone left the user to open a large file to learn which splits it has
        found = "; ".join(f"{name}: {count}" for name, count in sorted(images_per_split.items()))
        held = f"images per split, {found}; split '' takes every image" if found else "it lists no images"
        raise ValueError(f"{path}: no images in split {split!r} ({held})")
    return _grouped(pairs, root, path)


def _coco_caption_pairs(path: Path, content: dict) -> list[tuple[str, str]]:
    """(file_name, stripped caption) pairs of COCO's captions format, {"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]}, image by image in the file's order. As for a Karpathy file, an
    image without captions, a caption of no listed image and a blank caption are errors naming them."""
    file_names: dict[Any, str] = {}
    for number, image in enumerate(content["images"]):
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(name, str) or not name or not isinstance(image.get("id"), (int, str)):
            raise ValueError(f"{path}: image #{number} needs an 'id' and a non-empty 'file_name' string (a COCO "
                             f"captions file), got {image!r}")
        if image["id"] in file_names:
            raise ValueError(f"{path}: image #{number}: id {image['id']!r} is another image's too")
        file_names[image["id"]] = name
    captions: dict[Any, list[str]] = {image_id: [] for image_id in file_names}
    for number, annotation in enumerate(content["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        raw = annotation.get("caption") if isinstance(annotation, dict) else None
        caption = raw.strip() if isinstance(raw, str) else ""
        if not isinstance(image_id, (int, str)) or image_id not in captions:
            raise ValueError(f"{path}: annotation #{number} names no listed image (image_id {image_id!r})")
        if not caption or cleans_to_nothing(caption):
            raise ValueError(f"{path}: annotation #{number} needs a non-empty 'caption' (also once cleaned as the "
                             f"tokenizer cleans it), got {annotation!r}")
        captions[image_id].append(_utf8_caption(caption, f"{path}: annotation #{number}"))
    without = [file_names[image_id] for image_id, found in captions.items() if not found]
    if without:
        raise ValueError(f"{path}: {len(without)} of its {len(file_names)} images have no caption, e.g. {without[:3]}")
    return [(file_names[image_id], caption) for image_id, found in captions.items() for caption in found]


def _manifest_pair(
    path: Path, number: int, row: tuple[str, str, int] | str, image_column: str, caption_column: str
) -> tuple[str, str]:
    """(image path, stripped caption) of manifest row `number`, or for a str `row` (the reader's reason for an
    unusable one) an error. The training loader skips a row it cannot use; an evaluation set is read whole or
    not at all, so such a row is an error naming it."""
    usable = isinstance(row, tuple)
    caption = row[1].strip() if usable else ""
    if usable and caption and cleans_to_nothing(caption):  # ("&nbsp;": evaluated as an empty text, [start, end])
        raise ValueError(f"{path}: row {number}: its {caption_column!r} {caption!r} is empty once cleaned as the "
                         f"tokenizer cleans it")
    if not caption:
        jsonl = is_json_lines(path)
        needs = "needs to be a JSON object with" if jsonl else "needs"
        # A row the reader could not split: a 300 KB caption was read as an empty one
        malformed = "" if usable or jsonl else (
            f" (or it is malformed: an unbalanced quote, or a field longer than the {FIELD_LIMIT} characters a "
            f"manifest field may hold)"
        )
        reason = "" if usable else f"; {row}"  # e.g. "line 2: 'caption' is a list, not a string"
        raise ValueError(
            f"{path}: row {number} {needs} a non-empty {image_column!r} and {caption_column!r}{malformed}{reason}"
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
    adjacent. Read by the training loader's reader (`clip.data.manifest.manifest_rows_with_problems`), so both
    take the same files: byte-order marks, any case of suffix, `quoting` ("auto": CSV rules for .csv, none for
    .tsv; "csv" for a TSV that a CSV writer such as pandas quoted; "none")."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise ValueError(f"{path}: a .json file is read as Karpathy's format; rename a JSON-lines manifest to .jsonl")
    # Other unknown suffixes (.txt, none) are read as comma-separated, as `format = "manifest"` asks.
    separator = "" if suffix in MANIFEST_SUFFIXES else ","
    # Read through before the first bad row is judged: a column that no row has is said at the end of the file
    rows = list(manifest_rows_with_problems(str(path), image_column, caption_column, separator, quoting))
    pairs = [_manifest_pair(path, number, row, image_column, caption_column) for number, row in enumerate(rows, 1)]
    if not pairs:
        raise ValueError(f"{path}: no rows")
    return _grouped(pairs, root, path)


def annotations_format(config: RetrievalDatasetConfig) -> Literal["karpathy", "manifest"]:
    """How `config.annotations` is read: its `format`, or for "auto" by the file's suffix."""
    if config.format != "auto":
        return config.format
    return "manifest" if Path(config.annotations).suffix.lower() in MANIFEST_SUFFIXES else "karpathy"


def load_retrieval_data(config: RetrievalDatasetConfig, warn: bool = True) -> RetrievalData:
    if not Path(config.annotations).exists():
        # The reader's bare "[Errno 2] No such file or directory: 'pairs.csv'" named neither the setting nor the
        # dataset, in clip-train's one line as in clip-retrieval's
        raise FileNotFoundError(f"retrieval dataset {config.resolved_name()!r}: annotations {config.annotations} "
                                f"does not exist{relative_path_note(config.annotations)}")
    if Path(config.annotations).is_dir():  # it was a bare "[Errno 21] Is a directory"
        raise ValueError(f"retrieval dataset {config.resolved_name()!r}: annotations {config.annotations} is a "
                         "folder; give its Karpathy JSON or manifest file (the images' folder is image_root)")
    kind = annotations_format(config)
    if kind == "manifest" and config.split not in ("test", ""):  # not the default or "all"
        # Ignored, it evaluated every row of the manifest under the name of a split
        raise ValueError(
            f"retrieval dataset {config.resolved_name()!r}: split = {config.split!r}, but {config.annotations} is a "
            "manifest, whose rows are all evaluated; a split selects images of a Karpathy JSON file"
        )
    if kind == "karpathy":
        data = read_karpathy_json(config.annotations, config.image_root or None, config.split, warn)
    else:
        data = read_caption_manifest(
            config.annotations, config.image_root or None, config.image_column, config.caption_column, config.quoting
        )
    if config.caption_template:
        data = dataclasses.replace(data, captions=[config.caption_template.replace("{}", c) for c in data.captions])
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


def captions_shared_by_images(data: RetrievalData) -> dict[str, set[int]]:
    """Each caption that two or more images have, with those images. Captions are compared as the tokenizer
    reads them, case and spacing aside ("A red  circle" is "a red circle"): such copies encode alike."""
    images_of: dict[str, set[int]] = {}
    for caption, image in zip(data.captions, data.caption_image, strict=True):
        images_of.setdefault(" ".join(caption.lower().split()), set()).add(image)
    return {caption: images for caption, images in images_of.items() if len(images) > 1}


def warn_about_shared_captions(data: RetrievalData, name: str, remedy: str) -> None:
    """Under pessimistic ties (the default), another image's copy of an image's true caption scores the same
    and counts against it: captions written from a template ("a red circle", the same for dozens of images)
    make image->text recall 0 however good the model. Said before the figures, so that they are not read as
    a broken model; `remedy` says how the caller's user ranks those ties in the truth's favour instead."""
    shared = captions_shared_by_images(data)
    if not shared:
        return
    images = set().union(*shared.values())
    example = max(shared, key=lambda caption: len(shared[caption]))
    logger.warning(
        "retrieval %s: %d of %d images have a caption that another image has too (%d such captions; %r is %d "
        "images'). A copy of an image's true caption scores as a tie, which counts against the truth (pessimistic "
        "ties): image->text recall@K is 0 for an image whose caption K or more other images share, however good "
        "the model. %s",
        name, len(images), len(data.image_paths), len(shared), example, len(shared[example]), remedy,
    )


class ImagePathDataset(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.paths[index])), index
