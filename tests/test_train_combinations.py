"""The trainer's options combined: equivalences that must hold whatever else is set (accumulation, gradient
checkpointing, the chunked loss, 2 ranks against 1), locked towers under accumulation and bf16, the weight
decay each group really gets, the logged learning rates across a resume, and the temperature's bound.

The full pairwise sweep of options (every pair trains a few steps with a finite loss, or is refused at config
time in one line) is too slow for the suite; run it as a script:

    CLIP_CACHE_DIR=/tmp/clip-cache python tests/test_train_combinations.py OUT_DIR [--compile] [--only TEXT]

On 2026-11-30 it printed 130 "ok" and 2 "refused" (patch dropout with a locked image tower, and with a
ResNet), and with --compile --only compile 17 "ok"; on 2026-12-01, with partly locked towers and the constant
schedules added, 197 "ok" and 3 "refused" (patch dropout with a partly locked image tower too). What it found (the first step's logits scaled past
loss.max_logit_scale) and the equivalences that were not tested elsewhere are the tests below.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from clip import checkpoint as ckpt
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.config import LossConfig, OptimizerConfig, ScheduleConfig, TrainConfig, load_config
from clip.loss import build_loss
from clip.model import CLIP
from clip.optim import build_optimizer, is_decayed, learning_rate
from clip.train import train
from clip.train_step import ContrastiveModel, contrastive_step

DEMO = Path(__file__).parent.parent / "configs" / "demo.toml"
BASE = [
    "model.embed_dim=32", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.layers=1", "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
    "model.text.heads=2", "train.batch_size=8", "schedule.steps=2", "schedule.warmup_steps=1",
    "optimizer.lr=1e-3", "checkpoint.every_n_steps=0", "logging.every_n_steps=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.plot=false", "data.workers=0", "eval.every_n_steps=0",
    "train.device=cpu",  # also on a machine with a GPU: these tests compare runs bit for bit
]
RESNET = ["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "model.vision.width=8", "model.vision.heads=2"]

TEXT = TextConfig(context_length=8, vocab_size=100, width=16, layers=1, heads=2)
TINY_VIT = ModelConfig(embed_dim=16, text=TEXT,
                       vision=VisionConfig(kind="vit", image_size=16, patch_size=8, width=16, layers=1, heads=2))
TINY_RESNET = ModelConfig(embed_dim=16, text=TEXT,
                          vision=VisionConfig(kind="resnet", image_size=32, width=8, layers=(1, 1, 1, 1), heads=2))


def config_of(run_dir: Path, *extra: str) -> TrainConfig:
    config = load_config(DEMO, [*BASE, *extra, f"output_dir={run_dir}"], TrainConfig)
    config.eval.zeroshot = []  # no final evaluation: these tests look at the training alone
    return config


def trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[0][1])
    return {**state["model"], **{f"loss.{k}": v for k, v in state["loss_parameters"].items()}}


def batch(size: int, image_size: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, image_size, image_size, generator=generator, dtype=dtype)
    texts = torch.randint(1, 99, (size, 8), generator=generator)
    texts[:, -1] = 99  # the end-of-text token has the largest id
    return images, texts


def locked_module(config: ModelConfig, lock: str | None, kind: str = "clip", checkpointing: bool = False):
    """ContrastiveModel as the trainer sets it up: locks applied and the locked tower in eval mode."""
    torch.manual_seed(0)
    clip = CLIP(config)
    clip.set_grad_checkpointing(checkpointing)
    clip.lock(image=lock == "image", text=lock == "text")
    module = ContrastiveModel(clip, with_logit_bias=kind == "siglip")
    for tower_module in [clip.visual] if lock == "image" else clip.text_tower() if lock == "text" else []:
        tower_module.eval()
    return module


# ---- the temperature's bound ------------------------------------------------------------------------------

def record_logit_multipliers(monkeypatch, push_up: float = 0.0) -> list[float]:
    """The trainer's loss records exp(logit_scale) of every step in the list returned; `push_up` > 0 subtracts
    push_up * logit_scale from the loss, so that every update asks for a larger temperature."""
    import clip.train as trainer

    multipliers = []
    build = trainer.build_loss

    def recording_build_loss(*args, **kwargs):
        loss_fn = build(*args, **kwargs)
        forward = loss_fn.forward

        def recording_forward(image_features, text_features, logit_scale, logit_bias=None):
            multipliers.append(logit_scale.detach().exp().item())
            loss, metrics = forward(image_features, text_features, logit_scale, logit_bias)
            return loss - push_up * logit_scale, metrics

        loss_fn.forward = recording_forward
        return loss_fn

    monkeypatch.setattr(trainer, "build_loss", recording_build_loss)
    return multipliers


@pytest.mark.parametrize(("extra", "bound"), [(["loss.max_logit_scale=10"], 10.0),
                                              (["loss.kind=siglip", "loss.max_logit_scale=5"], 5.0)])
def test_max_logit_scale_bounds_the_first_steps_logits_too(tmp_path, monkeypatch, extra, bound):
    # The initial temperature (1 / 0.07 = 14.3, SigLIP's 10) was clamped only after the first update, so the
    # first step's logits were scaled by more than loss.max_logit_scale allows.
    multipliers = record_logit_multipliers(monkeypatch)
    train(config_of(tmp_path, *extra))
    assert len(multipliers) == 2 and max(multipliers) <= bound * (1 + 1e-6), multipliers


def test_max_logit_scale_bounds_the_temperature_after_every_step(tmp_path, monkeypatch):
    # A loss that always asks for a larger temperature: every update moves logit_scale past the bound, and
    # the trainer must clamp it back after each optimiser step, not only before the first one.
    multipliers = record_logit_multipliers(monkeypatch, push_up=100)
    train(config_of(tmp_path, "loss.max_logit_scale=10", "schedule.steps=3", "optimizer.lr=0.1"))
    assert len(multipliers) == 3 and max(multipliers) <= 10 * (1 + 1e-6), multipliers
    assert trained_state(tmp_path)["logit_scale"].exp().item() == pytest.approx(10.0)


def test_the_temperature_is_bounded_to_between_1_and_max_logit_scale():
    from clip.train import bound_temperature

    clip = CLIP(TINY_VIT)
    for start, bounded in [(-1.0, 0.0), (1.5, 1.5), (5.0, math.log(50))]:
        clip.logit_scale.data.fill_(start)
        bound_temperature(clip, math.log(50))
        assert clip.logit_scale.item() == pytest.approx(bounded)


def test_a_locked_tower_without_initial_weights_is_named(tmp_path, caplog):
    # Every combination below runs; this one runs as asked but trains against a random, frozen tower.
    with caplog.at_level(logging.WARNING, logger="clip.train"):
        train(config_of(tmp_path / "random", "train.lock_text=true", "schedule.steps=1"))
        assert "train.lock_text without train.init_weights" in caplog.text
        caplog.clear()
        train(config_of(tmp_path / "fine_tuned", "train.lock_image=true", "schedule.steps=1",
                        f"train.init_weights={tmp_path / 'random'}"))
        assert "without train.init_weights" not in caplog.text


# ---- trainer-level equivalences --------------------------------------------------------------------------

@pytest.mark.parametrize(("base", "change"), [
    (["loss.kind=siglip", "train.lock_text=true"], "train.accumulation_steps=4"),
    ([*RESNET, "train.lock_image=true", "loss.chunk_size=3"], "train.accumulation_steps=2"),
    (["train.lock_image=true", "loss.chunk_size=3", "train.precision=bf16"], "train.grad_checkpointing=true"),
], ids=["siglip-locked-text-accumulation", "resnet-locked-image-accumulation", "bf16-checkpointing"])
def test_settings_that_must_not_change_the_arithmetic_leave_the_trained_weights_alone(tmp_path, base, change):
    # Two steps of AdamW at lr 1e-3 move a weight by up to ~2e-3; a wrong gradient (a negative left out, the
    # temperature's gradient counted per micro-batch) moves some weight by that much. Float rounding: < 1e-5.
    train(config_of(tmp_path / "reference", *base))
    train(config_of(tmp_path / "changed", *base, change))
    reference, changed = trained_state(tmp_path / "reference"), trained_state(tmp_path / "changed")
    assert reference.keys() == changed.keys()
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(changed[name], value, rtol=0, atol=5e-5, msg=name)


def test_logged_learning_rates_follow_the_schedule_across_a_resume(tmp_path):
    schedule = ["schedule.steps=4", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.2"]
    train(config_of(tmp_path, *schedule), stop_at_step=2)
    train(config_of(tmp_path, *schedule))
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "lr" in r}
    expected = ScheduleConfig(steps=4, warmup_steps=2, min_lr_ratio=0.2)
    # step s (1-based in the log) runs at learning_rate(s - 1): warmup 0.5, 1.0 x peak, then the cosine
    assert logged == {s: pytest.approx(learning_rate(s - 1, 1e-3, expected)) for s in range(1, 5)}
    assert [logged[s] / 1e-3 for s in range(1, 5)] == pytest.approx([0.5, 1.0, 1.0, 0.2 + 0.8 * 0.5])


# ---- step-level ------------------------------------------------------------------------------------------

def gradients(module: ContrastiveModel, images, texts, micro_batches: int, loss: LossConfig, lock, autocast):
    loss_fn = build_loss(loss)
    contrastive_step(module, images, texts, micro_batches, loss_fn, autocast, lambda l: l.backward(), False,
                     locked_image=lock == "image", locked_text=lock == "text")
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("kind", "lock"), [("clip", None), ("siglip", "image")])
def test_bf16_accumulation_matches_the_full_batch_within_bf16_rounding(kind, lock):
    # Judged against float32's gradients: accumulated bf16 must be no farther from them than one full bf16
    # batch is (measured: up to 1.15x; bf16 itself is up to ~5e-2 relative from float32 here). Accumulated and
    # full bf16 gradients compared with each other differ by up to ~2e-2, by the thread count (reduction order).
    images, texts = batch(16, 16)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def grads(micro_batches: int, autocast):
        return gradients(locked_module(TINY_VIT, lock, kind), images, texts, micro_batches, LossConfig(kind=kind), lock,
                         autocast)

    reference, full, accumulated = grads(1, contextlib.nullcontext), grads(1, bf16), grads(4, bf16)
    assert full.keys() == accumulated.keys() == reference.keys() and "clip.logit_scale" in full
    assert not any(n.startswith("clip.visual.") for n in full) or lock != "image"
    for name, grad in reference.items():
        bf16_rounding = torch.maximum((full[name] - grad).norm(), 1e-3 * grad.norm())
        assert (accumulated[name] - grad).norm() <= 1.5 * bf16_rounding, name


def test_a_locked_resnet_keeps_weights_statistics_and_eval_mode_under_bf16_accumulation():
    module = locked_module(TINY_RESNET, "image")
    before = {k: v.clone() for k, v in module.clip.visual.state_dict().items()}
    optimizer = build_optimizer(list(module.named_parameters()), OptimizerConfig(lr=1e-2), torch.device("cpu"))
    images, texts = batch(8, 32)
    for _ in range(2):
        gradients(module, images, texts, 2, LossConfig(), "image", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        optimizer.step()
        optimizer.zero_grad()
    assert not module.clip.visual.training
    for name, value in module.clip.visual.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights, running statistics and their counters
    assert not torch.equal(module.clip.text_projection, locked_module(TINY_RESNET, "image").clip.text_projection)


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_reaches_exactly_the_decayed_group(implementation, decay_embeddings):
    # With zero gradients AdamW's update is the decay alone: p <- p * (1 - lr * wd) for the decayed group, and
    # nothing for gains, biases, the class token, logit_scale, SigLIP's bias, or (decay_embeddings=false)
    # the embeddings. Locked parameters are not in the optimizer at all.
    for config, lock in [(TINY_VIT, "text"), (TINY_RESNET, "image")]:
        module = locked_module(config, lock, kind="siglip")
        named = list(module.named_parameters())
        settings = OptimizerConfig(lr=0.1, weight_decay=0.5, decay_embeddings=decay_embeddings,
                                   implementation=implementation)
        optimizer = build_optimizer(named, settings, torch.device("cpu"))
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        before = {n: p.detach().clone() for n, p in named}
        for _, parameter in named:
            parameter.grad = torch.zeros_like(parameter) if parameter.requires_grad else None
        optimizer.step()
        for name, parameter in named:
            if not parameter.requires_grad:
                assert id(parameter) not in in_optimizer and torch.equal(parameter, before[name]), name
            elif is_decayed(name, parameter, decay_embeddings):
                assert parameter.ndim >= 2, name
                torch.testing.assert_close(parameter.detach(), before[name] * (1 - 0.1 * 0.5), msg=name)
            else:
                assert torch.equal(parameter.detach(), before[name]), name
        decayed = {n for n, p in named if p.requires_grad and is_decayed(n, p, decay_embeddings)}
        embedding = "clip.positional_embedding" if lock != "text" else "clip.visual.positional_embedding"
        assert (embedding in decayed) == decay_embeddings
        assert not {"clip.logit_scale", "logit_bias"} & decayed


def test_a_float64_model_computes_its_layer_norms_in_float64():
    # LayerNorm computes half precision in float32; it rounded float64 to float32 too, so float64 references
    # and gradient checks (this file's two-rank comparison) were only float32-exact.
    from clip.transformer import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(6).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 6, dtype=torch.float64) * 1e3 + 1.0
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    assert norm(x).dtype == torch.float64
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


# ---- 2 ranks x B against 1 process x 2B, the whole model ---------------------------------------------------

RANK_CASES = [
    {"kind": "siglip", "micro_batches": 2},
    {"chunk_size": 3, "micro_batches": 2, "lock": "text"},
    {"checkpointing": True, "micro_batches": 2, "lock": "image"},
]


def clipped_gradients_and_loss(case: dict, rank: int, world_size: int):
    """One step's gradients (all-reduced, then clipped to norm 0.5 as the trainer clips) and logged loss."""
    lock, kind = case.get("lock"), case.get("kind", "clip")
    module = locked_module(TINY_VIT, lock, kind, case.get("checkpointing", False)).double()
    wrapped = DistributedDataParallel(module) if world_size > 1 else module
    images, texts = batch(8, 16, torch.float64)
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    loss_fn = build_loss(LossConfig(kind=kind, chunk_size=case.get("chunk_size")), distributed=world_size > 1)
    _, metrics = contrastive_step(wrapped, images[rows], texts[rows], case["micro_batches"], loss_fn,
                                  contextlib.nullcontext, lambda l: l.backward(), world_size > 1,
                                  locked_image=lock == "image", locked_text=lock == "text")
    torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
    return metrics["loss"].item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        results = [clipped_gradients_and_loss(case, rank, 2) for case in RANK_CASES]
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_with_the_whole_model_match_one_process_on_the_concatenated_batch(tmp_path):
    # DDP over CLIP itself with accumulation (no_sync), locked towers whose cached features are reused,
    # gradient checkpointing, SigLIP and the chunked loss: the gathered loss and DDP's averaging give the
    # one-process gradients, to float64 rounding.
    from multiprocess import free_port, spawn_ranks

    out = tmp_path / "two_ranks.pt"
    spawn_ranks(_rank_worker, (free_port(), str(out)))
    for case, (loss, grads) in zip(RANK_CASES, torch.load(out)):
        one_loss, one_grads = clipped_gradients_and_loss(case, 0, 1)
        assert loss == pytest.approx(one_loss, rel=1e-12), case
        assert grads.keys() == one_grads.keys(), case
        for name, grad in one_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=f"{case}: {name}")


