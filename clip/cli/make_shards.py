"""Convert image-caption data into WebDataset shards that `[[data.sources]] kind = "shards"` reads.

    clip-make-shards captions.tsv out/ --prefix cc --samples-per-shard 1000
    clip-make-shards photos/ out/            # photos/**/x.jpg with its caption in x.txt
    clip-make-shards --index 'out/cc-{000000..000012}.tar'   # (re)write their sizes.json entries only

(`python scripts/make_shards.py ...` in a source checkout.)

Input: a manifest (.csv, .tsv or .jsonl; image paths relative to its folder) or a folder of images, each
with a caption file of the same name and the suffix .txt (in any case: .TXT too). Output: PREFIX-000000.tar,
PREFIX-000001.tar, ... with N samples each (the last one fewer), every sample stored as KEY.jpg|png|webp (the
original bytes; other formats are converted to PNG), KEY.txt (the caption, UTF-8) and KEY.json (key, caption,
source path, width, height), as img2dataset lays them out; and sizes.json, the sample count of each shard,
which the loader needs to plan exact epochs (the entries of other shards in it are kept). An output folder that
already holds shards of the prefix is refused: shards the new run does not replace would stay beside it and be
read; --overwrite deletes them before the first new sample is written (a run that writes none keeps them). Samples
that cannot be used (missing or broken images, empty or non-UTF-8 captions) are skipped and counted by kind, with
the same checks as the training loader.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import signal
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..config_io import as_toml, home_expanded, relative_path_note
from .common import refusal_as_one_of_several
from ..data.decoding import IMAGE_EXTENSIONS, SkipSample, decode_caption, open_image, pil_pixel_limit
from ..data.manifest import (
    MANIFEST_SUFFIXES,
    QUOTING_CHOICES,
    manifest_rows_with_problems,
    original_bytes,
    separator_character,
)
from ..data.shards import (
    SIZE_INDEX_NAME,
    WILDCARDS_ADVICE,
    count_tar_samples,
    ends_with_end_of_archive,
    expand_shard_pattern,
    folder_of_shards_advice,
    require_webdataset,
    unexpanded_wildcards,
)
from ..dependencies import MissingDependency
from ..image_modes import to_rgb

# Stored as they are; anything else -> PNG. MPO is how Pillow names a JPEG file that holds more pictures after
# the first (many phones' and stereo cameras' photos): a JPEG to every reader, which shows its first picture,
# and as PNG it took several times the bytes.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit, as the loader's default
# How its lines on stderr start, as the other commands' start with theirs: the installed command's name (they said
# "make_shards:", the script's name before it became clip-make-shards)
PROG = "clip-make-shards"


def folder_samples(root: Path) -> Iterator[tuple[str, str | None, dict, str] | SkipSample]:
    """(image path, caption or None when x.txt is missing, extra fields, "") for every image under root, and a
    SkipSample("missing_image") for every x.txt without an image of its name (counted, not silently left out).
    The caption's suffix is matched in any case (x.TXT); an image with two of them is SkipSample("two_captions")."""
    suffixes = {"." + extension for extension in IMAGE_EXTENSIONS}
    # Linked folders are followed: os.walk's default left out a folder linked in (a dataset's parts on other
    # disks) without a word. One reached twice (two links to it, or a link to a folder above) is read once.
    visited = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders.sort()
        images = {Path(name).stem for name in files if Path(name).suffix.lower() in suffixes}
        # The caption's suffix in any case (cameras and Windows tools write x.JPG + x.TXT): only x.txt was
        # looked for, and the image was counted as missing_caption
        captions: dict[str, list[str]] = {}
        for name in sorted(files):
            if Path(name).suffix.lower() == ".txt":
                captions.setdefault(Path(name).stem, []).append(name)
        for name in sorted(files):
            path = Path(folder, name)
            if path.suffix.lower() == ".txt" and path.stem not in images:
                yield SkipSample("missing_image", str(path))
            if path.suffix.lower() not in suffixes:
                continue
            named = captions.get(path.stem, [])
            if len(named) > 1:
                # x.txt and x.TXT side by side (a case-sensitive file system): they may differ, and no rule says
                # which one is the caption, so neither is guessed; the image is skipped and counted, naming both
                yield SkipSample("two_captions", f"{path}: {', '.join(named)}")
                continue
            try:
                caption = Path(folder, named[0]).read_bytes().decode("utf-8", "surrogateescape") if named else None
            except OSError as error:  # a dangling x.txt link, no permission: one sample's, not the whole run's
                yield SkipSample("unreadable_file", f"{Path(folder, named[0])}: {error.strerror or error}")
                continue
            yield str(path), caption, {}, ""


