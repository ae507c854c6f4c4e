"""clip.weights_file's parts as fast unit tests: telling file kinds apart, the run directory's checkpoint order,
storage errors found in an exception's chain, and what a file's dict is taken to be."""

from __future__ import annotations

import errno
import os
import pickle
import re
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from clip.weights_file import (
    UnsafeFileError,
    WeightsFileError,
    archive_damage,
    checkpoint_candidates,
    is_safetensors_file,
    read_weights,
    storage_error_in,
    weights_from_state_dict,
)


def _checkpoints(run: Path, *steps: int) -> Path:
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    for step in steps:
        torch.save({"w": torch.full((2,), float(step))}, folder / f"step_{step:08d}.pt")
    return folder


def test_a_safetensors_file_without_tensors_is_still_one(tmp_path: Path) -> None:
    # Its header fills the whole file: the header length equals the bytes after the length field
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "empty.safetensors"
    safetensors_torch.save_file({}, path)
    assert is_safetensors_file(path)


def test_a_binary_file_with_a_small_length_field_but_no_json_is_not_taken_for_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes((5).to_bytes(8, "little") + b"hello" + bytes(20))
    assert not is_safetensors_file(path)
    with pytest.raises(WeightsFileError, match=r"not a PyTorch weights file: it is a binary file beginning 05 00"):
        read_weights(path)


def test_a_binary_file_with_nul_bytes_is_not_called_text(tmp_path: Path) -> None:
    # Bytes below 0x80 decode as UTF-8 whatever they are; the NULs are what says binary
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01\x02\x03" + bytes(100))
    with pytest.raises(WeightsFileError, match=r"it is a binary file beginning 01 02 03 00"):
        read_weights(path)


def test_a_legacy_torch_save_file_is_read(tmp_path: Path) -> None:
    # torch.save before the zip format (a bare pickle, protocol 2): its first byte is the PROTO opcode
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(read_weights(path).state_dict["w"], torch.arange(3.0))



def test_a_legacy_file_declaring_a_tensor_larger_than_itself_is_damaged_not_a_lack_of_memory(tmp_path: Path) -> None:
    # The allocator's failure on 2**52 bytes for a file of a few hundred was let through as this machine's
    # lack of memory: a torch traceback from clip.load instead of the file's damage
    from test_checkpoint import legacy_file_declaring

    path = tmp_path / "weights.pt"
    legacy_file_declaring(path, 2**50)
    with pytest.raises(WeightsFileError, match=rf"weights\.pt is damaged: it declares a tensor of {2**52} bytes, more "
                                               rf"than the whole file's {path.stat().st_size} bytes"):
        read_weights(path)

def test_a_global_that_torch_blocks_outright_is_refused_as_unsafe(tmp_path: Path) -> None:
    # torch words this refusal without its "WeightsUnpickler error" marker: it read as a damaged file
    class RunsACommand:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"w": RunsACommand()}, protocol=2))
    with pytest.raises(UnsafeFileError, match=r"weights\.pt was refused: .*GLOBAL \w+\.system"):
        read_weights(path)


def test_the_checkpoint_latest_names_comes_first_and_only_once(tmp_path: Path) -> None:
    folder = _checkpoints(tmp_path / "run", 100, 200)
    (folder / "latest").write_text("step_00000100.pt\n")
    assert checkpoint_candidates(tmp_path / "run") == [folder / "step_00000100.pt", folder / "step_00000200.pt"]


