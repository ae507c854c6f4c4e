"""clip.load and its parts: the released architectures, architecture inference, OpenAI-layout files (TorchScript
archives and plain state dicts), trainer checkpoints and run directories, refusal of files that would run
code, and clear errors for files of the wrong kind."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch
from openai_layout import (
    half_precision_names,
    half_round_trip,
    openai_state_dict,
    write_openai_archive,
    write_openai_state_dict,
)
from torch import nn

import clip.download
import clip.loading
from clip.architectures import RELEASED_ARCHITECTURES, ModelConfig, TextConfig, VisionConfig
from clip.device_names import available_device
from clip.infer_architecture import ArchitectureInferenceError, infer_model_config
from clip.loading import (
    DeviceNotAvailableError,
    UnsafeFileError,
    WeightsFileError,
    WeightsSource,
    convert_to_half_precision,
    load,
    load_with_source,
)
from clip.model import CLIP
from clip.position_grid import resize_position_embedding
from clip.preprocess import image_transform
from clip.released import RELEASED_WEIGHTS, ReleasedWeights
from clip.torchscript_reader import is_torchscript_archive, read_torchscript_weights

# Millions of parameters (total, image tower, text side) as published for OpenAI's nine models.
PUBLISHED_PARAMETERS = {
    "RN50": (102.01, 38.32, 63.69),
    "RN101": (119.69, 56.26, 63.43),
    "RN50x4": (178.30, 87.14, 91.16),
    "RN50x16": (290.98, 167.33, 123.65),
    "RN50x64": (623.26, 420.38, 202.88),
    "ViT-B/32": (151.28, 87.85, 63.43),
    "ViT-B/16": (149.62, 86.19, 63.43),
    "ViT-L/14": (427.62, 303.97, 123.65),
    "ViT-L/14@336px": (427.94, 304.29, 123.65),
}
# Widths are multiples of 64 with heads = width // 64, the convention that inference from shapes assumes.
TINY_TEXT = TextConfig(context_length=16, vocab_size=120, width=64, heads=1, layers=2)
TINY_VIT = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="vit", image_size=32, width=64, layers=2, heads=1, patch_size=8),
    text=TINY_TEXT,
)
TINY_RESNET = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 2, 1, 1), heads=4),
    text=TINY_TEXT,
)
TINY = {"vit": TINY_VIT, "resnet": TINY_RESNET}
WRITERS = {"archive": write_openai_archive, "state_dict": write_openai_state_dict}


def tiny_model(config: ModelConfig, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and biases, so that every entry matters
        for name, value in model.state_dict().items():
            if name.endswith(("running_var", "bn3.weight")):
                value.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")):
                value.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(kind, layout) -> a file in OpenAI's layout of `tiny_model(TINY[kind])`, written once per module:
    tracing an archive costs a few seconds on a CPU. Tests that alter a file work on a copy."""
    folder = tmp_path_factory.mktemp("openai_files")
    return {
        (kind, layout): write(tiny_model(config), folder / f"{kind}-{layout}.pt")
        for kind, config in TINY.items()
        for layout, write in WRITERS.items()
    }


def copy_of(path: Path, destination: Path) -> Path:
    destination.write_bytes(path.read_bytes())
    return destination


def inputs_for(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=generator)
    text = torch.randint(1, config.text.vocab_size - 1, (2, config.text.context_length), generator=generator)
    text[:, 5] = config.text.vocab_size - 1  # end-of-text: the largest id
    return images, text


def assert_same_features(model: nn.Module, reference: nn.Module, config: ModelConfig, atol: float = 1e-5) -> None:
    images, text = inputs_for(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=atol)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=0, atol=atol)


def meta_model(name: str) -> CLIP:
    with torch.device("meta"):
        return CLIP(RELEASED_ARCHITECTURES[name])


def reduced(config: ModelConfig) -> ModelConfig:
    """The same kind of model at a size a CPU test can run: OpenAI's patch size, tiny widths and depths."""
    if config.vision.kind == "vit":
        patch = config.vision.patch_size
        vision = VisionConfig(kind="vit", image_size=2 * patch, width=64, layers=1, heads=1, patch_size=patch)
    else:
        vision = VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4)
    return ModelConfig(embed_dim=32, vision=vision, text=TINY_TEXT, activation=config.activation)


# ---------------------------------------------------------------------------------------------------------
# The nine released architectures (shapes and counts on the meta device)


@pytest.mark.parametrize("name", list(RELEASED_ARCHITECTURES))
def test_parameter_counts_match_the_published_ones(name: str) -> None:
    model = meta_model(name)
    counts = {"total": 0, "image": 0, "text": 0}
    for parameter_name, parameter in model.named_parameters():
        counts["total"] += parameter.numel()
        if parameter_name.startswith("visual."):
            counts["image"] += parameter.numel()
        elif parameter_name != "logit_scale":
            counts["text"] += parameter.numel()
    millions = tuple(round(counts[part] / 1e6, 2) for part in ("total", "image", "text"))
    assert millions == PUBLISHED_PARAMETERS[name]

    # And every LayerNorm is OpenAI's (torch's default eps, 1e-5): another eps moves the released weights' features
    # by ~1e-5, under any comparison's tolerance, and no count or shape shows it
    norms = {module_name: module.eps for module_name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm)}
    assert norms and set(norms.values()) == {1e-5}, {key: eps for key, eps in norms.items() if eps != 1e-5}

@pytest.mark.parametrize("name", list(RELEASED_ARCHITECTURES))
def test_architecture_inference_recovers_each_released_config(name: str) -> None:
    state = meta_model(name).state_dict() | {"input_resolution": torch.tensor(0)}
    assert infer_model_config(state) == RELEASED_ARCHITECTURES[name]


@pytest.mark.parametrize("name", list(RELEASED_ARCHITECTURES))
def test_released_state_dict_loads_strictly_into_a_fresh_model(name: str) -> None:
    meta_model(name).load_state_dict(meta_model(name).state_dict(), strict=True)


@pytest.mark.parametrize("name", list(RELEASED_ARCHITECTURES))
def test_reduced_size_model_runs_and_reloads_strictly(name: str) -> None:
    config = reduced(RELEASED_ARCHITECTURES[name])
    model = tiny_model(config)
    images, text = inputs_for(config)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, text)
    assert logits_per_image.shape == (2, 2) and torch.isfinite(logits_per_image).all()
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    reloaded = clip.loading.model_from_weights(clip.loading.LoadedWeights(model.state_dict()), "memory")
    assert reloaded.config == config
    assert_same_features(reloaded, model, config, atol=0)


def test_released_table_covers_every_architecture_with_its_digest_in_the_url() -> None:
    assert list(RELEASED_WEIGHTS) == list(RELEASED_ARCHITECTURES)
    for name, release in RELEASED_WEIGHTS.items():
        assert release.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert release.url.split("/")[-2] == release.sha256 and re.fullmatch("[0-9a-f]{64}", release.sha256)
        # OpenAI's file names: the architecture's, "/" and "@" written as "-" ("ViT-L-14-336px.pt")
        assert release.url.split("/")[-1] == name.replace("/", "-").replace("@", "-") + ".pt"
    assert len({release.sha256 for release in RELEASED_WEIGHTS.values()}) == len(RELEASED_WEIGHTS)  # no row copied


# The project's read-only reference data (beside the checkout where it exists, as in CI); a plain clone has none
REFERENCE_README = Path(__file__).resolve().parents[2] / "shared" / "reference" / "README.md"


@pytest.mark.skipif(not REFERENCE_README.is_file(), reason="no ../shared/reference beside this checkout")
def test_release_urls_and_digests_are_the_reference_data_s() -> None:
    # One wrong character in a digest would pass every other test (nothing here downloads a release) and refuse
    # the real file for every user
    from clip.tokenizer import MERGES_SHA256, MERGES_URL

    reference = REFERENCE_README.read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\s*- (\S+) `(https://openaipublic\.azureedge\.net/clip/models/\S+)`$", reference, re.M))
    assert listed == {name: release.url for name, release in RELEASED_WEIGHTS.items()}
    assert f"`{MERGES_URL}`" in reference and f"`{MERGES_SHA256}`" in reference


# ---------------------------------------------------------------------------------------------------------
# Files in OpenAI's layout


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("layout", list(WRITERS))
def test_openai_layout_files_load_with_the_same_features(kind: str, layout: str, openai_files) -> None:
    config = TINY[kind]
    original = tiny_model(config)
    path = openai_files[kind, layout]
    assert is_torchscript_archive(path) == (layout == "archive")
    model, preprocess = load(path, device="cpu")
    assert isinstance(model, CLIP) and not model.training
    assert model.config == config
    assert {value.dtype for value in model.state_dict().values()} <= {torch.float32, torch.int64}
    assert repr(preprocess) == repr(image_transform(config.vision.image_size))
    assert_same_features(model, half_round_trip(original), config)


def test_archive_reader_returns_what_torch_jit_load_sees(openai_files) -> None:
    path = openai_files["resnet", "archive"]
    weights, dropped = read_torchscript_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.jit.load(str(path)).state_dict()
    assert dropped == []
    assert list(weights) == list(expected)
    for name, value in expected.items():
        assert weights[name].dtype == value.dtype and torch.equal(weights[name], value), name
    assert weights["visual.conv1.weight"].dtype == torch.float16
    assert weights["visual.bn1.running_var"].dtype == torch.float32
    assert int(weights["input_resolution"]) == 64


def test_archive_reader_drops_tensor_attributes_that_are_not_weights(tmp_path: Path) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.attn_mask = torch.full((4, 4), float("-inf")).triu(1)  # a plain attribute, as in openai/CLIP

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.attn_mask

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(Block()).save(str(path))
    weights, dropped = read_torchscript_weights(path)
    assert sorted(weights) == ["linear.bias", "linear.weight"]
    assert dropped == ["attn_mask"]


def test_running_out_of_memory_in_an_archive_is_not_called_damage(tmp_path: Path) -> None:
    # A failed allocation while the archive's weights are read was reported as "a damaged or truncated TorchScript
    # archive": the file is fine, the machine lacks memory. Limited address space, in a fork (process-wide).
    from multiprocess import run_in_fork

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(nn.Linear(8 << 10, 8 << 10, bias=False)).save(str(path))  # 256 MiB of weights
    assert run_in_fork(_archive_read_with_128_mib_to_spare, path) == "memory failure"
    assert sorted(read_torchscript_weights(path)[0]) == ["weight"]  # without the limit it reads


def _archive_read_with_128_mib_to_spare(path: Path) -> str:
    import re
    import resource

    from clip.exception_chain import out_of_memory_in

    size = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))
    try:
        read_torchscript_weights(path)
    except Exception as error:
        return "memory failure" if out_of_memory_in(error) is error else f"{type(error).__name__}: {error}"
    return "read"


