"""Training-step throughput and peak memory: this library against open_clip on the same architecture.

    python benchmarks/train_step.py                                  # CPU, fp32: ViT-B/32 and RN50, batch 16 and 32
    python benchmarks/train_step.py --threads 1 2 --repeats 5 --json train_step.json
    python benchmarks/train_step.py --device cuda --precision bf16 --archs ViT-B/16 RN50 --batch-sizes 256 \\
        --warmup 3 --steps 10

One step = both encoders, the contrastive loss, backward and the optimiser step, each library as its own
training script does it:
  ours:      ContrastiveModel + build_loss(LossConfig()) + build_optimizer (implementation "auto"), driven
             by clip.train_step.contrastive_step; as clip.train does, a ResNet runs channels-last on CUDA and the
             captions are cut after the batch's last end-of-text token on the host (no device sync); the
             losses' and the gradient norm's finiteness decide on the device whether the fused AdamW steps,
             and the host reads that verdict a step later (clip.step_verdict: no device sync per step; with
             --optimizer foreach or for-loop, read at once). On the CPU, malloc keeps freed memory for
             the next step (clip.cpu_memory), as clip.train does there (--cpu-malloc).
  open_clip: open_clip.create_model("<arch>-quickgelu") (OpenAI's QuickGELU settings) + open_clip.loss.ClipLoss
             + torch.optim.AdamW with open_clip's weight-decay groups and torch's default implementation
             (the for-loop one on the CPU, foreach on CUDA); malloc at glibc's defaults, as its trainer leaves it
             (--cpu-malloc both: kept too).
Both get the same images (random pixels) and the same realistic captions (8-30 BPE tokens, through
clip.tokenize, padded to the 77-token context), the same thread count, AdamW hyper-parameters, autocast
dtype and no gradient clipping (pass --grad-clip-norm to clip both). After each step the temperature is
clamped as both training scripts do.

Every measurement runs in a fresh process; runs alternate ours, theirs, theirs, ours, ... and the median of
--repeats runs is reported. Warm-up steps are not timed. Peak memory:
  CPU:  the process's resident-memory high-water mark (ru_maxrss) at the end of the timed steps, minus the
        resident memory before the model is built ("training peak"): weights, gradients, optimiser state,
        activations and temporaries. Both processes import torch, clip and open_clip and make the input batch
        before that baseline, so it is the same for both.
  CUDA: torch.cuda.max_memory_allocated() over the timed steps (weights and optimiser state included; the
        warm-up's one-off cuDNN autotuning workspaces and compilation not).
On CUDA both run with cuDNN autotuning on (`clip.cuda_backends`), and TF32 as each training script sets it
by default (open_clip on, ours off: under bf16 autocast it only affects float32 leftovers).
--profile FILE appends, for the first run of each library and configuration, torch.profiler's operators by
own time over --profile-steps further steps (after the timed ones, so timings are unaffected) and the
fraction of wall time the device was busy.
Text length: ours computes the text tower only up to the batch's last end-of-text token (rounded up to a
multiple of 8: 32 of the 77 positions for these captions), open_clip all 77. The features are the same (the
mask is causal), but the work is not. --text-length full makes ours run all 77 positions too, the same
inputs as open_clip's; --text-length trimmed full measures ours both ways, each against the same open_clip
runs (one row each). Either way ours' last block in each tower computes only the position read from it
(the class token, the end-of-text token; keys and values still from every position), again with the same
features and gradients. Forward GFLOPs per sample for ViT-B/32: ours 10.5 (trimmed) or 13.8 (all 77
positions), open_clip 14.8.
Model FLOPs are counted with torch's FlopCounterMode on the batch actually used (forward x 3), so they count
the text length each library really computes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from clip.cli.common import non_negative_int, positive_int  # noqa: E402

LIBRARIES = ("ours", "open_clip")
OPEN_CLIP_NAMES = {"ViT-B/32": "ViT-B-32-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu", "RN50": "RN50-quickgelu",
                   "RN101": "RN101-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu"}
LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 0.2
MAX_LOG_LOGIT_SCALE = math.log(100)
OPEN_CLIP_MISSING = "open_clip is not installed (pip install -e .[bench])"


# ---- architectures -------------------------------------------------------------------------------------


def model_config(arch: str):
    """A released name ("ViT-B/32") or a ModelConfig as a JSON object (e.g. a tiny model for smoke tests)."""
    from clip.architectures import ModelConfig, get_architecture

    return ModelConfig.from_dict(json.loads(arch)) if arch.lstrip().startswith("{") else get_architecture(arch)


def open_clip_model(arch: str):
    """open_clip's model of the same architecture: its registered "-quickgelu" config for a released name,
    otherwise its CLIP class built from our config's numbers."""
    import open_clip

    if arch in OPEN_CLIP_NAMES:
        return open_clip.create_model(OPEN_CLIP_NAMES[arch], pretrained=None)
    config = model_config(arch)
    vision, text = config.vision, config.text
    # open_clip derives the head count from a per-head width.
    head_width = vision.width * 32 // vision.heads if vision.kind == "resnet" else vision.width // vision.heads
    vision_cfg = {"layers": vision.layers, "width": vision.width, "head_width": head_width, "mlp_ratio": vision.mlp_ratio,
                  "patch_size": vision.patch_size, "image_size": vision.image_size}
    text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio}
    return open_clip.model.CLIP(config.embed_dim, vision_cfg, text_cfg, quick_gelu=config.activation == "quick_gelu")


