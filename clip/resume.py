"""What a run directory's checkpoint allows a new start to do: continue (with every changed setting named),
or refuse (another model or loss)."""

from __future__ import annotations

import logging
from pathlib import Path

from .architectures import architecture_differences
from .config import TrainConfig, from_dict, to_dict
from .config_io import ConfigError, differences
from .data.config import synthetic_sample_count

log = logging.getLogger(__name__)


class ResumeRefused(ValueError):
    """The run directory holds a run this config cannot continue (another model or loss)."""


def check_resumable(saved: dict, current: dict, run_dir: Path, warn: bool = True) -> None:
    """Refuses to resume what cannot be (another model, another loss and so other trained parameters); warns
    (if `warn`) about every other setting that differs from the checkpoint's, since the run then continues
    under them."""
    saved = with_decay_embeddings(saved)
    try:  # settings newer than the checkpoint take their defaults, so that they are not reported as changed
        saved = to_dict(from_dict(TrainConfig, saved))
    except ConfigError:
        pass  # a config this version cannot read as such (a setting since removed): compared as written
    # A synthetic source's size as it renders it (checkpoints before 2026-11-30 wrote the default out)
    saved, current = with_synthetic_sizes(saved), with_synthetic_sizes(current)
    other_model = architecture_differences(saved["model"], current["model"])
    if other_model:
        raise ResumeRefused(
            f"{run_dir} holds a run of a different model ("
            + "; ".join(f"model.{key}: {there!r} there, {here!r} here" for key, there, here in other_model)
            + "); use a new --output-dir or the same model config"
        )
    if saved["loss"]["kind"] != current["loss"]["kind"]:
        raise ResumeRefused(
            f"{run_dir} was trained with loss.kind={saved['loss']['kind']!r}, not {current['loss']['kind']!r} (their "
            f"parameters differ); use a new --output-dir or the same loss"
        )
    # Not settings a resumed run goes on under: a run directory moved or copied; the initial weights, which
    # only a new run reads
    not_applied = ("output_dir", "train.init_weights")
    changed = [
        f"{key}: {before!r} -> {after!r}" for key, before, after in differences(saved, current) if key not in not_applied
    ]
    if changed and warn:
        log.warning("resuming %s with settings that differ from its checkpoint's: %s", run_dir, "; ".join(changed))


def with_decay_embeddings(saved: dict) -> dict:
    """A checkpoint's config with optimizer.decay_embeddings, which checkpoints from before the setting lack:
    they were trained with the embeddings undecayed."""
    return {**saved, "optimizer": {"decay_embeddings": False, **saved["optimizer"]}}


def with_synthetic_sizes(config: dict) -> dict:
    """`config` with every synthetic source's num_samples as the source reads it (`synthetic_sample_count`), so
    that the default written out and the default left unset compare equal."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        return config
    sources = [
        {**source, "num_samples": synthetic_sample_count(source.get("num_samples"))}
        if isinstance(source, dict) and source.get("kind") == "synthetic"
        else source
        for source in data["sources"]
    ]
    return {**config, "data": {**data, "sources": sources}}
