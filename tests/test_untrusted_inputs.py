"""Adversarial inputs to every reader of files and strings the library did not write: weights files
(hand-built TorchScript archives and torch.save zips), downloads, config files, text, and evaluation images.
Each must be refused with a one-line error naming the file (or skipped and counted), never run code,
hang, or allocate what a file merely declares."""

from __future__ import annotations

import os
import pickle
import re
import struct
import threading
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from clip.weights_file import UnsafeFileError, WeightsFileError, read_weights

# ---------------------------------------------------------------------------------------------------------
# Hand-built TorchScript archives: the layout torch.jit.save writes, without tracing anything

ROOT = "m"
CODE = 'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n  training : bool\n'


def _literal(value: object) -> bytes:
    """The protocol-2 opcodes that push `value` (without the PROTO header and STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def module_pickle(
    numel: int = 6, offset: int = 0, size: tuple = (2, 3), stride: tuple = (3, 1), dtype: str = "FloatStorage"
) -> bytes:
    """data.pkl of a TorchScript module `__torch__.M` whose one parameter `w` views storage record 0."""
    tensor = (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _literal("storage") + b"ctorch\n" + dtype.encode() + b"\n" + _literal("0") + _literal("cpu")
        + _literal(numel) + b"tQ" + _literal(offset) + _literal(size) + _literal(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )
    return b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + tensor + b"ub."


def write_archive(
    path: Path,
    data_pkl: bytes | None = None,
    record: bytes = bytes(24),
    code: str = CODE,
    compression: int = zipfile.ZIP_STORED,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(f"{ROOT}/data.pkl", module_pickle() if data_pkl is None else data_pkl)
        archive.writestr(f"{ROOT}/code/__torch__.py", code)
        archive.writestr(f"{ROOT}/data/0", record)
        archive.writestr(f"{ROOT}/byteorder", b"little")
        for name, data in extra:
            archive.writestr(name, data)
    return path


def set_central_directory(path: Path, member: str, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of `member`'s central-directory entry (offsets as in the zip specification)."""
    data = bytearray(path.read_bytes())
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        name_length = struct.unpack_from("<H", data, position + 28)[0]
        if data[position + 46 : position + 46 + name_length] == member.encode():
            struct.pack_into(fmt, data, position + offset, value)
            path.write_bytes(bytes(data))
            return
        position = data.find(b"PK\x01\x02", position + 4)
    raise AssertionError(f"{member} not in {path}")