def test_loader_and_layout_agree_on_which_weights_are_half_precision() -> None:
    model = convert_to_half_precision(tiny_model(TINY_RESNET))
    half = {name for name, value in model.state_dict().items() if value.dtype == torch.float16}
    assert half == half_precision_names(model)
    vit = convert_to_half_precision(tiny_model(TINY_VIT))
    assert {"visual.proj", "text_projection", "visual.conv1.weight"} <= half_precision_names(vit)
    assert vit.visual.class_embedding.dtype == vit.ln_final.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", list(TINY))
def test_half_precision_model_runs_with_float32_normalisation(kind: str) -> None:
    # The dtype mix that clip.load uses on CUDA, exercised on the CPU (whose float16 kernels suffice here).
    config = TINY[kind]
    model = tiny_model(config)
    half_model = convert_to_half_precision(copy.deepcopy(model))
    images, text = inputs_for(config)
    with torch.no_grad():
        image_features = half_model.encode_image(images)
        text_features = half_model.encode_text(text)
        assert image_features.dtype == text_features.dtype == torch.float16
        torch.testing.assert_close(image_features.float(), model.encode_image(images), rtol=0.02, atol=0.02)
        torch.testing.assert_close(text_features.float(), model.encode_text(text), rtol=0.02, atol=0.02)


def test_all_float16_state_dict_with_integer_extras_loads(tmp_path: Path) -> None:
    original = tiny_model(TINY_VIT).half()
    state = original.state_dict() | {"input_resolution": 32, "context_length": 16, "vocab_size": 120}
    torch.save(state, tmp_path / "half.pt")
    model, _ = load(tmp_path / "half.pt", device="cpu")
    assert model.dtype == torch.float32
    assert_same_features(model, original.float(), TINY_VIT)


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module."], ids=["ddp_of_compiled", "compiled_ddp"])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    # torch.compile of a DDP-wrapped model saves "_orig_mod.module.": that order was left with "module."
    original = tiny_model(TINY_VIT)
    torch.save({prefix + key: value for key, value in original.state_dict().items()}, tmp_path / "ddp.pt")
    model, _ = load(tmp_path / "ddp.pt", device="cpu")
    assert_same_features(model, original, TINY_VIT, atol=0)


