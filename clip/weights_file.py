"""Read a weights file without running code stored in it, and say clearly what a wrong file is.

- TorchScript archives (OpenAI's release format) go through `clip.torchscript_reader`, never `torch.jit.load`.
- safetensors files (open_clip's release format on the Hugging Face Hub) go through the `safetensors` package
  (an optional dependency): a header and raw tensor bytes, nothing to run.
- Everything else goes through `torch.load(weights_only=True)`: tensors and plain Python values only.
- A run directory resolves to its newest readable `checkpoints/step_XXXXXXXX.pt`, as our trainer's
  `clip.checkpoint` writes them (also `step_N.pt` with fewer digits, and first what a `checkpoints/latest` file
  names, which other tools write; a resume reads only the trainer's own names).

The result is a `LoadedWeights`: the state dict (wrapper prefixes such as DDP's `module.` removed), the
architecture when the file records one (our trainer's checkpoints, which also give their step), and OpenAI's
extra integer entries.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architectures import ModelConfig
from .download import sha256_of_file, sha256_of_open_file
from .exception_chain import allocation_beyond, out_of_memory_in
from .torchscript_reader import (
    ZIP_MEMBER_ERRORS,
    TorchScriptReadError,
    UnsafeArchiveError,
    is_torchscript_archive,
    read_torchscript_weights,
)

# OpenAI's files hold these beside the weights; they are checked against the architecture, then dropped.
EXTRA_ENTRIES = ("input_resolution", "context_length", "vocab_size")
CHECKPOINT_DIR = "checkpoints"
# The "format" entry of the checkpoints our trainer writes (`clip.checkpoint`), which tells their "step" apart
# from any other file's entry of that name.
CHECKPOINT_FORMAT = "clip-pretrain/1"
LATEST_POINTER = "latest"
_MAX_POINTER_BYTES = 4096
_CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
# Prefixes that wrappers add to every key: DistributedDataParallel ("module.") and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2 = b"\x80"
_SHOWN_KEYS = 5


class WeightsFileError(ValueError):
    """A file is not CLIP weights we can load; the message names the file and what was found."""


class UnsafeFileError(WeightsFileError):
    """Loading the file would run code stored in it (a pickle outside the allowlist); it was refused."""


@dataclass
class LoadedWeights:
    """What a weights file holds: the state dict, the architecture when the file records it, and OpenAI's
    extra integer entries when present."""

    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig | None = None
    extras: dict[str, int] = field(default_factory=dict)
    # A SigLIP-trained model's learned logit bias (a checkpoint's loss_parameters, or open_clip's state dict entry),
    # a scalar tensor; None otherwise.
    logit_bias: torch.Tensor | None = None
    # What the file is, said where it most likely comes from open_clip, which records no activation while
    # it trains most of its models (those without "-quickgelu" in their name) with GELU: its training
    # checkpoints ({"epoch", "state_dict", ...}) and its safetensors releases. None for any other file.
    open_clip_origin: str | None = None
    # The training step of a checkpoint our trainer wrote (its "step" entry); None for any other file.
    step: int | None = None
    # Whether this library's trainer trained the weights, where the file says so (clip-export's "trained_here"):
    # an export records the architecture of OpenAI's weights too. None where it does not say: a file that
    # records its architecture is then taken as trained here.
    trained_here: bool | None = None
    # The file's SHA256, where the reader asked for it (`read_run_or_file(..., digest=True)`); None otherwise.
    sha256: str | None = None


def read_weights(path: str | Path) -> LoadedWeights:
    """Read a TorchScript archive or a `torch.save` file without running code stored in it. A read that the
    storage fails (`is_storage_error`) is a WeightsFileError that says so, not that the file is damaged."""
    path = Path(path)
    try:
        return _read_weights(path)
    except Exception as error:
        cause = storage_error_in(error)
        if cause is None:
            raise
        raise WeightsFileError(
            f"could not read {path}: {type(cause).__name__}: {cause} -- the storage failed the read (a network file "
            f"system, a permission), not a sign of a damaged file"
        ) from error


def _read_weights(path: Path) -> LoadedWeights:
    if path.exists() and not path.is_file():  # a FIFO or a device: opening it to look inside could block forever
        raise WeightsFileError(f"{path} is not a regular file")
    if is_torchscript_archive(path):
        return read_archive_weights(path)
    if is_safetensors_file(path):
        weights = _weights_from_state_dict(_read_safetensors(path), None, path)
        # OpenAI released no safetensors; open_clip's Hub releases are, and most of its models use GELU
        weights.open_clip_origin = "a safetensors file (the format of open_clip's releases)"
        return weights
    weights = _weights_from_object(_torch_load_weights_only(path), path)
    if path.name == OPEN_CLIP_HUB_PICKLE and weights.model_config is None and weights.open_clip_origin is None:
        weights.open_clip_origin = f"open_clip's {OPEN_CLIP_HUB_PICKLE} (the pickled copy its Hub releases ship)"
    return weights


# The name of the torch.save state dict open_clip's Hugging Face Hub repositories hold beside the safetensors
# file: most of those models use GELU, and its sizes are often OpenAI's released ones, which loaded as
# QuickGELU without a word
OPEN_CLIP_HUB_PICKLE = "open_clip_pytorch_model.bin"


def read_archive_weights(path: Path, archive_bytes: bytes | None = None) -> LoadedWeights:
    """The weights of the TorchScript archive at `path`, or of its bytes already read (`archive_bytes`: a released
    file's, checked against its SHA256, read from memory so that what was checked is what is loaded; `path` then
    only names it), without running anything stored in it (`clip.torchscript_reader`)."""
    try:
        tensors, _non_weight_attributes = read_torchscript_weights(path, archive_bytes)
    except UnsafeArchiveError as error:
        raise UnsafeFileError(str(error)) from error
    except TorchScriptReadError as error:
        raise WeightsFileError(str(error)) from error
    return _weights_from_state_dict(tensors, None, path)


# A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON (an object)
_SAFETENSORS_LENGTH_BYTES = 8


def is_safetensors_file(path: Path) -> bool:
    """Whether `path` starts as a safetensors file does: a header length that fits in the file, then a JSON
    object's opening brace."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SAFETENSORS_LENGTH_BYTES + 1)
            size = path.stat().st_size
    except OSError:
        return False  # the reader that follows names the error
    if len(head) <= _SAFETENSORS_LENGTH_BYTES:
        return False
    header_length = int.from_bytes(head[:_SAFETENSORS_LENGTH_BYTES], "little")
    return head[_SAFETENSORS_LENGTH_BYTES:] == b"{" and header_length <= size - _SAFETENSORS_LENGTH_BYTES


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsFileError(
            f"{path} is a safetensors file: reading it needs the safetensors package (pip install "
            f"'clip-pretrain[safetensors]', or pip install safetensors)"
        ) from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsFileError(f"{path} is a damaged or truncated safetensors file ({error})") from error


