"""Read the weights out of a TorchScript archive without running anything stored in it.

`torch.jit.load` compiles the archive's `code/` and unpickles `data.pkl` with classes of the archive's own
choosing, and `torch.load(weights_only=True)` refuses TorchScript archives altogether. This reader opens the
zip itself and unpickles `data.pkl` with a `pickle.Unpickler` that resolves only a short allowlist of globals:

- `__torch__.*` (the archive's TorchScript classes, i.e. its modules) -> `ScriptObject`, an inert record of
  the attributes the archive stores for that object;
- `torch._utils._rebuild_tensor(_v2)` -> our own function that views a storage with a size/stride/offset;
- `torch.<Dtype>Storage` -> a marker naming the dtype of a storage record;
- `collections.OrderedDict` and the `torch.jit._pickle` list/type-tag builders -> plain containers.

Anything else (e.g. `os.system`, `builtins.eval`) is refused. Storages are read from the zip's `data/<key>`
records, checked against the size the pickle claims, and wrapped with `torch.frombuffer`.

Which tensor attributes are weights: each TorchScript class in `code/` declares `__parameters__` and
`__buffers__`; only those become state-dict entries (others, e.g. a constant attention mask kept as a plain
attribute, are reported as dropped). The declarations are read as text and never executed.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Self

import torch

from .exception_chain import out_of_memory_in

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Keys of `data/` records are short decimal (or hex) strings; anything else could name another record.
_RECORD_KEY = re.compile(r"[0-9A-Za-z_]{1,32}")
_MAX_OBJECT_DEPTH = 64
# Attribute names are Python identifiers of a module's code: far shorter than this
_MAX_ATTRIBUTE_NAME = 1024
# What zipfile raises for a damaged member: a bad CRC, a corrupt deflate stream (zlib.error), an encryption
# flag (RuntimeError), an unknown compression method (NotImplementedError), a member cut short (EOFError), a
# name flagged UTF-8 in its local header that is not (UnicodeDecodeError).
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, OSError, EOFError,
                     UnicodeDecodeError)
# TorchScript prints each class as `class Name(...):` and its declarations on one line each.
_CLASS_LINE = re.compile(r"class (\w+)\b")
_DECLARATION = re.compile(r"[ \t]+(__parameters__|__buffers__) = \[([^\]]*)\][ \t]*")
# A module's code file is a few KB; the cap bounds what a small compressed member can expand to.
_MAX_CODE_BYTES = 64 << 20
_MAX_PICKLE_BYTES = 16 << 20


class TorchScriptReadError(ValueError):
    """The file is not a TorchScript archive we can read, or it is damaged."""


class UnsafeArchiveError(TorchScriptReadError):
    """The archive's pickle references a global outside the allowlist: reading it could run code."""


class ScriptObject:
    """Stands in for an instance of one of the archive's TorchScript classes. It only records what the pickle
    hands it; it has no behaviour, so nothing of the archive's code can run through it."""

    qualified_name = ""

    def __new__(cls, *args: Any) -> Self:
        instance = object.__new__(cls)
        instance.constructor_args = args
        instance.state = None
        return instance

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    """What `torch.FloatStorage` and friends resolve to: only the dtype of a storage record."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _identity_list(values: Any) -> Any:
    return values


def _restore_type_tag(value: Any, type_string: str) -> Any:
    return value


_JIT_PICKLE_HELPERS = {
    "build_intlist": _identity_list,
    "build_doublelist": _identity_list,
    "build_boollist": _identity_list,
    "build_tensorlist": _identity_list,
    "build_genericlist": _identity_list,
    "restore_type_tag": _restore_type_tag,
}


def is_torchscript_archive(path: str | Path | BinaryIO) -> bool:
    """True for a zip with one top folder holding `data.pkl` and `code/` (or `constants.pkl`): what
    `torch.jit.save` writes. A `torch.save` zip has `data.pkl` but neither of the others. `path` may also be an
    open binary file (an archive's bytes in an io.BytesIO)."""
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        return False  # a FIFO's open waits for a writer (forever); a folder or device is no archive either
    try:
        if not zipfile.is_zipfile(path):  # which raises BadZipFile for some damaged zip64 records
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError):  # damaged: the caller names it
        return False
    root = _archive_root(names)
    if root is None:
        return False
    return any(name.startswith(f"{root}/code/") for name in names) or f"{root}/constants.pkl" in names


