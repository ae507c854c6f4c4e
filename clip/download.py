"""Fetch a file into the local cache, verified by its SHA256.

The cache folder is $CLIP_CACHE_DIR, or ~/.cache/clip when that is unset. A download is written to a temporary
file beside its destination and moved into place only after its checksum matches, so an interrupted or corrupt
download never sits at the final path where the next run would trust it. Processes that want the same file at
once (one per GPU, each calling clip.load) fetch it once: one downloads, the others wait for it and then check
the file it left (`_one_download_at_a_time`). Each attempt has its own temporary (partial) file; those that
killed attempts left behind are removed by a later download of that file (`_remove_stale_partials`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

CACHE_DIR_VARIABLE = "CLIP_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/clip")
# Big enough that Python overhead per chunk is negligible, small enough for a smooth progress bar.
CHUNK_BYTES = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# The largest download accepted unless the caller says otherwise. OpenAI's largest released weights (RN50x64)
# are about 1.3 GB; 4 GiB is three times that, while a server that streams without end (or announces
# terabytes) is stopped there instead of filling the disk.
DEFAULT_MAX_BYTES = 4 << 30
# A partial file nobody has written to for this long, and whose writer holds no lock on it, was left by a
# killed download. A live download writes once per chunk (1 MiB): one silent for an hour gets under 300 bytes
# a second, and would take 50 days for RN50x64.
STALE_PARTIAL_AGE_S = 3600.0
_PARTIAL_ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
# How often a process waiting for another's download of the same file looks whether it has finished
LOCK_POLL_S = 0.5
# Opens that must not follow a symbolic link (the cache folder may be shared); Windows has no O_NOFOLLOW
_NO_SYMLINK = getattr(os, "O_NOFOLLOW", 0)

# What urlopen returns: for http(s) URLs, and for file:// (and ftp) ones
Response = http.client.HTTPResponse | urllib.response.addinfourl

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file could not be fetched, or what was fetched is not the file that was asked for."""


def cache_dir() -> Path:
    """The folder that downloads go to by default: $CLIP_CACHE_DIR, else ~/.cache/clip (not created here)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA256 of a file, read in chunks so that multi-gigabyte checkpoints need no memory."""
    with open(path, "rb") as file:
        return sha256_of_open_file(file)


