"""Test helper: a dataset some of whose items raise as an undecodable image file does, for the evaluation code's
counted skips."""

from pathlib import Path

import torch

from clip.evaluation.image_files import UnreadableImageError


class PartlyUnreadable(torch.utils.data.Dataset):
    """`items[i]`, or for an index in `unreadable` the error of a file `{prefix}{i}.png` that is not an image."""

    def __init__(self, items: list, unreadable: set[int], prefix: str = "") -> None:
        self.items, self.unreadable, self.prefix = items, unreadable, prefix

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if index in self.unreadable:
            raise UnreadableImageError(Path(f"{self.prefix}{index}.png"), "not an image")
        return self.items[index]
