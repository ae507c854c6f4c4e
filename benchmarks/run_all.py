"""Runs every benchmark and writes docs/benchmarks.md: the numbers, the machine, and each target's status.

    CLIP_CACHE_DIR=/tmp/clip-cache python benchmarks/run_all.py            # ~60 min on 2 shared cores
    CLIP_CACHE_DIR=/tmp/clip-cache python benchmarks/run_all.py --quick    # smaller settings, ~1/4 of that
    python benchmarks/run_all.py --only train_step inference --results-dir bench-results
    python benchmarks/run_all.py --results-dir bench-results --resume     # finish an interrupted run
    python benchmarks/run_all.py --from-results bench-results              # rewrite the page only

Each benchmark script runs as its own process with --json; a script that fails or times out is reported
as such on the page instead of stopping the others. The training and inference comparisons use one torch
thread by default (--threads): on a small machine shared with other jobs, two OpenMP threads fighting
other processes for two cores made steps up to twice as slow as one thread, at random; one thread per
process gives steady medians. On a quiet machine, --threads 2 (or more) measures the multi-core case.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from train_step import OPEN_CLIP_MISSING, display_name, importlib_missing, format_rows as format_train_rows  # noqa: E402
from inference import format_rows as format_inference_rows  # noqa: E402

from clip.cli.common import non_negative_int  # noqa: E402

BENCHMARKS = ("tokenizer", "loss_memory", "loader", "train_step", "inference")
HERE = Path(__file__).resolve().parent
SPEED_TARGET, MEMORY_TARGET, TOKENIZER_TARGET = 1.2, 0.9, 3.0
TEXT_LENGTH_NAMES = {"trimmed": "ours' text trimmed as clip.train runs it", "full": "all 77 text positions in both"}
LOSS_BATCH, LOSS_TOLERANCE, LOSS_MEMORY_GIB = 32768, 1e-5, 1.0


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command line of each benchmark, full or --quick."""
    quick = args.quick
    threads = [str(args.threads)]
    loss_batches = ["4096", "8192"] if quick else ["4096", str(LOSS_BATCH)]
    return {
        "tokenizer": ["tokenizer_speed.py", "--captions", "5000" if quick else "20000", "--repeats", "2" if quick else "3"],
        # At 32k a chunk of 2048 rows needs over 1 GiB and each configuration takes minutes here: 512 only.
        "loss_memory": ["loss_memory.py", "--batch-sizes", *loss_batches, "--chunk-sizes", *(["512", "2048"] if quick else ["512"]),
                        "--verify-batch", "4096" if quick else str(LOSS_BATCH)],
        "loader": ["loader_speed.py", "--images", "300" if quick else "1000", "--workers", "0", "1",
                   "--repeats", "1" if quick else "2"],
        # Ours twice, each against the same open_clip runs: trimmed text as clip.train runs it, and all 77
        # positions, open_clip's inputs.
        "train_step": ["train_step.py", "--archs", "ViT-B/32", "RN50", "--batch-sizes", *(["16"] if quick else ["16", "32"]),
                       "--threads", *threads, "--repeats", "2" if quick else "3", "--warmup", "1",
                       "--steps", "1" if quick else "2", "--text-length", "trimmed", "full"],
        "inference": ["inference.py", "--archs", "ViT-B/32", "RN50", "--image-batch", "16", "--text-batch", "64",
                      "--threads", *threads, "--repeats", "3" if quick else "5", "--text-length", "trimmed", "full"],
    }


