"""Correctness checks of the code paths that only a GPU exercises, for benchmarks/gpu.sh (a few seconds each,
on a tiny model):

  1. gradient accumulation with patch dropout under torch.compile: each micro-batch's gradient pass must
     compute exactly the image features its caching pass cached (the trainer replays the CUDA generator;
     on the CPU the tests check this, on CUDA only a GPU can);
  2. PixelNormalizer on the device: the same values as on the CPU, channels-last kept.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="check the replay in eager mode only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {
        "patch_dropout_replay_eager": replayed_patch_dropout(device, compile=False),
        "normalizer": normalizer_on_device(device),
    }
    if not args.no_compile:
        results["patch_dropout_replay_compiled"] = replayed_patch_dropout(device, compile=True)
    for name, result in results.items():
        print(f"{'OK  ' if result['ok'] else 'FAIL'} {name}: {result}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": str(device), "checks": results}, file, indent=1)
    return 0 if all(result["ok"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