def read_run_or_file(path: Path, *, stacklevel: int = 3, digest: bool = False) -> tuple[Path, LoadedWeights]:
    """For a file: its weights. For a run directory: its newest checkpoint that reads; a torn newer file
    (a crash while writing) is skipped with a warning (naming the frame `stacklevel`, as in `warnings.warn`). A
    newer file that the storage fails to read (EIO, ESTALE, a permission) is an error, not skipped: its weights
    may be whole, and an older checkpoint in their place would be used without anyone asking for it (fine-tuning
    from older weights). Returns the file read with its weights: the one file, whatever is written meanwhile;
    with `digest`, its SHA256 too (`LoadedWeights.sha256`, see `_read_with_digest`)."""
    read = _read_with_digest if digest else read_weights
    if not path.is_dir():
        return path, read(path)
    candidates = checkpoint_candidates(path)
    if not candidates:
        runs = run_directories_in(path)
        raise WeightsFileError(
            f"{path} is a directory without checkpoints: expected {path / CHECKPOINT_DIR}/step_XXXXXXXX.pt files "
            f"(or a {CHECKPOINT_DIR}/{LATEST_POINTER} file naming one)"
            + (f"; it holds run directories: {', '.join(map(str, runs))}" if runs else "")
        )
    failures, tried = [], set()
    while candidates:
        vanished = False
        for candidate in candidates:
            tried.add(candidate)
            try:
                return candidate, read(candidate)
            except (WeightsFileError, OSError) as error:  # OSError: a name `latest` gives that is too long, ...
                cause = storage_error_in(error)
                if cause is not None:
                    raise WeightsFileError(
                        f"could not read {candidate}, the newest checkpoint of {path}: {type(cause).__name__}: "
                        f"{cause} -- a storage error, not a damaged file, so no older checkpoint is used in its "
                        f"place. Try again once the file can be read; to use an older checkpoint, name its file "
                        f"instead of the run."
                    ) from error
                vanished = vanished or _deleted(candidate)
                warnings.warn(f"skipping unreadable checkpoint {candidate}: {error}", stacklevel=stacklevel)
                failures.append(f"{candidate.name}: {error}")
        # A run still training deletes its older checkpoints as it saves newer ones (keep_last): with keep_last = 1
        # every file listed could be gone by the time it was read, while a newer one had been written
        candidates = [entry for entry in checkpoint_candidates(path) if entry not in tried] if vanished else []
    raise WeightsFileError(f"no checkpoint in {path} could be read:\n  " + "\n  ".join(failures))


