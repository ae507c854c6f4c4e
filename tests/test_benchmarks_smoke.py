"""Smoke tests of the benchmark scripts at their smallest settings (tiny models, one step), so that they keep
running as the library changes. No timing is asserted: speed targets live in benchmarks/ and docs/."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
TINY_VIT = {
    "embed_dim": 32,
    "vision": {"kind": "vit", "image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "heads": 2},
    "text": {"width": 64, "layers": 2, "heads": 2},
}


@pytest.fixture()
def benchmark_modules(monkeypatch):
    """The scripts import each other by bare name, as they do when run from benchmarks/."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import inference
    import run_all
    import train_step

    return common, train_step, inference, run_all


def test_captions_are_realistic_with_and_without_the_merges_file(benchmark_modules, monkeypatch):
    common = benchmark_modules[0]
    for available in (True, False):
        if available and not common.merges_file_available():
            continue
        monkeypatch.setattr(common, "merges_file_available", lambda value=available: value)
        ids, source = common.caption_token_ids(64, seed=0)
        lengths = common.token_lengths(ids)
        assert ids.shape == (64, 77)
        assert 8 <= lengths["min"] and lengths["max"] <= 30, (source, lengths)
        assert (ids.argmax(dim=1) == (ids != 0).sum(dim=1) - 1).all()  # one end token, last, then padding


