"""WebDataset tar shards: shard lists, per-shard sample counts, opening URLs, and reading samples.

Shards are read with tarfile's streaming reader and webdataset's `group_by_keys` (the standard package's
parsing of KEY.ext members into samples), not with its `WebDataset` pipeline: exact resume and exactly-once
epochs need every worker to read a planned range of samples `[start, stop)` of a shard (see `sampling.py`),
and to skip to `start` without reading member data; members are selected as webdataset's `tar_file_iterator`
selects them, and one too large to be a sample's is skipped unread (`_members`). Local files are opened
directly, `pipe:` commands by pipe_command.py, file:// URLs with webdataset's `gopen`, remote URLs (s3://, gs://,
http(s)://, ...) with fsspec, or http(s) with the curl command (as a pipe: command) where fsspec lacks aiohttp.

webdataset is an optional dependency (the `shards` extra); it is imported only when shards are used.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import posixpath
import re
import shlex
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import numpy as np

from ..config_io import relative_path_note
from ..dependencies import MissingDependency
from .config import SourceConfig
from .pipe_command import PipeCommand, PipeCommandFailed

log = logging.getLogger(__name__)

SIZE_INDEX_NAME = "sizes.json"
_TAR_NAME = re.compile(r"[^\s'\"]+\.(?:tar\.gz|tgz|tar)\b")  # the longest suffix first


def require_webdataset(needed_for: str = "reading WebDataset shards") -> Any:
    """The webdataset module, or a MissingDependency naming what needed it (reading for training, writing for
    clip-make-shards) and how to install it."""
    try:
        import webdataset
    except ImportError as error:
        raise MissingDependency(
            f"{needed_for} needs the `webdataset` package: pip install webdataset "
            "(or install this package with the `shards` extra: pip install 'clip-pretrain[shards]')"
        ) from error
    return webdataset


def _fsspec_protocols() -> set[str]:
    try:
        import fsspec
    except ImportError:
        return set()  # no fsspec: no chained URLs either
    return set(fsspec.available_protocols())


def _split_on_joins(text: str) -> list[str]:
    """`text` split at each '::' (patterns joined, or fsspec's chained protocols), but not at one inside brackets:
    an IPv6 address's ('http://[::1]:8000/x.tar' was cut into 'http://[' and '1]:8000/x.tar')."""
    return re.split(r"::(?![^\[]*\])", text)


def _pattern_parts(pattern: str) -> list[str]:
    """Splits patterns joined with '::', keeping fsspec's chained URLs ('simplecache::s3://b/x.tar') whole:
    a part that is only the name of an fsspec protocol belongs to the part after it."""
    parts, prefix = [], ""
    protocols = _fsspec_protocols() if "::" in pattern else set()
    for part in (piece.strip() for piece in _split_on_joins(pattern)):
        if part in protocols:
            prefix += part + "::"
        elif part:
            parts.append(prefix + part)
            prefix = ""
    if prefix:
        raise ValueError(f"shard pattern {pattern!r} ends with the fsspec protocol {prefix!r} and no URL")
    return parts


def expand_shard_pattern(pattern: str) -> list[str]:
    """'data/{00000..00003}.tar' -> the four paths; several patterns can be joined with '::' (fsspec's
    chained URLs, 'simplecache::s3://bucket/{0..9}.tar', stay one pattern)."""
    require_webdataset()
    import braceexpand  # a dependency of webdataset

    return [url for part in _pattern_parts(pattern) for url in braceexpand.braceexpand(part)]


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme == "" or len(scheme) == 1  # a Windows drive letter is not a scheme


def require_shard_readers(sources: Iterable[SourceConfig]) -> None:
    """Refuses, before a run starts, shards this environment has no package to read (MissingDependency):
    webdataset for any, and for a remote URL, what `open_url` would read it with (`_remote_reader`). Otherwise
    fsspec's ImportError ("Install s3fs to access S3") came from the first shard opened, with a traceback through
    the data's set-up."""
    for index, source in enumerate(sources):
        if source.kind != "shards":
            continue
        require_webdataset()
        for url in _pattern_parts(source.path):
            if not _is_remote(url):
                continue
            reader = _remote_reader(url)
            if isinstance(reader, ImportError):
                raise MissingDependency(f"data.sources[{index}].path {source.path!r}: {reader}") from reader


# The schemes read with the curl command where fsspec lacks their package (aiohttp)
_CURL_SCHEMES = ("http", "https")


def _is_remote(url: str) -> bool:
    return not (url.startswith("pipe:") or _is_local(url) or urlparse(url).scheme == "file")


def read_through_a_network_or_command(url: str) -> bool:
    """Whether reading the shard can hang for good (a stalled download, a pipe: command that never ends)."""
    return url.startswith("pipe:") or _is_remote(url)


def _remote_reader(url: str) -> str | ImportError:
    """How `open_url` reads a remote URL: "fsspec" where fsspec has the package of each protocol in its chain
    ("simplecache::s3://bucket/x.tar"; s3fs for s3://, gcsfs for gs://, aiohttp for http(s)://), else "curl"
    for http(s) through the curl command where it exists, else the ImportError that says what
    to install. A protocol fsspec does not know is left to fsspec, whose error when it opens it is bad input."""
    try:
        import fsspec
    except ImportError as error:  # torch requires fsspec, so this is rare
        missing = error
    else:
        missing = None
        for protocol in (piece.split("://", 1)[0] for piece in _split_on_joins(url)):
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as error:
                missing = error
                break
            except ValueError:  # unknown to fsspec
                continue
    if missing is None:
        return "fsspec"
    if urlparse(url).scheme in _CURL_SCHEMES and len(_split_on_joins(url)) == 1 and shutil.which("curl"):
        return "curl"
    scheme = url.split("://", 1)[0]
    return ImportError(f"its {scheme}:// URLs are read through fsspec, which needs a package that is not installed "
                       f"here: {missing}" + (" (or the curl command)" if scheme in _CURL_SCHEMES else ""))


# --fail: an HTTP error status is a failure, not a page of HTML read as the shard; --globoff: a URL's [] and {} are
# its own characters (curl read s[0-1].tar as s0.tar then s1.tar); a few retries of what is
# transient (timeouts, HTTP 408, 429 and 5xx), seconds apart; a host that does not answer given 30 s
CURL_OPTIONS = "--fail --silent --show-error --location --globoff --connect-timeout 30 --retry 3 --retry-delay 2"
# What curl's exit statuses say, with a shard's read error (its own line on the standard error says more)
CURL_HTTP_ERROR = 22  # --fail's status for any HTTP error status
CURL_STATUSES = {
    6: "the host name did not resolve", 7: "no connection to the server", 18: "the transfer ended early",
    22: "the server answered with an HTTP error status, 404 for a missing shard", 28: "the transfer timed out",
    35: "the TLS handshake failed", 56: "receiving failed (the connection was reset?)",
}


def open_url(url: str) -> IO[bytes]:
    """A binary stream for a local path, file://, pipe:command, or a remote URL (`_remote_reader`)."""
    if url.startswith("pipe:"):
        return PipeCommand(url[5:])
    if _is_local(url):
        return open(url, "rb")
    if urlparse(url).scheme == "file":
        return require_webdataset().gopen(url, "rb")
    reader = _remote_reader(url)
    if reader == "curl":
        # A pipe: command of the library's own: its process group ends with its reader, and a failure after the
        # last byte is its exit status. webdataset's gopen left a stalled curl running past the data worker that
        # timed out on it (ignoring SIGTERM, as the worker did), dropped bytes already received when curl
        # failed, and retried a failing server for a minute per shard.
        return PipeCommand(f"curl {CURL_OPTIONS} {shlex.quote(url)}", reading=url, status_meanings=CURL_STATUSES)
    if isinstance(reader, ImportError):
        raise MissingDependency(str(reader)) from reader
    import fsspec

    return fsspec.open(url, "rb").open()


def shard_name(url: str) -> str:
    """The key a size index uses for a shard: the file name of the tar it reads (also inside a pipe: command)."""
    if url.startswith("pipe:"):
        match = _TAR_NAME.search(url[5:])
        return posixpath.basename(match.group(0)) if match else url
    return posixpath.basename(urlparse(url).path if not _is_local(url) else url.replace("\\", "/"))


def _shard_folder(url: str) -> str | None:
    if url.startswith("pipe:"):
        return None
    return posixpath.dirname(url.replace("\\", "/") if _is_local(url) else url)


class _UnreadableJSON(Exception):
    """A remote JSON file that may be there but cannot be read, or is not JSON: the message says why. `refused`:
    the store refused to give it (a PermissionError)."""

    def __init__(self, why: str, refused: bool = False) -> None:
        super().__init__(why)
        self.refused = refused


def _fetch_json(url: str) -> Any | None:
    """A remote JSON file's content; None where there is no such file; `_UnreadableJSON` where one may be there
    but cannot be read or is not JSON. curl's HTTP errors count as no file (its status, 22, is every HTTP
    error's: a 404 among them). Anything an object store's client raises is a reason (botocore's
    EndpointConnectionError, no OSError, ended the start in a traceback), for the caller to say: a sizes.json
    there but not JSON was taken for a missing one ("write a sizes.json beside the shards")."""
    try:
        with open_url(url) as stream:
            data = stream.read()
    except MissingDependency:
        raise
    except FileNotFoundError:
        return None
    except PipeCommandFailed as error:
        if error.status == CURL_HTTP_ERROR:
            return None
        raise _UnreadableJSON(str(error)) from error
    except Exception as error:  # each store's client has errors of its own
        raise _UnreadableJSON(f"{type(error).__name__}: {error}", refused=isinstance(error, PermissionError)) \
            from error
    try:
        return json.loads(data)
    except ValueError as error:  # also bytes that are not UTF-8 text
        raise _UnreadableJSON(f"not JSON: {error}") from error


def _read_json(url: str) -> Any | None:
    """A JSON file's content, None where it cannot be had (for files that are optional: img2dataset's stats)."""
    try:
        return _fetch_json(url)
    except _UnreadableJSON:
        return None


class _ForbiddenIndex(ValueError):
    """A remote sizes.json that the store refused to give: S3 answers 403, not 404, for a missing object where
    the credentials may not list the bucket, so it counts as no index (img2dataset's stats files may give the
    counts) and is named if no count is found."""


def _read_size_index(url: str) -> dict | None:
    """A sizes.json's {shard: count}; None when there is none. One that exists but is no such JSON object is an
    error: ignored, it left every shard to be counted by reading it, or the source unusable, without a word."""
    if not _is_local(url):
        try:
            index = _fetch_json(url)
        except _UnreadableJSON as error:
            raise (_ForbiddenIndex if error.refused else ValueError)(
                f"the shard size index {url} cannot be read ({error})") from None
        if index is None:
            return None  # no remote index: as if there were none
    elif not Path(url).is_file():
        return None
    else:
        try:
            text = Path(url).read_bytes()
        except OSError as error:  # a permission, the disk: not a malformed index
            raise ValueError(f"the shard size index {url} cannot be read ({error.strerror or error})") from error
        try:
            index = json.loads(text)
        except ValueError:
            index = None
    if not isinstance(index, dict):
        raise ValueError(f"the shard size index {url} is not a JSON object of shard file names and sample counts "
                         "(rewrite it: clip-make-shards --index '<pattern>')")
    return index


def _img2dataset_count(url: str) -> int | None:
    """img2dataset writes 00012.tar beside 00012_stats.json with the number written in "successes"."""
    folder = _shard_folder(url)
    if folder is None:
        return None
    stem = shard_name(url).split(".")[0]
    stats = _read_json(posixpath.join(folder, f"{stem}_stats.json") if folder else f"{stem}_stats.json")
    count = stats.get("successes") if isinstance(stats, dict) else None
    return count if _is_sample_count(count) else None


class _SizeIndexes:
    """Size index entries for shard URLs: from one given index file, or from the sizes.json in each
    shard's own folder (read once per folder), so that shards of the same name in different folders
    (`a/{0..9}.tar::b/{0..9}.tar`) get their own counts. An entry is keyed by the shard's file name, or by
    its URL as written (which a single index for several folders needs)."""

    def __init__(self, size_index: str) -> None:
        self.size_index = size_index
        self.by_folder: dict[str, Any] = {}
        self.given: Any = None  # the size_index file's contents, when one is given
        self.forbidden: dict[str, str] = {}  # sizes.json files beside shards that the store refused: why
        if size_index:
            try:
                self.given = _fetch_json(size_index)
            except _UnreadableJSON as error:
                raise FileNotFoundError(f"cannot read the shard size index {size_index} ({error})") from None
            if self.given is None:
                raise FileNotFoundError(f"cannot read the shard size index {size_index}")

    def location(self, url: str) -> str | None:
        if self.size_index:
            return self.size_index
        folder = _shard_folder(url)
        return None if folder is None else posixpath.join(folder, SIZE_INDEX_NAME)  # join("", name) is name

    def count(self, url: str) -> int | None:
        location = self.location(url)
        if location is None:
            return None
        if self.size_index:
            index = self.given
        else:
            if location not in self.by_folder:
                try:
                    self.by_folder[location] = _read_size_index(location)
                except _ForbiddenIndex as refused:
                    self.by_folder[location], self.forbidden[location] = None, str(refused)
            index = self.by_folder[location]
        if not isinstance(index, dict):
            return None
        count = index.get(url, index.get(shard_name(url)))
        if count is not None and not _is_sample_count(count):
            # true (an int in Python) or a negative number would pass for a count and skew the epoch's layout
            raise ValueError(f"the shard size index {location} gives {shard_name(url)} the count {count!r}, not a "
                             "number of samples (rewrite it: clip-make-shards --index '<pattern>')")
        return count


WILDCARDS_ADVICE = "takes {000000..000099} ranges, not wildcards"


def unexpanded_wildcards(path: str) -> bool:
    """Whether a local path holds a shell wildcard, which a shard pattern does not expand, where it names nothing:
    a glob left unexpanded ('out/*.tar'), not a '[' in the name of a folder that is there ('laion[2b]/x-0.tar')."""
    there = Path(path)
    while not there.exists() and there != there.parent:
        there = there.parent
    return bool(set(str(Path(path).relative_to(there))) & set("*?["))


def folder_of_shards_advice(folder: Path) -> str:
    """What to write instead of a folder of shards: its tars as a {first..last} range where their names allow."""
    names = sorted((path.name for path in folder.iterdir() if _TAR_NAME.fullmatch(path.name)), key=_by_number)
    if not names:
        return "it holds no .tar files; give the shards' own paths, as a range such as 'DIR/{00000..00099}.tar'"
    pattern = _as_range(names)
    if pattern:
        return (f"name its shards, e.g. '{folder}/{pattern}' for the {len(names)} tar files from {names[0]} to "
                f"{names[-1]} in it")
    return (f"name its shards ({len(names)} tar file(s) in it, {names[0]} to {names[-1]}) as a {{first..last}} range "
            "or joined with '::'")


def _by_number(name: str) -> list:
    """A sort key that orders the numbers in names by value: 1.tar, 2.tar ... 10.tar, not 1, 10, 2 as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _as_range(names: list[str]) -> str | None:
    """'s-{000..002}.tar' for names (in _by_number's order) that are exactly that range's, else None: unpadded,
    '{1..9}' left 10.tar out, and across a gap a range would name shards that are not there."""
    first, last = (re.fullmatch(r"(.*?)(\d+)(\.tar\.gz|\.tgz|\.tar)", name) for name in (names[0], names[-1]))
    if len(names) < 2 or not (first and last) or first.group(1, 3) != last.group(1, 3):
        return None
    prefix, start, suffix = first.groups()
    end = last.group(2)
    # braceexpand pads the numbers to the endpoints' width when these are written alike ({08..10}), else not
    width = len(start) if len(start) == len(end) else 0
    if [f"{prefix}{number:0{width}d}{suffix}" for number in range(int(start), int(end) + 1)] != names:
        return None
    return f"{prefix}{{{start}..{end}}}{suffix}"


def _is_sample_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _differently_padded(missing: Path) -> Path | None:
    """A file beside `missing` whose name is its name with the numbers zero-padded otherwise (cc-000001.tar for
    cc-1.tar): what a brace range written without padding ({0..99}) names instead of the shards'
    {000000..000099}. None where there is none, or the folder cannot be listed."""
    def unpadded(name: str) -> str:
        return re.sub(r"\d+", lambda number: str(int(number.group())), name)

    try:
        return next((entry for entry in missing.parent.iterdir() if unpadded(entry.name) == unpadded(missing.name)
                     and entry.name != missing.name), None)
    except OSError:
        return None


def shard_sizes(urls: list[str], size_index: str = "", num_samples: int | None = None) -> np.ndarray:
    """Samples per shard, from (in this order) `num_samples` spread evenly, the `size_index` file, the
    sizes.json beside each shard, img2dataset's per-shard *_stats.json, or counting a local tar."""
    indexes = _SizeIndexes(size_index)
    if num_samples is not None:
        try:
            indexed = [indexes.count(url) for url in urls]
        except ValueError:  # a malformed sizes.json beside them: num_samples is what counts
            indexed = [None]
        if all(count is not None for count in indexed) and sum(indexed) != num_samples:
            # Typically a num_samples left over from another source kind: the shards would be read as if
            # they held other counts, and every planned sample they lack is skipped as shard_too_short.
            log.warning(
                "num_samples=%d is used for these shards, but their size index %s says %d samples",
                num_samples, indexes.location(urls[0]), sum(indexed),
            )
        return np.array([num_samples // len(urls) + (i < num_samples % len(urls)) for i in range(len(urls))], np.int64)
    sizes = []
    for url in urls:
        count = indexes.count(url)
        if count is None:
            count = _img2dataset_count(url)
        if count is None and _is_local(url):
            if Path(url).is_dir():
                # It read "shard DIR/ does not exist", of a folder that plainly does
                raise ValueError(f"shard path {url} is a folder, not a shard: {folder_of_shards_advice(Path(url))}")
            if not Path(url).is_file():
                wildcards = f" (the path {WILDCARDS_ADVICE})" if unexpanded_wildcards(url) else ""
                padded = _differently_padded(Path(url))
                padding = f" ({padded.name} does: write the pattern's range padded as its names are, such as " \
                    f"{{000000..000099}})" if padded is not None else ""
                raise FileNotFoundError(f"shard {url} does not exist{wildcards or padding or relative_path_note(url)}: "
                                        "check the source's path pattern")
            log.info("no size index entry for %s: counting its samples", url)
            try:
                count = count_tar_samples(url)
            except Exception as error:  # tarfile.ReadError (an empty or cut-off file), gzip's errors...
                # Named, and a config error (reported in one line): the bare ReadError("empty file") named no
                # shard. Not counted as far as it reads: the damage would pass for a complete, smaller shard.
                if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile):
                    # A permission or the disk, not the shard's bytes: no advice to rewrite or remove it
                    raise ValueError(f"shard {url} cannot be read to count its samples ({type(error).__name__}: "
                                     f"{error})") from error
                raise ValueError(
                    f"shard {url} cannot be counted, it is not a readable tar file ({type(error).__name__}: "
                    f"{error}): rewrite or remove it, or leave it out of the source's path pattern"
                ) from error
            if url.endswith(".tar") and not ends_with_end_of_archive(Path(url)):  # (compressed: gzip checks)
                # A copy cut at a member boundary reads as a complete tar of fewer samples: the damage would be
                # trained on as a whole, smaller shard, with no sample counted as lost
                raise ValueError(f"shard {url} is cut short (it lacks a tar's closing zero blocks, which every tar "
                                 "writer appends): copy it again, or leave it out of the source's path pattern")
        if count is None:
            where = (
                "point size_index at a sizes.json (pipe: shards have no folder to look in)" if url.startswith("pipe:")
                else "write a sizes.json beside the shards (clip-make-shards --index '<pattern>') "
                "or point size_index at one"
            )
            refused = indexes.forbidden.get(indexes.location(url) or "")
            raise ValueError(f"no sample count for shard {url}: {where}, or set num_samples for the source (spread "
                             "evenly over the shards: for shards of equal size)"
                             + (f"; {refused}, an object store's answer for a missing file too" if refused else ""))
        sizes.append(int(count))
    return np.array(sizes, dtype=np.int64)


class _SkipFirstSamples:
    """A `select_files` predicate for `_members`: False for the members of the first `count` samples,
    so their data is never read (members of one sample are consecutive and share the key before the first dot)."""

    def __init__(self, count: int) -> None:
        from webdataset.tariterators import base_plus_ext

        self.split_name = base_plus_ext  # "dir/key.ext.more" -> ("dir/key", "ext.more")
        self.count = count
        self.samples_seen = 0
        self.key: str | None = None

    def __call__(self, name: str) -> bool:
        key, _ = self.split_name(name)
        if key is None:
            return False
        if key != self.key:
            self.key = key
            self.samples_seen += 1
        return self.samples_seen > self.count


def _close_quietly(stream: IO[bytes]) -> None:
    """Close a stream its reader stopped before the end of (a pipe: command is ended at once)."""
    try:
        stream.abandon() if isinstance(stream, PipeCommand) else stream.close()
    except Exception:  # a curl command stopped early exits with SIGPIPE; nothing to report
        pass


def _close_at_the_end(stream: IO[bytes], errors: list[Exception]) -> None:
    """Close a shard's stream that its tar reader finished, putting first in `errors` a failure that shows only
    now: a pipe: or curl command's exit status. A command that failed after writing whole samples left a tar that
    reads as complete, and the samples it lacked were counted as shard_too_short (a wrong size index); one that
    failed before writing anything was said as the tar's "empty file"."""
    try:
        stream.close()
    except Exception as error:
        errors.insert(0, error)  # before the tar's own error, which it explains ("empty file" for an HTTP 404)
    except BaseException:  # a stop's exception while close() waited for the command: ended at once
        _close_quietly(stream)
        raise


class _EndsAtItsEnd:
    """A shard's stream that raises tarfile.ReadError once it is read on past its end: tarfile skips a member it
    does not select by reading its declared size in blocks, and a header declaring 2**62 bytes (a damaged or
    hostile shard of a few KB) had it read empty blocks for ever -- counting the shard, or a worker resuming
    inside it, hung until the worker timeout. A reader reads the end at most a few times."""

    EMPTY_READS_ALLOWED = 16

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.empty_reads = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data or size == 0:
            self.empty_reads = 0
            return data
        self.empty_reads += 1
        if self.empty_reads > self.EMPTY_READS_ALLOWED:
            raise tarfile.ReadError("the tar ends inside a member: its header declares more bytes than follow")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __repr__(self) -> str:  # webdataset names the stream in its errors: the file's name, not this wrapper's
        return repr(self.stream)


# The most bytes a sample's members may take together; a member that would take more is skipped unread: a shard of
# a few KB (gzip-compressed, or a sparse tar member) that declared a 1 GB caption made the data worker hold it
# whole, twice. An image of a CLIP dataset is a few MB.
MAX_SAMPLE_BYTES = 256 << 20
# Members that are a shard's metadata, not a sample's (webdataset's `__key__`-style names), as its reader skips them
_METADATA_MEMBER = re.compile(r"__[^/]*__($|/)")


def _members(url: str, stream: IO[bytes], select_files: Any, errors: list[Exception]) -> Iterator[dict]:
    """The shard's selected regular members as {"fname", "data", "__url__"}, as webdataset's tar_file_iterator
    reads them, except that a member that would take its sample past MAX_SAMPLE_BYTES is skipped unread, with a
    warning (its sample then lacks it, and is counted as such). A read error ends them and is kept in `errors`,
    so that group_by_keys still hands out the sample read before it."""
    from webdataset.tariterators import base_plus_ext

    key, taken = None, 0  # the sample being read, and the bytes of its members read so far
    try:
        with tarfile.open(fileobj=_EndsAtItsEnd(stream), mode="r|*") as archive:  # leaves `stream` open
            for info in archive:
                if not info.isreg() or _METADATA_MEMBER.match(info.name) or not select_files(info.name):
                    continue
                member_key = base_plus_ext(info.name)[0]
                if member_key != key:
                    key, taken = member_key, 0
                if taken + info.size > MAX_SAMPLE_BYTES:
                    log.warning("shard %s: member %s declares %d bytes, more than its sample's members may take "
                                "together (%d, %d taken): skipped unread", url, info.name, info.size,
                                MAX_SAMPLE_BYTES, taken)
                    continue
                taken += info.size
                yield {"fname": info.name, "data": archive.extractfile(info).read(), "__url__": url}
                archive.members = []  # a stream's members are not kept: 100k of them are 100 MB
    except Exception as error:  # tarfile.ReadError on a truncated tar, a failed pipe, a network error...
        errors.append(error)


def iterate_tar_samples(
    url: str, skip: int = 0, on_repeated_member: Callable[[str, str], None] | None = None
) -> Iterator[dict]:
    """Samples {"__key__": ..., ext: bytes, ...} of one shard, after skipping `skip` samples unread. A read
    error is raised after the samples read before it (the last of which may lack members). A member name that
    repeats within a sample keeps its first member; `on_repeated_member(url, what)` is told (default: a
    warning)."""
    require_webdataset()
    from webdataset.tariterators import group_by_keys

    errors: list[Exception] = []
    stream = open_url(url)
    handler = functools.partial(_keep_first_member, url, on_repeated_member or _warn_repeated_member)
    last = None  # held back until the next one is read: a read error after it may have cut it short
    try:
        for sample in group_by_keys(_members(url, stream, _SkipFirstSamples(skip), errors), handler=handler):
            if last is not None:
                yield last
            last = sample
    except BaseException:  # also GeneratorExit: the reader stopped before the shard's end
        _close_quietly(stream)
        raise
    _close_at_the_end(stream, errors)
    if last is not None:
        if errors:
            # Its members after the cut are lost: a missing one is the read error's, not a sample without a
            # caption or image (`CUT_SHORT_KEY`)
            last[CUT_SHORT_KEY] = f"{type(errors[0]).__name__}: {errors[0]}"
        yield last
    if errors:
        raise errors[0]


# Set in the last sample read before a shard's read error, to the error: a member it lacks may be one the error cut
CUT_SHORT_KEY = "__cut_short__"


def _keep_first_member(url: str, report: Callable[[str, str], None], error: Exception) -> bool:
    """group_by_keys' error handler: a member name that repeats within a sample ("x.jpg" twice, or "x.jpg" and
    "x.JPG") is left out and the first kept; raised, it ended the shard there, every later sample counted as
    unreadable. Anything else is raised as before."""
    if isinstance(error, ValueError) and error.args and "duplicate file name" in str(error.args[0]):
        report(url, str(error.args[0]))
        return True
    raise error


def _warn_repeated_member(url: str, what: str) -> None:
    log.warning("shard %s: %s; the first member of that name is used", url, what)


@dataclass
class MissingSample:
    """Stands in for a planned sample a shard did not deliver, so positions in the plan stay exact."""

    kind: str  # "missing_shard", "shard_read_error" or "shard_too_short"
    url: str
    detail: str


def read_shard_range(
    url: str, start: int, count: int, on_longer: Callable[[str], None] | None = None,
    on_repeated_member: Callable[[str, str], None] | None = None,
) -> Iterator[dict | MissingSample]:
    """Exactly `count` items: samples start..start+count-1 of the shard, and a MissingSample for each one it
    could not deliver (the shard is missing, unreadable from some point on, or shorter than its index says).
    With `on_longer` (for a range that ends where the size index says the shard ends), one more sample is
    looked for, and `on_longer(url)` called if the shard has it: samples past the index are never planned."""
    delivered, kind = 0, "shard_too_short"
    detail = "fewer samples than the size index says (a wrong index, or a file cut short)"
    if count <= 0:
        return
    samples = iterate_tar_samples(url, skip=start, on_repeated_member=on_repeated_member)
    try:
        for sample in samples:
            delivered += 1
            if delivered == count:
                # Done with the shard before handing out its last sample: a consumer that stops right after
                # it never resumes this generator, which would leave the stream open and the check undone.
                try:
                    longer = on_longer is not None and next(samples, None) is not None
                except Exception:  # the shard ends in a read error (e.g. a cut-off last sample): not longer
                    longer = False
                samples.close()
                if longer:
                    on_longer(url)
                yield sample
                return
            yield sample
    except FileNotFoundError as error:
        kind, detail = "missing_shard", str(error)
    except Exception as error:  # tarfile.ReadError, a truncated member, a failed pipe, a network error...
        kind, detail = "shard_read_error", f"{type(error).__name__}: {error}"
    finally:
        samples.close()  # closes the stream now, also when we stop before the shard's end
    for _ in range(count - delivered):
        yield MissingSample(kind, url, detail)


def ends_with_end_of_archive(path: Path) -> bool:
    """Whether the file ends in a tar's end-of-archive marker (two 512-byte zero blocks, which every tar writer
    appends). Python's tarfile reads a file cut at a member boundary as a complete archive of fewer members."""
    size = path.stat().st_size
    if size < 1024:
        return False
    with path.open("rb") as file:
        file.seek(size - 1024)
        return not any(file.read(1024))


def count_tar_samples(url: str) -> int:
    """Samples in a shard, reading only the tar headers' names (member data is skipped)."""
    require_webdataset()
    counter = _SkipFirstSamples(count=2**62)  # selects nothing, counts the keys it sees
    errors: list[Exception] = []
    stream = open_url(url)
    try:
        for _ in _members(url, stream, counter, errors):
            pass
    except BaseException:
        _close_quietly(stream)
        raise
    _close_at_the_end(stream, errors)
    if errors:
        raise errors[0]
    return counter.samples_seen