def run_benchmark(name: str, argv: list[str], results: Path, timeout_s: float) -> dict:
    """Runs one script with --json into `results`; returns its report, or {"error": ...}."""
    output = results / f"{name}.json"
    command = [sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(output)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, cwd=common.REPO_ROOT, env=environment, timeout=timeout_s,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        log = finished.stdout
        problem = None if finished.returncode == 0 else f"exit code {finished.returncode}"
    except subprocess.TimeoutExpired as expired:
        log = expired.stdout or ""
        log = log.decode() if isinstance(log, bytes) else log
        problem = f"timed out after {timeout_s:.0f} s"
    (results / f"{name}.log").write_text(log)
    seconds = time.perf_counter() - started
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {problem or 'done'} in {seconds:.0f} s", file=sys.stderr, flush=True)
    report = json.loads(output.read_text()) if output.exists() else {}
    if problem:
        tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or [""]
        report["error"] = f"{problem}: {tail[0][:200]}"
    report["wall_s"] = seconds
    report["command"] = " ".join(argv)
    return report


# ---- targets ---------------------------------------------------------------------------------------


def status(met: bool, distance: str) -> str:
    return "met" if met else f"not met ({distance})"


def training_targets(report: dict) -> list[list[str]]:
    rows = []
    for row in report.get("rows", []):
        # Results written before --text-length took both lengths hold it once, for the whole report.
        text = TEXT_LENGTH_NAMES[row.get("text_length", report.get("text_length", "trimmed"))]
        name = f"CPU training step, {display_name(row['arch'])}, batch {row['batch']}, {row['threads']} thread(s), fp32, {text}"
        speed, memory = row.get("speedup"), row.get("memory_ratio")
        if speed is None or memory is None:
            rows.append([name, "-", "not measured: " + why_unmeasured(row, report.get("skipped_libraries", {}))])
            continue
        cpu_speed = row.get("speedup_cpu_time")
        # Three decimals, as for memory: 1.197x would read "1.20x, not met" at two.
        rows.append([f"{name}: samples/s >= {SPEED_TARGET}x open_clip",
                     f"{speed:.3f}x (by CPU time: {cpu_speed:.3f}x)",
                     status(speed >= SPEED_TARGET, f"{SPEED_TARGET - speed:.3f}x short")])
        rows.append([f"{name}: peak memory <= {MEMORY_TARGET}x open_clip", f"{memory:.3f}x",
                     status(memory <= MEMORY_TARGET, f"{memory - MEMORY_TARGET:.3f}x over")])
    return rows


def why_unmeasured(row: dict, skipped: dict[str, str]) -> str:
    """Why a configuration has no ratio: a library left out (open_clip not installed) or a run's error."""
    for library in ("ours", "open_clip"):
        result = row["results"].get(library)
        if result is None:
            return skipped.get(library, f"{library} not run")
        if "error" in result:
            return f"{library}: {result['error']}"[:200]
    return "no ratio in the results"


def tokenizer_target(report: dict) -> list[str]:
    # Per CPU-second, as the tokenizer benchmark measures: steadier than wall time on a shared machine
    name = f"Tokenizer: captions per CPU-second >= {TOKENIZER_TARGET}x open_clip, identical ids"
    results = report.get("results", {})
    if "clip.tokenizer" not in results or "open_clip" not in results:
        return [name, "-", "not measured: " + report.get("error", OPEN_CLIP_MISSING)]
    speed = results["clip.tokenizer"]["captions_per_cpu_s"] / results["open_clip"]["captions_per_cpu_s"]
    identical = all(r.get("ids_identical") for r in results.values())
    shortfalls = []  # both, where both fall short
    if speed < TOKENIZER_TARGET:
        shortfalls.append(f"{TOKENIZER_TARGET - speed:.2f}x short")
    if not identical:
        shortfalls.append("ids differ")
    distance = "; ".join(shortfalls)
    return [name, f"{speed:.2f}x, ids identical: {identical}", status(speed >= TOKENIZER_TARGET and identical, distance)]


def float64_errors(verification: dict) -> str:
    """"; from float64: chunked 7.3e-07, naive 1.2e-06": each float32 method's largest relative difference
    from the exact loss and gradients, where the check computed them. It says whether a difference from
    naive is the chunked loss's error or float32 rounding in both; the target itself stays "vs naive"."""
    prefix = "float64 error of "
    worst = {}
    for key, value in verification.items():
        if key.startswith(prefix) and isinstance(value, float):
            method = key[len(prefix):].split(":")[0]
            worst[method] = max(worst.get(method, 0.0), value)
    shown = [f"{method} {worst[method]:.1e}" for method in ("chunked", "naive", "reference") if method in worst]
    return f"; from float64: {', '.join(shown)}" if shown else ""


def loss_target(report: dict) -> list[str]:
    name = f"Chunked loss at batch {LOSS_BATCH}, width 512: within {LOSS_TOLERANCE:g} of naive, extra peak < {LOSS_MEMORY_GIB} GiB"
    rows = [r for r in report.get("rows", []) if r.get("batch") == LOSS_BATCH and r.get("method") == "chunked"
            and "extra_peak_gib" in r]
    verification = report.get("verification") or {}
    errors = {k: v for k, v in verification.items() if " vs " in k and isinstance(v, float)}
    if verification.get("batch") == LOSS_BATCH and "error" in verification:
        return [name, "-", f"not measured: the exactness check failed: {verification['error']}"[:300]]
    if not rows or verification.get("batch") != LOSS_BATCH or not errors:
        measured = ", ".join(f"batch {r['batch']} chunk {r['chunk_size']}: {r['extra_peak_gib']:.2f} GiB"
                             for r in report.get("rows", []) if r.get("method") == "chunked" and "extra_peak_gib" in r)
        # A run asked for that batch (gpu.sh's, the full page's) and stopped before it: --quick is not the cause
        asked = LOSS_BATCH in report.get("batch_sizes", ()) or verification.get("batch") == LOSS_BATCH
        why = "the run stopped before it" if asked else "run without --quick"
        return [name, measured or "-", f"not measured at {LOSS_BATCH} ({why})" + (
            f"; {report['error']}" if "error" in report else "")]
    # The memory of the chunk size whose exactness was checked: the target is one configuration meeting both (the
    # lowest peak of all chunk sizes was reported beside the first chunk size's exactness)
    verified = [r for r in rows if r.get("chunk_size") == verification.get("chunk_size")]
    best = min(verified or rows, key=lambda r: r["extra_peak_gib"])
    worst_error = max(errors.values())
    compared = sorted({k.split(" vs ")[1] for k in errors})
    # Where naive autograd does not fit (~24 GiB at 32k), the reference, the same whole-matrix loss with its
    # gradient written out by hand (loss_memory.whole_matrix_reference), stands in for it.
    stand_in = (f" (the whole-matrix loss computed without autograd; naive {verification['naive']})"
                if "naive" not in compared and isinstance(verification.get("naive"), str) else "")
    measured = (f"extra peak {best['extra_peak_gib']:.3f} GiB (chunk {best['chunk_size']}); largest relative "
                f"difference {worst_error:.1e} vs {', '.join(compared)}{stand_in}{float64_errors(verification)}")
    met = best["extra_peak_gib"] < LOSS_MEMORY_GIB and worst_error <= LOSS_TOLERANCE
    return [name, measured, status(met, f"{best['extra_peak_gib']:.2f} GiB, difference {worst_error:.1e}")]


def gpu_target() -> list[str]:
    return ["H200, bf16: ViT-B/16 training MFU >= 45% and >= 1.2x open_clip's samples/s", "-",
            "not measured here (no GPU on this machine): run `bash benchmarks/gpu.sh` on the GPU machine "
            "(`bash benchmarks/gpu_prepare.sh` first where it has no network)"]


# ---- the page ----------------------------------------------------------------------------------------


def machine_lines(machine: dict, loads: list[list[float]]) -> list[str]:
    peak_load = max((load[0] for load in loads), default=None)
    lines = [
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB memory"
        + (f"; GPU: {machine['gpu']}" if machine.get("gpu") else ""),
        f"- torch {machine['torch']}, open_clip {machine.get('open_clip')}, Python {machine['python']}",
        f"- date: {machine['date_utc']}",
    ]
    if peak_load is not None:
        lines.append(f"- load average (1 min) seen between benchmarks: {min(l[0] for l in loads):.1f} to "
                     f"{peak_load:.1f} on {machine['cores']} cores (other jobs shared the machine)")
    return lines


def generic_table(rows: list[dict]) -> str:
    """Any list of flat dicts as a table (for scripts whose fields this page does not interpret)."""
    if not rows:
        return "(no rows)"
    headers = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(key, "")) for key in headers] for row in rows]
    return common.markdown_table(headers, cells)


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:,.2f}"
    return str(value)


