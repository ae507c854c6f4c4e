"""`clip.load`: a drop-in for openai/CLIP's `load`, for OpenAI's released weights and for our own files.

What `load` accepts:
- a released name (`clip.available_models()`): the file is downloaded into the cache and checked against its
  SHA256 (`clip.released`);
- a path to an OpenAI-style TorchScript archive, to a plain state dict (`torch.save(model.state_dict())`,
  optionally with OpenAI's `input_resolution`/`context_length`/`vocab_size` entries, any float dtype), to a
  checkpoint written by our trainer (`{"model": state dict, "config": {"model": ModelConfig dict}, ...}`),
  or to a training run directory (its newest readable `checkpoints/step_XXXXXXXX.pt`).

`load_with_source` also returns which weights were read (`WeightsSource`: the file and its SHA256, a trainer
checkpoint's step, a released name), for the evaluation commands' results files.

Safety: no file is ever unpickled with arbitrary classes. `torch.save` files go through
`torch.load(weights_only=True)`; TorchScript archives through `clip.torchscript_reader`, which never runs
their code. Only `jit=True` uses `torch.jit.load`, and only on bytes whose SHA256 is one of the release's: the
bytes that were hashed, read once.

Architecture: taken from a checkpoint's config when it has one; inferred from the tensor shapes otherwise
(`clip.infer_architecture`). The weights are then loaded with `strict=True`.

Precision: float32 on the CPU. On CUDA, float16 for the weights OpenAI stores in float16 (convolutions,
linear layers, attention projections, `text_projection`, `visual.proj`), like openai/CLIP; embeddings,
LayerNorm and BatchNorm stay float32, and LayerNorm computes in float32.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import download
from .architectures import RELEASED_ARCHITECTURES, ModelConfig, architecture_differences, release_of_open_clip_name
from .device_names import DeviceNotAvailableError, available_device
from .image_modes import TRAINING_ALPHA_BACKGROUND
from .infer_architecture import ArchitectureInferenceError, infer_model_config
from .model import CLIP, convert_to_half_precision
from .position_grid import at_image_size, grid_side, trained_image_size
from .released import RELEASED_WEIGHTS
from .torchscript_reader import is_torchscript_archive
from .weights_file import (
    LoadedWeights,
    UnsafeFileError,
    WeightsFileError,
    check_backed_by_storage,
    read_archive_weights,
    read_run_or_file,
    read_weights,
)

if TYPE_CHECKING:
    from .preprocess import ImageTransform

__all__ = [
    "DeviceNotAvailableError",
    "LoadedWeights",
    "ModelNotFoundError",
    "UnsafeFileError",
    "WeightsFileError",
    "WeightsSource",
    "convert_to_half_precision",
    "load",
    "load_with_source",
    "model_from_weights",
    "read_weights",
]

# Problems of each kind listed in an error message; the rest are summarised as "...".
_SHOWN_KEYS = 5

log = logging.getLogger(__name__)


def load(
    name: str | Path,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | Path | None = None,
) -> tuple[nn.Module, ImageTransform]:
    """Load a CLIP model and its image preprocessing, like openai/CLIP's `clip.load`.

    Args:
        name: a released model name (see `clip.available_models()`) or a path (see the module doc); openai/CLIP's
            name for the argument, which code passes by keyword (`clip.load(name="ViT-B/32")`).
        device: where to put the model; default "cuda" when available, else "cpu". On CUDA the weights are
            float16 as in OpenAI's release, elsewhere float32. A device this machine lacks ("cuda" without a GPU,
            "cuda:3" where this process sees two) is a one-line `DeviceNotAvailableError` (a ValueError and a
            RuntimeError) before anything is downloaded or read.
        jit: return OpenAI's TorchScript archive itself (`torch.jit.load`), only for a released name or a file
            whose SHA256 matches a released one; for any other file this warns and loads its weights as with
            jit=False (running a file's code is only safe for verified archives). As in openai/CLIP, the
            archive's device constants (OpenAI traced on "cuda") are pointed at `device`, and on a CPU its
            float16 casts become float32 casts and its weights float32.
        download_root: the folder for downloaded files; default `clip.download.cache_dir()`.

    Returns:
        (model in eval mode, preprocess: PIL image -> FloatTensor[3, n, n] for the model's input size).
    """
    # No record is returned: the file is not hashed for one (a second read of up to several GB)
    model, preprocess, _ = _load(name, device, jit, download_root, digest=False)
    return model, preprocess


@dataclass(frozen=True)
class WeightsSource:
    """Which weights `load_with_source` read, to be recorded beside what is computed with them: a run
    directory's newest checkpoint moves on while the run trains, and a file may be overwritten, so the name or
    path given does not say which weights those were: the file's SHA256 does."""

    path: Path  # the file read, absolute: a run directory's checkpoint, a released model's file in the cache
    step: int | None = None  # the training step of a checkpoint our trainer wrote; None for any other file
    released: str | None = None  # the released model's name, for a released name (or a verified archive, jit=True)
    sha256: str | None = None  # the file's SHA256 (a released file's: the one it was checked against)
    # The architecture was inferred from the tensor shapes by OpenAI's conventions (a file that records none,
    # not a released name), and where the file likely comes from open_clip (`LoadedWeights.open_clip_origin`):
    # an export keeps both, so that it loads with the same warnings, not as if the guess were recorded. Left
    # out of `to_dict`, the record results files keep.
    architecture_inferred: bool = False
    open_clip_origin: str | None = None

    def to_dict(self) -> dict[str, str | int | None]:
        return {"path": str(self.path), "step": self.step, "released": self.released, "sha256": self.sha256}


def load_with_source(
    name: str | Path,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | Path | None = None,
    *,
    half_on_cuda: bool = True,
) -> tuple[nn.Module, ImageTransform, WeightsSource]:
    """`load`, and which weights it read: (model, preprocess, `WeightsSource`). A run directory is resolved to
    one checkpoint once, and the model holds that file's weights, so a checkpoint written meanwhile changes
    neither the model nor the record. `half_on_cuda=False` keeps the weights as `load` gives them on the CPU
    (float32, holding the file's values exactly) on CUDA too, where `load` rounds them to float16 as openai/CLIP
    does: the evaluation commands' "fp32" scores a float32 checkpoint as its evaluation during training did."""
    return _load(name, device, jit, download_root, digest=True, half_on_cuda=half_on_cuda)


def _load(
    name_or_path: str | Path, device: str | torch.device | None, jit: bool, download_root: str | Path | None,
    *, digest: bool, half_on_cuda: bool = True,
) -> tuple[nn.Module, ImageTransform, WeightsSource]:
    """The work of `load` and `load_with_source`, one frame below either: its warnings name their caller. The
    record's SHA256 is taken only with `digest` (a released file's is known without); `half_on_cuda` as in
    `load_with_source`."""
    # Checked before the file is read (or downloaded): "gpu" raised torch's RuntimeError, "meta" and "cpu:1" were
    # accepted, and "cuda" without a GPU failed with torch's error once the model was built
    device = available_device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "None (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or another torch device such as 'mps'",
    )
    sha256 = None
    if jit:
        path, archive, sha256 = _verified_archive(name_or_path, download_root)
        if archive is not None:
            model, preprocess = _load_jit(archive, device)
            return model, preprocess, _source(path, None, _release_of_digest(sha256), None)
        warnings.warn(
            f"jit=True runs the TorchScript code stored in a file, which is only done for OpenAI's released "
            f"archives (verified by SHA256); {path} is not one of them, so its weights are loaded as with "
            f"jit=False instead.", stacklevel=3,
        )
    release = str(name_or_path) if _is_released_name(name_or_path) else None  # with jit=True, returned above
    # Warnings name the caller of load or load_with_source (stacklevel 4: past this function too)
    path, weights = _read(name_or_path, download_root, stacklevel=4,
                          digest=digest and release is None and sha256 is None)
    model = model_from_weights(weights, str(path), stacklevel=4)
    model = model.to(device)
    if device.type == "cuda" and half_on_cuda:
        convert_to_half_precision(model)
    # A model this library's trainer wrote (its checkpoints carry their config) saw transparent images
    # composited onto the training loader's background; OpenAI's, and any other weights, saw them resized
    # with their alpha, then the alpha dropped (image_transform's default). Each gets the images it knows. An
    # export (clip-export) says which it is: it records the architecture of OpenAI's weights too.
    trained_here = weights.model_config is not None if weights.trained_here is None else weights.trained_here
    alpha_background = TRAINING_ALPHA_BACKGROUND if trained_here else None
    from .preprocess import image_transform  # here, not at import: torchvision's import costs seconds (image_modes)

    source = _source(path, weights.step, release, weights.sha256 if sha256 is None else sha256)
    if weights.model_config is None and release is None:
        source = dataclasses.replace(source, architecture_inferred=True, open_clip_origin=weights.open_clip_origin)
    return model, image_transform(model.visual.input_resolution, alpha_background=alpha_background), source


def load_weights_into(model: CLIP, name_or_path: str, download_root: str | Path | None = None) -> Path:
    """`load_weights_with_source`, returning only the file read (which is not hashed for a record)."""
    return load_weights_with_source(model, name_or_path, download_root, digest=False).path


def load_weights_with_source(
    model: CLIP, name_or_path: str, download_root: str | Path | None = None, *, digest: bool = True
) -> WeightsSource:
    """Copies the weights of a released model (downloaded and checked against its SHA256), a weights file or
    a run directory's newest checkpoint into `model`, whose architecture must be theirs: the start of a
    fine-tuning run (`train.init_weights`). Returns which weights were read (`WeightsSource`, as `load_with_source`
    does: a run directory's checkpoint and its step, a released name, the file's SHA256). Nothing pickled is run.

    A file that records its architecture (a checkpoint of this library) must match `model.config` in every
    field but two sizes (`_adapted_on_load`): weights trained at another resolution start the model at its own,
    their image position embeddings resampled to its grid (`clip.position_grid`), and a shorter text context
    keeps their first text position embeddings. Tensor shapes do not show head counts or the activation, so for
    a plain state dict (OpenAI's files) those are the configured ones, and every tensor must have the configured
    model's shape (but those two sizes); where the shapes are a released model's and the configured heads or
    activation are not, the file is refused if it is that release (its SHA256), and warned of otherwise
    (`_check_unseen_settings`). `digest=False` leaves a file's SHA256 out of the record (None): a second read of
    the file, up to several GB."""
    released = _is_released_name(name_or_path)
    if released:  # known exactly, heads and activation included: checked before a download of up to 1.4 GB
        architecture = RELEASED_ARCHITECTURES[name_or_path]
        _check_architecture(architecture, model.config, f"the released {name_or_path}",
                            _adapted_on_load(architecture, model.config))
    path, weights = _read(name_or_path, download_root, stacklevel=3, digest=digest and not released)
    theirs, not_in_shapes = weights.model_config, set()
    if released:
        theirs = RELEASED_ARCHITECTURES[name_or_path]
    elif theirs is None:
        not_in_shapes = {"activation", "vision.heads", "text.heads"}
        try:
            theirs = infer_model_config(weights.state_dict)
        except ArchitectureInferenceError:
            # Widths OpenAI's convention cannot split into heads: the shape check below decides, but the two
            # sizes that may differ are read from the shapes, as for any other file
            theirs, not_in_shapes = _configured_at_sizes_of(weights.state_dict, model.config), set()
    if theirs is not None:
        _check_architecture(theirs, model.config, str(path), not_in_shapes | _adapted_on_load(theirs, model.config))
        if not_in_shapes:
            _check_unseen_settings(theirs, model.config, path, weights.open_clip_origin is not None, weights.sha256)
        weights = _at_configured_sizes(weights, theirs, model.config, path)
    if weights.open_clip_origin is not None and model.config.activation == "quick_gelu":
        # Shapes match whatever the activation: clip.load warns of this, and so must the start of a fine-tuning
        warnings.warn(
            f"{path} is {weights.open_clip_origin}, which records no activation: loaded into the configured "
            f"quick_gelu model. open_clip's models without '-quickgelu' in their name (most of those trained on "
            f"LAION) use GELU: set model.activation = \"gelu\" for those, or their features start out wrong.",
            stacklevel=2,
        )
    _load_checked(model, weights, f"{path} does not fit the configured {describe_architecture(model.config)}",
                  str(path))
    # A SigLIP model's bias is its loss's parameter, saved beside the weights: as clip.load's model, this one
    # holds it (model.logit_bias), and a file without one leaves none
    model.logit_bias = None if weights.logit_bias is None else weights.logit_bias.to(model.logit_scale.device)
    return _source(path, weights.step, name_or_path if released else None, weights.sha256)


def _source(path: Path, step: int | None, release: str | None, sha256: str | None) -> WeightsSource:
    """The record of the weights read from `path`. A released file was checked against its SHA256 already; any
    other's is `sha256`, taken as it was read (`read_run_or_file(..., digest=True)`, about a second per gigabyte;
    None where no record is wanted)."""
    if release is not None:
        sha256 = RELEASED_WEIGHTS[release].sha256
    return WeightsSource(path.resolve(), step, release, sha256)


# The text encoder's position embeddings (OpenAI's name), [context_length, width]
TEXT_POSITIONS = "positional_embedding"


def _adapted_on_load(theirs: ModelConfig, ours: ModelConfig) -> frozenset[str]:
    """The settings in which weights (of the architecture `theirs`) may differ from the model they start (`ours`):
    the image size, whose position embeddings are resampled to the configured grid (`clip.position_grid`), and a
    shorter text context, which keeps the first text position embeddings: the text encoder is causal, so a text
    that fits has the same features. A longer context would need positions never trained, and is refused."""
    adapted = {"vision.image_size"}
    if ours.text.context_length <= theirs.text.context_length:
        adapted.add("text.context_length")
    return frozenset(adapted)


def _configured_at_sizes_of(state_dict: Mapping[str, torch.Tensor], configured: ModelConfig) -> ModelConfig | None:
    """The configured architecture at the image size and text context of `state_dict`'s position embeddings:
    what a file whose architecture cannot be inferred is taken for. None where the shapes give no sizes."""
    image_size, positions = trained_image_size(state_dict, configured.vision), state_dict.get(TEXT_POSITIONS)
    if image_size is None or not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        return None
    try:
        return dataclasses.replace(
            configured, vision=dataclasses.replace(configured.vision, image_size=image_size),
            text=dataclasses.replace(configured.text, context_length=positions.shape[0]))
    except ValueError:  # sizes no config admits (a context of 1): the shape check names the misfit
        return None


def _at_configured_sizes(weights: LoadedWeights, theirs: ModelConfig, ours: ModelConfig, path: Path) -> LoadedWeights:
    """`weights` (of the architecture `theirs`) with the position embeddings of `ours`' image size and text
    context, and OpenAI's entries naming those (checked against the model) following."""
    state_dict, extras = at_image_size(weights.state_dict, theirs.vision, ours.vision), dict(weights.extras)
    if state_dict is not weights.state_dict:
        old, new = grid_side(theirs.vision), grid_side(ours.vision)
        log.info("%s: trained at %d px; its image position embeddings are resampled from a %dx%d grid to the "
                 "configured %d px's %dx%d", path, theirs.vision.image_size, old, old, ours.vision.image_size, new, new)
        if "input_resolution" in extras:
            extras["input_resolution"] = ours.vision.image_size
    context = ours.text.context_length
    if context < theirs.text.context_length and TEXT_POSITIONS in state_dict:
        state_dict = {**state_dict, TEXT_POSITIONS: state_dict[TEXT_POSITIONS][:context].clone()}
        log.info("%s: trained with a %d-token text context; the configured %d keeps its first %d position "
                 "embeddings", path, theirs.text.context_length, context, context)
        if "context_length" in extras:
            extras["context_length"] = context
    if state_dict is weights.state_dict:
        return weights
    return dataclasses.replace(weights, state_dict=state_dict, extras=extras)


def _check_architecture(theirs: ModelConfig, configured: ModelConfig, source: str, not_in_shapes: set[str]) -> None:
    """Refuses weights (`source`: a file or a released name) of another architecture than the configured one,
    naming each field that differs; `not_in_shapes`: fields left uncompared."""
    mismatched = [
        (key, a, b)
        for key, a, b in architecture_differences(theirs.to_dict(), configured.to_dict())
        if key not in not_in_shapes
    ]
    if mismatched:
        longer_context = any(key == "text.context_length" for key, _, _ in mismatched)
        raise WeightsFileError(
            f"{source} holds a model whose architecture differs from the configured one: "
            + "; ".join(f"model.{key}: {a!r} there, {b!r} here" for key, a, b in mismatched)
            + ". Set the [model] section to the weights' architecture"
            + (" (a shorter text context may be set: its position embeddings are the first ones; a longer one's "
               "would never have been trained)." if longer_context else ".")
        )


def _check_unseen_settings(inferred: ModelConfig, configured: ModelConfig, path: Path, from_open_clip: bool,
                           sha256: str | None) -> None:
    """For a file that records no architecture, whose shapes (`inferred`, by OpenAI's conventions) are a released
    model's: the settings shapes do not show (heads, activation) compared with the configured ones. A difference
    is an error, naming the fields, when the file is that release (by its SHA256, as for the released name:
    `sha256` where it was taken as the file was read), and a warning otherwise: a model of those sizes may have
    been trained with other heads, but a mistyped [model] section would load OpenAI's weights into a model that
    computes something else, without a word."""
    name = next((name for name, released in RELEASED_ARCHITECTURES.items() if released == inferred), None)
    if name is None:  # other sizes: OpenAI's conventions are only a guess, and the shapes decide
        return
    unseen = [difference for difference in architecture_differences(inferred.to_dict(), configured.to_dict())
              if difference[0] not in _adapted_on_load(inferred, configured)]
    if from_open_clip:  # its activation is recorded nowhere, and has a warning of its own in load_weights_with_source
        unseen = [difference for difference in unseen if difference[0] != "activation"]
    if not unseen:
        return
    # OpenAI's files are TorchScript archives: a plain state dict of any size is not hashed in vain
    release = _release_of_file(path, sha256) if is_torchscript_archive(path) else None
    if release is not None:
        _check_architecture(RELEASED_ARCHITECTURES[release], configured,
                            f"{path} (OpenAI's released {release}, by its SHA256)",
                            _adapted_on_load(RELEASED_ARCHITECTURES[release], configured))
    warnings.warn(
        f"{path} records no architecture, and its tensor shapes are those of OpenAI's released {name}, whose "
        f"settings that shapes do not show differ from the configured ones: "
        + "; ".join(f"model.{key}: {a!r} in {name}, {b!r} here" for key, a, b in unseen)
        + f". The weights are loaded into the configured model: right if they were trained with these settings; "
        f"if they are {name}'s (or follow OpenAI's conventions), set [model] to {name}'s values, or the model "
        f"computes other features from the first step.",
        stacklevel=3,
    )


def model_from_weights(weights: LoadedWeights, source: str, *, stacklevel: int = 3) -> CLIP:
    """A float32 CPU model in eval mode holding `weights`; `source` names the file in error messages.
    `stacklevel`: the frame its warnings name, as in `warnings.warn` (3: the caller of this function's caller)."""
    if weights.model_config is not None:
        config, origin = weights.model_config, "recorded in its config"
    else:
        try:
            config, origin = infer_model_config(weights.state_dict), "inferred from its tensor shapes"
        except ArchitectureInferenceError as error:
            raise WeightsFileError(f"{source} does not hold CLIP weights in OpenAI's layout: {error}") from error
        conventions = (f"loaded with OpenAI's conventions ({config.vision.heads} image and {config.text.heads} "
                       f"text heads, {config.activation})")
        if weights.open_clip_origin is not None:
            # Released sizes or not: open_clip's GELU models have OpenAI's shapes, and load without error.
            # The way out named is load_weights_into: model.load_state_dict cannot take an epoch_N.pt's keys
            # (DDP's "module." prefix) nor read a safetensors file.
            warnings.warn(
                f"{source} is {weights.open_clip_origin}, which records no architecture: {conventions}. "
                f"open_clip's models without '-quickgelu' in their name (most of those trained on LAION) use "
                f"GELU, and compute other features this way: build those with clip.create_model(its config, "
                f"activation 'gelu') and clip.loading.load_weights_into(model, path), which reads the file as "
                f"this does.", stacklevel=stacklevel,
            )
        elif config not in RELEASED_ARCHITECTURES.values():
            # OpenAI's conventions hold for its releases; a model of other sizes may well have been trained
            # with other heads or activation, and would then load without error but compute other features.
            warnings.warn(
                f"{source} records no architecture, and the tensor shapes do not give the attention heads or "
                f"the activation: {conventions}. If the model was trained with others, its outputs differ: load "
                f"its training run's directory or checkpoint, which record them, or clip.create_model(its "
                f"config) and load_state_dict.", stacklevel=stacklevel,
            )
    model, state = _empty_model(config, weights,
                                f"{source} does not fit the {describe_architecture(config)} architecture {origin}",
                                source)
    model.load_state_dict(state, strict=True)
    if weights.logit_bias is not None:
        model.logit_bias = weights.logit_bias.clone()
    return model.eval()


def _load_checked(model: CLIP, weights: LoadedWeights, misfit_headline: str, source: str) -> None:
    """`weights` into `model`, after checking OpenAI's extra entries and every tensor's name and shape."""
    state = _checked_state(model, weights, misfit_headline, source)
    model.load_state_dict(state, strict=True)


def _checked_state(model: CLIP, weights: LoadedWeights, misfit_headline: str, source: str) -> dict:
    """The state dict to load into `model` (a `meta` one will do): OpenAI's extra entries and every tensor's
    name and shape checked, and that its tensors store what they declare; BatchNorm step counters added where
    older files have none."""
    _check_extras(weights.extras, model.config, source)
    state = dict(weights.state_dict)
    expected = model.state_dict()
    for name, value in expected.items():  # older files have no BatchNorm step counters
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = torch.zeros(value.shape, dtype=value.dtype)
    _check_fits(expected, state, misfit_headline)
    check_backed_by_storage(state, expected, source)
    return state


class ModelNotFoundError(FileNotFoundError, RuntimeError):
    """Neither a released name nor an existing path. A FileNotFoundError, and a RuntimeError because that is
    what openai/CLIP's load raises for an unknown name."""


def _is_released_name(name_or_path: str | Path) -> bool:
    """A Path is a path, even one that reads like a released name (`Path("RN50")`)."""
    return isinstance(name_or_path, str) and name_or_path in RELEASED_WEIGHTS


def _read(
    name_or_path: str | Path, download_root: str | Path | None, *, stacklevel: int, digest: bool
) -> tuple[Path, LoadedWeights]:
    """(the file read, its weights) for a name or a path, resolved and read once: the file loaded is the file
    recorded.

    A released model is downloaded into the cache (or found there), and its weights are read from the very bytes
    checked against its SHA256 (`download.download_bytes`): read again by name after the check, they were
    whatever had been put at the path meanwhile, recorded as the release. Any other file or run directory as
    `read_run_or_file` reads it, with its SHA256 if `digest`; `stacklevel` as there, counted from the caller of
    this function."""
    if _is_released_name(name_or_path):
        release = RELEASED_WEIGHTS[name_or_path]
        path, archive = download.download_bytes(release.url, release.sha256, root=download_root)
        # OpenAI's files are TorchScript archives. Only a release table pointed at another kind of file (tests
        # point it at a torch.save file) has it read again by name, with the reader that kind needs
        if not is_torchscript_archive(io.BytesIO(archive)):
            return path, read_weights(path)
        return path, read_archive_weights(path, archive)  # the tensors hold copies: the bytes go on return
    given = _existing_path(name_or_path)
    path, weights = read_run_or_file(given, stacklevel=stacklevel + 1, digest=digest)
    if path != given:  # a run directory: its newest checkpoint moves on while the run trains, so say which one
        log.info("%s: loading %s", given, path)
    return path, weights


def _existing_path(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, str) and not name_or_path:  # Path("") is the current folder, read as a run
        raise ModelNotFoundError(
            f"an empty model name: give a released model ({', '.join(RELEASED_WEIGHTS)}), a weights file or a "
            "run directory ('.' for the current folder)"
        )
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    close = difflib.get_close_matches(str(name_or_path), RELEASED_WEIGHTS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    release = release_of_open_clip_name(str(name_or_path))
    if release is not None:  # "ViT-B-32-quickgelu", "ViT-L-14-336": too far from the release's name for difflib
        hint = f" Did you mean {release!r} (open_clip's {str(name_or_path)!r} with pretrained='openai')?"
    if str(name_or_path).strip() != str(name_or_path) and str(name_or_path).strip() in RELEASED_WEIGHTS:
        # " RN50" (pasted with its spaces) was pointed at the right model as open_clip's name for it
        hint = f" Did you mean {str(name_or_path).strip()!r}, without the whitespace around it?"
    if str(name_or_path) in RELEASED_WEIGHTS:  # a Path is a path: Path("RN50") was asked "Did you mean 'RN50'?"
        hint = f" To load the released model {str(name_or_path)!r}, pass its name as a str, not a Path."
    raise ModelNotFoundError(
        f"{str(name_or_path)!r} is neither a released model nor an existing file or directory.{hint} "
        f"Released models: {', '.join(RELEASED_WEIGHTS)}"
    )


def _release_of_file(path: Path, sha256: str | None = None) -> str | None:
    """The released name whose file has `path`'s SHA256 (`sha256`, where it was taken as the file was read), or
    None."""
    if not path.is_file():
        return None
    return _release_of_digest(sha256 if sha256 is not None else download.sha256_of_file(path))


def _release_of_digest(sha256: str) -> str | None:
    """The released name whose file has this SHA256, or None."""
    return next((name for name, release in RELEASED_WEIGHTS.items() if release.sha256 == sha256), None)


def _verified_archive(
    name_or_path: str | Path, download_root: str | Path | None
) -> tuple[Path, bytes | None, str | None]:
    """For jit=True: (the file a name or path stands for, its bytes if they are a released archive (else None),
    its SHA256 where it was taken).

    The bytes are read once, and the bytes hashed are the bytes `torch.jit.load` runs: opened again by name after
    the check, the file run was whatever had been put at the path meanwhile (by anyone who can write the cache
    folder), its code unchecked; a handle kept open from the hash to the load would still see the file changed in
    place (by anyone who can write the file itself). The cost is memory: about 4 times the file's size at the peak
    (measured: 770 MB for a 200 MB archive, against 200 MB given its path), the same as openai/CLIP's load, which
    passes torch.jit.load a file object: torch reads that whole into bytes, then copies them. The SHA256 of a file
    that is not a release is also the record's (for `load_with_source`): hashed again as its weights were read,
    seconds for a 350 MB archive."""
    if _is_released_name(name_or_path):
        release = RELEASED_WEIGHTS[name_or_path]
        path, archive = download.download_bytes(release.url, release.sha256, root=download_root)
        return path, archive, release.sha256
    path = _existing_path(name_or_path)
    if not is_torchscript_archive(path):  # OpenAI's files are: no other file is hashed for this at all
        return path, None, None
    # None for a file larger than any download is allowed to be: no release, and not hashed for the check
    archive = download.regular_file_bytes(path, download.DEFAULT_MAX_BYTES)
    if archive is None:
        return path, None, None
    sha256 = hashlib.sha256(archive).hexdigest()
    return path, (archive if _release_of_digest(sha256) is not None else None), sha256


def _load_jit(archive: bytes, device: torch.device) -> tuple[nn.Module, ImageTransform]:
    """`torch.jit.load` of a verified archive's bytes (`_verified_archive`), retargeted to `device`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        # io.BytesIO's read() of all of it returns these very bytes, not a copy
        model = torch.jit.load(io.BytesIO(archive), map_location=device).eval()
    retarget_torchscript(model, device)
    from .preprocess import image_transform  # see _load

    return model, image_transform(int(model.input_resolution.item()))


# torch's ScalarType codes, as traced graphs store a dtype argument.
_FLOAT16_CODE, _FLOAT32_CODE = 5, 6


def retarget_torchscript(model: torch.jit.ScriptModule, device: torch.device) -> None:
    """In place: make an archive traced on a GPU in float16 (OpenAI's) run on `device`.

    Tracing records the device of tensors the code creates (`torch.arange(..., device="cuda:0")`) and the
    dtype of its casts (`.to(float16)`) as constants in every method's graph, so `map_location` alone moves
    the weights but not those. The device constants are pointed at `device`; on a CPU, where OpenAI's
    models run in float32, each float16 cast gets a float32 constant of its own (constants are shared
    between uses, and an int 5 may also be a size) and the weights become float32. Must run before the
    first call: the interpreter keeps its own optimised copy of each graph from then on.
    """
    graphs = [module._c._get_method(name).graph for module in model.modules() for name in module._c._method_names()]
    for graph in graphs:
        for node in graph.findAllNodes("prim::Constant"):
            if node.output().type().kind() == "DeviceObjType" and node.s("value").startswith("cuda"):
                node.s_("value", str(device))
    if device.type != "cpu":
        return
    for graph in graphs:
        for cast in graph.findAllNodes("aten::to"):
            for index, argument in enumerate(list(cast.inputs())[1:], start=1):
                if _is_int_constant(argument, _FLOAT16_CODE):
                    float32 = graph.insertConstant(_FLOAT32_CODE)
                    float32.node().moveBefore(cast)
                    cast.replaceInput(index, float32)
    model.float()


def _is_int_constant(value: torch._C.Value, expected: int) -> bool:
    node = value.node()
    return (node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "i"
            and node.i("value") == expected)


def _check_extras(extras: Mapping[str, int], config: ModelConfig, source: str) -> None:
    expected = {
        "input_resolution": config.vision.image_size,
        "context_length": config.text.context_length,
        "vocab_size": config.text.vocab_size,
    }
    for key, value in extras.items():
        if value != expected[key]:
            raise WeightsFileError(
                f"{source}: its {key} entry says {value}, but its weights are for {key} {expected[key]}"
            )


def _empty_model(
    config: ModelConfig, weights: LoadedWeights, misfit_headline: str, source: str
) -> tuple[CLIP, dict[str, torch.Tensor]]:
    """A CPU model with uninitialised weights, and the checked state dict (`_checked_state`) that overwrites
    every one of them in a strict load; building on the `meta` device skips the random initialisation,
    seconds for the large models. The weights are checked against the `meta` model first: a 2 KB checkpoint
    whose config names a huge model had its memory allocated before its missing tensors were found."""
    _check_last_blocks(config, weights.state_dict, misfit_headline)
    try:
        with torch.device("meta"):
            model = CLIP(config)
    except (ValueError, TypeError, RuntimeError) as error:
        # A recorded config no model has: activation "relu", a width of 64.0, or sizes whose product overflows
        # (an embed_dim of 2**62: torch's RuntimeError, which escaped as a traceback). torch's messages go on
        # with lines of its C++ source: the first line says it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsFileError(
            f"{source}: the architecture recorded in its config cannot be built ({reason})"
        ) from error
    state = _checked_state(model, weights, misfit_headline, source)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return CLIP(config), state  # a non-persistent buffer is in no file: let __init__ compute it
    return model.to_empty(device="cpu"), state


def _check_last_blocks(config: ModelConfig, state: Mapping[str, torch.Tensor], headline: str) -> None:
    """Refuses weights without the last block of each stack the architecture has, or with another number of
    text positions than the recorded context length, before any model is built.
    A recorded config is the file's word, and even on the `meta` device each block is Python objects: a
    2 KB checkpoint whose config said 200000 text layers took 5 minutes and 7.7 GB to be refused."""
    vision = config.vision
    stacks = [("transformer.resblocks", config.text.layers)]
    if vision.kind == "vit":
        stacks.append(("visual.transformer.resblocks", vision.layers))
    else:
        stacks += [(f"visual.layer{stage}", blocks) for stage, blocks in enumerate(vision.layers, start=1)]
    for stack, blocks in stacks:
        last = f"{stack}.{blocks - 1}."
        if blocks > 0 and not any(key.startswith(last) for key in state):
            raise WeightsFileError(f"{headline}:\n  missing: every entry of {last}* (block {blocks} of {blocks})")
    # The text transformer's causal mask is context_length squared floats, made when the model is built: a
    # 100 KB checkpoint whose config said a context of 30000 had 3.6 GB allocated before its 77 positions
    # were found not to fit
    context = config.text.context_length
    positions = state.get("positional_embedding")
    if positions is None:
        raise WeightsFileError(f"{headline}:\n  missing: positional_embedding (the text's {context} positions)")
    if positions.dim() != 2 or positions.shape[0] != context:
        raise WeightsFileError(
            f"{headline}:\n  wrong shape: positional_embedding: expected ({context}, {config.text.width}), "
            f"found {tuple(positions.shape)}"
        )


def _check_fits(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], headline: str) -> None:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [
        f"{key}: expected {tuple(value.shape)}, found {tuple(found[key].shape)}"
        for key, value in expected.items()
        if key in found and tuple(found[key].shape) != tuple(value.shape)
    ]
    not_weights = [
        f"{key}: {problem}" for key, value in expected.items() if key in found
        if (problem := _not_weights(value, found[key])) is not None
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOWN_KEYS])}{', ...' if len(items) > _SHOWN_KEYS else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                             ("not loadable as weights", not_weights))
        if items
    ]
    if problems:
        raise WeightsFileError(headline + ":\n  " + "\n  ".join(problems))


def _not_weights(expected: torch.Tensor, found: torch.Tensor) -> str | None:
    """Why `found` cannot stand for a weight like `expected`, or None. load_state_dict cast an integer, boolean
    or complex tensor into a float parameter without a word (a complex one losing its imaginary part), and
    refused a sparse, quantized or meta tensor (the state_dict of a model not yet materialised) with a
    traceback from deep in torch."""
    if found.layout != torch.strided:
        return f"a {str(found.layout).removeprefix('torch.')} tensor, not a dense one"
    if found.is_quantized:
        return f"a quantized tensor ({found.dtype})"
    if found.is_meta:
        return "a meta tensor, which holds no values"
    if expected.is_floating_point() and not found.is_floating_point():
        return f"{str(found.dtype).removeprefix('torch.')} values, not floating point"
    return None


def describe_architecture(config: ModelConfig) -> str:
    """The sizes of both towers in words, after the released name of that architecture if there is one."""
    name = next((name for name, released in RELEASED_ARCHITECTURES.items() if released == config), None)
    vision = config.vision
    if vision.kind == "vit":
        tower = f"ViT (width {vision.width}, {vision.layers} layers, patch {vision.patch_size})"
    else:
        tower = f"ModifiedResNet (width {vision.width}, stages {vision.layers})"
    text = config.text
    summary = (
        f"{tower} at {vision.image_size} px + text transformer (width {text.width}, {text.layers} layers, "
        f"context {text.context_length}, vocabulary {text.vocab_size}), embed_dim {config.embed_dim}"
    )
    return f"{name} = {summary}" if name else summary