def _deleted(candidate: Path) -> bool:
    """Whether a checkpoint that failed to read is gone (pruned by the run meanwhile). A name `latest` gives that
    no file can have (too long) makes exists() raise: not a deleted file."""
    try:
        return not candidate.exists()
    except OSError:
        return False


def run_directories_in(path: Path) -> list[Path]:
    """The run directories directly inside `path`, sorted, for a folder of runs (`runs`) given for one of them
    (`runs/my_run`); [] where it cannot be listed. Only folders with a checkpoints folder are looked into: `path`
    may hold image folders."""
    try:
        return sorted(child for child in path.iterdir()
                      if (child / CHECKPOINT_DIR).is_dir() and checkpoint_candidates(child))
    except OSError:  # unlistable: the error says what was expected without the list
        return []


def _read_with_digest(path: Path) -> LoadedWeights:
    """`read_weights`, with the file's SHA256, hashed through a handle opened before the read: a run still
    training deletes its older checkpoints by name (keep_last), and one pruned while it was read and loaded
    would have no file left to hash by its path."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (the reader refuses it after);
        # O_BINARY: Windows reads a descriptor without it as text, turning CRLF into LF
        held = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:  # the reader says why it cannot read the file, or reads it after all (the storage recovered)
        weights = read_weights(path)
        weights.sha256 = sha256_of_file(path)
        return weights
    with os.fdopen(held, "rb") as file:
        weights = read_weights(path)
        weights.sha256 = sha256_of_open_file(file)
    return weights


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run directory, to try in order: the one `checkpoints/latest` names (if any),
    then `checkpoints/step_*.pt` from the highest step down. `run_dir` may also be the checkpoints folder."""
    folder = run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir
    steps = sorted(
        (
            (int(match.group(1)), entry)
            for entry in folder.iterdir()
            if (match := _CHECKPOINT_NAME.fullmatch(entry.name))
        ),
        reverse=True,
    )
    candidates = [entry for _, entry in steps]
    pointer = folder / LATEST_POINTER
    if pointer.is_file():
        target = _pointer_target(pointer)
        candidates = [target] + [entry for entry in candidates if entry.resolve() != target.resolve()]
    return candidates


def _pointer_target(pointer: Path) -> Path:
    """`latest` may be a symlink, a small text file naming a checkpoint (relative to its folder), or a copy."""
    if pointer.is_symlink() or pointer.stat().st_size > _MAX_POINTER_BYTES:
        return pointer.resolve()
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return pointer
    if not name or "\x00" in name:  # no file's name (a null byte made every path call raise ValueError)
        return pointer
    return pointer.parent / name


# The first torch release whose weights_only reader has no published flaw that a crafted file can exploit
# (before 2.6 code execution, CVE-2025-32434; before 2.10 memory corruption, CVE-2026-24747). pyproject requires
# it; an environment set up around pip (conda, --no-deps) may not have it.
SAFE_WEIGHTS_ONLY_TORCH = "2.10"