def display_name(arch: str) -> str:
    if not arch.lstrip().startswith("{"):
        return arch
    vision = model_config(arch).vision
    return f"custom {vision.kind} ({vision.width} wide, {vision.image_size} px)"


# ---- one measurement (runs in its own process) -------------------------------------------------------


def build_ours(arch: str, device: torch.device, optimizer_implementation: str):
    from clip.config import LossConfig, OptimizerConfig
    from clip.loss import build_loss
    from clip.model import create_model
    from clip.optim import build_optimizer
    from clip.train_step import ContrastiveModel

    clip_model = create_model(model_config(arch))
    module = ContrastiveModel(clip_model, with_logit_bias=False, trim_text=False).to(device)  # as clip.train
    if clip_model.config.vision.kind == "resnet" and device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)  # as clip.train does
    config = OptimizerConfig(lr=LEARNING_RATE, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                             implementation=optimizer_implementation)
    optimizer = build_optimizer(list(module.named_parameters()), config, device)
    return module, optimizer, build_loss(LossConfig()), clip_model.logit_scale


def build_open_clip(arch: str, device: torch.device):
    import open_clip

    model = open_clip_model(arch).to(device)

    # open_clip's training script: no weight decay for gains, biases and the temperature.
    def excluded(name: str, parameter: torch.Tensor) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if excluded(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not excluded(n, p)], "weight_decay": WEIGHT_DECAY},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=BETAS, eps=EPS)
    return model, optimizer, open_clip.loss.ClipLoss(), model.logit_scale


