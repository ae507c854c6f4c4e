"""Fetch a file into the local cache, verified by its SHA256.

The cache folder is $CLIP_CACHE_DIR, or ~/.cache/clip when that is unset. A download is written to a temporary
file beside its destination and moved into place only after its checksum matches, so an interrupted or corrupt
download never sits at the final path where the next run would trust it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

from tqdm import tqdm

CACHE_DIR_VARIABLE = "CLIP_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/clip")
# Big enough that Python overhead per chunk is negligible, small enough for a smooth progress bar.
CHUNK_BYTES = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A file could not be fetched, or what was fetched is not the file that was asked for."""


def cache_dir() -> Path:
    """The folder that downloads go to by default: $CLIP_CACHE_DIR, else ~/.cache/clip (not created here)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA256 of a file, read in chunks so that multi-gigabyte checkpoints need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
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

    Raises:
        DownloadError (a RuntimeError): the URL cannot be reached (e.g. offline; the message says where to
            place the file by hand), the transfer broke off, or the downloaded bytes have the wrong SHA256.
    """
    expected = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(expected):
        raise ValueError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    folder = Path(root).expanduser() if root is not None else cache_dir()
    name = filename or Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if name in ("", ".", "..") or "\x00" in name or "/" in name:
        raise ValueError(f"Cannot tell a file name from the URL {url!r}; pass filename=...")
    target = folder / name

    if target.exists():
        if not target.is_file():
            raise DownloadError(f"{target} exists but is not a regular file; remove it or pass another root")
        actual = sha256_of_file(target)
        if actual == expected:
            return target
        warnings.warn(
            f"{target} exists but its SHA256 is {actual}, not the expected {expected}; downloading it again",
            stacklevel=2,
        )

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's own message names only the path: "[Errno 17] File exists"
        raise DownloadError(f"Cannot download into {folder}: it exists and is not a folder") from None
    # A unique name per attempt, so that several processes (one per GPU) may download at once.
    partial = folder / f".{name}.{uuid.uuid4().hex}.part"
    try:
        actual = _fetch(url, partial, target, expected, progress, timeout_s, root_given=root is not None)
        if actual != expected:
            raise DownloadError(
                f"The file downloaded from {url} has SHA256 {actual}, but {expected} was expected; it was not "
                f"saved. The server may be serving a different or corrupted file."
            )
        os.replace(partial, target)  # atomic on POSIX and Windows when both paths are in one folder
    except BaseException:  # also on KeyboardInterrupt: never leave a partial file behind
        partial.unlink(missing_ok=True)
        raise
    return target


def _fetch(
    url: str, partial: Path, target: Path, expected: str, progress: bool, timeout_s: float, root_given: bool
) -> str:
    """Stream `url` into `partial` (which must not exist yet) and return the SHA256 of the bytes written.

    `target`, `expected` and `root_given` (the caller chose the folder) only serve the error messages.
    """
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        message = f"Downloading {url} failed: the server answered HTTP {error.code} {error.reason}"
        raise DownloadError(message) from error
    except OSError as error:  # URLError, refused connections, timeouts, DNS failures: usually offline
        reason = getattr(error, "reason", None) or error
        # The cache variable only matters where the caller did not choose the folder (download_root=...).
        elsewhere = "" if root_given else f" (set {CACHE_DIR_VARIABLE} to use another cache folder)"
        raise DownloadError(
            f"Could not download {url} ({reason}). If this machine is offline, fetch that URL elsewhere and copy "
            f"the file to {target}{elsewhere}. It is used once its SHA256 is {expected}."
        ) from error

    digest = hashlib.sha256()
    received = 0
    with response, open(partial, "xb") as file:
        length_header = response.headers.get("Content-Length")
        expected_bytes = int(length_header) if length_header and length_header.isdigit() else None
        bar = tqdm(
            total=expected_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, disable=not progress
        )
        with bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:  # reset connection, timeout, bad chunking
                message = f"Downloading {url} broke off after {received} bytes ({error}); try again"
                raise DownloadError(message) from error
        file.flush()
        os.fsync(file.fileno())
    # http.client returns a short body without complaint when the connection closes early; count it ourselves.
    if expected_bytes is not None and received != expected_bytes:
        raise DownloadError(
            f"Downloading {url} broke off after {received} of {expected_bytes} bytes; the partial file was "
            f"removed. Try again."
        )
    return digest.hexdigest()