def test_a_file_damaged_since_its_save_is_refused_and_a_run_directory_falls_back(tmp_path: Path) -> None:
    # torch.load reads changed bytes without complaint: an evaluation would have scored garbage weights
    original = tiny_model(TINY_VIT)
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)
    data = bytearray(path.read_bytes())
    weight = original.state_dict()["visual.proj"].numpy().tobytes()
    at = data.find(weight[:64])
    data[at + 8 : at + 12] = torch.tensor([12345.0]).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"weights\.pt is damaged: its member .* does not match the checksum"):
        load(path, device="cpu")
    # in a run directory, the newest checkpoint damaged: the one before it is loaded, with a warning
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(original.state_dict(), tmp_path / "run" / "checkpoints" / "step_00000001.pt")
    path.rename(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_00000002\.pt: .* is damaged"):
        model, _ = load(tmp_path / "run", device="cpu")
    assert_same_features(model, original, TINY_VIT, atol=0)


def test_a_storage_error_on_the_newest_checkpoint_of_a_run_directory_stops_instead_of_falling_back(
    tmp_path: Path, monkeypatch
) -> None:
    # An EIO or ESTALE of a network file system, or a permission, was taken for a damaged file: clip.load, and
    # train.init_weights (fine-tuning from another run), quietly used the checkpoint before it, with a warning.
    import builtins
    import errno

    import clip.weights_file

    older, newer = tiny_model(TINY_VIT, seed=0), tiny_model(TINY_VIT, seed=1)
    (tmp_path / "checkpoints").mkdir()
    torch.save(older.state_dict(), tmp_path / "checkpoints" / "step_00000001.pt")
    newest = tmp_path / "checkpoints" / "step_00000002.pt"
    torch.save(newer.state_dict(), newest)
    real_open = builtins.open

    class FailingReads(io.FileIO):  # the first bytes read; the storage fails the rest (torch.load's reads too)
        def readinto(self, buffer):
            if self.tell() >= 64:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return super().readinto(buffer)

        def read(self, size=-1):
            if self.tell() >= 64:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return super().read(size if size is None or size < 0 else min(size, 64 - self.tell()))

    def open_eio(file, mode="r", *args, **kwargs):
        if str(file) == str(newest) and "b" in mode:
            return io.BufferedReader(FailingReads(file, "rb"))
        return real_open(file, mode, *args, **kwargs)

    def open_denied(file, mode="r", *args, **kwargs):  # chmod 000 as a user other than root
        if str(file) == str(newest):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    real_load = torch.load

    def load_wrapped_stale(file, *args, **kwargs):  # torch's reader wrapping the OSError in a RuntimeError
        if str(file) == str(newest):
            try:
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            except OSError as error:
                raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory") from error
        return real_load(file, *args, **kwargs)

    failures = [(builtins, "open", open_eio, "Input/output error"),
                (builtins, "open", open_denied, "Permission denied"),
                (clip.weights_file.torch, "load", load_wrapped_stale, "Stale file handle")]
    for owner, name, replacement, reason in failures:
        monkeypatch.setattr(owner, name, replacement)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is skipped with a warning
            with pytest.raises(WeightsFileError, match=rf"could not read .*step_00000002\.pt, the newest checkpoint of "
                                                       rf".*{reason}.* a storage error, not a damaged file"):
                load(tmp_path, device="cpu")
            with pytest.raises(WeightsFileError, match=rf"step_00000002\.pt, the newest checkpoint.*{reason}"):
                clip.loading.load_weights_into(tiny_model(TINY_VIT, seed=2), str(tmp_path))
        # the file named alone: said to be the storage's failure, not damage
        with pytest.raises(WeightsFileError, match=rf"could not read .*step_00000002\.pt: .*{reason}.* the storage "
                                                   rf"failed the read"):
            load(newest, device="cpu")
        monkeypatch.undo()
    # a torn file's own OSError (EINVAL from a seek before its start) still falls back, with a warning
    def load_torn(file, *args, **kwargs):
        if str(file) == str(newest):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(clip.weights_file.torch, "load", load_torn)
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_00000002\.pt: .* damaged or truncated"):
        model, _ = load(tmp_path, device="cpu")
    monkeypatch.undo()
    assert_same_features(model, older, TINY_VIT, atol=0)


def test_a_safetensors_file_loads_with_a_warning_about_its_activation(tmp_path: Path) -> None:
    # open_clip's Hub releases are safetensors state dicts in OpenAI's layout; they were refused as "a binary
    # file", and their GELU models (most LAION-trained ones) would load as QuickGELU without a word
    safetensors_torch = pytest.importorskip("safetensors.torch")
    original = tiny_model(TINY_VIT)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors_torch.save_file({key: value.contiguous() for key, value in original.state_dict().items()}, path)
    with pytest.warns(UserWarning, match=r"open_clip_model\.safetensors is a safetensors file .*'-quickgelu'.*GELU"):
        model, _ = load(path, device="cpu")
    assert_same_features(model, original, TINY_VIT, atol=0)
    with pytest.warns(UserWarning, match=r"is a safetensors file .*model.activation = \"gelu\""):
        clip.loading.load_weights_into(CLIP(TINY_VIT), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # configured with GELU: nothing to say
        gelu = CLIP(ModelConfig.from_dict({**TINY_VIT.to_dict(), "activation": "gelu"}))
        clip.loading.load_weights_into(gelu, str(path))
    assert all(torch.equal(value, original.state_dict()[name]) for name, value in gelu.state_dict().items())


def test_resnet_weights_refused_by_a_vit_config_name_no_vit_only_setting(tmp_path: Path) -> None:
    # A ResNet has no patch size: "model.vision.patch_size: 32 there, 8 here" (its unused default) sent the user
    # to a setting that does not matter once model.vision.kind is "resnet"
    torch.save(tiny_model(TINY_RESNET).state_dict(), tmp_path / "rn.pt")
    with pytest.raises(WeightsFileError, match="model.vision.kind: 'resnet' there, 'vit' here") as raised:
        clip.loading.load_weights_into(CLIP(TINY_VIT), str(tmp_path / "rn.pt"))
    assert "patch_size" not in str(raised.value) and "mlp_ratio" not in str(raised.value)
    torch.save(tiny_model(TINY_VIT).state_dict(), tmp_path / "vit.pt")  # a ViT's patch size is the user's to set
    with pytest.raises(WeightsFileError, match="model.vision.patch_size: 8 there, 32 here"):
        clip.loading.load_weights_into(CLIP(TINY_RESNET), str(tmp_path / "vit.pt"))


def test_a_damaged_safetensors_file_or_one_without_the_package_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({key: value.contiguous() for key, value in tiny_model(TINY_VIT).state_dict().items()},
                                path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(WeightsFileError, match=r"model\.safetensors is a damaged or truncated safetensors file"):
        load(path, device="cpu")
    path.write_bytes(whole)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # not installed: import fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WeightsFileError, match=r"is a safetensors file: reading it needs the safetensors package"):
        load(path, device="cpu")


def test_an_open_clip_training_checkpoint_loads_with_a_warning_about_its_activation(tmp_path: Path) -> None:
    # open_clip's epoch_N.pt: {"epoch", "name", "state_dict" with DDP's prefix, "optimizer"}. Its GELU models
    # (most LAION-trained ones) have OpenAI's shapes, so they loaded as QuickGELU without a word.
    original = tiny_model(TINY_VIT)
    state = {f"module.{key}": value for key, value in original.state_dict().items()}
    torch.save({"epoch": 32, "name": "laion-run", "state_dict": state, "optimizer": {}}, tmp_path / "epoch_32.pt")
    with pytest.warns(UserWarning, match=r"epoch_32\.pt is an open_clip training checkpoint.*'-quickgelu'.*GELU"):
        model, _ = load(tmp_path / "epoch_32.pt", device="cpu")
    assert_same_features(model, original, TINY_VIT, atol=0)
    # The way to a GELU model it names is one that reads this file: model.load_state_dict, which it named
    # before, cannot take keys with DDP's "module." prefix
    with pytest.warns(UserWarning, match=r"activation 'gelu'\) and clip\.loading\.load_weights_into\(model, path\)"):
        load(tmp_path / "epoch_32.pt", device="cpu")
    # as train.init_weights too: a fine-tuning run configured with QuickGELU started from it without a word
    with pytest.warns(UserWarning, match=r"epoch_32\.pt is an open_clip training checkpoint.*model.activation = \"gelu\""):
        clip.loading.load_weights_into(CLIP(TINY_VIT), str(tmp_path / "epoch_32.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # configured with GELU: nothing to say
        gelu = CLIP(ModelConfig.from_dict({**TINY_VIT.to_dict(), "activation": "gelu"}))
        clip.loading.load_weights_into(gelu, str(tmp_path / "epoch_32.pt"))
    assert all(torch.equal(value, original.state_dict()[name]) for name, value in gelu.state_dict().items())


def test_an_open_clip_checkpoint_of_a_siglip_trained_model_loads_with_its_bias(tmp_path: Path) -> None:
    # open_clip trained with --siglip keeps the learned bias in the state dict ("logit_bias", 0-dim): it was refused
    # as an unexpected key, by clip.load and train.init_weights alike
    original = tiny_model(TINY_VIT)
    state = {f"module.{key}": value for key, value in original.state_dict().items()}
    state["module.logit_bias"] = torch.tensor(-12.5)
    torch.save({"epoch": 3, "name": "siglip-run", "state_dict": state, "optimizer": {}}, tmp_path / "epoch_3.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the activation's warning, tested above
        model, _ = load(tmp_path / "epoch_3.pt", device="cpu")
        fresh = CLIP(TINY_VIT)
        clip.loading.load_weights_into(fresh, str(tmp_path / "epoch_3.pt"))
    assert model.logit_bias.item() == fresh.logit_bias.item() == -12.5
    assert "logit_bias" not in model.state_dict()
    assert_same_features(model, original, TINY_VIT, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints written by the trainer, and run directories

# Two text heads of 32 channels: not the released convention, so only the recorded config gets it right.
CUSTOM_HEADS = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="vit", image_size=32, width=64, layers=1, heads=4, patch_size=16),
    text=TextConfig(context_length=16, vocab_size=120, width=64, heads=2, layers=1),
    activation="gelu",
)


def trainer_checkpoint(model: CLIP, step: int) -> dict:
    config = {"model": model.config.to_dict(), "optimizer": {"lr": 5e-4}, "output_dir": "runs/x"}
    return {"format": "clip-pretrain/1", "step": step, "model": model.state_dict(), "config": config, "optimizer": {}}


def test_trainer_checkpoint_rebuilds_the_architecture_from_its_config(tmp_path: Path) -> None:
    original = tiny_model(CUSTOM_HEADS)
    torch.save(trainer_checkpoint(original, 7), tmp_path / "ckpt.pt")
    model, _ = load(tmp_path / "ckpt.pt", device="cpu")
    assert model.config == CUSTOM_HEADS
    assert_same_features(model, original, CUSTOM_HEADS, atol=0)


def test_a_bare_state_dict_of_unreleased_sizes_warns_that_heads_and_activation_are_guessed(
    tmp_path: Path, monkeypatch
) -> None:
    # torch.save(model.state_dict()) of a model trained here: OpenAI's conventions (width / 64 heads, QuickGELU)
    # rebuilt it with 1 text head and QuickGELU, silently, and its features came out different.
    original = tiny_model(CUSTOM_HEADS)
    torch.save(original.state_dict(), tmp_path / "bare.pt")
    with pytest.warns(UserWarning, match=r"records no architecture.*\(1 image and 1 text heads, quick_gelu\).*"
                                         r"load its training run's directory or checkpoint"):
        model, _ = load(tmp_path / "bare.pt", device="cpu")
    assert (model.config.text.heads, model.config.activation) == (1, "quick_gelu")  # the guess it warns of
    # Sizes of a released architecture: OpenAI's conventions are that architecture's, nothing is guessed
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "tiny", model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tmp_path / "bare.pt", device="cpu")


def test_transparent_images_are_preprocessed_as_the_model_saw_them_in_training(tmp_path: Path) -> None:
    # The training loader composites transparency onto white; OpenAI's preprocessing resizes with the alpha and
    # drops it (transparent areas turn black). A model trained here is loaded with the former.
    from PIL import Image

    from clip.data.decoding import upright_rgb
    from clip.evaluation.during_training import _image_transform
    from clip.preprocess import image_transform

    logo = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # transparent black, a red opaque square in the middle
    logo.paste((200, 0, 0, 255), (32, 32, 64, 64))
    original = tiny_model(TINY_VIT)
    size = TINY_VIT.vision.image_size
    as_trained = image_transform(size)(upright_rgb(logo, []))  # what the training loader decodes, resized
    torch.save(trainer_checkpoint(original, 7), tmp_path / "ckpt.pt")
    _, preprocess = load(tmp_path / "ckpt.pt", device="cpu")
    torch.testing.assert_close(preprocess(logo), as_trained, atol=0.02, rtol=0)
    torch.testing.assert_close(_image_transform(original)(logo), as_trained, atol=0.02, rtol=0)
    torch.save(original.state_dict(), tmp_path / "plain.pt")  # not known to be trained here: OpenAI's handling
    _, preprocess = load(tmp_path / "plain.pt", device="cpu")
    assert torch.equal(preprocess(logo), image_transform(size)(logo))
    assert preprocess(logo)[:, 0, 0].tolist() != pytest.approx(as_trained[:, 0, 0].tolist(), abs=0.5)


def test_run_directory_loads_the_newest_readable_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    models = {step: tiny_model(CUSTOM_HEADS, seed=step) for step in (100, 200)}
    for step, model in models.items():
        torch.save(trainer_checkpoint(model, step), folder / f"step_{step:08d}.pt")
    model, _ = load(tmp_path / "run", device="cpu")
    assert_same_features(model, models[200], CUSTOM_HEADS, atol=0)

    torn = (folder / "step_00000200.pt").read_bytes()
    (folder / "step_00000300.pt").write_bytes(torn[: len(torn) // 2])  # a crash mid-write
    with pytest.warns(UserWarning, match="step_00000300.pt"):
        model, _ = load(tmp_path / "run", device="cpu")
    assert_same_features(model, models[200], CUSTOM_HEADS, atol=0)

    (folder / "latest").write_text("step_00000100.pt\n")
    model, _ = load(tmp_path / "run", device="cpu")
    assert_same_features(model, models[100], CUSTOM_HEADS, atol=0)


def test_the_readmes_weights_only_file_loads_as_its_checkpoint(tmp_path: Path) -> None:
    # README: a checkpoint's model, config and loss_parameters, without the optimizer state. A SigLIP model's
    # bias is no part of its state dict; a bare state dict of these sizes also loses the heads and activation.
    original = tiny_model(CUSTOM_HEADS)
    checkpoint = trainer_checkpoint(original, 7) | {"loss_parameters": {"logit_bias": torch.tensor(-10.0)}}
    torch.save(checkpoint, tmp_path / "step_00000007.pt")
    ckpt = torch.load(tmp_path / "step_00000007.pt", weights_only=True)
    torch.save({k: ckpt[k] for k in ("format", "step", "model", "config", "loss_parameters")}, tmp_path / "weights.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, source = load_with_source(tmp_path / "weights.pt", device="cpu")
    assert model.config == CUSTOM_HEADS and model.logit_bias.item() == -10.0
    # The recipe kept model, config and loss_parameters alone: an evaluation of the file recorded step null, so
    # its results could not be traced to the training step they came from
    assert source.step == 7
    assert_same_features(model, original, CUSTOM_HEADS, atol=0)
    fresh = tiny_model(CUSTOM_HEADS, seed=1)  # train.init_weights
    clip.loading.load_weights_into(fresh, str(tmp_path / "weights.pt"))
    assert_same_features(fresh, original, CUSTOM_HEADS, atol=0)


def test_loading_a_run_directory_logs_which_checkpoint_it_read(tmp_path: Path, caplog) -> None:
    # The evaluation commands log at INFO; given a run that is still training, their output did not say which
    # step was evaluated
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(trainer_checkpoint(tiny_model(CUSTOM_HEADS), 40), folder / "step_00000040.pt")
    with caplog.at_level(logging.INFO, logger="clip.loading"):
        load(tmp_path / "run", device="cpu")
        load(folder / "step_00000040.pt", device="cpu")  # a file names itself: nothing to add
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'run'}: loading {folder / 'step_00000040.pt'}"
    ]


def test_load_with_source_names_the_checkpoint_it_read_not_one_written_meanwhile(tmp_path: Path, monkeypatch) -> None:
    # The evaluation commands recorded the run directory as given: of a run still training, nobody could tell
    # afterwards which step was evaluated. The directory is resolved once, and that file is both loaded and named.
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    models = {step: tiny_model(CUSTOM_HEADS, seed=step) for step in (100, 200)}
    torch.save(trainer_checkpoint(models[100], 100), folder / "step_00000100.pt")
    build = clip.loading.model_from_weights

    def with_a_checkpoint_written_meanwhile(weights, source, **kwargs):
        torch.save(trainer_checkpoint(models[200], 200), folder / "step_00000200.pt")
        return build(weights, source, **kwargs)

    monkeypatch.setattr(clip.loading, "model_from_weights", with_a_checkpoint_written_meanwhile)
    model, _, source = load_with_source(tmp_path / "run", device="cpu")
    assert (source.path, source.step, source.released) == ((folder / "step_00000100.pt").resolve(), 100, None)
    # The file's SHA256 as well: a file given by its path may be replaced since, and its name no longer say
    assert source.to_dict() == {"path": str((folder / "step_00000100.pt").resolve()), "step": 100, "released": None,
                                "sha256": hashlib.sha256((folder / "step_00000100.pt").read_bytes()).hexdigest()}
    assert_same_features(model, models[100], CUSTOM_HEADS, atol=0)
    monkeypatch.undo()
    assert len(load(tmp_path / "run", device="cpu")) == 2  # openai/CLIP's (model, preprocess), as before
    _, _, source = load_with_source(tmp_path / "run", device="cpu")
    newest = folder / "step_00000200.pt"
    assert source == WeightsSource(newest.resolve(), 200, None, hashlib.sha256(newest.read_bytes()).hexdigest())


def test_load_with_source_hashes_the_checkpoint_it_read_though_pruned_meanwhile(tmp_path: Path, monkeypatch) -> None:
    # The SHA256 was taken by the checkpoint's path after the model was built: a run still training with
    # keep_last = 1 deletes that file at its next save, and the load that had read it whole failed with
    # FileNotFoundError. The digest is of the file read, from a handle held since before the read.
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint = folder / "step_00000100.pt"
    torch.save(trainer_checkpoint(tiny_model(CUSTOM_HEADS), 100), checkpoint)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    build = clip.loading.model_from_weights

    def with_the_checkpoint_pruned_meanwhile(weights, source, **kwargs):
        checkpoint.unlink()  # the run saved step 200 and pruned this one
        return build(weights, source, **kwargs)

    monkeypatch.setattr(clip.loading, "model_from_weights", with_the_checkpoint_pruned_meanwhile)
    _, _, source = load_with_source(tmp_path / "run", device="cpu")
    assert (source.step, source.sha256) == (100, digest)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_load_with_source_skips_a_fifo_named_like_the_newest_checkpoint_without_waiting_on_it(tmp_path: Path) -> None:
    # The handle that the SHA256 is read through is opened before the reader refuses what is no regular file:
    # opened plainly, a FIFO waits for a writer that never comes
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(trainer_checkpoint(tiny_model(CUSTOM_HEADS), 10), folder / "step_00000010.pt")
    fifo = folder / "step_00000020.pt"
    os.mkfifo(fifo)
    outcome = []

    def loading() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the FIFO skipped: a warning
            outcome.append(load_with_source(tmp_path / "run", device="cpu")[2].step)

    finishes_without_waiting_on(fifo, loading, "load_with_source")
    assert outcome == [10]


def finishes_without_waiting_on(fifo: Path, call, what: str) -> None:
    """Runs `call` in a thread; fails the test, naming `what`, if it is still waiting 20 s later (on `fifo`)."""
    import threading

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the waiting open return, and the test end
        thread.join(timeout=20)
        pytest.fail(f"{what} waited on {fifo.name}")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_load_with_jit_of_a_fifo_is_refused_without_waiting_on_it(tmp_path: Path) -> None:
    # jit=True asks first whether the file is a TorchScript archive, which zipfile answered by opening it
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    outcome = []

    def loading() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # that jit=True loads it as with jit=False: it is no release
                load(fifo, device="cpu", jit=True)
        except WeightsFileError as error:
            outcome.append(str(error))

    finishes_without_waiting_on(fifo, loading, "load(jit=True)")
    assert outcome == [f"{fifo} is not a regular file"]

def counting_sha256(monkeypatch) -> list:
    """hashlib.sha256 replaced by one that notes each call in the list returned: how often a file is hashed."""
    hashed = []
    monkeypatch.setattr(hashlib, "sha256", lambda *args: hashed.append(args) or hashlib.new("sha256", *args))
    return hashed


def test_load_does_not_hash_the_file_it_discards_the_record_of(tmp_path: Path, monkeypatch) -> None:
    # clip.load returns no WeightsSource: a second read of a multi-GB file for a digest nobody sees is only cost
    torch.save(trainer_checkpoint(tiny_model(CUSTOM_HEADS), 7), tmp_path / "step_00000007.pt")
    hashed = counting_sha256(monkeypatch)
    load(tmp_path / "step_00000007.pt", device="cpu")
    assert hashed == []
    _, _, source = load_with_source(tmp_path / "step_00000007.pt", device="cpu")
    assert hashed and source.sha256 == hashlib.new("sha256", (tmp_path / "step_00000007.pt").read_bytes()).hexdigest()


def test_load_weights_into_does_not_hash_the_file_it_returns_only_the_path_of(tmp_path: Path, monkeypatch) -> None:
    # As clip.load: the README's way to load an open_clip GELU model, where a record is not asked for
    torch.save(trainer_checkpoint(tiny_model(CUSTOM_HEADS), 7), tmp_path / "step_00000007.pt")
    hashed = counting_sha256(monkeypatch)
    model = tiny_model(CUSTOM_HEADS, seed=1)
    assert clip.loading.load_weights_into(model, str(tmp_path / "step_00000007.pt")) == tmp_path / "step_00000007.pt"
    assert hashed == []
    assert clip.loading.load_weights_with_source(model, str(tmp_path / "step_00000007.pt")).sha256 is not None and hashed


def test_the_warnings_of_load_and_load_with_source_name_the_callers_line(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(tiny_model(CUSTOM_HEADS).state_dict(), folder / "step_00000001.pt")  # heads guessed: a warning
    (folder / "step_00000002.pt").write_bytes(b"torn")  # skipped: a warning
    for loader in (load, load_with_source):
        with pytest.warns(UserWarning) as caught:
            loader(tmp_path / "run", device="cpu")
        assert [Path(warning.filename).name for warning in caught] == [Path(__file__).name] * 2, loader


def test_only_a_trainer_checkpoint_gives_its_step(tmp_path: Path) -> None:
    # Another program's "step" may count something else (optimizer steps of another batch size, epochs)
    checkpoint = trainer_checkpoint(tiny_model(CUSTOM_HEADS), 7)
    files = {
        "weights.pt": {k: checkpoint[k] for k in ("model", "config")},  # a weights-only file without the format
        "foreign.pt": {k: checkpoint[k] for k in ("model", "config", "step")},
        "bare.pt": checkpoint["model"],
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    torch.save(checkpoint, tmp_path / "step_00000007.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bare state dict's guessed heads
        sources = {name: load_with_source(tmp_path / name, device="cpu")[2] for name in [*files, "step_00000007.pt"]}
    assert {name: source.step for name, source in sources.items()} == {**dict.fromkeys(files), "step_00000007.pt": 7}


def test_directory_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match=r"directory without checkpoints.*step_XXXXXXXX\.pt"):
        load(tmp_path, device="cpu")


def test_a_folder_of_runs_given_for_one_of_them_names_them(tmp_path: Path) -> None:
    # clip.load("runs") for clip.load("runs/my_run") said only that runs holds no checkpoints
    for run in ("my_run", "other_run"):
        (tmp_path / "runs" / run / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / run / "checkpoints" / "step_00000005.pt").touch()
    (tmp_path / "runs" / "notes").mkdir()
    runs = tmp_path / "runs"
    with pytest.raises(WeightsFileError, match=(rf"directory without checkpoints.*it holds run directories: "
                                                rf"{re.escape(str(runs / 'my_run'))}, {re.escape(str(runs / 'other_run'))}$")):
        load(runs, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Released names: download, verification, jit


@pytest.fixture
def tiny_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openai_files) -> tuple[CLIP, list]:
    """RN50 in the release table pointed at a tiny archive behind a file:// URL, with its real SHA256; the
    downloader is wrapped to record its calls."""
    original = tiny_model(TINY_RESNET)
    served = copy_of(openai_files["resnet", "archive"], tmp_path / "RN50-served.pt")
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setitem(RELEASED_WEIGHTS, "RN50", ReleasedWeights(url=served.as_uri(), sha256=digest))
    calls: list = []
    real_download_bytes = clip.download.download_bytes

    def recording_download_bytes(url: str, sha256: str, root=None, **kwargs):
        calls.append((url, sha256, root))
        return real_download_bytes(url, sha256, root=root, progress=False)

    # What clip.load and load_weights_into fetch a released file with (to read the bytes it checked)
    monkeypatch.setattr(clip.download, "download_bytes", recording_download_bytes)
    return original, calls


def test_released_name_is_downloaded_verified_and_loaded(tmp_path: Path, tiny_release) -> None:
    original, calls = tiny_release
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "RN50-served.pt").write_bytes(b"a stale or corrupted download")
    with pytest.warns(UserWarning, match="SHA256"):
        model, _ = load("RN50", device="cpu", download_root=cache)
    assert calls == [(RELEASED_WEIGHTS["RN50"].url, RELEASED_WEIGHTS["RN50"].sha256, cache)]
    assert hashlib.sha256((cache / "RN50-served.pt").read_bytes()).hexdigest() == RELEASED_WEIGHTS["RN50"].sha256
    assert_same_features(model, half_round_trip(original), TINY_RESNET)


def test_initial_weights_of_another_released_architecture_are_refused_before_the_download(
    tmp_path: Path, tiny_release, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The release table gives the architecture: a wrong [model] section is named at once, not after a
    # download of up to 1.4 GB (or, offline, after being told to fetch the file by hand)
    original, calls = tiny_release
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "RN50", TINY_RESNET)
    other = ModelConfig.from_dict({**TINY_RESNET.to_dict(), "embed_dim": 16})
    with pytest.raises(WeightsFileError, match=r"the released RN50 holds .*model.embed_dim: 32 there, 16 here"):
        clip.loading.load_weights_into(CLIP(other), "RN50", download_root=tmp_path / "cache")
    assert calls == []
    model = CLIP(TINY_RESNET)
    clip.loading.load_weights_into(model, "RN50", download_root=tmp_path / "cache")
    assert len(calls) == 1
    expected = half_round_trip(original).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())


def at_image_size_of(config: ModelConfig, image_size: int) -> ModelConfig:
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=image_size))


def test_initial_weights_of_another_image_size_start_with_their_position_embeddings_resampled(
    tmp_path: Path, tiny_release, openai_files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The paper's ViT-L/14@336px is ViT-L/14 trained one more epoch at 336 px: [model] gives the new size, and
    # of all the weights only the position grid depends on it. They were refused: "model.vision.image_size
    # differs". Every source of weights takes the same way: a checkpoint that records its architecture...
    grid = "visual.positional_embedding"
    original = tiny_model(TINY_VIT)
    torch.save(trainer_checkpoint(original, 5), tmp_path / "step_00000005.pt")
    with caplog.at_level(logging.INFO, logger="clip.loading"):
        clip.loading.load_weights_into(model := CLIP(at_image_size_of(TINY_VIT, 48)), str(tmp_path / "step_00000005.pt"))
    expected = {**original.state_dict(), grid: resize_position_embedding(original.state_dict()[grid], 6)}
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert ("step_00000005.pt: trained at 32 px; its image position embeddings are resampled from a 4x4 grid to "
            "the configured 48 px's 6x6") in caplog.text
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    # ... OpenAI's archive, whose shapes are read (those of a release, whose unseen settings are compared) ...
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "ViT-B/32", TINY_VIT)
    clip.loading.load_weights_into(at_224 := CLIP(TINY_VIT), str(openai_files["vit", "archive"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the image size is no unseen setting to warn of
        clip.loading.load_weights_into(model := CLIP(at_image_size_of(TINY_VIT, 16)), str(openai_files["vit", "archive"]))
    torch.testing.assert_close(model.state_dict()[grid], resize_position_embedding(at_224.state_dict()[grid], 2),
                               rtol=0, atol=2e-3)
    # ... and a released name, a ResNet here, whose attention pool holds the grid; checked before the download
    _, calls = tiny_release
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "RN50", TINY_RESNET)
    pool = "visual.attnpool.positional_embedding"
    clip.loading.load_weights_into(at_64 := CLIP(TINY_RESNET), "RN50", download_root=tmp_path / "cache")
    clip.loading.load_weights_into(model := CLIP(at_image_size_of(TINY_RESNET, 96)), "RN50", download_root=tmp_path / "cache")
    assert model.state_dict()[pool].shape == (1 + 3 * 3, 256)
    torch.testing.assert_close(model.state_dict()[pool], resize_position_embedding(at_64.state_dict()[pool], 3))
    assert all(torch.equal(value, at_64.state_dict()[name]) for name, value in model.state_dict().items() if name != pool)
    # Any other difference is still refused, by name, and the image size is not among them
    other = dataclasses.replace(at_image_size_of(TINY_RESNET, 96), embed_dim=16)
    with pytest.raises(WeightsFileError, match=r"model\.embed_dim: 32 there, 16 here\. Set") as refused:
        clip.loading.load_weights_into(CLIP(other), "RN50", download_root=tmp_path / "cache")
    assert "image_size" not in str(refused.value) and len(calls) == 2  # refused before a third download


def with_context_length(config: ModelConfig, context_length: int) -> ModelConfig:
    return dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=context_length))


def test_initial_weights_of_a_longer_text_context_start_a_shorter_one_with_the_same_text_features(
    tmp_path: Path, openai_files, caplog: pytest.LogCaptureFixture
) -> None:
    # A shorter context (FLIP trains on 32 tokens) keeps the first position embeddings: the text encoder is
    # causal, so a text that fits has the features it had. It was refused, as a longer one still is.
    original = tiny_model(TINY_VIT)
    torch.save(trainer_checkpoint(original, 5), tmp_path / "step_00000005.pt")
    with caplog.at_level(logging.INFO, logger="clip.loading"):
        clip.loading.load_weights_into(model := CLIP(with_context_length(TINY_VIT, 8)), str(tmp_path / "step_00000005.pt"))
    expected = {**original.state_dict(), "positional_embedding": original.state_dict()["positional_embedding"][:8]}
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert "trained with a 16-token text context; the configured 8 keeps its first 8 position embeddings" in caplog.text
    _, text = inputs_for(TINY_VIT)  # end of text at position 5
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text[:, :8]), original.encode_text(text), rtol=0, atol=1e-5)
    # OpenAI's archive has a context_length entry, which follows; both sizes may differ at once
    shorter_and_larger = with_context_length(at_image_size_of(TINY_VIT, 48), 8)
    clip.loading.load_weights_into(CLIP(shorter_and_larger), str(openai_files["vit", "archive"]))
    with pytest.raises(WeightsFileError, match=r"model\.text\.context_length: 16 there, 24 here\. Set the \[model\] "
                                               r"section .* \(a shorter text context may be set"):
        clip.loading.load_weights_into(CLIP(with_context_length(TINY_VIT, 24)), str(tmp_path / "step_00000005.pt"))


# Widths of 96: no whole number of OpenAI's 64-channel heads, so a plain state dict of this model gives no
# inferred architecture, and its shapes alone decide
NO_INFERRED_HEADS = ModelConfig(
    embed_dim=32, text=dataclasses.replace(TINY_TEXT, width=96, heads=2, layers=1),
    vision=VisionConfig(kind="vit", image_size=32, width=96, layers=1, heads=2, patch_size=8),
)


def test_a_plain_state_dict_whose_architecture_cannot_be_inferred_may_differ_in_the_same_two_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Widths of 96 give no head count by OpenAI's convention, so the shapes alone decide: the image size and a
    # shorter context were then refused ("wrong shape: visual.positional_embedding"), unlike in any other file
    original = tiny_model(NO_INFERRED_HEADS)
    torch.save(original.state_dict(), tmp_path / "plain.pt")
    with caplog.at_level(logging.INFO, logger="clip.loading"):
        clip.loading.load_weights_into(model := CLIP(with_context_length(at_image_size_of(NO_INFERRED_HEADS, 48), 8)),
                                       str(tmp_path / "plain.pt"))
    grid, text = "visual.positional_embedding", "positional_embedding"
    expected = {**original.state_dict(), grid: resize_position_embedding(original.state_dict()[grid], 6),
                text: original.state_dict()[text][:8]}
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert "resampled from a 4x4 grid to the configured 48 px's 6x6" in caplog.text
    with pytest.raises(WeightsFileError, match=r"model\.text\.context_length: 16 there, 24 here\. .* \(a shorter"):
        clip.loading.load_weights_into(CLIP(with_context_length(NO_INFERRED_HEADS, 24)), str(tmp_path / "plain.pt"))


@pytest.mark.parametrize("positions, found", [(torch.zeros(()), r"\(\)"), (torch.zeros(1, 96), r"\(1, 96\)")],
                         ids=["scalar", "one_row"])
def test_text_positions_that_give_no_context_are_named_by_the_shape_check_in_a_file_of_no_inferred_architecture(
    tmp_path: Path, positions: torch.Tensor, found: str
) -> None:
    # The sizes of a file whose architecture cannot be inferred are read from its position embeddings: a text
    # entry with no rows (a scalar) or a single one (a context no config admits) gives none, and the shape
    # check names it, rather than an IndexError or the config's ValueError from the reading
    torch.save({**tiny_model(NO_INFERRED_HEADS).state_dict(), "positional_embedding": positions}, tmp_path / "plain.pt")
    with pytest.raises(WeightsFileError, match=r"plain\.pt does not fit the configured .*\n  wrong shape \(1\): "
                                               rf"positional_embedding: expected \(16, 96\), found {found}"):
        clip.loading.load_weights_into(CLIP(NO_INFERRED_HEADS), str(tmp_path / "plain.pt"))


def test_a_checkpoint_of_a_longer_context_without_text_positions_is_named_as_missing_them(tmp_path: Path) -> None:
    checkpoint = trainer_checkpoint(tiny_model(TINY_VIT), 5)
    del checkpoint["model"]["positional_embedding"]
    torch.save(checkpoint, tmp_path / "step_00000005.pt")
    # The configured context is shorter: there are no position embeddings to keep the first of, which the shape
    # check names (not a KeyError from the trimming)
    with pytest.raises(WeightsFileError, match=r"step_00000005\.pt does not fit .*\n  missing \(1\): "
                                               r"positional_embedding"):
        clip.loading.load_weights_into(CLIP(with_context_length(TINY_VIT, 8)), str(tmp_path / "step_00000005.pt"))


def test_initial_weights_of_the_configured_sizes_are_loaded_with_nothing_said_of_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Said on every start of a fine-tuning run, "the configured 16 keeps its first 16 position embeddings"
    # would have the user look for a context they never changed
    original = tiny_model(TINY_VIT)
    torch.save(trainer_checkpoint(original, 5), tmp_path / "step_00000005.pt")
    with caplog.at_level(logging.INFO, logger="clip.loading"):
        clip.loading.load_weights_into(model := CLIP(TINY_VIT), str(tmp_path / "step_00000005.pt"))
    assert all(torch.equal(value, original.state_dict()[name]) for name, value in model.state_dict().items())
    assert "text context" not in caplog.text and "resampled" not in caplog.text


def test_a_file_of_released_shapes_under_other_heads_is_warned_of_or_refused_when_it_is_the_release(
    tmp_path: Path, openai_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shapes do not show heads or the activation: a copy of OpenAI's ViT-B-32.pt given as a path, under a
    # [model] section with mistyped heads, loaded into a model that computes something else without a word
    monkeypatch.setitem(RELEASED_ARCHITECTURES, "ViT-B/32", TINY_VIT)
    archive = copy_of(openai_files["vit", "archive"], tmp_path / "ViT-B-32.pt")
    other_heads = dataclasses.replace(TINY_VIT, vision=dataclasses.replace(TINY_VIT.vision, heads=2))
    with pytest.warns(UserWarning, match=r"ViT-B-32\.pt records no architecture.*released ViT-B/32.*"
                                         r"model\.vision\.heads: 1 in ViT-B/32, 2 here\. The weights are loaded"):
        clip.loading.load_weights_into(model := CLIP(other_heads), str(archive))
    expected = half_round_trip(tiny_model(TINY_VIT)).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the released settings: nothing to say
        clip.loading.load_weights_into(CLIP(TINY_VIT), str(archive))
    # The file is the release itself (its SHA256): its architecture is known whole, as under its name
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(RELEASED_WEIGHTS, "ViT-B/32", ReleasedWeights(url="file:///nowhere", sha256=digest))
    with pytest.raises(WeightsFileError, match=r"ViT-B-32\.pt \(OpenAI's released ViT-B/32, by its SHA256\) holds .*"
                                               r"model\.vision\.heads: 1 there, 2 here"):
        clip.loading.load_weights_into(CLIP(other_heads), str(archive))
    # Hashed once, as it is read for the record: not a second time to tell whether it is the release
    with monkeypatch.context() as patch, pytest.raises(WeightsFileError, match=r"by its SHA256\) holds"):
        hashed = counting_sha256(patch)
        clip.loading.load_weights_with_source(CLIP(other_heads), str(archive))
    assert len(hashed) == 1
    # An open_clip checkpoint's activation has its own warning (about QuickGELU), said once; GELU says nothing
    state = {f"module.{key}": value for key, value in tiny_model(TINY_VIT).state_dict().items()}
    torch.save({"epoch": 32, "name": "laion-run", "state_dict": state}, tmp_path / "epoch_32.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.loading.load_weights_into(CLIP(dataclasses.replace(TINY_VIT, activation="gelu")), str(tmp_path / "epoch_32.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip.loading.load_weights_into(CLIP(TINY_VIT), str(tmp_path / "epoch_32.pt"))
    assert len(caught) == 1 and "open_clip training checkpoint" in str(caught[0].message)


def traced_on_a_gpu(archive: Path, destination: Path) -> Path:
    """`archive` as if traced on CUDA, like OpenAI's: the devices its code creates tensors on are "cuda:0"."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as target:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith(".py"):
                data = data.replace(b'torch.device("cpu")', b'torch.device("cuda:0")')
            target.writestr(entry, data)
    return destination


def test_jit_true_runs_the_verified_gpu_traced_archive_on_the_cpu_in_float32(
    tmp_path: Path, tiny_release, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, _ = tiny_release
    served = traced_on_a_gpu(Path(url2pathname(urlparse(RELEASED_WEIGHTS["RN50"].url).path)), tmp_path / "RN50-gpu.pt")
    with zipfile.ZipFile(served) as archive:
        assert any(b'"cuda:0"' in archive.read(name) for name in archive.namelist() if name.endswith(".py"))
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setitem(RELEASED_WEIGHTS, "RN50", ReleasedWeights(url=served.as_uri(), sha256=digest))
    model, preprocess = load("RN50", device="cpu", jit=True, download_root=tmp_path / "cache")
    assert isinstance(model, torch.jit.ScriptModule)
    assert repr(preprocess) == repr(image_transform(64))
    images, text = inputs_for(TINY_RESNET)
    text[1, 5], text[1, -1] = 1, TINY_RESNET.text.vocab_size - 1  # one text runs to the end of the context
    reference = half_round_trip(original)  # float32 weights, as openai/CLIP's load gives on a CPU
    with torch.no_grad():
        features = model.encode_text(text), model.encode_image(images)
        assert [f.dtype for f in features] == [torch.float32, torch.float32]
        torch.testing.assert_close(features[0], reference.encode_text(text), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(features[1], reference.encode_image(images), rtol=1e-4, atol=1e-5)
        logits_per_image, _ = model(images, text)
    assert logits_per_image.dtype == torch.float32


def test_jit_true_on_a_file_that_is_not_released_warns_and_loads_its_weights(openai_files) -> None:
    path = openai_files["vit", "archive"]
    with pytest.warns(UserWarning, match=r"only done for OpenAI's released archives .* as with jit=False"):
        model, _ = load(path, device="cpu", jit=True)
    assert isinstance(model, CLIP)


def test_load_with_source_names_a_release_and_its_sha256(tmp_path: Path, tiny_release) -> None:
    cache = tmp_path / "cache"
    release = WeightsSource(path=(cache / "RN50-served.pt").resolve(), released="RN50",
                            sha256=RELEASED_WEIGHTS["RN50"].sha256)
    assert load_with_source("RN50", device="cpu", download_root=cache)[2] == release
    assert load_with_source("RN50", device="cpu", jit=True, download_root=cache)[2] == release
    # the release's file under a path of its own, with jit=True (which checks its SHA256 before running it)
    assert load_with_source(cache / "RN50-served.pt", device="cpu", jit=True)[2] == release


def test_jit_true_hashes_a_file_once(tmp_path: Path, tiny_release, openai_files, monkeypatch) -> None:
    # Whether a file is a release's archive (whose code jit=True runs) is its SHA256, which load_with_source records
    # too: a file that is not one was hashed again as its weights were read (seconds for a 350 MB archive)
    cache = tmp_path / "cache"
    load("RN50", device="cpu", jit=True, download_root=cache)
    released, other, plain = cache / "RN50-served.pt", openai_files["vit", "archive"], openai_files["vit", "state_dict"]
    for path, expected_hashes in [(released, 1), (other, 1), (plain, 0)]:  # a plain state dict is never a release
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit=True on a file that is not a release's: its weights are loaded
            hashed = counting_sha256(patch)
            _, _, source = load_with_source(path, device="cpu", jit=True)
        assert len(hashed) == max(expected_hashes, 1), path  # the record's digest: plain's is taken as it is read
        assert source.sha256 == hashlib.new("sha256", path.read_bytes()).hexdigest()
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hashed = counting_sha256(patch)
            load(path, device="cpu", jit=True)  # no record: only the release check hashes
        assert len(hashed) == expected_hashes, path


def swap_after_hashing(monkeypatch, path: Path, replacement: Path) -> list:
    """hashlib.sha256 replaced by one that, once a digest of the file at `path` is taken, puts `replacement` at
    `path` (a rename, as a download or another user would): a file swapped between its check and its use. Returns
    a list that holds the path once the swap has happened."""
    swapped: list = []
    real_sha256 = hashlib.sha256

    class SwapAfterDigest:
        def __init__(self, *data: bytes) -> None:
            self.digest = real_sha256(*data)

        def update(self, data: bytes) -> None:
            self.digest.update(data)

        def hexdigest(self) -> str:
            if not swapped and path.exists():
                os.replace(copy_of(replacement, path.with_name("swapped-in.pt")), path)
                swapped.append(path)
            return self.digest.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterDigest)
    return swapped


@pytest.mark.parametrize("given", ["name", "path"])
def test_jit_true_runs_the_bytes_it_verified_not_a_file_swapped_in_after(
    tmp_path: Path, tiny_release, openai_files, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    # jit=True runs an archive's code because its SHA256 is a release's: the file was hashed, then opened again by
    # its name for torch.jit.load, which ran whatever had been put at the path in between
    original, _ = tiny_release
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = copy_of(Path(url2pathname(urlparse(RELEASED_WEIGHTS["RN50"].url).path)), cache / "RN50-served.pt")
    swapped = swap_after_hashing(monkeypatch, cached, openai_files["vit", "archive"])
    name_or_path = "RN50" if given == "name" else cached
    model, preprocess, source = load_with_source(name_or_path, device="cpu", jit=True, download_root=cache)
    assert swapped == [cached] and is_torchscript_archive(cached)  # another archive is at the path now
    assert isinstance(model, torch.jit.ScriptModule)
    assert repr(preprocess) == repr(image_transform(TINY_RESNET.vision.image_size))
    assert_same_features(model, half_round_trip(original), TINY_RESNET)
    assert source.released == "RN50" and source.sha256 == RELEASED_WEIGHTS["RN50"].sha256


@pytest.mark.parametrize("reader", ["load_with_source", "load_weights_with_source"])
def test_released_weights_are_read_from_the_bytes_checked_not_a_file_swapped_in_after(
    tmp_path: Path, tiny_release, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    # The cached file was checked against the release's SHA256, then read again by name: other weights put at the
    # path in between were loaded (as data: nothing of them runs) and recorded as the release
    original, _ = tiny_release
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = copy_of(Path(url2pathname(urlparse(RELEASED_WEIGHTS["RN50"].url).path)), cache / "RN50-served.pt")
    others = write_openai_state_dict(tiny_model(TINY_RESNET, seed=1), tmp_path / "other-weights.pt")
    swapped = swap_after_hashing(monkeypatch, cached, others)
    if reader == "load_with_source":
        model, _, source = load_with_source("RN50", device="cpu", download_root=cache)
    else:
        monkeypatch.setitem(RELEASED_ARCHITECTURES, "RN50", TINY_RESNET)
        model = CLIP(TINY_RESNET)
        source = clip.loading.load_weights_with_source(model, "RN50", download_root=cache)
    assert swapped == [cached]
    expected = half_round_trip(original).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert source.released == "RN50" and source.sha256 == RELEASED_WEIGHTS["RN50"].sha256


def test_the_model_is_named_by_openais_keyword(tmp_path: Path) -> None:
    # openai/CLIP's argument is `name`, and code passes it by keyword (`clip.load(name=model, device=device,
    # jit=jit)`, as Stable Diffusion's image embedder does): that was a TypeError here
    path = tmp_path / "weights.pt"
    torch.save(tiny_model(TINY_VIT).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TINY_VIT's sizes are no release's: heads and activation are guessed
        by_name, _ = load(name=str(path), device="cpu", jit=False, download_root=None)
        _, _, source = load_with_source(name=path, device="cpu")
    assert_same_features(by_name, tiny_model(TINY_VIT), TINY_VIT)
    assert source.path == path.resolve()


@pytest.mark.parametrize(("device", "problem"), [
    ("gpu", "is not a torch device"),  # was torch's RuntimeError "Expected one of cpu, cuda, ... device type"
    ("meta", "holds no data to compute with"),  # was accepted: a model of shapes, failing in its first forward
    (torch.device("meta"), "holds no data to compute with"),
    ("cpu:1", "names no device of its own: torch has one CPU device"),  # was taken silently for "cpu"
])
def test_a_device_that_cannot_compute_is_one_line_naming_those_accepted(tmp_path: Path, device, problem: str) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny_model(TINY_VIT).state_dict(), path)
    with pytest.raises(ValueError) as raised:
        load(path, device=device)
    message = str(raised.value)
    assert message.startswith(f"device {str(device)!r} {problem}") and "\n" not in message
    assert message.endswith("use None (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or another torch "
                            "device such as 'mps'")


@pytest.mark.parametrize(("device", "gpus", "problem"), [
    ("cuda", 0, "CUDA is not available on this machine (torch.cuda.is_available() is False); devices here: 'cpu'"),
    (torch.device("cuda", 0), 0, "CUDA is not available on this machine"),
    ("cuda:3", 2, "this process sees 2 CUDA device(s), numbered from 0; devices here: 'cpu', 'cuda:0', 'cuda:1'"),
    ("mps", 0, "this machine has no mps device; devices here: 'cpu'"),
], ids=["cuda", "torch.device", "cuda:3 of 2", "mps"])
def test_a_device_this_machine_lacks_is_one_line_before_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device, gpus: int, problem: str
) -> None:
    # torch's "Found no NVIDIA driver on your system" (or "not linked with support for mps devices") came from the
    # first tensor moved there: after the download and the model's construction
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(clip.download, "download", lambda *args, **kwargs: pytest.fail("downloaded first"))
    with pytest.raises(DeviceNotAvailableError) as raised:
        load("ViT-B/32", device=device, download_root=tmp_path)
    assert str(raised.value).startswith(f"device {str(device)!r} is not available: {problem}")
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, RuntimeError)  # torch's error was one: code around clip.load may catch that


def test_a_gpu_this_process_sees_passes_the_device_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda:1", "") == torch.device("cuda", 1)
    assert available_device(torch.device("cuda"), "") == torch.device("cuda")
    assert available_device("cpu", "") == torch.device("cpu")


def test_the_first_cpu_is_the_cpu(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny_model(TINY_VIT).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TINY_VIT's sizes are no release's: heads and activation are guessed
        model, _ = load(path, device=torch.device("cpu", 0))  # the spelling torch itself prints of some tensors
    assert model.logit_scale.device.type == "cpu"


def test_unknown_name_suggests_the_closest_released_one() -> None:
    with pytest.raises(FileNotFoundError, match=r"Did you mean 'ViT-B/32'") as raised:
        load("ViT-B-32", device="cpu")
    assert isinstance(raised.value, RuntimeError)  # what openai/CLIP's load raises
    # open_clip's names for the releases (pretrained='openai'): the suffix put them out of difflib's reach
    for name, release in [("ViT-B-32-quickgelu", "ViT-B/32"), ("ViT-L-14-336", "ViT-L/14@336px"),
                          ("RN50x4-quickgelu", "RN50x4")]:
        with pytest.raises(FileNotFoundError, match=re.escape(f"Did you mean {release!r} (open_clip's {name!r} with "
                                                              "pretrained='openai')?")):
            load(name, device="cpu")


def test_a_released_name_given_as_a_path_is_told_to_be_a_str(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Path is looked for as a file; the hint was "Did you mean 'RN50'?" for Path("RN50")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"To load the released model 'RN50', pass its name as a str, not"):
        load(Path("RN50"), device="cpu")


@pytest.mark.parametrize("name", [" RN50", "ViT-B/32 ", "\tViT-L/14@336px\n"])
def test_a_released_name_with_whitespace_around_it_is_pointed_at_the_name_without(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # " RN50" was told "Did you mean 'RN50' (open_clip's ' RN50' with pretrained='openai')?", not the cause
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as raised:
        load(name, device="cpu")
    assert f"Did you mean {name.strip()!r}, without the whitespace around it? Released models:" in str(raised.value)
    assert "open_clip" not in str(raised.value)


def test_an_empty_name_is_refused_not_read_as_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is "."; clip.load("") and `clip-retrieval --model ''` read the working directory as a run
    # directory (an error about its missing checkpoints), or loaded a run started there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"an empty model name: .*'\.' for the current folder"):
        load("", device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Files that would run code are refused


class WritesMarker:
    """Unpickling this runs `exec`, which writes a marker file: the side effect a malicious file would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"evil\.pt was refused.*could run code.*exec"):
        load(tmp_path / "evil.pt", device="cpu")
    assert not marker.exists()


class RunsShell:
    """Unpickling this calls os.system, of a module torch's allowlist blocks outright: its refusal is worded
    otherwise than for other globals, and was reported as "a damaged or truncated PyTorch file" followed by
    torch's advice to load it with weights_only=False (which would run it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {str(self.marker)!r}",))


def test_pickle_of_a_blocked_module_is_refused_as_unsafe_without_torchs_advice(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": RunsShell(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"evil\.pt was refused.*could run code.*unsupported GLOBAL") as raised:
        load(tmp_path / "evil.pt", device="cpu")
    assert "weights_only" not in str(raised.value) and "damaged" not in str(raised.value)
    assert not marker.exists()


def _replace_data_pkl(archive: Path, destination: Path, data: bytes) -> Path:
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(destination, "w") as target:
        for info in source.infolist():
            target.writestr(info, data if info.filename.endswith("/data.pkl") else source.read(info))
    return destination


def test_reading_a_torchscript_archive_leaves_no_file_open(openai_files, monkeypatch) -> None:
    # data.pkl's handle was left to the garbage collector (a ResourceWarning under -W error)
    opened, real_open = [], zipfile.ZipFile.open

    def recording_open(self, *args, **kwargs):
        opened.append(real_open(self, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    load(openai_files["vit", "archive"], device="cpu")
    assert opened and all(member.closed for member in opened)


def test_torchscript_archive_with_a_foreign_global_is_refused(tmp_path: Path, openai_files) -> None:
    marker = tmp_path / "marker"
    archive = openai_files["vit", "archive"]
    evil = _replace_data_pkl(archive, tmp_path / "evil.pt", pickle.dumps(WritesMarker(marker), protocol=2))
    assert is_torchscript_archive(evil)
    with pytest.raises(
        UnsafeFileError, match=r"references (__builtin__|builtins)\.exec, which is not on the allowlist"
    ):
        load(evil, device="cpu")
    assert not marker.exists()


def test_torchscript_archive_with_inconsistent_storage_sizes_is_rejected(tmp_path: Path, openai_files) -> None:
    archive = openai_files["vit", "archive"]
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data[:-2] if info.filename.endswith("/data/0") else data)
    with pytest.raises(WeightsFileError, match=r"record .*/data/0 holds \d+ bytes, but data\.pkl describes"):
        load(damaged, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Files of the wrong kind


def test_text_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(WeightsFileError, match=r"notes\.pt is not a PyTorch weights file: it is a text file"):
        load(tmp_path / "notes.pt", device="cpu")


def test_weights_packed_in_a_tar_or_gzip_file_are_named_so(tmp_path: Path) -> None:
    # A tar's header is ASCII and NULs: it was "a text file beginning '000000000.json\x00\x00...'"
    import gzip
    import tarfile

    torch.save(tiny_model(TINY_VIT).state_dict(), tmp_path / "weights.pt")
    with tarfile.open(tmp_path / "model.tar", "w") as archive:
        archive.add(tmp_path / "weights.pt", arcname="weights.pt")
    with pytest.raises(WeightsFileError, match=r"model\.tar is not a PyTorch weights file: it is a tar archive: unpack"):
        load(tmp_path / "model.tar", device="cpu")
    (tmp_path / "model.tar.gz").write_bytes(gzip.compress((tmp_path / "model.tar").read_bytes()))
    with pytest.raises(WeightsFileError, match=r"model\.tar\.gz is not a PyTorch weights file: it is a gzip-compressed"):
        load(tmp_path / "model.tar.gz", device="cpu")


def test_empty_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsFileError, match=r"empty\.pt is empty \(0 bytes\)"):
        load(tmp_path / "empty.pt", device="cpu")


def test_zip_that_is_not_a_pytorch_file_is_named(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "arrays.npz", "w") as archive:
        archive.writestr("weights.npy", b"\x93NUMPY")
    with pytest.raises(
        WeightsFileError, match=r"arrays\.npz is a zip archive but not a PyTorch file: it holds weights\.npy"
    ):
        load(tmp_path / "arrays.npz", device="cpu")


@pytest.mark.parametrize("layout", list(WRITERS))
def test_truncated_file_is_reported_as_damaged(layout: str, tmp_path: Path, openai_files) -> None:
    path = copy_of(openai_files["vit", layout], tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=r"model\.pt is a damaged or truncated"):
        load(path, device="cpu")


def test_single_tensor_and_dict_without_weights_are_named(tmp_path: Path) -> None:
    torch.save(torch.randn(3, 4), tmp_path / "tensor.pt")
    with pytest.raises(WeightsFileError, match=r"holds a single tensor of shape \(3, 4\), not a state dict"):
        load(tmp_path / "tensor.pt", device="cpu")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "dict.pt")
    with pytest.raises(WeightsFileError, match=r"holds a dict without model weights \(keys: 'step', 'lr'\)"):
        load(tmp_path / "dict.pt", device="cpu")


def test_a_tutorial_style_checkpoint_loads_and_a_model_saved_whole_is_refused_with_the_remedy(tmp_path: Path) -> None:
    # PyTorch's tutorials save {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}: it was "a dict
    # without model weights"
    original = tiny_model(TINY_VIT)
    torch.save({"epoch": 3, "model_state_dict": original.state_dict(), "optimizer_state_dict": {}, "loss": 0.5},
               tmp_path / "tutorial.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the architecture inferred from the shapes
        model, _ = load(tmp_path / "tutorial.pt", device="cpu")
    assert_same_features(model, original, TINY_VIT, atol=0)
    # torch.save(model): refused (unpickling it runs code), and now the message says what to save instead
    torch.save(original, tmp_path / "whole.pt")
    with pytest.raises(UnsafeFileError, match=r"whole\.pt was refused.*save its model\.state_dict\(\) instead"):
        load(tmp_path / "whole.pt", device="cpu")


def test_state_dict_of_another_model_is_named(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        WeightsFileError, match=r"other\.pt does not hold CLIP weights.*neither 'visual\.proj'.*'0\.weight'"
    ):
        load(tmp_path / "other.pt", device="cpu")


def test_missing_unexpected_and_misshapen_entries_are_listed(tmp_path: Path) -> None:
    state = openai_state_dict(tiny_model(TINY_RESNET))
    del state["visual.attnpool.q_proj.bias"]
    state["visual.extra.weight"] = torch.zeros(1)
    state["visual.layer2.0.conv2.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightsFileError) as caught:
        load(tmp_path / "odd.pt", device="cpu")
    message = str(caught.value)
    assert "odd.pt does not fit the ModifiedResNet (width 8, stages (1, 2, 1, 1)) at 64 px" in message
    assert "inferred from its tensor shapes" in message
    assert "missing (1): visual.attnpool.q_proj.bias" in message
    assert "unexpected (1): visual.extra.weight" in message
    assert "wrong shape (1): visual.layer2.0.conv2.weight: expected (16, 16, 3, 3), found (16, 16, 1, 1)" in message
    assert len(message.splitlines()) == 4


@pytest.mark.parametrize(
    "make_entry, expected",
    [
        (lambda: torch.zeros(64, dtype=torch.int64), "int64 values, not floating point"),
        (lambda: torch.ones(64, dtype=torch.complex64), "complex64 values, not floating point"),
        (lambda: torch.zeros(64, dtype=torch.bool), "bool values, not floating point"),
        (lambda: torch.ones(64).to_sparse(), "a sparse_coo tensor, not a dense one"),
        (lambda: torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.qint8), r"a quantized tensor \(torch.qint8\)"),
        (lambda: torch.empty(64, device="meta"), "a meta tensor, which holds no values"),
    ],
    ids=["int64", "complex", "bool", "sparse", "quantized", "meta"],
)
def test_an_entry_that_is_no_float_weight_is_named(tmp_path: Path, make_entry, expected: str) -> None:
    # load_state_dict cast integers, booleans and complex numbers into the float parameter without a word, and
    # met the others with torch's own error (a meta one from a state_dict saved before it was materialised)
    state = openai_state_dict(tiny_model(TINY_VIT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates creating quantized tensors
        state["ln_final.weight"] = make_entry()
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightsFileError, match=rf"odd\.pt does not fit .*\n  not loadable as weights \(1\): "
                                               rf"ln_final\.weight: {expected}$"):
        load(tmp_path / "odd.pt", device="cpu")


def test_extra_entry_that_contradicts_the_weights_is_an_error(tmp_path: Path) -> None:
    state = openai_state_dict(tiny_model(TINY_VIT)) | {"input_resolution": torch.tensor(224)}
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(WeightsFileError, match=r"input_resolution entry says 224, but its weights are for .* 32"):
        load(tmp_path / "model.pt", device="cpu")


@pytest.mark.parametrize(
    "extra, expected",
    [(torch.tensor([32, 32]), r"a tensor of shape \(2,\)"), (torch.tensor(float("nan")), "nan")],
    ids=["two values", "nan"],
)
def test_an_extra_entry_that_is_no_whole_number_is_named(tmp_path: Path, extra: torch.Tensor, expected: str) -> None:
    # int() of it raised torch's ValueError, naming neither the file nor the entry
    state = openai_state_dict(tiny_model(TINY_VIT)) | {"input_resolution": extra}
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(WeightsFileError, match=rf"model\.pt: its input_resolution entry is {expected}, not a whole"):
        load(tmp_path / "model.pt", device="cpu")


def test_a_plain_python_extra_entry_is_read_or_named_not_taken_for_a_dict_without_weights(tmp_path: Path) -> None:
    original = tiny_model(TINY_VIT)
    torch.save(openai_state_dict(original) | {"input_resolution": 32.0}, tmp_path / "float.pt")  # a whole number
    assert load(tmp_path / "float.pt", device="cpu")[0].visual.input_resolution == 32
    torch.save(openai_state_dict(original) | {"context_length": "16"}, tmp_path / "text.pt")
    with pytest.raises(WeightsFileError, match=r"text\.pt: its context_length entry is '16', not a whole number"):
        load(tmp_path / "text.pt", device="cpu")


def test_a_dict_of_tensors_under_other_keys_than_names_is_named(tmp_path: Path) -> None:
    torch.save({0: torch.zeros(2), 1: torch.zeros(2)}, tmp_path / "numbered.pt")
    with pytest.raises(WeightsFileError, match=r"numbered\.pt holds a dict without model weights \(keys: 0, 1\)"):
        load(tmp_path / "numbered.pt", device="cpu")


@pytest.mark.parametrize(
    "entry, shape, expected",
    [
        ("positional_embedding", (1, 64), r"its tensor shapes give no valid architecture: text\.context_length must"),
        ("positional_embedding", (16, 0), r"'positional_embedding' is empty \(shape \(16, 0\)\)"),
        ("visual.conv1.weight", (0, 3, 8, 8), r"'visual\.conv1\.weight' is empty"),
    ],
    ids=["context of 1", "text width 0", "image width 0"],
)
def test_shapes_that_give_no_valid_architecture_are_named_with_the_file(
    tmp_path: Path, entry: str, shape: tuple, expected: str
) -> None:
    # The config's own ValueError, or a ZeroDivisionError from the head count, escaped without the file's name
    state = openai_state_dict(tiny_model(TINY_VIT)) | {entry: torch.zeros(shape)}
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(WeightsFileError, match=rf"odd\.pt does not hold CLIP weights in OpenAI's layout: {expected}"):
        load(tmp_path / "odd.pt", device="cpu")


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        # Refused by the config's type check (as a TOML file's values are), before the model is built; the
        # model's construction had raised its ValueError (or torch's TypeError) without the file's name
        (None, "activation", "relu", r"its config's 'model' entry is not a valid ModelConfig \(activation: 'relu' is "
                                     r"not one of 'quick_gelu', 'gelu'\)"),
        ("text", "width", 64.0, r"its config's 'model' entry is not a valid ModelConfig \(width: expected an "
                                r"integer, got 64\.0\)"),
        ("text", "width", 10**30, r"its config's 'model' entry is not a valid ModelConfig \(width: 1000.* is too "
                                  r"large \(integers must fit in 64 bits\)\)"),
        # Values of the right type that no model can have: refused by torch, named with the file
        (None, "embed_dim", 2**62, r"the architecture recorded in its config cannot be built \(.*Storage size "
                                   r"calculation overflowed"),
        ("vision", "image_size", 2**31, r"the architecture recorded in its config cannot be built \(.*Storage size "
                                        r"calculation overflowed"),
    ],
    ids=["unknown activation", "float width", "width 10**30", "embed_dim 2**62", "image_size 2**31"],
)
def test_a_recorded_config_that_no_model_has_is_named_with_the_file(
    tmp_path: Path, section: str | None, key: str, value: object, expected: str
) -> None:
    model = tiny_model(TINY_VIT)
    config = model.config.to_dict()
    (config if section is None else config[section])[key] = value
    torch.save({"model": model.state_dict(), "config": {"model": config}}, tmp_path / "odd.pt")
    with pytest.raises(WeightsFileError, match=rf"odd\.pt: {expected}") as raised:
        load(tmp_path / "odd.pt", device="cpu")
    assert "\n" not in str(raised.value)  # torch's lines of C++ source left out


def test_inference_refuses_widths_outside_the_released_head_convention() -> None:
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=16, width=48, layers=1, heads=3, patch_size=8),
        text=TINY_TEXT,
    )
    with pytest.raises(ArchitectureInferenceError, match=r"width 48 .* not a multiple of 64"):
        infer_model_config(CLIP(config).state_dict())


def _tiny_vit_shapes(**replaced: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """TINY_VIT's state dict as meta tensors (inference reads only shapes), some entries of other shapes."""
    state = {name: torch.empty(value.shape, device="meta") for name, value in CLIP(TINY_VIT).state_dict().items()}
    return state | {name.replace("__", "."): torch.empty(shape, device="meta") for name, shape in replaced.items()}


@pytest.mark.parametrize("rows", [1, 3, 11, 18])
def test_inference_refuses_position_rows_that_are_not_a_class_token_and_a_square_grid(rows: int) -> None:
    # 1 + 10 rows would otherwise be read as a 3 x 3 grid; a lone class token as a grid of 0 patches
    state = _tiny_vit_shapes(visual__positional_embedding=(rows, 64))
    with pytest.raises(ArchitectureInferenceError, match=rf"has {rows} rows: not 1 \+ a square number"):
        infer_model_config(state)
    assert infer_model_config(_tiny_vit_shapes(visual__positional_embedding=(10, 64))).vision.image_size == 3 * 8


@pytest.mark.parametrize("width, hidden", [(448, 61), (448, 1952), (832, 3840), (896, 3904)])
def test_inference_finds_the_ratio_that_builds_the_mlp_width(width: int, hidden: int) -> None:
    # hidden / width rounded to a float falls short for these: 61 / 448 * 448 is 60.99999..., and a model built
    # from that ratio would have 60 rows; the file was refused as "not expressible as a ratio of the width"
    state = _tiny_vit_shapes(visual__conv1__weight=(width, 3, 8, 8),
                             visual__transformer__resblocks__0__mlp__c_fc__weight=(hidden, width))
    assert int(width * (hidden / width)) == hidden - 1  # the case meant
    vision = infer_model_config(state).vision
    assert int(vision.width * vision.mlp_ratio) == hidden


def test_weights_whose_mlp_shapes_match_load_under_a_configured_ratio_that_builds_them(tmp_path: Path) -> None:
    # A text tower configured with open_clip's ViT-bigG kind of ratio (4.9231 x 64 = 315 units) could not load its
    # own plain state dict: the ratio read from the shapes, 315 / 64 = 4.921875, was compared, not the widths
    config = ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="vit", image_size=32, width=64, layers=1, heads=1, patch_size=8, mlp_ratio=4.9231),
        text=TextConfig(context_length=16, vocab_size=120, width=64, heads=1, layers=1, mlp_ratio=4.9231),
    )
    model = CLIP(config)
    assert model.state_dict()["transformer.resblocks.0.mlp.c_fc.weight"].shape == (315, 64)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded, _ = load(str(tmp_path / "weights.pt"), device="cpu", jit=False)  # the ratio read from the shapes
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in model.state_dict().items())
    fresh = CLIP(config)
    clip.loading.load_weights_into(fresh, str(tmp_path / "weights.pt"))  # the configured ratio
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in model.state_dict().items())