def make_step(job: dict, device: torch.device, images: torch.Tensor, texts: torch.Tensor):
    """(step function returning the loss, the trained module, its optimiser)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[job["precision"]]

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    clip_norm = job.get("grad_clip_norm")
    if job["library"] == "ours":
        from clip.distributed import DistributedInfo, agreement_flags
        from clip.step_verdict import skips_on_device
        from clip.train import gradient_norm
        from clip.train_step import BatchNormSnapshot, contrastive_step

        module, optimizer, loss_fn, logit_scale = build_ours(job["arch"], device, job["optimizer"])
        runner = module
        if job["compile"]:
            if job.get("compile_scope", "model") == "blocks":
                compile_blocks(module)  # in place: the step runs the module itself
            else:
                runner = torch.compile(module)
        one_process = DistributedInfo(rank=0, world_size=1, local_rank=0, device=device)
        batch_norms = BatchNormSnapshot(module)
        on_device = skips_on_device(optimizer, gradient_scaler_enabled=False)
        losses_finite, in_flight = [], []

        def backward(loss: torch.Tensor) -> None:
            losses_finite.append(torch.isfinite(loss.detach()))
            loss.backward()

        def ours_step() -> torch.Tensor:
            # As clip.train does (no step logs here): the losses' and the gradient norm's finiteness decide
            # the step on the device with the fused AdamW, and the host reads that verdict after launching the
            # next step; with another optimiser it reads it at once (a device sync per step) and decides.
            losses_finite.clear()
            batch_norms.take()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = contrastive_step(runner, images, texts, 1, loss_fn, autocast, backward, False)
            grad_norm = gradient_norm(module, clip_norm)
            flags = agreement_flags(torch.stack(losses_finite).all(), grad_norm, False, one_process)
            take_or_skip(optimizer, flags, loss, batch_norms, in_flight if on_device else None)
            return loss
    else:
        module, optimizer, loss_fn, logit_scale = build_open_clip(job["arch"], device)
        runner = torch.compile(module) if job["compile"] else module

        def forward_backward() -> torch.Tensor:
            with autocast():
                image_features, text_features, scale = runner(images, texts)
                loss = loss_fn(image_features, text_features, scale)
            loss.backward()
            return loss.detach()

    def step() -> torch.Tensor:
        if job["library"] == "ours":
            loss = ours_step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
            optimizer.step()
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        return loss

    module.train()
    return step, module


def take_or_skip(optimizer, flags: torch.Tensor, loss: torch.Tensor, batch_norms, in_flight: list | None) -> None:
    """The optimiser's step as clip.train decides it from the step's verdict (`flags`) on steps that do not log:
    with `in_flight` (a list; the fused AdamW), on the device, and the previous step's verdict read once this
    one is launched; with None, the verdict read at once and the step taken or skipped on the host."""
    from clip.distributed import StepAgreement
    from clip.step_verdict import VerdictInFlight, step_or_skip_on_device

    if in_flight is not None:
        step_or_skip_on_device(optimizer, flags, batch_norms)
        in_flight.append(VerdictInFlight(0, flags, loss))
        if len(in_flight) > 1:
            in_flight.pop(0).read()
    elif StepAgreement.read(flags).skipped:
        batch_norms.restore()
    else:
        optimizer.step()


def compile_blocks(module: torch.nn.Module) -> None:
    """--compile-scope blocks (ours): each residual attention block compiled in place (`Module.compile`), the rest
    of the model eager. Identical blocks share one compiled graph (regional compilation), so compiling costs
    a few blocks' tracing rather than the whole model's: a lead for a shorter start, not what clip.train does
    (train.compile compiles the whole model)."""
    from clip.transformer import ResidualAttentionBlock

    for block in module.modules():
        if isinstance(block, ResidualAttentionBlock):
            block.compile()


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode has no formula for the CPU's attention kernel and counted it as 0 (the CUDA kernels and
# the meta device's have one): the CPU counts were 1-2% low and unlike the GPU's. The CUDA kernels' formula.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_flops_per_sample(job: dict, module, images: torch.Tensor, texts: torch.Tensor) -> float:
    """Training FLOPs per image-text pair (3 x forward) on this batch's texts; one image suffices."""
    from torch.utils.flop_counter import FlopCounterMode

    model = module.clip if job["library"] == "ours" else module
    # Ours as the step runs it: the texts given, already trimmed on the host or not (--text-length).
    encode_text = functools.partial(model.encode_text, trim=False) if job["library"] == "ours" else model.encode_text
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        model.encode_image(images[:1])
        encode_text(texts)
    vision_and_text = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as text_only:
        encode_text(texts)
    text_flops = text_only.get_total_flops()
    return 3.0 * ((vision_and_text - text_flops) + text_flops / texts.shape[0])


