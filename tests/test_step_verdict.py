"""A step skipped on the device (the fused AdamW's found_inf flag, BatchNorm statistics put back by torch.where)
and its verdict read by the host a step later: the same weights, warnings, counts and stops as a verdict read at
once."""

from __future__ import annotations

import copy
import logging
import math
import signal

import pytest
import torch
from test_train_loop import final_weights, poison_loss, signal_at_step, tiny_config
from torch import nn

from clip import checkpoint as ckpt
from clip.distributed import StepAgreement
from clip.step_verdict import VerdictInFlight, skips_on_device, step_or_skip_on_device
from clip.train import NonFiniteLossError, train
from clip.train_step import BatchNormSnapshot

SKIP, TAKE = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])  # agreement_flags: loss not finite / all fine


def model_and_optimizer(fused: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused) if fused else torch.optim.AdamW(
        model.parameters(), lr=0.1, foreach=True)
    model(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()  # moments and step counts that a skip must leave alone
    return model, optimizer


def everything(model, optimizer) -> list[torch.Tensor]:
    state = [t for values in optimizer.state.values() for t in values.values()]
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers(), *state]]


def one_step(model, optimizer, snapshot, inputs, flags):
    snapshot.take()
    optimizer.zero_grad(set_to_none=True)
    model(inputs).square().sum().backward()  # updates the BatchNorm statistics before the verdict
    step_or_skip_on_device(optimizer, flags, snapshot)


def test_a_step_skipped_on_the_device_leaves_weights_moments_counts_and_statistics_as_they_were():
    model, optimizer = model_and_optimizer()
    snapshot = BatchNormSnapshot(model)
    before = everything(model, optimizer)
    inputs = torch.randn(8, 4)
    inputs[0, 0] = math.inf  # NaN statistics and gradients, as an fp16 overflow gives them
    one_step(model, optimizer, snapshot, inputs, SKIP)
    assert not torch.isfinite(model[0].weight.grad).all()
    after = everything(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert optimizer.found_inf is None  # the flag is not left behind for a later step


def test_a_step_taken_on_the_device_is_the_plain_optimiser_step_bit_for_bit():
    model, optimizer = model_and_optimizer()
    plain_model = copy.deepcopy(model)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=0.1, fused=True)
    # a deep copy: load_state_dict would share the moment tensors between the two optimisers
    plain_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    inputs = torch.randn(8, 4)
    one_step(model, optimizer, BatchNormSnapshot(model), inputs, TAKE)
    plain_optimizer.zero_grad(set_to_none=True)
    plain_model(inputs).square().sum().backward()
    plain_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(everything(model, optimizer), everything(plain_model, plain_optimizer),
                                                   strict=True))
    assert model[1].num_batches_tracked.item() == 2  # the step's statistics are kept


def test_restore_if_chooses_each_buffer_exactly_on_the_flag():
    model, _ = model_and_optimizer()
    norm = model[1]
    snapshot = BatchNormSnapshot(model)
    snapshot.take()
    saved = [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]
    with torch.no_grad():
        norm.running_mean.fill_(math.nan)
        norm.running_var.fill_(7.0)
        norm.num_batches_tracked += 5
    changed = [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]
    snapshot.restore_if(torch.tensor(False))
    now = [norm.running_mean, norm.running_var, norm.num_batches_tracked]
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(changed, now, strict=True))
    snapshot.restore_if(torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(saved, now, strict=True))


def test_only_the_fused_adamw_without_a_gradient_scaler_skips_on_the_device():
    _, fused = model_and_optimizer(fused=True)
    _, foreach = model_and_optimizer(fused=False)
    assert skips_on_device(fused, gradient_scaler_enabled=False)
    assert not skips_on_device(fused, gradient_scaler_enabled=True)  # fp16: the scaler judges and steps itself
    assert not skips_on_device(foreach, gradient_scaler_enabled=False)  # its step has no found_inf
    # parameters on a device whose fused kernel may ignore the flag (MPS's does): decided on the host
    fused.param_groups[0]["params"] = [nn.Parameter(torch.empty(2, device="meta"))]
    assert not skips_on_device(fused, gradient_scaler_enabled=False)


def test_a_verdict_in_flight_reads_as_the_flags_say():
    verdict = VerdictInFlight(7, torch.tensor([1.0, 0.0, 0.0]), torch.tensor(2.5)).read()
    assert verdict == StepAgreement(losses_finite=True, gradients_finite=False, stop=True) and verdict.skipped
    assert not VerdictInFlight(8, TAKE, torch.tensor(1.0)).read().skipped


# ---- in the trainer ----------------------------------------------------------------------------------


