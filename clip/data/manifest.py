"""Image-caption manifests: CSV, TSV or JSON Lines files with one row per sample.

Image paths are relative to the manifest's folder (absolute paths are kept as they are). Paths and captions
are stored packed (see `packed.py`) so that a manifest of millions of rows costs two numpy arrays per column.

Bytes that are not valid UTF-8 are kept as they are (read with "surrogateescape" and written back to the
same bytes): a caption with broken encoding becomes a counted `bad_utf8` skip when the sample is used,
instead of a failure to read the whole manifest. Rows that cannot be used at all (no image path, a JSONL
line that is not a JSON object) are counted in `Manifest.bad_rows`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config_io import relative_path_note
from .packed import PackedStrings, PackedStringsBuilder

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
_SEPARATORS = {".csv": ",", ".tsv": "\t"}
_SEPARATOR_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "vertical bar"}


@dataclass
class Manifest:
    """The usable rows of a manifest: image paths (bytes, relative to `root`) and raw caption bytes."""

    path: str
    root: str  # the folder relative paths are resolved against
    image_paths: PackedStrings
    captions: PackedStrings
    bad_rows: int  # rows dropped while reading (no image path, unparsable line)
    first_bad_row: str = ""  # why the first of them was dropped, naming its line

    def __len__(self) -> int:
        return len(self.image_paths)

    def image_path(self, row: int) -> str:
        relative = self.image_paths[row].decode("utf-8", "surrogateescape")
        return str(Path(self.root, relative))  # an absolute `relative` replaces root


def original_bytes(text: str) -> bytes:
    """Back to the file's original bytes; lone surrogates from JSON escapes (\\udXXX) stay invalid UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def separator_character(separator: str) -> str:
    """A manifest's field separator as given in a config or on a command line: "" (by the file's suffix) or one
    character. A shell passes '\\t' as a backslash and a t (open_clip's --csv-separator habit, where pandas reads
    it as a tab), and the csv reader stopped on it with a TypeError's traceback: it is a tab here too. ValueError
    for anything else longer than one character."""
    if separator == "\\t":
        return "\t"
    if len(separator) > 1:
        raise ValueError(f"a manifest's separator must be one character (\"\\t\" for a tab) or \"\" for the one its suffix "
                         f"implies, got {separator!r}")
    return separator


def _missing_columns_error(path: str, wanted: list[str], available: list[str]) -> ValueError:
    return ValueError(
        f"{path}: no column {', '.join(repr(w) for w in wanted if w not in available)}; the columns are "
        f"{available}. Set image_column / caption_column (in a [[data.sources]] or [[eval.retrieval]] table), or "
        f"--image-column / --caption-column (clip-retrieval, clip-make-shards)."
    )


def _other_separator_error(
    path: str, separator: str, image_column: str, caption_column: str, available: list[str]
) -> ValueError | None:
    """For a header that holds the wanted columns split at another separator (a spreadsheet's "CSV" with ";",
    as European locales write it): the separator to set. The columns advice it got instead named one column,
    'image;caption', and asked for other column names."""
    if len(available) != 1:
        return None
    for other in _SEPARATOR_NAMES:
        if other != separator and {image_column, caption_column} <= set(available[0].split(other)):
            shown = "\\t" if other == "\t" else other
            return ValueError(
                f"{path}: its header {available[0]!r} is separated by {_SEPARATOR_NAMES[other]}s, not "
                f"{_SEPARATOR_NAMES.get(separator, repr(separator))}s: set separator = \"{shown}\" (in its "
                f"[[data.sources]] table; [[eval.retrieval]] has no separator key and reads a manifest by its "
                f"suffix: .csv commas, .tsv tabs), or --separator '{shown}' (clip-make-shards)"
            )
    return None


QUOTING_CHOICES = ("auto", "none", "csv")

