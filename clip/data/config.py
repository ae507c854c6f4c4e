"""The `[data]` section of the training config: where image-caption pairs come from and how they are loaded.

A TOML example with two sources, the second seen twice per epoch:

    [data]
    workers = 8
    [[data.sources]]
    kind = "shards"
    path = "/datasets/cc3m/cc3m-{000000..000331}.tar"   # sizes.json beside the shards gives the counts
    [[data.sources]]
    kind = "manifest"
    path = "/datasets/captions/train.tsv"               # image paths are relative to the manifest's folder
    image_column = "filepath"
    caption_column = "title"
    weight = 2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..config_io import (MAX_PREFETCH_FACTOR, InvalidValue, check_field_types, home_expanded, require,
                         require_workers)
from .manifest import MANIFEST_SUFFIXES, separator_character


SourceKind = Literal["synthetic", "manifest", "shards"]


@dataclass
class SourceConfig:
    kind: SourceKind = "synthetic"  # synthetic shapes, a CSV/TSV/JSONL manifest, or WebDataset tar shards
    # A manifest file, or a shard pattern "dir/{000000..000127}.tar" (also s3://..., pipe:cmd); "" for synthetic.
    path: str = ""
    name: str = ""  # label in stats() and logs; "" = "<index>:<kind>"
    # Per-sample rate relative to the other sources: each epoch draws weight x size samples from this source
    # (2.0 = every sample twice, 0.5 = half of them, the other half next epoch; round(weight x size) of them, so a
    # source that rounds to none is refused); with `resampled`, the expected rate.
    weight: float = 1.0
    image_column: str = "image"  # manifest column with the image path; for shards, a member extension tried first
    # Manifest column with the caption. Shards: a member extension tried before "txt", or "json" / "json:FIELD"
    # for a field of each sample's .json ("caption" by default; img2dataset's .json holds one, which is also
    # read when a sample has no .txt).
    caption_column: str = "caption"
    separator: str = ""  # manifest field separator; "" = from the suffix (.csv ",", .tsv "\t"); unused for .jsonl
    # Manifest quote handling: "auto" = CSV quoting rules for .csv, none for tab-separated files (whose captions
    # hold raw '"'); "csv" for a TSV written by a CSV writer (pandas); "none" to read every field as written.
    quoting: Literal["auto", "none", "csv"] = "auto"
    # synthetic: the number of samples (None = DEFAULT_SYNTHETIC_SAMPLES). shards: the total sample count, spread
    # evenly over the shards, used instead of the size index (sizes.json or img2dataset's *_stats.json) -- for
    # shards without one.
    num_samples: int | None = None
    size_index: str = ""  # shards: path/URL of a sizes.json {shard file name: count}; "" = look beside the shards
    synthetic_image_size: int | None = None  # side of the rendered images; None = the model's image size
    synthetic_seed: int = 0  # which synthetic world (content), independent of the training seed

    def __post_init__(self) -> None:
        # A pathlib.Path as its text, a wrong type or kind refused as in a file, before the checks below
        check_field_types(self)
        if self.kind != "synthetic" and not self.path:
            raise InvalidValue("path", f"must be set for a {self.kind} source (the manifest file or shard pattern)")
        if self.kind == "synthetic" and self.path:
            # It would be ignored: the images are rendered. Most likely a manifest or shards were meant.
            raise InvalidValue("path", f"is not read by a synthetic source (got {self.path!r}); set kind to "
                               '"manifest" or "shards" for files')
        self.path, self.size_index = home_expanded(self.path), home_expanded(self.size_index)
        # The other file kind's path: a manifest read as shards was "not a readable tar file: rewrite or remove
        # it", and a shard pattern read as a manifest "does not exist"
        last_file = self.path.split("::")[-1].lower()
        if self.kind == "shards" and last_file.endswith(MANIFEST_SUFFIXES):
            raise InvalidValue("kind", f'is "shards", but {self.path!r} is a manifest: set kind = "manifest" (or '
                               "make shards of it with clip-make-shards)")
        if self.kind == "manifest" and last_file.endswith((".tar", ".tar.gz", ".tgz")):
            raise InvalidValue("kind", f'is "manifest", but {self.path!r} names WebDataset shards: set kind = "shards"')
        try:
            self.separator = separator_character(self.separator)
        except ValueError as error:
            raise InvalidValue("separator", str(error).removeprefix("a manifest's separator ")) from None
        # A source of weight 0 would never be read (and all weights 0 leave nothing to draw): leave it out instead.
        require("weight", self.weight, 0 < self.weight < math.inf, "a finite number > 0")
        if self.num_samples is not None:
            require("num_samples", self.num_samples, self.num_samples >= 1, ">= 1")
        if self.kind == "manifest" and self.num_samples is not None:
            # Also a synthetic source's count left over from its file when an override makes it a manifest
            # (the demo's, with data.sources.0.kind=manifest): said how to clear it
            raise InvalidValue("num_samples", "is for synthetic and shard sources; a manifest's rows are its samples: "
                               'remove it, or set it to "none"')
        if self.synthetic_image_size is not None:
            # The synthetic renderer needs 16 pixels to draw its shapes (clip.data.synthetic.SyntheticSpec).
            require("synthetic_image_size", self.synthetic_image_size, self.synthetic_image_size >= 16,
                    '>= 16, or "none" for the model\'s image size')
        # It seeds numpy's SeedSequence, which takes non-negative integers only.
        require("synthetic_seed", self.synthetic_seed, self.synthetic_seed >= 0, ">= 0")


# The longest data.worker_timeout_s the loader can wait: poll()'s limit, 2**31 - 1 milliseconds.
MAX_WORKER_TIMEOUT_S = (2**31 - 1) / 1000

# A synthetic source's size when its num_samples is left unset. A default of the source kind, not a value in
# the default source list: `data.sources.0.kind=manifest` on a file without [[data.sources]] turns that
# default element into a manifest, which must not inherit a synthetic sample count.
DEFAULT_SYNTHETIC_SAMPLES = 10_000


def synthetic_sample_count(num_samples: int | None) -> int:
    """How many samples a synthetic source with this `num_samples` setting renders."""
    return DEFAULT_SYNTHETIC_SAMPLES if num_samples is None else num_samples


def _demo_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="synthetic")]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=_demo_sources)  # [[data.sources]] tables; see SourceConfig
    # Draw sources and shards with replacement by weight (webdataset's "resampled" mode) instead of exact
    # epochs where every sample is seen once: for corpora too big to ever finish an epoch.
    resampled: bool = False
    # resampled only (an error without it): samples drawn per epoch, globally over ranks, and the span of one
    # reseeding of the draws. None = the sum of weight x size over the sources, the length of an exact epoch.
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000  # each worker permutes its stream in windows of this many samples (shards need it)
    workers: int = 2  # DataLoader worker processes per rank; 0 decodes in the training process
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies; only used when CUDA is available
    # Images with more pixels than this are skipped as decompression bombs (PIL's default limit, applied in
    # the data workers only). None ("none" in TOML) disables the check.
    max_image_pixels: int | None = 89_478_485
    # The training crop. false: resize the shorter side and center crop, the same pixels every epoch (keep
    # it for synthetic data: its captions name positions). "random_square_crop": the CLIP paper's only
    # augmentation, a square as large as the shorter side at a random place along the longer one.
    # "random_resized_crop" (or true): RandomResizedCrop over 90-100% of the area with aspect ratios
    # 3/4..4/3, squeezed to a square, as open_clip trains.
    augment: bool | Literal["random_square_crop", "random_resized_crop"] = False
    jpeg_draft: bool = True  # let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale when still >= the target size
    log_every_s: float = 60.0  # at most one log line per skip kind per worker in this many seconds
    # A data worker that delivers no batch for this long (a hung network read or pipe: command) stops the run
    # with an error instead of stalling it forever; resume from the last checkpoint. 0 waits forever. Needs
    # workers >= 1: with workers = 0 the training process reads the data itself, and a hung read hangs it.
    worker_timeout_s: float = 1800.0

    @property
    def crop(self) -> Literal["center", "random_square", "random_resized"]:
        """The crop `augment` asks for."""
        if self.augment is False:
            return "center"
        return "random_square" if self.augment == "random_square_crop" else "random_resized"

    def __post_init__(self) -> None:
        check_field_types(self)  # also 0 or 1 for augment, which == False and True
        if not self.sources:
            raise InvalidValue("sources", "is empty: add at least one [[data.sources]] table")
        if self.augment is True:  # one spelling of each crop, so that a resume does not report a change
            self.augment = "random_resized_crop"
        require_workers("workers", self.workers)
        require("prefetch_factor", self.prefetch_factor, 1 <= self.prefetch_factor <= MAX_PREFETCH_FACTOR,
                f"in [1, {MAX_PREFETCH_FACTOR}] (batches each worker prepares ahead)")
        require("shuffle_buffer", self.shuffle_buffer, self.shuffle_buffer >= 1, ">= 1 (1 = no shuffling)")
        if self.epoch_samples is not None:
            require("epoch_samples", self.epoch_samples, self.epoch_samples >= 1, '>= 1, or "none"')
            if not self.resampled:
                # The loader uses it only to size resampled epochs; an exact epoch is always one pass over the
                # sources (weight x size each), so the setting would be silently ignored.
                raise InvalidValue(
                    "epoch_samples",
                    "applies only with resampled = true (it is the number of samples a resampled epoch draws); "
                    "an exact epoch is one pass over the sources, weight x size each. Set resampled = true, "
                    "or remove epoch_samples (or change the sources' weights to change the epoch)",
                )
        if self.max_image_pixels is not None:
            require("max_image_pixels", self.max_image_pixels, self.max_image_pixels >= 1,
                    '>= 1, or "none" to disable the check')
        require("log_every_s", self.log_every_s, 0 <= self.log_every_s < math.inf, "a finite number >= 0")
        # The loader waits on its workers with poll(), which takes at most 2**31 - 1 milliseconds: a month
        # (2592000) stopped the run at its first batch with "OverflowError: timeout is too large"
        require("worker_timeout_s", self.worker_timeout_s, 0 <= self.worker_timeout_s <= MAX_WORKER_TIMEOUT_S,
                f"a finite number >= 0 and at most {MAX_WORKER_TIMEOUT_S} (about 24.8 days; 0 = no limit)")
