"""WebDataset shards: shard lists and size indexes, URL schemes (fsspec, pipe:), broken shards, and the
message when webdataset is not installed."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from test_data_helpers import build, caption_of, captions, take, write_shards

from clip.data import SourceConfig
from clip.data.shards import expand_shard_pattern, iterate_tar_samples, read_shard_range, shard_name, shard_sizes


def test_brace_patterns_and_shard_names() -> None:
    assert expand_shard_pattern("d/x-{00..02}.tar::e/y.tar") == ["d/x-00.tar", "d/x-01.tar", "d/x-02.tar", "e/y.tar"]
    assert expand_shard_pattern("simplecache::s3://b/{0..1}.tar::d/y.tar") == [
        "simplecache::s3://b/0.tar", "simplecache::s3://b/1.tar", "d/y.tar"
    ]
    with pytest.raises(ValueError, match="ends with the fsspec protocol"):
        expand_shard_pattern("d/y.tar::simplecache")
    assert expand_shard_pattern("first.tar::second.tar") == ["first.tar", "second.tar"]  # file names, not protocols
    # An IPv6 address's '::' is the address's (the URL was cut in two, and the run ended in urllib's traceback)
    assert expand_shard_pattern("http://[::1]:8000/s-{0..1}.tar::http://[fe80::2]/t[1].tar::u.tar") == [
        "http://[::1]:8000/s-0.tar", "http://[::1]:8000/s-1.tar", "http://[fe80::2]/t[1].tar", "u.tar"]
    assert shard_name("/data/x-00.tar") == "x-00.tar"
    assert shard_name("s3://bucket/dir/x-00.tar") == "x-00.tar"
    assert shard_name("pipe:aws s3 cp s3://bucket/x-07.tar -") == "x-07.tar"


def test_sizes_from_index_img2dataset_stats_counting_or_num_samples(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, 11, 4)
    urls = expand_shard_pattern(pattern)
    assert shard_sizes(urls).tolist() == [4, 4, 3]  # sizes.json
    (tmp_path / "sizes.json").unlink()
    assert shard_sizes(urls).tolist() == [4, 4, 3]  # counted from the local tars' headers
    (tmp_path / "s-000001_stats.json").write_text(json.dumps({"count": 9, "successes": 4}))
    assert shard_sizes(urls).tolist() == [4, 4, 3]  # img2dataset's stats for one shard, counting for the rest
    assert shard_sizes(urls, num_samples=10).tolist() == [4, 3, 3]  # num_samples wins, spread evenly
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"s-000000.tar": 4, "s-000001.tar": 4, "s-000002.tar": 3}))
    assert shard_sizes(urls, size_index=str(other)).tolist() == [4, 4, 3]
    with pytest.raises(FileNotFoundError):
        shard_sizes(urls, size_index=str(tmp_path / "nope.json"))


def test_a_missing_shard_without_a_count_or_a_malformed_index_is_named_as_such(tmp_path: Path) -> None:
    # Both read "no sample count for shard ...", whose advice (num_samples, --index) did not help; a malformed
    # sizes.json was ignored without a word, leaving every shard to be read for its count.
    pattern = write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard .*s-000002.tar does not exist: check the source's path"):
        shard_sizes(expand_shard_pattern(pattern.replace("000001}", "000002}")))  # one past the last
    with pytest.raises(FileNotFoundError, match=r"takes \{000000..000099\} ranges, not wildcards"):
        shard_sizes([str(tmp_path / "*.tar")])
    # '[' in a folder's name is no wildcard: a shard missing there is not said to be one
    (tmp_path / "laion[2b]").mkdir()
    with pytest.raises(FileNotFoundError, match=r"laion\[2b\]/s-000000.tar does not exist: check the source's path"):
        shard_sizes([str(tmp_path / "laion[2b]" / "s-000000.tar")])
    (tmp_path / "sizes.json").write_text('{"s-000000.tar": 4,')  # cut off
    with pytest.raises(ValueError, match=r"sizes.json is not a JSON object of shard file names and sample counts"):
        shard_sizes(expand_shard_pattern(pattern))
    (tmp_path / "sizes.json").write_text("[4, 4]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        shard_sizes(expand_shard_pattern(pattern))
    assert shard_sizes(expand_shard_pattern(pattern), num_samples=8).tolist() == [4, 4]  # num_samples wins, as ever


def test_a_folder_given_as_the_shard_path_is_named_as_one_with_the_range_to_write(tmp_path: Path) -> None:
    # An img2dataset output folder given as the path read "shard DIR/ does not exist", of a folder that does
    pattern = write_shards(tmp_path / "out", 12, 4, index=False)
    with pytest.raises(ValueError, match=re.escape(
            f"shard path {tmp_path / 'out'}/ is a folder, not a shard: name its shards, e.g. '{pattern}' for the 3 "
            "tar files from s-000000.tar to s-000002.tar in it")):
        shard_sizes([f"{tmp_path / 'out'}/"])
    assert shard_sizes(expand_shard_pattern(pattern)).tolist() == [4, 4, 4]  # the range it names is the shards
    # Numbered without padding, the names sort as text 1, 10, 2..9: the advice was '{1..9}', leaving 10.tar out
    (tmp_path / "plain").mkdir()
    for number in range(1, 11):
        shutil.copy(expand_shard_pattern(pattern)[0], tmp_path / "plain" / f"{number}.tar")
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'plain'}/{{1..10}}.tar' for the 10 tar files from "
                                                   "1.tar to 10.tar in it")):
        shard_sizes([str(tmp_path / "plain")])
    (tmp_path / "plain" / "5.tar").unlink()  # with a gap, a range would name a shard that is not there
    with pytest.raises(ValueError, match=r"name its shards \(9 tar file\(s\) in it, 1.tar to 10.tar\) as a"):
        shard_sizes([str(tmp_path / "plain")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is a folder, not a shard: it holds no .tar files"):
        shard_sizes([str(tmp_path / "empty")])


@pytest.mark.parametrize("count", ["true", "-4", "4.0", '"4"'])
def test_a_size_index_entry_that_is_not_a_sample_count_is_named(tmp_path: Path, count: str) -> None:
    # true and -4 passed for counts (true as 1); 4.0 and "4" were dropped without a word, leaving the shard
    # to be read for its count
    pattern = write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").write_text('{"s-000000.tar": 4, "s-000001.tar": %s}' % count)
    with pytest.raises(ValueError, match=r"sizes.json gives s-000001.tar the count .*, not a number of samples"):
        shard_sizes(expand_shard_pattern(pattern))
    assert shard_sizes(expand_shard_pattern(pattern), num_samples=8).tolist() == [4, 4]  # num_samples wins


def test_a_shard_that_cannot_be_counted_is_named_as_a_config_error(tmp_path: Path) -> None:
    # Without a size index an empty or cut-off shard raised tarfile's bare ReadError ("empty file"), which
    # named no shard and escaped the trainer's one-line report of bad input as a traceback.
    pattern = write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").unlink()
    urls = expand_shard_pattern(pattern)
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard .*s-000001.tar cannot be counted.*ReadError: empty file"):
        shard_sizes(urls)
    Path(urls[1]).write_bytes(whole[:700])  # cut inside its first member
    with pytest.raises(ValueError, match=r"shard .*s-000001.tar cannot be counted.*ReadError"):
        shard_sizes(urls)
    # Cut at a member boundary it reads as a whole tar of fewer samples, and was trained on as one
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        third_sample = [m.offset for m in tar.getmembers()][4]  # two members (image, caption) a sample
    Path(urls[1]).write_bytes(whole[:third_sample])
    with pytest.raises(ValueError, match=r"shard .*s-000001.tar is cut short \(it lacks a tar's closing zero blocks"):
        shard_sizes(urls)
    Path(urls[1]).write_bytes(whole)
    assert shard_sizes(urls).tolist() == [4, 4]


def test_a_size_index_that_cannot_be_read_is_not_called_malformed(tmp_path: Path, monkeypatch) -> None:
    # A permission error on sizes.json read "is not a JSON object ...: rewrite it"
    pattern = write_shards(tmp_path, 8, 4)
    real_read_bytes = Path.read_bytes

    def refused(path):
        if path.name == "sizes.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ValueError, match=r"the shard size index .*sizes.json cannot be read \(Permission denied\)"):
        shard_sizes(expand_shard_pattern(pattern))
    assert shard_sizes(expand_shard_pattern(pattern), num_samples=8).tolist() == [4, 4]  # num_samples wins


def test_a_remote_size_index_that_cannot_be_read_says_why(tmp_path: Path, monkeypatch) -> None:
    # An unreachable object store (botocore's EndpointConnectionError, no OSError) ended the start in a 190-line
    # traceback; a sizes.json there but forbidden, or not JSON, was taken for none: "write a sizes.json beside the
    # shards". curl's HTTP errors (status 22, a 404's among them) still count as no file.
    fsspec = pytest.importorskip("fsspec")
    import clip.data.shards as shards_module
    from clip.data.pipe_command import PipeCommandFailed

    write_shards(tmp_path, 8, 4)
    memory = fsspec.filesystem("memory")
    for path in tmp_path.iterdir():
        memory.pipe(f"/remote/{path.name}", path.read_bytes())
    urls = expand_shard_pattern("memory://remote/s-{000000..000001}.tar")
    assert shard_sizes(urls).tolist() == [4, 4]
    real_open_url = shards_module.open_url

    class EndpointConnectionError(Exception):  # as botocore's: not an OSError
        pass

    for failure, said in [
        (EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:5999/b"'),
         re.escape('(EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:5999/b")')),
        (PermissionError(13, "Forbidden"), r"\(PermissionError: \[Errno 13\] Forbidden\)"),
        (PipeCommandFailed("curl reading ... exited with status 7", 7), r"\(curl reading ... exited with status 7\)"),
    ]:
        def failing(url, failure=failure):
            if url.endswith("sizes.json"):
                raise failure
            return real_open_url(url)

        monkeypatch.setattr(shards_module, "open_url", failing)
        if isinstance(failure, PermissionError):
            # S3's answer for a missing object where the credentials cannot list the bucket: no index (img2dataset's
            # stats may count), named where no count is found
            with pytest.raises(ValueError, match=r"^no sample count for shard .*; the shard size index memory://remote/"
                                                 r"sizes.json cannot be read " + said + ", an object store's answer"):
                shard_sizes(urls)
            for name in ("s-000000", "s-000001"):
                memory.pipe(f"/remote/{name}_stats.json", json.dumps({"successes": 4}).encode())
            assert shard_sizes(urls).tolist() == [4, 4]
            for name in ("s-000000", "s-000001"):
                memory.rm(f"/remote/{name}_stats.json")
        else:
            with pytest.raises(ValueError, match=r"^the shard size index memory://remote/sizes.json cannot be read "
                                                 + said):
                shard_sizes(urls)
        assert shard_sizes(urls, num_samples=8).tolist() == [4, 4]  # num_samples wins, as for a local index
        with pytest.raises(FileNotFoundError, match=r"^cannot read the shard size index memory://remote/sizes.json "
                                                    + said):
            shard_sizes(urls, size_index="memory://remote/sizes.json")
    monkeypatch.setattr(shards_module, "open_url", real_open_url)
    memory.pipe("/remote/sizes.json", b"<html>Forbidden</html>")
    with pytest.raises(ValueError, match=r"^the shard size index memory://remote/sizes.json cannot be read \(not JSON"):
        shard_sizes(urls)
    memory.rm("/remote/sizes.json")

    def http_error(url):
        if url.endswith("sizes.json"):
            raise PipeCommandFailed("curl reading ... exited with status 22", 22)
        return real_open_url(url)

    monkeypatch.setattr(shards_module, "open_url", http_error)
    with pytest.raises(ValueError, match="no sample count") as caught:  # as a missing one
        shard_sizes(urls)
    assert "cannot be read" not in str(caught.value)
    assert shard_sizes(urls, num_samples=8).tolist() == [4, 4]


def test_a_remote_folder_without_a_size_index_takes_its_counts_from_img2dataset_stats(tmp_path: Path) -> None:
    # A missing remote sizes.json is no index, as a missing local one is: not one that "cannot be read"
    fsspec = pytest.importorskip("fsspec")

    write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").unlink()
    memory = fsspec.filesystem("memory")
    folder = f"/without-index-{tmp_path.name}"
    for path in tmp_path.iterdir():
        memory.pipe(f"{folder}/{path.name}", path.read_bytes())
    for name, successes in (("s-000000", 3), ("s-000001", 2)):  # not the tars' own 4: the counts are the stats'
        memory.pipe(f"{folder}/{name}_stats.json", json.dumps({"successes": successes}).encode())
    try:
        assert shard_sizes(expand_shard_pattern(f"memory:/{folder}/s-{{000000..000001}}.tar")).tolist() == [3, 2]
    finally:
        memory.rm(folder, recursive=True)


def test_a_remote_size_index_whose_reader_is_not_installed_says_so(monkeypatch) -> None:
    # Its package's refusal ("Install s3fs") was read as an index there but unreadable
    import clip.data.shards as shards_module
    from clip.dependencies import MissingDependency

    def not_installed(url):
        raise MissingDependency("its s3:// URLs are read through fsspec, which needs s3fs: Install s3fs")

    monkeypatch.setattr(shards_module, "open_url", not_installed)
    urls = ["s3://bucket/s-000000.tar", "s3://bucket/s-000001.tar"]
    with pytest.raises(MissingDependency, match="Install s3fs"):
        shard_sizes(urls)
    with pytest.raises(MissingDependency, match="Install s3fs"):
        shard_sizes(urls, size_index="s3://bucket/sizes.json")


def test_a_shard_that_cannot_be_opened_is_not_called_damaged(tmp_path: Path, monkeypatch) -> None:
    # A permission or an I/O error read "not a readable tar file ...: rewrite or remove it", of a good shard
    import clip.data.shards as shards_module

    pattern = write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").unlink()

    def refused(url, *args, **kwargs):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(shards_module, "open_url", refused)
    with pytest.raises(ValueError, match=r"shard .*s-000000.tar cannot be read to count its samples "
                                         r"\(PermissionError: .*Permission denied") as raised:
        shard_sizes(expand_shard_pattern(pattern))
    assert "rewrite or remove" not in str(raised.value)


def test_shards_that_hold_no_sample_are_an_error_naming_the_source(tmp_path: Path) -> None:
    # Beside another source such shards (a size index of zeros: img2dataset's stats after a failed download)
    # were never read, and nothing was said; alone, the planner's error blamed the number of workers.
    from test_data_helpers import write_manifest

    good = write_manifest(tmp_path / "good", range(8))
    folder = tmp_path / "empty"
    folder.mkdir()
    for shard in range(2):
        tarfile.open(folder / f"e-{shard:06d}.tar", "w").close()
    (folder / "sizes.json").write_text(json.dumps({"e-000000.tar": 0, "e-000001.tar": 0}))
    empty = SourceConfig(kind="shards", path=str(folder / "e-{000000..000001}.tar"))
    with pytest.raises(ValueError, match=r"data source 1:shards: the 2 shard\(s\) of .* hold no samples"):
        build([SourceConfig(kind="manifest", path=str(good)), empty])
    (folder / "sizes.json").unlink()  # counted: the same
    with pytest.raises(ValueError, match=r"data source 0:shards: .* hold no samples"):
        build([empty])


def test_num_samples_that_disagrees_with_the_size_index_is_warned_about(tmp_path: Path, caplog) -> None:
    urls = expand_shard_pattern(write_shards(tmp_path, 11, 4))
    with caplog.at_level("WARNING", logger="clip.data.shards"):
        assert shard_sizes(urls, num_samples=11).tolist() == [4, 4, 3]
        assert not caplog.records  # agrees with sizes.json
        assert shard_sizes(urls, num_samples=100_000).tolist() == [33334, 33333, 33333]
    assert "num_samples=100000" in caplog.text and "says 11 samples" in caplog.text


def test_read_range_skips_unread_and_pads_missing_samples(tmp_path: Path) -> None:
    url = expand_shard_pattern(write_shards(tmp_path, 6, 6))[0]
    samples = list(read_shard_range(url, 2, 3))
    assert [s["txt"].decode() for s in samples] == [caption_of(i) for i in (2, 3, 4)]
    assert set(samples[0]) >= {"__key__", "__url__", "jpg", "txt", "json"}
    too_far = list(read_shard_range(url, 4, 4))  # the index claims more than the shard has
    assert [getattr(s, "kind", "ok") for s in too_far] == ["ok", "ok", "shard_too_short", "shard_too_short"]
    missing = list(read_shard_range(str(tmp_path / "nope.tar"), 0, 2))
    assert [s.kind for s in missing] == ["missing_shard", "missing_shard"]


def truncate_inside_sample(path: Path, sample: int) -> None:
    """Cut the tar in the middle of the first member of the `sample`-th sample."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[3 * sample]  # three members per sample
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])


