"""Training checkpoints: atomic writes, the last K kept, and resume from the latest one that loads.

A checkpoint is one `torch.save` dict:
  {"format": CHECKPOINT_FORMAT, "step": int, "model": CLIP state dict, "config": resolved TrainConfig dict,
   "optimizer": ..., "scaler": ..., "loss_parameters": ..., "rng": per-rank RNG states, "data": per-rank
   data positions, "metrics": last logged metrics}
It holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
Files are `RUN_DIR/checkpoints/step_XXXXXXXX.pt`; the highest step whose file loads is the latest.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "clip-pretrain/1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")

log = logging.getLogger(__name__)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in the run directory, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_checkpoint(state: dict, run_dir: Path, step: int, keep_last: int) -> Path:
    """Writes atomically: a temporary file in the same folder, flushed to disk, then renamed into place.

    An interrupted write leaves at worst a stray temporary file, never a truncated `step_*.pt`.
    """
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    for _, old in list_checkpoints(run_dir)[max(keep_last, 1) :]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """Loads one checkpoint without running pickled code; raises if it is truncated or not ours."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this trainer")
    return state


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint that loads; a corrupt or truncated newer one is skipped with a warning."""
    for step, path in list_checkpoints(run_dir):
        try:
            return read_checkpoint(path)
        except Exception as error:  # a torn file raises anything from zipfile/pickle/torch
            log.warning("checkpoint %s (step %d) is unreadable (%s); falling back to an older one", path, step, error)
    return None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain values (safe for weights_only loading)."""
    numpy_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "numpy_gauss": [int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