def profile_steps(step, steps: int, device: torch.device) -> dict:
    """Operators by own time (device time on CUDA) over `steps` more steps, and how busy the device was."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        common.synchronize(device)
        wall_s = time.perf_counter() - start
    averages = profiler.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    report = {"steps": steps, "step_s": wall_s / steps,
              "table": averages.table(sort_by=sort_key, row_limit=30, max_name_column_width=60)}
    if device.type == "cuda":
        # Kernels only: the CPU operator that launched a kernel is credited with its time as well, and so
        # are user annotations, so summing every row would count each kernel two or three times. Kernels
        # of several streams may overlap, which makes this an upper bound.
        from torch.autograd import DeviceType

        busy_us = sum(event.self_device_time_total for event in averages
                      if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False))
        report["device_busy_fraction"] = busy_us / 1e6 / wall_s
    return report


def measure(job: dict) -> dict:
    """One run in this process, with malloc keeping freed memory where --cpu-malloc says so, and compiling
    (--compile) into caches of its own."""
    from clip.cpu_memory import freed_memory_kept

    policy = job.get("cpu_malloc", "trainers")
    keep = job["device"] == "cpu" and (policy == "both" or (policy == "trainers" and job["library"] == "ours"))
    with fresh_compile_caches() if job.get("compile") else contextlib.nullcontext():
        with freed_memory_kept() if keep else contextlib.nullcontext(False) as kept:
            return {**measure_step(job), "freed_memory_kept": kept}


COMPILE_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def fresh_compile_caches():
    """torch.compile's on-disk caches (inductor's graphs and kernels, triton's binaries) in a new empty folder
    for this process: by default they are shared by every process of the user, so a library compiled second
    could load kernels the first one's run left there, compile faster and reach its timed steps within a
    time limit the first could not. Each library now compiles from the same cold start."""
    saved = {name: os.environ.get(name) for name in COMPILE_CACHE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="clip-bench-compile-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
        try:
            yield folder
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def measure_step(job: dict) -> dict:
    device = torch.device(job["device"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if device.type == "cuda":
        from clip.cuda_backends import configure_cuda_backends

        # Each as its training script does by default: open_clip's turns TF32 on, ours leaves it off (under
        # bf16 autocast it only touches float32 leftovers, such as our loss's similarity matrix).
        configure_cuda_backends(allow_tf32=job["library"] == "open_clip")
    import clip.train  # noqa: F401  (both processes import the same libraries before the baseline)

    with contextlib.suppress(ImportError):
        import open_clip  # noqa: F401

    config = model_config(job["arch"])
    torch.manual_seed(job["seed"])
    images = common.make_images(job["batch"], config.vision.image_size, job["seed"]).to(device)
    texts, text_source = common.caption_token_ids(job["batch"], job["seed"], config.text.context_length)
    if job["library"] == "ours" and job.get("text_length", "trimmed") == "trimmed":
        from clip.model import trim_text_batch

        texts = trim_text_batch(texts)  # cut at the length read on the host, as clip.train does (no device sync)
    texts = texts.to(device)
    if job["library"] == "ours" and device.type == "cuda" and config.vision.kind == "resnet":
        images = images.contiguous(memory_format=torch.channels_last)  # as clip.train does
    # The baseline: libraries, the input batch and the tokenizer that made it (~20 MiB), none of it training.
    baseline_rss = common.current_rss_bytes()
    step, module = make_step(job, device, images, texts)

    warmup_started = time.perf_counter()
    losses = [step() for _ in range(job["warmup"])]
    common.synchronize(device)
    # What the first steps cost (torch.compile's compilation, cuDNN's autotuning): what a time limit must allow
    warmup_s = time.perf_counter() - warmup_started
    if device.type == "cuda":
        # From here on: the warm-up's one-off allocations (cuDNN autotuning tries each convolution algorithm
        # with its own workspace, torch.compile its kernels) are no part of a training step's memory; the
        # weights and the optimiser state, allocated by now, stay counted.
        torch.cuda.reset_peak_memory_stats(device)
    # The losses stay on the device until the timing ends: reading each one would add a host sync per step
    # that neither library's training loop makes.
    wall_s, cpu_s = common.time_calls(lambda: losses.append(step()), job["steps"], device)
    result = {
        "samples_per_s": job["batch"] * job["steps"] / wall_s,
        "samples_per_cpu_s": job["batch"] * job["steps"] / cpu_s,
        "step_s": wall_s / job["steps"],
        "warmup_s": warmup_s,
        "losses": [loss.item() for loss in losses],
        "text_source": text_source,
        "caption_tokens": common.token_lengths(texts.cpu()),
        "text_positions": texts.shape[1],  # what the text tower runs: trimmed or the whole context
        "parameters": sum(p.numel() for p in module.parameters()),
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / common.GIB
    else:
        result["peak_gib"] = common.peak_rss_bytes() / common.GIB
        result["training_peak_gib"] = (common.peak_rss_bytes() - baseline_rss) / common.GIB
        result["baseline_rss_gib"] = baseline_rss / common.GIB
    if job["count_flops"]:
        result["flops_per_sample"] = count_flops_per_sample(job, module, images, texts)
    if job.get("profile_steps"):
        try:
            result["profile"] = profile_steps(step, job["profile_steps"], device)
        except Exception as error:  # e.g. no access to the GPU's counters: the timings above still count
            result["profile"] = {"error": f"{type(error).__name__}: {error}"}
    return result


# ---- the driver --------------------------------------------------------------------------------------


def runners(libraries: list[str], text_lengths: list[str]) -> dict[str, dict]:
    """What the alternating runs measure, by name: ours once per text length ("ours" trimmed as clip.train
    runs it, "ours, full text" all 77 positions), open_clip once (it always runs the whole context)."""
    measured = {}
    for library in libraries:
        if library == "ours":
            measured.update({ours_name(length): {"library": "ours", "text_length": length} for length in text_lengths})
        else:
            measured[library] = {"library": library}
    return measured


def ours_name(text_length: str) -> str:
    return "ours" if text_length == "trimmed" else "ours, full text"


def runner_name(job: dict) -> str:
    return ours_name(job.get("text_length", "trimmed")) if job["library"] == "ours" else job["library"]


class TimeShares:
    """Each run's timeout under a time limit for all of them: an equal share of what is left (left / runs
    still to go), at most the per-run limit. A library that runs first (or slowly) cannot use up the time of
    the ones after it, and a run that ends early leaves its time to the others."""

    def __init__(self, limit_s: float | None, runs: int) -> None:
        self.deadline = None if limit_s is None else time.monotonic() + limit_s
        self.runs_left = runs

    def next_timeout(self, run_limit_s: float) -> float:
        share = run_limit_s
        if self.deadline is not None:
            share = min(share, (self.deadline - time.monotonic()) / max(self.runs_left, 1))
        self.runs_left -= 1
        return share


def run_configuration(base_job: dict, measured: dict[str, dict], repeats: int, timeout_s: float,
                      profile_file: Path | None = None, profile_step_count: int = 0,
                      on_progress: Callable[[dict], None] | None = None,
                      time_shares: TimeShares | None = None) -> dict:
    """Alternates the runs named in `measured` (ABBA order) over `repeats` rounds; returns runs and medians
    per name. on_progress: called with the medians so far after every run (so a killed benchmark keeps them).
    time_shares: each run's timeout (else timeout_s)."""
    runs: dict[str, list[dict]] = {name: [] for name in measured}
    names = list(measured)
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            profiled = profile_file is not None and round_index == 0
            job = {**base_job, **measured[name], "profile_steps": profile_step_count if profiled else 0}
            run_timeout_s = timeout_s if time_shares is None else time_shares.next_timeout(timeout_s)
            if run_timeout_s >= 1:
                result = common.run_job(Path(__file__), job, run_timeout_s)
            else:
                result = {"error": "not run: the --time-limit was used up"}
            if "profile" in result:
                append_profile(profile_file, job, result.pop("profile"))
            runs[name].append(result)
            shown = result.get("error") or f"{result['samples_per_s']:.2f} samples/s, peak {result['peak_gib']:.2f} GiB"
            print(f"  {name}: {shown}", file=sys.stderr, flush=True)
            if on_progress is not None:
                on_progress(summarise(runs))
    return summarise(runs)