def test_a_run_pruning_the_checkpoint_being_read_gives_its_newer_one(tmp_path: Path, monkeypatch) -> None:
    # keep_last = 1: the trainer saved step 200 and deleted step 100 between the listing and the read, and
    # clip.load(run) or an evaluation command failed with "no checkpoint could be read"
    import clip.weights_file as weights_file

    folder = _checkpoints(tmp_path / "run", 100)
    real = weights_file.read_weights

    def read_while_the_run_saves(path: Path):
        if path.name == "step_00000100.pt":
            torch.save({"w": torch.full((2,), 200.0)}, folder / "step_00000200.pt")
            path.unlink()
        return real(path)

    monkeypatch.setattr(weights_file, "read_weights", read_while_the_run_saves)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_00000100.pt"):
        read, weights = weights_file.read_run_or_file(tmp_path / "run")
    assert read == folder / "step_00000200.pt" and weights.state_dict["w"].tolist() == [200.0, 200.0]


def test_a_run_whose_checkpoints_are_all_damaged_is_listed_once(tmp_path: Path) -> None:
    import clip.weights_file as weights_file

    folder = _checkpoints(tmp_path / "run", 100, 200)
    for checkpoint in folder.iterdir():
        checkpoint.write_bytes(b"torn")
    with pytest.warns(UserWarning), pytest.raises(WeightsFileError, match="no checkpoint in .* could be read") as raised:
        weights_file.read_run_or_file(tmp_path / "run")
    assert str(raised.value).count("\n  step_00000100.pt: ") == 1


