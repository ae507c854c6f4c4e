"""The training config schema: one dataclass per section, composed into `TrainConfig`.

A recipe file in `configs/` is a complete TOML description of one run (no inheritance); the command line
can override any field as `section.key=value`. The resolved config is written to the run directory and
into every checkpoint, so `clip.load(checkpoint)` rebuilds the model without being told its size.

A field typed `X | None` is set to None with the string "none" (`grad_clip_norm = "none"`, or the override
`optimizer.grad_clip_norm=none`). Every section checks its values' types (as a file's, also when built in
Python) and ranges when it is built, so a value that cannot work is a ConfigError naming its key before the run
starts, not a crash or a silent no-op later.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from .architectures import OPENAI_VOCAB_SIZE, RELEASED_ARCHITECTURES, ModelConfig, release_of_open_clip_name
from .config_io import (
    ConfigError,
    InvalidValue,
    check_field_types,
    from_dict,
    load_config,
    require,
    require_utf8_text,
    to_dict,
    to_toml,
)
from .data.config import DataConfig
from .device_names import device_name_problem
from .evaluation.config import EvalConfig, Precision, precision_hint
from .loss import LossConfig

__all__ = ["ConfigError", "LossConfig", "TrainConfig", "from_dict", "load_config", "to_dict", "to_toml"]

_RUN_LENGTH = ("the run's length is 'schedule.steps' here, counted in optimiser steps: epochs x samples per epoch "
               "/ global batch")
# Other trainers' names for settings (open_clip's flags written as keys, Hugging Face's and Lightning's
# arguments) that are no key of any section here. Their closest spelling misled ([train] max_steps: "Did you
# mean 'train.accumulation_steps'?", [optimizer] epochs: 'optimizer.eps', [schedule] epochs: 'schedule.steps'
# with no word of the unit) or there was none. A name that some section has (lr, batch_size, warmup_steps)
# needs no entry: load_config names that section.
_OTHER_TRAINERS_KEYS = {
    **dict.fromkeys(("epochs", "epoch", "num_epochs", "max_epochs", "num_train_epochs"), _RUN_LENGTH),
    **dict.fromkeys(("max_steps", "total_steps"), "the run's length is 'schedule.steps' here"),
    "learning_rate": "the peak learning rate is 'optimizer.lr' here",
    "wd": "the weight decay is 'optimizer.weight_decay' here",
    "warmup": "the warmup is 'schedule.warmup_steps' here, in optimiser steps",
    "lr_scheduler": "the schedule's shape is 'schedule.kind' here",
    **dict.fromkeys(("accum_freq", "gradient_accumulation_steps"),
                    "gradient accumulation is 'train.accumulation_steps' here"),
    "max_grad_norm": "gradient clipping is 'optimizer.grad_clip_norm' here",
    "pretrained": "the weights a run starts from are 'train.init_weights' here",
    "num_workers": "the loader's worker processes are 'data.workers' here",
}


def _other_trainers_key_hint(key: str, value: object = None) -> str:
    """The `config_hint` (see clip.config_io) of the sections other trainers' names are written in."""
    return _OTHER_TRAINERS_KEYS.get(key, "")


