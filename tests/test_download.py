"""clip.download: cached files are reused only when their SHA256 matches, and a failed download (wrong bytes,
broken connection, offline, interrupted) never leaves a file at the final path. Uses file:// URLs and a
loopback HTTP server; nothing leaves the machine."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.server
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_server import serving, without_proxies

import clip.download
from clip.download import DownloadError, cache_dir, download, sha256_of_file
from sync_order import record_syncs_and_renames

GOOD_BYTES = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one read chunk
GOOD_SHA256 = hashlib.sha256(GOOD_BYTES).hexdigest()
BAD_BYTES = b"not the file you are looking for"
# What /endless.bin sends at most, so that a download without a size bound still ends (and fails its checksum)
ENDLESS_SAFETY_CAP = 64 << 20


class FileServer(http.server.BaseHTTPRequestHandler):
    """Serves /good.bin, /bad.bin, /short.bin (body ends early), /unsized.bin (no Content-Length), /endless.bin
    (no Content-Length, bytes until the client hangs up), /huge.bin (announces 1 TiB), /stalled.bin (sends a
    little, then nothing for a minute), /garbled-length.bin (a Content-Length that is no number), /cut-chunks.bin
    (chunked, the connection closed inside a chunk); else 404."""

    def do_GET(self) -> None:
        if self.path == "/good.bin":
            self._send(GOOD_BYTES, len(GOOD_BYTES))
        elif self.path == "/bad.bin":
            self._send(BAD_BYTES, len(BAD_BYTES))
        elif self.path == "/short.bin":
            self._send(GOOD_BYTES[:1000], len(GOOD_BYTES))  # the connection closes after 1000 bytes
        elif self.path == "/unsized.bin":
            self._send(GOOD_BYTES, None)
        elif self.path == "/endless.bin":
            self._send_endless()
        elif self.path == "/huge.bin":
            self._send(GOOD_BYTES[:1000], 1 << 40)
        elif self.path.startswith("/stalled/"):
            self._send_stalled()
        elif self.path == "/garbled-length.bin":
            self._send(GOOD_BYTES, "unknown")
        elif self.path == "/superscript-length.bin":
            self._send(GOOD_BYTES, "\xb2")  # "²": a digit to str.isdigit(), not to int()
        elif self.path == "/cut-chunks.bin":
            self._send_cut_chunks()
        else:
            self.send_error(404)

    def _send(self, body: bytes, announced_length: int | str | None) -> None:
        self.send_response(200)
        if announced_length is not None:
            self.send_header("Content-Length", str(announced_length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _send_endless(self) -> None:
        self.send_response(200)
        self.end_headers()
        block = bytes(1 << 20)
        try:
            for _ in range(ENDLESS_SAFETY_CAP // len(block)):
                self.wfile.write(block)
        except OSError:  # the client stopped reading and hung up
            pass
        self.close_connection = True

    def _send_stalled(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(GOOD_BYTES)))
        self.end_headers()
        self.wfile.write(GOOD_BYTES[:1000])
        self.wfile.flush()
        time.sleep(60)  # a daemon thread: the test ends without waiting for it
        self.close_connection = True

    def _send_cut_chunks(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n" % len(GOOD_BYTES) + GOOD_BYTES[:1000])  # a chunk announced whole, sent in part
        self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch) -> None:
    # A proxy from the environment would intercept requests to the loopback server.
    without_proxies(monkeypatch)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with serving(FileServer) as url:
        yield url


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(GOOD_BYTES)
    return path


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.bin"  # nothing listens there any more


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_cache_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CLIP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "clip"


def test_file_url_download_and_reuse(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    cache = tmp_path / "cache"
    path = download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert path == cache / "weights.bin" and path.read_bytes() == GOOD_BYTES
    assert files_in(cache) == ["weights.bin"]

    def no_network(*args, **kwargs):
        raise AssertionError("a verified cached file must not be downloaded again")

    monkeypatch.setattr(clip.download.urllib.request, "urlopen", no_network)
    assert download(source_file.as_uri(), GOOD_SHA256.upper(), root=cache) == path


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_a_download_is_on_the_disk_before_its_rename(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    # Renamed unsynced, a power cut could leave an empty or torn file under the final name of a download that
    # had passed its checksum: the partial file's whole bytes are synced before it is renamed into place
    events = record_syncs_and_renames(monkeypatch, clip.download.os)
    cache = tmp_path / "cache"
    path = download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert len(events) == 2 and events[0][0] == "sync", events
    partial = events[0][1]
    assert re.fullmatch(rf"{re.escape(str(cache))}/\.weights\.bin\.[0-9a-f]{{32}}\.part", partial), partial
    # the whole file at its sync, not what Python's buffer had passed on by then
    assert events == [("sync", partial, len(GOOD_BYTES)), ("rename", partial, str(path))]
    assert path.read_bytes() == GOOD_BYTES

def test_default_root_is_the_cache_dir(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    path = download(source_file.as_uri(), GOOD_SHA256, filename="renamed.bin", progress=False)
    assert path == tmp_path / "cache" / "renamed.bin" and sha256_of_file(path) == GOOD_SHA256


def test_corrupt_cached_file_is_replaced_with_warning(tmp_path: Path, source_file: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights.bin").write_bytes(BAD_BYTES)
    with pytest.warns(UserWarning, match="does not match|not the expected"):
        path = download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert path.read_bytes() == GOOD_BYTES and files_in(cache) == ["weights.bin"]


def test_a_stale_cached_file_is_hashed_once(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    # It was hashed again once the download's lock was taken (to see whether another process had replaced it
    # meanwhile): seconds more for a stale 350 MB file, which clip.load(..., jit=True) of a release then spent
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights.bin").write_bytes(BAD_BYTES)
    hashed = []
    monkeypatch.setattr(clip.download, "sha256_of_file", lambda path: hashed.append(path) or sha256_of_file(path))
    with pytest.warns(UserWarning, match="not the expected"):
        path = download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert hashed == [cache / "weights.bin"] and path.read_bytes() == GOOD_BYTES


def test_download_bytes_reads_a_stale_cached_file_once(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    # download_bytes read and hashed the stale file, then download() hashed it again before downloading
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights.bin").write_bytes(BAD_BYTES)
    hashed = []
    monkeypatch.setattr(clip.download, "sha256_of_file", lambda path: hashed.append(path) or sha256_of_file(path))
    with pytest.warns(UserWarning, match="not the expected"):
        path, data = clip.download.download_bytes(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert hashed == [] and data == GOOD_BYTES and path.read_bytes() == GOOD_BYTES


def test_download_bytes_gives_the_bytes_it_checked_reading_a_cached_file_once(
    monkeypatch, tmp_path: Path, source_file: Path
) -> None:
    # For clip.load(..., jit=True), which runs the file's code: the bytes checked, not what a second open by name
    # finds at the path
    cache = tmp_path / "cache"
    path, data = clip.download.download_bytes(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert path == cache / "weights.bin" and data == GOOD_BYTES
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *data: hashed.append(len(data)) or real_sha256(*data))
    monkeypatch.setattr(clip.download.urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("downloaded"))
    assert clip.download.download_bytes(source_file.as_uri(), GOOD_SHA256, root=cache) == (path, GOOD_BYTES)
    assert len(hashed) == 1  # the cached file: read and hashed once, as download() alone does


def test_download_bytes_refuses_a_file_replaced_after_its_download_was_checked(
    monkeypatch, tmp_path: Path, source_file: Path
) -> None:
    cache = tmp_path / "cache"
    real_fetch = clip.download._fetch_into_cache

    def download_then_replace(url, expected, target, **kwargs) -> None:
        real_fetch(url, expected, target, **kwargs)
        (tmp_path / "other.bin").write_bytes(BAD_BYTES)
        os.replace(tmp_path / "other.bin", target)  # someone else who writes into the cache folder

    monkeypatch.setattr(clip.download, "_fetch_into_cache", download_then_replace)
    expected = f"{cache / 'weights.bin'} was replaced after its download was checked .*SHA256 is now"
    with pytest.raises(DownloadError, match=expected):
        clip.download.download_bytes(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)


def test_regular_file_bytes_is_none_for_a_pipe_a_folder_and_a_file_over_the_bound(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # not waited on for a writer
    (tmp_path / "file.bin").write_bytes(b"12345")
    assert clip.download.regular_file_bytes(tmp_path / "pipe", 10) is None
    assert clip.download.regular_file_bytes(tmp_path, 10) is None
    assert clip.download.regular_file_bytes(tmp_path / "missing", 10) is None
    assert clip.download.regular_file_bytes(tmp_path / "file.bin", 4) is None
    assert clip.download.regular_file_bytes(tmp_path / "file.bin", 5) == b"12345"


def test_a_stale_file_replaced_while_waiting_for_the_lock_is_the_download(
    monkeypatch, tmp_path: Path, source_file: Path
) -> None:
    # Another process's download, finished while this one waited for it, moved a new file over the stale one:
    # that one is hashed, found right and returned without a download of its own
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights.bin").write_bytes(BAD_BYTES)
    real_take_lock = clip.download._take_lock

    def take_lock_after_another_download(path, folder, name):
        (folder / "other.part").write_bytes(GOOD_BYTES)
        os.replace(folder / "other.part", folder / name)
        return real_take_lock(path, folder, name)

    monkeypatch.setattr(clip.download, "_take_lock", take_lock_after_another_download)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("downloaded again"))
    with pytest.warns(UserWarning, match="not the expected"):
        path = download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert path.read_bytes() == GOOD_BYTES


def test_http_download_with_progress(server_url: str, tmp_path: Path, capsys) -> None:
    path = download(f"{server_url}/good.bin", GOOD_SHA256, root=tmp_path)
    assert path.read_bytes() == GOOD_BYTES
    assert "good.bin" in capsys.readouterr().err  # the tqdm bar, labelled with the file name


def test_http_download_without_content_length(server_url: str, tmp_path: Path) -> None:
    path = download(f"{server_url}/unsized.bin", GOOD_SHA256, root=tmp_path, progress=False)
    assert path.read_bytes() == GOOD_BYTES


def test_checksum_mismatch_keeps_nothing(server_url: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as raised:
        download(f"{server_url}/bad.bin", GOOD_SHA256, root=tmp_path, progress=False)
    message = str(raised.value)
    assert GOOD_SHA256 in message and hashlib.sha256(BAD_BYTES).hexdigest() in message and "bad.bin" in message
    assert files_in(tmp_path) == []


def test_connection_dropped_mid_body_keeps_nothing(server_url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"broke off after 1000 of \d+ bytes"):
        download(f"{server_url}/short.bin", GOOD_SHA256, root=tmp_path, progress=False)
    assert files_in(tmp_path) == []


def test_a_chunked_body_cut_short_keeps_nothing(server_url: str, tmp_path: Path) -> None:
    # http.client says so with its own HTTPException (IncompleteRead), not an OSError
    with pytest.raises(DownloadError, match=r"broke off after \d+ bytes \(IncompleteRead"):
        download(f"{server_url}/cut-chunks.bin", GOOD_SHA256, root=tmp_path, progress=False)
    assert files_in(tmp_path) == []


def test_http_error_is_reported(server_url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server_url}/missing.bin", GOOD_SHA256, root=tmp_path, progress=False)
    # no partial file; the note of why, for downloads that were waiting for this one, is all that stays
    assert files_in(tmp_path) == [".missing.bin.unreachable"]


def test_the_unreachable_note_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    # Another user of a shared cache folder planted .NAME.unreachable -> a file of this user's: the offline
    # download wrote its error message over that file
    victim = tmp_path / "victim"
    victim.write_text("export IMPORTANT=1\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".weights.bin.unreachable").symlink_to(victim)
    with pytest.raises(DownloadError, match="Could not download"):
        download(closed_port_url(), GOOD_SHA256, root=tmp_path / "cache", progress=False, timeout_s=5)
    assert victim.read_text() == "export IMPORTANT=1\n"


def test_offline_error_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = closed_port_url()
    with pytest.raises(RuntimeError) as raised:
        download(url, GOOD_SHA256, root=tmp_path, progress=False, timeout_s=5)
    message = str(raised.value)
    assert url in message and str(tmp_path / "weights.bin") in message and GOOD_SHA256 in message
    assert "CLIP_CACHE_DIR" not in message  # the caller chose the folder: the variable would change nothing
    assert files_in(tmp_path) == [".weights.bin.unreachable"]
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="set CLIP_CACHE_DIR to use another cache folder"):
        download(url, GOOD_SHA256, progress=False, timeout_s=5)


def test_offline_error_names_another_file_found_in_the_files_place(tmp_path: Path) -> None:
    # A file copied by hand under the release's name that is not the release: the command's one error line said
    # to copy the file there, as if nothing were; only a warning above it told of the file found
    (tmp_path / "weights.bin").write_bytes(BAD_BYTES)
    with pytest.warns(UserWarning, match="not the expected"), pytest.raises(DownloadError) as raised:
        download(closed_port_url(), GOOD_SHA256, root=tmp_path, progress=False, timeout_s=5)
    bad = hashlib.sha256(BAD_BYTES).hexdigest()
    assert f"The file there now is another one, not used: its SHA256 is {bad}." in str(raised.value)
    assert (tmp_path / "weights.bin").read_bytes() == BAD_BYTES  # left as it was


def test_missing_local_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="Could not download"):
        download((tmp_path / "absent.bin").as_uri(), GOOD_SHA256, root=tmp_path / "cache", progress=False)


def test_interrupt_leaves_no_partial_file(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    class InterruptedBar:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def update(self, count: int) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(clip.download, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        download(source_file.as_uri(), GOOD_SHA256, root=tmp_path / "cache")
    assert files_in(tmp_path / "cache") == []


def test_bad_arguments(tmp_path: Path, source_file: Path) -> None:
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download(source_file.as_uri(), "abc", root=tmp_path)
    for nameless in ("http://127.0.0.1/", "http://127.0.0.1/a/%2E%2E"):
        with pytest.raises(ValueError, match="file name"):
            download(nameless, GOOD_SHA256, root=tmp_path)
    (tmp_path / "weights.bin").mkdir()
    with pytest.raises(DownloadError, match="not a regular file"):
        download(source_file.as_uri(), GOOD_SHA256, root=tmp_path)


def test_a_checksum_must_be_exactly_64_hexadecimal_characters(tmp_path: Path, source_file: Path) -> None:
    # A prefix of 64 hex characters is not enough: a 65th character (a pasted line's stray digit) is refused
    for wrong in (GOOD_SHA256 + "0", GOOD_SHA256[:-1], GOOD_SHA256[:-1] + "g"):
        with pytest.raises(ValueError, match="64 hexadecimal"):
            download(source_file.as_uri(), wrong, root=tmp_path / "cache", progress=False)
    assert files_in(tmp_path / "cache") == []


def test_a_checksum_with_surrounding_whitespace_is_accepted(tmp_path: Path, source_file: Path) -> None:
    # As read from a .sha256 file or a copied line: its newline is no part of the digest
    path = download(source_file.as_uri(), f"  {GOOD_SHA256}\n", root=tmp_path, progress=False)
    assert path.read_bytes() == GOOD_BYTES


@pytest.mark.parametrize("filename", ["../escaped.bin", "sub/weights.bin", "..", "."])
def test_a_filename_that_is_not_a_plain_name_is_refused(tmp_path: Path, source_file: Path, filename: str) -> None:
    # A name with a folder in it would put the file outside `root` (or in a folder nobody asked for)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"filename must be a plain file name"):
        download(source_file.as_uri(), GOOD_SHA256, root=cache, filename=filename, progress=False)
    assert files_in(tmp_path) == ["source"]


def test_a_null_byte_in_the_url_name_is_a_clear_error(tmp_path: Path) -> None:
    # Path.exists raised a bare "embedded null byte"
    with pytest.raises(ValueError, match="Cannot tell a file name from the URL"):
        download("http://127.0.0.1/a%00b.pt", GOOD_SHA256, root=tmp_path)


def test_a_root_that_is_a_file_is_a_clear_error(tmp_path: Path, source_file: Path) -> None:
    # mkdir's FileExistsError said only "[Errno 17] File exists: '...'"
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(DownloadError, match=r"Cannot download into .*cache: it exists and is not a folder"):
        download(source_file.as_uri(), GOOD_SHA256, root=tmp_path / "cache")


def test_a_server_that_streams_without_end_is_stopped_at_max_bytes(server_url: str, tmp_path: Path) -> None:
    # Without a bound, a server that never stops (no Content-Length) filled the disk.
    with pytest.raises(DownloadError, match=r"the server sent more than 2,097,152 bytes, more than max_bytes="):
        download(f"{server_url}/endless.bin", GOOD_SHA256, root=tmp_path, progress=False, max_bytes=2 << 20)
    assert files_in(tmp_path) == []


def test_a_length_announced_beyond_the_default_bound_is_refused_before_any_byte(server_url: str, tmp_path: Path):
    with pytest.raises(DownloadError) as raised:
        download(f"{server_url}/huge.bin", GOOD_SHA256, root=tmp_path, progress=False)
    message = str(raised.value)
    assert "the server announced 1,099,511,627,776 bytes, more than max_bytes=4,294,967,296" in message
    assert "RN50x64" in message and "pass a larger max_bytes" in message
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("path", ["/good.bin", "/unsized.bin"])
def test_max_bytes_admits_a_file_of_exactly_that_size(server_url: str, tmp_path: Path, path: str) -> None:
    with pytest.raises(DownloadError, match="more than max_bytes=1,048,579"):
        download(f"{server_url}{path}", GOOD_SHA256, root=tmp_path, progress=False, max_bytes=len(GOOD_BYTES) - 1)
    assert files_in(tmp_path) == []
    fetched = download(f"{server_url}{path}", GOOD_SHA256, root=tmp_path, progress=False, max_bytes=len(GOOD_BYTES))
    assert fetched.read_bytes() == GOOD_BYTES


def test_a_file_url_is_bounded_too(tmp_path: Path, source_file: Path) -> None:
    with pytest.raises(DownloadError, match="announced 1,048,580 bytes, more than max_bytes=1,000"):
        download(source_file.as_uri(), GOOD_SHA256, root=tmp_path / "cache", progress=False, max_bytes=1000)
    assert files_in(tmp_path / "cache") == []


def test_a_content_length_that_is_no_number_is_ignored(server_url: str, tmp_path: Path) -> None:
    # http.client reads such a body to the end of the connection; the download does the same and checks its SHA256
    path = download(f"{server_url}/garbled-length.bin", GOOD_SHA256, root=tmp_path, progress=False)
    assert path.read_bytes() == GOOD_BYTES
    # Nor one of digits that are not ASCII's: int() raised a ValueError past the download's own errors
    path = download(f"{server_url}/superscript-length.bin", GOOD_SHA256, root=tmp_path / "b", progress=False)
    assert path.read_bytes() == GOOD_BYTES


def test_a_server_that_stops_sending_is_given_up_after_timeout_s(server_url: str, tmp_path: Path) -> None:
    # /stalled/ sends 1000 bytes, then nothing for a minute
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"broke off after \d+ bytes \(timed out\)"):
        download(f"{server_url}/stalled/weights.bin", GOOD_SHA256, root=tmp_path, progress=False, timeout_s=0.5)
    assert time.monotonic() - started < 30
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("max_bytes", [0, -1, True, 1.5, "4GiB"])
def test_max_bytes_must_be_a_positive_integer(tmp_path: Path, source_file: Path, max_bytes) -> None:
    with pytest.raises(ValueError, match="max_bytes must be a positive number of bytes"):
        download(source_file.as_uri(), GOOD_SHA256, root=tmp_path, max_bytes=max_bytes)


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.part"))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def start_download_in_a_process(url: str, root: Path) -> subprocess.Popen:
    """A download of `url` into `root` by another process, once its partial file exists (and is locked).

    download.py is loaded from its file, not through the package, to spare the child importing torch."""
    program = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('download', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.download(sys.argv[2], sys.argv[3], root=sys.argv[4], progress=False, timeout_s=300)\n"
    )
    environment = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    child = subprocess.Popen([sys.executable, "-c", program, clip.download.__file__, url, GOOD_SHA256, str(root)],
                             env=environment, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not partial_files(root):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child download never created its partial file (exit status {child.poll()})")
        time.sleep(0.05)
    time.sleep(0.5)  # its lock is taken right after the file is created
    return child


def test_partial_files_of_killed_downloads_are_removed_by_the_next_download_of_that_file(
    server_url: str, tmp_path: Path, source_file: Path
) -> None:
    # Every attempt writes its own `.NAME.<random>.part`, which no later attempt reused: each download killed
    # by SIGKILL (OOM killer, scancel, a pre-empted node) left up to 1.3 GB in the cache for good.
    cache = tmp_path / "cache"
    child = start_download_in_a_process(f"{server_url}/stalled/weights.bin", cache)
    try:
        [live] = partial_files(cache)
        age(live, 2 * clip.download.STALE_PARTIAL_AGE_S)  # a live download silent that long still holds its lock
        # and its lock file: this download goes ahead instead of waiting for one that shows no sign of life
        age(cache / ".weights.bin.lock", 2 * clip.download.STALE_PARTIAL_AGE_S)
        download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
        assert partial_files(cache) == [live]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert partial_files(cache) == [live]  # what the killed download left

    young = cache / f".weights.bin.{'a' * 32}.part"  # maybe another node's live download (its lock unseen here)
    young.write_bytes(b"young")
    age(young, clip.download.STALE_PARTIAL_AGE_S - 60)
    unrelated = [cache / f".other.bin.{'b' * 32}.part", cache / ".weights.bin.abc.part", cache / "weights.bin.part"]
    for path in unrelated:
        path.write_bytes(b"not ours to delete")
        age(path, 2 * clip.download.STALE_PARTIAL_AGE_S)
    assert download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False).read_bytes() == GOOD_BYTES
    assert not live.exists()  # removed even though the file was in the cache already
    assert young.exists() and all(path.exists() for path in unrelated)


def test_a_named_pipe_under_a_partial_files_name_is_not_removed(tmp_path: Path, source_file: Path) -> None:
    # Only regular files are partial files a download wrote; anything else of that name is left alone
    cache = tmp_path / "cache"
    cache.mkdir()
    pipe = cache / f".weights.bin.{'e' * 32}.part"
    os.mkfifo(pipe)
    age(pipe, 2 * clip.download.STALE_PARTIAL_AGE_S)
    download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert pipe.exists()


def test_a_stale_partial_file_that_another_download_holds_is_kept(tmp_path: Path, source_file: Path) -> None:
    # The same rule within one process (two threads): a lock is held per open file, not per process.
    cache = tmp_path / "cache"
    cache.mkdir()
    held = cache / f".weights.bin.{'c' * 32}.part"
    held.write_bytes(b"partial")
    age(held, 2 * clip.download.STALE_PARTIAL_AGE_S)
    with open(held, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
        assert held.exists()
    download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert not held.exists() and files_in(cache) == ["weights.bin"]


@pytest.mark.parametrize("where", ["existing folder", "new folder"])
def test_a_cache_folder_that_cannot_be_written_is_a_clear_error(
    monkeypatch, tmp_path: Path, source_file: Path, where: str
) -> None:
    # PermissionError named the hidden partial file ('.weights.bin.<32 hex>.part') or the folder, with no word
    # of where else the file could go; permissions are simulated (root may write anywhere)
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    cache = tmp_path / "cache"
    if where == "existing folder":
        cache.mkdir()
        monkeypatch.setattr(clip.download, "open", refused, raising=False)
    else:
        monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(DownloadError, match=r"Cannot download into .*cache: Permission denied\. .*CLIP_CACHE_DIR"):
        download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert not cache.exists() or files_in(cache) == []


def test_a_full_disk_is_said_to_be_the_cache_folders_problem(monkeypatch, tmp_path: Path, source_file: Path) -> None:
    # It read "broke off after N bytes (No space left on device); try again": trying again fails the same way
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.file.close()

    monkeypatch.setattr(clip.download, "open", lambda *args, **kwargs: FullDisk(real_open(*args, **kwargs)),
                        raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"Cannot download into .*cache: No space left on device\. Choose a folder"):
        download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert files_in(cache) == []


class Waiting(logging.Handler):
    """Notes when a download logs that it waits for another's."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for another process's download"):
            # a warning, which Python shows without any logging set up (clip.load in a notebook)
            assert record.levelno == logging.WARNING
            self.seen.set()


