"""Helpers shared by the evaluation commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name_or_path: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model, eval preprocessing) through `clip.load`: a released name, a file or a training run directory."""
    from clip.loading import load

    return load(name_or_path, device=device)


def write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))
    return path