def test_a_storage_error_while_checking_an_archive_is_raised_not_called_damage(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)

    def failing_read(self, *args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", failing_read)
    with pytest.raises(OSError, match="Input/output error"):
        archive_damage(path)


def _raised(make) -> BaseException:
    try:
        make()
    except BaseException as error:  # noqa: BLE001 - the test looks at it
        return error
    raise AssertionError("nothing raised")


def _eio() -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_a_storage_error_is_found_in_an_errors_context() -> None:
    # A reader that fails while handling the storage's error raises its own (torch: a RuntimeError)
    def reader() -> None:
        try:
            _eio()
        except OSError:
            raise RuntimeError("PytorchStreamReader failed reading file data/0")  # noqa: B904 - the context

    assert storage_error_in(_raised(reader)).errno == errno.EIO


def test_a_context_suppressed_with_from_none_is_not_searched() -> None:
    def reader() -> None:
        try:
            _eio()
        except OSError:
            raise ValueError("a message of its own") from None

    assert storage_error_in(_raised(reader)) is None


def test_a_cycle_of_causes_ends_the_search() -> None:
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first
    found: list[object] = []
    searching = threading.Thread(target=lambda: found.append(storage_error_in(first)), daemon=True)
    searching.start()
    searching.join(timeout=5)
    assert found == [None]


def test_a_text_file_cut_inside_a_four_byte_character_is_still_text(tmp_path: Path) -> None:
    # The first 64 bytes end with three of the four bytes of an emoji
    path = tmp_path / "weights.pt"
    path.write_text("a" * 61 + "\N{GRINNING FACE} and more text\n", encoding="utf-8")
    with pytest.raises(WeightsFileError, match=r"it is a text file beginning 'aaaa"):
        read_weights(path)


@pytest.mark.parametrize("members, listing", [(5, "a0, a1, a2, a3, a4"), (6, "a0, a1, a2, a3, a4, ...")])
def test_a_zip_that_is_no_pytorch_file_lists_its_first_members(tmp_path: Path, members: int, listing: str) -> None:
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(members):
            archive.writestr(f"a{index}", b"x")
    with pytest.raises(WeightsFileError, match=rf"zip archive but not a PyTorch file: it holds {re.escape(listing)}$"):
        read_weights(path)


def _saved(tmp_path: Path, value: object) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(value, path)
    return path


def test_what_a_dict_of_tensors_must_be_to_be_a_state_dict(tmp_path: Path) -> None:
    for not_a_state_dict in ({}, {0: torch.zeros(2)}):
        with pytest.raises(WeightsFileError, match="holds a dict without model weights"):
            read_weights(_saved(tmp_path, not_a_state_dict))


def test_only_a_checkpoint_of_this_trainers_format_gives_a_step(tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    ours = {"format": "clip-pretrain/1", "model": state}
    assert read_weights(_saved(tmp_path, ours | {"step": 7})).step == 7
    assert read_weights(_saved(tmp_path, ours | {"step": True})).step is None
    assert read_weights(_saved(tmp_path, ours | {"format": "other/1", "step": 7})).step is None


def test_only_a_boolean_trained_here_entry_says_where_the_weights_were_trained(tmp_path: Path) -> None:
    # clip-export writes True or False; any other value (another program's "no", a 0) says nothing, and
    # the rule for files that do not say applies: a truthy string must not give the trainer's preprocessing
    ours = {"format": "clip-pretrain/1", "model": {"w": torch.zeros(2)}}
    assert read_weights(_saved(tmp_path, ours | {"trained_here": False})).trained_here is False
    assert read_weights(_saved(tmp_path, ours | {"trained_here": True})).trained_here is True
    for not_said in ("no", 0, None):
        assert read_weights(_saved(tmp_path, ours | {"trained_here": not_said})).trained_here is None, not_said
    assert read_weights(_saved(tmp_path, ours)).trained_here is None


def test_a_state_dict_checkpoint_with_a_config_is_not_taken_for_open_clips(tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    assert read_weights(_saved(tmp_path, {"epoch": 3, "state_dict": state})).open_clip_origin is not None
    assert read_weights(_saved(tmp_path, {"epoch": 3, "state_dict": state, "config": {}})).open_clip_origin is None


def test_a_config_whose_model_entry_is_a_name_records_no_architecture(tmp_path: Path) -> None:
    # Another program's config ({"model": "ViT-B-32", ...}): the weights load, their architecture is inferred
    loaded = read_weights(_saved(tmp_path, {"model": {"w": torch.zeros(2)}, "config": {"model": "ViT-B-32"}}))
    assert loaded.model_config is None and list(loaded.state_dict) == ["w"]


def test_an_integer_logit_bias_entry_is_no_siglip_bias() -> None:
    loaded = weights_from_state_dict({"w": torch.zeros(2), "logit_bias": torch.tensor(3)})
    assert loaded.logit_bias is None and "logit_bias" in loaded.state_dict


@pytest.mark.parametrize("value, what", [
    (3.5, "3.5"),
    (torch.tensor(77.5), "77.5"),
    (torch.empty((), dtype=torch.long, device="meta"), r"a tensor of shape \(\)"),
])
def test_an_extra_entry_must_be_a_whole_number(value: object, what: str) -> None:
    with pytest.raises(WeightsFileError, match=rf"its context_length entry is {what}, not a whole number"):
        weights_from_state_dict({"w": torch.zeros(2), "context_length": value})


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_state_dict_written_by_pickle_dump_is_refused_as_not_a_torch_save_file(tmp_path: Path, protocol: int) -> None:
    # The refusal advised "save its model.state_dict() instead" to someone who had saved just that, with pickle
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"w": torch.arange(3.0)}, protocol=protocol))
    with pytest.raises(UnsafeFileError, match=r"weights\.pkl was refused: it is a pickle written by pickle\.dump, not a "
                       r"torch\.save file.*torch\.save\(model\.state_dict\(\), path\)$") as raised:
        read_weights(path)
    assert "saved whole" not in str(raised.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "old format"])
def test_a_torch_save_file_of_pickle_protocol_4_is_refused_for_its_protocol(tmp_path: Path, zip_format: bool) -> None:
    # torch's weights-only reader does not know protocol 4's FRAME opcode: the refusal said the state dict held
    # objects that could run code and advised saving a state dict, and torch warned "please file an issue"
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(3.0)}, path, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    try:
        weights = read_weights(path)
    except UnsafeFileError as refusal:
        assert re.search(r"weights\.pt was refused: it was written with pickle protocol 4 or later .*torch\.save's "
                         r"default protocol$", str(refusal))
        assert "saved whole" not in str(refusal)
    else:  # a torch whose reader learnt protocol 4
        assert torch.equal(weights.state_dict["w"], torch.arange(3.0))
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=zip_format)  # the default protocol
    assert torch.equal(read_weights(path).state_dict["w"], torch.arange(3.0))


