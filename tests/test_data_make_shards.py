"""clip-make-shards (clip.cli.make_shards; scripts/make_shards.py in a checkout): manifests and image folders to
WebDataset shards that the loader reads back."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_data_helpers import build, caption_of, captions, image_bytes, take, write_manifest

import clip.cli.make_shards
from clip.data import SourceConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_shards.py"


def load_make_shards():
    return clip.cli.make_shards


def make_shards_main():
    return load_make_shards().main


@pytest.mark.parametrize("manifest_name", ["train.csv", "train.tsv", "train.jsonl"])
def test_manifest_round_trip(tmp_path: Path, manifest_name: str, capsys: pytest.CaptureFixture) -> None:
    manifest = write_manifest(tmp_path / "src", range(7), manifest_name)
    (tmp_path / "src" / "images" / "3.jpg").unlink()  # missing_file
    (tmp_path / "src" / "images" / "4.jpg").write_bytes(b"plain text")  # not_an_image
    bmp = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(5))).save(bmp, format="BMP")
    (tmp_path / "src" / "images" / "5.jpg").write_bytes(bmp.getvalue())  # stored as PNG
    assert make_shards_main()([str(manifest), str(tmp_path / "out"), "--prefix", "t", "--samples-per-shard", "2"]) == 0
    report = capsys.readouterr().out
    assert "wrote 5 samples in 3 shards" in report and "missing_file 1" in report and "not_an_image 1" in report

    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"t-000000.tar": 2, "t-000001.tar": 2, "t-000002.tar": 1}
    with tarfile.open(tmp_path / "out" / "t-000001.tar") as tar:
        names = tar.getnames()
        info = json.loads(tar.extractfile("000000003.json").read())
    assert sorted(names) == sorted(
        ["000000002.jpg", "000000002.txt", "000000002.json", "000000003.png", "000000003.txt", "000000003.json"]
    )
    assert info["caption"] == caption_of(5) and info["width"] == 24 and info["height"] == 20

    source = SourceConfig(kind="shards", path=str(tmp_path / "out" / "t-{000000..000002}.tar"))
    data = build([source], batch_size=5)
    assert Counter(captions(take(data, 1))) == Counter(caption_of(i) for i in (0, 1, 2, 5, 6))
    assert data.stats()["skipped"] == 0
    data.close()


def test_a_phones_multi_picture_jpeg_is_stored_as_the_jpeg_it_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Pillow opens many phones' JPEGs (a second picture after the first) as format "MPO": they were converted
    # to PNG, several times their size
    first = Image.open(io.BytesIO(image_bytes(0))).convert("RGB")
    mpo = io.BytesIO()
    first.save(mpo, format="MPO", save_all=True, append_images=[first.transpose(Image.Transpose.ROTATE_90)])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    manifest = write_manifest(tmp_path / "src", range(1), "train.csv")
    (tmp_path / "src" / "images" / "0.jpg").write_bytes(mpo.getvalue())
    assert make_shards_main()([str(manifest), str(tmp_path / "out"), "--prefix", "t"]) == 0
    assert f"wrote 1 sample in 1 shard to {tmp_path / 'out'}\n" in capsys.readouterr().out  # not "1 shards"
    with tarfile.open(tmp_path / "out" / "t-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["000000000.jpg", "000000000.json", "000000000.txt"]
        assert tar.extractfile("000000000.jpg").read() == mpo.getvalue()


def test_a_caption_longer_than_the_loader_reads_is_stored_whole(tmp_path: Path) -> None:
    # The loader cuts a caption to CAPTION_CHARS_KEPT characters before tokenizing; a shard keeps the data
    from clip.data.decoding import CAPTION_CHARS_KEPT

    (tmp_path / "0.jpg").write_bytes(image_bytes(0))
    caption = "a long caption " * (CAPTION_CHARS_KEPT // 10)
    (tmp_path / "0.txt").write_text(caption)
    assert make_shards_main()([str(tmp_path), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.extractfile("000000000.txt").read().decode() == caption.strip()


def test_image_folder_with_caption_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for i in range(4):
        folder = tmp_path / "photos" / f"album{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(image_bytes(i))
        if i != 2:
            (folder / f"{i}.txt").write_text(caption_of(i))
    (tmp_path / "photos" / "album0" / "9.txt").write_text("a caption whose image is missing")
    assert make_shards_main()([str(tmp_path / "photos"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    # a caption file alone is counted too, and the first of each kind is named
    missing_caption, missing_image = tmp_path / "photos" / "album0" / "2.jpg", tmp_path / "photos" / "album0" / "9.txt"
    assert (f"skipped 2: missing_caption 1 (the first, {missing_caption}), missing_image 1 (the first, {missing_image})"
            in printed)
    # and the path pattern to paste into a config
    pattern = str((tmp_path / "out").resolve() / "shard-{000000..000000}.tar")
    assert f'for a [[data.sources]] table: kind = "shards", path = "{pattern}"' in printed
    data = build([SourceConfig(kind="shards", path=pattern)], batch_size=3)
    assert sorted(captions(take(data, 1))) == [caption_of(i) for i in (0, 1, 3)]
    data.close()


def test_an_image_folders_caption_suffix_is_matched_in_any_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # photo.JPG + photo.TXT, as cameras and Windows tools name them: the image was counted as missing_caption
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, caption_suffix in enumerate([".TXT", ".Txt", ".txt"]):
        (photos / f"{i}.JPG").write_bytes(image_bytes(i))
        (photos / f"{i}{caption_suffix}").write_text(caption_of(i))
    (photos / "9.TXT").write_text("a caption whose image is missing")
    # Two caption files of one image, on a case-sensitive file system: neither is guessed, both are named
    both = [photos / "3.TXT", photos / "3.txt"]
    (photos / "3.jpg").write_bytes(image_bytes(3))
    for path in both:
        path.write_text("one of two captions")
    if both[0].samefile(both[1]):
        both = None  # a case-insensitive file system keeps one file of the two names
    assert make_shards_main()([str(photos), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"missing_image 1 (the first, {photos / '9.TXT'})" in printed and "missing_caption" not in printed
    if both is not None:
        assert f"two_captions 1 (the first, {photos / '3.jpg'}: 3.TXT, 3.txt)" in printed
    data = build([SourceConfig(kind="shards", path=str(tmp_path / "out" / "shard-000000.tar"))], batch_size=3)
    assert sorted(captions(take(data, 1))) == [caption_of(i) for i in range(3)]
    data.close()


def test_an_image_folder_reads_linked_folders_once_each(tmp_path: Path) -> None:
    # os.walk's default does not enter a linked folder: an album linked in from another disk was left out,
    # counted nowhere. A folder linked twice, or a link back to a folder above, is read once.
    photos, elsewhere = tmp_path / "photos", tmp_path / "other_disk" / "album"
    for folder, i in ((photos, 0), (elsewhere, 1)):
        folder.mkdir(parents=True)
        (folder / f"{i}.jpg").write_bytes(image_bytes(i))
        (folder / f"{i}.txt").write_text(caption_of(i))
    (photos / "linked").symlink_to(elsewhere)
    (photos / "linked_again").symlink_to(elsewhere)
    (photos / "back_up").symlink_to(photos)
    sizes, skipped = load_make_shards().write_shards(
        load_make_shards().folder_samples(photos), tmp_path / "out", "t", 10)
    assert sizes == {"t-000000.tar": 2} and not skipped


def test_unusable_manifest_rows_are_counted_and_the_first_is_named_with_why(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The count alone ("bad_manifest_row 2") left the user to hunt through the manifest for the rows it meant
    manifest = write_manifest(tmp_path / "src", range(3), "train.jsonl")
    with manifest.open("a") as file:
        file.write(json.dumps({"image": "images/0.jpg", "caption": ["one", "two"]}) + "\n")
        file.write("not json\n")
        file.write(json.dumps({"image": "images/404.jpg", "caption": "a caption"}) + "\n")
        # An image with several rows: named alone, its first, good row was where the user looked
        file.write(json.dumps({"image": "images/0.jpg", "caption": " "}) + "\n")
    assert make_shards_main()([str(manifest), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples" in printed
    missing, image_0 = ((tmp_path / "src" / "images" / name).resolve() for name in ("404.jpg", "0.jpg"))
    assert ("skipped 4: bad_manifest_row 2 (the first, line 4: 'caption' is a list, not a string: write one row per "
            f"caption), empty_caption 1 (the first, {image_0} (train.jsonl line 7)), missing_file 1 (the first, "
            f"{missing} (train.jsonl line 6))") in printed


def test_an_unreadable_image_is_counted_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A file name longer than any file system allows: reading it fails with an OSError that is not
    # "not found" (as a permission error or a failing disk would).
    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")
    with manifest.open("a") as file:
        file.write(f"images/{'x' * 300}.jpg,a caption\n")
    assert make_shards_main()([str(manifest), str(tmp_path / "out")]) == 0
    too_long = (tmp_path / "src" / "images" / f"{'x' * 300}.jpg").resolve()
    assert f"unreadable_file 1 (the first, {too_long} (train.csv line 5): File name too long)" in capsys.readouterr().out


def test_an_image_path_with_a_nul_byte_or_a_dangling_caption_link_is_one_counted_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # open() raises ValueError for a path with a NUL byte (a row torn by a crash mid-append), and a dangling x.txt
    # link failed its read: either ended the whole run (status 2, after --overwrite had deleted the old shards)
    manifest = write_manifest(tmp_path / "src", range(3), "train.jsonl")
    with manifest.open("a") as file:
        file.write(json.dumps({"image": "images/a\x00b.jpg", "caption": "torn"}) + "\n")
    assert make_shards_main()([str(manifest), str(tmp_path / "out")]) == 0
    assert "unreadable_file 1 (the first, " in capsys.readouterr().out
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.jpg").write_bytes(image_bytes(0))
    (folder / "a.txt").write_text("a caption")
    (folder / "b.txt").symlink_to(folder / "gone.txt")
    assert make_shards_main()([str(folder), str(tmp_path / "out2")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 sample in 1 shard" in out and f"unreadable_file 1 (the first, {folder / 'b.txt'}: " in out


def test_ctrl_c_ends_the_command_with_status_130_after_its_line_without_a_traceback(tmp_path: Path, monkeypatch) -> None:
    module = load_make_shards()
    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "encode_sample", interrupted)
    assert module.run([str(manifest), str(tmp_path / "out")]) == 130


def test_a_percent_sign_in_the_prefix_is_literal(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")
    assert make_shards_main()([str(manifest), str(tmp_path / "out"), "--prefix", "100%d"]) == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"100%d-000000.tar": 3}


@pytest.mark.parametrize(("prefix", "why"), [
    ("", "give a name"), ("sub/cc", "a name, not a path"), (".", "a name, not a path"), ("..", "a name, not a path"),
    ("cc{1}", "braces and '::'"), ("cc}", "braces and '::'"), ("a::b", "braces and '::'"),
])
def test_a_prefix_that_cannot_name_shard_files_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, prefix: str, why: str,
) -> None:
    # '' wrote '-000000.tar'; 'sub/cc' ended in a bare "No such file or directory"; braces and '::' made the printed
    # data source path another range or two folders
    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")
    with pytest.raises(SystemExit) as refused:
        make_shards_main()([str(manifest), str(tmp_path / "out"), "--prefix", prefix])
    assert refused.value.code == 2
    assert f"--prefix {prefix!r}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_index_only_rewrites_sizes(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "src", range(5))
    make_shards_main()([str(manifest), str(tmp_path / "out"), "--samples-per-shard", "3"])
    written = (tmp_path / "out" / "sizes.json").read_text()
    (tmp_path / "out" / "sizes.json").unlink()
    assert make_shards_main()(["--index", str(tmp_path / "out" / "shard-{000000..000001}.tar")]) == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == json.loads(written) == {
        "shard-000000.tar": 3, "shard-000001.tar": 2
    }


def test_the_printed_data_source_line_is_toml_for_any_output_folder(tmp_path: Path, capsys) -> None:
    # A folder holding '"' or '\\' was printed inside quotes as it was: a line TOML could not read
    import tomllib

    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")
    output = tmp_path / 'say "hi" \\ there'
    assert make_shards_main()([str(manifest), str(output)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("for a [[data.sources]]"))
    table = tomllib.loads(line.split(": ", 1)[1].replace(", path", "\npath"))
    assert table == {"kind": "shards", "path": str(output / "shard-{000000..000000}.tar")}


def test_paths_starting_with_a_tilde_are_read_from_the_home_folder(tmp_path: Path, monkeypatch) -> None:
    # Quoted (as --index asks its pattern to be), '~/...' was said not to exist, and an OUTPUT '~/out' made a
    # folder named '~' in the current one; the other commands read '~' as the home folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "home" / "src", range(3), "train.csv")
    assert make_shards_main()(["~/src/train.csv", "~/out"]) == 0
    (tmp_path / "home" / "out" / "sizes.json").unlink()
    assert make_shards_main()(["--index", "~/out/shard-{000000..000000}.tar"]) == 0
    assert json.loads((tmp_path / "home" / "out" / "sizes.json").read_text()) == {"shard-000000.tar": 3}
    assert not (tmp_path / "~").exists()


def test_index_keeps_the_entries_of_shards_it_does_not_index(tmp_path: Path) -> None:
    # Two prefixes share a folder, as writing them allows; re-indexing one (the loader's advice for a wrong
    # entry) replaced the whole sizes.json, and the other's shards lost their counts without a word.
    out = tmp_path / "out"
    for prefix, count in (("a", 5), ("b", 4)):
        manifest = write_manifest(tmp_path / prefix, range(count))
        make_shards_main()([str(manifest), str(out), "--prefix", prefix, "--samples-per-shard", "3"])
    index = out / "sizes.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "a-000001.tar": 7}))  # a wrong entry
    assert make_shards_main()(["--index", str(out / "a-{000000..000001}.tar")]) == 0
    assert json.loads(index.read_text()) == {"a-000000.tar": 3, "a-000001.tar": 2, "b-000000.tar": 3, "b-000001.tar": 1}


def test_index_names_shards_cut_short_or_unreadable_and_writes_nothing(tmp_path: Path) -> None:
    # A shard cut at a member boundary reads as a complete tar of fewer samples: --index wrote that smaller
    # count, and the damage disappeared. A file that is no tar was a raw tarfile traceback naming no shard.
    manifest = write_manifest(tmp_path / "src", range(9))
    out = tmp_path / "out"
    make_shards_main()([str(manifest), str(out), "--samples-per-shard", "3"])
    (out / "sizes.json").unlink()
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        second_member = tar.getmembers()[1].offset  # a header boundary inside the first sample
    shard.write_bytes(shard.read_bytes()[:second_member])
    (out / "shard-000002.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SystemExit) as stopped:
        make_shards_main()(["--index", str(out / "shard-{000000..000003}.tar")])
    message = str(stopped.value)
    assert message.startswith("clip-make-shards: --index: 3 of 4 shards cannot be indexed, no sizes.json written")
    assert "shard-000001.tar: cut short (it lacks a tar's closing zero blocks)" in message
    assert "shard-000002.tar: not a tar archive (1600 bytes)" in message  # it was said to be "cut short"
    assert "shard-000003.tar: FileNotFoundError" in message
    assert "shard-000000.tar" not in message and not (out / "sizes.json").exists()
    # Compressed shards end in gzip's trailer, not in zero blocks: indexed (a cut one fails gzip's own check)
    import gzip

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "s-000000.tar.gz").write_bytes(gzip.compress((out / "shard-000000.tar").read_bytes()))
    cut = gzip.compress((out / "shard-000000.tar").read_bytes())
    (packed / "s-000001.tar.gz").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(SystemExit, match=r"(?s)1 of 2 shards cannot be indexed.*s-000001.tar.gz: (ReadError|EOFError)"):
        make_shards_main()(["--index", str(packed / "s-{000000..000001}.tar.gz")])
    assert make_shards_main()(["--index", str(packed / "s-{000000..000000}.tar.gz")]) == 0
    assert json.loads((packed / "sizes.json").read_text()) == {"s-000000.tar.gz": 3}


def test_index_given_a_folder_a_wildcard_or_the_shells_expansion_says_how_to_write_the_pattern(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A folder was "1 of 1 shards cannot be indexed (remove or rewrite them...): IsADirectoryError", a quoted
    # wildcard a FileNotFoundError of 'out/*.tar', and an unquoted one indexed the first shard alone (the shell
    # gave the next ones to INPUT and OUTPUT), saying "indexed 1 shards"
    out = tmp_path / "out"
    make_shards_main()([str(write_manifest(tmp_path / "src", range(5))), str(out), "--samples-per-shard", "2"])
    (out / "sizes.json").unlink()
    with pytest.raises(SystemExit, match=re.escape(f"is a folder, not a pattern of shards: name its shards, e.g. "
                                                   f"'{out}/shard-{{000000..000002}}.tar' for the 3 tar files")):
        make_shards_main()(["--index", str(out)])
    with pytest.raises(SystemExit, match=r"takes \{000000..000099\} ranges, not wildcards$"):
        make_shards_main()(["--index", str(out / "*.tar")])
    with pytest.raises(SystemExit):
        make_shards_main()(["--index", *map(str, sorted(out.glob("*.tar")))])
    assert "--index takes one pattern, not also" in capsys.readouterr().err
    assert not (out / "sizes.json").exists()


def test_index_takes_a_range_in_a_folder_whose_name_holds_a_bracket(tmp_path: Path, capsys) -> None:
    # '[' is a shell wildcard, but also a character of folder names ("laion[2b]"): the pattern make_shards printed
    # for such a folder, which the loader reads, was refused by --index as "not wildcards"
    out = tmp_path / "laion[2b]"
    make_shards_main()([str(write_manifest(tmp_path / "src", range(5))), str(out), "--samples-per-shard", "3"])
    (out / "sizes.json").unlink()
    assert make_shards_main()(["--index", str(out / "shard-{000000..000001}.tar")]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 2}
    with pytest.raises(SystemExit, match=r"takes \{000000..000099\} ranges, not wildcards$"):
        make_shards_main()(["--index", str(out / "shard-00000?.tar")])


def test_help_runs_as_a_script() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, str(SCRIPT), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "--samples-per-shard" in result.stdout


def test_bad_input_is_status_2_from_the_command(monkeypatch, capsys) -> None:
    # As clip-train and the evaluation commands do (it was 1, the status of a failure). The console script's
    # function, in this process: the script above only returns what it returns.
    from clip_commands import clip_make_shards

    monkeypatch.setattr(sys, "argv", ["clip-make-shards", "/nonexistent/captions.tsv", "out"])
    assert clip_make_shards() == 2
    assert capsys.readouterr().err == "clip-make-shards: /nonexistent/captions.tsv does not exist\n"


def test_an_output_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "out"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^clip-make-shards: .*File exists.*out"):  # it was FileExistsError's traceback
        make_shards_main()([str(write_manifest(tmp_path / "pairs", range(3))), str(taken)])
    assert taken.read_text() == "not a folder"


def test_shards_of_the_same_prefix_are_refused_or_replaced_with_overwrite(tmp_path: Path) -> None:
    # 7 samples in 4 shards, then 3 into the same folder: t-000002.tar and t-000003.tar would stay, and the
    # loader counts the samples of a shard sizes.json does not list, so training would read the old data.
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "first", range(7))
    second = write_manifest(tmp_path / "second", range(100, 103))
    assert make_shards_main()([str(first), str(out), "--prefix", "t", "--samples-per-shard", "2"]) == 0
    # Another prefix may share the folder, even one that starts like it; its sizes.json entries are kept.
    assert make_shards_main()([str(second), str(out), "--prefix", "t-b", "--samples-per-shard", "2"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    again = [str(second), str(out), "--prefix", "t", "--samples-per-shard", "2"]
    refused = r"^clip-make-shards: .* already holds 4 shards named t-NNNNNN\.tar \(t-000000\.tar \.\. t-000003\.tar\)"
    with pytest.raises(SystemExit, match=refused):
        make_shards_main()(again)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before

    assert make_shards_main()([*again, "--overwrite"]) == 0
    assert sorted(path.name for path in out.glob("*.tar")) == [
        "t-000000.tar", "t-000001.tar", "t-b-000000.tar", "t-b-000001.tar"
    ]
    assert json.loads((out / "sizes.json").read_text()) == {
        "t-000000.tar": 2, "t-000001.tar": 1, "t-b-000000.tar": 2, "t-b-000001.tar": 1
    }
    data = build([SourceConfig(kind="shards", path=str(out / "t-{000000..000001}.tar"))], batch_size=3)
    assert sorted(captions(take(data, 1))) == [caption_of(i) for i in range(100, 103)]
    data.close()


def test_a_shard_is_named_a_shard_only_once_complete(tmp_path: Path, monkeypatch) -> None:
    # A run killed mid-shard (SIGKILL, a lost node) must leave no torn PREFIX-NNNNNN.tar behind: --index and the
    # loader would take it for a shard. An earlier run's leftover partial file is removed.
    module = load_make_shards()
    manifest = write_manifest(tmp_path / "src", range(5), "train.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "t-000007.tar.partial").write_bytes(b"torn")
    seen = []
    real = module.encode_sample

    def looking(*args):
        seen.append(sorted(path.name for path in out.iterdir()))
        return real(*args)

    monkeypatch.setattr(module, "encode_sample", looking)
    assert module.main([str(manifest), str(out), "--prefix", "t", "--samples-per-shard", "2"]) == 0
    assert seen[0] == ["t-000000.tar.partial"]  # the leftover is gone; the shard being written is partial
    assert seen[3] == ["t-000000.tar", "t-000001.tar.partial"]
    assert sorted(path.name for path in out.iterdir()) == ["sizes.json", "t-000000.tar", "t-000001.tar", "t-000002.tar"]


def stopped_at_the_sixth_sample(monkeypatch, module, stop) -> None:
    """Calls `stop()` as the command encodes its sixth sample (five are written by then)."""
    real, calls = module.encode_sample, []

    def stopping(*args):
        calls.append(1)
        if len(calls) == 6:
            stop()
        return real(*args)

    monkeypatch.setattr(module, "encode_sample", stopping)


@pytest.mark.parametrize("stopped_by", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failing_run_keeps_its_finished_shards_and_no_torn_one(tmp_path: Path, capsys, monkeypatch,
                                                                               stopped_by):
    # Ctrl-C or an error inside the writer's block ran its close, which renamed the shard being written into
    # place: a torn PREFIX-NNNNNN.tar, without a sizes.json, that the loader read as data.
    module = load_make_shards()
    manifest = write_manifest(tmp_path / "src", range(7), "train.csv")
    out = tmp_path / "out"

    def stop():
        raise stopped_by("stopped")

    stopped_at_the_sixth_sample(monkeypatch, module, stop)
    with pytest.raises(stopped_by):
        module.main([str(manifest), str(out), "--prefix", "t", "--samples-per-shard", "2"])
    # samples 0-4 written: two finished shards, the third (1 of 2 samples) torn and removed
    assert sorted(path.name for path in out.iterdir()) == ["sizes.json", "t-000000.tar", "t-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"t-000000.tar": 2, "t-000001.tar": 2}
    assert "stopped after 5 samples; 2 finished shards of 2 kept" in capsys.readouterr().err
    train = build([SourceConfig(kind="shards", path=str(out / "t-{000000..000001}.tar"))], batch_size=4)
    assert sorted(captions(take(train, 1))) == [caption_of(i) for i in range(4)]


def test_a_sigterm_stops_it_as_a_ctrl_c_does_with_status_143(tmp_path: Path, capsys, monkeypatch) -> None:
    # A scheduler's SIGTERM (or docker stop) took the default action: status 143, no sizes.json for the finished
    # shards, no word, and the unfinished shard left as t-000002.tar.partial
    import os
    import signal

    module = load_make_shards()
    manifest = write_manifest(tmp_path / "src", range(7), "train.csv")
    out = tmp_path / "out"
    stopped_at_the_sixth_sample(monkeypatch, module, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert module.run([str(manifest), str(out), "--prefix", "t", "--samples-per-shard", "2"]) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(path.name for path in out.iterdir()) == ["sizes.json", "t-000000.tar", "t-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"t-000000.tar": 2, "t-000001.tar": 2}
    assert "stopped after 5 samples; 2 finished shards of 2 kept" in capsys.readouterr().err

def test_a_manifest_without_the_named_columns_leaves_no_empty_shard(tmp_path: Path) -> None:
    # The writer opens its first shard before the first row is read: the error renamed an empty shard into
    # place, and the corrected command was then refused ("already holds 1 shards").
    manifest = write_manifest(tmp_path / "src", range(3), "train.tsv")
    out = tmp_path / "out"
    main = make_shards_main()
    with pytest.raises(SystemExit, match=r"^clip-make-shards: .*no column 'text'.*--caption-column \(clip-retrieval, clip-make-shards\)\.$"):
        main([str(manifest), str(out), "--caption-column", "text"])  # one line, not a traceback
    assert not out.exists()  # nor an empty folder with a sizes.json of {}
    assert main([str(manifest), str(out)]) == 0


@pytest.mark.parametrize("mistake", ["wrong column", "image paths relative to another folder"])
def test_overwrite_keeps_the_old_shards_when_the_new_run_writes_nothing(tmp_path: Path, mistake: str) -> None:
    # --overwrite deleted the old shards and their sizes.json entries before the manifest was read: a typo in
    # --image-column, or a manifest whose every image path was wrong, left the folder with neither old shards
    # nor new ones
    module = load_make_shards()
    out = tmp_path / "out"
    assert module.main([str(write_manifest(tmp_path / "first", range(5))), str(out), "--samples-per-shard", "2"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    second = write_manifest(tmp_path / "second", range(100, 103))
    arguments = [str(second), str(out), "--overwrite"]
    if mistake == "wrong column":
        arguments += ["--image-column", "path"]
    else:
        second.rename(tmp_path / second.name)  # its relative paths now name files that are not there
        arguments[0] = str(tmp_path / second.name)
    said = ("no column 'path'" if mistake == "wrong column" else
            re.escape(f"; a manifest's image paths are read relative to its own folder, {tmp_path.resolve()}, or are absolute"))
    with pytest.raises(SystemExit, match=said):
        module.main(arguments)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before



def test_nothing_to_write_is_one_line_with_status_2(tmp_path: Path) -> None:
    # "wrote 0 samples" with status 0 read as done: a folder of broken images, or an empty manifest, went unnoticed
    # until a training run found no data
    module = load_make_shards()
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not an image")
    (photos / "a.txt").write_text("a caption")
    nothing_from = "^clip-make-shards: no sample of {} could be written"
    with pytest.raises(SystemExit, match=nothing_from.format(re.escape(str(photos))) + r" \(skipped 1: "):
        module.main([str(photos), str(tmp_path / "out")])
    assert module.run([str(photos), str(tmp_path / "out2")]) == 2
    # An image folder whose images are all links to files no longer there: missing files, but no manifest's paths
    # to read relative to anything, so no advice about them
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "b.jpg").symlink_to(tmp_path / "moved_away.jpg")
    (linked / "b.txt").write_text("a caption")
    with pytest.raises(SystemExit, match=nothing_from.format(re.escape(str(linked))) + r" \(skipped 1: missing_file "
                                         r"1 \(the first, [^)]*b\.jpg\)\)$"):
        module.main([str(linked), str(tmp_path / "out4")])
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    with pytest.raises(SystemExit, match=nothing_from.format(re.escape(str(empty))) + ": it holds none$"):
        module.main([str(empty), str(tmp_path / "out3")])


def test_an_input_that_does_not_exist_is_said_to_be_missing(tmp_path: Path, monkeypatch) -> None:
    # A mistyped manifest path read "captions.tsv is neither a manifest file nor a folder", of a name that plainly
    # is a manifest's: it did not say that nothing is there, nor where a relative path was looked for
    monkeypatch.chdir(tmp_path)
    module = load_make_shards()
    with pytest.raises(SystemExit, match=r"^clip-make-shards: captions\.tsv does not exist \(a relative path, read from "
                                         r"the folder the command runs in, .*\)$"):
        module.main(["captions.tsv", "out"])
    assert module.run(["captions.tsv", "out"]) == 2
    assert not (tmp_path / "out").exists()


def test_without_webdataset_it_ends_in_one_line_naming_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    # A wheel installed without the `shards` extra: clip-make-shards ended on MissingDependency's traceback
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` raises ImportError
    manifest = write_manifest(tmp_path / "src", range(2))
    index = ["--index", str(tmp_path / "out" / "shard-{000000..000000}.tar")]
    for argv in [[str(manifest), str(tmp_path / "out")], index]:
        assert clip.cli.make_shards.run(argv) == 1
        error = capsys.readouterr().err
        assert error.startswith("clip-make-shards: ") and error.count("\n") == 1 and "clip-pretrain[shards]" in error
        if argv is not index:  # it said "reading WebDataset shards needs", of a command that writes them
            assert "writing WebDataset shards needs" in error


def test_started_as_one_of_several_processes_it_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torchrun every process wrote the same shards over the others'
    manifest = write_manifest(tmp_path / "src", range(3), "train.csv")
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"^clip-make-shards: runs in one process, but was started as rank 1 of 2 "
                       r"\(torchrun\)"):
        make_shards_main()([str(manifest), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