def rows_of(configuration: dict, summary: dict, text_lengths: list[str], device: torch.device,
            precision: str) -> list[dict]:
    """One row per text length of ours, each against the same open_clip runs."""
    rows = []
    for length in text_lengths:
        results = {name: summary[key] for name, key in (("ours", ours_name(length)), ("open_clip", "open_clip"))
                   if key in summary}
        row = {**configuration, "text_length": length, "results": results}
        add_comparisons(row, device, precision)
        rows.append(row)
    return rows


def summarise(runs: dict[str, list[dict]]) -> dict:
    summary = {}
    for library, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            summary[library] = {"error": results[0]["error"] if results else "not run", "runs": results}
            continue
        summary[library] = {
            key: common.median([r[key] for r in good])
            for key in ("samples_per_s", "samples_per_cpu_s", "peak_gib", "training_peak_gib", "flops_per_sample",
                        "warmup_s")
            if key in good[0]
        }
        summary[library].update(runs=results, caption_tokens=good[0]["caption_tokens"],
                                text_positions=good[0].get("text_positions"),
                                text_source=good[0]["text_source"], parameters=good[0]["parameters"])
    return summary


def append_profile(path: Path, job: dict, profile: dict) -> None:
    if "error" in profile:
        with path.open("a", encoding="utf-8") as file:
            file.write(f"== {runner_name(job)}: {display_name(job['arch'])}: profiling failed: {profile['error']} ==\n\n")
        return
    busy = profile.get("device_busy_fraction")
    heading = (f"== {runner_name(job)}: {display_name(job['arch'])}, batch {job['batch']}, {job['precision']}"
               f"{', compiled' if job['compile'] else ''}; {profile['steps']} profiled steps, "
               f"{profile['step_s'] * 1e3:.1f} ms/step under the profiler"
               + (f", device busy {busy:.0%} of the wall time" if busy is not None else "") + " ==")
    with path.open("a", encoding="utf-8") as file:
        file.write(f"{heading}\n{profile['table']}\n\n")