def _archive_root(names: list[str]) -> str | None:
    roots = {name[: -len("/data.pkl")] for name in names if name.endswith("/data.pkl") and name.count("/") == 1}
    return next(iter(roots)) if len(roots) == 1 else None


def read_torchscript_weights(
    path: str | Path, archive_bytes: bytes | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The archive's state dict as `{dotted.name: tensor}`, plus the names of tensor attributes that are
    neither parameters nor buffers (dropped). Tensors live on the CPU in the archive's dtypes, in memory of their
    own. `archive_bytes`: the archive, already read (a released file's bytes, checked against its SHA256), which
    `path` then only names in messages: the file there may have changed since."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path if archive_bytes is None else io.BytesIO(archive_bytes)) as archive:
            file_size = path.stat().st_size if archive_bytes is None else len(archive_bytes)
            names = archive.namelist()
            root = _archive_root(names)
            if len(set(names)) != len(names):  # zipfile reads the last of equal names, torch the first
                # (found in one pass: names.count per name took minutes for 80,000 entries, a 7 MB file)
                duplicate = next(name for name, count in collections.Counter(names).items() if count > 1)
                raise TorchScriptReadError(f"{path} is a damaged archive: it holds two members named {duplicate}")
            if root is None:
                raise TorchScriptReadError(f"{path} is a zip file but not a TorchScript archive (no */data.pkl)")
            _check_byte_order(archive, root, path)
            top = _unpickle_data(archive, root, path, file_size)
            if not isinstance(top, ScriptObject):
                raise TorchScriptReadError(f"{path}: data.pkl holds a {type(top).__name__}, not a TorchScript module")
            weights: dict[str, torch.Tensor] = {}
            dropped: list[str] = []
            _collect_tensors(top, "", _DeclaredWeights(archive, root, path), weights, dropped, set(), 0)
    except ZIP_MEMBER_ERRORS as error:
        if out_of_memory_in(error) is not None:  # torch's allocator's RuntimeError: not the archive's damage
            raise
        raise TorchScriptReadError(
            f"{path} is a damaged or truncated TorchScript archive ({type(error).__name__}: {error})"
        ) from error
    return weights, dropped


def _unpickle_data(archive: zipfile.ZipFile, root: str, path: Path, file_size: int) -> Any:
    info = archive.getinfo(f"{root}/data.pkl")
    if info.file_size > _MAX_PICKLE_BYTES:
        # A few hundred KB in the released archives; 200 MB of one-byte opcodes (a 200 KB compressed member) took
        # 2 GB of the unpickler's stack
        raise TorchScriptReadError(f"{path}: its data.pkl declares {info.file_size} bytes, more than a TorchScript "
                                   f"module's object tree takes (at most {_MAX_PICKLE_BYTES})")
    unpickler = None
    try:
        with archive.open(info) as data:
            unpickler = _WeightsUnpickler(data, archive, root, path, file_size)
            return unpickler.load()
    except (TorchScriptReadError, *ZIP_MEMBER_ERRORS):
        raise  # a storage record's damage: named as the archive's, not data.pkl's
    except Exception as error:  # a malformed pickle can raise nearly anything (KeyError, TypeError, ...)
        if out_of_memory_in(error) is not None and (unpickler is None or unpickler.storage_memory_failed):
            raise  # a weight's memory, which the machine lacks: says nothing about the archive
        # Otherwise the unpickler itself ran out (a 300-byte pickle whose BINBYTES8 opcode declares 2**45 bytes,
        # which Python allocates before reading): the pickle's fault
        raise TorchScriptReadError(f"{path}: its data.pkl is damaged ({type(error).__name__}: {error})") from error


def _check_byte_order(archive: zipfile.ZipFile, root: str, path: Path) -> None:
    name = f"{root}/byteorder"
    if name in archive.namelist():
        size = archive.getinfo(name).file_size
        if size > 16:  # "little" or "big": read whole, a 1 MB member took 2 GB
            raise TorchScriptReadError(f"{path}: its byteorder member is {size} bytes long")
        order = archive.read(name).decode("ascii", "replace").strip()
        if order != "little":
            raise TorchScriptReadError(f"{path} was written on a {order}-endian machine; only little-endian is read")


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, data: BinaryIO, archive: zipfile.ZipFile, root: str, path: Path, file_size: int) -> None:
        super().__init__(data)
        self.archive = archive
        self.root = root
        self.path = path
        self.file_size = file_size  # of the archive read: a stored record must fit in it
        # Bytes of the file the records read so far take: records of a zip do not overlap, so together they fit
        # in the file too (records nested in each other, each fitting alone, made a 1 MB file allocate 300 MB)
        self.record_bytes_taken = 0
        self.storages: dict[str, torch.Tensor] = {}
        self.script_classes: dict[str, type] = {}
        # Whether a weight's memory could not be allocated: the machine's lack, not the pickle's fault
        self.storage_memory_failed = False

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self._script_class(f"{module}.{name}")
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _JIT_PICKLE_HELPERS[name]
        raise UnsafeArchiveError(
            f"{self.path}: its data.pkl references {module}.{name}, which is not on the allowlist for weights "
            f"archives; refusing to read it, because unpickling it could run arbitrary code"
        )

    def _script_class(self, qualified_name: str) -> type:
        if qualified_name not in self.script_classes:
            self.script_classes[qualified_name] = type(
                "ScriptObject", (ScriptObject,), {"qualified_name": qualified_name}
            )
        return self.script_classes[qualified_name]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptReadError(f"{self.path}: unexpected persistent id {pid!r:.80} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _RECORD_KEY.fullmatch(key):
            raise TorchScriptReadError(f"{self.path}: malformed storage reference {pid!r:.80} in data.pkl")
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, storage_type.dtype, numel)
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: Any) -> torch.Tensor:
        record = f"{self.root}/data/{key}"
        try:
            info = self.archive.getinfo(record)
        except KeyError:
            raise TorchScriptReadError(f"{self.path}: data.pkl refers to a missing record {record}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not isinstance(numel, int) or numel < 0 or info.file_size != numel * itemsize:
            raise TorchScriptReadError(
                f"{self.path}: record {record} holds {info.file_size} bytes, but data.pkl describes {numel!r} "
                f"elements of {dtype}"
            )
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        try:
            buffer = self._record_bytes(info)
        except MemoryError:
            self.storage_memory_failed = True
            raise
        return torch.frombuffer(buffer, dtype=dtype)

    def _record_bytes(self, info: zipfile.ZipInfo) -> bytearray:
        """A record's bytes. The sizes in the zip's directory are the file's word: a stored record must fit in
        the file before its memory is allocated (a 1 KB file declaring a 2 GB record made us allocate 2 GB),
        and a compressed one grows with what it actually decompresses to."""
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and (info.compress_size != info.file_size or info.header_offset + info.file_size > self.file_size):
            raise TorchScriptReadError(
                f"{self.path}: record {info.filename} declares {info.file_size} bytes, more than the file "
                f"holds ({self.file_size} bytes): it is truncated or damaged"
            )
        self.record_bytes_taken += info.compress_size
        if self.record_bytes_taken > self.file_size:
            raise TorchScriptReadError(
                f"{self.path}: its records take more bytes together than the file holds ({self.file_size} bytes): "
                f"they overlap, which no zip writer does; the file is damaged or crafted"
            )
        if stored:
            buffer = bytearray(info.file_size)  # read straight into the tensor's memory, no intermediate bytes
            with self.archive.open(info) as record_file:
                if record_file.readinto(buffer) != info.file_size:
                    raise TorchScriptReadError(f"{self.path}: record {info.filename} is shorter than its zip entry says")
            return buffer
        if info.compress_type != zipfile.ZIP_DEFLATED:  # torch writes records stored, and reads only deflate
            raise TorchScriptReadError(
                f"{self.path}: record {info.filename} uses zip compression method {info.compress_type}; "
                f"TorchScript archives store their records uncompressed or deflated"
            )
        buffer = bytearray()
        with self.archive.open(info) as record_file:  # zipfile stops at the declared size and checks the CRC
            while chunk := record_file.read(1 << 24):
                buffer += chunk
        if len(buffer) != info.file_size:
            raise TorchScriptReadError(f"{self.path}: record {info.filename} is shorter than its zip entry says")
        return buffer

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
        # The trailing arguments (requires_grad, backward hooks, metadata) do not matter for loading weights.
        if not isinstance(storage, torch.Tensor):
            raise TorchScriptReadError(f"{self.path}: a tensor in data.pkl is not backed by a storage record")
        try:
            return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))
        except (RuntimeError, TypeError, ValueError) as error:
            raise TorchScriptReadError(
                f"{self.path}: a tensor's size/stride does not fit its storage ({error})"
            ) from error


