"""CIFAR-10 and CIFAR-100 read from torchvision's on-disk pickle format, with a restricted unpickler, so
that reading a downloaded copy cannot run code; nothing here downloads."""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .image_files import Transform


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's files contain (dicts, lists, strings, numbers, numpy uint8 arrays).

    A pickle can run arbitrary code through `find_class`; refusing every other global makes reading a
    downloaded file safe.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of the CIFAR format")
        if name == "_reconstruct":  # numpy 2 renamed numpy.core to numpy._core; avoid its deprecation shim
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except ImportError:
                    continue
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR batch or meta file as a dict with str keys (the files are Python 2 pickles: latin-1)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with open(path, "rb") as file:
        try:
            content = _RestrictedUnpickler(file, encoding="latin1").load()
        # A malformed pickle raises nearly anything: UnpicklingError, EOFError, ValueError, TypeError, and
        # MemoryError for an array header declaring terabytes (numpy allocates it before the data is read)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, RecursionError) as error:
            raise ValueError(f"{path} is not a CIFAR pickle: {error or type(error).__name__}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a dict, got {type(content).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


@dataclass(frozen=True)
class CIFARLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str


CIFAR_LAYOUTS = {
    "cifar10": CIFARLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": CIFARLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


class CIFARDataset(Dataset):
    """CIFAR-10 or CIFAR-100 from torchvision's on-disk layout, without torchvision's download/md5 logic.

    `root` may be the folder holding `cifar-10-batches-py/` (`cifar-100-python/`) or that folder itself.
    """

    def __init__(
        self, root: str | Path, kind: str = "cifar10", train: bool = False, transform: Transform | None = None
    ):
        if kind not in CIFAR_LAYOUTS:
            raise ValueError(f"kind must be one of {sorted(CIFAR_LAYOUTS)}, got {kind!r}")
        layout = CIFAR_LAYOUTS[kind]
        folder = Path(root) / layout.folder
        folder = folder if folder.is_dir() else Path(root)
        first = folder / (layout.train_files if train else layout.test_files)[0]
        if not first.is_file():  # named with where it was looked for: the error named only root/test_batch
            where = (f"no {first}" if folder != Path(root) else
                     f"neither {Path(root) / layout.folder / first.name} nor {first} exists")
            raise FileNotFoundError(
                f"{kind} not found: {where} (root {root} must hold torchvision's {layout.folder}/ folder, or be that "
                f"folder)"
            )
        images, labels = [], []
        for name in layout.train_files if train else layout.test_files:
            batch = load_cifar_pickle(folder / name)
            data, batch_labels = batch.get("data"), batch.get(layout.labels_key)
            # Pixel values in another dtype (floats in [0, 1], say) would be cast to near-black images silently
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                found = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
                raise ValueError(f"{folder / name}: 'data' must be a uint8 array of shape [N, 3072], got a {found}")
            if batch_labels is None or len(batch_labels) != len(data):
                raise ValueError(f"{folder / name}: '{layout.labels_key}' must hold one label per image")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch_labels)
        self.meta_file = folder / layout.meta_file  # where the class names are read from
        names = load_cifar_pickle(self.meta_file).get(layout.names_key)
        if not names:
            raise ValueError(f"{self.meta_file} has no '{layout.names_key}'")
        # CIFAR-100 names are identifiers ("aquarium_fish"); prompts read better with spaces.
        self.classes = [(n.decode() if isinstance(n, bytes) else n).replace("_", " ") for n in names]
        if labels and not 0 <= min(labels) <= max(labels) < len(self.classes):
            raise ValueError(f"{folder}: labels outside 0..{len(self.classes) - 1}")
        self.images = np.ascontiguousarray(np.concatenate(images))  # N, 32, 32, 3 (HWC, RGB)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.labels[index]