def add_comparisons(row: dict, device: torch.device, precision: str) -> None:
    ours, theirs = row["results"].get("ours", {}), row["results"].get("open_clip", {})
    memory_key = "training_peak_gib" if device.type == "cpu" else "peak_gib"
    row["speedup"] = common.ratio(ours.get("samples_per_s"), theirs.get("samples_per_s"))
    row["speedup_cpu_time"] = common.ratio(ours.get("samples_per_cpu_s"), theirs.get("samples_per_cpu_s"))
    row["memory_ratio"] = common.ratio(ours.get(memory_key), theirs.get(memory_key))
    if device.type == "cuda":
        from clip.throughput import peak_flops

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        # Each against the peak of the units its float32 matrix work ran on: open_clip's with TF32 (measure_step
        # turns it on for open_clip alone, as its trainer does), whose fp32 MFU read 7x too high against plain fp32's
        for result, tf32 in ((ours, False), (theirs, True)):
            peak = peak_flops(device, dtype, tf32=tf32)
            if peak and "flops_per_sample" in result:
                result["mfu"] = result["flops_per_sample"] * result["samples_per_s"] / peak


def format_rows(rows: list[dict], device_type: str) -> str:
    on_cpu = device_type == "cpu"
    memory_label = "training peak GiB" if on_cpu else "peak GiB"
    memory_key = "training_peak_gib" if on_cpu else "peak_gib"
    table = []
    for row in rows:
        cells = []
        for library in ("ours", "open_clip"):
            result = row["results"].get(library)
            if result is None or "error" in result:
                cells += [result["error"] if result else "-", *[""] * (2 if on_cpu else 1)]
                continue
            mfu = f" ({result['mfu']:.0%} MFU)" if "mfu" in result else ""
            cpu_cells = [f"{result['samples_per_cpu_s']:.2f}"] if on_cpu else []
            cells += [f"{result['samples_per_s']:.2f}{mfu}", *cpu_cells, f"{result[memory_key]:.2f}"]
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        speedup_cpu = [f"{row['speedup_cpu_time']:.2f}x" if row.get("speedup_cpu_time") else "-"] if on_cpu else []
        memory = f"{row['memory_ratio']:.2f}x" if row.get("memory_ratio") else "-"
        table.append([display_name(row["arch"]), row["batch"], row["threads"] or "default", row["precision"],
                      compile_cell(row), text_positions(row), *cells, speedup, *speedup_cpu, memory])
    # On a GPU the CPU time mostly measures the host waiting for the device: the columns would mislead.
    cpu_columns = ["samples/CPU-s"] if on_cpu else []
    headers = ["arch", "batch", "threads", "precision", "compile", "text positions (ours / open_clip)",
               "ours samples/s", *[f"ours {c}" for c in cpu_columns], f"ours {memory_label}",
               "open_clip samples/s", *[f"open_clip {c}" for c in cpu_columns], f"open_clip {memory_label}",
               "speed ratio", *(["CPU-time ratio"] if on_cpu else []), "memory ratio"]
    return common.markdown_table(headers, table)