def test_broken_shards_are_counted_and_the_epoch_goes_on(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, 20, 5)  # 4 shards of 5
    (tmp_path / "s-000001.tar").unlink()  # 5 missing_shard
    truncate_inside_sample(tmp_path / "s-000002.tar", 3)  # samples 10-12 read, 2 shard_read_error
    with tarfile.open(tmp_path / "s-000003.tar") as tar:  # sample 15 without image, 16 without caption
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "s-000003.tar", "w") as tar:
        for member, data in members:
            if member.name not in ("000000015.png", "000000016.txt"):
                tar.addfile(member, io.BytesIO(data))
    source = SourceConfig(kind="shards", path=pattern, name="s")
    # 5 + 3 + 3 = 11 usable samples: one batch of 11 is one epoch, counts exact if it ends on a usable one.
    for seed in range(40):
        data = build([source], batch_size=11, workers=1, seed=seed)
        seen = captions(take(data, 1))
        if data.state_dict()["positions"] == [[1, 0]]:
            break
        data.close()
    else:
        pytest.fail("no seed ends the epoch on a usable sample")
    assert Counter(seen) == Counter(caption_of(i) for i in [0, 1, 2, 3, 4, 10, 11, 12, 17, 18, 19])
    assert data.stats()["sources"]["s"]["skipped"] == {
        "missing_shard": 5, "shard_read_error": 2, "missing_image": 1, "missing_caption": 1
    }
    data.close()