def manifest_samples(path: Path, args: argparse.Namespace) -> Iterator[tuple[str, str | None, dict, str] | SkipSample]:
    """(image path, caption, extra fields, its manifest line) per usable row, and a SkipSample("bad_manifest_row")
    naming the line and why for every other."""
    root = path.resolve().parent
    rows = manifest_rows_with_problems(
        str(path), args.image_column, args.caption_column, args.separator, args.quoting)
    for row in rows:
        if isinstance(row, str):
            yield SkipSample("bad_manifest_row", row)
        else:
            image, caption, line = row
            yield str(root / image), caption, {}, f"{path.name} line {line}"


def encode_sample(image_path: str, caption: str | None) -> tuple[str, bytes, str, tuple[int, int]]:
    """(extension, image bytes, caption, size) ready to store, or SkipSample."""
    if caption is None:
        raise SkipSample("missing_caption")
    text = decode_caption(original_bytes(caption), max_chars=None)  # stored whole; the loader cuts what it reads
    try:
        data = Path(image_path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SkipSample("missing_file") from None
    except OSError as error:  # no permission, an I/O error on a bad disk or network mount...
        raise SkipSample("unreadable_file", error.strerror or str(error)) from None  # the caller names the path
    except ValueError as error:  # a path with a NUL byte (a row torn by a crash mid-append): the loader's skip too
        raise SkipSample("unreadable_file", str(error)) from None
    with pil_pixel_limit(MAX_IMAGE_PIXELS):
        image = open_image(data, MAX_IMAGE_PIXELS, draft_size=None)  # a full decode: catches truncation
    extension = KEPT_FORMATS.get(image.format or "")
    if extension is None:  # e.g. BMP, GIF, TIFF: store as PNG, already upright and RGB
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
        extension, data = "png", buffer.getvalue()
    return extension, data, text, image.size


PARTIAL_SUFFIX = ".partial"


def shard_name_pattern(prefix: str, suffix: str = "") -> re.Pattern:
    """The names write_shards gives: PREFIX-000000.tar, ... (more digits past 999999 shards), + `suffix`."""
    return re.compile(re.escape(prefix) + r"-\d{6,}\.tar" + re.escape(suffix))


def existing_shards(output: Path, prefix: str, suffix: str = "") -> list[Path]:
    """The shards of this prefix already in `output` (not those of a longer prefix: 'cc-2-000000.tar' is not cc's);
    with `suffix`, the files of that name (PARTIAL_SUFFIX: shards an interrupted run did not finish)."""
    if not output.is_dir():
        return []
    pattern = shard_name_pattern(prefix, suffix)
    return sorted(path for path in output.iterdir() if pattern.fullmatch(path.name))


def update_index(output: Path, prefix: str, sizes: dict[str, int]) -> None:
    """Writes this prefix's shard sizes to sizes.json, replacing its old entries; other shards' entries stay,
    so that shards of several prefixes can share a folder. An unreadable sizes.json is replaced."""
    path = output / SIZE_INDEX_NAME
    pattern = shard_name_pattern(prefix)
    index = {name: count for name, count in read_index(path).items() if not pattern.fullmatch(name)} | sizes
    path.write_text(json.dumps(index, indent=1))


def read_index(path: Path) -> dict:
    """The entries of the sizes.json at `path`; none if it is missing or unreadable (it is then replaced)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def refuse_old_shards(output: Path, prefix: str, overwrite: bool) -> list[Path]:
    """The shards of this prefix already in `output`, which --overwrite replaces; without it, an error. Writing
    beside them would leave those the new run does not replace (51 samples, then 11: s-000002..7.tar from the
    first run), and the loader, which counts a shard sizes.json lacks, would read them as data."""
    old = existing_shards(output, prefix)
    if old and not overwrite:
        raise SystemExit(
            f"{PROG}: {output} already holds {len(old)} shards named {prefix}-NNNNNN.tar ({old[0].name} .. "
            f"{old[-1].name}): "
            "the new shards would be mixed with the old ones. Use another output folder or --prefix, or "
            "--overwrite to delete them first"
        )
    return old


def remove_old_shards(output: Path, prefix: str, old: list[Path]) -> None:
    """Deletes the shards --overwrite replaces: their index entries first, then exactly those files."""
    update_index(output, prefix, {})
    for path in old:
        path.unlink()
    print(f"deleted {len(old)} old shards {prefix}-NNNNNN.tar from {output}")


class SkipCounts(Counter):
    """Skipped samples counted by kind, with the first of each kind kept (which file, which manifest line, why):
    a count alone left the user to hunt for the rows it meant."""

    def __init__(self, *counts, **by_kind) -> None:  # Counter's own arguments: copy() passes them
        super().__init__(*counts, **by_kind)
        self.first: dict[str, str] = {}

    def add(self, kind: str, example: str) -> None:
        self[kind] += 1
        self.first.setdefault(kind, example)

    def line(self) -> str:
        """"skipped 3: bad_manifest_row 2 (the first, line 4: ...), missing_file 1 (the first, /data/x.jpg)"."""
        kinds = ", ".join(
            f"{kind} {count} (the first, {self.first[kind]})" if self.first.get(kind) else f"{kind} {count}"
            for kind, count in sorted(self.items()))
        return f"skipped {sum(self.values())}: {kinds}"


def write_shards(
    samples: Iterator, output: Path, prefix: str, per_shard: int, overwrite: bool = False
) -> tuple[dict[str, int], SkipCounts]:
    """Writes the shards and sizes.json; returns ({shard name: count}, skipped counts by kind). Shards of
    the same prefix already in `output` are an error, or with `overwrite` deleted as the first new sample is written."""
    webdataset = require_webdataset("writing WebDataset shards")
    old_shards = refuse_old_shards(output, prefix, overwrite)
    # The manifest's first row is read before the output is touched, so that a wrong column name, an empty or a
    # UTF-16 manifest is refused with nothing created; the old shards that --overwrite replaces are deleted only
    # as the first new sample is written: a run that writes none (every image path wrong, every image broken)
    # keeps them, and their index entries, as they were.
    samples = iter(samples)
    first = next(samples, None)
    samples = itertools.chain([] if first is None else [first], samples)
    output.mkdir(parents=True, exist_ok=True)
    pattern = str(output / f"{prefix.replace('%', '%%')}-%06d.tar")  # a '%' in the prefix is literal
    # Each shard is written as NAME.tar.partial and renamed when complete: an interrupted run leaves no torn
    # NAME.tar that a later --index or a training run would take for a shard.
    for leftover in existing_shards(output, prefix, PARTIAL_SUFFIX):
        leftover.unlink()  # an interrupted earlier run's
    skipped = SkipCounts()
    written = 0
    # maxcount splits exactly every `per_shard` samples; a fixed mtime makes the tars reproducible.
    writer = webdataset.ShardWriter(
        pattern + PARTIAL_SUFFIX, maxcount=per_shard, maxsize=float("inf"), verbose=0, encoder=False, mtime=0,
        post=lambda name: os.replace(name, name.removesuffix(PARTIAL_SUFFIX)),
    )
    try:
        for sample in samples:
            if isinstance(sample, SkipSample):
                skipped.add(sample.kind, sample.detail)
                continue
            image_path, caption, extra, manifest_line = sample
            try:
                extension, data, text, (width, height) = encode_sample(image_path, caption)
            except SkipSample as skip:
                # The manifest line as well: an image may have several rows (one per caption), and an empty
                # caption's row was named by its image alone, which the user found first in a good row
                where = f"{image_path} ({manifest_line})" if manifest_line else image_path
                skipped.add(skip.kind, f"{where}: {skip.detail}" if skip.detail else where)
                continue
            if old_shards:
                remove_old_shards(output, prefix, old_shards)
                old_shards = []
            key = f"{written:09d}"
            info = {"key": key, "caption": text, "path": image_path, "width": width, "height": height, **extra}
            writer.write({"__key__": key, extension: data, "txt": text.encode(), "json": json.dumps(info).encode()})
            written += 1
    except BaseException:  # Ctrl-C, or an error (a manifest line that cannot be read...)
        keep_finished_shards(writer, output, prefix, per_shard, written)
        raise
    if written == 0:
        # ShardWriter opened its first shard before any sample: removed unrenamed, as it would replace the old
        # PREFIX-000000.tar. The index stays as it was: it lists the old shards, if any, which are still there.
        writer.post = None
        writer.close()
        Path(pattern % 0 + PARTIAL_SUFFIX).unlink(missing_ok=True)
        return {}, skipped
    writer.close()  # renames the last shard into place
    shard_count = -(-written // per_shard)
    sizes = {Path(pattern % k).name: min(per_shard, written - k * per_shard) for k in range(shard_count)}
    update_index(output, prefix, sizes)
    return sizes, skipped


def keep_finished_shards(writer, output: Path, prefix: str, per_shard: int, written: int) -> None:
    """After an interruption or an error: the shard being written is closed without its rename and removed
    (ShardWriter's own close would have renamed it into place, torn); the shards finished before it stay, with
    their sizes.json entries, to be used as they are or replaced with --overwrite. Says so on stderr."""
    torn = writer.fname if writer.tarstream is not None and writer.count < per_shard else None
    if torn is not None:
        writer.post = None
    writer.close()
    if torn is not None:
        Path(torn).unlink(missing_ok=True)
    if written == 0:
        # Nothing of this run's was finished, and the shards of the prefix that are there (those --overwrite
        # was to replace, not deleted yet) keep their index entries as they are
        return
    finished = existing_shards(output, prefix)
    update_index(output, prefix, {path.name: per_shard for path in finished})
    if finished:
        print(f"{PROG}: stopped after {written} samples; {len(finished)} finished shards of {per_shard} kept in "
              f"{output} with their sizes.json entries{', the unfinished one removed' if torn else ''} (--overwrite "
              "starts over)", file=sys.stderr)
    else:
        print(f"{PROG}: stopped after {written} samples, before a shard was finished: none written",
              file=sys.stderr)


def write_index(pattern: str) -> dict[str, int]:
    """Counts the samples of existing shards (tar headers only) and writes their entries into the sizes.json
    beside them; the entries of other shards in it (another prefix's) are kept, as when shards are written. A
    shard that is missing, unreadable or cut short is named, and no index is written: counting what a cut-off
    shard still holds would make the damage look like a complete, smaller shard."""
    if Path(pattern).is_dir():
        # It read "1 of 1 shards cannot be indexed ... (remove or rewrite them ...): IsADirectoryError"
        raise SystemExit(f"{PROG}: --index: {pattern} is a folder, not a pattern of shards: "
                         f"{folder_of_shards_advice(Path(pattern))}")
    urls = expand_shard_pattern(pattern)
    if any(unexpanded_wildcards(url) for url in urls):
        # The shell left an unmatched wildcard as it is, or the quotes kept it from the shell. Judged by the
        # expanded paths: '[' is also a character of folder names ("laion[2b]/x-{000000..000009}.tar")
        raise SystemExit(f"{PROG}: --index: {pattern}: the pattern {WILDCARDS_ADVICE}")
    folders = {str(Path(url).parent) for url in urls}
    if len(folders) != 1:
        raise SystemExit(f"{PROG}: --index: the shards must be in one local folder, got {sorted(folders)}")
    sizes, bad = {}, []
    for url in urls:
        try:
            if Path(url).suffix == ".tar" and not tarfile.is_tarfile(url):  # its first header does not read
                bad.append(f"{url}: not a tar archive ({Path(url).stat().st_size} bytes)")
                continue
            if Path(url).suffix == ".tar" and not ends_with_end_of_archive(Path(url)):  # (compressed: gzip checks)
                bad.append(f"{url}: cut short (it lacks a tar's closing zero blocks)")
                continue
            sizes[Path(url).name] = count_tar_samples(url)
        except Exception as error:  # FileNotFoundError, tarfile.ReadError...
            bad.append(f"{url}: {type(error).__name__}: {error}")
    if bad:
        raise SystemExit(f"{PROG}: --index: {len(bad)} of {len(urls)} shards cannot be indexed, no sizes.json written "
                         "(remove or rewrite them, or leave them out of the pattern):\n  " + "\n  ".join(bad))
    path = Path(folders.pop()) / SIZE_INDEX_NAME
    path.write_text(json.dumps(read_index(path) | sizes, indent=1))
    return sizes


def prefix_refusal(prefix: str) -> str | None:
    """Why `prefix` cannot start shard file names, or None. The shards are OUTPUT/PREFIX-NNNNNN.tar and a run's
    data source names them with a brace range: an empty prefix wrote '-000000.tar' (read as an option by the
    commands given it), one with a '/' failed on a folder that is not there with a bare 'No such file', and
    braces or '::' in it made the printed path read as another range or as several folders."""
    if not prefix:
        return "give a name (shard files are PREFIX-000000.tar)"
    if "/" in prefix or prefix in (".", ".."):
        return "a name, not a path: the shards go into OUTPUT (give the folder there)"
    if any(part in prefix for part in ("{", "}", "::")):
        return "braces and '::' would be read as a shard range or a list of folders in a data source's path"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = ", ".join(MANIFEST_SUFFIXES)
    # ~ read as the home folder, as the other commands read it: a quoted '~/sh/x-{000000..000009}.tar' (as --index
    # asks) was said not to exist, and a quoted OUTPUT made a folder named '~'
    parser.add_argument("input", nargs="?", type=home_expanded, help=f"a manifest ({formats}) or a folder of images + .txt captions")
    parser.add_argument("output", nargs="?", type=home_expanded, help="folder for the shards and sizes.json")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default: shard)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--image-column", default="image", help="manifest column with image paths (default: image)")
    parser.add_argument("--caption-column", default="caption", help="manifest column with captions (default: caption)")
    parser.add_argument("--separator", default="", help="manifest field separator (default: from the suffix)")
    parser.add_argument("--quoting", choices=QUOTING_CHOICES, default="auto",
                        help="manifest quotes: auto = CSV rules for .csv, none for .tsv; csv for a TSV a CSV writer quoted")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the shards of this prefix already in OUTPUT (PREFIX-NNNNNN.tar): they and their sizes.json "
             "entries are deleted before the first new sample is written",
    )
    parser.add_argument(
        "--index", metavar="PATTERN", type=home_expanded,
        help="only write the sizes.json entries of existing shards 'dir/x-{000000..000009}.tar' (others' are kept)",
    )
    args = parser.parse_args(argv)
    if args.index is None and (args.input is None or args.output is None):
        parser.error("give INPUT and OUTPUT, or --index PATTERN")
    if args.index is not None and args.input is not None:
        # `--index out/*.tar` or an unquoted range: the shell gave the first shard to --index and the next ones
        # to INPUT and OUTPUT, and only the first was indexed
        parser.error(f"--index takes one pattern, not also {args.input!r}: quote it, as a range: "
                     "--index 'out/x-{000000..000012}.tar'")
    try:
        args.separator = separator_character(args.separator)
    except ValueError as error:
        parser.error(f"--separator: {error}")
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be positive")
    prefix_problem = prefix_refusal(args.prefix)
    if prefix_problem is not None:
        parser.error(f"--prefix {args.prefix!r}: {prefix_problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refusal = refusal_as_one_of_several(PROG, "write the same shards")
    if refusal is not None:
        raise SystemExit(refusal)
    if args.index is not None:
        sizes = write_index(args.index)
        print(f"indexed {len(sizes)} shards, {sum(sizes.values())} samples")
        return 0
    source = Path(args.input)
    if source.is_dir():
        samples = folder_samples(source)
    elif source.is_file():
        samples = manifest_samples(source, args)
    elif not source.exists() and not source.is_symlink():
        # A mistyped path was "neither a manifest file nor a folder", which did not say that nothing is there
        raise SystemExit(f"{PROG}: {source} does not exist{relative_path_note(str(source))}")
    else:
        raise SystemExit(f"{PROG}: {source} is neither a manifest file nor a folder")
    try:
        sizes, skipped = write_shards(samples, Path(args.output), args.prefix, args.samples_per_shard, args.overwrite)
    except (
        ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
    ) as error:
        # The input's (wrong columns, a UTF-16 manifest, an unreadable path, an output that is a file): one line,
        # not a traceback
        raise SystemExit(f"{PROG}: {error}") from None
    skipped_line = skipped.line()
    if not sizes:
        # Status 0 and "wrote 0 samples" read as done: every image broken, or the wrong folder, went unnoticed
        # until a training run found no data
        hint = ""
        if source.is_file() and skipped and skipped.most_common(1)[0][0] == "missing_file":
            # Paths written relative to another folder (where the manifest was made, or the command's) name no
            # file: the training loader gives this hint for such a source too. (An image folder's missing files
            # are links to files no longer there: no paths of a manifest.)
            hint = f"; a manifest's image paths are read relative to its own folder, {source.resolve().parent}, or are absolute"
        raise SystemExit(f"{PROG}: no sample of {source} could be written"
                         + (f" ({skipped_line}){hint}" if skipped else ": it holds none"))
    samples, shards = sum(sizes.values()), len(sizes)
    print(f"wrote {samples} sample{'s' * (samples != 1)} in {shards} shard{'s' * (shards != 1)} to {args.output}")
    pattern = Path(args.output).resolve() / f"{args.prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"
    print(f'for a [[data.sources]] table: kind = "shards", path = {as_toml(str(pattern))}')  # quotes escaped, as TOML
    if skipped:
        print(skipped_line)
    return 0


class Terminated(BaseException):
    """SIGTERM (a scheduler's, `docker stop`, `kill`) while the command runs: it stops as on Ctrl-C, keeping the
    finished shards with their sizes.json entries and removing the unfinished one; the default action ended it
    with neither an index nor a word, the unfinished shard left as PREFIX-NNNNNN.tar.partial."""


def _terminated(signum, frame):
    raise Terminated


def run(argv: list[str] | None = None) -> int:
    """`main` with the exit status of the library's other commands: 2 for bad input, said in one line; 130 after a
    Ctrl-C and 143 after a SIGTERM, the finished shards kept."""
    try:
        previous, installed = signal.signal(signal.SIGTERM, _terminated), True
    except ValueError:  # not the main thread: signals stay as they are
        previous, installed = None, False
    try:
        return main(argv)
    except Terminated:
        return 128 + signal.SIGTERM
    except MissingDependency as missing:
        # webdataset, which writing and indexing shards need (the `shards` extra): one line and status 1, as
        # clip-train ends on a missing optional package, where a wheel install without the extra had a traceback
        print(f"{PROG}: {missing}", file=sys.stderr)
        return 1
    except SystemExit as refused:
        if not isinstance(refused.code, str):  # argparse's own exits, and main's statuses
            raise
        print(refused.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # write_shards said what it kept ("stopped after N samples; ... finished shards kept"): a traceback
        # after that line, as the other commands do not print one, said nothing more
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(run())