@pytest.fixture
def waiting(monkeypatch) -> Iterator[Waiting]:
    monkeypatch.setattr(clip.download, "LOCK_POLL_S", 0.05, raising=False)
    handler = Waiting()
    logger = logging.getLogger("clip.download")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


def in_a_thread(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def two_downloads_at_once(source_file: Path, cache: Path, fetching: threading.Event) -> tuple[dict, dict]:
    """The outcomes of two downloads of one file into `cache`, the second started once the first is `fetching`."""
    first, first_outcome = in_a_thread(download, source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    assert fetching.wait(timeout=30)
    second, second_outcome = in_a_thread(download, source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
    for thread in (first, second):
        thread.join(timeout=60)
    return first_outcome, second_outcome

def test_downloads_of_one_file_at_once_fetch_it_once(monkeypatch, tmp_path: Path, source_file: Path, waiting) -> None:
    # Eight ranks each calling clip.load("ViT-B/32") on one node fetched the file eight times over, each into a
    # partial file of its own; now one downloads, and the others wait and check the file it leaves.
    real_urlopen, fetches, fetching = urllib.request.urlopen, [], threading.Event()

    def urlopen(url, timeout):
        fetches.append(url)
        fetching.set()
        waiting.seen.wait(timeout=10)  # the other download waits for this one meanwhile
        return real_urlopen(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    first_outcome, second_outcome = two_downloads_at_once(source_file, cache, fetching)
    assert first_outcome == second_outcome == {"value": cache / "weights.bin"}
    assert len(fetches) == 1 and (cache / "weights.bin").read_bytes() == GOOD_BYTES
    assert files_in(cache) == ["weights.bin"]  # no lock file left behind


def test_a_download_waiting_for_a_killed_one_goes_on(server_url: str, tmp_path: Path, source_file: Path, waiting):
    # The lock is the kernel's, dropped when its holder dies however it dies: SIGKILL, as the OOM killer sends
    cache = tmp_path / "cache"
    child = start_download_in_a_process(f"{server_url}/stalled/weights.bin", cache)
    try:
        waiter, outcome = in_a_thread(download, source_file.as_uri(), GOOD_SHA256, root=cache, progress=False)
        assert waiting.seen.wait(timeout=30) and waiter.is_alive()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    waiter.join(timeout=60)
    assert outcome == {"value": cache / "weights.bin"} and (cache / "weights.bin").read_bytes() == GOOD_BYTES


def test_downloads_waiting_for_one_that_cannot_reach_the_server_fail_with_it(
    monkeypatch, tmp_path: Path, source_file: Path, waiting
) -> None:
    # Offline, each waiting process took the lock in turn and waited out the timeout again: 8 ranks calling
    # clip.load, the last one failing after 8 minutes. Now the ones that waited fail with the first's error.
    attempts, fetching = [], threading.Event()

    def unreachable(url, timeout):
        attempts.append(url)
        fetching.set()
        waiting.seen.wait(timeout=10)
        raise urllib.error.URLError("timed out")

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    cache = tmp_path / "cache"
    first_outcome, second_outcome = two_downloads_at_once(source_file, cache, fetching)
    assert len(attempts) == 1
    assert isinstance(first_outcome["error"], DownloadError) and "timed out" in str(first_outcome["error"])
    assert isinstance(second_outcome["error"], DownloadError)
    assert "timed out" in str(second_outcome["error"]) and "waited for another's download" in str(second_outcome["error"])
    # A later download that waited for nobody tries again itself, and once it reaches the server the note goes.
    # (urlopen alone put back: monkeypatch.undo() also set the proxies of the environment again, and urllib's
    # opener, made at this first real call, kept them for every later test of the process)
    monkeypatch.setattr(urllib.request, "urlopen", real_urlopen)
    assert download(source_file.as_uri(), GOOD_SHA256, root=cache, progress=False) == cache / "weights.bin"
    assert files_in(cache) == ["weights.bin"]


def test_a_lock_file_removed_between_opening_and_locking_it_is_opened_again(tmp_path, monkeypatch):
    # The holder removes its lock file on the way out, while holding it: a process that opened the old file
    # and locked it just after would hold a lock nobody else sees, and two downloads would write side by side
    path = tmp_path / ".x.pt.lock"
    real_flock, calls = fcntl.flock, []

    def removed_before_the_first_lock(descriptor, operation):
        calls.append(operation)
        if len(calls) == 1:
            path.unlink()
        return real_flock(descriptor, operation)

    monkeypatch.setattr(clip.download.fcntl, "flock", removed_before_the_first_lock)
    descriptor, waited_since = clip.download._take_lock(path, tmp_path, "x.pt")
    try:
        assert len(calls) == 2 and waited_since is None
        assert os.fstat(descriptor).st_ino == os.stat(path).st_ino
    finally:
        os.close(descriptor)


def test_a_partial_file_written_just_now_is_a_sign_of_life_however_old_the_lock_file(tmp_path):
    # The lock file is written once, when the download starts; a download that takes over an hour still writes
    # its partial file every chunk: it is alive, and no waiting process is to download the file beside it
    lock = tmp_path / ".x.pt.lock"
    lock.write_text("host 1\n")
    age(lock, 2 * clip.download.STALE_PARTIAL_AGE_S)
    (tmp_path / f".x.pt.{'d' * 32}.part").write_bytes(b"written just now")
    assert time.time() - clip.download._last_sign_of_life(lock, tmp_path, "x.pt") < 60


def test_a_note_of_an_unreachable_server_older_than_the_wait_is_not_this_downloads_failure(tmp_path):
    # Left by an attempt before the one this process waited for: that one may have reached the server since
    note = tmp_path / ".x.pt.unreachable"
    note.write_text("Could not download x.pt (timed out)", encoding="utf-8")
    age(note, 60)
    clip.download._raise_if_found_unreachable_meanwhile(note, waited_since=time.time() - 30)
    with pytest.raises(DownloadError, match=r"timed out\) \(This process waited for another's download"):
        clip.download._raise_if_found_unreachable_meanwhile(note, waited_since=time.time() - 120)


def test_a_lock_file_gone_meanwhile_is_a_sign_of_life_now(tmp_path):
    # Its holder finished or failed just now: no reason to take the download over as a dead one's
    before = time.time()
    assert clip.download._last_sign_of_life(tmp_path / ".x.pt.lock", tmp_path, "x.pt") >= before


def test_the_cache_folder_variable_may_start_with_a_tilde(tmp_path, monkeypatch):
    # As written in a job script's quotes (CLIP_CACHE_DIR="~/models"), which no shell expands
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLIP_CACHE_DIR", "~/models")
    assert cache_dir() == tmp_path / "models"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's size from /proc")
def test_regular_file_bytes_allocates_for_the_file_not_for_the_bound(tmp_path: Path) -> None:
    # read(max_bytes + 1) allocated the bound, 4 GiB by default, before reading a byte: under `ulimit -v` (as on
    # many clusters) or strict overcommit, clip.load of a 350 MB release failed with a MemoryError
    # In a fork: the address-space limit is the process's for good.
    from multiprocess import run_in_fork

    (tmp_path / "small.bin").write_bytes(b"x" * 1000)
    assert run_in_fork(_read_under_an_address_space_limit, tmp_path / "small.bin", timeout_s=120) == 1000


def _read_under_an_address_space_limit(path: Path) -> int:
    """The bytes read by regular_file_bytes (bound 4 GiB) with 512 MiB of address space to spare."""
    size = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
    return len(clip.download.regular_file_bytes(path, 4 << 30))