def warn_if_weights_only_is_unsafe() -> None:
    """A warning (once per place) that this torch's weights_only reader does not protect against crafted files."""
    if torch.torch_version.TorchVersion(torch.__version__) < SAFE_WEIGHTS_ONLY_TORCH:
        warnings.warn(
            f"torch {torch.__version__} is older than {SAFE_WEIGHTS_ONLY_TORCH}: its torch.load(weights_only=True) "
            "has known flaws that a crafted file can use to run code (CVE-2025-32434, CVE-2026-24747); upgrade "
            "torch before loading files you did not make", stacklevel=3,
        )


def _torch_load_weights_only(path: Path) -> object:
    _check_pytorch_file(path)
    warn_if_weights_only_is_unsafe()
    oversized = None
    try:
        with warnings.catch_warnings():
            # torch's "Detected pickle protocol 4 ... please file an issue": the refusal below says what it means
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        # Raised below, outside this handler: its chain then holds no memory failure
        oversized = tensor_beyond_the_file(error, path, path.stat().st_size)
        if oversized is None:
            if out_of_memory_in(error) is not None:
                raise  # not the file's fault: a run directory's reader would take an older checkpoint in its place
            message = str(error)
            refusal = weights_only_refusal(message)
            if refusal is not None:
                raise UnsafeFileError(_refusal_message(path, refusal)) from error
            raise WeightsFileError(
                f"{path} is a damaged or truncated PyTorch file ({type(error).__name__}: {message})"
            ) from error
    if oversized is not None:
        raise WeightsFileError(oversized)
    try:
        damage = archive_damage(path) if zipfile.is_zipfile(path) else None
    except zipfile.BadZipFile as error:  # a damaged zip directory that torch's reader passed over
        damage = f"{path} is a damaged zip archive: {error}"
    if damage is not None:
        raise WeightsFileError(damage)
    return loaded


# Errors of reading a file that say nothing about its contents: the read may succeed when tried again (or with
# other permissions), so the file is not to be judged damaged by them.
_STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EIO", "ESTALE", "ETIMEDOUT", "EACCES", "EPERM", "ENOTCONN", "EHOSTDOWN",
                                      "EHOSTUNREACH", "ECONNRESET", "ECONNABORTED", "EREMOTEIO", "ENOLINK", "EBUSY",
                                      "EAGAIN", "EINTR", "ENOMEM", "ENFILE", "EMFILE")
    if hasattr(errno, name)
)


def is_storage_error(error: BaseException) -> bool:
    """Whether reading failed in the storage (a network file system's EIO or ESTALE, a permission), not in the
    file: a torn file's own OSError (EINVAL from a seek before its start) is not one."""
    return storage_error_in(error) is not None


