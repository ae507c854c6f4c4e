"""What the training step's one host sync costs: one model, one optimiser, one batch, the step timed three ways
in the same process (so a compiled model is compiled once):

  host:      the losses' and the gradient norm's finiteness read on the host after the backward pass (one
             device sync per step), and the optimiser stepped only when they are finite: clip.train's way
             before clip.step_verdict, and still with a non-fused optimiser;
  on-device: clip.train's way with the fused AdamW (clip.step_verdict): the same verdict handed to the
             optimiser as its `found_inf` flag (its kernel skips the update when it is set), and read on the
             host a step later;
  unchecked: neither the verdict nor the gradient norm computed (the bound: what checking costs at all).

    python benchmarks/step_sync.py --device cuda --arch ViT-B/16 --batch 256 --compile default
    python benchmarks/step_sync.py --device cuda --compile reduce-overhead   # CUDA graphs
    python benchmarks/step_sync.py --arch '{"embed_dim": 64, ...}' --batch 8 --steps 3   # a CPU smoke run

Rounds alternate the variants (ABBA order); the median of --repeats timings of --steps steps each is reported
with MFU (FLOPs counted as benchmarks/train_step.py counts them). --profile-steps N adds, for each variant, the
fraction of the wall time the device was busy over N more steps. Prints one JSON object; --json also writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import train_step  # noqa: E402

from clip.cli.common import positive_int  # noqa: E402

VARIANTS = ("host", "on-device", "unchecked")


def make_steps(module, runner, optimizer, loss_fn, logit_scale, images, texts, dtype, cuda_graphs: bool):
    """{variant: step function} over the same module and optimiser."""
    from clip.distributed import DistributedInfo, agreement_flags
    from clip.train import gradient_norm
    from clip.train_step import BatchNormSnapshot, contrastive_step

    device = images.device
    one_process = DistributedInfo(rank=0, world_size=1, local_rank=0, device=device)
    batch_norms = BatchNormSnapshot(module)
    in_flight = []

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def forward_backward():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        batch_norms.take()
        optimizer.zero_grad(set_to_none=True)
        losses_finite = []

        def backward(loss):
            losses_finite.append(torch.isfinite(loss.detach()))
            loss.backward()

        loss, _ = contrastive_step(runner, images, texts, 1, loss_fn, autocast, backward, False)
        return loss, losses_finite

    def finish():
        with torch.no_grad():
            logit_scale.clamp_(0, train_step.MAX_LOG_LOGIT_SCALE)

    def judged(waiting: list | None):
        """A step judged as clip.train does: on the host at once (None), or on the device and read late."""
        def step():
            loss, losses_finite = forward_backward()
            flags = agreement_flags(torch.stack(losses_finite).all(), gradient_norm(module, None), False, one_process)
            train_step.take_or_skip(optimizer, flags, loss, batch_norms, waiting)
            finish()
            return loss

        return step

    def unchecked():
        loss, _ = forward_backward()
        optimizer.step()
        finish()
        return loss

    # host: clip.train before clip.step_verdict, and still its way with a non-fused optimiser
    return {"host": judged(None), "on-device": judged(in_flight), "unchecked": unchecked}


def busy_fraction(step, steps: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    report = train_step.profile_steps(step, steps, device)
    return report.get("device_busy_fraction")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="ViT-B/16")
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default="default")
    parser.add_argument("--warmup", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--profile-steps", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    if device.type == "cuda":
        from clip.cuda_backends import configure_cuda_backends

        configure_cuda_backends(allow_tf32=False)  # as clip.train's default
    config = train_step.model_config(args.arch)
    torch.manual_seed(0)
    images = common.make_images(args.batch, config.vision.image_size, 0).to(device)
    from clip.model import trim_text_batch

    texts, text_source = common.caption_token_ids(args.batch, 0, config.text.context_length)
    texts = trim_text_batch(texts).to(device)
    module, optimizer, loss_fn, logit_scale = train_step.build_ours(args.arch, device, "fused")
    module.train()
    runner = module if args.compile == "none" else torch.compile(module, mode=args.compile)
    steps = make_steps(module, runner, optimizer, loss_fn, logit_scale, images, texts, dtype,
                       cuda_graphs=args.compile == "reduce-overhead")

    result = {"arch": args.arch, "batch": args.batch, "precision": precision, "compile": args.compile,
              "device": str(device), "text_positions": texts.shape[1], "text_source": text_source,
              "torch": torch.__version__, "variants": {}}
    started = time.perf_counter()
    losses = []
    for name in VARIANTS:  # every variant's own first calls (compilation) before any timing
        for _ in range(args.warmup):
            losses.append(steps[name]())
    common.synchronize(device)
    result["warmup_s"] = time.perf_counter() - started
    job = {"library": "ours", "arch": args.arch}
    result["flops_per_sample"] = train_step.count_flops_per_sample(job, module, images, texts)
    peak = None
    if device.type == "cuda":
        from clip.throughput import peak_flops

        peak = peak_flops(device, dtype or torch.float32)
    timings = {name: [] for name in VARIANTS}
    for round_index in range(args.repeats):
        for name in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
            wall_s, _ = common.time_calls(lambda: losses.append(steps[name]()), args.steps, device)
            timings[name].append(wall_s / args.steps)
            print(f"{name}: {wall_s / args.steps * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
    for name in VARIANTS:
        step_s = common.median(timings[name])
        samples_per_s = args.batch / step_s
        variant = {"step_ms": step_s * 1e3, "samples_per_s": samples_per_s, "runs_ms": [t * 1e3 for t in timings[name]]}
        if peak:
            variant["mfu"] = result["flops_per_sample"] * samples_per_s / peak
        if args.profile_steps:
            variant["device_busy_fraction"] = busy_fraction(steps[name], args.profile_steps, device)
        result["variants"][name] = variant
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / common.GIB
    result["losses_finite"] = bool(torch.isfinite(torch.stack(losses)).all())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