# ---- the sweep (not part of the suite) --------------------------------------------------------------------

SWEEP_OPTIONS = {
    "precision": ["train.precision=bf16", "train.precision=fp16"],
    "accumulation": ["train.accumulation_steps=2", "train.accumulation_steps=4"],
    "checkpointing": ["train.grad_checkpointing=true"],
    "lock": ["train.lock_image=true", "train.lock_text=true", "partly_locked_image", "partly_locked_text"],
    "patch_dropout": ["train.patch_dropout=0.5"],
    "loss": ["loss.kind=siglip", "loss.chunk_size=3"],
    "clipping": ["optimizer.grad_clip_norm=none"],
    "decay": ["optimizer.decay_embeddings=false"],
    "temperature": ["loss.max_logit_scale=1"],
    "architecture": ["resnet"],
    "optimizer": ["optimizer.implementation=foreach", "optimizer.implementation=for-loop"],
    "schedule": ["schedule.kind=constant", "constant_cooldown"],
}
# Options that take several overrides
COMPOSITE_OPTIONS = {
    "resnet": RESNET,
    "partly_locked_image": ["train.lock_image=true", "train.lock_image_unlocked_layers=1"],
    "partly_locked_text": ["train.lock_text=true", "train.lock_text_unlocked_layers=1"],
    "constant_cooldown": ["schedule.kind=constant_cooldown", "schedule.cooldown_steps=1"],
}