def storage_error_in(error: BaseException) -> OSError | None:
    """The storage's OSError (see `is_storage_error`) that `error` is or was raised from (a reader's RuntimeError
    wrapping it, this module's WeightsFileError naming the file); None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return error
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def archive_damage(path: Path) -> str | None:
    """What is damaged in a zip archive (torch.save's format): the first member whose bytes do not match
    their stored CRC-32, said in a sentence; None when every member matches.

    torch.load does not check them: a file changed on disk after its save (a bad sector, a faulty copy)
    loaded as if whole, with garbage or NaN among its weights. Reading it once more costs well under a
    second per GB, once per load. A member stored with CRC 0 is not checked: torch writes 0 for every
    member when its CRC computation is turned off (torch.serialization.set_crc32_options(False)), to save
    large checkpoints faster."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size > 0:
                continue
            try:
                with archive.open(info) as member:  # zipfile compares the CRC once the member is read through
                    while member.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                return f"{path} is damaged: its member {info.filename} does not match the checksum saved with it"
            except ZIP_MEMBER_ERRORS as error:  # a corrupt deflate stream, an encryption flag, ...
                # Neither says anything about the bytes: the caller decides what to do
                if is_storage_error(error) or _is_worker_death(error):
                    raise
                return f"{path} is damaged: its member {info.filename} cannot be read ({type(error).__name__}: {error})"
    return None


def _is_worker_death(error: BaseException) -> bool:
    """Whether `error` is torch's report of a dead data worker, which its SIGCHLD handler raises as a plain
    RuntimeError wherever the training process is: also in this read of a checkpoint that pruning checks, where it
    was taken (and cached) as the checkpoint's damage, and the error itself swallowed. Imported here, not at the top:
    loading weights for inference has no use for the data pipeline."""
    from .data.loader import worker_death

    return worker_death(error) is not None


# torch.save's files from before its zip format (or with _use_new_zipfile_serialization=False) begin with its
# magic number, pickled: PROTO, then for protocol 4 and later a FRAME opcode and its 8-byte length, then LONG1.
_LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_PICKLE_FRAME = b"\x95"
# How torch's weights-only reader refuses pickle's FRAME opcode (149), which protocol 4 and later write
_FRAME_REFUSAL = "Unsupported operand 149"


def tensor_beyond_the_file(error: BaseException, path: Path, size: int) -> str | None:
    """What is wrong with the file `path` (of `size` bytes) when torch.load's `error` is its allocator's failure on
    more bytes than the file holds (torch's pre-zip format allocates a storage at its declared size before reading
    it), else None: raised as the file's damage, not this machine's lack of memory."""
    tried = allocation_beyond(error, size)
    if tried is None:
        return None
    return f"{path} is damaged: it declares a tensor of {tried} bytes, more than the whole file's {size} bytes"


def _is_torch_save_file(path: Path) -> bool:
    """Whether `path` is a torch.save file (zip or old format) rather than a pickle written by pickle.dump."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as file:
        head = file.read(2 + 1 + 8 + len(_LEGACY_MAGIC))
    body = head[2:]
    if body.startswith(_PICKLE_FRAME):
        body = body[9:]
    return head.startswith(_PICKLE_PROTOCOL_2) and body.startswith(_LEGACY_MAGIC)


def _refusal_message(path: Path, refusal: str) -> str:
    """Why torch's weights-only reader refused `path`, and what to do: the advice to save a state dict instead
    of a whole model was given for a state dict written by pickle.dump, or with pickle protocol 4 or later."""
    if not _is_torch_save_file(path):
        return (f"{path} was refused: it is a pickle written by pickle.dump, not a torch.save file, and unpickling it "
                f"could run code ({refusal}). Save the weights with torch.save(model.state_dict(), path)")
    if _FRAME_REFUSAL in refusal:
        return (f"{path} was refused: it was written with pickle protocol 4 or later (torch.save(..., "
                f"pickle_protocol=4)), which torch's reader of untrusted files does not read ({refusal}). Save the "
                f"state dict again with torch.save's default protocol")
    return (f"{path} was refused: it holds pickled objects other than tensors and plain Python values, and "
            f"unpickling them could run code ({refusal}). A model saved whole (torch.save(model)) is such a "
            f"file: save its model.state_dict() instead")


def weights_only_refusal(message: str) -> str | None:
    """Why torch.load(weights_only=True) refused a file (its allowlist met a global or an opcode), from the
    error message, whose cause sits on a later line among paragraphs of advice; None for other errors."""
    if "WeightsUnpickler error" in message:
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?: Please use|\n|$)", message)
        return reason.group(1).strip() if reason else message.splitlines()[0]
    # A global of a module torch blocks outright (os, subprocess, ...) is worded without that marker
    blocked = re.search(r"Trying to load unsupported GLOBAL [^\n]*", message)
    return blocked.group(0).strip() if blocked else None


def _check_pytorch_file(path: Path) -> None:
    """Name what a file is when it is clearly not something `torch.save` wrote."""
    if not path.is_file():
        raise WeightsFileError(f"{path} is not a regular file")
    with open(path, "rb") as file:
        head = file.read(_TAR_MAGIC_AT + len(_TAR_MAGIC))
    if not head:
        raise WeightsFileError(f"{path} is empty (0 bytes), not a weights file")
    if head.startswith(_PICKLE_PROTOCOL_2):
        return
    if head.startswith(_ZIP_MAGIC):
        _check_pytorch_zip(path)
        return
    # Weights shipped packed: a tar's header is ASCII and NULs, and read as "a text file beginning '...\x00\x00'"
    if head[_TAR_MAGIC_AT:].startswith(_TAR_MAGIC):
        what = "a tar archive: unpack it (tar -xf) and pass the weights file inside"
    elif head.startswith(_GZIP_MAGIC):
        what = "a gzip-compressed file: decompress it (a .tar.gz is then a tar archive to unpack) and pass the result"
    elif b"\x00" not in head[:64] and _is_utf8(head[:64]):
        what = f"a text file beginning {head[:64].decode('utf-8', 'replace')[:40]!r}"
    else:
        what = f"a binary file beginning {head[:8].hex(' ')}"
    raise WeightsFileError(
        f"{path} is not a PyTorch weights file: it is {what}; expected a TorchScript archive, a torch.save file or "
        f"a safetensors file"
    )


# A POSIX tar header names its format at byte 257 ("ustar", then a NUL or spaces); gzip's first two bytes
_TAR_MAGIC_AT, _TAR_MAGIC = 257, b"ustar"
_GZIP_MAGIC = b"\x1f\x8b"


def _is_utf8(data: bytes) -> bool:
    """Whether `data` (a file's first bytes, maybe cut inside a character) reads as UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(data) - 3 and error.reason == "unexpected end of data"
    return True


def _check_pytorch_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # torch.load names the damage (e.g. a truncated file)
    except (UnicodeDecodeError, NotImplementedError) as error:  # zipfile's own errors named neither the file nor
        # its directory: a member name flagged UTF-8 that is not, a version field beyond any zip's
        raise WeightsFileError(
            f"{path} is a damaged zip archive: its directory cannot be read ({type(error).__name__}: {error})"
        ) from None
    if not any(name.endswith("/data.pkl") for name in names):
        listing = ", ".join(names[:_SHOWN_KEYS]) + (", ..." if len(names) > _SHOWN_KEYS else "")
        raise WeightsFileError(f"{path} is a zip archive but not a PyTorch file: it holds {listing}")


def _weights_from_object(loaded: object, path: Path) -> LoadedWeights:
    if isinstance(loaded, torch.Tensor):
        raise WeightsFileError(f"{path} holds a single tensor of shape {tuple(loaded.shape)}, not a state dict")
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}, not a state dict or a checkpoint dict")
    if _is_state_dict(loaded):
        return _weights_from_state_dict(loaded, None, path)
    # "model_state_dict": the name PyTorch's tutorials save a general checkpoint's weights under
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded.get(key), Mapping) and _is_state_dict(loaded[key]):
            weights = _weights_from_state_dict(loaded[key], _config_from_checkpoint(loaded.get("config"), path), path)
            if key == "state_dict" and "epoch" in loaded and "config" not in loaded:
                weights.open_clip_origin = "an open_clip training checkpoint"
            if loaded.get("architecture_inferred") is True:
                # clip-export's file of weights whose source recorded no architecture: its config is the guess
                # made from the shapes, made again here with the source's warnings
                weights.model_config = None
                origin = loaded.get("open_clip_origin")
                weights.open_clip_origin = origin if isinstance(origin, str) else None
            step = loaded.get("step")
            if loaded.get("format") == CHECKPOINT_FORMAT and isinstance(step, int) and not isinstance(step, bool):
                weights.step = step
            if isinstance(loaded.get("trained_here"), bool):
                weights.trained_here = loaded["trained_here"]
            loss_parameters = loaded.get("loss_parameters")
            bias = loss_parameters.get("logit_bias") if isinstance(loss_parameters, Mapping) else None
            if isinstance(bias, torch.Tensor) and bias.numel() == 1:
                weights.logit_bias = bias.detach().float().reshape(())
            return weights
    raise WeightsFileError(
        f"{path} holds a dict without model weights (keys: {_sample(loaded)}); expected a state dict (name -> "
        f"tensor) or a checkpoint with a 'model', 'state_dict' or 'model_state_dict' entry"
    )


