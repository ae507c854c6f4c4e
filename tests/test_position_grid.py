"""clip.position_grid: an image tower's position embeddings resampled to another image size."""

from __future__ import annotations

import math

import pytest
import torch

from clip.architectures import VisionConfig
from clip.position_grid import at_image_size, grid_side, resize_position_embedding, trained_image_size


def grid_embedding(side: int, width: int, value) -> torch.Tensor:
    """[1 + side * side, width]: a leading row of 7s, then `value(row, column)` (a [width] tensor) per position."""
    rows = [torch.full((width,), 7.0)]
    rows += [value(row, column) for row in range(side) for column in range(side)]
    return torch.stack(rows)


def as_grid(embedding: torch.Tensor) -> torch.Tensor:
    side = int((embedding.shape[0] - 1) ** 0.5)
    return embedding[1:].reshape(side, side, -1)


@pytest.mark.parametrize("old, new", [(4, 6), (6, 4), (7, 10), (16, 24)])
def test_the_grid_is_resampled_and_the_leading_token_kept(old, new):
    embedding = torch.randn(1 + old * old, 5)
    resized = resize_position_embedding(embedding, new)
    assert resized.shape == (1 + new * new, 5)
    assert torch.equal(resized[0], embedding[0])  # the class (or mean) token belongs to no position
    # A grid the same at every position stays so, growing or shrinking (interpolation weights sum to 1)
    constant = grid_embedding(old, 3, lambda row, column: torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(as_grid(resize_position_embedding(constant, new)),
                               torch.tensor([1.0, -2.0, 0.5]).expand(new, new, 3), rtol=0, atol=1e-5)


def test_the_resampling_keeps_the_layout_row_major_and_the_order_of_positions():
    # Positions are stored row by row (the patch grid's flatten): a grid that rises along the columns only
    # must stay the same in every row, rising along each; a transposed reshape would turn it round.
    rising = grid_embedding(4, 2, lambda row, column: torch.tensor([float(column), 0.0]))
    resized = as_grid(resize_position_embedding(rising, 7))
    assert torch.allclose(resized, resized[:1].expand_as(resized), atol=1e-6)  # every row alike
    columns = resized[0, :, 0]
    assert (columns[1:] > columns[:-1]).all() and columns[0] < 0.5 and columns[-1] > 2.5
    torch.testing.assert_close(resized[..., 1], torch.zeros(7, 7), rtol=0, atol=1e-6)


def test_a_smooth_grid_is_resampled_bicubically_not_linearly():
    # Neighbouring positions' embeddings lie on a smooth surface after training; bicubic interpolation follows
    # its curvature where a linear one cuts across it. A sine along the columns, upsampled 6 -> 12: away from the
    # border (where both clamp), bicubic stays within 0.03 of the sine at the new positions, bilinear is 0.09 off.
    def sine(column: float) -> float:
        return math.sin(2 * math.pi * column)

    wave = grid_embedding(6, 1, lambda row, column: torch.tensor([sine((column + 0.5) / 6)]))
    resized = as_grid(resize_position_embedding(wave, 12))[..., 0]
    expected = torch.tensor([sine((column + 0.5) / 12) for column in range(12)]).expand(12, 12)
    assert (resized - expected)[:, 2:-2].abs().max() < 0.045


def test_a_shrinking_grid_is_antialiased():
    # Sampled without antialiasing, a shrunk grid keeps a few positions' embeddings and drops the rest: columns
    # alternating +1/-1 come out at almost full strength. Averaged, as the whole grid is weighed, they cancel.
    alternating = grid_embedding(8, 1, lambda row, column: torch.tensor([1.0 if column % 2 == 0 else -1.0]))
    assert as_grid(resize_position_embedding(alternating, 3)).abs().max() < 0.2


def test_the_dtype_is_kept_and_the_same_side_gives_a_copy():
    embedding = torch.randn(1 + 9, 4).half()
    resized = resize_position_embedding(embedding, 5)
    assert resized.dtype == torch.float16 and resized.shape == (26, 4)
    same = resize_position_embedding(embedding, 3)
    assert torch.equal(same, embedding) and same.data_ptr() != embedding.data_ptr()


@pytest.mark.parametrize("shape", [(10, 4, 1), (11, 4), (1, 4), (0, 4)])
def test_an_embedding_that_is_no_grid_is_refused(shape):
    with pytest.raises(ValueError, match="position embedding"):
        resize_position_embedding(torch.zeros(shape), 3)


def test_a_new_side_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        resize_position_embedding(torch.zeros(5, 2), 0)


def test_at_image_size_resamples_each_towers_own_entry_and_only_when_the_grid_changes():
    vit = VisionConfig(kind="vit", image_size=32, patch_size=8, width=16, layers=1, heads=1)
    resnet = VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4)
    assert grid_side(vit) == 4 and grid_side(resnet) == 2
    other = torch.zeros(3)
    state = {"visual.positional_embedding": torch.randn(17, 16), "visual.conv1.weight": other}
    bigger = at_image_size(state, vit, VisionConfig(**{**vit.__dict__, "image_size": 48}))
    assert bigger["visual.positional_embedding"].shape == (37, 16) and bigger["visual.conv1.weight"] is other
    assert state["visual.positional_embedding"].shape == (17, 16)  # the given dict is left as it was
    same_grid = VisionConfig(**{**vit.__dict__, "image_size": 32})
    assert at_image_size(state, vit, same_grid) is state
    pooled = {"visual.attnpool.positional_embedding": torch.randn(5, 256)}
    resized = at_image_size(pooled, resnet, VisionConfig(**{**resnet.__dict__, "image_size": 96}))
    assert resized["visual.attnpool.positional_embedding"].shape == (10, 256)
    # Another kind of tower: left to the shape check that follows, which names the misfit
    assert at_image_size(state, vit, resnet) is state


