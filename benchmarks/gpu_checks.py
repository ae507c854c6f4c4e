"""Correctness checks of the code paths that only a GPU exercises, for benchmarks/gpu.sh (a few seconds each,
on a tiny model):

  1. gradient accumulation with patch dropout under torch.compile: each micro-batch's gradient pass must
     compute the image features its caching pass cached, bit for bit on the CPU, within float32 rounding on
     a GPU (far below what another mask changes): the trainer replays the CUDA generator, which on the CPU
     the tests check and on CUDA only a GPU can;
  2. PixelNormalizer on the device: the same values as on the CPU, channels-last kept; a non-finite step
     skipped on the device (clip.step_verdict) leaves every weight, moment and statistic as it was;
  3. the trainer itself (clip.train.train, a few steps of a tiny model, data through a worker and pinned
     memory) in the combinations whose GPU paths the CPU tests cannot reach: bf16 ViT with accumulation,
     patch dropout and gradient checkpointing; a channels-last ResNet, partly locked, with accumulation;
     fp16 with gradient clipping (the gradient scaler with fused AdamW); bf16 with verdicts read a step
     late; TF32 with torch.compile (CUDA
     only, run last: compiling is the slowest); and a run stopped and resumed against an uninterrupted one
     (GPU kernels are not bitwise reproducible: within a tenth of what the last two steps changed). Each
     its own check, the JSON written after every one. Needs the BPE merges file in $CLIP_CACHE_DIR; skipped
     without it.

    python benchmarks/gpu_checks.py --device cuda --json checks.json

Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

import clip.train_step as train_module
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.data import PixelNormalizer
from clip.loss import LossConfig, build_loss
from clip.model import CLIP
from clip.run_log import replaced_atomically

TINY_VIT = ModelConfig(
    embed_dim=32,
    vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=64, layers=2, heads=2),
    text=TextConfig(context_length=16, vocab_size=100, width=64, layers=2, heads=2),
)


def replayed_patch_dropout(device: torch.device, compile: bool) -> dict:
    """The largest |recomputed - cached| image feature over three micro-batches (0 on the CPU when the replay
    holds; see replay_tolerance)."""
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
    feature_scale = max(cached.float().abs().max().item() for cached, _ in pairs)
    # Not a vacuous match: the same images encoded twice without the replay keep different patches, and the
    # features move by about that much where a replay goes wrong.
    with torch.no_grad():
        once, again = (module.clip.encode_image(images[:4], normalize=True) for _ in range(2))  # as the step has them
        wrong_mask_difference = (once - again).abs().max().item()
    tolerance = replay_tolerance(device, compile, feature_scale)
    return {
        "max_difference": difference, "tolerance": tolerance, "micro_batches": len(pairs),
        "feature_scale": feature_scale, "wrong_mask_difference": wrong_mask_difference,
        "ok": difference <= tolerance and wrong_mask_difference > 100 * tolerance,
    }


def replay_tolerance(device: torch.device, compile: bool, feature_scale: float) -> float:
    """How far a recomputed micro-batch's image features may be from the cached ones when the replay holds.

    CPU, eager: the very same kernels in both passes, so bit for bit. CUDA, eager: the caching pass runs
    without grad and the gradient pass with it, and a GPU operator may run another kernel when its inputs
    require grad (scaled_dot_product_attention's then also computes the log-sum-exp its backward needs),
    which may sum in another order. In float32 that is a rounding of ~1e-7 of the values, compounded over
    the tiny model's two layers to ~1e-6 at most: 1e-4 of the features' size (their largest component, ~0.5
    for these unit vectors) leaves it a margin of 100, while a wrong mask moves them by about a quarter of
    their size (0.13 of 0.52 on the CPU; checked: the masks' own difference must exceed 100x the tolerance,
    2500x here). A zero tolerance there could fail a correct replay. Compiled: the caching and gradient
    passes are different graphs, whose fusions may round differently: 1e-4 (absolute; run before the trainer
    runs turn TF32 on)."""
    if compile:
        return 1e-4
    return 0.0 if device.type == "cpu" else 1e-4 * feature_scale


def normalizer_on_device(device: torch.device) -> dict:
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    on_cpu = PixelNormalizer("cpu")(pixels)
    channels_last = pixels.to(device).contiguous(memory_format=torch.channels_last)
    on_device = PixelNormalizer(device)(channels_last)
    difference = (on_device.cpu() - on_cpu).abs().max().item()
    kept = on_device.is_contiguous(memory_format=torch.channels_last)
    return {"max_difference": difference, "channels_last_kept": kept, "ok": difference <= 1e-6 and kept}


def step_skipped_on_device(device: torch.device) -> dict:
    """clip.step_verdict on the device: a step whose loss is not finite, skipped by the fused AdamW's found_inf
    flag, leaves the weights, the moments, the step counts and the BatchNorm statistics exactly as they were,
    and its verdict comes through pinned memory once the next step is launched; a finite step is the plain
    optimiser step (within float32 rounding: cuBLAS may pick other kernels for the two copies)."""
    import copy

    from torch import nn

    from clip.distributed import DistributedInfo, agreement_flags
    from clip.step_verdict import VerdictInFlight, step_or_skip_on_device
    from clip.train import gradient_norm

    torch.manual_seed(0)
    one_process = DistributedInfo(rank=0, world_size=1, local_rank=0, device=device)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    snapshot = train_module.BatchNormSnapshot(model)

    def state(of_model, of_optimizer) -> list[torch.Tensor]:
        moments = [t for values in of_optimizer.state.values() for t in values.values()]
        return [t.detach().clone() for t in [*of_model.parameters(), *of_model.buffers(), *moments]]

    def step(inputs: torch.Tensor) -> VerdictInFlight:
        snapshot.take()
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs).square().mean()
        loss.backward()
        flags = agreement_flags(torch.isfinite(loss.detach()), gradient_norm(model, None), False, one_process)
        step_or_skip_on_device(optimizer, flags, snapshot)
        return VerdictInFlight(0, flags, loss.detach())

    step(torch.randn(16, 8, device=device)).read()  # moments and counts for the skip to keep
    before = state(model, optimizer)
    bad = torch.randn(16, 8, device=device)
    bad[0, 0] = float("inf")
    skipped = step(bad)
    # a copy of everything after the skip, to compare with `before` and to take the next step the plain way
    plain_model = copy.deepcopy(model)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=0.1, fused=True)
    plain_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # deep: loading shares the moments
    kept = all(torch.equal(a, b) for a, b in zip(before, state(plain_model, plain_optimizer), strict=True))
    good = torch.randn(16, 8, device=device)
    taken = step(good)  # launched before the skipped step's verdict is read, as the trainer does
    verdicts = (skipped.read().skipped, taken.read().skipped)
    plain_optimizer.zero_grad(set_to_none=True)
    plain_model(good).square().mean().backward()
    plain_optimizer.step()
    difference = max((a.float() - b.float()).abs().max().item()
                     for a, b in zip(state(model, optimizer), state(plain_model, plain_optimizer)))
    return {"ok": kept and verdicts == (True, False) and difference <= 1e-6, "skipped_step_left_all_as_it_was": kept,
            "verdicts_skipped": verdicts, "taken_step_vs_plain_step": difference}


TRAINER_BASE = [
    "model.embed_dim=32", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=64",
    "model.vision.layers=2", "model.vision.heads=2", "model.text.width=64", "model.text.layers=2",
    "model.text.heads=2", "train.batch_size=16", "schedule.steps=4", "schedule.warmup_steps=1",
    "checkpoint.every_n_steps=2", "checkpoint.keep_last=3", "logging.every_n_steps=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.plot=false", "data.workers=1", "eval.every_n_steps=0", "eval.zeroshot=[]",
]
RESNET = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=16"]
TRAINER_CASES = {
    "bf16_vit_accumulation_patch_dropout_checkpointing": ["train.precision=bf16", "train.accumulation_steps=2",
                                                          "train.patch_dropout=0.5", "train.grad_checkpointing=true"],
    "bf16_resnet_partly_locked_accumulation": [*RESNET, "train.precision=bf16", "train.accumulation_steps=2",
                                               "train.lock_image=true", "train.lock_image_unlocked_layers=1"],
    "fp16_clipped": ["train.precision=fp16", "optimizer.grad_clip_norm=1.0"],
    # steps 1 and 2 log nothing: their verdicts are read a step late (clip.step_verdict)
    "bf16_verdicts_read_late": ["train.precision=bf16", "logging.every_n_steps=3", "checkpoint.every_n_steps=0"],
    "tf32_compiled": ["train.precision=fp32", "train.tf32=true", "train.compile=true"],
}


class TrainerRuns:
    """Runs of clip.train.train on the device, each in a folder of its own under `folder`."""

    def __init__(self, device: torch.device, folder: str) -> None:
        self.device, self.folder = device, folder

    def run(self, name: str, extra: list[str], stop_at_step: int | None = None) -> dict:
        from pathlib import Path

        from clip.config import TrainConfig, load_config
        from clip.train import train

        recipe = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
        overrides = [*TRAINER_BASE, f"train.device={self.device}", *extra, f"output_dir={Path(self.folder) / name}"]
        return train(load_config(recipe, overrides, TrainConfig), stop_at_step=stop_at_step)

    def case(self, name: str) -> dict:
        """One TRAINER_CASES run: its 4 steps taken, with finite losses throughout."""
        import math

        final = self.run(name, TRAINER_CASES[name])
        if final["step"] != 4:  # gpu.sh's timeout sends SIGTERM: the trainer checkpoints and returns early
            return {"ok": False, "stopped_at_step": final["step"], "why": "stopped early (a signal: the timeout?)"}
        finite = math.isfinite(final["loss"]) and final.get("nonfinite_steps_total") == 0
        return {"ok": finite, "loss": final["loss"], "nonfinite_steps": final.get("nonfinite_steps_total")}

    def resume_matches_straight_run(self) -> dict:
        """A run stopped at step 2 and resumed against an uninterrupted one, measured against what steps 3 and
        4 changed: GPU kernels are not bitwise reproducible, but a resume that lost its state (weights, moments,
        RNG, data position) differs by about as much as those steps' updates, a correct one by about the
        run-to-run noise of two uninterrupted runs."""
        from pathlib import Path

        from clip import checkpoint as ckpt

        extra = ["train.precision=bf16", "train.accumulation_steps=2", "train.patch_dropout=0.5"]
        self.run("straight", extra)
        self.run("straight_again", extra)
        self.run("resumed", extra, stop_at_step=2)
        self.run("resumed", extra)

        def weights(run: str, step: int) -> dict:
            state = ckpt.read_checkpoint(ckpt.checkpoint_path(Path(self.folder) / run, step))["model"]
            return {k: v.float() for k, v in state.items() if v.is_floating_point()}

        def largest_difference(a: dict, b: dict) -> float:
            return max((a[k] - b[k]).abs().max().item() for k in a)

        straight, at_step_2 = weights("straight", 4), weights("straight", 2)
        difference = largest_difference(straight, weights("resumed", 4))
        update = largest_difference(straight, at_step_2)
        # Two uninterrupted runs differ by the kernels' own run-to-run noise (cuDNN's chosen algorithms, atomic
        # adds; AdamW can turn a near-zero gradient's noise into a whole step): the resume may differ by a few
        # times that, and a resume that lost its state by about the last steps' update, far more.
        noise = largest_difference(straight, weights("straight_again", 4))
        tolerance = 4 * noise  # bit for bit where the kernels are deterministic (the CPU)
        if self.device.type == "cuda":
            # Two straight runs may happen to agree bit for bit on a GPU while the resumed one, whose kernels
            # saw other workspaces, does not: 1% of the last steps' update is far below what a lost state costs
            tolerance = max(tolerance, update / 100)
        return {"ok": update > 10 * noise and difference <= tolerance, "max_difference": difference,
                "run_to_run_noise": noise, "update_in_steps_3_and_4": update, "tolerance": tolerance}


def trainer_checks(device: torch.device, compile: bool, folder: str) -> dict:
    """name -> check (a callable giving its result) for the trainer runs; the compiled one last (the slowest)."""
    from clip.download import cache_dir

    if not (cache_dir() / "bpe_simple_vocab_16e6.txt.gz").exists():
        return {"trainer": lambda: {"ok": True, "skipped": f"no BPE merges file in {cache_dir()}"}}
    runs = TrainerRuns(device, folder)
    checks = {f"trainer_{name}": (lambda name=name: runs.case(name))
              for name, extra in TRAINER_CASES.items() if "train.compile=true" not in extra}
    checks["trainer_resume_matches_straight_run"] = runs.resume_matches_straight_run
    for name, extra in TRAINER_CASES.items():
        if "train.compile=true" in extra:
            skipped = {"ok": True, "skipped": "CUDA with torch.compile only"}
            run_it = device.type == "cuda" and compile
            checks[f"trainer_{name}"] = (lambda name=name: runs.case(name)) if run_it else (lambda s=skipped: s)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="check the replay in eager mode only")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    folder = tempfile.TemporaryDirectory()
    checks = {
        "patch_dropout_replay_eager": lambda: replayed_patch_dropout(device, compile=False),
        "normalizer": lambda: normalizer_on_device(device),
        "step_skipped_on_device": lambda: step_skipped_on_device(device),
    }
    if not args.no_compile:  # before the trainer runs: their TF32 case leaves TF32 on for the process
        checks["patch_dropout_replay_compiled"] = lambda: replayed_patch_dropout(device, compile=True)
    checks.update(trainer_checks(device, not args.no_compile, folder.name))
    results = {}
    with folder:
        for name, check in checks.items():
            try:
                results[name] = check()
            except Exception as error:  # reported, and the other checks still run
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(f"{'OK  ' if results[name]['ok'] else 'FAIL'} {name}: {results[name]}", flush=True)
            if args.json:  # after every check: what a timeout cuts short leaves the checks done so far
                with replaced_atomically(args.json) as file:  # a kill mid-write leaves the previous file whole
                    json.dump({"device": str(device), "checks": results}, file, indent=1)
    return 0 if all(result["ok"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