def test_inference_reads_each_towers_own_mlp_ratio() -> None:
    # Both towers' MLP widths are in the shapes; the released models' 4 is no default to fall back on: a text
    # tower of ratio 2 was inferred as 4, and the file then refused as of the wrong shape
    config = ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="vit", image_size=32, width=64, layers=1, heads=1, patch_size=8, mlp_ratio=3.0),
        text=TextConfig(context_length=16, vocab_size=120, width=128, heads=2, layers=1, mlp_ratio=2.0),
    )
    state = {name: torch.empty(value.shape, device="meta") for name, value in CLIP(config).state_dict().items()}
    inferred = infer_model_config(state)
    assert (inferred.vision.mlp_ratio, inferred.text.mlp_ratio) == (3.0, 2.0)
    assert inferred == dataclasses.replace(config, activation="quick_gelu")


@pytest.mark.parametrize(("blocks", "refusal"), [
    (["0", "2", "3", "4"], "has 4 numbered blocks but lacks block(s) [1]"),
    (["1", "2"], "has 2 numbered blocks but lacks block(s) [0]"),
    (["0", "1", "3", "12"], "has 4 numbered blocks but lacks block(s) [2, 4, 5, 6, 7]"),
    (["0", "1", "01"], "has block numbers written with leading zeros: ['01']"),
], ids=["one gap", "no block 0", "gaps past the count", "leading zero"])
def test_inference_names_only_the_blocks_that_are_missing(blocks: list[str], refusal: str) -> None:
    # The first five indices from 0 not present were listed, also past the largest one: blocks 0, 2, 3 and 4
    # were said to lack blocks 1, 5, 6, 7 and 8
    from clip.infer_architecture import _count_blocks

    with pytest.raises(ArchitectureInferenceError) as raised:
        _count_blocks({f"transformer.resblocks.{block}.ln_1.weight": torch.zeros(1) for block in blocks},
                      "transformer.resblocks")
    assert str(raised.value) == f"transformer.resblocks {refusal}"