def test_fsspec_urls(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    write_shards(tmp_path, 9, 4)
    memory = fsspec.filesystem("memory")
    for path in tmp_path.iterdir():
        memory.pipe(f"/shards/{path.name}", path.read_bytes())
    for path in ("memory://shards/s-{000000..000002}.tar", "simplecache::memory://shards/s-{000000..000002}.tar"):
        data = build([SourceConfig(kind="shards", path=path)], batch_size=9)  # the second: a chained URL
        assert data.samples_per_epoch == 9  # sizes.json read through fsspec too
        assert sorted(captions(take(data, 1))) == [caption_of(i) for i in range(9)]
        data.close()


@pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat")
def test_pipe_urls(tmp_path: Path) -> None:
    write_shards(tmp_path, 8, 4)
    source = SourceConfig(
        kind="shards", path=f"pipe:cat {shlex.quote(str(tmp_path))}/s-{{000000..000001}}.tar",
        size_index=str(tmp_path / "sizes.json"),
    )
    data = build([source], batch_size=4, workers=2)
    assert sorted(captions(take(data, 2))) == [caption_of(i) for i in range(8)]
    data.close()


@pytest.mark.skipif(shutil.which("cat") is None or sys.platform == "win32", reason="needs cat and a POSIX shell")
@pytest.mark.parametrize("signal_name", ["TERM", "INT", "USR1"])
def test_a_pipe_command_outlives_the_job_signal(tmp_path: Path, signal_name: str) -> None:
    # SLURM signals every process of the job and Ctrl-C the terminal's process group: the trainer saves at the
    # next step boundary, but the pipe: command died of the signal, and the rest of its shard was counted as
    # shard_read_error, went into that step's batch and the checkpoint's position, and was never trained on.
    url = expand_shard_pattern(write_shards(tmp_path, 4, 4))[0]
    samples = list(read_shard_range(f"pipe:kill -{signal_name} $$; cat {shlex.quote(url)}", 0, 4))
    assert [getattr(s, "kind", s.get("txt")) for s in samples] == [caption_of(i).encode() for i in range(4)]


def test_missing_webdataset_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = write_shards(tmp_path, 4, 4)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` fail
    with pytest.raises(ImportError, match="^reading WebDataset shards needs .*pip install webdataset"):
        build([SourceConfig(kind="shards", path=pattern)])


def test_a_missing_shard_never_stops_a_run_with_many_slots(tmp_path: Path) -> None:
    # 64 slots (ranks here) share 4000 samples: 62 or 63 each per epoch, far fewer than the 400 of one shard.
    # Over epochs some slot meets the missing shard's samples for much longer than two of its own epochs;
    # that is still one missing shard, to be counted, not a reason to stop.
    pattern = write_shards(tmp_path, 4000, 400)
    (tmp_path / "s-000003.tar").unlink()
    source = SourceConfig(kind="shards", path=pattern, name="s")
    for rank in range(64):
        data = build([source], batch_size=8, rank=rank, world_size=64)
        longest = run = 0
        for epoch in range(40):
            for shard, start, stop in data.planner.plan(epoch, rank, 0).segments[0]:
                run = run + stop - start if shard == 3 else 0
                longest = max(longest, run)
        if longest > 2 * 63 + 100:
            break
    else:
        pytest.fail("no slot meets a long run of the missing shard; change the test's layout")
    batches = take(data, 40 * 63 // 8)
    assert len(batches) == 40 * 63 // 8
    assert data.stats()["sources"]["s"]["skipped"]["missing_shard"] >= longest



def test_a_missing_shard_longer_than_a_low_weight_sources_epochs_is_skipped_not_fatal(tmp_path: Path) -> None:
    # Weight 0.1 of 1100 samples reads 110 an epoch, but the missing shard holds 1000 in a row: about nine
    # epochs of nothing but skips, which is still one missing shard (the limit is two of the largest shard,
    # plus 100), not data that cannot be used
    write_shards(tmp_path, 100, 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 100, "s-000001.tar": 1000}))
    source = SourceConfig(kind="shards", path=str(tmp_path / "s-{000000..000001}.tar"), name="s", weight=0.1)
    data = build([source], batch_size=10)
    assert len(take(data, 15)) == 15  # 150 samples: more than the good shard's 100, so past the missing one
    assert data.stats()["sources"]["s"]["skipped"]["missing_shard"] >= 1000
    data.close()

def test_data_with_no_usable_sample_stops_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "only.tar").write_bytes(b"not a tar at all" * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"only.tar": 20}))
    data = build([SourceConfig(kind="shards", path=str(tmp_path / "only.tar"), name="broken")], batch_size=4)
    with pytest.raises(RuntimeError, match="none of the first 141 samples could be used"):
        take(data, 1)
    # Shards that are all missing (a wrong path, with a size index from elsewhere): said after ten shards'
    # worth of failures, not after two passes over the data (4100 failures).
    pattern = write_shards(tmp_path / "gone", 2000, 10)
    for shard in (tmp_path / "gone").glob("*.tar"):
        shard.unlink()
    data = build([SourceConfig(kind="shards", path=pattern)])
    with pytest.raises(RuntimeError, match=r"none of the first 1101 samples could be used \(missing_shard 1101\) -- "
                                           "check the shard path pattern"):
        take(data, 1)


def test_shards_of_the_same_name_in_two_folders_get_their_own_counts(tmp_path: Path) -> None:
    a = write_shards(tmp_path / "a", 4, 4)
    b = write_shards(tmp_path / "b", 6, 6)
    assert shard_sizes(expand_shard_pattern(f"{a}::{b}")).tolist() == [4, 6]
    data = build([SourceConfig(kind="shards", path=f"{a}::{b}")], batch_size=5)
    assert data.samples_per_epoch == 10
    data.close()


def test_counts_from_img2dataset_stats_and_an_index_keyed_by_url_need_no_readable_shard(tmp_path: Path) -> None:
    # Neither source of counts opens the tar: the shards here do not exist yet (on a remote store, say)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "00000_stats.json").write_text(json.dumps({"count": 9, "successes": 7}))
    assert shard_sizes([str(tmp_path / "a" / "00000.tar")]).tolist() == [7]
    # One index for two folders' shards of the same name: keyed by the URLs as written
    urls = [str(tmp_path / "b" / "0.tar"), str(tmp_path / "c" / "0.tar")]
    index = tmp_path / "index.json"
    index.write_text(json.dumps({urls[0]: 5, urls[1]: 8}))
    assert shard_sizes(urls, size_index=str(index)).tolist() == [5, 8]
    # Stats without a number of successes (a run that failed before writing it) give no count: the tar is counted
    pattern = write_shards(tmp_path / "d", 3, 3)
    (tmp_path / "d" / "sizes.json").unlink()
    (tmp_path / "d" / "s-000000_stats.json").write_text(json.dumps({"count": 3}))
    assert shard_sizes(expand_shard_pattern(pattern)).tolist() == [3]


def test_a_windows_path_is_local_and_named_by_its_file_name() -> None:
    # "C:" is a drive letter, not a URL scheme
    assert shard_name(r"C:\shards\00001.tar") == "00001.tar"
    assert shard_name("C:/shards/00002.tar") == "00002.tar"


def test_a_member_without_an_extension_is_no_sample_when_counting_or_skipping(tmp_path: Path) -> None:
    # A README or LICENSE file put into a shard by hand is no sample: it neither adds to the shard's count nor
    # takes the place of one skipped on the way to a range's start
    from clip.data.shards import count_tar_samples

    path = tmp_path / "with-readme.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", b"1"), ("a.txt", b"one"), ("README", b"notes"), ("b.jpg", b"2"), ("b.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_tar_samples(str(path)) == 2
    assert [sample["txt"] for sample in read_shard_range(str(path), 1, 1)] == [b"two"]


def test_a_shard_longer_than_its_index_is_reported(tmp_path: Path, caplog) -> None:
    pattern = write_shards(tmp_path, 8, 4)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 3, "s-000001.tar": 4}))  # stale: 3 for 4
    data = build([SourceConfig(kind="shards", path=pattern, name="stale")], batch_size=7)
    with caplog.at_level("WARNING", logger="clip.data.sources"):
        assert len(captions(take(data, 1))) == 7
    assert "s-000000.tar holds more samples than its size index (or num_samples) says" in caplog.text
    assert "s-000001.tar" not in caplog.text
    data.close()


def test_many_longer_shards_are_named_a_few_times_then_summed_up(tmp_path: Path, caplog) -> None:
    from clip.data.sources import LONGER_SHARDS_NAMED

    shards = LONGER_SHARDS_NAMED + 3
    pattern = write_shards(tmp_path, 3 * shards, 3)
    (tmp_path / "sizes.json").write_text(json.dumps({f"s-{i:06d}.tar": 2 for i in range(shards)}))  # 2 of 3 each
    data = build([SourceConfig(kind="shards", path=pattern, name="short")], batch_size=2)
    with caplog.at_level("WARNING", logger="clip.data.sources"):
        assert len(take(data, shards)) == shards  # one epoch: every shard's planned samples
    assert caplog.text.count("holds more samples than") == LONGER_SHARDS_NAMED
    assert caplog.text.count("not naming them any more") == 1
    data.close()


def test_pipe_shard_names_keep_a_tar_gz_suffix() -> None:
    assert shard_name("pipe:cat /data/x-000.tar.gz") == "x-000.tar.gz"


def test_a_hung_shard_read_stops_with_a_clear_error_after_the_worker_timeout(tmp_path: Path) -> None:
    source = SourceConfig(kind="shards", path="pipe:sleep 60 && cat never.tar", num_samples=4, name="hung")
    data = build([source], batch_size=2, workers=1, worker_timeout_s=1.0)
    with pytest.raises(RuntimeError, match="no batch from the data workers in data.worker_timeout_s=1 s"):
        take(data, 1)
    data.close()


def test_a_shard_cut_inside_its_last_sample_is_not_called_longer(tmp_path: Path) -> None:
    url = expand_shard_pattern(write_shards(tmp_path, 3, 3))[0]
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: data.rindex(b"000000002.json") + 512 + 2])  # inside sample 2's last member
    calls: list[str] = []
    items = list(read_shard_range(url, 0, 3, on_longer=calls.append))
    assert [sorted(k for k in item if not k.startswith("__")) for item in items][2] == ["jpg", "txt"]
    assert len(items) == 3 and calls == []  # the read error after the last planned sample is not "more samples"


def test_captions_from_a_field_of_the_json_member(tmp_path: Path) -> None:
    # caption_column = "json" fed the whole metadata text ('{"key": ..., "caption": ...}') as the caption;
    # shards whose captions are in the .json only (no .txt) could not be used at all.
    from test_data_helpers import _add_member, image_bytes

    (tmp_path / "json_only").mkdir()
    with tarfile.open(tmp_path / "json_only" / "s-000000.tar", "w") as tar:
        for i in range(4):
            _add_member(tar, f"{i:09d}.jpg", image_bytes(i, "JPEG"))
            metadata = {"key": f"{i:09d}", "caption": caption_of(i), "title": f"title {i}", "status": "success"}
            _add_member(tar, f"{i:09d}.json", json.dumps(metadata).encode())
    pattern = str(tmp_path / "json_only" / "s-{000000..000000}.tar")
    for caption_column, expected in [("caption", caption_of), ("json", caption_of), ("json:title", "title {}".format)]:
        batch = take(build([SourceConfig(kind="shards", path=pattern, caption_column=caption_column)]), 1)
        assert sorted(captions(batch)) == sorted(expected(i) for i in range(4)), caption_column
    # The .txt keeps precedence where there is one; "json" asks for the .json's field
    both = write_shards(tmp_path / "both", 4, 4)  # .txt "sample 0000i", .json {"i": i} (no caption field)
    from_txt = take(build([SourceConfig(kind="shards", path=both)]), 1)
    assert sorted(captions(from_txt)) == [caption_of(i) for i in range(4)]
    data = build([SourceConfig(kind="shards", path=both, caption_column="json")], batch_size=2)
    with pytest.raises(RuntimeError, match="no text 'caption' in its json"):
        take(data, 1)
    from clip.data.decoding import SkipSample
    from clip.data.sources import json_field

    with pytest.raises(SkipSample, match="bad_utf8"):  # as a .txt caption that is not UTF-8
        json_field(b'{"caption": "caf\xe9"}', "caption")
    # Half a surrogate pair escaped: as a manifest's invalid text, not a caption trained with U+FFFD in it
    with pytest.raises(SkipSample, match="bad_utf8"):
        json_field(b'{"caption": "a \\ud800 cat"}', "caption")
    assert json_field(b'{"caption": "a \\ud83d\\ude00 cat"}', "caption") == "a \U0001f600 cat"  # a whole pair
    # Nested deeper than json's recursive parser goes: no caption, not a RecursionError that ends the run
    assert json_field(b"[" * 50_000, "caption") is None


def test_a_repeated_member_name_keeps_the_first_and_loses_no_other_sample(tmp_path: Path, caplog) -> None:
    # webdataset's grouping raised on it, which ended the shard there: 5 of 20 samples read, 15 counted as
    # unreadable. The first member of the name is used, with a warning.
    from test_data_helpers import _add_member, image_bytes

    with tarfile.open(tmp_path / "s-000000.tar", "w") as tar:
        for i in range(20):
            _add_member(tar, f"{i:09d}.jpg", image_bytes(i, "JPEG"))
            if i == 5:
                _add_member(tar, f"{i:09d}.JPG", image_bytes(99, "JPEG"))  # the same member name, lower-cased
            _add_member(tar, f"{i:09d}.txt", caption_of(i).encode())
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 20}))
    data = build([SourceConfig(kind="shards", path=str(tmp_path / "s-000000.tar"), name="s")], batch_size=20)
    with caplog.at_level("WARNING", logger="clip.data"):
        assert sorted(captions(take(data, 3))) == sorted(caption_of(i) for i in range(20) for _ in range(3))
    warnings = [r.getMessage() for r in caplog.records if "duplicate file name" in r.getMessage()]
    assert len(warnings) == 1 and "the first member of that name is used" in warnings[0]  # once per shard
    assert data.stats()["sources"]["s"]["skipped"] == {}
    first = next(s for s in iterate_tar_samples(str(tmp_path / "s-000000.tar")) if s["__key__"] == f"{5:09d}")
    assert first["jpg"] == image_bytes(5, "JPEG")  # the first member of the name, not the repeat


@pytest.fixture
def protocol_without_its_package(monkeypatch: pytest.MonkeyPatch) -> str:
    """An fsspec protocol whose backend package is missing, as s3:// is without s3fs."""
    registry = pytest.importorskip("fsspec.registry")
    monkeypatch.setitem(registry.known_implementations, "nobackend",
                        {"class": "no_such_backend_package.FileSystem", "err": "Install no_such_backend_package"})
    return "nobackend"


@pytest.mark.parametrize("path", ["{p}://bucket/{{0..3}}.tar", "simplecache::{p}://bucket/{{0..3}}.tar"],
                         ids=["url", "chained"])
def test_shards_whose_protocol_lacks_its_package_are_refused_before_a_run(protocol_without_its_package, path):
    # fsspec's "Install s3fs to access S3" came from the first shard opened, with a traceback through the
    # data's set-up, after the model was built
    from clip.dependencies import MissingDependency
    from clip.data.shards import require_shard_readers

    shards = SourceConfig(kind="shards", path=path.format(p=protocol_without_its_package))
    with pytest.raises(MissingDependency, match=r"sources\[1\].path .*nobackend://.*Install no_such_backend_pack"):
        require_shard_readers([SourceConfig(kind="synthetic"), shards])


def test_shards_every_reader_can_open_pass_the_check(tmp_path: Path) -> None:
    from clip.data.shards import require_shard_readers

    require_shard_readers([
        SourceConfig(kind="shards", path=write_shards(tmp_path, 4, 4)),
        SourceConfig(kind="shards", path="pipe:cat /data/{0..3}.tar"),
        SourceConfig(kind="shards", path="file:///data/{0..3}.tar"),
        SourceConfig(kind="shards", path="memory://bucket/{0..3}.tar"),  # fsspec's own, no package needed
        SourceConfig(kind="shards", path="unknownproto://bucket/{0..3}.tar"),  # refused when opened, as bad input
    ])


@pytest.fixture
def http_without_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's http(s) protocols without their package (aiohttp), which no extra of this package installs."""
    registry = pytest.importorskip("fsspec.registry")
    for scheme in ("http", "https"):
        monkeypatch.setitem(registry.known_implementations, scheme,
                            {"class": "no_such_backend_package.HTTPFileSystem",
                             "err": "Install no_such_backend_package"})


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch):
    """A local HTTP server of tmp_path/"served" (yields its base URL), noting each path asked for in
    tmp_path/"requested"; a file named cut-*.tar is sent with its whole length announced and the connection closed
    after its first 6 KB, as a dropped connection ends. Proxies from the environment are unset: curl would send
    the requests to them."""
    import http.server

    from loopback_server import serving, without_proxies

    without_proxies(monkeypatch)

    folder = tmp_path / "served"
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            with open(tmp_path / "requested", "a") as log:  # each path asked for, as the server received it
                log.write(self.path + "\n")
            path = folder / self.path.split("?")[0].lstrip("/")
            if not path.name.startswith("cut-") or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:6 * 1024])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        yield url


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_an_ipv6_hosts_shards_are_read_with_curl_too(http_without_aiohttp) -> None:
    # Its '::' was taken for a chained fsspec URL, which curl cannot read: "needs aiohttp (or the curl command)"
    from clip.data.shards import _remote_reader

    assert _remote_reader("http://[::1]:8000/s-000000.tar") == "curl"
    assert _remote_reader("http://[fe80::2]/a.tar") == "curl"
    assert _remote_reader("simplecache::http://[::1]:8000/s-000000.tar") != "curl"  # fsspec's chain


@pytest.mark.skipif(shutil.which("curl") is None or sys.platform == "win32", reason="needs curl and a POSIX shell")
def test_http_shards_without_fsspecs_package_are_read_with_curl(http_without_aiohttp, http_server, tmp_path) -> None:
    # torch requires fsspec, so every http:// shard went to fsspec, and without aiohttp failed at the first one.
    # curl runs as a pipe: command of the library's own: webdataset's gopen, which ran it before, dropped what had
    # arrived when curl failed (the samples read from a dropped connection varied from run to run) and left a
    # stalled curl running past its worker
    import clip.data.shards as shards
    from clip.data.shards import MissingSample

    write_shards(tmp_path / "served", 12, 4)  # s-000000.tar .. s-000002.tar, a sample each ~1.5 KB
    shards.require_shard_readers([SourceConfig(kind="shards", path=f"{http_server}/s-{{000000..000002}}.tar")])
    source = SourceConfig(kind="shards", path=f"{http_server}/s-{{000000..000002}}.tar")
    data = build([source], batch_size=4, workers=1)
    assert sorted(captions(take(data, 3))) == sorted(caption_of(i) for i in range(12))
    data.close()
    # a missing shard: curl's status said with what it means, in place of the tar's "empty file"
    (missing,) = read_shard_range(f"{http_server}/s-000009.tar", 0, 1)
    assert isinstance(missing, MissingSample) and missing.kind == "shard_read_error"
    assert missing.detail.startswith(f"PipeCommandFailed: curl reading {http_server}/s-000009.tar exited with status "
                                     "22 (the server answered with an HTTP error status, 404 for a missing shard)")
    # a signed URL's query is the URL's, not the shell's (& would end the command there)
    signed = f"{http_server}/s-000000.tar?expires=1&signature=a$b;c"
    assert [sample["__key__"] for sample in iterate_tar_samples(signed)] == [f"{i:09d}" for i in range(4)]
    assert (tmp_path / "requested").read_text().splitlines()[-1] == "/s-000000.tar?expires=1&signature=a$b;c"
    # brackets and braces are the URL's own characters (curl globbed "[1]" into "1")
    shutil.copy(tmp_path / "served" / "s-000000.tar", tmp_path / "served" / "odd[1]{x}.tar")
    assert [item["__key__"] for item in read_shard_range(f"{http_server}/odd[1]{{x}}.tar", 0, 4)] == [
        f"{i:09d}" for i in range(4)]
    # a connection dropped mid-shard: every sample whole before the cut, as the same bytes read from a file give
    shutil.copy(tmp_path / "served" / "s-000001.tar", tmp_path / "served" / "cut-000001.tar")
    (tmp_path / "cut.tar").write_bytes((tmp_path / "served" / "s-000001.tar").read_bytes()[:6 * 1024])
    arrived = [item["__key__"] for item in read_shard_range(str(tmp_path / "cut.tar"), 0, 4)
               if not isinstance(item, MissingSample)]
    assert len(arrived) >= 2
    for _ in range(3):
        items = list(read_shard_range(f"{http_server}/cut-000001.tar", 0, 4))
        assert [item["__key__"] for item in items if not isinstance(item, MissingSample)] == arrived
        assert "exited with status 18 (the transfer ended early)" in items[-1].detail


def test_http_shards_with_neither_fsspecs_package_nor_curl_are_refused(http_without_aiohttp, monkeypatch) -> None:
    import clip.data.shards as shards
    from clip.dependencies import MissingDependency

    monkeypatch.setattr(shards.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependency, match=r"https:// URLs .*Install no_such_backend_package \(or the curl comm"):
        shards.require_shard_readers([SourceConfig(kind="shards", path="https://host/data/{0..3}.tar")])
    with pytest.raises(MissingDependency, match="Install no_such_backend_package"):
        shards.open_url("https://host/data/0.tar")


def test_a_shard_range_without_the_shards_padding_names_a_shard_that_exists(tmp_path: Path) -> None:
    # cc-{0..3}.tar for shards cc-000000.tar ...: a plain "does not exist" said nothing of the padding
    write_shards(tmp_path, 8, 2, index=False)
    with pytest.raises(FileNotFoundError, match=r"s-0.tar does not exist \(s-000000.tar does: write the pattern's "
                                                r"range padded as its names are, such as \{000000..000099\}\)"):
        build([SourceConfig(kind="shards", path=str(tmp_path / "s-{0..3}.tar"))])



def test_a_member_too_large_for_a_sample_is_skipped_unread(tmp_path: Path, caplog) -> None:
    # A .tar.gz of a few hundred KB holding a 257 MB caption of zeros: the reader held it whole (twice, in the
    # worker's decode), so a shard far smaller than any image made each data worker allocate half a gigabyte
    import gzip
    import tracemalloc

    from test_data_helpers import _add_member, image_bytes

    from clip.data.shards import MAX_SAMPLE_BYTES

    class Zeros(io.RawIOBase):
        def __init__(self, size: int) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            count = min(len(buffer), self.left)
            buffer[:count] = bytes(count)
            self.left -= count
            return count

    path = tmp_path / "bomb-000000.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as compressed, tarfile.open(fileobj=compressed, mode="w") as tar:
        _add_member(tar, "000000000.jpg", image_bytes(0, "JPEG"))
        caption = tarfile.TarInfo("000000000.txt")
        caption.size = MAX_SAMPLE_BYTES + (1 << 20)
        tar.addfile(caption, io.BufferedReader(Zeros(caption.size), 1 << 20))
        _add_member(tar, "000000001.jpg", image_bytes(1, "JPEG"))
        _add_member(tar, "000000001.txt", caption_of(1).encode())
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with caplog.at_level("WARNING", logger="clip.data.shards"):
            samples = list(iterate_tar_samples(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    assert [sorted(key for key in sample if not key.startswith("__")) for sample in samples] == [["jpg"], ["jpg", "txt"]]
    taken = len(image_bytes(0, "JPEG"))
    assert (f"member 000000000.txt declares {MAX_SAMPLE_BYTES + (1 << 20)} bytes, more than its sample's members may "
            f"take together ({MAX_SAMPLE_BYTES}, {taken} taken): skipped unread") in caplog.text


def test_only_a_samples_regular_members_are_read(tmp_path: Path) -> None:
    # As webdataset's reader: a folder entry (a dotted name reads as a key and an extension), a link, and the
    # shard's own metadata (`__meta__/...`, `__index__`) are not members of any sample
    from test_data_helpers import _add_member

    path = tmp_path / "s-000000.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("a.d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("a.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
        _add_member(tar, "__meta__/0.json", b"{}")
        _add_member(tar, "__index__", b"x")
        _add_member(tar, "a.txt", b"caption")
    samples = list(iterate_tar_samples(str(path)))
    assert [{k: v for k, v in sample.items() if not k.startswith("__")} for sample in samples] == [{"txt": b"caption"}]


def test_a_samples_members_together_are_capped_not_each_alone(tmp_path: Path, monkeypatch, caplog) -> None:
    # Four 200 MB members of one sample in an 815 KB .tar.gz each passed a cap per member: a gigabyte held
    import clip.data.shards as shards_module
    from test_data_helpers import _add_member

    monkeypatch.setattr(shards_module, "MAX_SAMPLE_BYTES", 250)
    path = tmp_path / "s-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.txt", "a.json", "b.txt", "b.json"):
            _add_member(tar, name, bytes(100))
    with caplog.at_level("WARNING", logger="clip.data.shards"):
        samples = list(iterate_tar_samples(str(path)))
    assert [sorted(k for k in sample if not k.startswith("__")) for sample in samples] == [["jpg", "txt"],
                                                                                          ["json", "txt"]]
    assert "member a.json declares 100 bytes, more than its sample's members may take together (250, 200 taken)" \
        in caplog.text

def test_a_member_header_declaring_more_bytes_than_follow_is_a_read_error_not_a_hang(tmp_path: Path) -> None:
    # tarfile skips a member it does not select by reading its declared size in blocks: a 6 KB shard whose
    # header declared 2**62 bytes had it read empty blocks for ever (counting the shard at a run's start,
    # clip-make-shards --index, and a worker resuming inside the shard hung until the worker timeout)
    import signal

    from clip.data.shards import MissingSample, count_tar_samples

    header = bytearray(tarfile.TarInfo("b.jpg").tobuf(format=tarfile.GNU_FORMAT)[:512])
    header[124:136] = bytes([0x80]) + (2**62).to_bytes(11, "big")  # GNU base-256 size field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    path = tmp_path / "huge.tar"
    path.write_bytes(bytes(header) + b"\0" * 5120)

    def too_slow(signum, frame):
        raise TimeoutError("still reading")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        with pytest.raises(tarfile.ReadError, match="ends inside a member"):
            count_tar_samples(str(path))
        samples = list(read_shard_range(str(path), 1, 2))  # a resume inside the shard skips one sample first
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [sample.kind for sample in samples if isinstance(sample, MissingSample)] == ["shard_read_error"] * 2


def test_a_sample_the_shards_read_error_cut_short_is_a_read_error_not_a_missing_member(tmp_path: Path) -> None:
    # Cut inside a sample's caption member: that sample, its image read and its caption lost, was counted as
    # missing_caption (a sample made without one), not as the shard's read error
    from clip.data.decoding import SkipSample
    from clip.data.shards import MissingSample
    from clip.data.sources import ShardSource

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("a.jpg", b"jpeg bytes"), ("a.txt", b"x" * 3000), ("b.jpg", b"jpeg"), ("b.txt", b"cat")]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    raw = buffer.getvalue()
    (tmp_path / "cut.tar").write_bytes(raw[: raw.find(b"x" * 100) + 1000])
    (tmp_path / "whole.tar").write_bytes(raw)

    def kinds(name: str) -> list[str]:
        source = ShardSource.__new__(ShardSource)  # its caption and image lookups only
        source.caption_key, source.caption_json_field, source.image_key = "txt", None, "jpg"
        found = []
        for sample in read_shard_range(str(tmp_path / name), 0, 2):
            try:
                if isinstance(sample, MissingSample):
                    raise SkipSample(sample.kind)
                source.caption(sample), source.image(sample)
                found.append("ok")
            except SkipSample as skip:
                found.append(skip.kind)
        return found

    assert kinds("cut.tar") == ["shard_read_error", "shard_read_error"]
    assert kinds("whole.tar") == ["ok", "ok"]
    # Named in the skip log as the shard it is, once, as its missing samples are (not as a shard "cut.tar:a")
    first = next(iter(read_shard_range(str(tmp_path / "cut.tar"), 0, 2)))
    assert ShardSource.describe(None, first, "shard_read_error") == str(tmp_path / "cut.tar")
    assert ShardSource.describe(None, first, "corrupt_image") == f"{tmp_path / 'cut.tar'}:a"  # another skip: its key