def test_a_verdict_is_read_once_the_next_step_is_launched_unless_its_step_logs_or_ends(tmp_path, monkeypatch):
    import clip.train as train_module

    launched, reads = {"n": 0}, []
    real_step, real_read = train_module.contrastive_step, VerdictInFlight.read

    def counting(*args, **kwargs):
        launched["n"] += 1
        return real_step(*args, **kwargs)

    def recording(self):
        reads.append((self.step, launched["n"]))
        return real_read(self)

    monkeypatch.setattr(train_module, "contrastive_step", counting)
    monkeypatch.setattr(VerdictInFlight, "read", recording)
    train(tiny_config(tmp_path, "schedule.steps=7", "logging.every_n_steps=3", "eval.every_n_steps=0",
                      "checkpoint.every_n_steps=0"))
    # (step, steps launched when its verdict was read): steps 3 and 6 log, 7 is the last
    assert reads == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6), (7, 7)]


def test_a_step_skipped_and_read_late_trains_and_counts_as_one_read_at_once(tmp_path, monkeypatch, caplog):
    extra = ["schedule.steps=5", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    runs = {}
    for name, every in (("at_once", 1), ("late", 10)):
        monkeypatch.undo()
        poison_loss(monkeypatch, {2})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            runs[name] = train(tiny_config(tmp_path / name, *extra, f"logging.every_n_steps={every}"))
        assert "step 2: non-finite loss (loss nan); step skipped (1 in a row)" in caplog.text
        assert runs[name]["nonfinite_steps_total"] == 1
    at_once, late = final_weights(tmp_path / "at_once"), final_weights(tmp_path / "late")
    assert all(torch.equal(at_once[name], late[name]) for name in at_once)
    assert all(torch.isfinite(t).all() for t in late.values() if t.is_floating_point())


def test_too_many_non_finite_steps_read_late_name_the_step_that_made_them_too_many(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {2, 3, 4})
    # step 4's verdict waits for step 5, a checkpoint step: it is counted, and the run gives up, before the save
    config = tiny_config(tmp_path, "schedule.steps=8", "train.max_consecutive_nonfinite=3", "eval.every_n_steps=0",
                         "logging.every_n_steps=10", "checkpoint.every_n_steps=5")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row at step 4"):
        train(config)
    assert ckpt.list_checkpoints(tmp_path) == []


def test_a_checkpoint_step_reads_its_own_verdict_before_it_saves(tmp_path, monkeypatch):
    # Step 2 is non-finite and a checkpoint step: no periodic save while the losses are non-finite, and the
    # final checkpoint counts it
    poison_loss(monkeypatch, {2})
    train(tiny_config(tmp_path, "schedule.steps=4", "eval.every_n_steps=0", "logging.every_n_steps=10",
                      "checkpoint.every_n_steps=2"))
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert ckpt.load_latest_checkpoint(tmp_path)["metrics"]["nonfinite_steps_total"] == 1


def test_the_foreach_adamw_skips_on_the_host(tmp_path, monkeypatch, caplog):
    import clip.train as train_module

    def not_on_the_device(*args):
        raise AssertionError("the foreach AdamW has no found_inf: its steps are decided on the host")

    monkeypatch.setattr(train_module, "step_or_skip_on_device", not_on_the_device)
    poison_loss(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        results = train(tiny_config(tmp_path, "schedule.steps=3", "eval.every_n_steps=0",
                                    "optimizer.implementation=foreach", "logging.every_n_steps=10"))
    assert "step 2: non-finite loss" in caplog.text and results["nonfinite_steps_total"] == 1
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values() if t.is_floating_point())


def test_a_signal_at_a_step_whose_verdict_waits_reads_it_before_the_checkpoint(tmp_path, monkeypatch, caplog):
    # One process: the signal counts after the step it came in; that step's verdict (non-finite here) was left
    # for the next step, which does not come: it is read, said and counted before the save.
    signal_at_step(monkeypatch, 3, signal.SIGTERM, "before_forward")
    poison_loss(monkeypatch, {3})
    config = tiny_config(tmp_path, "schedule.steps=6", "eval.every_n_steps=0", "checkpoint.every_n_steps=0",
                         "logging.every_n_steps=10")
    with caplog.at_level(logging.WARNING):
        assert train(config)["step"] == 3
    assert "step 3: non-finite loss" in caplog.text
    metrics = ckpt.load_latest_checkpoint(tmp_path)["metrics"]
    assert metrics["nonfinite_steps_total"] == 1 and metrics["nonfinite_steps_in_a_row"] == 1


def test_a_run_that_gives_up_at_an_evaluation_step_does_not_evaluate_first(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {1, 2})
    config = tiny_config(tmp_path, "schedule.steps=4", "train.max_consecutive_nonfinite=2", "eval.every_n_steps=2",
                         "logging.every_n_steps=10", "checkpoint.every_n_steps=0")
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses or gradients in a row at step 2"):
        train(config)
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or "zeroshot/" not in metrics.read_text()
