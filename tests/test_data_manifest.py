"""Reading manifests: quotes in TSV captions, quoted commas in CSV, byte-order marks, the column check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clip.data.manifest import read_manifest


def captions_of(path: Path, **columns) -> list[str]:
    manifest = read_manifest(str(path), **columns)
    return [manifest.captions[row].decode() for row in range(len(manifest))]


def test_tsv_captions_keep_their_quotes_and_never_swallow_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    rows = ['"the best" pizza', '"unclosed quote at the start', "a plain one", 'ends with "quote"']
    path.write_text("image\tcaption\n" + "".join(f"{i}.jpg\t{caption}\n" for i, caption in enumerate(rows)))
    assert captions_of(path) == rows


def test_csv_quoted_fields_hold_commas_and_quotes(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('image,caption\n0.jpg,"red, green and blue"\n1.jpg,"a ""quoted"" word"\n')
    assert captions_of(path) == ["red, green and blue", 'a "quoted" word']


def test_a_csv_quote_that_never_closes_is_an_error_not_a_swallowed_file(tmp_path: Path) -> None:
    # Python's csv reader would take every later row into the open field and report one row, no error.
    path = tmp_path / "train.csv"
    rows = ['0.jpg,"a good one"', '1.jpg,"the unclosed one', *(f"{i}.jpg,caption {i}" for i in range(2, 40))]
    path.write_text("image,caption\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"train\.csv, the record from line 3: unexpected end of data"):
        read_manifest(str(path))
    path.write_text('image,caption\n0.jpg,"a multi-line\ncaption"\n1.jpg,plain\n')  # quoted newlines stay valid
    assert captions_of(path) == ["a multi-line\ncaption", "plain"]
    # Quoting broken within a row spoils that row only: counted as bad, the next line read on
    path.write_text('image,caption\n0.jpg,good\n1.jpg,"5" screen" TV\n"2.jpg" ,"cap"\n3.jpg,fine\n')
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["good", "fine"] and manifest.bad_rows == 2


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        body = "".join(json.dumps({"image": f"{i}.jpg", "caption": f"caption {i}"}) + "\n" for i in range(2))
    else:
        separator = "\t" if suffix == ".tsv" else ","
        body = f"image{separator}caption\n" + "".join(f"{i}.jpg{separator}caption {i}\n" for i in range(2))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    manifest = read_manifest(str(path))
    assert len(manifest) == 2 and manifest.bad_rows == 0
    assert manifest.image_path(0).endswith("0.jpg")


def test_image_paths_are_read_relative_to_the_manifests_folder_or_kept_when_absolute(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "train.csv"
    elsewhere = tmp_path / "images" / "b.jpg"
    path.write_text(f"image,caption\nsub/a.jpg,one\n{elsewhere},two\n")
    manifest = read_manifest(str(path))
    assert manifest.image_path(0) == str(tmp_path.resolve() / "lists" / "sub" / "a.jpg")
    assert manifest.image_path(1) == str(elsewhere)


@pytest.mark.parametrize("suffix, encoding", [(".tsv", "utf-16"), (".csv", "utf-16"), (".jsonl", "utf-16"),
                                             (".tsv", "utf-32")])
def test_a_utf16_manifest_is_named_as_such(tmp_path: Path, suffix: str, encoding: str) -> None:
    # Excel's "Unicode text" export: read as UTF-8, its header was '\udcff\udcfei\x00m...', and the error
    # asked for other column names.
    path = tmp_path / f"train{suffix}"
    text = '{"image": "a.jpg", "caption": "a cat"}\n' if suffix == ".jsonl" else "image\tcaption\na.jpg\ta cat\n"
    path.write_bytes(text.encode(encoding))  # with its byte-order mark, as such exports write it
    with pytest.raises(ValueError, match=rf"is {encoding.upper()} encoded .* save it as UTF-8"):
        captions_of(path)


def test_jsonl_columns_that_no_record_has_are_a_config_error_even_after_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n" + json.dumps({"url": "0.jpg", "text": "a caption"}) + "\n")
    with pytest.raises(ValueError, match="no column 'image', 'caption'"):
        read_manifest(str(path))
    assert captions_of(path, image_column="url", caption_column="text") == ["a caption"]


def test_a_first_jsonl_record_without_a_caption_is_a_bad_row_not_a_config_error(tmp_path: Path) -> None:
    # Writers that leave out null fields: an uncaptioned image in first place refused the whole manifest ("no
    # column 'caption'"), while the same record anywhere else was one bad row
    records = [{"image": "x.jpg"}] + [{"image": f"{i}.jpg", "caption": f"cap {i}"} for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    manifest = read_manifest(str(path))
    assert (len(manifest), manifest.bad_rows) == (3, 1) and "line 1: no 'caption'" in manifest.first_bad_row
    # A column that some records have and none has is told apart: only the missing one is named
    path.write_text(json.dumps({"file": "a.jpg"}) + "\n" + json.dumps({"file": "b.jpg", "caption": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'image'; the columns are \['file'\]"):
        read_manifest(str(path))


def test_source_settings_that_cannot_work_are_config_errors(tmp_path: Path) -> None:
    from clip.data import DataConfig, SourceConfig

    with pytest.raises(ValueError, match="finite"):
        SourceConfig(kind="manifest", path="x.csv", weight=float("inf"))
    with pytest.raises(ValueError, match="num_samples is for synthetic and shard sources"):
        SourceConfig(kind="manifest", path="x.csv", num_samples=10)
    with pytest.raises(ValueError, match="worker_timeout_s"):
        DataConfig(worker_timeout_s=-1.0)


def test_rows_dropped_while_reading_are_reported_in_the_stats(tmp_path: Path) -> None:
    from test_data_helpers import build

    from clip.data import SourceConfig

    path = tmp_path / "train.csv"
    path.write_text("image,caption\n0.jpg,a caption\n,no image path\n2.jpg,another\n")
    data = build([SourceConfig(kind="manifest", path=str(path), name="m")])
    assert data.stats()["manifest_rows_dropped"] == {"m": 1} and data.samples_per_epoch == 2
    data.close()


def test_a_manifest_without_samples_is_an_error_naming_it(tmp_path: Path) -> None:
    # Alone it failed on the loader workers ("lower data.workers", even at 1); beside other sources nothing
    # was said at all.
    from test_data_helpers import build, write_manifest

    from clip.data import SourceConfig

    good = write_manifest(tmp_path / "good", range(8))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("image,caption\n")
    all_bad = tmp_path / "bad.csv"
    all_bad.write_text("image,caption\n,no image path\n,nor here\n")
    no_lines = tmp_path / "empty.jsonl"  # JSON Lines have no header: it was said to have one
    no_lines.write_text("\n")
    for path, why in [(header_only, "it has a header and no rows"),
                      (all_bad, r"all 2 of its rows are malformed \(the first, line 2: no 'image'\)"),
                      (no_lines, "it has no rows")]:
        with pytest.raises(ValueError, match=f"data source 1:manifest: manifest {path} has no samples: {why}$"):
            build([SourceConfig(kind="manifest", path=str(good)), SourceConfig(kind="manifest", path=str(path))])


def test_an_empty_csv_or_tsv_manifest_is_named_empty_not_short_of_columns(tmp_path: Path) -> None:
    # A zero-byte file (a failed export) was "no column 'image', 'caption'; the columns are []. Set image_column"
    # A byte-order mark alone (a spreadsheet's UTF-8 export of an empty sheet) was said to be a blank first line
    for name, text, what in [("a.tsv", "", "is empty (0 bytes)"),
                             ("b.csv", "\nimage,caption\n", "has a blank first line"),
                             ("c.csv", "\ufeff", "is empty (a byte-order mark alone)")]:
        (tmp_path / name).write_bytes(text.encode("utf-8"))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} {what}: a manifest's first line names its "
                                                       "columns ('image' and 'caption')")):
            read_manifest(str(tmp_path / name))


def test_a_tsv_quoted_by_a_csv_writer_reads_with_csv_quoting(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "train.tsv"
    rows = ['a "red" car', "two\nlines", "plain"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["image", "caption"])
        writer.writerows([f"{i}.jpg", caption] for i, caption in enumerate(rows))
    assert captions_of(path, quoting="csv") == rows
    assert captions_of(path) != rows  # "auto" reads TSV fields as written


def test_a_jsonl_row_nested_too_deep_for_the_json_reader_is_a_bad_row_not_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    deep = "[" * 100_000 + "]" * 100_000  # json raises RecursionError, not JSONDecodeError, on this
    rows = [json.dumps({"image": "0.jpg", "caption": "before"}), deep, json.dumps({"image": "1.jpg", "caption": "after"})]
    path.write_text("\n".join(rows) + "\n")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["before", "after"] and manifest.bad_rows == 1



def test_a_jsonl_row_with_an_integer_past_pythons_digit_limit_is_a_bad_row_not_the_manifest(tmp_path: Path) -> None:
    # json refuses it with a plain ValueError (not JSONDecodeError), which ended read_manifest, and with it the
    # training run, for one row, in words that named no file
    path = tmp_path / "train.jsonl"
    rows = [json.dumps({"image": "0.jpg", "caption": "before"}),
            '{"image": "2.jpg", "caption": "big", "width": ' + "9" * 5000 + "}",
            json.dumps({"image": "1.jpg", "caption": "after"})]
    path.write_text("\n".join(rows) + "\n")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["before", "after"] and manifest.bad_rows == 1

@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_field_past_pythons_csv_default_limit_is_read_and_the_limit_left_as_it_was(
    tmp_path: Path, suffix: str
) -> None:
    # The csv default (131,072 characters) made such a row a bad row "without a usable image path or caption"
    import csv

    separator = "\t" if suffix == ".tsv" else ","
    path = tmp_path / f"train{suffix}"
    long_caption = "x" * (csv.field_size_limit() + 1)
    path.write_text(f"image{separator}caption\na.jpg{separator}{long_caption}\nb.jpg{separator}short\n")
    default = csv.field_size_limit()
    assert captions_of(path) == [long_caption, "short"]
    assert csv.field_size_limit() == default  # the process's other csv readers keep theirs


def test_a_field_past_the_limit_spoils_its_line_or_names_an_open_quote(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("clip.data.manifest.FIELD_LIMIT", 100)
    path = tmp_path / "train.tsv"
    path.write_text(f"image\tcaption\na.jpg\t{'x' * 101}\nb.jpg\tshort\n")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["short"] and manifest.bad_rows == 1
    # A quoted field spanning lines: read on from inside it, its lines were rows ('x', 'z"') beside bad ones
    path = tmp_path / "train.csv"
    path.write_text('image,caption\na.jpg,"' + "y" * 60 + "\n" + "y" * 60 + '\nx,z"\nb.jpg,short\n')
    with pytest.raises(ValueError, match=r"train\.csv, the record from line 2: field larger than field limit"):
        read_manifest(str(path))


def test_a_bare_carriage_return_in_a_caption_does_not_split_its_row(tmp_path: Path) -> None:
    # The csv reader ended the record there: a.jpg kept half its caption, and the rest was a row of its own,
    # its text the image path and the next column the caption
    path = tmp_path / "train.tsv"
    path.write_bytes(b"image\tcaption\tsource\r\na.jpg\tfirst\rsecond\tweb\r\nb.jpg\tok\r\rtwo\tweb\n")
    assert captions_of(path) == ["first\rsecond", "ok\r\rtwo"]
    path = tmp_path / "train.csv"
    path.write_bytes(b'image,caption\na.jpg,"quoted\rone"\nb.jpg,bare\rone\n')
    assert captions_of(path) == ["quoted\rone", "bare\rone"]
    # Also in the last line when the file does not end in a line break: such a file was refused, "unexpected end
    # of data" taken for a quote left open
    path.write_bytes(b"image,caption\na.jpg,first\nb.jpg,bare\rlast")
    assert captions_of(path) == ["first", "bare\rlast"]
    path.write_bytes(b'image,caption\na.jpg,first\nb.jpg,"quoted\rlast"')
    assert captions_of(path) == ["first", "quoted\rlast"]
    (tmp_path / "last.tsv").write_bytes(b"image\tcaption\na.jpg\tfirst\nb.jpg\tbare\rlast")
    assert captions_of(tmp_path / "last.tsv") == ["first", "bare\rlast"]
    # A file whose rows end in "\r" alone (Excel for Mac's CSV) reads as before
    path.write_bytes(b'image,caption\ra.jpg,"two\rlines"\rb.jpg,plain\r')
    assert captions_of(path) == ["two\rlines", "plain"]


def test_rows_ending_in_two_carriage_returns_keep_their_last_field_as_written(tmp_path: Path) -> None:
    # Python's csv.writer on Windows, in a file opened without newline="", ends rows in "\r\r\n"; with a header
    # written by hand ("\r\n") the first "\r" of each row was read as part of the last field: "a.jpg\r", a file
    # that does not exist. The "\r"s before a line's end are its end, as they were before bare ones were kept.
    path = tmp_path / "train.csv"
    path.write_bytes(b"caption,image\r\none,a.jpg\r\r\ntwo\rlines,b.jpg\r\r\n")
    manifest = read_manifest(str(path))
    assert [manifest.image_paths[row].decode() for row in range(len(manifest))] == ["a.jpg", "b.jpg"]
    assert captions_of(path) == ["one", "two\rlines"]


def test_a_long_run_of_carriage_returns_in_a_field_is_read_in_linear_time(tmp_path: Path) -> None:
    # Each "\r" was escaped after a lookahead over the run of "\r"s that follows it, for the line's end: quadratic
    # in the run's length, 5 s for 20,000 of them, about a minute for these 60,000, hours for a 1 MB run
    import time

    path = tmp_path / "train.tsv"
    path.write_bytes(b"image\tcaption\tsource\na.jpg\tx" + b"\r" * 60_000 + b"y\tweb\r\r\nb.jpg\tz\tweb\n")
    started = time.monotonic()
    assert captions_of(path) == ["x" + "\r" * 60_000 + "y", "z"]
    assert time.monotonic() - started < 5


def test_rows_ending_in_a_carriage_return_alone_after_a_header_ending_in_a_line_feed(tmp_path: Path) -> None:
    # A header written apart (echo) before rows that end in "\r" alone (Excel for Mac's CSV): read as lines ending
    # in "\n", the whole file was one row, its caption 'one\rb.jpg', and the other rows were gone without a word
    path = tmp_path / "train.tsv"
    path.write_bytes(b"image\tcaption\na.jpg\tone\rb.jpg\ttwo\rc.jpg\tthree\r")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["one", "two", "three"] and manifest.bad_rows == 0
    # A caption's bare "\r" in the first rows of a file whose lines end in "\n" stays part of it
    path.write_bytes(b"image\tcaption\na.jpg\tone\rmore\nb.jpg\ttwo\n")
    assert captions_of(path) == ["one\rmore", "two"]
    # Also when the first row is longer than the 64 Ki characters the file's lines were judged by (its caption
    # was split at the "\r", and its second half read as a row of its own)
    path.write_bytes(b"image\tcaption\tmeta\na.jpg\tone\rmore\t" + b"x" * 70_000 + b"\nb.jpg\ttwo\tm\n")
    assert captions_of(path) == ["one\rmore", "two"] and read_manifest(str(path)).bad_rows == 0


def test_the_first_unusable_row_is_named_with_why(tmp_path: Path, caplog) -> None:
    # A JSONL of COCO-style caption lists was "all 401 of its rows are malformed", naming no row and no reason
    path = tmp_path / "train.jsonl"
    records = [{"image": "0.jpg", "caption": ["a dog", "a brown dog"]}, {"image": "1.jpg", "caption": 7},
               {"image": "2.jpg"}, {"image": "", "caption": "x"}, [1], {"image": "3.jpg", "caption": "fine"}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + "{not json\n")
    with caplog.at_level("WARNING"):
        manifest = read_manifest(str(path))
    assert manifest.bad_rows == 6 and len(manifest) == 1
    first = "line 1: 'caption' is a list, not a string: write one row per caption"
    assert manifest.first_bad_row == first and f"were left out (the first, {first})" in caplog.text
    problems = {}
    lines = path.read_text().splitlines()
    for line in range(2, 8):  # each kind of problem, as the first of the file after a good line
        (tmp_path / "one.jsonl").write_text(lines[5] + "\n" + lines[line - 1] + "\n")
        problems[line] = read_manifest(str(tmp_path / "one.jsonl")).first_bad_row
    assert problems == {
        2: "line 2: 'caption' is a number, not a string",
        3: "line 2: no 'caption'",
        4: "line 2: 'image' is an empty string, not a file path",
        5: "line 2: a list, not a JSON object",
        6: "",  # the good line itself
        7: "line 2: not JSON (Expecting property name enclosed in double quotes)",
    }
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('image,caption\n0.jpg\n,no image\n1.jpg,fine\n')
    manifest = read_manifest(str(csv_path))
    assert manifest.bad_rows == 2 and manifest.first_bad_row == "line 2: no 'caption' (fewer fields than the header)"


def test_a_manifest_of_unusable_rows_alone_is_refused_naming_the_first(tmp_path: Path) -> None:
    from clip.data.config import SourceConfig
    from clip.data.sources import ManifestSource

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": ["a", "b"]}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=re.escape(
        "has no samples: all 3 of its rows are malformed (the first, line 1: 'caption' is a list, not a string: "
        "write one row per caption)"
    )):
        ManifestSource("0:manifest", SourceConfig(kind="manifest", path=str(path)))


def test_a_row_with_more_fields_than_the_header_is_left_out_not_cut(tmp_path: Path) -> None:
    # A hand-written CSV's unquoted comma cut the caption there ("a yellow, shiny square" was "a yellow"),
    # without a word; trailing separators (empty fields) cut nothing and stay fine.
    path = tmp_path / "train.csv"
    path.write_text("image,caption\n0.jpg,a yellow, shiny square\n1.jpg,a blue square,\n2.jpg,\"a red, round one\"\n")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["a blue square", "a red, round one"] and manifest.bad_rows == 1
    assert manifest.first_bad_row == (
        "line 2: more fields than the header's 2, so a field was cut where it holds a comma (put it in double "
        "quotes, as a CSV writer does; or check the separator)"
    )
    tsv = tmp_path / "train.tsv"
    tsv.write_text("image\tcaption\n0.jpg\ta caption\twith a tab\n1.jpg\tfine\n")
    manifest = read_manifest(str(tsv))
    assert captions_of(tsv) == ["fine"] and 'where it holds a tab (put it in double quotes and set quoting = "csv"' in (
        manifest.first_bad_row
    )


def test_an_empty_caption_field_is_a_sample_and_a_missing_one_a_bad_row(tmp_path: Path) -> None:
    # As in JSONL, where "" is a string: only a row short of the caption's field has none
    path = tmp_path / "train.csv"
    path.write_text("image,caption\n0.jpg,\n1.jpg\n2.jpg,two\n")
    manifest = read_manifest(str(path))
    assert captions_of(path) == ["", "two"] and manifest.bad_rows == 1
    assert manifest.first_bad_row == "line 3: no 'caption' (fewer fields than the header)"


@pytest.mark.parametrize(("value", "said"), [(True, "true"), (False, "false"), (None, "null"), ({}, "an object")])
def test_a_jsonl_image_that_is_no_string_is_named_in_json_s_words(tmp_path: Path, value, said) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"image": "0.jpg", "caption": "x"}, {"image": value, "caption": "y"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_manifest(str(path)).first_bad_row == f"line 2: 'image' is {said}, not a file path"


def test_a_missing_relative_manifest_or_shard_path_names_the_folder_it_was_read_from(tmp_path: Path, monkeypatch) -> None:
    # A config's relative paths are read from the folder the command runs in, not the config file's:
    # "manifest data/train.csv does not exist", of a file that exists beside the config, named no folder
    from clip.data.shards import shard_sizes

    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "train.csv").write_text("image,caption\na.jpg,a\n")
    monkeypatch.chdir(tmp_path)
    where = re.escape(f"(a relative path, read from the folder the command runs in, {tmp_path})")
    with pytest.raises(FileNotFoundError, match=f"^manifest data/train.csv does not exist {where}$"):
        read_manifest("data/train.csv")
    with pytest.raises(FileNotFoundError, match=f"^shard data/s-000000.tar does not exist {where}: check the"):
        shard_sizes(["data/s-000000.tar"])
    with pytest.raises(FileNotFoundError, match=r"^manifest /nowhere/train.csv does not exist$"):  # absolute: said as is
        read_manifest("/nowhere/train.csv")
    # A folder of images, as a new user has one: it exists, and is not a manifest
    with pytest.raises(IsADirectoryError, match=r"^manifest configs/data is a folder, not a CSV/TSV/JSONL manifest; .*"
                                                r"clip-make-shards configs/data OUT/"):
        read_manifest("configs/data")


def test_a_separator_typed_as_backslash_t_is_a_tab_and_a_longer_one_a_config_error(tmp_path: Path) -> None:
    # 'data.sources.0.separator=\t' from a shell (open_clip's --csv-separator habit) is a backslash and a t, and
    # the csv reader stopped on it with a TypeError's traceback; so did make_shards.py --separator '\t'
    from clip.data import SourceConfig

    assert SourceConfig(kind="manifest", path="x.txt", separator="\\t").separator == "\t"
    with pytest.raises(ValueError, match=r"separator must be one character \(\"\\t\" for a tab\).*got 'tab'$"):
        SourceConfig(kind="manifest", path="x.txt", separator="tab")
    path = tmp_path / "train.txt"
    path.write_text("image\tcaption\na.jpg\tone\n")
    from test_data_make_shards import load_make_shards

    args = load_make_shards().parse_args([str(path), str(tmp_path / "out"), "--separator", "\\t"])
    assert args.separator == "\t"
    assert captions_of(path, separator=args.separator) == ["one"]


def test_a_header_split_by_another_separator_asks_for_that_separator(tmp_path: Path) -> None:
    # A spreadsheet's "CSV" in a European locale separates by ";": the error named one column, 'image;caption',
    # and asked for other column names
    path = tmp_path / "train.csv"
    path.write_text("image;caption\na.jpg;one\n")
    with pytest.raises(ValueError, match=r"header 'image;caption' is separated by semicolons, not commas: set "
                                         r"separator = \";\" .* --separator ';' \(clip-make-shards\)$") as refused:
        read_manifest(str(path))
    # An evaluation's manifest has no separator to set: it must not be told to set one
    assert "[[eval.retrieval]] has no separator key" in str(refused.value)
    assert captions_of(path, separator=";") == ["one"]
    # A tab-separated header: both the config and the command line are told '\t' as typed, never a raw tab, which
    # a shell's quotes cannot take from the keyboard (the Tab key completes instead)
    path.write_text("image\tcaption\na.jpg\tone\n")
    with pytest.raises(ValueError, match=r"separated by tabs, not commas: set separator = \"\\t\" .* --separator "
                                         r"'\\t' \(clip-make-shards\)$"):
        read_manifest(str(path))
    path.write_text("image|title\na.jpg|one\n")  # not the columns wanted either way: the columns advice
    with pytest.raises(ValueError, match=r"no column 'image', 'caption'; the columns are \['image\|title'\]"):
        read_manifest(str(path))


def test_a_source_given_the_other_kinds_path_is_told_the_kind_to_set() -> None:
    # A manifest as kind = "shards" was "not a readable tar file: rewrite or remove it", and a shard pattern as
    # kind = "manifest" a manifest that "does not exist"
    from clip.data import SourceConfig

    with pytest.raises(ValueError, match=r"kind is \"shards\", but '/data/train.TSV' is a manifest: set kind = \"manifest\""):
        SourceConfig(kind="shards", path="/data/train.TSV")
    with pytest.raises(ValueError, match=r"kind is \"manifest\", but '/data/cc-\{000..009\}.tar' names WebDataset shards"):
        SourceConfig(kind="manifest", path="/data/cc-{000..009}.tar")
    assert SourceConfig(kind="shards", path="/data/cc-{000..009}.tar").kind == "shards"
    assert SourceConfig(kind="manifest", path="/data/pairs.csv").kind == "manifest"