class _DeclaredWeights:
    """Parameter and buffer names per TorchScript class, read as text from the archive's `code/` files.

    Each file is read and parsed once, line by line: the time is linear in its length however it is laid
    out (multi-line regular expressions over a class body took time quadratic in its length, and each class
    re-read its file: a 2 KB archive of blank lines kept the loader busy for hours)."""

    def __init__(self, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        self.archive = archive
        self.root = root
        self.path = path
        self.files: dict[str, dict[str, set[str] | None]] = {}

    def names(self, qualified_name: str) -> set[str] | None:
        """The class's parameters and buffers, or None when its declaration cannot be found."""
        module, _, class_name = qualified_name.rpartition(".")
        source_name = f"{self.root}/code/{module.replace('.', '/')}.py"
        if source_name not in self.files:
            self.files[source_name] = self._parse_file(source_name)
        return self.files[source_name].get(class_name)

    def _parse_file(self, source_name: str) -> dict[str, set[str] | None]:
        try:
            info = self.archive.getinfo(source_name)
        except KeyError:
            return {}
        if info.file_size > _MAX_CODE_BYTES:
            raise TorchScriptReadError(
                f"{self.path}: its code file {source_name} declares {info.file_size} bytes, far more than a "
                f"TorchScript module's code takes (at most {_MAX_CODE_BYTES})"
            )
        source = self.archive.read(info).decode("utf-8", "replace")
        classes: dict[str, set[str] | None] = {}
        current: str | None = None  # the class whose body the lines belong to
        declared: dict[str, set[str]] = {}
        for line in source.splitlines():
            if line[:1] not in ("", " ", "\t"):  # a top-level statement ends the class body
                if current is not None:
                    classes.setdefault(current, _weight_names(declared))
                header = _CLASS_LINE.match(line)
                current, declared = (header.group(1) if header else None), {}
                continue
            declaration = _DECLARATION.fullmatch(line)
            if current is not None and declaration is not None:
                declared.setdefault(declaration.group(1), set(re.findall(r'"([^"]*)"', declaration.group(2))))
        if current is not None:
            classes.setdefault(current, _weight_names(declared))
        return classes


def _weight_names(declared: dict[str, set[str]]) -> set[str] | None:
    if "__parameters__" not in declared or "__buffers__" not in declared:
        return None  # an archive format without these declarations: keep every tensor attribute
    return declared["__parameters__"] | declared["__buffers__"]


def _collect_tensors(
    obj: ScriptObject,
    prefix: str,
    declared: _DeclaredWeights,
    weights: dict[str, torch.Tensor],
    dropped: list[str],
    seen: set[int],
    depth: int,
) -> None:
    if id(obj) in seen or depth > _MAX_OBJECT_DEPTH:
        return
    seen.add(id(obj))
    if not isinstance(obj.state, dict):
        return  # a class with a custom __getstate__ (not a module): it holds no state-dict entries
    weight_names = declared.names(obj.qualified_name)
    for name, value in obj.state.items():
        if not isinstance(name, str):
            continue
        if len(name) > _MAX_ATTRIBUTE_NAME:  # each level's prefix kept a copy: 64 levels of one long name, GBs
            raise TorchScriptReadError(f"{declared.path}: an attribute name of {len(name)} characters under "
                                       f"{prefix[:80]!r}: no archive torch.jit.save writes has one; the file is "
                                       f"damaged or crafted")
        if isinstance(value, torch.Tensor):
            if weight_names is None or name in weight_names:
                weights[prefix + name] = value
            else:
                dropped.append(prefix + name)
        elif isinstance(value, ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", declared, weights, dropped, seen, depth + 1)
