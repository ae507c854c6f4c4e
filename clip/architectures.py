"""Model architecture as data: typed dataclasses and the table of OpenAI's nine released architectures.

A model is fully described by a `ModelConfig`; `clip.create_model` builds one from a config or a name in
`RELEASED_ARCHITECTURES`. Custom sizes are just other `ModelConfig` values (e.g. from a TOML file).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from .config_io import check_field_types, differences, require


def constructor_arguments(class_name: str, parse, *arguments, **keyword_arguments):
    """`parse(*arguments, **keyword_arguments)` for a class's constructor: a TypeError for a missing or unknown
    argument names the class that was called (`VisionTransformer()`), not the helper that reads its arguments."""
    try:
        return parse(*arguments, **keyword_arguments)
    except TypeError as error:
        raise TypeError(str(error).replace(f"{parse.__name__}()", f"{class_name}()")) from None


# OpenAI's byte-level BPE: 256 byte tokens, each also with an end-of-word form (512), 48,894 merges,
# and the two special tokens <|startoftext|> and <|endoftext|>: 512 + 48,894 + 2 = 49,408.
OPENAI_VOCAB_SIZE = 49408
OPENAI_CONTEXT_LENGTH = 77


# The vision settings only a ViT reads (dotted keys under `model.`): two ResNet towers that differ in them are
# the same model.
VIT_ONLY_SETTINGS = frozenset({"vision.patch_size", "vision.mlp_ratio"})


def architecture_differences(theirs: dict, ours: dict) -> list[tuple[str, object, object]]:
    """(dotted key under `model.`, theirs, ours) for every setting in which two `ModelConfig.to_dict()`s
    describe different models, leaving out the ViT settings when `theirs` is a ResNet: unused by it, they are
    defaults that ours need not take (ours being a ViT, its kind differs, which is named)."""
    found = differences(theirs, ours)
    if theirs.get("vision", {}).get("kind") == "resnet":
        found = [d for d in found if d[0] not in VIT_ONLY_SETTINGS]
    # Ratios that build the same MLP width are the same model: 315 / 64 read from a file's shapes is 4.921875,
    # which a config's 4.9231 (open_clip's ViT-bigG convention) also makes 315 of
    return [d for d in found if not _same_mlp_width(d, theirs, ours)]


def _same_mlp_width(difference: tuple[str, object, object], theirs: dict, ours: dict) -> bool:
    key, their_ratio, our_ratio = difference
    tower, _, name = key.partition(".")
    if name != "mlp_ratio":
        return False
    width = theirs.get(tower, {}).get("width")
    if width is None or width != ours.get(tower, {}).get("width"):
        return False
    return int(width * their_ratio) == int(width * our_ratio)


@dataclass(frozen=True)
class VisionConfig:
    """Image encoder.

    kind: "vit" (Vision Transformer) or "resnet" (OpenAI's ModifiedResNet).
    image_size: input resolution in pixels (square).
    width: ViT token width; for the ResNet, the stem's output channels (the final stage has width * 32).
    layers: ViT depth (an int), or the four ResNet stage depths (a tuple).
    heads: attention heads of the ViT blocks, or of the ResNet's attention-pooling layer.
    patch_size: ViT patch size in pixels (unused by the ResNet).
    mlp_ratio: ViT MLP hidden width as a multiple of `width`.
    """

    kind: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    patch_size: int = 32
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        check_field_types(self)  # also the kind, and a list of stage depths as a tuple
        depths = self.layers if isinstance(self.layers, tuple) else (self.layers,)
        _require_positive(image_size=self.image_size, width=self.width, heads=self.heads,
                          patch_size=self.patch_size, mlp_ratio=self.mlp_ratio)
        _require_positive(layers=min(depths, default=0))
        if self.kind == "vit":  # a ResNet has no MLP blocks: its mlp_ratio is unused
            _require_mlp_width(self.width, self.mlp_ratio)
        if self.kind == "resnet":
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(f"a ResNet needs four stage depths in vision.layers, got {self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"a ResNet downsamples by 32: vision.image_size={self.image_size} is not a multiple")
            if (self.width * 32) % self.heads:
                raise ValueError(f"attention-pool width {self.width * 32} is not divisible by {self.heads} heads")
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"a ViT needs one depth in vision.layers, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}"
                )
            if self.width % self.heads:
                raise ValueError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")


def check_image_batch(image_shape: tuple[int, ...], image_size: int) -> None:
    """Refuses images that are not one batch [N, C, H, W]. Most often it is a single preprocessed image without its
    batch dimension: the ViT's convolution takes that as an unbatched input, and the size check then blamed the
    image's size ("resize them"); the ResNet failed in BatchNorm ("expected 4D input")."""
    if len(image_shape) != 4:
        one_image = len(image_shape) == 3
        hint = ": for one image, add the batch dimension (preprocess(image).unsqueeze(0))" if one_image else ""
        raise ValueError(
            f"images of shape {tuple(image_shape)}; this model takes a batch [N, 3, {image_size}, {image_size}]{hint}"
        )
    if image_shape[1] != 3 and image_shape[-1] == 3:
        # Channels last (numpy, PIL and cv2 arrays as a tensor): the first convolution's "expected input to have
        # 3 channels, but got 224" named no fix
        raise ValueError(
            f"images of shape {tuple(image_shape)}; this model takes channels first, [N, 3, {image_size}, "
            f"{image_size}]: for channels-last images, images.permute(0, 3, 1, 2)"
        )


def wrong_image_size(image_shape: tuple[int, ...], image_size: int) -> ValueError:
    """The error for images whose size does not give the tower's grid of positions (raised where it would
    otherwise fail, on the positional embedding, with a shape mismatch that does not say what was wrong).
    Sizes that give the same grid (a 230-pixel image for a 224-pixel ViT-B/32) run, as in openai/CLIP."""
    return ValueError(
        f"images of shape {tuple(image_shape)}; this model takes [N, 3, {image_size}, {image_size}] "
        f"(model.visual.input_resolution = {image_size}): resize them, e.g. with the preprocess clip.load returns"
    )


def _require_mlp_width(width: int, mlp_ratio: float) -> None:
    """The blocks' MLP has int(width * mlp_ratio) hidden units. A ratio that is finite and positive alone could
    still give none (1e-9: an MLP of width 0, which trained as if it were there, adding nothing) or a width past
    any integer (1e308 x 768 is inf: an OverflowError while the model was built, naming no setting)."""
    hidden = width * mlp_ratio
    require("mlp_ratio", mlp_ratio, 1 <= hidden < 2**63,
            f"such that width x mlp_ratio gives at least 1 and fewer than 2**63 MLP units (width = {width})")


def _require_positive(**values: float) -> None:
    """InvalidValue (a ValueError) names the field; a config file's loader puts its dotted path in front."""
    for name, value in values.items():
        # False for NaN too; inf (a ratio) would fail in the model's construction with OverflowError
        require(name, value, 0 < value < math.inf, "> 0" if isinstance(value, int) else "a finite number > 0")


@dataclass(frozen=True)
class TextConfig:
    """Causal Transformer text encoder over BPE tokens; features are read at the end-of-text token."""

    context_length: int = OPENAI_CONTEXT_LENGTH
    vocab_size: int = OPENAI_VOCAB_SIZE
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        check_field_types(self)
        _require_positive(context_length=self.context_length, vocab_size=self.vocab_size, width=self.width,
                          layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio)
        _require_mlp_width(self.width, self.mlp_ratio)
        if self.context_length < 2:
            raise ValueError(f"text.context_length must hold the start and end tokens (>= 2), got {self.context_length}")
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} is not divisible by text.heads={self.heads}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole CLIP model: two towers projected into a shared `embed_dim`-wide space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's released models use QuickGELU (x * sigmoid(1.702 x)); exact GELU is the modern default.
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"

    def __post_init__(self) -> None:
        check_field_types(self)
        _require_positive(embed_dim=self.embed_dim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        return ModelConfig(
            embed_dim=d["embed_dim"],
            vision=VisionConfig(**d["vision"]),
            text=TextConfig(**d["text"]),
            activation=d.get("activation", "quick_gelu"),
        )


def openai_model_config(
    embed_dim: int,
    image_resolution: int,
    vision_layers: int | tuple[int, int, int, int],
    vision_width: int,
    vision_patch_size: int | None,
    context_length: int,
    vocab_size: int,
    transformer_width: int,
    transformer_heads: int,
    transformer_layers: int,
) -> ModelConfig:
    """The architecture that openai/CLIP's `CLIP(...)` constructor builds from these arguments: a ResNet when
    `vision_layers` is a sequence of four stage depths, else a ViT; vision heads by OpenAI's convention (one
    per 64 channels of the ViT width, or of the ResNet's width * 32 final stage); QuickGELU."""
    if isinstance(vision_layers, (tuple, list)):
        vision = VisionConfig(kind="resnet", image_size=image_resolution, width=vision_width,
                              layers=tuple(vision_layers), heads=vision_width * 32 // 64)
    else:
        vision = VisionConfig(kind="vit", image_size=image_resolution, width=vision_width, layers=vision_layers,
                              heads=vision_width // 64, patch_size=vision_patch_size)
    text = TextConfig(context_length=context_length, vocab_size=vocab_size, width=transformer_width,
                      heads=transformer_heads, layers=transformer_layers)
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text, activation="quick_gelu")


def _released(
    embed_dim: int, image_size: int, vision_layers: int | tuple[int, ...], width: int, patch: int | None,
    text_width: int,
) -> ModelConfig:
    # OpenAI's constructor arguments, with the released models' 12-layer text transformer (one head per 64
    # channels) over the 77-token context and 49408-token vocabulary
    return openai_model_config(embed_dim, image_size, vision_layers, width, patch, OPENAI_CONTEXT_LENGTH,
                               OPENAI_VOCAB_SIZE, text_width, text_width // 64, 12)


# name -> architecture of OpenAI's released checkpoints (the CLIP paper, Tables 19 and 20).
RELEASED_ARCHITECTURES: dict[str, ModelConfig] = {
    "RN50": _released(1024, 224, (3, 4, 6, 3), 64, None, 512),
    "RN101": _released(512, 224, (3, 4, 23, 3), 64, None, 512),
    "RN50x4": _released(640, 288, (4, 6, 10, 6), 80, None, 640),
    "RN50x16": _released(768, 384, (6, 8, 18, 8), 96, None, 768),
    "RN50x64": _released(1024, 448, (3, 15, 36, 10), 128, None, 1024),
    "ViT-B/32": _released(512, 224, 12, 768, 32, 512),
    "ViT-B/16": _released(512, 224, 12, 768, 16, 512),
    "ViT-L/14": _released(768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": _released(768, 336, 24, 1024, 14, 768),
}


def release_of_open_clip_name(name: str) -> str | None:
    """The released architecture that open_clip's model name `name` has the sizes of, or None: open_clip writes
    "-" for "/", "ViT-L-14-336" for ViT-L/14@336px, and a "-quickgelu" suffix (OpenAI's activation)."""
    base = name.strip().removesuffix("-quickgelu")
    for release in RELEASED_ARCHITECTURES:
        if base.lower() == release.replace("/", "-").replace("@", "-").removesuffix("px").lower():
            return release
    return None


def _open_clip_name_hint(name: str) -> str | None:
    """How to build open_clip's model `name` here. Its names without "-quickgelu" are GELU models: the released
    name that difflib suggested for "ViT-B-32" built QuickGELU, another function, with no word of it."""
    release = release_of_open_clip_name(name)
    if release is None:
        return None
    if name.strip().endswith("-quickgelu"):
        return f" open_clip's {name!r} is {release!r} here."
    return (f" open_clip's {name!r} is {release!r} with GELU: clip.create_model({{**clip.RELEASED_ARCHITECTURES"
            f"[{release!r}].to_dict(), 'activation': 'gelu'}}) ({release!r} alone is its '-quickgelu' variant).")


def get_architecture(name: str) -> ModelConfig:
    try:
        return RELEASED_ARCHITECTURES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, RELEASED_ARCHITECTURES, n=1)
        hint = _open_clip_name_hint(name) or (f" Did you mean {close[0]!r}?" if close else "")
        if name.strip() in RELEASED_ARCHITECTURES:
            # " RN50" (pasted, or read from a file with its spaces) was said to be open_clip's RN50, a GELU model
            hint = f" Did you mean {name.strip()!r}, without the whitespace around it?"
        raise ValueError(
            f"Unknown architecture {name!r}.{hint} Known: {', '.join(RELEASED_ARCHITECTURES)}"
        ) from None