def _is_state_dict(candidate: Mapping) -> bool:
    tensors = [value for value in candidate.values() if isinstance(value, torch.Tensor)]
    others = [key for key, value in candidate.items() if not isinstance(value, torch.Tensor)]
    return (bool(tensors) and all(isinstance(key, str) for key in candidate)  # {0: tensor}: no parameter's name
            # OpenAI's entries of any type: _extra_entry takes 32.0 and names what is no whole number, where
            # "a dict without model weights" said nothing of the entry
            and all(key in EXTRA_ENTRIES for key in others))


def _config_from_checkpoint(config: object, path: Path) -> ModelConfig | None:
    """The ModelConfig of a trainer checkpoint's resolved config, or None when it records none."""
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return None
    try:
        return ModelConfig.from_dict(dict(config["model"]))
    except (TypeError, ValueError, KeyError) as error:
        raise WeightsFileError(f"{path}: its config's 'model' entry is not a valid ModelConfig ({error})") from error


def weights_from_state_dict(state: Mapping) -> LoadedWeights:
    """A state dict already in memory, as a file holding it would be read (wrapper prefixes removed,
    OpenAI's extra integer entries set apart)."""
    return _weights_from_state_dict(state, None, Path("<state dict>"))


def _weights_from_state_dict(state: Mapping, config: ModelConfig | None, path: Path) -> LoadedWeights:
    state = dict(state)
    # In either order of wrapping: DDP of a compiled model ("module._orig_mod.") or a compiled DDP model
    while state and (prefix := next((p for p in _WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)):
        state = {key[len(prefix) :]: value for key, value in state.items()}
    extras = {key: _extra_entry(key, state.pop(key), path) for key in EXTRA_ENTRIES if key in state}
    # Constant attention masks are not weights; some exporters keep them as attributes.
    state = {key: value for key, value in state.items() if key.rsplit(".", 1)[-1] != "attn_mask"}
    # open_clip keeps a SigLIP-trained model's bias in its state dict, where this library's checkpoints keep it
    # beside it (loss_parameters): it was refused as an unexpected key
    bias = state.get("logit_bias")
    logit_bias = None
    if isinstance(bias, torch.Tensor) and bias.numel() == 1 and bias.is_floating_point():
        logit_bias = state.pop("logit_bias").detach().float().reshape(())
    return LoadedWeights(state_dict=state, model_config=config, extras=extras, logit_bias=logit_bias)


def _extra_entry(key: str, value: object, path: Path) -> int:
    """One of OpenAI's extra entries as the whole number it must be (a 0-d integer tensor in OpenAI's files);
    int() of any other tensor raised torch's ValueError, naming neither the file nor the entry."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta else value
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, int):
        return number
    what = f"a tensor of shape {tuple(number.shape)}" if isinstance(number, torch.Tensor) else repr(number)
    raise WeightsFileError(f"{path}: its {key} entry is {what:.80}, not a whole number")


def _overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` share memory (a stride of 0, or strides that overlap)."""
    extent = 0  # the farthest element reached by the dimensions of smaller strides
    dimensions = sorted(((size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1),
                        key=lambda dimension: dimension[1])
    for size, stride in dimensions:
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def check_backed_by_storage(state: Mapping[str, torch.Tensor], keys, source: str) -> None:
    """Refuses weights that declare more than they store, counting the model's own entries (`keys`, after
    their names and shapes are checked): a tensor whose elements repeat their memory (stride 0, overlapping
    strides), and entries that share one another's memory. torch.save and TorchScript archives keep such
    views as they are, so a 97 KB file of them loaded as a 577 MB model, or a file of one block whose
    entries for every other block are that block's tensors, as a model of any depth. A CLIP model ties none of
    its weights; extra entries that are views (a transposed copy under another name) are refused by name."""
    declared, held = 0, {}
    for key in keys:
        tensor = state[key]
        storage = tensor.untyped_storage()
        if tensor.numel() > 1 and _overlaps_itself(tensor):
            raise WeightsFileError(
                f"{source}: {key} repeats its data (a stride of 0 or overlapping strides): loading would expand "
                f"it to {tensor.numel() * tensor.element_size()} bytes; not weights a model was saved with"
            )
        declared += tensor.numel() * tensor.element_size()
        held[storage.data_ptr()] = storage.nbytes()
    if declared > sum(held.values()):
        raise WeightsFileError(
            f"{source}: the model's tensors share their data ({declared} bytes declared, {sum(held.values())} "
            f"stored): one entry's memory under several names, which loading would copy to each; not weights a "
            f"model was saved with"
        )


def _sample(mapping: Mapping, count: int = _SHOWN_KEYS) -> str:
    keys = [repr(key) for key in list(mapping)[:count]]
    return ", ".join(keys) + (", ..." if len(mapping) > count else "")