def test_train_step_runs_both_libraries_and_reports_ratios(tmp_path):
    libraries = ["ours", "open_clip"] if _has_open_clip() else ["ours"]
    output = tmp_path / "train_step.json"
    command = [sys.executable, str(BENCHMARKS / "train_step.py"), "--archs", json.dumps(TINY_VIT), "--batch-sizes", "2",
               "--threads", "1", "--repeats", "1", "--warmup", "0", "--steps", "1", "--count-flops",
               "--libraries", *libraries, "--json", str(output)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    rows = json.loads(output.read_text())["rows"]
    assert len(rows) == 1  # one configuration, written once
    row = rows[0]
    for library in libraries:
        result = row["results"][library]
        assert "error" not in result, result
        assert result["samples_per_s"] > 0 and result["training_peak_gib"] > 0 and result["flops_per_sample"] > 0
    if len(libraries) == 2:
        assert row["speedup"] > 0 and row["memory_ratio"] > 0


def test_step_sync_times_each_way_of_reading_the_verdict(benchmark_modules, tmp_path, capsys):
    import step_sync  # in this process: a script's own start (torch's import) would be most of the test's time

    output = tmp_path / "step_sync.json"
    assert step_sync.main(["--device", "cpu", "--arch", json.dumps(TINY_VIT), "--batch", "2", "--compile", "none",
                           "--warmup", "1", "--steps", "1", "--repeats", "1", "--json", str(output)]) == 0
    result = json.loads(output.read_text())
    assert set(result["variants"]) == {"host", "on-device", "unchecked"}
    assert all(variant["step_ms"] > 0 for variant in result["variants"].values()) and result["losses_finite"]


@pytest.mark.parametrize("policy, kept_by", [("trainers", {"ours"}), ("both", {"ours", "open_clip"}), ("neither", set())])
def test_train_step_keeps_freed_memory_in_the_processes_cpu_malloc_names(benchmark_modules, monkeypatch, policy,
                                                                        kept_by):
    # As clip.train does on the CPU, ours keeps freed memory by default; open_clip's trainer does not.
    train_step = benchmark_modules[1]
    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        yield True

    monkeypatch.setattr("clip.cpu_memory.freed_memory_kept", recording)
    monkeypatch.setattr(train_step, "measure_step", lambda job: {"samples_per_s": 1.0})
    for library in ("ours", "open_clip"):
        entered.clear()
        result = train_step.measure({"library": library, "device": "cpu", "cpu_malloc": policy})
        assert result["freed_memory_kept"] == (library in kept_by) == bool(entered), library
    assert not train_step.measure({"library": "ours", "device": "cuda", "cpu_malloc": "both"})["freed_memory_kept"]


def test_train_step_gpu_peak_memory_leaves_out_the_warm_up_autotuning(benchmark_modules, monkeypatch):
    # On CUDA the first step's cuDNN autotuning (cudnn.benchmark) tries each convolution algorithm with its own
    # workspace from the caching allocator, and torch.compile's first step compiles: one-off peaks that are no
    # part of a training step's memory. Simulated here on the CPU: an allocator whose first step peaks at
    # 10 GiB (a workspace) and every later one at 3 GiB; the weights and optimiser state hold 2 GiB throughout.
    common, train_step = benchmark_modules[0], benchmark_modules[1]
    gib = common.GIB
    allocator = {"peak": 2 * gib, "steps": 0}

    def step():
        allocator["steps"] += 1
        allocator["peak"] = max(allocator["peak"], (10 if allocator["steps"] == 1 else 3) * gib)
        return torch.tensor(1.0)

    class OnTheDevice:  # what .to("cuda") would give, on a machine without one
        def __init__(self, tensor):
            self.tensor, self.shape = tensor, tensor.shape

        def to(self, device):
            return self

        def cpu(self):
            return self.tensor

    ids, _ = common.caption_token_ids(2, seed=0)
    monkeypatch.setattr(common, "make_images", lambda count, size, seed: OnTheDevice(torch.zeros(count, 3, size, size)))
    monkeypatch.setattr(common, "caption_token_ids", lambda count, seed, length: (OnTheDevice(ids), "fake"))
    monkeypatch.setattr(train_step, "make_step", lambda job, device, images, texts: (step, torch.nn.Linear(1, 1)))
    monkeypatch.setattr("clip.cuda_backends.configure_cuda_backends", lambda allow_tf32: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak=2 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    job = {"arch": json.dumps(TINY_VIT), "batch": 2, "threads": 0, "device": "cuda", "precision": "bf16", "warmup": 2,
           "steps": 3, "compile": False, "optimizer": "auto", "seed": 0, "grad_clip_norm": None, "count_flops": False,
           "library": "open_clip"}
    result = train_step.measure_step(job)
    assert allocator["steps"] == 5
    assert result["peak_gib"] == 3.0


def test_train_step_keeps_each_finished_run_when_stopped_midway(benchmark_modules, tmp_path, monkeypatch):
    # gpu.sh kills a benchmark at its time limit: the runs finished by then must already be in the JSON.
    common, train_step = benchmark_modules[0], benchmark_modules[1]
    calls = []

    def fake_run_job(script, job, timeout_s=None):
        calls.append(job["library"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while the second library runs
        return {"samples_per_s": 10.0, "samples_per_cpu_s": 5.0, "peak_gib": 1.0, "training_peak_gib": 0.5,
                "caption_tokens": {}, "text_source": "fake", "parameters": 1}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    output = tmp_path / "train_step.json"
    with pytest.raises(KeyboardInterrupt):
        train_step.main(["--archs", "ViT-B/32", "--batch-sizes", "2", "--libraries", "ours", "open_clip",
                         "--repeats", "1", "--device", "cpu", "--json", str(output)])
    row = json.loads(output.read_text())["rows"][0]
    assert row["results"]["ours"]["samples_per_s"] == 10.0
    assert row["results"]["open_clip"]["error"] == "not run"


def test_train_step_gives_each_run_an_equal_share_of_its_time_limit(benchmark_modules, tmp_path, monkeypatch):
    # gpu.sh compiles ours, then open_clip, within one time limit: with only a per-run timeout, ours could take
    # nearly all of it and leave open_clip too little to compile, so the comparison would lose its second row
    common, train_step = benchmark_modules[0], benchmark_modules[1]
    clock = [1000.0]
    monkeypatch.setattr(train_step.time, "monotonic", lambda: clock[0])
    timeouts = []

    def fake_run_job(script, job, timeout_s=None):
        timeouts.append((job["library"], timeout_s))
        clock[0] += 30.0 if job["library"] == "ours" else 100.0  # ours ends early, open_clip uses all it gets
        return {"samples_per_s": 10.0, "samples_per_cpu_s": 5.0, "peak_gib": 1.0, "training_peak_gib": 0.5,
                "caption_tokens": {}, "text_source": "fake", "parameters": 1, "warmup_s": 25.0}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    train_step.main(["--archs", "ViT-B/32", "--batch-sizes", "2", "--libraries", "ours", "open_clip",
                     "--repeats", "1", "--device", "cpu", "--job-timeout", "150", "--time-limit", "160",
                     "--json", str(tmp_path / "train_step.json")])
    assert timeouts == [("ours", 80.0), ("open_clip", 130.0)]  # half, then all that the first left
    row = json.loads((tmp_path / "train_step.json").read_text())["rows"][0]
    assert row["results"]["ours"]["warmup_s"] == 25.0  # what compiling took: what a time limit must allow
    shares = train_step.TimeShares(10.0, 2)
    clock[0] += 11.0
    assert shares.next_timeout(150.0) < 1  # used up: main records "not run" rather than a run with no time
    assert train_step.TimeShares(None, 2).next_timeout(150.0) == 150.0


def test_train_step_compiles_each_run_into_caches_of_its_own(benchmark_modules, monkeypatch):
    # torch.compile's on-disk caches are shared by the user's processes by default: the library compiled second
    # could reuse kernels of the first one's run and compile faster within the same time limit
    train_step = benchmark_modules[1]
    seen = []
    monkeypatch.setattr(train_step, "measure_step", lambda job: seen.append(
        {name: os.environ.get(name) for name in train_step.COMPILE_CACHE_VARIABLES}) or {})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/shared-cache")
    job = {"device": "cpu", "library": "ours", "cpu_malloc": "neither"}
    for library in ("ours", "open_clip"):
        train_step.measure({**job, "library": library, "compile": True})
    train_step.measure({**job, "compile": False})
    first, second, eager = seen
    assert first["TORCHINDUCTOR_CACHE_DIR"] != second["TORCHINDUCTOR_CACHE_DIR"]
    assert "/shared-cache" not in (first["TORCHINDUCTOR_CACHE_DIR"], second["TORCHINDUCTOR_CACHE_DIR"])
    assert first["TRITON_CACHE_DIR"].startswith(first["TORCHINDUCTOR_CACHE_DIR"])
    assert not os.path.exists(first["TORCHINDUCTOR_CACHE_DIR"])  # removed after the run
    assert eager["TORCHINDUCTOR_CACHE_DIR"] == "/shared-cache" == os.environ["TORCHINDUCTOR_CACHE_DIR"]


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_train_step_compile_scope_blocks_compiles_each_residual_block_and_not_the_model(benchmark_modules,
                                                                                     monkeypatch, scope):
    # --compile-scope blocks: every block of both towers compiled in place (Module.compile), the model itself run
    # eager; the default compiles the whole model once, as clip.train's train.compile does
    from clip.transformer import ResidualAttentionBlock

    train_step = benchmark_modules[1]
    compiled_models, compiled_blocks = [], []
    monkeypatch.setattr(torch, "compile", lambda module, **_: compiled_models.append(module) or module)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **_: compiled_blocks.append(self))
    job = {"arch": json.dumps(TINY_VIT), "batch": 2, "threads": 0, "device": "cpu", "precision": "fp32",
           "compile": True, "compile_scope": scope, "optimizer": "auto", "library": "ours"}
    images, texts = torch.rand(2, 3, 32, 32), torch.randint(1, 100, (2, 8))
    step, module = train_step.make_step(job, torch.device("cpu"), images, texts)
    blocks = [m for m in module.modules() if isinstance(m, ResidualAttentionBlock)]
    assert len(blocks) == 4  # 2 image + 2 text
    if scope == "blocks":
        assert compiled_models == [] and {id(b) for b in compiled_blocks} == {id(b) for b in blocks}
    else:
        assert compiled_models == [module] and compiled_blocks == []
    assert math.isfinite(float(step()))
    row = {"compile": True, "compile_scope": scope}
    assert train_step.compile_cell(row) == ("yes (ours: each block)" if scope == "blocks" else "yes")


def test_train_step_refuses_a_compile_scope_without_compile(benchmark_modules, capsys):
    # It was ignored: an eager run, its table saying "no", where a compiled one was asked for
    train_step = benchmark_modules[1]
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--archs", json.dumps(TINY_VIT), "--compile-scope", "blocks"])
    assert exit_info.value.code == 2
    assert "--compile-scope blocks applies to compiled runs: add --compile" in capsys.readouterr().err


def test_train_step_full_text_length_gives_ours_open_clips_inputs_and_no_more_work(benchmark_modules):
    # By default ours runs the text tower only to the batch's last end-of-text token, open_clip all 77
    # positions; --text-length full must make ours run all 77 too. Its towers' last blocks still compute only
    # the positions read (the class and end-of-text tokens), so it does less work than open_clip either way.
    pytest.importorskip("open_clip")
    train_step = benchmark_modules[1]
    job = {"arch": json.dumps(TINY_VIT), "batch": 2, "threads": 0, "device": "cpu", "precision": "fp32", "warmup": 0,
           "steps": 1, "compile": False, "optimizer": "auto", "seed": 0, "grad_clip_norm": None, "count_flops": True}
    results = {(library, length): train_step.measure({**job, "library": library, "text_length": length})
               for library in ("ours", "open_clip") for length in ("trimmed", "full")}
    assert results["ours", "trimmed"]["text_positions"] < 77
    assert results["ours", "trimmed"]["flops_per_sample"] < results["open_clip", "full"]["flops_per_sample"]
    assert results["ours", "full"]["text_positions"] == results["open_clip", "full"]["text_positions"] == 77
    assert (results["ours", "trimmed"]["flops_per_sample"] < results["ours", "full"]["flops_per_sample"]
            < results["open_clip", "full"]["flops_per_sample"])


def test_inference_gives_both_libraries_the_same_weights_at_each_text_length(benchmark_modules, tmp_path,
                                                                            single_torch_thread):
    # --threads 1 makes main call torch.set_num_threads(1), as the script is meant to; single_torch_thread puts the
    # count back afterwards, which left every later test in the session on one thread
    pytest.importorskip("open_clip")
    inference = benchmark_modules[2]
    output = tmp_path / "inference.json"
    inference.main(["--archs", json.dumps(TINY_VIT), "--image-batch", "2", "--text-batch", "4", "--threads", "1",
                    "--repeats", "1", "--text-length", "trimmed", "full", "--json", str(output)])
    row = json.loads(output.read_text())["rows"][0]
    assert row["max_abs_difference"]["encode_image"]["ours"] < 1e-4
    for name in ("ours", "ours, full text"):
        assert row["max_abs_difference"]["encode_text"][name] < 1e-4
        assert row["encode_text"][name]["texts_per_s"] > 0 and row["encode_text"]["speedups"][name] > 0
    assert set(row["encode_image"]) == {"ours", "open_clip", "speedups"}  # the image tower timed once
    table = inference.format_rows([row])
    assert "| encode_text (ours: all 77 positions) |" in table and table.count("| encode_image |") == 1


def test_train_step_measures_ours_at_each_text_length_against_the_same_open_clip_runs(benchmark_modules, tmp_path,
                                                                                      monkeypatch):
    common, train_step = benchmark_modules[0], benchmark_modules[1]
    jobs = []

    def fake_run_job(script, job, timeout_s=None):
        jobs.append((job["library"], job.get("text_length")))
        positions = 32 if job.get("text_length") == "trimmed" else 77
        speed = {32: 3.0, 77: 2.0}[positions] if job["library"] == "ours" else 1.0
        return {"samples_per_s": speed, "samples_per_cpu_s": speed, "peak_gib": 1.0, "training_peak_gib": 0.5,
                "caption_tokens": {}, "text_source": "fake", "parameters": 1, "text_positions": positions}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    output = tmp_path / "train_step.json"
    train_step.main(["--archs", "ViT-B/32", "--batch-sizes", "2", "--repeats", "2", "--device", "cpu",
                     "--text-length", "trimmed", "full", "--json", str(output)])
    # ABBA over three: open_clip measured once per round, not once per text length
    assert jobs == [("ours", "trimmed"), ("ours", "full"), ("open_clip", None),
                    ("open_clip", None), ("ours", "full"), ("ours", "trimmed")]
    rows = json.loads(output.read_text())["rows"]
    assert [(row["text_length"], row["speedup"]) for row in rows] == [("trimmed", 3.0), ("full", 2.0)]
    table = train_step.format_rows(rows, "cpu")
    assert "| 32 / 77 |" in table and "| 77 / 77 |" in table


def test_loss_memory_keeps_what_it_measured_when_stopped_midway(monkeypatch, tmp_path):
    # gpu.sh stops it at its time limit: the JSON was written only at the end, so a stopped run left none,
    # though the loss-memory figures are among what the GPU check must report
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import loss_memory

    calls = []

    def measured(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the time limit, after the exactness check and one row
        return {"max_loss_error": 0.0} if job["kind"] == "verify" else {"extra_peak_gib": 0.1, "seconds": 0.5,
                                                                          "loss": 1.0}

    monkeypatch.setattr(loss_memory, "run_in_subprocess", measured)
    output = tmp_path / "loss_memory.json"
    monkeypatch.setattr(sys, "argv", ["loss_memory.py", "--device", "cpu", "--batch-sizes", "64", "--chunk-sizes",
                                      "16", "--verify-batch", "64", "--json", str(output)])
    with pytest.raises(KeyboardInterrupt):
        loss_memory.main()
    kept = json.loads(output.read_text())
    assert kept["verification"]["max_loss_error"] == 0.0
    assert [(row["method"], row["extra_peak_gib"]) for row in kept["rows"]] == [("naive", 0.1)]


def test_loss_memory_records_running_out_of_memory_as_a_result(monkeypatch, tmp_path):
    # The naive loss at 64k needs about six 16 GiB matrices, near all an H200 has: running out of memory there
    # is a figure ("out of memory at 65536"), not a crash, and larger batches are not tried after it
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import loss_memory

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(loss_memory, "run_loss", out_of_memory)
    result = loss_memory.measure("naive", 64, 8, None, torch.device("cpu"))
    assert result["out_of_memory"] and result["error"] == "out of memory at batch 64"
    monkeypatch.undo()

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    jobs = []

    def measured(job):
        jobs.append((job["method"], job["batch"]))
        if job["method"] == "naive" and job["batch"] >= 128:
            return {"out_of_memory": True, "error": "out of memory at batch 128"}
        return {"extra_peak_gib": 0.1, "seconds": 0.5, "loss": 1.0}

    monkeypatch.setattr(loss_memory, "run_in_subprocess", measured)
    output = tmp_path / "loss_memory.json"
    monkeypatch.setattr(sys, "argv", ["loss_memory.py", "--device", "cpu", "--batch-sizes", "64", "128", "256",
                                      "--chunk-sizes", "16", "--json", str(output)])
    loss_memory.main()
    assert jobs == [("naive", 64), ("chunked", 64), ("naive", 128), ("chunked", 128), ("chunked", 256)]
    rows = {(row["method"], row["batch"]): row for row in json.loads(output.read_text())["rows"]}
    assert rows[("naive", 128)]["error"] == "out of memory at batch 128"
    assert rows[("naive", 256)]["skipped"] == "out of memory at batch 128 already"
    assert rows[("chunked", 256)]["extra_peak_gib"] == 0.1


def test_loss_memory_exactness_check_keeps_its_other_comparisons_when_naive_runs_out_of_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import loss_memory

    real = loss_memory.run_loss

    def naive_out_of_memory(method, *args):
        if method == "naive":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(method, *args)

    monkeypatch.setattr(loss_memory, "run_loss", naive_out_of_memory)
    report = loss_memory.verify(64, 8, 16, torch.device("cpu"))
    assert report["naive"] == "skipped: out of memory at batch 64"
    assert report["loss vs reference"] < 1e-5 and "grad_image vs reference" in report
    # The float64 comparison covers the methods that ran; naive did not
    assert {key for key in report if key.startswith("float64 error of ")} == {
        f"float64 error of {method}: {name}" for method in ("chunked", "reference")
        for name in ("loss", "grad_image", "grad_text", "grad_logit_scale")}


def test_loss_memory_exactness_check_measures_each_method_against_float64(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import loss_memory

    report = loss_memory.verify(256, 16, 64, torch.device("cpu"))
    for method in ("chunked", "reference", "naive"):
        for name in ("loss", "grad_image", "grad_text", "grad_logit_scale"):
            error = report[f"float64 error of {method}: {name}"]
            assert 0.0 <= error < 1e-5, (method, name, error)
    # The exact side ran in float64: every float32 gradient differs from it somewhere
    for method in ("chunked", "reference", "naive"):
        for name in ("grad_image", "grad_text"):
            assert report[f"float64 error of {method}: {name}"] > 0.0, (method, name)
    monkeypatch.setattr(loss_memory, "fits", lambda method, batch, device: method != "float64")
    report = loss_memory.verify(256, 16, 64, torch.device("cpu"))
    assert report["float64"].startswith("skipped: needs more than the ") and not any(
        key.startswith("float64 error of ") for key in report)
    # Running out of memory in the float64 pass keeps the float32 comparisons
    monkeypatch.undo()
    real_reference = loss_memory.whole_matrix_reference

    def float64_out_of_memory(image, text, logit_scale):
        if image.dtype == torch.float64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_reference(image, text, logit_scale)

    monkeypatch.setattr(loss_memory, "whole_matrix_reference", float64_out_of_memory)
    report = loss_memory.verify(256, 16, 64, torch.device("cpu"))
    assert report["float64"] == "skipped: out of memory at batch 256" and report["grad_text vs naive"] < 1e-5


def test_loss_memory_counts_from_the_memory_held_before_the_loss_not_an_earlier_peak():
    # Making the inputs passes through freed temporaries; here a 64 MiB one stands for them. The naive loss
    # at batch 2048 keeps about four 16 MiB logit matrices: its extra peak is at least that, however high
    # the process's memory went before. (A fresh process: its high-water mark is this run's alone.)
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(BENCHMARKS)!r})
import loss_memory
make_inputs = loss_memory.make_inputs
def with_freed_temporary(*args, **kwargs):
    temporary = torch.ones(2**24)
    del temporary
    return make_inputs(*args, **kwargs)
loss_memory.make_inputs = with_freed_temporary
print(json.dumps(loss_memory.measure("naive", 2048, 64, None, torch.device("cpu"))))
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["extra_peak_gib"] >= 4 * 2048 * 2048 * 4 / 1024**3, result


def test_pages_are_written_from_results_and_tolerate_missing_ones(benchmark_modules, tmp_path):
    common, train_step, _, run_all = benchmark_modules
    train = {"device": "cpu", "repeats": 1, "warmup": 0, "steps": 1, "rows": [{
        "arch": "ViT-B/32", "batch": 16, "threads": 1, "precision": "fp32", "compile": False,
        "speedup": 1.3, "speedup_cpu_time": 1.25, "memory_ratio": 0.95,
        "results": {name: {"samples_per_s": 2.0, "samples_per_cpu_s": 2.0, "training_peak_gib": 3.0, "peak_gib": 3.5}
                    for name in ("ours", "open_clip")}}]}
    loss = {"rows": [{"batch": 32768, "method": "chunked", "chunk_size": 512, "extra_peak_gib": 0.4}],
            "verification": {"batch": 32768, "chunk_size": 512, "loss vs reference": 2e-7}}
    reports = {"train_step": train, "loss_memory": loss, "tokenizer": {"error": "exit code 1: boom"}}
    page = tmp_path / "benchmarks.md"
    run_all.write_page(page, reports, "python benchmarks/run_all.py", common.machine_info(), [[1.0, 1.0, 1.0]])
    text = page.read_text()
    assert "trimmed as clip.train runs it: samples/s >= 1.2x open_clip | 1.300x (by CPU time: 1.250x) | met" in text
    assert "peak memory <= 0.9x open_clip | 0.950x | not met (0.050x over)" in text
    assert "extra peak 0.400 GiB (chunk 512)" in text and "| met |" in text
    assert "boom" in text and "## Inference\n\nNot run." in text

    (tmp_path / "train_step.json").write_text(json.dumps(train))
    run_all.main(["--gpu-page", str(tmp_path)])
    assert "# GPU benchmarks" in (tmp_path / "gpu_results.md").read_text()
    assert "Samples/CPU-s divides" in run_all.training_table(train)
    assert "Samples/CPU-s" not in run_all.training_table({**train, "device": "cuda:0"})  # a column CUDA pages lack



def test_the_gpu_pages_target_rows_stay_when_a_run_failed(benchmark_modules):
    # open_clip's compiled run out of time: the >= 1.2x row, and with ours failing the MFU row, went missing
    _, _, _, run_all = benchmark_modules
    row = {"arch": "ViT-B/16", "batch": 256, "precision": "bf16", "compile": True, "speedup": None,
           "results": {"ours": {"error": "timed out after 120 s"}, "open_clip": {"error": "timed out after 120 s"}}}
    rows = run_all.gpu_targets({"rows": [row], "skipped_libraries": {}})
    assert rows == [
        ["ViT-B/16, batch 256, bf16, compiled: MFU >= 45%", "not measured: timed out after 120 s", "not shown"],
        ["ViT-B/16, batch 256, bf16, compiled: samples/s >= 1.2x open_clip",
         "not measured: ours: timed out after 120 s", "not shown"],
    ]


def test_open_clips_fp32_mfu_on_cuda_counts_against_the_tf32_peak(benchmark_modules, monkeypatch):
    # measure_step runs open_clip with TF32 (as its trainer does), ours without: rated against plain fp32's peak,
    # open_clip's MFU read 7x too high
    _, train_step, _, _ = benchmark_modules
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    row = {"results": {name: {"samples_per_s": 1000.0, "flops_per_sample": 1e11} for name in ("ours", "open_clip")}}
    train_step.add_comparisons(row, torch.device("cuda:0"), "fp32")
    ours, theirs = row["results"]["ours"]["mfu"], row["results"]["open_clip"]["mfu"]
    assert ours / theirs == pytest.approx(494 / 67)  # the TF32 peak over the plain float32 one


def test_resume_keeps_finished_benchmarks(benchmark_modules, tmp_path, monkeypatch):
    common, _, _, run_all = benchmark_modules
    args = argparse.Namespace(quick=True, threads=1)
    finished = {"results": {}, "command": " ".join(run_all.commands(args)["tokenizer"]), "wall_s": 1.0}
    (tmp_path / "run_all.json").write_text(json.dumps({
        "reports": {"tokenizer": finished}, "invocation": "first", "machine": common.machine_info(), "loads": []}))
    monkeypatch.setattr(run_all, "run_benchmark", lambda *a: pytest.fail("a finished benchmark ran again"))
    page = tmp_path / "page.md"
    run_all.main(["--quick", "--only", "tokenizer", "--results-dir", str(tmp_path), "--resume", "--output", str(page)])
    assert "first\n" in page.read_text() and "--resume" in page.read_text()


def test_gpu_check_of_the_patch_dropout_replay_allows_float32_rounding_on_a_gpu_only(monkeypatch):
    # On CUDA the caching pass (no grad) and the gradient pass may run other kernels (attention that also keeps
    # what its backward needs): a zero tolerance there could fail a correct replay on the GPU run, which may
    # have no second try. A wrong mask moves the features by about a quarter of their size (0.13 of 0.52, as
    # gpu_checks.replay_tolerance says).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_checks

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gpu_checks.replay_tolerance(cpu, False, 0.5) == 0.0
    rounding, wrong_mask = 0.5 * 1e-5, 0.3  # unit feature vectors: components up to ~0.5
    assert rounding <= gpu_checks.replay_tolerance(cuda, False, 0.5) < wrong_mask / 100
    assert rounding <= gpu_checks.replay_tolerance(cuda, True, 0.5) < wrong_mask / 100
    result = gpu_checks.replayed_patch_dropout(cpu, compile=False)
    assert result["ok"] and result["max_difference"] == 0.0, result
    assert result["wrong_mask_difference"] > result["feature_scale"] / 10, result  # on the same (unit) features


def test_gpu_scripts_parse():
    for script in ("gpu.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)


@pytest.mark.slow  # about 8 minutes on 2 cores (torch.compile of two tiny models is most of it)
def test_gpu_script_runs_every_step_in_its_cpu_dry_run(tmp_path):
    # The GPU machine is lent rarely and briefly: its script must not fail for reasons a CPU can show.
    from clip.download import cache_dir

    merges = cache_dir() / "bpe_simple_vocab_16e6.txt.gz"
    if not merges.is_file():
        pytest.skip("needs the BPE merges file in $CLIP_CACHE_DIR")
    carry = tmp_path / "carry"  # as gpu_prepare.sh fills it, but with made-up wheels
    (carry / "cache").mkdir(parents=True)
    (carry / "wheels").mkdir()
    shutil.copyfile(merges, carry / "cache" / merges.name)
    (carry / "wheels" / "ftfy-0.0-py3-none-any.whl").write_bytes(b"ftfy imports here: never installed")
    (carry / "wheels" / "unknown-0.0-py3-none-any.whl").write_bytes(b"not a package gpu.sh installs")
    out = tmp_path / "out"
    environment = {**os.environ, "DRY_RUN": "cpu", "OUT": str(out), "BUDGET_S": "900", "CARRY": str(carry),
                   "CLIP_CACHE_DIR": str(tmp_path / "empty-cache")}  # the carried merges file must be found
    finished = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh")], env=environment, capture_output=True, text=True,
                              timeout=900, check=False)
    log = (out / "gpu.log").read_text()
    assert finished.returncode == 0, log[-3000:]
    assert "FAILED" not in log and "TIMEOUT" not in log and "SKIP" not in log, log[-3000:]
    assert "ftfy-0.0" not in log and "unknown-0.0" not in log and "WARNING" not in log  # only what is missing
    assert "captions: clip.tokenize" in log
    for name in ("train_step.json", "loss_memory.json", "train_step_compile.json", "checks.json",
                 "train_step_rn50.json", "inference.json"):
        assert json.loads((out / name).read_text()), name
    assert all(check["ok"] for check in json.loads((out / "checks.json").read_text())["checks"].values())
    for name in ("profile.txt", "profile_rn50.txt"):  # one architecture each
        profile = (out / name).read_text()
        assert profile.count("== ours:") == 1 and profile.count("== open_clip:") == 1 and "Self CPU" in profile
    page = (out / "gpu_results.md").read_text()
    assert "## Training step, eager, ViT-B/16" in page and "## Contrastive loss memory" in page
    assert "Not run" not in page
    assert "## Training step, torch.compile, ViT-B/16" in page
    assert "## Training step, eager, RN50" in page
    assert "## Inference" in page and "could not read the results" not in page  # each section read its JSON
    assert "## Correctness checks" in page and "FAILED" not in page


def run_gpu_script_with_fake_python(tmp_path: Path, body: str, timeout_s: float = 60,
                                    **variables: str) -> subprocess.CompletedProcess:
    """gpu.sh with $PYTHON a bash script running `body` (its arguments in "$@"), no carried files, OUT in tmp_path
    and `variables` set (DRY_RUN and TMPDIR unset unless given)."""
    python = tmp_path / "python"
    python.write_text(f"#!/usr/bin/env bash\n{body}\n")
    python.chmod(0o755)
    environment = {name: value for name, value in os.environ.items() if name not in ("DRY_RUN", "TMPDIR")}
    environment.update({"OUT": str(tmp_path / "out"), "CARRY": str(tmp_path / "no-carry"), "PYTHON": str(python),
                        **variables})
    return subprocess.run(["bash", str(BENCHMARKS / "gpu.sh")], env=environment, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_gpu_script_runs_the_issue_figures_first_and_shares_the_compile_steps_time(tmp_path):
    # The steps' limits add up to more than the budget: what comes late is what a slow machine loses. The
    # compile step was second, so with the eager and compile steps near their limits the loss figures (an issue
    # target, a minute's work) were skipped; and ours, compiled first, could use up all but 20 s of that step.
    calls = tmp_path / "calls"  # every python call returns at once; the steps' commands are logged
    finished = run_gpu_script_with_fake_python(tmp_path,
                                               f'if [[ "$1" == benchmarks/* ]]; then echo "$*" >> {shlex.quote(str(calls))}; fi')
    assert finished.returncode == 0, finished.stdout + finished.stderr
    steps = calls.read_text().splitlines()
    order = [(line.split()[0].removeprefix("benchmarks/"), "--compile" in line.split(), line.split()[line.split().index(
        "--archs") + 1] if "--archs" in line.split() else None) for line in steps]
    assert order == [("gpu_environment.py", False, None),  # the set-up, one python start
                     ("train_step.py", False, "ViT-B/16"), ("loss_memory.py", False, None),
                     ("train_step.py", True, "ViT-B/16"), ("gpu_checks.py", False, None),
                     ("train_step.py", False, "RN50"), ("inference.py", False, "ViT-B/16"),
                     ("run_all.py", False, None)], steps
    compile_step = steps[3].split()
    time_limit = float(compile_step[compile_step.index("--time-limit") + 1])  # the step's timeout less a margin
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert f"START training step, torch.compile (ViT-B/16) (timeout {time_limit + 10:.0f}s)" in log, log


def test_gpu_environment_finds_the_merges_file_and_which_libraries_import(benchmark_modules, tmp_path, monkeypatch,
                                                                         capsys):
    # gpu.sh's set-up was seven python starts, each importing torch (about 33 s of the GPU budget): one now.
    import gpu_environment

    carry, cache = tmp_path / "carry", tmp_path / "cache"
    (carry / "cache").mkdir(parents=True)
    cache.mkdir()
    monkeypatch.setenv("CLIP_CACHE_DIR", str(cache))
    environment_file = tmp_path / "environment"

    def settings() -> dict[str, str]:
        return dict(line.split("=", 1) for line in environment_file.read_text().splitlines())

    assert gpu_environment.main(["--device", "cpu", "--carry", str(carry), "--env-file", str(environment_file)]) == 0
    assert settings() == {"LIBRARIES": "'ours open_clip'", "INFERENCE_FLAGS": "''"}  # neither has the merges file
    assert "captions: random ids" in capsys.readouterr().out
    (carry / "cache" / gpu_environment.MERGES_FILE_NAME).write_bytes(b"carried")
    assert gpu_environment.main(["--device", "cpu", "--carry", str(carry), "--env-file", str(environment_file)]) == 0
    assert settings()["CLIP_CACHE_DIR"] == shlex.quote(str((carry / "cache").resolve()))  # for the steps (sourced)
    assert "captions: clip.tokenize" in capsys.readouterr().out  # and already for this process's own check
    monkeypatch.setenv("CLIP_CACHE_DIR", str(cache))
    (cache / gpu_environment.MERGES_FILE_NAME).write_bytes(b"cached")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # an import of it raises ImportError
    assert gpu_environment.main(["--device", "cpu", "--carry", str(carry), "--env-file", str(environment_file)]) == 0
    assert settings() == {"LIBRARIES": "ours", "INFERENCE_FLAGS": "--no-open-clip"}  # clip's own cache is used
    assert "open_clip is not importable here" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_environment.main(["--device", "cuda", "--carry", str(carry), "--env-file", str(tmp_path / "x")]) == 1
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_gpu_environment_says_how_to_carry_a_missing_ftfy(tmp_path):
    # The merges file's lookup imported clip (whose tokenizer imports ftfy) before the guarded import: a traceback
    # in place of the line saying what to do. In a process of its own, where clip is not imported yet.
    code = ("import runpy, sys; sys.modules['ftfy'] = None; sys.argv = ['gpu_environment.py', '--device', 'cpu', "
            f"'--carry', {str(tmp_path / 'carry')!r}, '--env-file', {str(tmp_path / 'x')!r}]; "
            f"runpy.run_path({str(BENCHMARKS / 'gpu_environment.py')!r}, run_name='__main__')")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                              timeout=120, check=False)
    assert finished.returncode == 1, finished.stderr
    assert "the library does not import here" in finished.stderr and "gpu_prepare.sh" in finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr


def test_gpu_script_removes_the_temporary_files_its_steps_leave(tmp_path):
    # train_step's compile caches are temporary folders that a step killed at its timeout cannot remove (here
    # every step leaves one and returns): they go with gpu.sh's own, not into the machine's /tmp.
    made = tmp_path / "made"
    finished = run_gpu_script_with_fake_python(tmp_path, f'if [[ "$1" == benchmarks/* ]]; then mktemp -d >> {shlex.quote(str(made))}; fi',
                                               DRY_RUN="cpu")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    folders = made.read_text().split()
    assert len(folders) == 8 and not any(Path(folder).exists() for folder in folders), folders


@pytest.mark.slow  # about 50 s: a step must run to its timeout and on to its kill
def test_gpu_script_ends_within_its_budget_when_a_step_runs_until_killed(tmp_path):
    # The GPU machine's command is given little more than BUDGET_S. The last step's timeout was all that was left
    # of the budget, and a step that catches SIGTERM (the trainer in the checks stops at its next step boundary)
    # runs on for the 10 s until it is killed, the summary page after that: the script ended past BUDGET_S.
    # Here every python call returns at once, except the eager training step, which ignores SIGTERM.
    budget_s = 65
    started = time.monotonic()
    finished = run_gpu_script_with_fake_python(
        tmp_path, 'if [[ "$1" == benchmarks/train_step.py ]]; then trap "" TERM; sleep 300; fi', timeout_s=3 * budget_s,
        DRY_RUN="cpu", BUDGET_S=str(budget_s))
    elapsed = time.monotonic() - started
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert finished.returncode == 0, log
    assert "TIMEOUT training step, eager" in log and "SKIP correctness checks" in log, log
    assert elapsed < budget_s, log


def _has_open_clip() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


def test_pages_read_results_written_before_both_text_lengths(benchmark_modules):
    # --from-results and --gpu-page read folders that older scripts wrote: one text length for the whole
    # report, one "ours" per call with its speedup a number.
    _, train_step, inference, run_all = benchmark_modules
    old_inference_row = {"arch": "ViT-B/32", "image_batch": 16, "text_batch": 64,
                         "max_abs_difference": {"image_features": 1e-6, "text_features": 2e-6},
                         "encode_image": {"ours": {"images_per_s": 9.0}, "open_clip": {"images_per_s": 7.5}, "speedup": 1.2},
                         "encode_text": {"ours": {"texts_per_s": 11.0}, "open_clip": {"texts_per_s": 8.8}, "speedup": 1.25}}
    table = inference.format_rows([old_inference_row])
    assert "| ViT-B/32 | encode_image | 16 | 9.0 | 7.5 | 1.20x | 1.0e-06 |" in table
    assert "| ViT-B/32 | encode_text | 64 | 11.0 | 8.8 | 1.25x | 2.0e-06 |" in table
    old_training = {"text_length": "full", "rows": [{"arch": "RN50", "batch": 16, "threads": 1, "speedup": 1.05,
                                                       "speedup_cpu_time": 1.05, "memory_ratio": 0.96, "results": {}}]}
    assert "all 77 text positions in both" in run_all.training_targets(old_training)[0][0]
    # A ratio just short of the target reads as short, not as the target rounded
    old_training["rows"][0]["speedup"] = 1.1967
    assert run_all.training_targets(old_training)[0][1:] == ["1.197x (by CPU time: 1.050x)", "not met (0.003x short)"]


def _script_main(name: str, monkeypatch):
    """benchmarks/<name>.py's main as a function of its arguments (two of them read sys.argv)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__(name)

    def main(argv: list[str]):
        if name in ("tokenizer_speed", "loss_memory"):
            monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
            return module.main()
        return module.main(argv)

    return module, main


def _refuses_before_measuring(name: str, argv: list[str], monkeypatch, capsys) -> str:
    """The usage error `name` gives for argv, having measured nothing; returns what it said."""
    module, main = _script_main(name, monkeypatch)
    import common

    monkeypatch.setattr(common, "run_job", lambda *a, **k: pytest.fail("measured anyway"))
    for measurement in ("run", "run_arch", "run_in_subprocess", "write_data", "run_benchmark"):
        if hasattr(module, measurement):
            monkeypatch.setattr(module, measurement, lambda *a, **k: pytest.fail("measured anyway"))
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name, argv, said", [
    # A negative step count gave negative samples/s, 0 steps or a batch of 0 a traceback in every run
    ("train_step", ["--steps", "-1"], "--steps: must be >= 1, got -1"),
    ("train_step", ["--steps", "0"], "--steps: must be >= 1, got 0"),
    ("train_step", ["--batch-sizes", "16", "0"], "--batch-sizes: must be >= 1, got 0"),
    ("train_step", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ("train_step", ["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    ("train_step", ["--threads", "-2"], "--threads: must be >= 0, got -2"),
    # Every run was abandoned at once as timed out, and the script went on to the next
    ("train_step", ["--job-timeout", "0"], "--job-timeout: must be > 0, got 0"),
    ("train_step", ["--job-timeout", "-5"], "--job-timeout: must be > 0, got -5"),
    ("inference", ["--text-batch", "0"], "--text-batch: must be >= 1, got 0"),
    ("inference", ["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    ("loss_memory", ["--chunk-sizes", "0"], "--chunk-sizes: must be >= 1, got 0"),
    ("loss_memory", ["--batch-sizes", "-4096"], "--batch-sizes: must be >= 1, got -4096"),
    ("tokenizer_speed", ["--captions", "0"], "--captions: must be >= 1, got 0"),
    ("tokenizer_speed", ["--non-ascii-fraction", "1.5"], "--non-ascii-fraction: must be between 0 and 1"),
    ("loader_speed", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("loader_speed", ["--workers", "0", "-1"], "--workers: must be >= 0, got -1"),
    # The first batch is not timed: fewer than two batches' images ended in StopIteration's traceback
    ("loader_speed", ["--images", "40", "--batch-size", "32"], "--images 40: at least 64"),
    ("run_all", ["--threads", "-1"], "--threads: must be >= 0, got -1"),
    ("run_all", ["--timeout", "0"], "--timeout: must be > 0"),
])
def test_scripts_refuse_invalid_counts_before_measuring(name, argv, said, monkeypatch, capsys):
    assert said in _refuses_before_measuring(name, argv, monkeypatch, capsys)


@pytest.mark.parametrize("name, flag", [("train_step", "--json"), ("inference", "--json"),
                                        ("loss_memory", "--json"), ("tokenizer_speed", "--json"),
                                        ("loader_speed", "--json"), ("run_all", "--output"),
                                        ("run_all", "--results-dir")])
def test_scripts_refuse_an_output_they_cannot_write_before_measuring(name, flag, tmp_path, monkeypatch, capsys):
    # The results were written only at the end (or after the first run of minutes): a folder that is a file,
    # or a read-only one, lost the whole run's work to a traceback
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / ("results" if flag == "--results-dir" else "results.json")
    said = _refuses_before_measuring(name, [flag, str(target)], monkeypatch, capsys)
    assert f"{flag} {target}: cannot write results to {blocker}" in said


def test_run_all_from_results_names_the_file_it_lacks(tmp_path, monkeypatch, capsys):
    said = _refuses_before_measuring("run_all", ["--from-results", str(tmp_path)], monkeypatch, capsys)
    assert f"--from-results {tmp_path}: no run_all.json there" in said


@pytest.mark.parametrize("name", ["train_step", "inference"])
def test_unknown_architecture_is_refused_before_any_run(name, monkeypatch, capsys):
    # It was found in each fresh-process run in turn (two processes per configuration and repeat), and the
    # script still exited 0
    said = _refuses_before_measuring(name, ["--archs", "ViT-B/32", "ViT-X/99"], monkeypatch, capsys)
    assert "--archs 'ViT-X/99': Unknown architecture 'ViT-X/99'" in said and "Known: RN50" in said


def test_targets_say_open_clip_was_not_installed_rather_than_dumping_results(benchmark_modules, tmp_path, monkeypatch,
                                                                          capsys):
    # Without open_clip, train_step measures ours only; the page's targets printed the first 120 characters
    # of ours' results dict as the reason
    common, train_step, _, run_all = benchmark_modules

    def fake_run_job(script, job, timeout_s=None):
        return {"samples_per_s": 2.0, "samples_per_cpu_s": 2.0, "peak_gib": 1.0, "training_peak_gib": 0.5,
                "caption_tokens": {}, "text_source": "fake", "parameters": 1, "text_positions": 32}

    monkeypatch.setattr(common, "run_job", fake_run_job)
    monkeypatch.setattr(train_step, "importlib_missing", lambda name: name == "open_clip")
    output = tmp_path / "train_step.json"
    train_step.main(["--archs", "ViT-B/32", "--batch-sizes", "2", "--repeats", "1", "--device", "cpu",
                     "--json", str(output)])
    assert "open_clip is not installed (pip install -e .[bench])" in capsys.readouterr().err
    [target] = run_all.training_targets(json.loads(output.read_text()))
    assert target[1:] == ["-", "not measured: open_clip is not installed (pip install -e .[bench])"]
    # a run that failed says why
    failed = {"rows": [{"arch": "RN50", "batch": 16, "threads": 1, "results": {
        "ours": {"samples_per_s": 1.0}, "open_clip": {"error": "exit code 1: MemoryError"}}}]}
    assert run_all.training_targets(failed)[0][2] == "not measured: open_clip: exit code 1: MemoryError"


def test_run_all_says_up_front_that_open_clip_is_missing(benchmark_modules, tmp_path, monkeypatch, capsys):
    # Found only on the page, after the run: every comparison then measures ours alone
    _, _, _, run_all = benchmark_modules
    monkeypatch.setattr(run_all, "importlib_missing", lambda name: name == "open_clip")
    monkeypatch.setattr(run_all, "run_benchmark", lambda name, argv, results, timeout_s: {"command": " ".join(argv)})
    run_all.main(["--quick", "--only", "tokenizer", "--results-dir", str(tmp_path), "--output", str(tmp_path / "p.md")])
    assert "open_clip is not installed (pip install -e .[bench])" in capsys.readouterr().err


def test_loss_target_says_what_stood_in_for_the_naive_loss_and_why_it_was_not_measured(benchmark_modules):
    # The target reads "within 1e-05 of naive"; at 32768 the naive loss needs ~24 GiB and is skipped, and the
    # status said "vs reference" with no word of what that is or why
    run_all = benchmark_modules[3]
    rows = [{"batch": 32768, "method": "chunked", "chunk_size": 512, "extra_peak_gib": 0.58}]
    verification = {"batch": 32768, "chunk_size": 512, "naive": "skipped: needs more than the 21 GiB available",
                    "loss vs reference": 8.7e-8, "grad_image vs reference": 1.5e-6}
    _, measured, status = run_all.loss_target({"rows": rows, "verification": verification})
    assert "vs reference (the whole-matrix loss computed without autograd; naive skipped: needs more than the " \
           "21 GiB available)" in measured and status == "met"
    with_naive = {key: value for key, value in verification.items() if key != "naive"} | {"loss vs naive": 1e-7}
    assert run_all.loss_target({"rows": rows, "verification": with_naive})[1].endswith("vs naive, reference")
    # Each float32 method's distance from the exact result, where the check computed it (the status stays "vs naive")
    exact = with_naive | {"float64 error of chunked: grad_text": 7.3e-7, "float64 error of chunked: loss": 2e-8,
                          "float64 error of naive: grad_text": 1.2e-6, "float64": "not a number"}
    measured = run_all.loss_target({"rows": rows, "verification": exact})[1]
    assert measured.endswith("vs naive, reference; from float64: chunked 7.3e-07, naive 1.2e-06")
    # An exactness check that failed at 32768 is not a --quick run
    failed = {"rows": rows, "verification": {"batch": 32768, "chunk_size": 512, "error": "MemoryError"}}
    assert run_all.loss_target(failed)[2] == "not measured: the exactness check failed: MemoryError"


def test_tokenizer_target_names_every_shortfall(benchmark_modules):
    run_all = benchmark_modules[3]
    results = {"clip.tokenizer": {"captions_per_cpu_s": 200.0, "ids_identical": True},
               "open_clip": {"captions_per_cpu_s": 100.0, "ids_identical": False}}
    name, _, status = run_all.tokenizer_target({"results": results})
    assert status == "not met (1.00x short; ids differ)"
    assert "captions per CPU-second >= 3.0x open_clip" in name  # what tokenizer_speed.py measures, not wall time
    results["clip.tokenizer"]["captions_per_cpu_s"] = 400.0
    assert run_all.tokenizer_target({"results": results})[2] == "not met (ids differ)"


def test_tokenizer_benchmark_reports_the_ratio_its_target_is_about(tmp_path, monkeypatch, capsys):
    # The target is ours' captions per CPU-second over open_clip's; the script showed only each one's ratio
    # to the pure-Python reference, so a user checking the target had to divide two columns
    pytest.importorskip("open_clip")
    from clip.download import cache_dir

    if not (cache_dir() / "bpe_simple_vocab_16e6.txt.gz").is_file():
        pytest.skip("needs the BPE merges file in $CLIP_CACHE_DIR")
    _, main = _script_main("tokenizer_speed", monkeypatch)
    output = tmp_path / "tokenizer.json"
    main(["--captions", "20", "--repeats", "1", "--json", str(output)])
    results = json.loads(output.read_text())["results"]
    ours, theirs = results["clip.tokenizer"], results["open_clip"]
    assert ours["speedup_vs_open_clip"] == pytest.approx(ours["captions_per_cpu_s"] / theirs["captions_per_cpu_s"])
    assert theirs["speedup_vs_open_clip"] == 1.0
    assert "| vs open_clip |" in capsys.readouterr().out


def test_loader_speed_writes_its_data_dir_again_for_another_number_of_images(tmp_path, monkeypatch, capsys,
                                                                            single_torch_thread):
    # --data-dir was reused whatever --images said: after a run with 150 images, --images 64 measured the 150
    # (the plain pipeline reads every image file of the folder) and read a shard range that left some out.
    # single_torch_thread puts back the one thread main() sets
    module, main = _script_main("loader_speed", monkeypatch)
    from PIL import Image

    monkeypatch.setattr(module, "photo_like", lambda index: Image.new("RGB", (8, 8), (index % 256, 0, 0)))
    monkeypatch.setattr(module, "make_tokenizer", lambda: (None, "stand-in"))
    measured = []
    monkeypatch.setattr(module, "run_plain",
                        lambda folder, *args: measured.append(len(module.PlainFiles(folder, 8))) or (1.0, 1.0))
    monkeypatch.setattr(module, "run_ours", lambda *args: (1.0, 1.0))
    written = []
    write_data = module.write_data
    monkeypatch.setattr(module, "write_data", lambda folder, count: written.append(count) or write_data(folder, count))
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")  # not the benchmark's: kept

    def run(images: int) -> None:
        main(["--data-dir", str(data), "--images", str(images), "--batch-size", "32", "--workers", "0", "--repeats", "1"])

    run(150)
    run(64)
    assert "holds other data (images 150 (not 64)): writing it again" in capsys.readouterr().err
    run(64)  # the same data again: reused
    assert written == [150, 64] and measured == [150, 64, 64]
    assert sorted(path.name for path in (data / "shards").iterdir()) == ["bench-000000.tar", "sizes.json"]
    assert json.loads((data / "shards" / "sizes.json").read_text()) == {"bench-000000.tar": 64}
    assert len((data / "train.csv").read_text().splitlines()) == 1 + 64
    assert (data / "notes.txt").read_text() == "mine"


def test_inference_keeps_each_finished_architecture_when_stopped_midway(benchmark_modules, tmp_path, monkeypatch):
    # gpu.sh runs inference last, in what is left of its budget, and stops it at its time limit: the JSON was
    # written only once every architecture was timed, so a run stopped during the second left nothing.
    inference = benchmark_modules[2]
    timed = []

    def run_arch(arch, args, device, with_open_clip):
        if timed:
            raise KeyboardInterrupt  # the time limit, during the second architecture
        timed.append(arch)
        return {"arch": arch}

    monkeypatch.setattr(inference, "run_arch", run_arch)
    output = tmp_path / "inference.json"
    with pytest.raises(KeyboardInterrupt):
        inference.main(["--archs", "ViT-B/32", "RN50", "--device", "cpu", "--threads", "0", "--no-open-clip",
                        "--json", str(output)])
    kept = json.loads(output.read_text())
    assert [row["arch"] for row in kept["rows"]] == ["ViT-B/32"] and kept["device"] == "cpu"


def test_results_rewritten_after_each_measurement_replace_the_file_whole(benchmark_modules, tmp_path):
    # The scripts rewrite their JSON after every measurement; a write cut short (here by a value that cannot be
    # written, after the rows before it were) truncated the file, the results measured so far with it
    common = benchmark_modules[0]
    path = tmp_path / "train_step.json"
    common.write_json(path, {"rows": [{"samples_per_s": 1.0}]})
    with pytest.raises(TypeError):
        common.write_json(path, {"rows": [{"samples_per_s": 1.0}], "later": object()})
    assert json.loads(path.read_text()) == {"rows": [{"samples_per_s": 1.0}]}
    assert [file.name for file in tmp_path.iterdir()] == ["train_step.json"]  # no temporary left


def test_gpu_page_is_written_when_one_results_file_was_cut_off_mid_write(benchmark_modules, tmp_path):
    # gpu.sh's time limit kills a step 10 s after asking it to stop, which may be while it rewrites its JSON: the
    # summary page then failed as a whole, the other steps' results with it.
    run_all = benchmark_modules[3]
    checks = {"device": "cuda", "checks": {"normalizer": {"ok": True, "max_difference": 0.0}}}
    (tmp_path / "checks.json").write_text(json.dumps(checks))
    (tmp_path / "loss_memory.json").write_text('{"rows": [{"batch": 4096, "method": "na')
    run_all.main(["--gpu-page", str(tmp_path)])
    page = (tmp_path / "gpu_results.md").read_text()
    assert "**Failed:** loss_memory.json could not be read" in page
    assert "| normalizer | ok |" in page and "## Training step, eager, ViT-B/16\n\nNot run." in page


def test_gpu_page_is_written_when_a_results_file_holds_something_unexpected(benchmark_modules, tmp_path):
    # The targets were computed outside the sections' guard: one odd file (a row without its results, a list)
    # raised in the summary script, and gpu.sh's run ended without a page for any of the figures it measured
    run_all = benchmark_modules[3]
    train = {"device": "cuda:0", "repeats": 2, "warmup": 5, "steps": 20, "rows": [{
        "arch": "ViT-B/16", "batch": 256, "threads": 0, "precision": "bf16", "compile": False, "speedup": 1.3,
        "results": {"ours": {"samples_per_s": 2000.0, "peak_gib": 30.0, "mfu": 0.5},
                    "open_clip": {"error": "timed out after 90 s"}}}]}
    (tmp_path / "train_step.json").write_text(json.dumps(train))
    (tmp_path / "train_step_compile.json").write_text(json.dumps({"rows": [{"arch": "ViT-B/16"}]}))
    (tmp_path / "inference.json").write_text("[]")
    (tmp_path / "train_step_rn50.json").write_text(json.dumps({**train, "rows": [{**train["rows"][0], "arch": "RN50"}]}))
    run_all.main(["--gpu-page", str(tmp_path)])
    page = (tmp_path / "gpu_results.md").read_text()
    assert "| ViT-B/16, batch 256, bf16: MFU >= 45% | 50.0% (open_clip not measured) | met |" in page
    assert "| from train_step_compile.json | - | could not be read: KeyError('results') |" in page
    assert "**Failed:** inference.json holds no results object" in page
    assert "## Training step, eager, RN50" in page and "| RN50, batch 256, bf16: MFU >= 45% | 50.0%" in page


def test_loss_target_blames_quick_only_when_the_run_did_not_ask_for_the_target_batch(benchmark_modules):
    # gpu.sh asks for 32k: a step cut at its time limit before that batch was told to "run without --quick"
    run_all = benchmark_modules[3]
    small = [{"batch": 4096, "method": "chunked", "chunk_size": 512, "extra_peak_gib": 0.1}]
    quick = run_all.loss_target({"rows": small, "verification": None, "batch_sizes": [4096]})
    assert quick[2].startswith(f"not measured at {run_all.LOSS_BATCH} (run without --quick)")
    cut = run_all.loss_target({"rows": small, "verification": None, "batch_sizes": [4096, run_all.LOSS_BATCH]})
    assert cut[2].startswith(f"not measured at {run_all.LOSS_BATCH} (the run stopped before it)")


def test_the_cpu_flop_count_includes_attention_as_the_devices_count_does(benchmark_modules):
    # FlopCounterMode has no formula for the CPU's attention kernel: it counted 0 for it, and the CPU figures
    # (ViT-B/32's 13.6 GFLOPs) were 1-2% below clip.throughput's count and the GPU's
    from clip.throughput import training_flops_per_sample

    _, train_step, _, _ = benchmark_modules
    module = train_step.build_ours(json.dumps(TINY_VIT), torch.device("cpu"), "auto")[0]
    images = torch.zeros(2, 3, TINY_VIT["vision"]["image_size"], TINY_VIT["vision"]["image_size"])
    texts = torch.randint(1, 100, (2, 77))
    texts[:, -1] = 49407  # the end-of-text token: all 77 positions computed
    counted = train_step.count_flops_per_sample({"library": "ours"}, module, images, texts)
    assert counted == training_flops_per_sample(module.clip.config, 77)


def test_the_loss_target_takes_the_memory_of_the_chunk_size_whose_exactness_was_checked(benchmark_modules):
    # The lowest peak over every chunk size was reported beside the exactness of the first one alone
    _, _, _, run_all = benchmark_modules
    report = {"rows": [{"batch": 32768, "method": "chunked", "chunk_size": 512, "extra_peak_gib": 0.6},
                       {"batch": 32768, "method": "chunked", "chunk_size": 128, "extra_peak_gib": 0.3}],
              "verification": {"batch": 32768, "chunk_size": 512, "loss vs reference": 2e-7}}
    assert "extra peak 0.600 GiB (chunk 512)" in run_all.loss_target(report)[1]