def sha256_of_open_file(file: BinaryIO) -> str:
    """`sha256_of_file` of a file already open, from its current position: a handle held while the file's name
    is deleted still reads its bytes."""
    digest = hashlib.sha256()
    while chunk := file.read(CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    sha256: str,
    root: str | Path | None = None,
    filename: str | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Return the local path of `url`'s file in `root` (default: `cache_dir()`), downloading it if needed.

    Args:
        url: where the file lives; http(s):// and file:// both work.
        sha256: the expected hex digest. A cached file is only reused when it matches, and a fresh download
            is only kept when it matches.
        root: the folder to keep the file in; created if missing.
        filename: the name inside `root`; default: the last component of the URL's path.
        progress: show a tqdm progress bar (bytes) while downloading.
        timeout_s: seconds to wait for the server to connect or to send more data.
        max_bytes: the largest file accepted (default 4 GiB, three times OpenAI's largest release): a server
            that announces more (Content-Length) is refused before anything is written, and one that sends
            more is stopped there, so that an endless stream cannot fill the disk.

    Raises:
        DownloadError (a RuntimeError): the URL cannot be reached (e.g. offline; the message says where to
            place the file by hand), the transfer broke off, the file is larger than `max_bytes`, or the
            downloaded bytes have the wrong SHA256.
    """
    expected, target = _checked_request(url, sha256, root, filename, max_bytes)
    _remove_stale_partials(target.parent, target.name)
    present = None  # the SHA256 of another file in the target's place, which a failed download names
    hashed = _found_in_cache(target)  # which file that was, so that the same one is not hashed again
    if hashed is not None:
        present = sha256_of_file(target)
        if present == expected:
            return target
        _warn_stale(target, present, expected)
    _fetch_into_cache(url, expected, target, root_given=root is not None, present=present, hashed=hashed,
                      progress=progress, timeout_s=timeout_s, max_bytes=max_bytes)
    return target


def _found_in_cache(target: Path) -> tuple[int, int, int, int] | None:
    """The identity (`_file_identity`) of the file at `target`, taken before it is hashed (a file replaced while
    it is read is not this one); None where there is none. DownloadError where something else is there."""
    if not target.exists():
        return None
    if not target.is_file():
        raise DownloadError(f"{target} exists but is not a regular file; remove it or pass another root")
    return _file_identity(target)


def _warn_stale(target: Path, actual: str, expected: str) -> None:
    warnings.warn(
        f"{target} exists but its SHA256 is {actual}, not the expected {expected}; downloading it again",
        stacklevel=3,  # the caller of download or download_bytes
    )


def _fetch_into_cache(
    url: str, expected: str, target: Path, *, root_given: bool, present: str | None,
    hashed: tuple[int, int, int, int] | None, progress: bool, timeout_s: float, max_bytes: int,
) -> None:
    """Puts `url`'s file at `target`, checked against `expected`, unless another process did meanwhile. `present`:
    the SHA256 of the stale file found there (named by a failed download); `hashed`: that file's identity, so
    that it is not hashed again."""
    folder, name = target.parent, target.name
    with _writing_into(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # mkdir's own message names only the path: "[Errno 17] File exists"
            raise DownloadError(f"Cannot download into {folder}: it exists and is not a folder") from None
    with _one_download_at_a_time(folder, name) as waited_since:
        # Another process may have downloaded it meanwhile (this one waited for it): a file other than the one
        # found before. That one is not hashed again: its second read took seconds for a stale 350 MB file
        if target.is_file() and _file_identity(target) != hashed and sha256_of_file(target) == expected:
            return
        unreachable = folder / f".{name}.unreachable"
        if waited_since is not None:
            _raise_if_found_unreachable_meanwhile(unreachable, waited_since)
        # A unique name per attempt: where downloads cannot wait for each other, several go ahead at once.
        partial = folder / f".{name}.{uuid.uuid4().hex}.part"
        try:
            try:
                response = _open_url(url, target, expected, timeout_s, root_given=root_given, present=present)
            except DownloadError as error:
                _note_unreachable(unreachable, error)
                raise
            unreachable.unlink(missing_ok=True)
            with response:
                actual = _fetch(response, url, partial, target.name, progress, max_bytes)
            if actual != expected:
                raise DownloadError(
                    f"The file downloaded from {url} has SHA256 {actual}, but {expected} was expected; it was not "
                    f"saved. The server may be serving a different or corrupted file."
                )
            os.replace(partial, target)  # atomic on POSIX and Windows when both paths are in one folder
        except BaseException:  # also on KeyboardInterrupt: never leave a partial file behind
            partial.unlink(missing_ok=True)
            raise


def _checked_request(url: str, sha256: str, root: str | Path | None, filename: str | None,
                     max_bytes: int) -> tuple[str, Path]:
    """(the expected SHA256 in lower case, the file's path in the cache) for `download`'s arguments, which are
    checked: a ValueError names a wrong one."""
    expected = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(expected):
        raise ValueError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    folder = Path(root).expanduser() if root is not None else cache_dir()
    name = filename or Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if name in ("", ".", "..") or "\x00" in name or "/" in name:
        if filename:  # the caller's name, not the URL's: saying "pass filename=..." would not help
            raise ValueError(f"filename must be a plain file name (no folder), got {filename!r}")
        raise ValueError(f"Cannot tell a file name from the URL {url!r}; pass filename=...")
    return expected, folder / name


def download_bytes(
    url: str,
    sha256: str,
    root: str | Path | None = None,
    filename: str | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Path, bytes]:
    """`download`, and the file's bytes: read once, and those very bytes checked against `sha256`.

    The path `download` returns held a file that matched when it was hashed; whatever is put at that path after
    (by anyone who can write the cache folder) is what a second open by name reads. For a file whose code is
    run (`clip.load(..., jit=True)`), only the bytes that were hashed will do. A cached file is read and hashed
    once, as `download` alone does (a stale one too); a file downloaded now is read back and hashed once more.
    Arguments and errors as for `download`; also a DownloadError when the file at the path is replaced between
    its download and that read."""
    expected, target = _checked_request(url, sha256, root, filename, max_bytes)
    _remove_stale_partials(target.parent, target.name)
    present = None
    hashed = _found_in_cache(target)
    if hashed is not None:
        cached = regular_file_bytes(target, max_bytes)  # None: larger than any file this download keeps
        present = None if cached is None else hashlib.sha256(cached).hexdigest()
        if present == expected:
            return target, cached
        del cached  # a stale file, up to max_bytes: not held while the right one downloads
        if present is not None:
            _warn_stale(target, present, expected)
    _fetch_into_cache(url, expected, target, root_given=root is not None, present=present, hashed=hashed,
                      progress=progress, timeout_s=timeout_s, max_bytes=max_bytes)
    data = regular_file_bytes(target, max_bytes)
    actual = None if data is None else hashlib.sha256(data).hexdigest()
    if actual != expected:
        found = "no longer a regular file" if actual is None else f"its SHA256 is now {actual}"
        raise DownloadError(
            f"{target} was replaced after its download was checked ({found}); it was not used. Another process "
            f"or user writes into {target.parent}: choose a cache folder only you can write to."
        )
    return target, data


def regular_file_bytes(path: str | Path, max_bytes: int) -> bytes | None:
    """All the bytes of the regular file at `path`, read through one handle; None where there is no regular file
    there (a FIFO is not waited on), or it holds more than `max_bytes`."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; O_BINARY: no newline
        # translation on Windows
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            # All of it, in a buffer sized by the file's size: read(max_bytes + 1) allocated max_bytes (4 GiB by
            # default) before reading a byte, a MemoryError under `ulimit -v` or strict overcommit whatever the
            # file's size. A file grown past max_bytes since fstat is refused below.
            data = file.read()
    finally:
        os.close(descriptor)
    return data if len(data) <= max_bytes else None


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells one file at `path` from another put there since (a download moves a new file into place, or
    overwrites one): its device, inode, size and modification time; None where there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


@contextmanager
def _one_download_at_a_time(folder: Path, name: str) -> Iterator[float | None]:
    """Holds the lock of `.NAME.lock` in `folder` while NAME downloads; another process downloading it waits
    here until the lock is free, then finds the file in the cache. The lock file is removed when done. Yields
    when this process began to wait for another's download (time.time()), or None if it did not wait.

    An flock, which the kernel drops when its holder ends, however it ends: a killed download blocks nobody.
    Where no lock can be taken (Windows, a file system without flock, a folder that cannot be written),
    downloads go ahead side by side, each into its own partial file. So does a waiting one once the holder has
    shown no sign of life (its lock file or partial file written) for STALE_PARTIAL_AGE_S, as when a network
    file system keeps the lock of a node that died."""
    path = folder / f".{name}.lock"
    descriptor, waited_since = _take_lock(path, folder, name)
    try:
        yield waited_since
    finally:
        if descriptor is not None:
            with suppress(OSError):
                path.unlink()  # while held, so that a process waiting for it takes a new file (see _take_lock)
            os.close(descriptor)


def _take_lock(path: Path, folder: Path, name: str) -> tuple[int | None, float | None]:
    """An open descriptor of the lock file `path`, locked, or None where the download goes ahead without it; and
    when this process began to wait for another's download, or None if it did not wait."""
    if fcntl is None:
        return None, None
    waited_since = None
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | _NO_SYMLINK, 0o666)
        except OSError:  # a folder that cannot be written: the download says so
            return None, None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process downloads the file
            os.close(descriptor)
        except OSError:  # a file system without locks
            os.close(descriptor)
            return None, None
        else:
            if _is_at(path, descriptor):
                with suppress(OSError):  # who holds it, and a sign of life for the waiting
                    os.ftruncate(descriptor, 0)
                    os.write(descriptor, f"{socket.gethostname()} {os.getpid()}\n".encode())
                return descriptor, waited_since
            os.close(descriptor)  # its holder removed it on the way out, before this process locked it
            continue
        silent_s = time.time() - _last_sign_of_life(path, folder, name)
        if silent_s >= STALE_PARTIAL_AGE_S:
            log.warning("the download of %s that another process holds (%s) has written nothing for %.0f s: "
                        "downloading it here as well", folder / name, path, silent_s)
            return None, None
        if waited_since is None:
            waited_since = time.time()
            # A warning: shown without any logging set up (a notebook), where the wait would be silent
            log.warning("waiting for another process's download of %s", folder / name)
        time.sleep(LOCK_POLL_S)


def _note_unreachable(note: Path, error: DownloadError) -> None:
    """Leaves why the server could not be reached for the processes waiting for this download, before they
    take the lock in turn: each would otherwise wait out the timeout again (8 ranks of an offline node, each
    calling clip.load: 8 minutes one after the other instead of one)."""
    # Not through a symlink: in a cache folder shared with other users, one planted there made this write over
    # the file it names (the lock and the partial file are opened the same way)
    with suppress(OSError):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NO_SYMLINK
        with os.fdopen(os.open(note, flags, 0o666), "w", encoding="utf-8") as file:
            file.write(str(error))


def _raise_if_found_unreachable_meanwhile(note: Path, waited_since: float) -> None:
    """Raises the error of the download this process waited for, if that one could not reach the server. Not a
    download that broke off or sent other bytes: this process tries that one again itself."""
    try:
        with os.fdopen(os.open(note, os.O_RDONLY | _NO_SYMLINK), encoding="utf-8") as file:
            if os.fstat(file.fileno()).st_mtime < waited_since:  # an earlier attempt's, not the one waited for
                return
            message = file.read(1 << 16)
    except (OSError, ValueError):  # none, unreadable or a symlink: try it here
        return
    raise DownloadError(f"{message} (This process waited for another's download of the file, which failed that "
                        "way just now.)")


def _is_at(path: Path, descriptor: int) -> bool:
    """Whether the open file `descriptor` is the one at `path` still."""
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(descriptor)
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)


def _last_sign_of_life(lock: Path, folder: Path, name: str) -> float:
    """When a download of `name` last wrote its lock file or a partial file (now, if the lock file is gone)."""
    times = []
    for path in [lock, *_partial_files(folder, name)]:
        try:
            times.append(os.stat(path, follow_symlinks=False).st_mtime)
        except OSError:  # gone meanwhile: the download finished or failed
            if path == lock:
                return time.time()
    return max(times)


def _open_url(url: str, target: Path, expected: str, timeout_s: float, root_given: bool,
              present: str | None = None) -> Response:
    """The server's response to a request for `url`, or a DownloadError saying why there is none.

    `target`, `expected`, `root_given` (the caller chose the folder) and `present` (the SHA256 of another file
    found at `target`) only serve the error messages."""
    try:
        return urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        message = f"Downloading {url} failed: the server answered HTTP {error.code} {error.reason}"
        raise DownloadError(message) from error
    except OSError as error:  # URLError, refused connections, timeouts, DNS failures: usually offline
        reason = getattr(error, "reason", None) or error
        # The cache variable only matters where the caller did not choose the folder (download_root=...).
        elsewhere = "" if root_given else f" (set {CACHE_DIR_VARIABLE} to use another cache folder)"
        # A file placed there by hand that is not the one asked for: said here, as the line a command prints
        found = "" if present is None else f" The file there now is another one, not used: its SHA256 is {present}."
        raise DownloadError(
            f"Could not download {url} ({reason}). If this machine is offline, fetch that URL elsewhere and copy "
            f"the file to {target}{elsewhere}. It is used once its SHA256 is {expected}.{found}"
        ) from error


def _fetch(response: Response, url: str, partial: Path, label: str, progress: bool, max_bytes: int) -> str:
    """Stream `response` into `partial` (which must not exist yet) and return the SHA256 of the bytes written.

    Refuses more than `max_bytes`, announced or received; `label` names the progress bar."""
    length_header = response.headers.get("Content-Length")
    # ASCII digits only: str.isdigit() takes "²" too, whose int() raised a ValueError past the download's errors
    expected_bytes = int(length_header) if length_header and re.fullmatch(r"[0-9]+", length_header) else None
    if expected_bytes is not None and expected_bytes > max_bytes:
        raise DownloadError(_too_large(url, f"the server announced {expected_bytes:,} bytes", max_bytes))
    digest = hashlib.sha256()
    received = 0
    with _writing_into(partial.parent):  # named as the folder's problem, not by a hidden file's name
        file = open(partial, "xb")
    with file:
        _mark_in_use(file.fileno())
        bar = tqdm(total=expected_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress)
        with bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    received += len(chunk)
                    if received > max_bytes:  # only without a Content-Length: http.client reads no more than it
                        sent = f"the server sent more than {max_bytes:,} bytes"
                        raise DownloadError(_too_large(url, sent, max_bytes))
                    with _writing_into(partial.parent):
                        file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:  # reset connection, timeout, bad chunking
                message = f"Downloading {url} broke off after {received} bytes ({error}); try again"
                raise DownloadError(message) from error
        with _writing_into(partial.parent):
            file.flush()
            os.fsync(file.fileno())
    # http.client returns a short body without complaint when the connection closes early; count it ourselves.
    if expected_bytes is not None and received != expected_bytes:
        raise DownloadError(
            f"Downloading {url} broke off after {received} of {expected_bytes} bytes; the partial file was "
            f"removed. Try again."
        )
    return digest.hexdigest()


@contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """An OSError while creating or writing into the cache folder (a permission, a read-only file system, a full
    disk or quota) is a DownloadError that says so and where else the file can go. Read as the transfer
    breaking off, a full disk was 'try again', which fails the same way."""
    try:
        yield
    except OSError as error:
        raise DownloadError(
            f"Cannot download into {folder}: {error.strerror or error}. Choose a folder you can write to: "
            f"download_root=... (clip.load) or root=..., or the {CACHE_DIR_VARIABLE} environment variable."
        ) from error


def _too_large(url: str, what: str, max_bytes: int) -> str:
    return (
        f"Downloading {url} was stopped: {what}, more than max_bytes={max_bytes:,}. No released CLIP file is "
        f"that large (the largest, RN50x64, is about 1.3 GB); nothing was kept. If this file really is larger, "
        f"pass a larger max_bytes."
    )


def _mark_in_use(descriptor: int) -> None:
    """Takes an exclusive flock on a partial file while it is written. The kernel drops it when the writer
    ends, however it ends (SIGKILL included): `_remove_stale_partials` leaves a locked partial file alone."""
    if fcntl is None:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without locks: the partial file's age alone protects it


def _remove_stale_partials(folder: Path, name: str) -> list[Path]:
    """Deletes the partial files of `name` in `folder` that killed downloads (SIGKILL, a node failure) left;
    returns their paths.

    Every attempt writes a partial file of its own name, which no later attempt reuses: each killed one left
    up to gigabytes behind for good. A partial file is a dead download's when nobody holds its lock (see
    `_mark_in_use`) and it has not been written to for STALE_PARTIAL_AGE_S. The age as well, because on some
    shared file systems a lock is seen on its own node only (NFS mounted nolock, Lustre with localflock): a
    download on another node would look dead. Two downloads at once thus never remove each other's file."""
    removed = []
    for path in _partial_files(folder, name):
        try:
            # O_NONBLOCK: a FIFO of that name must not block the download; O_NOFOLLOW: a symlink is not ours
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NO_SYMLINK)
        except OSError:  # removed meanwhile by another download, or not a file we wrote
            continue
        try:
            info = os.fstat(descriptor)
            if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime >= STALE_PARTIAL_AGE_S:
                if not _locked_elsewhere(descriptor):
                    path.unlink(missing_ok=True)
                    log.info("removed %s (%.1f MB), left by an interrupted download", path, info.st_size / 1e6)
                    removed.append(path)
        except OSError as error:  # a read-only cache folder: the partial file costs only disk space
            log.warning("could not remove %s, left by an interrupted download: %s", path, error)
        finally:
            os.close(descriptor)
    return removed


def _partial_files(folder: Path, name: str) -> list[Path]:
    """The partial files of downloads of `name` in `folder` (`.NAME.<uuid4 hex>.part`)."""
    prefix, suffix = f".{name}.", ".part"
    try:
        entries = [entry for entry in folder.iterdir() if entry.name.startswith(prefix) and entry.name.endswith(suffix)]
    except OSError:  # no folder yet (or one that cannot be listed, which the download itself will report)
        return []
    return [path for path in entries if _PARTIAL_ID_PATTERN.fullmatch(path.name[len(prefix) : -len(suffix)])]


def _locked_elsewhere(descriptor: int) -> bool:
    """Whether another open file holds a lock on this file: a live download's partial file."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the descriptor is closed
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: the age alone decides
        return False
    return False