def compile_cell(row: dict) -> str:
    if not row["compile"]:
        return "no"
    return "yes (ours: each block)" if row.get("compile_scope") == "blocks" else "yes"


def text_positions(row: dict) -> str:
    """The text positions each library's text tower ran, e.g. "32 / 77" (ours trimmed)."""
    return " / ".join(str(row["results"].get(library, {}).get("text_positions") or "-")
                      for library in ("ours", "open_clip"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B/32", "RN50"],
                        help="released names, or ModelConfig dicts as JSON (open_clip then builds the same numbers)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[16, 32])
    parser.add_argument("--threads", type=non_negative_int, nargs="+", default=[os.cpu_count() or 1],
                        help="torch intra-op threads, the same for both libraries (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="autocast dtype (default: fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="fresh-process runs per library; the median counts")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per run")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                        help="with --compile, what of ours is compiled: the whole model, as clip.train does, or each "
                             "residual attention block alone (regional compilation; the rest eager). open_clip's "
                             "whole model either way")
    parser.add_argument("--cpu-malloc", choices=["trainers", "both", "neither"], default="trainers",
                        help="on the CPU, which processes keep freed memory for the next step (clip.cpu_memory): "
                             "'trainers' ours only, as clip.train does and open_clip's trainer does not; 'both' "
                             "open_clip too (any PyTorch process can: what the setting alone is worth)")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                        help="our build_optimizer's implementation")
    parser.add_argument("--text-length", nargs="+", choices=["trimmed", "full"], default=["trimmed"],
                        help="ours: trimmed to the batch's last end-of-text token as clip.train does, or the whole "
                             "context, the same inputs as open_clip's; both measure ours twice, each against the "
                             "same open_clip runs (one row each)")
    parser.add_argument("--grad-clip-norm", type=float, default=None, help="clip gradients in both (default: off)")
    parser.add_argument("--count-flops", action="store_true", help="count model FLOPs (default: on CUDA only)")
    parser.add_argument("--profile", type=Path, help="append a torch.profiler summary of each first run to this file")
    parser.add_argument("--profile-steps", type=positive_int, default=3, help="steps profiled (after the timed ones)")
    parser.add_argument("--job-timeout", type=common.positive_seconds, default=1800.0, help="seconds before one run is abandoned")
    parser.add_argument("--time-limit", type=common.positive_seconds, default=None,
                        help="seconds for all the runs: each run's timeout is then at most an equal share of what is "
                             "left (gpu.sh: so that open_clip, compiled after ours, gets as much time as ours did)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    check_archs(parser, args.archs)
    if args.compile_scope != "model" and not args.compile:
        parser.error(f"--compile-scope {args.compile_scope} applies to compiled runs: add --compile")
    common.check_output_file(parser, "--json", args.json)
    common.check_output_file(parser, "--profile", args.profile)

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    libraries, skipped = list(args.libraries), {}
    if "open_clip" in libraries and importlib_missing("open_clip"):
        skipped["open_clip"] = OPEN_CLIP_MISSING
        print(f"{OPEN_CLIP_MISSING}; measuring ours only", file=sys.stderr)
        libraries.remove("open_clip")
    if args.profile:
        args.profile.write_text("")  # this run's profiles only
    # Without ours, the text length changes nothing: one row per configuration.
    text_lengths = list(dict.fromkeys(args.text_length))[:None if "ours" in libraries else 1]
    report = {"machine": common.machine_info(), "device": str(device), "repeats": args.repeats,
              "warmup": args.warmup, "steps": args.steps, "optimizer": args.optimizer, "cpu_malloc": args.cpu_malloc,
              "grad_clip_norm": args.grad_clip_norm, "text_lengths": text_lengths, "skipped_libraries": skipped}
    measured = runners(libraries, text_lengths)
    run_count = len(args.archs) * len(args.batch_sizes) * len(args.threads) * args.repeats * len(measured)
    time_shares = TimeShares(args.time_limit, run_count)
    rows = []
    for arch in args.archs:
        for batch in args.batch_sizes:
            for threads in args.threads:
                print(f"{display_name(arch)}, batch {batch}, {threads or 'default'} threads, {precision}:",
                      file=sys.stderr, flush=True)
                base_job = {"arch": arch, "batch": batch, "threads": threads, "device": str(device),
                            "precision": precision, "warmup": args.warmup, "steps": args.steps,
                            "compile": args.compile, "optimizer": args.optimizer, "seed": args.seed,
                            "compile_scope": args.compile_scope,
                            "cpu_malloc": args.cpu_malloc,
                            "grad_clip_norm": args.grad_clip_norm,
                            "count_flops": args.count_flops or device.type == "cuda"}
                configuration = {key: base_job[key] for key in ("arch", "batch", "threads", "precision", "compile")}
                if args.compile and args.compile_scope != "model":
                    configuration["compile_scope"] = args.compile_scope

                def write_json(summary: dict, configuration: dict = configuration) -> None:
                    # After every run (the last call has the final medians), so a benchmark stopped by a
                    # timeout keeps what it measured.
                    if args.json:
                        current = rows_of(configuration, summary, text_lengths, device, precision)
                        common.write_json(args.json, {**report, "rows": [*rows, *current]})

                summary = run_configuration(base_job, measured, args.repeats, args.job_timeout,
                                            args.profile, args.profile_steps, on_progress=write_json,
                                            time_shares=time_shares)
                rows.extend(rows_of(configuration, summary, text_lengths, device, precision))
    print(format_rows(rows, device.type))
    return 0


def check_archs(parser: argparse.ArgumentParser, archs: list[str]) -> None:
    """A usage error for a name that is no architecture, before any run: each fresh-process run found it
    in turn otherwise, and the script ended as if it had measured something."""
    for arch in archs:
        try:
            model_config(arch)
        except (ValueError, TypeError, KeyError) as error:  # an unknown name, bad JSON, a bad config field
            parser.error(f"--archs {arch!r}: {error}")


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