@dataclass
class OptimizerConfig:
    lr: float = 5e-4  # peak learning rate, reached after warmup
    weight_decay: float = 0.2  # decoupled (AdamW); never applied to gains, biases, the class token, logit_scale
    # The CLIP paper decays "all weights that are not gains or biases", the token and position embeddings
    # included, as open_clip does; false leaves the embeddings undecayed (GPT-2's practice, and this
    # library's only behaviour before the setting existed: its older checkpoints resume with false).
    decay_embeddings: bool = True
    beta1: float = 0.9
    # The paper's values for its ViTs (0.98 rather than 0.999 is more stable at large batch); for its
    # ResNets it used beta2 = 0.999 and eps = 1e-8.
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float | None = 1.0  # "none" (None) disables clipping
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # auto: fused AdamW (CUDA and CPU)

    config_hint = staticmethod(_other_trainers_key_hint)

    def __post_init__(self) -> None:
        check_field_types(self)
        require("lr", self.lr, 0 < self.lr < math.inf, "a finite number > 0")
        require("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf, "a finite number >= 0")
        # AdamW's moment decay rates: 1 would never forget (torch rejects it), < 0 is no average.
        require("beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)")
        require("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)")
        require("eps", self.eps, 0 < self.eps < math.inf, "a finite number > 0")
        if self.grad_clip_norm is not None:
            require("grad_clip_norm", self.grad_clip_norm, 0 < self.grad_clip_norm < math.inf,
                    'a finite number > 0, or "none" for no clipping')


ScheduleKind = Literal["cosine", "constant", "constant_cooldown"]
_OPEN_CLIP_SCHEDULES = {"const": "constant", "const-cooldown": "constant_cooldown"}  # its --lr-scheduler values


@dataclass
class ScheduleConfig:
    steps: int = 1000  # optimiser steps in the run
    warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    # After the warmup: "cosine" decays to lr * min_lr_ratio at `steps` (the paper's schedule); "constant"
    # holds lr; "constant_cooldown" holds lr, then decays linearly over the last `cooldown_steps`, towards
    # lr * min_lr_ratio at `steps` (warmup-stable-decay). A constant rate lets a run be extended (more
    # `steps`) without the rate jumping: the cosine of a longer run is higher at every step, the constant part
    # the same.
    kind: ScheduleKind = "cosine"
    cooldown_steps: int = 0  # constant_cooldown only: the final steps of linear decay
    min_lr_ratio: float = 0.0  # the decay's floor (cosine, constant_cooldown), as a fraction of lr

    @staticmethod
    def config_hint(key: str, value: object) -> str:  # see clip.config_io
        if key == "kind" and isinstance(value, str) and value in _OPEN_CLIP_SCHEDULES:
            return f"open_clip's {value!r} is {_OPEN_CLIP_SCHEDULES[value]!r} here"
        return _other_trainers_key_hint(key)

    def __post_init__(self) -> None:
        check_field_types(self)
        # 0 steps would end the run at once, saving an untrained checkpoint as if it had finished.
        require("steps", self.steps, self.steps >= 1, ">= 1")
        require("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0 (0 = no warmup)")
        # The floor of the decay, as a fraction of the peak: above 1 the "decay" would raise the rate.
        require("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        # Settings that the chosen kind would ignore are errors: a cooldown or floor asked for and silently
        # not applied would only show at the end of a long run.
        if self.kind == "constant_cooldown":
            room = self.steps - self.warmup_steps
            if room < 1:  # no cooldown length fits: the range below would read [1, 0] or [1, -2]
                raise InvalidValue("warmup_steps", f"({self.warmup_steps}) leaves none of the run's {self.steps} "
                                   f'steps for the cooldown of kind = "constant_cooldown"; it must be below steps')
            require("cooldown_steps", self.cooldown_steps, 1 <= self.cooldown_steps <= room,
                    f"in [1, steps - warmup_steps = {room}] with kind = \"constant_cooldown\"")
        elif self.cooldown_steps != 0:
            raise InvalidValue("cooldown_steps", f'is used only with kind = "constant_cooldown", not {self.kind!r}')
        if self.kind == "constant" and self.min_lr_ratio != 0.0:
            raise InvalidValue("min_lr_ratio", 'is not used with kind = "constant" (the rate never decays)')


_MAX_THREADS = 2**31 - 1  # torch.set_num_threads's limit


@dataclass
class TrainLoopConfig:
    batch_size: int = 256  # per rank and per optimiser step; global batch = batch_size * world size
    # Micro-batches per step; the loss is the full batch's contrastive loss, every row against all the batch's
    # negatives, and the gradients are those of one pass (clip.train_step). A ResNet's BatchNorm is the
    # exception: it normalises each micro-batch (as each rank's rows) with that micro-batch's statistics, and
    # updates its running ones once per micro-batch, so its features depend on the split, as they would
    # with a smaller batch.
    accumulation_steps: int = 1
    precision: Precision = "fp32"  # autocast dtype; fp16 adds a gradient scaler
    # Recompute transformer blocks in the backward pass to save activation memory: a ViT's and the text tower's (a
    # ResNet's BatchNorm would update its statistics twice, so its blocks are not; warned of)
    grad_checkpointing: bool = False
    # torch.compile the training step (on the CPU inductor needs a C++ compiler, checked before the run starts);
    # random numbers (patch dropout's) are drawn as uncompiled, so a run continues alike with or without it
    compile: bool = False
    seed: int = 0
    # Fine-tuning: the weights a new run starts from instead of a random initialisation -- a released name
    # ("ViT-B/32"), a weights file or another run's directory; [model] must be their architecture. A run
    # that resumes from its own checkpoint does not read them. "none" (None): from scratch. With
    # loss.kind = "siglip" a SigLIP model's weights bring their temperature and bias; others start from
    # SigLIP's (10, -10).
    init_weights: str | None = None
    # LiT-style tuning: a locked tower keeps its weights (no gradients, no optimizer state, no activations kept
    # for a backward pass, BatchNorm statistics frozen) while the other learns to match it -- e.g. a released
    # image tower (init_weights) with lock_image = true. Not both: only the temperature would be left.
    lock_image: bool = False
    lock_text: bool = False
    # A locked tower's last N layers still train, with what follows them: its last N transformer blocks, final
    # LayerNorm and projection (open_clip's --lock-*-unlocked-groups N + 1: it counts the projection as a group
    # of its own); for a ResNet its last N of 4 stages (layer4 first) and attention pool, whose BatchNorm
    # statistics then update. 0: the whole tower is locked.
    lock_image_unlocked_layers: int = 0
    lock_text_unlocked_layers: int = 0
    # Patch dropout (FLIP, Li et al. 2023): a ViT sees this fraction of each image's patches less while it
    # trains -- a new random subset per image and step; evaluations see all. About 1 / (1 - p) times less
    # image-tower compute; FLIP trained at 0.5 and finished unmasked. 0 = off.
    patch_dropout: float = 0.0
    max_consecutive_nonfinite: int = 10  # a run stops after this many non-finite losses in a row
    device: str = "auto"  # auto: this process's GPU when CUDA is available (see clip.distributed), else cpu
    threads: int | None = None  # torch intra-op threads on the CPU; "none" (None) keeps torch's default
    # On the CPU (64-bit glibc): malloc keeps freed memory for the next step instead of the kernel mapping and
    # zeroing it afresh every step: 15-20% of an RN50 step, for up to ~12% more peak memory (false: glibc's
    # behaviour, for memory's sake). Process-wide: when the run ends the memory is returned and malloc left
    # with fixed thresholds (see clip.cpu_memory); MALLOC_*_ variables, GLIBC_TUNABLES or a preloaded
    # allocator take precedence.
    keep_freed_cpu_memory: bool = True
    # CUDA: float32 matrix products on TF32 tensor cores (see clip.cuda_backends). Much faster with
    # precision = "fp32"; under bf16/fp16 autocast it touches only what stays float32, such as the loss's
    # similarity matrix, which it makes less precise for no speed.
    tf32: bool = False

    @staticmethod
    def config_hint(key: str, value: object) -> str:  # see clip.config_io
        return precision_hint(key, value) or _other_trainers_key_hint(key)

    def __post_init__(self) -> None:
        # First: a pathlib.Path, as a notebook passes clip.load, is taken as its text (the config is written as
        # TOML), and a wrong type is refused as in a file, not met by the checks below
        check_field_types(self)
        if self.init_weights is not None:  # "" was read as the current folder: ". is a directory without checkpoints"
            require("init_weights", self.init_weights, bool(self.init_weights.strip()),
                    'a released name, a weights file or a run directory, or "none" to start from scratch')
        require("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        require("accumulation_steps", self.accumulation_steps, self.accumulation_steps >= 1,
                ">= 1 (1 = no accumulation)")
        if self.batch_size % self.accumulation_steps:
            raise InvalidValue(
                "batch_size",
                f"must be divisible by accumulation_steps: {self.batch_size} rows do not split into "
                f"{self.accumulation_steps} equal micro-batches",
            )
        # The trainer stops once this many losses in a row are non-finite: 0 would stop at the first one.
        nonfinite = self.max_consecutive_nonfinite
        require("max_consecutive_nonfinite", nonfinite, nonfinite >= 1, ">= 1")
        if self.threads is not None:
            # torch.set_num_threads takes a 32-bit int: a larger count failed as the run started, with
            # "ValueError: Overflow when unpacking long"
            require("threads", self.threads, 1 <= self.threads <= _MAX_THREADS,
                    f'in [1, {_MAX_THREADS}], or "none" for the default thread count')
        require("patch_dropout", self.patch_dropout, 0 <= self.patch_dropout < 1, "in [0, 1)")
        # A device torch cannot parse ("gpu") stopped the run with torch's traceback, once it had started
        if self.device != "auto" and (problem := device_name_problem(self.device)) is not None:
            raise InvalidValue("device", f'must be "auto" or a torch device such as "cpu", "cuda" or "cuda:1", '
                                         f"got {self.device!r}, which {problem}")
        for tower in ("image", "text"):
            key, layers = f"lock_{tower}_unlocked_layers", getattr(self, f"lock_{tower}_unlocked_layers")
            require(key, layers, layers >= 0, ">= 0 (0: the whole tower is locked)")
            if layers and not getattr(self, f"lock_{tower}"):
                raise InvalidValue(key, f"applies to a locked tower only (lock_{tower} = true): this one trains whole")
        unlocked = self.lock_image_unlocked_layers or self.lock_text_unlocked_layers
        if self.lock_image and self.lock_text and not unlocked:
            raise InvalidValue("lock_text", "cannot be true with lock_image: nothing but the temperature would "
                               "train (unless lock_image_unlocked_layers or lock_text_unlocked_layers leaves layers)")


def _model_name_hint(value: object) -> str:
    """What to write instead of `model = value`: a name there (open_clip's --model habit) is not read as an
    architecture, and the type error alone said nothing of how to give one."""
    if not isinstance(value, str):
        return ""
    release = value if value in RELEASED_ARCHITECTURES else release_of_open_clip_name(value)
    named = (f"; {release}'s are those of clip.RELEASED_ARCHITECTURES[{release!r}].to_dict()"
             if release is not None else "")
    # open_clip's names without -quickgelu are GELU models, also its RN50 ... RN50x64, spelled as OpenAI's here
    if release_of_open_clip_name(value) is not None and not value.strip().endswith("-quickgelu"):
        named += f', with activation = "gelu" for open_clip\'s {value}'
    return ("a name is not an architecture here: write a [model] table with its sizes, as the source "
            f"repository's configs/finetune_vit_b32.toml does for ViT-B/32{named}")


@dataclass
class LoggingConfig:
    every_n_steps: int = 10  # metrics.jsonl and the progress bar's figures
    tensorboard: bool = True  # write TensorBoard events when the tensorboard package is installed
    plot: bool = True  # a loss/accuracy PNG at the end when matplotlib is installed
    progress_bar: bool = True
    # Weights & Biases (pip install wandb; `wandb login`, or WANDB_MODE=offline): the same metrics as
    # metrics.jsonl, in one W&B run per run directory that a resumed run continues.
    wandb: bool = False
    wandb_project: str = "clip"
    wandb_entity: str | None = None  # a W&B user or team; "none": your default entity

    def __post_init__(self) -> None:
        check_field_types(self)
        # The trainer logs when step % every_n_steps == 0 (and at the last step), so 0 has no meaning.
        require("every_n_steps", self.every_n_steps, self.every_n_steps >= 1, ">= 1")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # 0 = only at the end of the run
    keep_last: int = 3  # older checkpoints are deleted; the latest K stay

    def __post_init__(self) -> None:
        check_field_types(self)
        require("every_n_steps", self.every_n_steps, self.every_n_steps >= 0, ">= 0 (0 = only at the end of the run)")
        # Resuming needs the latest checkpoint: at least one is always kept.
        require("keep_last", self.keep_last, self.keep_last >= 1, ">= 1")


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
    output_dir: str = "runs/default"  # the run directory; an existing one is resumed ("~" is the home folder)

    @staticmethod
    def config_hint(key: str, value: object) -> str:  # see clip.config_io
        return _model_name_hint(value) if key == "model" else _other_trainers_key_hint(key)

    def __post_init__(self) -> None:
        check_field_types(self)
        # "" is the current folder, which would become the run directory (its checkpoints, its lock, a resume
        # of whatever run it holds); "~/runs/x" in a TOML file, which no shell expands, made a folder named "~"
        require("output_dir", self.output_dir, bool(self.output_dir.strip()), "a folder for the run")
        # No file system takes a NUL in a name: "\u0000" in a TOML string (or an override) stopped the run as it
        # made the folder, with "ValueError: embedded null byte" and its traceback
        require("output_dir", self.output_dir, "\0" not in self.output_dir, "a folder name without a NUL character")
        variable = re.search(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", self.output_dir)
        if variable:
            # "$SCRATCH/runs/x" in a TOML file, which no shell expands, made a folder named "$SCRATCH" in the
            # current one, its checkpoints where no one looked for them
            raise InvalidValue("output_dir", f"holds {variable.group(0)}, which a config does not expand (a shell "
                               f"does): write the path out, or give it on the command line, "
                               f"--output-dir \"{self.output_dir}\" with double quotes (got {self.output_dir!r})")
        self.output_dir = os.path.expanduser(self.output_dir)
        require_utf8_text(to_dict(self))  # the run writes its config down as config.toml
        if self.model.text.vocab_size < OPENAI_VOCAB_SIZE:
            # The trainer tokenizes with OpenAI's BPE: an id past the embedding table fails in the first step.
            raise InvalidValue("model.text.vocab_size", f"must be >= {OPENAI_VOCAB_SIZE} (the BPE tokenizer's ids "
                               f"go up to {OPENAI_VOCAB_SIZE - 1}), got {self.model.text.vocab_size}")
        for index, source in enumerate(self.data.sources):
            if source.kind == "synthetic" and source.synthetic_image_size is None and self.model.vision.image_size < 16:
                raise InvalidValue(
                    f"data.sources.{index}.synthetic_image_size",
                    f"must be set to 16 or more for model.vision.image_size={self.model.vision.image_size}: the "
                    "synthetic images need 16 pixels to draw their shapes (they are resized to the model's size)",
                )
        if self.train.patch_dropout and self.model.vision.kind != "vit":
            raise InvalidValue("train.patch_dropout", "applies to ViT image towers only (model.vision.kind = \"vit\")")
        vision = self.model.vision
        image_depth = len(vision.layers) if isinstance(vision.layers, tuple) else vision.layers
        for tower, depth in (("image", image_depth), ("text", self.model.text.layers)):
            layers = getattr(self.train, f"lock_{tower}_unlocked_layers")
            if layers > depth:
                unit = "stages" if tower == "image" and vision.kind == "resnet" else "layers"
                raise InvalidValue(f"train.lock_{tower}_unlocked_layers",
                                   f"must be at most the {tower} tower's {depth} {unit}, got {layers}")
        if self.train.patch_dropout and self.train.lock_image:
            # A locked tower runs in eval mode, where every patch is seen: the setting would do nothing
            raise InvalidValue("train.patch_dropout", "has no effect on a locked image tower (train.lock_image)")