def sweep_case(options: tuple[str, ...], root: Path) -> tuple[str, str, str]:
    """(name, ok / refused / ERROR / NONFINITE, detail) for three steps with `options`."""
    from clip.config import ConfigError

    torch._dynamo.reset()  # compiled graphs of earlier cases would count towards the recompile limit
    name = "+".join(options) or "defaults"
    expanded = [o for option in options for o in COMPOSITE_OPTIONS.get(option, [option])]
    try:
        config = config_of(root / name.replace("/", "_"), "schedule.steps=3", *expanded)
    except (ConfigError, ValueError) as error:
        return name, "refused", str(error).splitlines()[0]
    try:
        final = train(config)
    except Exception as error:  # noqa: BLE001 -- the sweep reports every failure and goes on
        return name, "ERROR", f"{type(error).__name__}: {error}".splitlines()[0]
    finite = math.isfinite(final.get("loss", math.nan)) and final.get("nonfinite_steps_total") == 0
    return name, "ok" if finite else "NONFINITE", f"loss {final.get('loss')}"


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.ERROR)
    options = dict(SWEEP_OPTIONS)
    if "--compile" in argv:  # slow: minutes of compiling per case on a CPU
        options = {**options, "compile": ["train.compile=true"]}
    cases = [()] + [(value,) for values in options.values() for value in values]
    for first, second in itertools.combinations(options, 2):
        cases += list(itertools.product(options[first], options[second]))
    if "--only" in argv:
        cases = [case for case in cases if any(argv[argv.index("--only") + 1] in option for option in case)]
    print(len(cases), "cases", flush=True)
    for case in cases:
        print(*sweep_case(case, Path(argv[1])), sep="\t", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    main(sys.argv)