def test_inference_counts_only_keys_inside_a_numbered_block() -> None:
    # A key that names a number alone, or a number run on into other characters, is no block
    from clip.infer_architecture import _count_blocks

    keys = ["transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1", "transformer.resblocks.1x.weight"]
    assert _count_blocks(dict.fromkeys(keys, torch.zeros(1)), "transformer.resblocks") == 1


def test_inference_names_a_resnet_stage_without_blocks() -> None:
    state = {name: torch.empty(value.shape, device="meta") for name, value in CLIP(TINY_RESNET).state_dict().items()
             if not name.startswith("visual.layer4.")}
    with pytest.raises(ArchitectureInferenceError, match=r"^the state dict has no visual\.layer4\.0\.\* entries$"):
        infer_model_config(state)


@pytest.mark.parametrize(("entry", "found"), [(torch.empty(32, device="meta"), r"\(32,\)"), (3, "int")],
                         ids=["1-d", "int"])
def test_inference_names_an_entry_that_is_no_tensor_of_the_expected_dimensions(entry: object, found: str) -> None:
    with pytest.raises(ArchitectureInferenceError, match=rf"^'text_projection' should be a 2-d tensor, found {found}$"):
        infer_model_config(_tiny_vit_shapes() | {"text_projection": entry})


def test_a_state_dict_of_neither_tower_is_named_with_its_first_five_keys() -> None:
    five = {f"k{index}": torch.zeros(1) for index in range(5)}
    with pytest.raises(ArchitectureInferenceError, match=r"found keys like 'k0', 'k1', 'k2', 'k3', 'k4' \(5 entries\)$"):
        infer_model_config(five)
    with pytest.raises(ArchitectureInferenceError, match=r"'k3', 'k4', \.\.\. \(6 entries\)$"):
        infer_model_config(five | {"k5": torch.zeros(1)})


