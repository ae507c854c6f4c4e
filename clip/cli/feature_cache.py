"""The image features `clip-linear-probe` keeps in its output folder, one file per split, to reuse on a later run.

Extracting the features of a large training split takes hours (ImageNet's 1.28M images with ViT-L/14), and
the L2 sweep after it may fail (out of memory), be interrupted, or be run again with another `--metric`. Each
split's features are saved as soon as they are extracted, and a later run reuses them when they were made
from the same inputs: a `FeatureKey` records the model's weights (a hash of its tensors: a run directory's
newest checkpoint changes, and a file may be overwritten in place, so no name or path says which weights were
read), the preprocessing, the feature kind, the precision and device type, and the split's images (the
dataset's kind, root and split; the file names, sizes, times and labels of an image folder, the contents of
CIFAR's arrays, the synthetic set's seed and size). A file made from anything else, or that cannot be read, is
extracted again. Files are written through a temporary file renamed into place and read with
`torch.load(weights_only=True)`, which runs no pickled code; the temporary files that a killed save left are
removed by the next run (`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from clip.evaluation.datasets import CIFARDataset, ImageFolderDataset
from clip.evaluation.features import nonfinite_rows
from clip.exception_chain import first_in_chain
from clip.run_log import remove_temporaries_of, replaced_atomically

logger = logging.getLogger("clip.linear_probe")

# Raised when what a file stores, or how the key is computed, changes: older files are then extracted again.
FORMAT_VERSION = 1

FeatureKey = dict[str, Any]  # JSON values: what the features of one split were made from


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes of every tensor, buffers included).
    Seconds for ViT-L/14's 1.7 GB of float32 weights, against hours of extraction."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_list_digest(dataset: Dataset) -> str | None:
    """SHA-256 of which images a dataset holds, with their labels: an image folder's file names (relative to
    its folder) with each file's size and modification time, and its class folders; CIFAR's pixel and label
    arrays. None for other datasets, whose parameters identify them. Not an image folder's bytes (reading 1.28M
    files would take as long as a good part of the extraction), but their size and time: with names alone,
    images rewritten under the same names (scripts/export_synthetic.py run again with another seed, a folder
    re-exported at another size) reused the old images' features. Listing the folder stats each file already."""
    digest = hashlib.sha256()
    if isinstance(dataset, ImageFolderDataset):
        digest.update(json.dumps(dataset.class_folders).encode())
        for path, label in dataset.samples:
            # surrogateescape: a file name that is not UTF-8 is hashed as its bytes (strictly, it failed)
            digest.update(f"{path.relative_to(dataset.root).as_posix()}\t{label}\t{_size_and_time(path)}\n".encode(
                "utf-8", "surrogateescape"))
    elif isinstance(dataset, CIFARDataset):
        digest.update(dataset.images.tobytes())
        digest.update(json.dumps(dataset.labels).encode())
    else:
        return None
    return digest.hexdigest()


def _size_and_time(path: Path) -> str:
    """A file's size and modification time (nanoseconds), which rewriting it changes; "missing" once it is gone
    (read as unreadable, and skipped, when the features are extracted)."""
    try:
        status = path.stat()
    except OSError:
        return "missing"
    return f"{status.st_size} {status.st_mtime_ns}"


def _encoded(key: FeatureKey) -> str:
    return json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True)


def load_features(path: Path, key: FeatureKey, num_images: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (features, labels) saved in `path` when they were made from `key`'s inputs; None (logged) when
    there is no file, it was made from other inputs, or it is damaged. num_images, num_classes: of the split
    now, which a file's rows and labels must fit."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(stored, num_images, num_classes)
    except Exception as error:  # a torn or overwritten file fails in torch's zip or unpickler, or the storage
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        logger.warning("the features kept in %s cannot be used (%s); extracting them again", path, problem)
        return None
    saved_key = json.loads(stored["key"])
    wanted = json.loads(_encoded(key))
    if saved_key != wanted:
        changed = sorted(name for name in wanted.keys() | saved_key.keys() if saved_key.get(name) != wanted.get(name))
        logger.info("the features kept in %s were made from other inputs (%s); extracting them again",
                    path, ", ".join(changed))
        return None
    return stored["features"], stored["labels"]


def _problem(stored: Any, num_images: int, num_classes: int) -> str | None:
    """What makes a loaded file unusable, or None."""
    if not isinstance(stored, dict) or not {"key", "features", "labels"} <= stored.keys():
        return "not a features file"
    key, features, labels = stored["key"], stored["features"], stored["labels"]
    if not isinstance(key, str) or not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "not a features file"
    try:
        if not isinstance(json.loads(key), dict):
            return "its key is not a JSON object"
    except ValueError:
        return "its key is not JSON"
    if features.dtype != torch.float32 or features.ndim != 2 or labels.dtype != torch.int64 or labels.ndim != 1:
        return f"features {features.dtype} {list(features.shape)} and labels {labels.dtype} {list(labels.shape)}"
    if not features.is_contiguous() or not labels.is_contiguous():
        # As saved they are; a view that repeats its data (stride 0) made a 2 KB file gigabytes when checked
        return "features or labels that repeat or skip their data (not as saved)"
    if not 0 < len(labels) == len(features) <= num_images:
        return f"{len(features)} features and {len(labels)} labels for a split of {num_images} images"
    if labels.min() < 0 or labels.max() >= num_classes:
        return f"labels outside 0..{num_classes - 1}"
    if nonfinite_rows(features):
        return "NaN or inf features"
    return None


def remove_stale_temporaries(path: Path) -> None:
    """Deletes the temporary files that saves of `path` killed mid-write (kill -9, the out-of-memory killer)
    left beside it, `.NAME.PID.tmp` (`replaced_atomically`'s names): a large split's are gigabytes, and
    nothing else removed them. Only those whose process is no longer running: one of a running process (another
    run's save in progress, on the same output folder) is left alone, and said so with its size."""
    remove_temporaries_of(path, "an interrupted save of the features", logger, still_writing=_process_running)


def _process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine; True where that cannot be told (not POSIX: there os.kill
    would end the process)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


def save_features(path: Path, key: FeatureKey, features: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keeps `features` in `path` for a later run. A failure (a full disk) is logged, not raised: the run can
    go on with the features in memory."""
    content = {"key": _encoded(key), "features": features[0].contiguous(), "labels": features[1].contiguous()}
    try:
        with replaced_atomically(path, "wb") as file:
            torch.save(content, file)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as an "enforce fail" RuntimeError raised while handling the OSError
        if first_in_chain(error, lambda link: isinstance(link, OSError)) is None:  # (the error itself included)
            raise
        logger.warning("could not keep the features in %s for a later run: %s", path, error)
        return
    logger.info("kept the features in %s for a later run", path)
