"""An image tower's position embeddings moved to another input resolution: fine-tuning at another image size.

Both image towers add one learned embedding per position of a square grid, plus one for a leading token (the
ViT's class token; the ResNet attention pool's mean token): `visual.positional_embedding` and
`visual.attnpool.positional_embedding`, shaped [1 + grid * grid, width]. Every other weight is independent of
the image size. So weights trained at one resolution start a model at another once the grid is resampled: the
CLIP paper trained ViT-L/14 at 224 pixels, then one more epoch at 336 (ViT-L/14@336px), as FixRes does.

The grid is resampled bicubically, as an image would be (the embeddings of neighbouring positions are alike
after training, and a smooth interpolation keeps them so); when it shrinks, with antialiasing, so that every
old position contributes. The leading token's embedding is kept as it is: it belongs to no position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .architectures import VisionConfig
from .infer_architecture import RESNET_DOWNSAMPLING

# The state dict entry holding each tower's grid of position embeddings
POSITION_EMBEDDING = {"vit": "visual.positional_embedding", "resnet": "visual.attnpool.positional_embedding"}


def _pixels_per_position(vision: VisionConfig) -> int:
    """The side in pixels of one grid position: a ViT's patch, the ResNet's total downsampling."""
    return vision.patch_size if vision.kind == "vit" else RESNET_DOWNSAMPLING


def grid_side(vision: VisionConfig) -> int:
    """The side of the tower's square grid of positions: patches for a ViT, the final feature map for a ResNet."""
    return vision.image_size // _pixels_per_position(vision)


def _side_of(rows: int) -> int | None:
    """The side of the square grid that `rows` position embeddings (the leading token's among them) hold; None
    where they are not 1 + a square grid of at least one position."""
    side = math.isqrt(rows - 1) if rows >= 2 else 0
    return side if side > 0 and side * side == rows - 1 else None


def trained_image_size(state_dict: dict[str, torch.Tensor], vision: VisionConfig) -> int | None:
    """The image size whose grid `state_dict`'s position embeddings hold, for a tower of `vision`'s kind and
    patch size; None where they are missing or no 1 + square grid (the shape check names the misfit)."""
    embedding = state_dict.get(POSITION_EMBEDDING[vision.kind])
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        return None
    side = _side_of(embedding.shape[0])
    return None if side is None else side * _pixels_per_position(vision)


def resize_position_embedding(embedding: torch.Tensor, side: int) -> torch.Tensor:
    """[1 + n * n, width] -> [1 + side * side, width]: the grid resampled, the leading token's row kept; the dtype
    kept (the interpolation itself runs in float32, as float16 weights cannot be interpolated on every device)."""
    if embedding.dim() != 2:
        raise ValueError(f"a position embedding is [1 + grid * grid, width], got shape {tuple(embedding.shape)}")
    old_side = _side_of(embedding.shape[0])
    if old_side is None:
        raise ValueError(f"a position embedding of {embedding.shape[0]} rows is not 1 + a square grid of positions")
    if side <= 0:
        raise ValueError(f"the new grid's side must be positive, got {side}")
    if side == old_side:
        return embedding.clone()
    leading, grid = embedding[:1], embedding[1:]
    width = embedding.shape[1]
    image = grid.float().reshape(old_side, old_side, width).permute(2, 0, 1).unsqueeze(0)  # -> 1,width,n,n
    resized = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False,
                            antialias=side < old_side)
    resized = resized.squeeze(0).permute(1, 2, 0).reshape(side * side, width)  # -> side*side,width
    return torch.cat([leading, resized.to(embedding.dtype)])


def at_image_size(state_dict: dict[str, torch.Tensor], theirs: VisionConfig, ours: VisionConfig) -> dict:
    """`state_dict`, of an image tower described by `theirs`, for one described by `ours`, which differs from it
    at most in `image_size`: the position embeddings resampled to our grid (a new dict; the tensors not
    resampled are shared). Unchanged where the grids are the same."""
    name = POSITION_EMBEDDING[ours.kind]
    side = grid_side(ours)
    if theirs.kind != ours.kind or grid_side(theirs) == side or name not in state_dict:
        return state_dict  # another kind or a missing entry: the shape check that follows names the misfit
    return {**state_dict, name: resize_position_embedding(state_dict[name], side)}