def section(title: str, report: dict | None, body) -> list[str]:
    lines = [f"## {title}", ""]
    if not report:
        return lines + ["Not run.", ""]
    if "command" in report:
        took = f" ({report['wall_s']:.0f} s)" if "wall_s" in report else ""
        lines += [f"`python benchmarks/{report['command']}`{took}", ""]
    if "error" in report:
        lines += [f"**Failed:** {report['error']}", ""]
    try:
        lines += [body(report), ""]
    except (KeyError, TypeError, ValueError, AttributeError) as problem:  # a changed or partial JSON: say so
        lines += [f"(could not read the results: {problem!r})", ""]
    return lines


def loader_table(report: dict) -> str:
    return generic_table(report["rows"]) + (
        "\n\nEach pipeline ends with the same normalised float batch of 224-pixel images: ours hands over uint8 "
        "pixels and normalises them in the main process (training does that on its device), inside the "
        "measured time. Per CPU-second counts the main process and its workers."
    )


def tokenizer_table(report: dict) -> str:
    rows = [{"tokenizer": name, **values} for name, values in report["results"].items()]
    return f"{report['captions']} fresh captions, best of {report['repeats']} runs.\n\n" + generic_table(rows)


def loss_table(report: dict) -> str:
    text = generic_table(report["rows"])
    verification = report.get("verification")
    if verification:
        text += "\n\nExactness (max |chunked - other| / max |other|):\n\n" + "\n".join(
            f"- {key}: {format_cell(value)}" for key, value in verification.items())
    return text