def test_torchs_request_to_report_pickle_protocol_4_is_not_passed_on(tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(3.0)}, path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsafeFileError):
            read_weights(path)
    assert not [warning for warning in caught if "pickle protocol" in str(warning.message)]


def test_a_length_field_beyond_the_file_is_not_taken_for_safetensors(tmp_path: Path) -> None:
    # A brace after the first 8 bytes is not enough: the header they announce must fit in the file
    path = tmp_path / "weights.bin"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b'{"w": 1}' + bytes(20))
    assert not is_safetensors_file(path)
    with pytest.raises(WeightsFileError, match=r"not a PyTorch weights file: it is a binary file beginning 00 00"):
        read_weights(path)


def test_checkpoint_steps_are_ordered_as_numbers_not_as_names(tmp_path: Path) -> None:
    # Past step 99,999,999 the name has nine digits: "step_100000000.pt" sorts before "step_99999999.pt"
    folder = _checkpoints(tmp_path / "run", 99_999_999, 100_000_000, 7)
    assert checkpoint_candidates(tmp_path / "run") == [
        folder / "step_100000000.pt", folder / "step_99999999.pt", folder / "step_00000007.pt"]


def test_an_empty_file_is_named_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    with pytest.raises(WeightsFileError, match=r"weights\.pt is empty \(0 bytes\), not a weights file"):
        read_weights(path)


def test_a_byte_that_is_no_utf8_is_binary_even_near_the_end_of_the_head(tmp_path: Path) -> None:
    # Only a character cut by the 64-byte head ("unexpected end of data") is forgiven, not an invalid byte there
    path = tmp_path / "weights.pt"
    path.write_bytes(b"a" * 62 + b"\xff" + b"b" * 40)
    with pytest.raises(WeightsFileError, match=r"it is a binary file beginning 61 61"):
        read_weights(path)


def test_a_logit_bias_of_more_than_one_element_among_the_loss_parameters_is_no_siglip_bias(tmp_path: Path) -> None:
    checkpoint = {"model": {"w": torch.zeros(2)}, "loss_parameters": {"logit_bias": torch.zeros(2)}}
    assert read_weights(_saved(tmp_path, checkpoint)).logit_bias is None


def test_a_torch_save_file_written_without_checksums_is_read(tmp_path: Path) -> None:
    # torch writes CRC 0 for every member when its CRC computation is off: no member is then called damaged
    torch.serialization.set_crc32_options(False)
    try:
        path = _saved(tmp_path, {"w": torch.arange(100.0)})
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert any(info.CRC == 0 and info.file_size > 0 for info in archive.infolist())
    assert torch.equal(read_weights(path).state_dict["w"], torch.arange(100.0))


def test_a_dimension_of_size_one_does_not_make_a_tensor_repeat_its_data() -> None:
    # Its stride is never used to reach an element: a stride of 0 there repeats nothing (views and torch.save
    # files may carry any stride in such a dimension)
    from clip.weights_file import check_backed_by_storage

    leading_one = torch.as_strided(torch.arange(4.0), (1, 4), (0, 1))
    check_backed_by_storage({"w": leading_one}, ["w"], "weights.pt")


@pytest.mark.parametrize("keys, listing", [(5, "'k0', 'k1', 'k2', 'k3', 'k4'"), (6, "'k0', 'k1', 'k2', 'k3', 'k4', ...")])
def test_a_dict_without_weights_lists_its_first_keys(tmp_path: Path, keys: int, listing: str) -> None:
    not_weights = {f"k{index}": index for index in range(keys)}
    with pytest.raises(WeightsFileError, match=rf"holds a dict without model weights \(keys: {re.escape(listing)}\);"):
        read_weights(_saved(tmp_path, not_weights))
