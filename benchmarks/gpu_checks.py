"""Correctness checks of the code paths that only a GPU exercises, for benchmarks/gpu.sh (a few seconds each,
on a tiny model):

  1. gradient accumulation with patch dropout under torch.compile: each micro-batch's gradient pass must
     compute exactly the image features its caching pass cached (the trainer replays the CUDA generator;
     on the CPU the tests check this, on CUDA only a GPU can);
  2. PixelNormalizer on the device: the same values as on the CPU, channels-last kept;
  3. the trainer itself (clip.train.train, a few steps of a tiny model, data through a worker and pinned
     memory) in the combinations whose GPU paths the CPU tests cannot reach: bf16 ViT with accumulation,
     patch dropout and gradient checkpointing; a channels-last ResNet, partly locked, with accumulation;
     fp16 with gradient clipping (the gradient scaler with fused AdamW); TF32 with torch.compile (CUDA
     only); and a run stopped and resumed against an uninterrupted one (GPU kernels are not bitwise
     reproducible: compared with a tolerance). Needs the BPE merges file in $CLIP_CACHE_DIR; skipped
     without it.

    python benchmarks/gpu_checks.py --device cuda --json checks.json

Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

import clip.train_step as train_module
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.data import PixelNormalizer
from clip.loss import LossConfig, build_loss
from clip.model import CLIP

TINY_VIT = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=64, layers=2, heads=2),
    text=TextConfig(context_length=16, vocab_size=100, width=64, layers=2, heads=2),
)


def replayed_patch_dropout(device: torch.device, compile: bool) -> dict:
    """The largest |recomputed - cached| image feature over three micro-batches (0 when the replay holds)."""
    torch.manual_seed(0)
    module = train_module.ContrastiveModel(CLIP(TINY_VIT), with_logit_bias=False).to(device)
    module.clip.set_patch_dropout(0.5)
    runner = torch.compile(module) if compile else module
    pairs = []
    real = train_module.contrastive_loss_with_cached_features

    def spy(loss_fn, cached_images, cached_texts, image_features, text_features, index, *args):
        rows = slice(index * len(image_features), (index + 1) * len(image_features))
        pairs.append((cached_images[rows].detach(), image_features.detach()))
        return real(loss_fn, cached_images, cached_texts, image_features, text_features, index, *args)

    train_module.contrastive_loss_with_cached_features = spy
    try:
        images = torch.randn(12, 3, 32, 32, device=device)
        texts = torch.randint(1, 99, (12, 16), device=device)
        texts[:, -1] = 99
        for _ in range(2):  # the second step runs the compiled graphs again
            pairs.clear()
            train_module.contrastive_step(
                runner, images, texts, 3, build_loss(LossConfig()), contextlib.nullcontext,
                lambda loss: loss.backward(), False,
            )
    finally:
        train_module.contrastive_loss_with_cached_features = real
    difference = max((cached.float() - recomputed.float()).abs().max().item() for cached, recomputed in pairs)
    # Not a vacuous match: the same images encoded twice without the replay keep different patches.
    with torch.no_grad():
        masks_are_random = not torch.equal(module.clip.encode_image(images[:4]), module.clip.encode_image(images[:4]))
    # Eager: the very same kernels, so bit for bit. Compiled: the caching pass (no grad) and the gradient pass
    # are different graphs, whose fusions may round differently; a wrong mask moves features by far more.
    tolerance = 1e-4 if compile else 0.0
    return {
        "max_difference": difference, "tolerance": tolerance, "micro_batches": len(pairs),
        "masks_are_random": masks_are_random, "ok": difference <= tolerance and masks_are_random,
    }


def normalizer_on_device(device: torch.device) -> dict:
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    on_cpu = PixelNormalizer("cpu")(pixels)
    channels_last = pixels.to(device).contiguous(memory_format=torch.channels_last)
    on_device = PixelNormalizer(device)(channels_last)
    difference = (on_device.cpu() - on_cpu).abs().max().item()
    kept = on_device.is_contiguous(memory_format=torch.channels_last)
    return {"max_difference": difference, "channels_last_kept": kept, "ok": difference <= 1e-6 and kept}


TRAINER_BASE = [
    "model.embed_dim=32", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=64",
    "model.vision.layers=2", "model.vision.heads=2", "model.text.width=64", "model.text.layers=2",
    "model.text.heads=2", "train.batch_size=16", "schedule.steps=4", "schedule.warmup_steps=1",
    "checkpoint.every_n_steps=2", "logging.every_n_steps=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.plot=false", "data.workers=1", "eval.every_n_steps=0", "eval.zeroshot=[]",
]
RESNET = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=16"]
TRAINER_CASES = {
    "bf16_vit_accumulation_patch_dropout_checkpointing": ["train.precision=bf16", "train.accumulation_steps=2",
                                                          "train.patch_dropout=0.5", "train.grad_checkpointing=true"],
    "bf16_resnet_partly_locked_accumulation": [*RESNET, "train.precision=bf16", "train.accumulation_steps=2",
                                               "train.lock_image=true", "train.lock_image_unlocked_layers=1"],
    "fp16_clipped": ["train.precision=fp16", "optimizer.grad_clip_norm=1.0"],
    "tf32_compiled": ["train.precision=fp32", "train.tf32=true", "train.compile=true"],
}


def trainer_runs(device: torch.device, compile: bool) -> dict:
    """Each TRAINER_CASES run (finished, finite loss), and a stopped-and-resumed run against a straight one."""
    import math
    import tempfile
    from pathlib import Path

    from clip import checkpoint as ckpt
    from clip.config import TrainConfig, load_config
    from clip.download import cache_dir
    from clip.train import train

    if not (cache_dir() / "bpe_simple_vocab_16e6.txt.gz").exists():
        return {"ok": True, "skipped": f"no BPE merges file in {cache_dir()}"}
    recipe = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        def run(name: str, extra: list[str], stop_at_step: int | None = None) -> dict:
            overrides = [*TRAINER_BASE, f"train.device={device}", *extra, f"output_dir={Path(folder) / name}"]
            return train(load_config(recipe, overrides, TrainConfig), stop_at_step=stop_at_step)

        for name, extra in TRAINER_CASES.items():
            if "train.compile=true" in extra and (device.type != "cuda" or not compile):
                results[name] = {"ok": True, "skipped": "CUDA with torch.compile only"}
                continue
            try:
                final = run(name, extra)
                results[name] = {"ok": final["step"] == 4 and math.isfinite(final["loss"]), "loss": final["loss"],
                                 "nonfinite_steps": final.get("nonfinite_steps_total")}
            except Exception as error:  # reported, and the other cases still run
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        try:
            resumed = ["train.precision=bf16", "train.accumulation_steps=2", "train.patch_dropout=0.5"]
            run("straight", resumed)
            run("resumed", resumed, stop_at_step=2)
            run("resumed", resumed)
            straight, again = (ckpt.read_checkpoint(ckpt.list_checkpoints(Path(folder) / run_name)[0][1])["model"]
                               for run_name in ("straight", "resumed"))
            difference = max((straight[k].float() - again[k].float()).abs().max().item()
                             for k in straight if straight[k].is_floating_point())
            tolerance = 0.0 if device.type == "cpu" else 1e-2  # bf16 weights after 4 steps at lr 1e-3
            results["resume_matches_straight_run"] = {"ok": difference <= tolerance, "max_difference": difference,
                                                      "tolerance": tolerance}
        except Exception as error:
            results["resume_matches_straight_run"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    return {"ok": all(result["ok"] for result in results.values()), "cases": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="check the replay in eager mode only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    checks = {
        "patch_dropout_replay_eager": lambda: replayed_patch_dropout(device, compile=False),
        "normalizer": lambda: normalizer_on_device(device),
    }
    if not args.no_compile:
        checks["patch_dropout_replay_compiled"] = lambda: replayed_patch_dropout(device, compile=True)
    checks["trainer"] = lambda: trainer_runs(device, compile=not args.no_compile)
    results = {}
    for name, check in checks.items():
        results[name] = check()
        print(f"{'OK  ' if results[name]['ok'] else 'FAIL'} {name}: {results[name]}", flush=True)
        if args.json:  # after every check: what a timeout cuts short leaves the checks done so far
            with open(args.json, "w", encoding="utf-8") as file:
                json.dump({"device": str(device), "checks": results}, file, indent=1)
    return 0 if all(result["ok"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