def test_a_prefix_only_some_keys_have_is_not_a_wrapper_prefix() -> None:
    from clip.weights_file import weights_from_state_dict

    one = torch.zeros(1)
    state = {"module.a": one, "b": one, "_orig_mod.c": one}
    assert list(weights_from_state_dict(state).state_dict) == ["module.a", "b", "_orig_mod.c"]
    assert list(weights_from_state_dict({"module.a": one, "module.b": one}).state_dict) == ["a", "b"]


def test_state_dict_attention_masks_are_dropped_and_only_a_scalar_float_bias_is_set_apart() -> None:
    from clip.weights_file import weights_from_state_dict

    one = torch.zeros(1)
    weights = weights_from_state_dict({"transformer.resblocks.0.attn_mask": torch.zeros(4, 4), "attn_mask": one,
                                       "a.attn_mask_scale": one, "logit_bias": torch.tensor(-3.0)})
    assert list(weights.state_dict) == ["a.attn_mask_scale"] and weights.logit_bias.item() == -3.0
    # a bias of another shape or an integer one is no SigLIP bias: left in place, where loading names it
    for bias in (torch.zeros(2), torch.tensor(3)):
        weights = weights_from_state_dict({"logit_bias": bias})
        assert weights.logit_bias is None and torch.equal(weights.state_dict["logit_bias"], bias)