# Characters in one field. Python's csv default (131,072) refused a long web caption or metadata column, and
# the csv module's limit is the whole process's, so the reader raises it around each row it reads and puts it
# back. Bounded all the same: a CSV quote that never closes takes the rest of the file into one field (4 bytes
# a character) before the reader can tell.
FIELD_LIMIT = 1 << 24
# The csv reader ends a record at a bare "\r" as well as at a line break. In a file whose lines end in "\n"
# (or "\r\n"), a bare one inside a line is part of a field (a scraped caption's), so it is escaped for the
# reader by a character that decoded text never holds (a high surrogate: UTF-8 cannot encode one, and
# surrogateescape makes low ones only). Not the "\r"s that end a line, before its "\n": "\r\r\n" is how Python's
# csv.writer ends rows on Windows in a file opened without newline="" (and a header written by hand ends in
# "\r\n"); read as text, they put a "\r" at the end of each row's last field (an image path that then named no file).
_CR_ESCAPE = "\ud800"


def _bare_cr_escaped(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if "\r" not in line:
            yield line
            continue
        # Split off, not searched for: a lookahead past each "\r" for the line's end took quadratic time in a
        # run of them (20,000 in a field: 5 s; a 1 MB run: hours)
        end = len(line) - 1 if line.endswith("\n") else len(line)
        inside = line[:end].rstrip("\r")
        # A last line without a line break gets one: the reader refuses the end of the data in a record that
        # holds an escaped "\r" ("unexpected end of data", as for a quote left open)
        ending = line[len(inside):] if line.endswith("\n") else line[len(inside):] + "\n"
        yield inside.replace("\r", _CR_ESCAPE + "\r") + ending


def _next_row(reader: csv.DictReader) -> dict:
    default_limit = csv.field_size_limit(FIELD_LIMIT)
    try:
        return next(reader)
    finally:
        csv.field_size_limit(default_limit)


def _rows_end_with_cr_alone(path: str) -> bool:
    """Whether rows end in a bare "\r" (Excel for Mac's CSV): the first line does, or, after a header written apart
    (echo, a script), the rest of the file holds a "\r" and no "\n". Read as lines ending in "\n", such a file was
    one row. The rest is read up to its first "\n" only: judged on its first 64 Ki characters, a file whose first
    row was longer, with a "\r" in a caption, was split at that "\r"."""
    seen_cr = False
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
        if file.readline().endswith("\r"):
            return True
        while following := file.read(1 << 16):
            if "\n" in following:
                return False
            seen_cr = seen_cr or "\r" in following
    return seen_cr


def refuse_utf16_or_32(path: str) -> None:
    """A UTF-16 or UTF-32 file (what spreadsheet programs write as "Unicode text") is named as such: read as UTF-8, its
    header came out as '\udcff\udcfei\x00m...' and the error asked for other column names."""
    with open(path, "rb") as file:
        start = file.read(4)
    encoding = ("UTF-32" if start in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
                else "UTF-16" if start[:2] in (b"\xff\xfe", b"\xfe\xff") else None)
    if encoding is not None:
        raise ValueError(f"{path} is {encoding} encoded (it starts with a {encoding} byte-order mark); manifests are "
                         f"read as UTF-8: save it as UTF-8 (e.g. iconv -f {encoding} -t UTF-8)")


def _delimited_rows(
    path: str, separator: str, image_column: str, caption_column: str, quoting: str
) -> Iterator[tuple | str]:
    # "auto": tab-separated caption files (CC3M's and most web-scraped TSVs) hold '"' freely and unescaped,
    # and a stray one would swallow the following rows silently under CSV quoting rules; comma-separated ones
    # need those rules for commas in captions. "csv" reads a TSV that a CSV writer (pandas, Python's csv)
    # quoted; "none" reads fields exactly as written.
    if quoting not in QUOTING_CHOICES:
        raise ValueError(f"quoting must be one of {QUOTING_CHOICES}, got {quoting!r}")
    if quoting == "auto":
        quoting = "none" if separator == "\t" else "csv"
    csv_quoting = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    refuse_utf16_or_32(path)
    cr_rows = _rows_end_with_cr_alone(path)
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name.
    with open(path, newline="" if cr_rows else "\n", encoding="utf-8-sig", errors="surrogateescape") as file:
        lines = file if cr_rows else _bare_cr_escaped(file)
        # strict: a quoted field that is never closed is an error. Otherwise the reader takes everything up to
        # the end of the file as that one field, and every row after a stray quote is gone without a word.
        # Other malformed quoting (`"5" screen" TV`) spoils one row only: it is counted as a bad row, and the
        # reader goes on with the next line.
        reader = csv.DictReader(
            lines, delimiter=separator, quoting=csv_quoting, strict=True, escapechar=_CR_ESCAPE
        )
        available = list(reader.fieldnames or [])
        if not available:  # an empty file (a failed export) was "no column 'image', 'caption'; the columns are []"
            # No line read at all: 0 bytes, or a byte-order mark alone (a spreadsheet's export of an empty sheet)
            what = ("has a blank first line" if reader.reader.line_num > 0
                    else "is empty (0 bytes)" if Path(path).stat().st_size == 0 else "is empty (a byte-order mark alone)")
            raise ValueError(f"{path} {what}: a manifest's first line names its columns ({image_column!r} and "
                             f"{caption_column!r}), and each line after it is one sample")
        if image_column not in available or caption_column not in available:
            raise _other_separator_error(path, separator, image_column, caption_column, available) or \
                _missing_columns_error(path, [image_column, caption_column], available)
        while True:
            record_start = reader.reader.line_num + 1  # DictReader's own count is of rows read whole
            try:
                row = _next_row(reader)
            except StopIteration:
                return
            except csv.Error as error:
                # A field past the limit stops the reader inside it; within one line, the reader drops that
                # line's rest and goes on cleanly with the next, but a quoted field spanning lines would go on
                # inside the field, its lines read as rows.
                over_limit = "field limit" in str(error) and reader.reader.line_num > record_start
                if "end of data" not in str(error) and not over_limit:  # CPython's words for an open quote
                    yield f"line {record_start}: {error}"
                    continue
                raise ValueError(
                    f"{path}, the record from line {record_start}: {error}. A field that opens with a double "
                    'quote must close it (write a quote inside one as ""), or set quoting = "none" to read '
                    "quotes as text"
                ) from error
            image, caption = row.get(image_column), row.get(caption_column)
            # csv.DictReader puts fields beyond the header's under None: an unquoted comma in a caption cut it
            # there, and the rest of it went unread. Empty ones are trailing separators, which cut nothing.
            beyond_header = [field for field in row.get(None) or [] if field.strip()]
            if beyond_header:
                quote = ('put it in double quotes and set quoting = "csv"' if csv_quoting == csv.QUOTE_NONE
                         else "put it in double quotes, as a CSV writer does")
                yield (f"line {record_start}: more fields than the header's {len(available)}, so a field was cut "
                       f"where it holds a {_SEPARATOR_NAMES.get(separator, repr(separator))} ({quote}; or check "
                       f"the separator)")
            elif not image:
                yield f"line {record_start}: no {image_column!r}"
            elif caption is None:
                yield f"line {record_start}: no {caption_column!r} (fewer fields than the header)"
            else:
                yield image, caption, record_start


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words, for a message saying that a field is not a string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    names = {list: "a list", dict: "an object", str: "an empty string"}
    return names.get(type(value), "a number")


def _jsonl_row_problem(record: dict, image_column: str, caption_column: str) -> str:
    """Why a JSONL record gives no sample ("" when it gives one)."""
    missing = [column for column in (image_column, caption_column) if column not in record]
    if missing:
        return f"no {missing[0]!r}"
    image, caption = record[image_column], record[caption_column]
    if not (isinstance(image, str) and image):
        return f"{image_column!r} is {_json_kind(image)}, not a file path"
    if not isinstance(caption, str):
        # Several captions of one image in a list (COCO's habit) are several rows here
        several = ": write one row per caption" if isinstance(caption, list) else ""
        return f"{caption_column!r} is {_json_kind(caption)}, not a string{several}"
    return ""


def _jsonl_rows(path: str, image_column: str, caption_column: str) -> Iterator[tuple | str]:
    # A column that no record has is a config error, said at the end; one that some records lack (writers that
    # leave out null fields) makes those rows bad rows, wherever they are (the first record used to name the
    # columns, and one uncaptioned image there refused the whole manifest)
    first_keys: list[str] | None = None
    seen = {image_column: False, caption_column: False}
    refuse_utf16_or_32(path)
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                line = line[3:]
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            # RecursionError: a row nested thousands deep. ValueError, of which JSONDecodeError is one: also an
            # integer past Python's 4300 digits, which json refuses with a plain ValueError that ended the
            # whole manifest (and the training run) for one row, in words naming no file
            except (ValueError, RecursionError) as error:
                yield f"line {number}: not JSON ({getattr(error, 'msg', error)})"  # msg: without the position
                continue
            if not isinstance(record, dict):
                yield f"line {number}: {_json_kind(record)}, not a JSON object"
                continue
            if first_keys is None:
                first_keys = list(record)
            for column in seen:
                seen[column] = seen[column] or column in record
            problem = _jsonl_row_problem(record, image_column, caption_column)
            yield f"line {number}: {problem}" if problem else (record[image_column], record[caption_column], number)
    if first_keys is not None and not all(seen.values()):
        raise _missing_columns_error(path, [column for column, found in seen.items() if not found], first_keys)


def is_json_lines(path: str | Path) -> bool:
    """Whether the manifest at `path` is read as JSON Lines (a .jsonl suffix, in any case), which has no header."""
    return Path(path).suffix.lower() == ".jsonl"


def manifest_rows_with_problems(
    path: str, image_column: str, caption_column: str, separator: str, quoting: str
) -> Iterator[tuple | str]:
    """(image path, caption, line number) per row as the file has them (str, possibly with surrogates; the line
    where the row starts), or for a row without a usable image path or caption field, why (naming its line). Raises ValueError for an unknown format or missing
    columns."""
    suffix = Path(path).suffix.lower()
    if is_json_lines(path):
        return _jsonl_rows(path, image_column, caption_column)
    if separator or suffix in _SEPARATORS:
        return _delimited_rows(path, separator or _SEPARATORS[suffix], image_column, caption_column, quoting)
    raise ValueError(f"{path}: unknown manifest format; use {', '.join(MANIFEST_SUFFIXES)} or set `separator`")


def read_manifest(
    path: str, image_column: str = "image", caption_column: str = "caption", separator: str = "", quoting: str = "auto",
    said_once: int = logging.WARNING,
) -> Manifest:
    """Reads a whole manifest into packed arrays. said_once: the level of the line about rows left out, which
    every rank reading the same manifest would log alike (a warning from rank 0 alone)."""
    if Path(path).is_dir():  # a new user's folder of images: "does not exist" said the wrong thing
        raise IsADirectoryError(
            f"manifest {path} is a folder, not a CSV/TSV/JSONL manifest; for a folder of images with .txt captions "
            f"beside them, make shards of it (clip-make-shards {path} OUT/) and read those with kind = \"shards\""
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"manifest {path} does not exist{relative_path_note(path)}")
    images, captions, bad_rows, first_bad_row = PackedStringsBuilder(), PackedStringsBuilder(), 0, ""
    for row in manifest_rows_with_problems(path, image_column, caption_column, separator, quoting):
        if isinstance(row, str):
            bad_rows += 1
            first_bad_row = first_bad_row or row
            continue
        images.append(original_bytes(row[0]))
        captions.append(original_bytes(row[1]))
    if bad_rows:
        log.log(said_once, "%s: %d rows without a usable image path or caption were left out (the first, %s)",
                path, bad_rows, first_bad_row)
    root = str(Path(path).resolve().parent)
    return Manifest(path, root, images.build(), captions.build(), bad_rows, first_bad_row)