def test_trained_image_size_reads_the_grid_of_each_towers_entry_and_nothing_else():
    vit = VisionConfig(kind="vit", image_size=32, patch_size=8, width=16, layers=1, heads=1)
    resnet = VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4)
    assert trained_image_size({"visual.positional_embedding": torch.zeros(1 + 7 * 7, 16)}, vit) == 56
    assert trained_image_size({"visual.attnpool.positional_embedding": torch.zeros(1 + 3 * 3, 256)}, resnet) == 96
    # No size where the entry gives no grid: the shape check that follows names the misfit
    for no_grid in (torch.zeros(1 + 15, 16), torch.zeros(1 + 17, 16), torch.zeros(1, 16), torch.zeros(0, 16),
                    torch.zeros(17), torch.zeros(17, 16, 1)):
        assert trained_image_size({"visual.positional_embedding": no_grid}, vit) is None, no_grid.shape
    assert trained_image_size({"visual.conv1.weight": torch.zeros(3)}, vit) is None
    assert trained_image_size({"visual.positional_embedding": torch.zeros(17, 16)}, resnet) is None  # other kind's


def test_at_image_size_leaves_another_kinds_or_a_missing_entry_to_the_shape_check():
    vit = VisionConfig(kind="vit", image_size=32, patch_size=8, width=16, layers=1, heads=1)
    resnet = VisionConfig(kind="resnet", image_size=64, width=8, layers=(1, 1, 1, 1), heads=4)
    # Weights said to be a ResNet's, for a ViT at another size: the two grids belong to different towers, and
    # the ViT's entry, if the file has one, is no ResNet's grid to resample
    vit_state = {"visual.positional_embedding": torch.randn(17, 16)}
    assert at_image_size(vit_state, resnet, VisionConfig(**{**vit.__dict__, "image_size": 48})) is vit_state
    # A ViT's weights without their position embeddings, for a ViT at another size
    missing = {"visual.conv1.weight": torch.zeros(3)}
    assert at_image_size(missing, vit, VisionConfig(**{**vit.__dict__, "image_size": 48})) is missing