def test_what_a_checkpoint_dict_is_taken_for(tmp_path: Path) -> None:
    from clip.weights_file import read_weights

    state = {"visual.proj": torch.zeros(2, 2)}
    cases = {
        # an epoch and a config: not open_clip's layout (which records no config)
        "epoch_and_config": ({"epoch": 3, "state_dict": state, "config": {}}, None, None, None),
        "open_clip": ({"epoch": 3, "state_dict": state}, "an open_clip training checkpoint", None, None),
        # a step only counts in our trainer's format, and only as a whole number (True is no step)
        "bool_step": ({"format": "clip-pretrain/1", "step": True, "model": state}, None, None, None),
        "int_step": ({"format": "clip-pretrain/1", "step": 7, "model": state}, None, 7, None),
        # loss_parameters' logit_bias is a SigLIP bias only when it is one number
        "vector_bias": ({"model": state, "loss_parameters": {"logit_bias": torch.zeros(3)}}, None, None, None),
        "scalar_bias": ({"model": state, "loss_parameters": {"logit_bias": torch.tensor([-2.0])}}, None, None, -2.0),
    }
    for name, (saved, origin, step, bias) in cases.items():
        torch.save(saved, tmp_path / f"{name}.pt")
        weights = read_weights(tmp_path / f"{name}.pt")
        assert (weights.open_clip_origin, weights.step) == (origin, step), name
        assert (None if weights.logit_bias is None else weights.logit_bias.item()) == bias, name