def training_table(report: dict) -> str:
    device_type = report["device"].split(":")[0]
    cpu_time = " Samples/CPU-s divides by the process's CPU time." if device_type == "cpu" else ""  # a CPU column
    return (f"Median of {report['repeats']} fresh-process runs per library, alternating; {report['warmup']} warm-up "
            f"step(s), then {report['steps']} timed step(s).{cpu_time} "
            f"{TEXT_NOTE}{malloc_note(report)}\n\n" + format_train_rows(report["rows"], device_type))


def malloc_note(report: dict) -> str:
    """Which processes kept freed memory (train_step.py --cpu-malloc); pages made before it existed: neither."""
    if not report.get("device", "").startswith("cpu"):
        return ""
    return {"trainers": " Freed memory kept for reuse (`clip.cpu_memory`): ours, as clip.train does; open_clip at "
                        "glibc's defaults.",
            "both": " Freed memory kept for reuse (`clip.cpu_memory`) in both.",
            "neither": " glibc's malloc defaults in both."}[report.get("cpu_malloc", "neither")]


def inference_table(report: dict) -> str:
    return (f"{report['threads']} thread(s), {report['precision']}, median of {report['repeats']} calls each, "
            f"same weights in both libraries. {TEXT_NOTE}\n\n" + format_inference_rows(report["rows"]))


TEXT_NOTE = ("Text: ours runs its text tower to the batch's last end-of-text token (trimmed, as clip.train and "
             "encode_text do) or, with `--text-length full`, all 77 positions, open_clip's inputs; open_clip always "
             "runs all 77 (see above).")


