"""A model's weights alone, as a file to share or to load elsewhere: `clip-export`, `export_weights`.

A training checkpoint holds the optimizer's moments, RNG states and data positions beside the weights: about
three times the weights' size, and nothing a user of the model needs. The export keeps the weights, in one of two
layouts:

- "clip" (the default): the state dict with the architecture it belongs to and, for a SigLIP model, its learned
  logit bias, so that `clip.load` and `train.init_weights` rebuild exactly this model, whatever its heads or
  activation, with the same preprocessing (the trainer's composites transparent images onto white, OpenAI's
  does not); it also records which weights it came from (their file's name, step, released name and SHA256).
- "openai": a plain state dict under OpenAI's names, which openai/CLIP's `build_model` reads (its `clip.load` of
  a state-dict file fails on the current code, openai/CLIP#396: it reads an opened file its TorchScript attempt
  moved on), as does open_clip's `load_openai_model`.
  They infer the architecture from tensor shapes by OpenAI's conventions (one attention head per 64 channels,
  QuickGELU, an MLP of 4x the width): a model that does not follow them would load there as another model and
  compute other features without a word, so it is refused, naming what differs. (A model trained here loses
  its preprocessing's white background for transparent images there: openai/CLIP's drops the alpha.)

The file is written whole or not at all (a temporary file renamed into place), and an existing file is only
replaced when asked: an export may well be given the name of the file it was meant to sit beside.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import architecture_differences
from .checkpoint import CHECKPOINT_DIR, list_checkpoints
from .download import sha256_of_file
from .infer_architecture import ArchitectureInferenceError, infer_model_config
from .loading import WeightsSource, describe_architecture, load_with_source
from .run_log import replaced_atomically
from .weights_file import CHECKPOINT_FORMAT

LAYOUTS = ("clip", "openai")
# openai/CLIP's ResidualAttentionBlock: an MLP of 4 x d_model, fixed
OPENAI_MLP_RATIO = 4.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """The weights cannot be exported as asked (a layout that cannot describe the model, an existing output)."""


class OutputExistsError(ExportError):
    """`output` exists and `overwrite` was not asked for. Its own type, so that clip-export can say so in its
    user's terms (--overwrite), not a Python caller's (overwrite=True)."""

    def __init__(self, output: Path) -> None:
        super().__init__(f"{output} exists; pass overwrite=True to replace it")
        self.output = output


@dataclass(frozen=True)
class ExportedWeights:
    """What `export_weights` wrote: the file, its SHA256 and size, and which weights it holds."""

    path: Path
    sha256: str
    size_bytes: int
    layout: str
    dtype: str
    source: WeightsSource
    architecture: str  # `describe_architecture`: the sizes, and the released name of that architecture if any


def export_weights(
    source: str | Path, output: str | Path, *, layout: str = "clip", dtype: str = "float32",
    overwrite: bool = False, download_root: str | Path | None = None,
) -> ExportedWeights:
    """Writes the weights of `source` (anything `clip.load` reads: a released name, a weights file, a training
    checkpoint or a run directory, its newest checkpoint) to `output` in `layout` ("clip" or "openai"), with
    floating-point tensors in `dtype` ("float32", "float16" or "bfloat16"; integer counters stay integers)."""
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    output = Path(output).expanduser()
    if output.is_dir():
        raise ExportError(f"{output} is a directory; give the file to write")
    if output.suffix.lower() == ".safetensors":
        # torch.load reads a file of that name as safetensors, which this is not: the export then failed to load,
        # said to be damaged
        raise ExportError(f"{output}: the export is a PyTorch file (torch.save's format), not safetensors; name it "
                          f"{output.with_suffix('.pt').name}")
    if output.exists() and not overwrite:
        raise OutputExistsError(output)
    if output.exists() and output.parent.name == CHECKPOINT_DIR and any(
            os.path.samefile(output, checkpoint) for _, checkpoint in list_checkpoints(output.parent.parent)):
        # --overwrite replaced it with the weights alone: the run could no longer resume from it
        raise ExportError(f"{output} is a checkpoint of the run in {output.parent.parent}, which resumes from it; "
                          f"give another OUTPUT")
    # Said before the model loads (perhaps after a download of up to 1.4 GB); and a mistyped folder is not made
    folder = output.parent
    if not folder.is_dir():
        raise ExportError(f"{output}: {folder} is a file, not a folder" if folder.exists()
                          else f"{output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"{output}: the folder {folder} is not writable")
    model, preprocess, weights_source = load_with_source(source, device="cpu", download_root=download_root)
    state = {name: _in_dtype(value, DTYPES[dtype]) for name, value in model.state_dict().items()}
    if layout == "openai":
        _check_openai_conventions(model.config, state)
        if model.logit_bias is not None:
            warnings.warn(
                f"the openai layout has no place for this SigLIP model's learned logit bias "
                f"({model.logit_bias.item():.4g}): the features are the same, but model(image, text) will return "
                f"logits without it; the clip layout keeps it", stacklevel=2,
            )
        content: dict = state
    else:
        content = {
            "format": CHECKPOINT_FORMAT,
            "model": state,
            "config": {"model": model.config.to_dict()},
            # The file name alone: the folder it was read from is the exporter's, and the file is for others
            "exported_from": {**weights_source.to_dict(), "path": weights_source.path.name},
            # Which preprocessing clip.load gives: the trainer's composites transparent images onto white,
            # OpenAI's (and any other weights') does not. The recorded config alone would say "trained here".
            "trained_here": preprocess.alpha_background is not None,
        }
        if weights_source.architecture_inferred:
            # The source recorded no architecture: the config above is the guess clip.load made from the shapes
            # (OpenAI's conventions), not a fact. Recorded as one, an open_clip GELU model's export loaded as
            # QuickGELU without the source's warning, and load_weights_into refused the right model for it
            content["architecture_inferred"] = True
            if weights_source.open_clip_origin is not None:
                content["open_clip_origin"] = weights_source.open_clip_origin
        if weights_source.step is not None:
            content["step"] = weights_source.step
        if model.logit_bias is not None:
            content["loss_parameters"] = {"logit_bias": model.logit_bias.detach().float().clone()}
    with replaced_atomically(output, "wb") as file:
        torch.save(content, file)
    return ExportedWeights(output, sha256_of_file(output), output.stat().st_size, layout, dtype, weights_source,
                           describe_architecture(model.config))


def _in_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A copy, detached: the saved tensors must not share storage with the model (torch.save would write the
    # whole of a shared storage) nor carry autograd state
    return value.detach().to(dtype, copy=True) if value.is_floating_point() else value.detach().clone()


def _check_openai_conventions(config, state: dict[str, torch.Tensor]) -> None:
    """Refuses a model that openai/CLIP would read, from these shapes, as another architecture."""
    try:
        read_as = infer_model_config(state)
    except ArchitectureInferenceError as error:
        raise ExportError(f"openai/CLIP could not read this model's architecture from its shapes ({error}); "
                          f"export it with the clip layout, which records it") from None
    # Its blocks' MLPs are 4x the width whatever the shapes say: another ratio fails in its load_state_dict
    read_as = dataclasses.replace(read_as, vision=dataclasses.replace(read_as.vision, mlp_ratio=OPENAI_MLP_RATIO),
                                  text=dataclasses.replace(read_as.text, mlp_ratio=OPENAI_MLP_RATIO))
    differences = architecture_differences(read_as.to_dict(), config.to_dict())
    if differences:
        raise ExportError(
            "openai/CLIP reads the architecture from tensor shapes by OpenAI's conventions (one attention head per "
            "64 channels, QuickGELU, an MLP of 4x the width), and would read this model as another: "
            + "; ".join(f"model.{key}: it would read {a!r}, the model has {b!r}" for key, a, b in differences)
            + ". Export it with the clip layout, which records the architecture"
        )

