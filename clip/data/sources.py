"""Image-caption sources as the data workers see them: synthetic, manifest and shards.

A source knows its layout (size, shard sizes) for the planner, iterates the raw items a `SlotPlan` assigns
to it (`items`), and turns a raw item into caption and image bytes (`caption`, `image`). Raw items are
cheap to skip: row numbers for synthetic and manifest sources; for shards, samples whose member data is
only read once they are needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from PIL import Image

from .config import SourceConfig, synthetic_sample_count
from .decoding import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, SHARD_FAULTS, SkipSample, find_member
from .manifest import is_json_lines, read_manifest
from .sampling import SlotPlan, SourceLayout
from .shards import CUT_SHORT_KEY, MissingSample, expand_shard_pattern, read_shard_range, require_webdataset, shard_name, shard_sizes

log = logging.getLogger(__name__)


class SyntheticSource:
    """`clip.data.synthetic.SyntheticCaptions` (rendered on demand, deterministic per index)."""

    kind = "synthetic"

    def __init__(self, name: str, config: SourceConfig, image_size: int) -> None:
        self.name = name
        self.num_samples = synthetic_sample_count(config.num_samples)
        self.image_size = config.synthetic_image_size or image_size
        self.seed = config.synthetic_seed
        self.layout = SourceLayout(self.num_samples, config.weight)
        self._dataset: Any = None  # created in the worker that uses it

    def _captions(self) -> Any:
        if self._dataset is None:
            from .synthetic import SyntheticCaptions

            self._dataset = SyntheticCaptions(self.num_samples, image_size=self.image_size, seed=self.seed)
        return self._dataset

    def fingerprint(self) -> str:
        return f"synthetic:{self.num_samples}:{self.image_size}:{self.seed}"

    def items(self, plan: SlotPlan, index: int, skip: int) -> Iterator[int]:
        return map(int, plan.rows[index][skip:])

    def describe(self, row: int, kind: str = "") -> str:  # kind: the skip's, for a shard source's
        return f"#{row}"

    def caption(self, row: int) -> str:
        return self._captions().describe(row)["caption"]

    def image(self, row: int) -> Image.Image:
        return self._captions()[row][0]


class ManifestSource:
    """Rows of a CSV/TSV/JSONL manifest; image files are read when the sample is decoded."""

    kind = "manifest"

    def __init__(self, name: str, config: SourceConfig, said_once: int = logging.WARNING) -> None:
        self.name = name
        self.manifest = read_manifest(
            config.path, config.image_column, config.caption_column, config.separator, config.quoting, said_once
        )
        if len(self.manifest) == 0:  # alone, the planner's error blamed the workers; in a mix, nothing was said
            dropped = self.manifest.bad_rows
            # A JSON Lines file has no header: an empty one has no rows
            empty = "it has no rows" if is_json_lines(config.path) else "it has a header and no rows"
            first = self.manifest.first_bad_row
            why = f"all {dropped} of its rows are malformed (the first, {first})" if dropped else empty
            raise ValueError(f"data source {name}: manifest {config.path} has no samples: {why}")
        self.layout = SourceLayout(len(self.manifest), config.weight)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing every path takes a while for big manifests: once
            # The rows, not where the file lies: a dataset moved to another mount still resumes exactly.
            digest = hashlib.sha256(self.manifest.image_paths.buffer).hexdigest()[:16]
            self._fingerprint = f"manifest:{len(self.manifest)}:{digest}"
        return self._fingerprint

    def items(self, plan: SlotPlan, index: int, skip: int) -> Iterator[int]:
        return map(int, plan.rows[index][skip:])

    def describe(self, row: int, kind: str = "") -> str:  # kind: the skip's, for a shard source's
        return self.manifest.image_path(row)

    def caption(self, row: int) -> bytes:
        return self.manifest.captions[row]

    def image(self, row: int) -> bytes:
        path = self.manifest.image_path(row)
        try:
            with open(path, "rb") as file:
                return file.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise SkipSample("missing_file", str(error)) from None
        except OSError as error:
            raise SkipSample("unreadable_file", str(error)) from None
        except ValueError as error:  # a path with a NUL byte in it (a manifest row torn by a crash mid-append)
            raise SkipSample("unreadable_file", f"{path!r}: {error}") from None


LONGER_SHARDS_NAMED = 5  # per data worker; see ShardSource._report_longer


class ShardSource:
    """Samples of WebDataset tar shards, {"__key__", "jpg": bytes, "txt": bytes, ...} each."""

    kind = "shards"

    def __init__(self, name: str, config: SourceConfig) -> None:
        require_webdataset()
        self.name = name
        self.urls = expand_shard_pattern(config.path)
        if not self.urls:
            raise ValueError(f"data source {name}: the shard pattern {config.path!r} names no shards")
        self.sizes = shard_sizes(self.urls, config.size_index, config.num_samples)
        if not self.sizes.any():  # as for an empty manifest: in a mix, the source was left out without a word
            raise ValueError(
                f"data source {name}: the {len(self.urls)} shard(s) of {config.path!r} hold no samples by their "
                "size index (or img2dataset's stats, or counting them); check the shards, or rewrite the index: "
                "clip-make-shards --index '<pattern>'"
            )
        self.layout = SourceLayout(int(self.sizes.sum()), config.weight, self.sizes)
        self.image_key = config.image_column
        # caption_column = "json" or "json:FIELD": a field of each sample's .json member (img2dataset's
        # metadata, whose "caption" field holds the caption), not the member's raw text.
        member, _, field = config.caption_column.partition(":")
        if member == "json":
            self.caption_key, self.caption_json_field = None, field or "caption"
        else:
            self.caption_key, self.caption_json_field = config.caption_column, None
        self._reported_longer: set[str] = set()  # shards found longer than the index, warned about once
        self._reported_repeats: set[str] = set()  # shards with a member name repeated in a sample, likewise
        self._fingerprint: str | None = None  # see fingerprint

    def fingerprint(self) -> str:
        # Shard file names (in order) and sizes, not their folders or URLs: moving the shards to another disk
        # or bucket keeps an exact resume. Made once: 40,000 shards' names take 0.16 s, and a resume asks 4 times.
        if self._fingerprint is None:
            names = "\n".join(shard_name(url) for url in self.urls)
            digest = hashlib.sha256(names.encode() + self.sizes.tobytes()).hexdigest()[:16]
            self._fingerprint = f"shards:{len(self.urls)}:{int(self.sizes.sum())}:{digest}"
        return self._fingerprint

    def items(self, plan: SlotPlan, index: int, skip: int) -> Iterator[dict | MissingSample]:
        for shard, start, stop in plan.segments[index]:
            if skip >= stop - start:
                skip -= stop - start
                continue
            at_end = stop == int(self.sizes[shard])
            yield from read_shard_range(
                self.urls[shard], start + skip, stop - start - skip, self._report_longer if at_end else None,
                self._report_repeated_member,
            )
            skip = 0

    def _report_longer(self, url: str) -> None:
        # Named a few times per worker, then once more as a summary: with num_samples below the real sizes
        # every shard is longer, and thousands of shards times the workers would bury the log.
        if url in self._reported_longer:
            return
        self._reported_longer.add(url)
        if len(self._reported_longer) <= LONGER_SHARDS_NAMED:
            log.warning(
                "data source %s: shard %s holds more samples than its size index (or num_samples) says; the extra "
                "ones are never read (rewrite the index: clip-make-shards --index '<pattern>')",
                self.name, url,
            )
        elif len(self._reported_longer) == LONGER_SHARDS_NAMED + 1:
            log.warning("data source %s: more shards hold more samples than planned; not naming them any more", self.name)

    def _report_repeated_member(self, url: str, what: str) -> None:
        # Once per shard in this worker: it repeats at every pass, and in every sample that has one.
        if url not in self._reported_repeats:
            self._reported_repeats.add(url)
            log.warning("data source %s: shard %s: %s; the first member of that name is used (not named again "
                        "for this shard)", self.name, url, what)

    def describe(self, sample: dict | MissingSample, kind: str = "") -> str:
        """The shard of a missing sample or of one a shard's fault `kind` skipped (named once, with the shard's
        other losses, not as another shard "url:key"); url:key of any other."""
        if isinstance(sample, MissingSample):
            return sample.url
        if kind in SHARD_FAULTS:
            return str(sample.get("__url__"))
        return f"{sample.get('__url__')}:{sample.get('__key__')}"

    def caption(self, sample: dict | MissingSample) -> bytes | str:
        if isinstance(sample, MissingSample):
            raise SkipSample(sample.kind, sample.detail)
        if self.caption_json_field is None:
            caption = find_member(sample, self.caption_key, CAPTION_EXTENSIONS)
            if caption is not None:
                return caption
        # The caption field of the .json member: asked for, or (img2dataset's layout) when there is no .txt
        caption = json_field(sample.get("json"), self.caption_json_field or "caption")
        if caption is None:
            _raise_if_cut_short(sample)
            members = sorted(k for k in sample if not k.startswith("__"))
            raise SkipSample("missing_caption", f"members: {members}" + (
                f", no text {self.caption_json_field!r} in its json" if self.caption_json_field else ""
            ))
        return caption

    def image(self, sample: dict) -> bytes:
        data = find_member(sample, self.image_key, IMAGE_EXTENSIONS)
        if data is None:
            _raise_if_cut_short(sample)
            raise SkipSample("missing_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        return data


def _raise_if_cut_short(sample: dict) -> None:
    """A shard's last sample before a read error, lacking a member: the error's skip, not a sample made without it."""
    if CUT_SHORT_KEY in sample:
        raise SkipSample("shard_read_error", f"the shard's read ends inside this sample: {sample[CUT_SHORT_KEY]}")


def json_field(member: object, field: str) -> str | None:
    """The text of `field` in a shard sample's .json member (bytes), or None when there is none; SkipSample
    bad_utf8 for a member that is not UTF-8 or a text with a lone surrogate escape, as for a .txt caption."""
    if not isinstance(member, bytes):
        return None
    try:
        value = json.loads(member.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SkipSample("bad_utf8", f"its .json: {error}") from None
    except (ValueError, RecursionError):  # not JSON, or nested too deep for json's recursive parser
        return None
    text = value.get(field) if isinstance(value, dict) else None
    if not isinstance(text, str):
        return None
    try:
        # A JSON escape of half a surrogate pair ("\\ud800") is no character: the caption would have been trained
        # with U+FFFD in its place, where a manifest's or a .txt's invalid text is a bad_utf8 skip
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SkipSample("bad_utf8", f"its .json: {error}") from None
    return text


Source = SyntheticSource | ManifestSource | ShardSource


def build_source(config: SourceConfig, index: int, image_size: int, said_once: int = logging.WARNING) -> Source:
    """said_once: the level of what every rank would log alike while reading the source (see TrainData)."""
    name = config.name or f"{index}:{config.kind}"
    if config.kind == "synthetic":
        return SyntheticSource(name, config, image_size)
    if config.kind == "manifest":
        return ManifestSource(name, config, said_once)
    if config.kind == "shards":
        return ShardSource(name, config)
    raise ValueError(f"unknown data source kind {config.kind!r}")