def write_page(path: Path, reports: dict[str, dict], invocation: str, machine: dict, loads: list) -> None:
    targets = training_targets(reports.get("train_step", {}))
    targets += [tokenizer_target(reports.get("tokenizer", {})), loss_target(reports.get("loss_memory", {})), gpu_target()]
    lines = ["# Benchmarks", "", "Made by:", "", "```", invocation, "```", "",
             "`CLIP_CACHE_DIR=/tmp/clip-cache python benchmarks/run_all.py` reproduces all of it in one go "
             "(`--quick` for a shorter run).", "", *machine_lines(machine, loads), "",
             "## Targets", "", common.markdown_table(["target", "measured", "status"], targets), "",
             METHOD_NOTES, ""]
    lines += section("Training step (CPU)", reports.get("train_step"), training_table)
    lines += section("Inference", reports.get("inference"), inference_table)
    lines += section("Tokenizer", reports.get("tokenizer"), tokenizer_table)
    lines += section("Contrastive loss memory", reports.get("loss_memory"), loss_table)
    lines += section("Data loader", reports.get("loader"), loader_table)
    lines += ["## GPU", "", "Not measured on this machine. `bash benchmarks/gpu.sh` (one H200, under 8 minutes) writes "
              "the bf16 training throughput, MFU, a torch.profiler summary, the loss-memory figures and correctness checks of GPU-only paths to `$OUT`. "
              "On a GPU machine without network access, run `bash benchmarks/gpu_prepare.sh` beforehand where pip "
              "works and send `.gpu_carry/` along: it holds the wheels that machine lacks (ftfy, open_clip_torch) "
              "and the BPE merges file. `DRY_RUN=cpu bash benchmarks/gpu.sh` runs the same steps with tiny models "
              "on the CPU, to check the script itself (`pytest --runslow tests/test_benchmarks_smoke.py`).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


METHOD_NOTES = """How to read the numbers:
- Training step = both encoders, the loss, backward and the optimiser step, each library as its own training
  script does it (ours: `ContrastiveModel`, `build_loss`, `build_optimizer`, whose AdamW is torch's fused one;
  open_clip: its model with QuickGELU, `ClipLoss`, torch's default AdamW, the for-loop one on the CPU, with its
  weight-decay groups). Same random images, same realistic captions (8-30 BPE tokens through `clip.tokenize`,
  padded to 77) for both. On the CPU, ours' process keeps freed memory for the next step, as `clip.train` does
  there (`clip.cpu_memory`: glibc's malloc otherwise maps and zeroes the activations' pages afresh every
  step); open_clip's stays at glibc's defaults, as its trainer leaves it (`--cpu-malloc both` keeps it in
  both).
- Text length, two rows per configuration (each way exact: the same features and gradients):
  - "trimmed": ours runs the text tower only up to the batch's last end-of-text token, rounded up to a
    multiple of 8 (32 of the 77 positions for these captions), as `clip.train` and `encode_text` do by
    default; open_clip runs all 77. Most of these rows' speed ratio, part of their memory ratio and most of
    the encode_text ratio come from the shorter text;
  - "all 77" (`--text-length full`): ours runs every position too, open_clip's inputs. A dataset whose
    longest caption in a batch nears 77 tokens trains as these rows do.
- Ours computes less than open_clip in both, by design and exactly: the last block of each tower computes
  only the position read from it (the class token, the end-of-text token; keys and values still from every
  position), about 7% of a 12-layer tower's matrix work, and the ResNet attention pool only the one query it
  keeps. Forward GFLOPs per sample (torch's FlopCounterMode, `--count-flops`, attention included): ViT-B/32
  ours 10.5 (trimmed) or 13.8 (all 77 positions), open_clip 14.8; RN50 ours 13.9 or 17.1, open_clip 18.2.
- "Training peak" is the process's resident-memory high-water mark minus its resident memory just before
  the model is built (libraries imported, input batch made): weights, gradients, AdamW state, activations
  and temporaries. The JSON results also hold the whole-process high-water mark (`peak_gib`), which adds
  the same ~0.75 GiB of libraries to both sides.
- Speed ratio = ours / open_clip samples per second (wall clock, medians); CPU-time ratio uses samples per
  CPU-second, which is steadier when other jobs share the cores. Memory ratio = ours / open_clip.
- One torch thread per process by default: with other jobs on the same cores, two OpenMP threads per
  process made steps up to twice as slow, at random (`--threads N` to choose)."""


def gpu_targets(train: dict) -> list[list[str]]:
    rows = []
    for row in train.get("rows", []):
        ours, theirs = row["results"].get("ours", {}), row["results"].get("open_clip", {})
        name = f"{display_name(row['arch'])}, batch {row['batch']}, {row['precision']}{', compiled' if row['compile'] else ''}"
        targeted = row["arch"] == "ViT-B/16"
        # A target whose run failed or timed out keeps its row, saying why (its rows went missing from the page)
        if "mfu" in ours:
            met = ours["mfu"] >= 0.45
            their_mfu = f"{theirs['mfu']:.1%}" if "mfu" in theirs else "not measured"
            rows.append([f"{name}: MFU >= 45%", f"{ours['mfu']:.1%} (open_clip {their_mfu})",
                         status(met, f"{0.45 - ours['mfu']:.1%} short") if targeted else "(no target)"])
        elif targeted:
            rows.append([f"{name}: MFU >= 45%", f"not measured: {_why_not(ours, 'ours')}", "not shown"])
        if row.get("speedup"):
            met = row["speedup"] >= SPEED_TARGET
            rows.append([f"{name}: samples/s >= {SPEED_TARGET}x open_clip", f"{row['speedup']:.2f}x",
                         status(met, f"{SPEED_TARGET - row['speedup']:.2f}x short") if targeted else "(no target)"])
        elif targeted:
            rows.append([f"{name}: samples/s >= {SPEED_TARGET}x open_clip",
                         f"not measured: {why_unmeasured(row, train.get('skipped_libraries', {}))}", "not shown"])
        if row.get("memory_ratio"):
            rows.append([f"{name}: peak memory vs open_clip", f"{row['memory_ratio']:.2f}x", "(no target)"])
    return rows


def _why_not(result: dict, library: str) -> str:
    """Why one library's result has no MFU: its run's error, or no FLOP count."""
    if not result:
        return f"{library} not run"
    return str(result.get("error", "no FLOP count in its results"))[:200]


def write_gpu_page(folder: Path) -> None:
    """gpu.sh's summary: folder/gpu_results.md from the JSON files it wrote there."""
    def load(name: str) -> dict:
        path = folder / f"{name}.json"
        try:
            report = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as error:
            # Cut off mid-write (gpu.sh's time limit kills a step's process 10 s after asking it to stop): that
            # section says so, and the other files' sections are still written. A crash here lost the whole page.
            return {"error": f"{path.name} could not be read ({error})"}
        return report if isinstance(report, dict) else {"error": f"{path.name} holds no results object"}

    reports = {name: load(name) for name in ("train_step", "loss_memory", "train_step_compile", "checks",
                                              "train_step_rn50", "inference")}
    machine = next((r["machine"] for r in reports.values() if isinstance(r.get("machine"), dict)), None)
    targets = []
    # Each target row on its own: one that cannot be read from a partial or unexpected file says so, and the
    # page with every other figure is still written (gpu.sh has no second try)
    for name, rows_of_targets in (("train_step", gpu_targets), ("train_step_compile", gpu_targets),
                                  ("loss_memory", lambda report: [loss_target(report)]),
                                  ("train_step_rn50", gpu_targets)):
        try:
            targets += rows_of_targets(reports[name])
        except (KeyError, TypeError, ValueError, AttributeError) as problem:
            targets.append([f"from {name}.json", "-", f"could not be read: {problem!r}"])
    try:
        machine_description = machine_lines(machine or common.machine_info(), [])
    except (KeyError, TypeError) as problem:
        machine_description = [f"- (the machine's description could not be read: {problem!r})"]
    lines = ["# GPU benchmarks", "", "`bash benchmarks/gpu.sh`", "", *machine_description, "",
             "MFU = model FLOPs (counted with FlopCounterMode on the batch used, forward x 3; ours runs the text "
             "only to the batch's last end-of-text token) x samples/s / the GPU's dense bf16 peak "
             "(clip.throughput.peak_flops). Where each step's time goes: `profile.txt` (ViT-B/16) and "
             "`profile_rn50.txt` beside this page.", "",
             "## Targets", "",
             common.markdown_table(["target", "measured", "status"], targets), ""]
    # In the order gpu.sh runs them: a section "Not run." late on the page is a step the budget cut
    # Titles by gpu.sh's architectures (a dry run's tiny models stand in for them; each table names its own)
    for title, name, body in (("Training step, eager, ViT-B/16", "train_step", training_table),
                              ("Contrastive loss memory", "loss_memory", loss_table),
                              ("Training step, torch.compile, ViT-B/16", "train_step_compile", training_table),
                              ("Correctness checks", "checks", checks_table),
                              ("Training step, eager, RN50", "train_step_rn50", training_table),
                              ("Inference", "inference", inference_table)):
        lines += section(title, reports[name] or None, body)
    (folder / "gpu_results.md").write_text("\n".join(lines))


def checks_table(report: dict) -> str:
    rows = [
        [name, "ok" if result.get("ok") else "FAILED", json.dumps(result)] for name, result in report["checks"].items()
    ]
    return common.markdown_table(["check", "status", "details"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller settings (no batch-32 training, loss to 8k)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--threads", type=non_negative_int, default=1, help="torch threads for training and inference (0: default)")
    parser.add_argument("--results-dir", type=Path, help="keep each script's JSON and log here (default: temporary)")
    parser.add_argument("--from-results", type=Path, help="only rewrite the page from the JSON files in this folder")
    parser.add_argument("--resume", action="store_true",
                        help="keep the benchmarks that an interrupted run in --results-dir finished (same commands)")
    parser.add_argument("--output", type=Path, default=common.REPO_ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--timeout", type=common.positive_seconds, default=5400.0, help="seconds before one script is stopped")
    parser.add_argument("--gpu-page", type=Path, help=argparse.SUPPRESS)  # gpu.sh: summarise the JSON files there
    args = parser.parse_args(argv)
    if args.gpu_page:
        write_gpu_page(args.gpu_page)
        return 0
    invocation = "CLIP_CACHE_DIR=/tmp/clip-cache python benchmarks/run_all.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    common.check_output_file(parser, "--output", args.output)
    if args.from_results:
        if not (args.from_results / "run_all.json").is_file():
            parser.error(f"--from-results {args.from_results}: no run_all.json there (the --results-dir of a run "
                         "writes it)")
        saved = json.loads((args.from_results / "run_all.json").read_text())
        write_page(args.output, saved["reports"], saved["invocation"], saved["machine"], saved["loads"])
        return 0
    if args.resume and not (args.results_dir and (args.results_dir / "run_all.json").exists()):
        parser.error("--resume needs the --results-dir of an earlier run")
    common.check_output_dir(parser, "--results-dir", args.results_dir)
    if importlib_missing("open_clip"):
        print(f"warning: {OPEN_CLIP_MISSING}: the comparisons measure ours alone and no target can be met",
              file=sys.stderr)
    if not common.merges_file_available():
        print("warning: the BPE merges file is not cached (set CLIP_CACHE_DIR); captions fall back to random ids",
              file=sys.stderr)
    results = args.results_dir or Path(tempfile.mkdtemp(prefix="clip-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    machine, loads, reports = common.machine_info(), [list(os.getloadavg())], {}
    previous = json.loads((results / "run_all.json").read_text()) if args.resume else {}
    if previous:  # the page names both commands: the interrupted run and this one
        invocation, machine = previous["invocation"] + "\n" + invocation, previous["machine"]
    for name, argv_of_script in commands(args).items():
        if name not in args.only:
            continue
        earlier = previous.get("reports", {}).get(name)
        if earlier and "error" not in earlier and earlier.get("command") == " ".join(argv_of_script):
            print(f"{name}: kept from the earlier run in {results}", file=sys.stderr)
            reports[name] = earlier
        else:
            reports[name] = run_benchmark(name, argv_of_script, results, args.timeout)
        loads.append(list(os.getloadavg()))
        # After every benchmark, so that an interrupted run can be resumed (--resume).
        (results / "run_all.json").write_text(json.dumps(
            {"reports": reports, "invocation": invocation, "machine": machine,
             "loads": previous.get("loads", []) + loads}, indent=1))
    write_page(args.output, reports, invocation, machine, previous.get("loads", []) + loads)
    print(f"wrote {args.output} (results in {results})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
