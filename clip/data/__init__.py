"""Datasets for training and evaluating CLIP: image-caption sources and the synthetic demo data.

The training pipeline: `build_train_data(config, ...)` (see `loader.py`) reads the sources of a
`DataConfig` -- synthetic shapes, CSV/TSV/JSONL manifests, WebDataset tar shards -- with exact epochs or
weighted resampling, skips and counts bad samples, and resumes exactly from `state_dict()`.
"""

from .config import DataConfig, SourceConfig
from .epoch_counts import counts_line
from .loader import TrainData, build_train_data
from .rank_states import data_state_for_other_world_size, data_state_for_rank, merge_rank_reports, states_to_save
from .transform import PixelNormalizer

__all__ = ["DataConfig", "PixelNormalizer", "SourceConfig", "TrainData", "build_train_data", "counts_line",
           "data_state_for_other_world_size", "data_state_for_rank", "merge_rank_reports", "states_to_save"]