def member_data_offset(path: Path, member: str) -> tuple[int, int]:
    """(offset of the member's bytes in the file, their stored length)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


def test_hand_built_archive_reads(tmp_path: Path) -> None:
    weights = read_weights(write_archive(tmp_path / "m.pt", record=torch.arange(6.0).numpy().tobytes()))
    assert torch.equal(weights.state_dict["w"], torch.arange(6.0).reshape(2, 3))


def test_a_record_declaring_more_bytes_than_the_file_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    # A 1 KB file whose zip directory (and data.pkl) declare a 256 MB record: the reader allocated it all
    # (bytearray of the declared size) before finding the record short.
    numel = 64 << 20
    path = write_archive(tmp_path / "bomb.pt", data_pkl=module_pickle(numel=numel))
    set_central_directory(path, f"{ROOT}/data/0", 20, "<I", numel * 4)  # compressed size
    set_central_directory(path, f"{ROOT}/data/0", 24, "<I", numel * 4)  # uncompressed size
    tracemalloc.start()
    try:
        with pytest.raises(WeightsFileError, match=r"bomb\.pt: record m/data/0 declares 268435456 bytes, more than"):
            read_weights(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20



def test_a_deflated_record_larger_than_the_whole_file_is_read(tmp_path: Path) -> None:
    # Records take their compressed bytes of the file: a million zeros deflate to a few KB
    numel = 1 << 20
    path = write_archive(tmp_path / "zeros.pt", data_pkl=module_pickle(numel=numel, size=(numel,), stride=(1,)),
                         record=bytes(4 * numel), compression=zipfile.ZIP_DEFLATED,
                         code=CODE)
    assert path.stat().st_size < 4 * numel // 100
    assert torch.equal(read_weights(path).state_dict["w"], torch.zeros(numel))


def test_records_nested_inside_each_other_are_refused_before_they_fill_the_memory(tmp_path: Path) -> None:
    # Each record fits in the file alone, but record 0's bytes are record 1's header and data: records that
    # overlap, which Python's zipfile before 3.11.8 / 3.12.2 lets through. Nested N deep, a 1 MB file made the
    # reader allocate 300 MB. Refused by the reader (records take more bytes together than the file holds) or,
    # on a newer Python, by zipfile itself: either way a damaged file, named.
    import zlib

    def tensor(key: str, dtype: str, numel: int) -> bytes:
        return (b"ctorch._utils\n_rebuild_tensor_v2\n((" + _literal("storage") + b"ctorch\n" + dtype.encode() + b"\n"
                + _literal(key) + _literal("cpu") + _literal(numel) + b"tQ" + _literal(0) + _literal((numel,))
                + _literal((1,)) + b"\x89ccollections\nOrderedDict\n)RtR")

    def local_header(name: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data)
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0) + name

    inner = bytes(40_000)  # record 1: 10,000 floats
    outer = local_header(f"{ROOT}/data/1".encode(), inner) + inner  # record 0: bytes that are record 1 whole
    data_pkl = (b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + tensor("0", "ByteStorage", len(outer))
                + _literal("v") + tensor("1", "FloatStorage", len(inner) // 4) + b"ub.")
    code = CODE.replace('["w", ]', '["w", "v", ]')
    members = [(f"{ROOT}/data.pkl", data_pkl), (f"{ROOT}/code/__torch__.py", code.encode()),
               (f"{ROOT}/byteorder", b"little"), (f"{ROOT}/data/0", outer)]
    body, directory = b"", b""
    for name, data in members:
        offset, body = len(body), body + local_header(name.encode(), data) + data
        directory += _central_entry(name.encode(), data, offset)
    record_1_at = len(body) - len(outer) + 30 + len(f"{ROOT}/data/0")  # inside record 0's bytes
    directory += _central_entry(f"{ROOT}/data/1".encode(), inner, record_1_at)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 5, 5, len(directory), len(body), 0)
    path = tmp_path / "nested.pt"
    path.write_bytes(body + directory + end)
    with pytest.raises(WeightsFileError, match=r"nested\.pt: (its records take more bytes together than the file "
                                               r"holds .*: they overlap|.*damaged.*Overlapped entries)"):
        read_weights(path)


def _central_entry(name: bytes, data: bytes, offset: int) -> bytes:
    """A zip central-directory entry of a stored member whose local header is at `offset`."""
    import zlib

    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                       len(name), 0, 0, 0, 0, 0, offset) + name


def test_an_attribute_name_longer_than_any_identifier_is_refused(tmp_path: Path) -> None:
    # Each nesting level kept its own copy of the name in its prefix: one 512 KB name reused 64 levels deep, in a
    # 1 KB archive, took a gigabyte
    long_name = module_pickle().replace(_literal("w"), _literal("w" * 2000), 1)
    path = write_archive(tmp_path / "named.pt", data_pkl=long_name)
    with pytest.raises(WeightsFileError, match=r"named\.pt: an attribute name of 2000 characters under ''"):
        read_weights(path)

def test_a_deflated_record_is_read(tmp_path: Path) -> None:
    values = torch.arange(6.0)
    path = write_archive(tmp_path / "rezipped.pt", record=values.numpy().tobytes(), compression=zipfile.ZIP_DEFLATED)
    assert torch.equal(read_weights(path).state_dict["w"].flatten(), values)


def _weight_names(path: Path) -> list[str]:
    from clip.torchscript_reader import read_torchscript_weights

    weights, _ = read_torchscript_weights(path)
    return sorted(weights)


def test_a_code_file_of_blank_lines_does_not_stall_the_reader(tmp_path: Path) -> None:
    # The class-body patterns crossed lines (`^\\s+__parameters__`): time quadratic in the body's length. This
    # 3 KB archive (2 MB of blank lines once inflated) took hours; the timeout only detects such a stall (in a
    # fork, which it kills).
    from multiprocess import run_in_fork

    code = "class M(Module):\n" + " \n" * 1_000_000
    path = write_archive(tmp_path / "blank.pt", code=code, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 10_000
    assert run_in_fork(_weight_names, path, timeout_s=240) == ["w"]


def test_declarations_are_read_per_class_of_a_shared_code_file(tmp_path: Path) -> None:
    code = (
        'class Other(Module):\n  __parameters__ = []\n  __buffers__ = []\n'
        'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n'
    )
    extra_attribute = module_pickle()[:-3] + _literal("mask") + b"ctorch._utils\n_rebuild_tensor_v2\n(("
    extra_attribute += _literal("storage") + b"ctorch\nFloatStorage\n" + _literal("0") + _literal("cpu")
    extra_attribute += _literal(6) + b"tQ" + _literal(0) + _literal((6,)) + _literal((1,))
    extra_attribute += b"\x89ccollections\nOrderedDict\n)RtRub."
    path = write_archive(tmp_path / "m.pt", data_pkl=extra_attribute, code=code)
    assert set(read_weights(path).state_dict) == {"w"}  # `mask` is no parameter or buffer of M


def _corrupt_deflated_code(path: Path) -> None:
    start, length = member_data_offset(path, f"{ROOT}/code/__torch__.py")
    data = bytearray(path.read_bytes())
    for index in range(start, start + length):
        data[index] ^= 0x5A
    path.write_bytes(bytes(data))


def _flag_encrypted(path: Path) -> None:
    set_central_directory(path, f"{ROOT}/byteorder", 8, "<H", 1)


def _unknown_compression(path: Path) -> None:
    set_central_directory(path, f"{ROOT}/byteorder", 10, "<H", 99)


def _local_name_not_utf8(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(f"{ROOT}/byteorder").header_offset
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, offset + 6, struct.unpack_from("<H", data, offset + 6)[0] | 0x800)  # UTF-8 flag
    data[offset + 30] = 0xFF  # the first byte of the member's name in its local header
    path.write_bytes(bytes(data))


def _zip_version_beyond_any(path: Path) -> None:
    set_central_directory(path, f"{ROOT}/byteorder", 6, "<H", 126)  # "version needed to extract": 12.6


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_local_name_not_utf8, r"damaged or truncated TorchScript archive \(UnicodeDecodeError: 'utf-8' codec"),
        (_zip_version_beyond_any, r"damaged zip archive: its directory cannot be read \(NotImplementedError"),
        (_corrupt_deflated_code, r"damaged or truncated TorchScript archive \(error: Error -3 while decompressing"),
        (_flag_encrypted, r"damaged or truncated TorchScript archive \(RuntimeError: File 'm/byteorder' is encrypted"),
        (_unknown_compression, r"damaged or truncated TorchScript archive \(NotImplementedError: That compression"),
    ],
)
def test_a_damaged_zip_member_is_named_not_a_raw_zipfile_error(tmp_path: Path, damage, expected: str) -> None:
    # zlib.error, RuntimeError and NotImplementedError escaped as tracebacks from inside zipfile
    path = write_archive(tmp_path / "damaged.pt", compression=zipfile.ZIP_DEFLATED)
    damage(path)
    with pytest.raises(WeightsFileError, match=r"damaged\.pt is a " + expected):
        read_weights(path)


def test_a_bad_record_checksum_is_named_as_the_records_not_data_pkls(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "flipped.pt")
    start, _ = member_data_offset(path, f"{ROOT}/data/0")
    data = bytearray(path.read_bytes())
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"flipped\.pt is a damaged .*Bad CRC-32 for file 'm/data/0'"):
        read_weights(path)


@pytest.mark.parametrize("member", [f"{ROOT}/data.pkl", f"{ROOT}/data/0"])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_an_archive_with_two_members_of_one_name_is_refused(tmp_path: Path, member: str) -> None:
    # zipfile reads the last of them and torch the first; with two data.pkl the file was not even recognised
    # as TorchScript, and torch.load's refusal advised weights_only=False, which would run its code
    path = write_archive(tmp_path / "twice.pt", extra=((member, b"\x80\x02K\x01."),))
    with pytest.raises(WeightsFileError, match=rf"twice\.pt is a damaged archive: it holds two members named {member}"):
        read_weights(path)


@pytest.mark.parametrize("kind", ["torchscript", "torch.save"])
def test_a_member_name_that_is_not_the_utf8_its_flag_says_is_named_as_damage(tmp_path: Path, kind: str) -> None:
    # zipfile's UnicodeDecodeError escaped as a traceback naming neither the file nor its zip directory
    path = tmp_path / "named.pt"
    if kind == "torchscript":
        write_archive(path, extra=((f"{ROOT}/code/\u00e9.py", b""),))
    else:
        torch.save({"w": torch.zeros(4)}, path)
        with zipfile.ZipFile(path, "a") as archive:  # a non-ASCII name sets the member's UTF-8 flag
            archive.writestr("plain/\u00e9", b"")
    path.write_bytes(path.read_bytes().replace("\u00e9".encode(), b"\xff\xfe"))
    with pytest.raises(WeightsFileError, match=r"named\.pt is a damaged zip archive: its directory cannot be read \(UnicodeDecodeError"):
        read_weights(path)


def test_a_zip64_record_saying_several_disks_is_named_as_damage(tmp_path: Path) -> None:
    # torch.load reads the file; zipfile.is_zipfile, before the checksum pass, then raised BadZipFile (not a
    # ValueError) as a traceback naming no file
    path = tmp_path / "disks.pt"
    torch.save({"w": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    assert data[end - 20 : end - 16] == b"PK\x06\x07"  # torch.save writes a zip64 locator
    struct.pack_into("<I", data, end - 16, 1)  # its "disk holding the zip64 end record", which torch ignores
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"disks\.pt is a damaged zip archive: .*multiple disks"):
        read_weights(path)


def test_a_deflate_damaged_torch_save_member_is_named(tmp_path: Path) -> None:
    # torch.load read it; the checksum pass after it raised zlib.error from inside zipfile
    torch.save({"w": torch.zeros(64)}, tmp_path / "plain.pt")
    path = tmp_path / "rezipped.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        record = next(name for name in source.namelist() if name.endswith("/data/0"))
    start, length = member_data_offset(path, record)
    data = bytearray(path.read_bytes())
    for index in range(start, start + length):
        data[index] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"rezipped\.pt is (damaged: its member .*/data/0 cannot be read|a damaged)"):
        read_weights(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    # zipfile.is_zipfile opened it and waited for a writer forever
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_weights(fifo)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():
        with open(fifo, "wb"):  # unblock the reader so that the thread ends
            pass
        pytest.fail("reading a named pipe blocked")
    assert isinstance(outcome[0], WeightsFileError) and "is not a regular file" in str(outcome[0])


# Every pickle opcode that can import or call, each aimed at creating a marker file
def _payloads(marker: Path) -> dict[str, bytes]:
    command = _literal(f"touch {marker}")
    argv = _literal(["touch", str(marker)])
    return {
        "GLOBAL+REDUCE": b"\x80\x02cos\nsystem\n(" + command + b"tR.",
        "STACK_GLOBAL": b"\x80\x04" + _literal("os") + _literal("system") + b"\x93(" + command + b"tR.",
        "STACK_GLOBAL attribute path": b"\x80\x04" + _literal("torch._utils")
        + _literal("_rebuild_tensor_v2.__globals__") + b"\x93.",
        "INST": b"(" + command + b"ios\nsystem\n.",
        "OBJ": b"\x80\x02(cos\nsystem\n" + command + b"o.",
        "NEWOBJ": b"\x80\x02csubprocess\nPopen\n(" + argv + b"t\x81.",
        "NEWOBJ_EX": b"\x80\x04csubprocess\nPopen\n(" + argv + b"t}\x92.",
        "BUILD": b"\x80\x02cbuiltins\nexec\n" + _literal(f"open({str(marker)!r}, 'w')") + b"b.",
        "BUILD on an allowed function": b"\x80\x02ctorch.jit._pickle\nbuild_intlist\nN}" + _literal("__code__")
        + b"Ns\x86b.",
        "EXT1": b"\x80\x02\x82\x01.",
        "PERSID": b"Pstorage\n.",
        "BINPERSID": b"\x80\x02(" + _literal("storage") + b"NNNNtQ.",
    }


@pytest.mark.parametrize("opcode", list(_payloads(Path("x"))))
def test_no_pickle_opcode_in_data_pkl_runs_code(tmp_path: Path, opcode: str) -> None:
    marker = tmp_path / "marker"
    path = write_archive(tmp_path / "evil.pt", data_pkl=_payloads(marker)[opcode])
    with pytest.raises(WeightsFileError, match=r"evil\.pt") as raised:
        read_weights(path)
    assert not marker.exists()
    assert "\n" not in str(raised.value)
    if opcode in ("GLOBAL+REDUCE", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"):
        assert isinstance(raised.value, UnsafeFileError)


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        ({"size": (3, 3)}, "out of bounds for storage"),
        ({"offset": 4}, "out of bounds for storage"),
        ({"offset": 5, "stride": (-3, 1)}, "Negative strides"),
        ({"offset": -1}, "invalid storage offset"),
        ({"size": (2**62, 4), "stride": (1, 1)}, "overflow"),
        ({"numel": 2**40}, "holds 24 bytes, but data.pkl describes 1099511627776 elements"),
        ({"dtype": "ComplexFloatStorage"}, "not on the allowlist"),
    ],
)
def test_a_tensor_view_outside_its_storage_is_refused(tmp_path: Path, view: dict, expected: str) -> None:
    path = write_archive(tmp_path / "view.pt", data_pkl=module_pickle(**view))
    with pytest.raises(WeightsFileError, match=rf"view\.pt.*{expected}"):
        read_weights(path)


# ---------------------------------------------------------------------------------------------------------
# Zero-shot templates and class names, retrieval annotations, evaluation images


@pytest.mark.parametrize(
    "template",
    ["a {:>9999999999} photo", "a {0.__class__.__init__.__globals__} photo", "a {0!r} photo", "a {0[0]} photo"],
    ids=["huge width", "attribute access", "conversion", "index"],
)
def test_a_template_field_other_than_a_plain_placeholder_is_refused(tmp_path: Path, template: str) -> None:
    # Format specs ran: "{:>9999999999}" raised MemoryError (a smaller width made every prompt gigabytes long)
    # and attribute access raised AttributeError, both bare, from the templates file's check
    from clip.evaluation.templates import load_templates

    (tmp_path / "templates.txt").write_text(f"a photo of a {{}}.\n{template}\n")
    field = template.removeprefix("a ").removesuffix(" photo")  # named whole, its conversion and spec included
    refusal = rf"its field {re.escape(repr(field))} must be a plain '\{{\}}' for the class name"
    with pytest.raises(ValueError, match=refusal):
        load_templates(tmp_path / "templates.txt")


def test_templates_and_class_names_in_other_encodings(tmp_path: Path) -> None:
    # A Latin-1 file raised UnicodeDecodeError without the file's name; Windows' UTF-16 "Unicode" was unreadable
    from clip.evaluation.templates import load_classnames, load_templates

    (tmp_path / "latin1.txt").write_bytes("tench\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text: byte 9 \(line 2\) is 0xe9"):
        load_classnames(tmp_path / "latin1.txt")
    (tmp_path / "utf16.txt").write_text("a photo of a {}.\nart of the {}\n", encoding="utf-16")
    assert load_templates(tmp_path / "utf16.txt") == ["a photo of a {}.", "art of the {}"]
    # and big-endian, as some tools write it, with its own byte-order mark
    (tmp_path / "utf16be.txt").write_bytes(b"\xfe\xff" + "tench\ngoldfish\n".encode("utf-16-be"))
    assert load_classnames(tmp_path / "utf16be.txt") == ["tench", "goldfish"]


def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    # json's RecursionError escaped from the templates, class names and Karpathy-annotation readers
    from clip.evaluation.retrieval_data import read_karpathy_json
    from clip.evaluation.templates import load_classnames

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not valid JSON \(its arrays nest too deeply\)"):
        load_classnames(tmp_path / "deep.json")
    with pytest.raises(ValueError, match=r"deep\.json: not valid JSON \(its arrays or objects nest too deeply\)"):
        read_karpathy_json(tmp_path / "deep.json")


def test_a_hairline_image_is_evaluated_by_its_middle_not_gigabytes_of_resize(tmp_path: Path) -> None:
    # 1 x 8000 pixels is a tiny file, but a resize of its shorter side to 224 (torchvision's, passed as the
    # transform) made 1.6 GB in seconds, and a loader worker killed for memory ended the whole evaluation. It
    # was then skipped as unreadable, although the model's preprocess and training read such images, cut
    from PIL import Image

    from clip.evaluation.datasets import ImageFolderDataset
    from clip.evaluation.features import SkipUnreadable, SkippedImage

    (tmp_path / "cat").mkdir()
    for name, size in (("wide", (8000, 1)), ("tall", (3, 400)), ("panorama", (1000, 100))):
        Image.new("RGB", size).save(tmp_path / "cat" / f"{name}.png")
    dataset = ImageFolderDataset(tmp_path, transform=lambda image: image.size, warn=False)
    items = {path.name: SkipUnreadable(dataset)[index] for index, (path, _) in enumerate(dataset.samples)}
    assert not [item for item in items.values() if isinstance(item, SkippedImage)]
    assert {name: size for name, (size, _) in items.items()} == {
        "panorama.png": (1000, 100), "wide.png": (100, 1), "tall.png": (3, 300)}


def test_the_middle_of_a_hairline_image_gives_the_model_preprocess_the_pixels_of_the_whole(tmp_path: Path) -> None:
    from PIL import Image

    from clip.evaluation.image_files import read_image
    from clip.preprocess import image_transform

    strip = Image.linear_gradient("L").resize((5000, 7)).convert("RGB")
    strip.save(tmp_path / "strip.png")
    preprocess = image_transform(32)
    assert torch.equal(preprocess(read_image(tmp_path / "strip.png")), preprocess(strip))


def test_an_image_above_pils_pixel_limit_is_a_counted_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL only warns between MAX_IMAGE_PIXELS and twice that, and decoded the image (150 megapixels: seconds
    # and 450 MB as RGB per loader worker); the limit is lowered here to keep the test small
    from PIL import Image

    from clip.evaluation.datasets import ImageFolderDataset, UnreadableImageError
    from clip.evaluation.features import SkipUnreadable, SkippedImage

    for name, size in (("small", (8, 8)), ("large", (150, 100))):
        (tmp_path / "cat").mkdir(exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "cat" / f"{name}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # large: 15 000 pixels, below twice the limit
    dataset = ImageFolderDataset(tmp_path, warn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [SkipUnreadable(dataset)[index] for index in range(len(dataset))]
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    skipped = [item for item in items if isinstance(item, SkippedImage)]
    assert len(skipped) == 1 and "150x100 pixels is more than PIL.Image.MAX_IMAGE_PIXELS (10000)" in skipped[0].reason
    assert skipped[0].reason.count("cannot read image") == 1
    with pytest.raises(UnreadableImageError):
        dataset[[path.name for path, _ in dataset.samples].index("large.png")]


def test_an_image_pil_refuses_to_open_or_a_reason_pil_leaves_blank_is_still_an_unreadable_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Above twice MAX_IMAGE_PIXELS PIL raises DecompressionBombError, no OSError or ValueError: it ended the
    # evaluation instead of being a counted skip. An error without a message still names a reason.
    from PIL import Image

    from clip.evaluation.image_files import UnreadableImageError, read_image

    Image.new("RGB", (250, 100)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 25 000 pixels: past twice the limit
    with pytest.raises(UnreadableImageError, match="huge.png: "):
        read_image(tmp_path / "huge.png")

    # 100:1 is the most an image is read whole; one more is cut to its middle
    Image.new("RGB", (100, 1)).save(tmp_path / "line.png")
    Image.new("RGB", (1, 105)).save(tmp_path / "longer_line.png")
    assert read_image(tmp_path / "line.png").size == (100, 1)
    assert read_image(tmp_path / "longer_line.png").size == (1, 101)

    # The errors a format plugin raises for a broken file; the one without a message is named by its type
    for error, reason in ((EOFError(), "EOFError"), (ValueError("bad tile"), "bad tile"), (SyntaxError("no header"), "no header")):
        def broken(path, error=error, **options):
            raise error

        monkeypatch.setattr(Image, "open", broken)
        with pytest.raises(UnreadableImageError, match=f"huge.png: {reason}$") as unreadable:
            read_image(tmp_path / "huge.png")
        assert unreadable.value.path == tmp_path / "huge.png"  # which file: a public attribute callers may list


# ---------------------------------------------------------------------------------------------------------
# Weights that declare more than they hold


def _tiny_checkpoint(tmp_path: Path, name: str, change) -> Path:
    """A checkpoint of a tiny ViT as the trainer writes one, its state dict passed through `change` first."""
    from clip.architectures import ModelConfig, TextConfig, VisionConfig
    from clip.model import CLIP

    config = ModelConfig(
        embed_dim=32, vision=VisionConfig(kind="vit", image_size=32, width=64, layers=2, heads=1, patch_size=16),
        text=TextConfig(context_length=16, vocab_size=120, width=64, heads=1, layers=2),
    )
    state = dict(CLIP(config).state_dict())
    change(state)
    torch.save({"model": state, "config": {"model": config.to_dict()}}, tmp_path / name)
    return tmp_path / name


def test_torch_save_views_that_repeat_their_storage_are_refused(tmp_path: Path) -> None:
    # torch.save keeps a stride-0 view as it is: a whole architecture of such views (97 KB) loaded as a
    # 577 MB model
    from clip.loading import load

    def expand(state):
        state["visual.proj"] = torch.zeros(()).expand(state["visual.proj"].shape)

    with pytest.raises(WeightsFileError, match=r"views\.pt: visual\.proj repeats its data \(a stride of 0"):
        load(_tiny_checkpoint(tmp_path, "views.pt", expand), device="cpu")


def test_blocks_that_are_one_blocks_tensors_are_refused(tmp_path: Path) -> None:
    # Every block's entries naming block 0's tensors: a file of one block loaded as a model of any depth
    from clip.loading import load

    def alias(state):
        for key in [key for key in state if key.startswith("transformer.resblocks.1.")]:
            state[key] = state[key.replace(".1.", ".0.", 1)]

    with pytest.raises(WeightsFileError, match=r"aliased\.pt: the model's tensors share their data"):
        load(_tiny_checkpoint(tmp_path, "aliased.pt", alias), device="cpu")


def test_views_of_the_models_own_tensors_are_not_called_hostile(tmp_path: Path) -> None:
    # A transposed or sliced copy under another name is an extra entry, named as one; a non-contiguous weight
    # of the model's own loads
    from clip.loading import load

    def transposed_extra(state):
        state["text_projection_T"] = state["text_projection"].t()

    with pytest.raises(WeightsFileError, match=r"unexpected \(1\): text_projection_T"):
        load(_tiny_checkpoint(tmp_path, "extra.pt", transposed_extra), device="cpu")

    def non_contiguous(state):
        state["text_projection"] = state["text_projection"].t().contiguous().t()

    model, _ = load(_tiny_checkpoint(tmp_path, "strided.pt", non_contiguous), device="cpu")
    assert model.text_projection.shape == (64, 32)


def test_torchscript_views_that_repeat_their_storage_are_refused(tmp_path: Path) -> None:
    from clip.weights_file import check_backed_by_storage

    path = write_archive(tmp_path / "views.pt", data_pkl=module_pickle(size=(1000, 1000), stride=(0, 0)))
    state = read_weights(path).state_dict
    with pytest.raises(WeightsFileError, match=r"repeats its data"):
        check_backed_by_storage(state, list(state), str(path))


def test_a_tensor_saved_under_two_names_still_reads(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    torch.save({"a": shared, "b": shared, "c": torch.ones(2)}, tmp_path / "tied.pt")
    assert set(read_weights(tmp_path / "tied.pt").state_dict) == {"a", "b", "c"}


def refuse_to_run(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """CLIP.`method` (__init__: building a model; to_empty: allocating one) fails the test if it is called."""
    from clip.model import CLIP

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"CLIP.{method} ran before the weights were checked")

    monkeypatch.setattr(CLIP, method, refuse)


def test_a_checkpoint_naming_a_model_it_does_not_hold_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 KB file whose config names ViT-L/14 had the model's memory allocated before its missing tensors
    # were found (any size: the config is the file's word)
    from clip.architectures import RELEASED_ARCHITECTURES
    from clip.loading import load

    refuse_to_run(monkeypatch, "to_empty")
    config = RELEASED_ARCHITECTURES["ViT-L/14"].to_dict()
    # One entry of each stack's last block: past the block check, the meta model's shapes refuse the rest
    held = {"visual.proj": torch.zeros(2, 2), "visual.transformer.resblocks.23.ln_1.weight": torch.zeros(1),
            "transformer.resblocks.11.ln_1.weight": torch.zeros(1), "positional_embedding": torch.zeros(77, 768)}
    torch.save({"model": held, "config": {"model": config}}, tmp_path / "small.pt")
    with pytest.raises(WeightsFileError, match=r"(?s)small\.pt does not fit the ViT-L/14 .*missing \(442\)"):
        load(tmp_path / "small.pt", device="cpu")


def test_a_checkpoint_whose_config_has_more_blocks_than_entries_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even on the meta device every block is Python objects: a 2 KB checkpoint whose config said 200000
    # text layers took 5 minutes and 7.7 GB before its missing tensors were named
    from clip.architectures import RELEASED_ARCHITECTURES
    from clip.loading import load

    refuse_to_run(monkeypatch, "__init__")
    config = RELEASED_ARCHITECTURES["RN50"].to_dict()
    config["text"]["layers"] = 200_000
    torch.save({"model": {"visual.proj": torch.zeros(2, 2)}, "config": {"model": config}}, tmp_path / "deep.pt")
    with pytest.raises(WeightsFileError, match=r"missing: every entry of transformer\.resblocks\.199999\.\*"):
        load(tmp_path / "deep.pt", device="cpu")


@pytest.mark.parametrize("positions", [(77, 512), None, (77,)], ids=["77 positions", "none", "one dimension"])
def test_a_checkpoint_whose_config_has_another_context_length_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, positions: tuple[int, ...] | None
) -> None:
    # The causal mask is context_length squared floats, made as the model is built: a 100 KB checkpoint whose
    # config said a context of 30000 had 3.6 GB allocated before its 77 positions were found not to fit
    from clip.architectures import RELEASED_ARCHITECTURES
    from clip.loading import load

    refuse_to_run(monkeypatch, "__init__")
    config = RELEASED_ARCHITECTURES["ViT-B/32"].to_dict()
    config["text"]["context_length"] = 30_000
    state = {"visual.transformer.resblocks.11.ln_1.weight": torch.zeros(1),
             "transformer.resblocks.11.ln_1.weight": torch.zeros(1)}
    if positions is not None:
        state["positional_embedding"] = torch.zeros(positions)
    torch.save({"model": state, "config": {"model": config}}, tmp_path / "long.pt")
    expected = (r"missing: positional_embedding \(the text's 30000 positions\)" if positions is None else
                rf"wrong shape: positional_embedding: expected \(30000, 512\), found {re.escape(str(positions))}")
    with pytest.raises(WeightsFileError, match=r"(?s)long\.pt does not fit .*" + expected):
        load(tmp_path / "long.pt", device="cpu")


@pytest.mark.parametrize("index", ["1000000", "9" * 5000], ids=["a million", "5000 digits"])
def test_a_block_index_far_beyond_the_blocks_present_is_named_without_listing_every_gap(
    tmp_path: Path, index: str
) -> None:
    # The gaps up to the largest index were all listed first: one key of block 99999999999 in a 1 KB file
    # stalled the loader while memory ran out, and 5000 digits raised int()'s bare ValueError
    from clip.loading import load

    state = {"visual.proj": torch.zeros(8, 4), "visual.conv1.weight": torch.zeros(64, 3, 32, 32),
             "visual.positional_embedding": torch.zeros(50, 64),
             "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(256, 64),
             f"visual.transformer.resblocks.{index}.ln_1.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "gaps.pt")
    tracemalloc.start()
    try:
        with pytest.raises(WeightsFileError, match=r"gaps\.pt .*resblocks has 2 numbered blocks but lacks block\(s\) "
                                                   r"\[1, 2, 3, 4, 5\]"):
            load(tmp_path / "gaps.pt", device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_link_to_an_ancestor_folder_does_not_relabel_other_classes(tmp_path: Path) -> None:
    # dog/up -> the dataset root: the walk went up and through cat/, and cat's image was read as a dog
    from PIL import Image

    from clip.evaluation.datasets import ImageFolderDataset

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "only.png")
    os.symlink("..", tmp_path / "dog" / "up")
    os.symlink("a.png", tmp_path / "cat" / "b.png")  # a loop of file links: no image, no error
    os.symlink("b.png", tmp_path / "cat" / "a.png")
    dataset = ImageFolderDataset(tmp_path, warn=False)
    assert [(path.relative_to(tmp_path).as_posix(), label) for path, label in dataset.samples] == [
        ("cat/only.png", 0),
        ("dog/only.png", 1),
    ]


def test_a_cifar_pickle_declaring_a_terabyte_array_is_a_value_error(tmp_path: Path) -> None:
    # numpy's _reconstruct allocates the declared shape before any data is read: a bare MemoryError escaped
    from clip.evaluation.datasets import load_cifar_pickle

    header = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _literal((10**13,)) + _literal(b"b")
    (tmp_path / "test_batch").write_bytes(b"\x80\x02" + header + b"tR.")
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR pickle: Unable to allocate"):
        load_cifar_pickle(tmp_path / "test_batch")


@pytest.mark.parametrize("pointer", [b"step\x00.pt", b"x" * 4000], ids=["null byte", "name too long"])
def test_a_latest_pointer_naming_no_possible_file_falls_back_to_the_newest_checkpoint(
    tmp_path: Path, pointer: bytes
) -> None:
    # A null byte raised a bare ValueError ("embedded null byte") and a 4000-character name an OSError
    # (ENAMETOOLONG) out of clip.load of the run directory, instead of trying the next checkpoint
    from clip.weights_file import read_run_or_file

    (tmp_path / "checkpoints").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "checkpoints" / "step_00000010.pt")
    (tmp_path / "checkpoints" / "latest").write_bytes(pointer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, _ = read_run_or_file(tmp_path)
    assert path.name == "step_00000010.pt"


@pytest.mark.parametrize("opcode", ["STACK_GLOBAL", "INST", "NEWOBJ_EX", "EXT1"])
def test_a_torch_save_file_refused_for_an_opcode_says_which(tmp_path: Path, opcode: str) -> None:
    # torch puts the reason on a later line after "WeightsUnpickler error:", and the refusal read "could run
    # code ()": the reason was empty
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = _payloads(marker)[opcode] if info.filename.endswith("/data.pkl") else source.read(info)
            target.writestr(info.filename, data)
    with pytest.raises(UnsafeFileError, match=r"evil\.pt was refused.*could run code \((Unsupported operand \d+|.*Popen)"):
        read_weights(path)
    assert not marker.exists()


def test_a_json_integer_beyond_pythons_digit_limit_names_the_file(tmp_path: Path) -> None:
    # json raises a plain ValueError (not JSONDecodeError) for it, which escaped without the file's name
    from clip.evaluation.retrieval_data import read_karpathy_json
    from clip.evaluation.templates import load_templates

    (tmp_path / "big.json").write_text('{"images": [], "imgid": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match=r"big\.json: not valid JSON \(Exceeds the limit"):
        read_karpathy_json(tmp_path / "big.json")
    (tmp_path / "templates.json").write_text('["a {}.", ' + "9" * 5000 + "]")
    with pytest.raises(ValueError, match=r"templates\.json: not valid JSON \(Exceeds the limit"):
        load_templates(tmp_path / "templates.json")


def test_a_model_with_a_smaller_vocabulary_than_the_tokenizer_is_a_clear_error() -> None:
    # A tiny model (vocabulary 120) evaluated with the BPE tokenizer failed inside its token embedding with
    # torch's "IndexError: index out of range in self", a traceback out of clip-zeroshot
    from torch import nn

    from clip.evaluation.features import encode_texts

    class SmallVocabulary(nn.Module):
        context_length, vocab_size = 8, 120

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return nn.functional.embedding(tokens, torch.zeros(self.vocab_size, 4))

    def tokenizer(texts, context_length, truncate=False):
        return torch.full((len(texts), context_length), 49407)

    with pytest.raises(ValueError, match=r"token id 49407, but the model's vocabulary has 120 tokens"):
        encode_texts(SmallVocabulary(), ["a photo of a cat."], tokenizer, device="cpu")


def test_a_manifest_row_longer_than_the_field_limit_is_not_called_empty(tmp_path: Path, monkeypatch) -> None:
    # The manifest reader hands over no reason for a row it cannot split: a caption past the limit was
    # reported as a row that "needs a non-empty 'caption'"
    from clip.evaluation.retrieval_data import read_caption_manifest

    monkeypatch.setattr("clip.data.manifest.FIELD_LIMIT", 1000)
    monkeypatch.setattr("clip.evaluation.retrieval_data.FIELD_LIMIT", 1000)
    long_caption = "x" * 1001
    (tmp_path / "pairs.tsv").write_text(f"image\tcaption\na.png\ta cat\nb.png\t{long_caption}\n")
    with pytest.raises(ValueError, match=r"row 2 needs a non-empty .* \(or it is malformed: .* longer than the 1000 "):
        read_caption_manifest(tmp_path / "pairs.tsv")


def test_a_checkpoint_with_the_format_marker_but_not_its_entries_is_refused_in_one_line() -> None:
    # restore_training_state read state["config"] first: a KeyError traceback out of clip-train
    from clip.resume import incomplete_entries

    whole_config = {"model": {}, "loss": {}, "optimizer": {}, "train": {}}
    whole = {"step": 5, "model": {}, "config": whole_config, "optimizer": {}, "scaler": {}, "rng": [], "data": []}
    assert incomplete_entries(whole) == []
    assert incomplete_entries({"format": "clip-pretrain/1", "step": 5, "model": {"w": torch.zeros(2)}}) == [
        "'config' missing", "'optimizer' missing", "'scaler' missing", "'rng' missing", "'data' missing"]
    assert incomplete_entries({**whole, "step": True, "rng": {}, "config": {"model": {}}}) == [
        "'step' is of type bool, not int", "'rng' is of type dict, not list", "config section 'loss' missing",
        "config section 'optimizer' missing", "config section 'train' missing"]


def test_clip_train_refuses_an_incomplete_checkpoint_in_one_line(tmp_path: Path) -> None:
    from clip.resume import ResumeRefused, restore_training_state

    with pytest.raises(ResumeRefused, match=r"the checkpoint of step 5 .* \('config' missing; 'optimizer' missing"):
        restore_training_state({"format": "clip-pretrain/1", "step": 5, "model": {}}, None, tmp_path, module=None,
                               optimizer=None, scaler=None, dist_info=None)


def test_a_confusion_plot_that_cannot_be_drawn_or_written_does_not_end_the_evaluation(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    # A class name such as '$x^{$' is matplotlib math and failed to parse (ValueError), and an output folder
    # that cannot be created raised: either ended clip-zeroshot right after a dataset's evaluation
    pytest.importorskip("matplotlib")
    from clip.evaluation.results import ClassificationCounts, save_confusion_png, summarize

    counts = ClassificationCounts(2)
    counts.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    result = summarize(counts, ["$x^{$", "$\\undefinedcommand$"], name="prices in $x^{$")  # the title's too
    assert save_confusion_png(result, tmp_path / "confusion.png") == tmp_path / "confusion.png"
    (tmp_path / "a_file").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert save_confusion_png(result, tmp_path / "a_file" / "confusion.png") is None
    # Whatever else matplotlib raises while drawing (a ValueError, a RuntimeError) costs the plot alone
    for error in (ValueError("bad label"), RuntimeError("no renderer")):
        def fail(*args, error=error):
            raise error

        monkeypatch.setattr("clip.evaluation.results._draw_confusion", fail)
        assert save_confusion_png(result, tmp_path / "confusion.png") is None


@pytest.mark.parametrize("version, warned", [("2.9.1+cu121", True), ("2.5.0", True), ("2.10.0", False)])
def test_a_torch_whose_weights_only_reader_has_known_flaws_is_warned_about(tmp_path: Path, monkeypatch, version,
                                                                           warned) -> None:
    # pyproject requires torch >= 2.10; an environment set up around pip may hold an older one, whose
    # weights_only reader a crafted file can defeat: the promise that no pickled code runs would not hold
    from clip import checkpoint

    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    state = {"format": checkpoint.CHECKPOINT_FORMAT, "step": 1, "model": {"w": torch.zeros(2)}}
    checkpoint.save_checkpoint(state, tmp_path / "run", 1, keep_last=1)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    saved = checkpoint.list_checkpoints(tmp_path / "run")[0][1]
    for read in (lambda: read_weights(tmp_path / "weights.pt"), lambda: checkpoint.read_checkpoint(saved, verify=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read()
        flagged = [w for w in caught if "has known flaws that a crafted file" in str(w.message)]
        assert len(flagged) == int(warned), [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------
# What the TorchScript reader takes for an archive, and the pickle forms of torch.jit.save it reads


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_what_is_taken_for_a_torchscript_archive(tmp_path: Path) -> None:
    from clip.torchscript_reader import is_torchscript_archive

    pkl = module_pickle()
    # constants.pkl marks an archive without code/ (torch.jit.save of a module whose code was left out)
    assert is_torchscript_archive(_zip(tmp_path / "constants.pt", {"m/data.pkl": pkl, "m/constants.pkl": b""}))
    # only a top folder's data.pkl names the root: one deeper down is some other member
    assert is_torchscript_archive(_zip(tmp_path / "nested.pt", {"m/data.pkl": pkl, "m/code/x.py": b"",
                                                                "m/extra/data.pkl": pkl}))
    # two top folders with a data.pkl each: no one archive to read
    assert not is_torchscript_archive(_zip(tmp_path / "two.pt", {"a/data.pkl": pkl, "a/code/x.py": b"",
                                                                 "b/data.pkl": pkl, "b/code/x.py": b""}))


def test_an_archive_written_on_a_big_endian_machine_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "big.pt", {f"{ROOT}/data.pkl": module_pickle(), f"{ROOT}/code/__torch__.py": CODE.encode(),
                                       f"{ROOT}/data/0": bytes(24), f"{ROOT}/byteorder": b"big"})
    with pytest.raises(WeightsFileError, match=r"big\.pt was written on a big-endian machine"):
        read_weights(path)


def test_archive_members_that_would_take_gigabytes_to_read_are_refused_as_damage(tmp_path: Path) -> None:
    # A 300-byte data.pkl whose BINBYTES8 opcode declares 2**45 bytes: Python allocates them before reading, and
    # the MemoryError passed for the machine's lack of memory. A data.pkl of 200 MB of one-byte opcodes (a 200 KB
    # compressed member) took 2 GB of the unpickler's stack; a 1 MB byteorder member 2 GB as well.
    huge_bytes = b"\x80\x04\x8e" + (1 << 45).to_bytes(8, "little") + b"x" * 100 + b"."
    path = write_archive(tmp_path / "bytes8.pt", data_pkl=huge_bytes)
    with pytest.raises(WeightsFileError, match=r"bytes8\.pt: its data\.pkl is damaged \(MemoryError"):
        read_weights(path)
    path = write_archive(tmp_path / "nones.pt", data_pkl=b"\x80\x02" + b"N" * (17 << 20) + b".",
                         compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(WeightsFileError, match=r"its data\.pkl declares 17825795 bytes, more than a TorchScript"):
        read_weights(path)
    path = tmp_path / "byteorder.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in [("data.pkl", module_pickle()), ("code/__torch__.py", CODE.encode()),
                           ("data/0", bytes(24)), ("byteorder", b"little" + b" " * (1 << 20))]:
            archive.writestr(f"{ROOT}/{name}", data)
    with pytest.raises(WeightsFileError, match=r"its byteorder member is 1048582 bytes long"):
        read_weights(path)


def test_the_older_tensor_rebuild_function_is_read(tmp_path: Path) -> None:
    data_pkl = module_pickle().replace(b"_rebuild_tensor_v2\n", b"_rebuild_tensor\n")
    path = write_archive(tmp_path / "v1.pt", data_pkl=data_pkl, record=torch.arange(6.0).numpy().tobytes())
    assert torch.equal(read_weights(path).state_dict["w"], torch.arange(6.0).reshape(2, 3))


def test_a_malformed_persistent_id_is_named(tmp_path: Path) -> None:
    # A sixth element in the storage reference, and a record key that goes beyond the data/ folder
    six = module_pickle().replace(_literal(6) + b"t", _literal(6) + _literal(0) + b"t")
    assert six != module_pickle()
    with pytest.raises(WeightsFileError, match=r"unexpected persistent id \('storage'"):
        read_weights(write_archive(tmp_path / "six.pt", data_pkl=six))
    escaping = module_pickle().replace(_literal("0"), _literal("0/../0"))
    with pytest.raises(WeightsFileError, match="malformed storage reference"):
        read_weights(write_archive(tmp_path / "escaping.pt", data_pkl=escaping))


def _tensor_opcodes(key: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n((" + _literal("storage") + b"ctorch\nFloatStorage\n" + _literal(key)
        + _literal("cpu") + _literal(numel) + b"tQ" + _literal(offset) + _literal(size) + _literal(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def test_two_views_of_one_record_share_its_memory_and_keep_their_offsets(tmp_path: Path) -> None:
    # torch.jit.save keeps a tied weight as one record; the reader reads it once (check_backed_by_storage
    # relies on the sharing to count it once)
    data_pkl = (
        b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,))
        + _literal("v") + _tensor_opcodes("0", 6, 3, (3,), (1,)) + b"ub."
    )
    code = 'class M(Module):\n  __parameters__ = ["w", "v", ]\n  __buffers__ = []\n'
    path = write_archive(tmp_path / "tied.pt", data_pkl=data_pkl, code=code, record=torch.arange(6.0).numpy().tobytes())
    weights = read_weights(path).state_dict
    assert weights["w"].tolist() == [0.0, 1.0, 2.0] and weights["v"].tolist() == [3.0, 4.0, 5.0]
    assert weights["w"].untyped_storage().data_ptr() == weights["v"].untyped_storage().data_ptr()


def test_a_parameter_without_elements_is_read(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "empty.pt", data_pkl=module_pickle(numel=0, size=(0,), stride=(1,)), record=b"")
    assert read_weights(path).state_dict["w"].shape == (0,)


def test_a_stored_record_whose_two_sizes_differ_is_refused(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "sizes.pt")
    set_central_directory(path, f"{ROOT}/data/0", 20, "<I", 12)  # compressed size: half the bytes
    with pytest.raises(WeightsFileError, match=r"sizes\.pt: record m/data/0 declares 24 bytes"):
        read_weights(path)


def test_a_record_compressed_otherwise_than_torch_can_read_is_refused(tmp_path: Path) -> None:
    # torch.jit.load reads records stored or deflated only: a bzip2 one is no archive torch wrote or reads
    path = write_archive(tmp_path / "bzip2.pt", compression=zipfile.ZIP_BZIP2)
    with pytest.raises(WeightsFileError, match=r"record m/data/0 uses zip compression method 12"):
        read_weights(path)


def test_a_code_file_declaring_more_than_any_modules_code_is_refused_unread(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "code.pt")
    set_central_directory(path, f"{ROOT}/code/__torch__.py", 24, "<I", (64 << 20) + 1)  # uncompressed size
    with pytest.raises(WeightsFileError, match=r"its code file m/code/__torch__\.py declares 67108865 bytes"):
        read_weights(path)


def _module_with_a_mask(tmp_path: Path, code: str) -> dict[str, torch.Tensor]:
    """The weights read from an archive whose module holds a parameter `w` and a tensor attribute `mask`."""
    data_pkl = (
        b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,))
        + _literal("mask") + _tensor_opcodes("0", 6, 3, (3,), (1,)) + b"ub."
    )
    return read_weights(write_archive(tmp_path / "mask.pt", data_pkl=data_pkl, code=code)).state_dict


def test_declarations_indented_with_tabs_are_read(tmp_path: Path) -> None:
    code = 'class M(Module):\n\t__parameters__ = ["w", ]\n\t__buffers__ = []\n\tw : Tensor\n'
    assert list(_module_with_a_mask(tmp_path, code)) == ["w"]


def test_a_class_declaring_only_its_parameters_keeps_every_tensor(tmp_path: Path) -> None:
    # Without both declarations the archive is of another format: no attribute can be told a non-weight
    code = 'class M(Module):\n  __parameters__ = ["w", ]\n  w : Tensor\n'
    assert sorted(_module_with_a_mask(tmp_path, code)) == ["mask", "w"]


def test_modules_nested_beyond_any_models_depth_are_not_followed(tmp_path: Path) -> None:
    # 1500 modules each inside the last: following them all overflowed Python's stack (RecursionError)
    from clip.torchscript_reader import read_torchscript_weights

    depth, module = 1500, b"c__torch__\nM\n)\x81}("
    data_pkl = (b"\x80\x02" + module + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,)) + _literal("c")
                + (module + _literal("c")) * (depth - 1) + b"c__torch__\nM\n)\x81}b" + b"ub" * (depth - 1) + b"ub.")
    path = write_archive(tmp_path / "deep.pt", data_pkl=data_pkl)
    weights, _ = read_torchscript_weights(path)
    assert list(weights) == ["w"]


def test_an_attribute_whose_name_is_no_string_is_passed_over(tmp_path: Path) -> None:
    data_pkl = (
        b"\x80\x02c__torch__\nM\n)\x81}(" + _literal(1) + _tensor_opcodes("0", 6, 3, (3,), (1,))
        + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,)) + b"ub."
    )
    assert list(read_weights(write_archive(tmp_path / "int.pt", data_pkl=data_pkl)).state_dict) == ["w"]


def test_a_persistent_id_of_another_kind_or_storage_type_is_named(tmp_path: Path) -> None:
    # Only ("storage", <a torch.*Storage>, key, location, numel) is a storage reference
    other_kind = module_pickle().replace(_literal("storage"), _literal("storagf"))
    with pytest.raises(WeightsFileError, match=r"unexpected persistent id \('storagf'"):
        read_weights(write_archive(tmp_path / "kind.pt", data_pkl=other_kind))
    typeless = module_pickle().replace(b"ctorch\nFloatStorage\n", _literal("FloatStorage"))
    with pytest.raises(WeightsFileError, match=r"malformed storage reference \('storage', 'FloatStorage'"):
        read_weights(write_archive(tmp_path / "typeless.pt", data_pkl=typeless))


def test_a_blank_line_inside_a_class_does_not_end_its_declarations(tmp_path: Path) -> None:
    code = 'class M(Module):\n  __parameters__ = ["w", ]\n\n  __buffers__ = []\n  w : Tensor\n'
    assert list(_module_with_a_mask(tmp_path, code)) == ["w"]


def test_a_module_that_holds_itself_is_read_once(tmp_path: Path) -> None:
    # An attribute naming an object already read (pickle's memo): its tensors are not listed again under it
    data_pkl = (b"\x80\x02c__torch__\nM\n)\x81q\xc8}(" + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,))
                + _literal("me") + b"h\xc8ub.")
    assert list(read_weights(write_archive(tmp_path / "cycle.pt", data_pkl=data_pkl)).state_dict) == ["w"]


def test_a_tensor_built_on_something_other_than_a_storage_record_is_named(tmp_path: Path) -> None:
    data_pkl = (b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
                + _literal(5) + _literal(0) + _literal((3,)) + _literal((1,)) + b"\x89ccollections\nOrderedDict\n)RtR"
                + b"ub.")
    with pytest.raises(WeightsFileError, match=r"storageless\.pt: a tensor in data\.pkl is not backed by a storage record"):
        read_weights(write_archive(tmp_path / "storageless.pt", data_pkl=data_pkl))


def test_an_object_without_an_attribute_dict_is_passed_over(tmp_path: Path) -> None:
    # A TorchScript object pickled without state (or with a custom __getstate__) holds no state-dict entries
    data_pkl = (b"\x80\x02c__torch__\nM\n)\x81}(" + _literal("w") + _tensor_opcodes("0", 6, 0, (3,), (1,))
                + _literal("c") + b"c__torch__\nN\n)\x81" + b"ub.")
    assert list(read_weights(write_archive(tmp_path / "stateless.pt", data_pkl=data_pkl)).state_dict) == ["w"]


def test_a_data_pkl_that_holds_no_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match=r"dict\.pt: data\.pkl holds a dict, not a TorchScript module"):
        read_weights(write_archive(tmp_path / "dict.pt", data_pkl=b"\x80\x02}."))


def test_a_record_is_read_in_the_dtype_its_storage_type_names(tmp_path: Path) -> None:
    values = torch.arange(6.0, dtype=torch.float16)
    path = write_archive(tmp_path / "half.pt", data_pkl=module_pickle(dtype="HalfStorage"),
                         record=values.numpy().tobytes())
    weight = read_weights(path).state_dict["w"]
    assert weight.dtype == torch.float16 and torch.equal(weight.flatten(), values)
