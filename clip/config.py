"""The training config schema: one dataclass per section, composed into `TrainConfig`.

A recipe file in `configs/` is a complete TOML description of one run (no inheritance); the command line
can override any field as `section.key=value`. The resolved config is written to the run directory and
into every checkpoint, so `clip.load(checkpoint)` rebuilds the model without being told its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .architectures import ModelConfig
from .config_io import ConfigError, from_dict, load_config, to_dict, to_toml
from .data.config import DataConfig
from .evaluation.config import EvalConfig
from .loss import LossConfig

__all__ = ["ConfigError", "LossConfig", "TrainConfig", "from_dict", "load_config", "to_dict", "to_toml"]


@dataclass
class OptimizerConfig:
    lr: float = 5e-4  # peak learning rate, reached after warmup
    weight_decay: float = 0.2  # decoupled (AdamW); not applied to gains, biases, embeddings, logit_scale
    beta1: float = 0.9
    beta2: float = 0.98  # the paper's value: 0.98 rather than 0.999 is more stable at large batch
    eps: float = 1e-6
    grad_clip_norm: float | None = 1.0  # None disables clipping
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # auto: fused AdamW (CUDA and CPU)


@dataclass
class ScheduleConfig:
    steps: int = 1000  # optimiser steps in the run
    warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainLoopConfig:
    batch_size: int = 256  # per rank and per optimiser step; global batch = batch_size * world size
    accumulation_steps: int = 1  # micro-batches per step; the loss is the full batch's contrastive loss
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a gradient scaler
    grad_checkpointing: bool = False  # recompute transformer blocks in backward to save activation memory
    compile: bool = False  # torch.compile the model
    seed: int = 0
    max_consecutive_nonfinite: int = 10  # a run stops after this many non-finite losses in a row
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    threads: int | None = None  # torch intra-op threads on the CPU; None keeps torch's default
    # CUDA: float32 matrix products on TF32 tensor cores (see clip.cuda_backends). Much faster with
    # precision = "fp32"; under bf16/fp16 autocast it touches only what stays float32, such as the loss's
    # similarity matrix, which it makes less precise for no speed.
    tf32: bool = False


@dataclass
class LoggingConfig:
    every_n_steps: int = 10  # metrics.jsonl and the progress bar's figures
    tensorboard: bool = True  # write TensorBoard events when the tensorboard package is installed
    plot: bool = True  # a loss/accuracy PNG at the end when matplotlib is installed
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # 0 = only at the end of the run
    keep_last: int = 3  # older checkpoints are deleted; the latest K stay


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"  # the run directory; an existing one is resumed
