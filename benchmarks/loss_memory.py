"""Peak memory and time of the CLIP loss + backward on one device: the whole-matrix loss ("naive") against
the exact chunked loss, and the chunked loss's agreement with a whole-matrix reference (and with naive where
it fits); with --verify-batch also each float32 method's distance from the exact loss and gradients (the
reference's formula in float64), which tells the chunked loss's own error from float32 rounding in both.

    python benchmarks/loss_memory.py --batch-sizes 4096 32768 --verify-batch 32768 --json loss_memory.json

Each configuration runs in its own subprocess so that peaks do not mix. "Extra peak" is the memory that
loss + backward adds on top of the inputs (two [N, D] float32 feature matrices that require grad); it
includes the two feature gradients (2 * N * D * 4 bytes), which any method must produce.
  CPU:  the process's RSS high-water mark (getrusage ru_maxrss) after loss + backward minus its resident
        memory just before (the inputs made; in a fresh process the loss's peak is its highest).
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before.
A configuration whose estimated need exceeds the memory available is skipped and reported as such; one that
runs out of memory anyway (the estimate is rough) is a result, "out of memory at batch N", and that method is
not tried at larger batches after it.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from clip.cli.common import positive_int  # noqa: E402
from clip.loss import contrastive_loss  # noqa: E402

GIB = 1024**3
# The naive loss keeps about four [N, N] float32 matrices through backward (logits before and after the
# scale, two log-softmax outputs) and briefly needs about two more for their gradients.
NAIVE_MATRICES = 6
REFERENCE_MATRICES = 1.5  # the logits, overwritten by their gradient, plus blocks
FLOAT64_MATRICES = 4  # float32-sized: the reference in float64 briefly holds two [N, N] float64 matrices


def make_inputs(batch: int, width: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, width, generator=generator)
    text = image + 1.5 * torch.randn(batch, width, generator=generator)  # matching pairs are correlated
    image, text = image.to(device).requires_grad_(), text.to(device).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    return image, text, logit_scale


def run_loss(method: str, chunk_size: int | None, image, text, logit_scale):
    for tensor in (image, text, logit_scale):
        tensor.grad = None
    if method == "reference":
        loss = whole_matrix_reference(image, text, logit_scale)
    else:
        loss = contrastive_loss(image, text, logit_scale, chunk_size=chunk_size if method == "chunked" else None)
        loss.backward()
    return loss.detach()


def whole_matrix_reference(image, text, logit_scale) -> torch.Tensor:
    """The loss and its gradient from the whole [N, N] logit matrix with the textbook formula
    dL/dlogits = (softmax over rows + softmax over columns - 2 * identity) / 2N, written independently of
    clip.loss. It overwrites the logits with their gradient, so it needs one [N, N] matrix where autograd
    on the naive loss needs about six."""
    unit_image, unit_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = logit_scale.exp()
    n, block = image.shape[0], 1024
    with torch.no_grad():
        logits = scale * (unit_image @ unit_text.t())  # [N, N]
        lse_rows = torch.cat([torch.logsumexp(logits[i : i + block], dim=1) for i in range(0, n, block)])
        lse_cols = torch.cat([torch.logsumexp(logits[:, j : j + block], dim=0) for j in range(0, n, block)])
        diagonal = logits.diagonal().clone()
        loss = ((lse_rows - diagonal).mean() + (lse_cols - diagonal).mean()) / 2
        # sum_ij dL/dlogit_ij * logit_ij, accumulated before the logits are overwritten.
        weighted_logits = -2 * diagonal.double().sum()
        for i in range(0, n, block):
            rows = logits[i : i + block]  # a view: written in place below
            softmaxes = (rows - lse_rows[i : i + block, None]).exp_() + (rows - lse_cols[None]).exp_()
            weighted_logits += (softmaxes.double() * rows).sum()
            rows.copy_(softmaxes)
        grad_logits = logits  # [N, N], now softmax over rows + softmax over columns
        grad_logits.diagonal().sub_(2)
        grad_logits /= 2 * n
        grad_scale = (weighted_logits / (2 * n) / scale).to(scale.dtype)  # logits = scale * cosines
        grad_unit_image = scale * (grad_logits @ unit_text)
        grad_unit_text = scale * (grad_logits.t() @ unit_image)
        del logits, grad_logits
    torch.autograd.backward([unit_image, unit_text, scale], [grad_unit_image, grad_unit_text, grad_scale])
    return loss


def current_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's allocator raises torch.OutOfMemoryError; the CPU's a RuntimeError that says so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory(batch: int, device: torch.device) -> dict:
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"out_of_memory": True, "error": f"out of memory at batch {batch}"
            + (f" (peak {peak:.1f} GiB allocated before the failed allocation)" if peak is not None else "")}


def measure(method: str, batch: int, width: int, chunk_size: int | None, device: torch.device) -> dict:
    """Runs in a fresh subprocess: warm up, then one timed loss + backward. Running out of memory is a result
    (the naive loss at 64k needs about six 16 GiB matrices): the process reports it and ends normally."""
    try:
        return measure_once(method, batch, width, chunk_size, device)
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        return out_of_memory(batch, device)


def measure_once(method: str, batch: int, width: int, chunk_size: int | None, device: torch.device) -> dict:
    run_loss(method, chunk_size, *make_inputs(256, width, device))  # load kernels, start thread pools
    inputs = make_inputs(batch, width, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        # Resident memory now, not the high-water mark: making the inputs passed through temporaries (their
        # random draws) that are freed by now, and a baseline at that earlier peak would leave out as much
        # of the loss's own memory.
        baseline = common.current_rss_bytes()
    start = time.perf_counter()
    loss = run_loss(method, chunk_size, *inputs)
    peak = current_peak_bytes(device)
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "seconds": seconds, "extra_peak_gib": (peak - baseline) / GIB}


def verify(batch: int, width: int, chunk_size: int, device: torch.device) -> dict:
    """Chunked loss vs the whole-matrix reference (and vs naive autograd when it fits): the largest
    difference relative to the largest reference value, for the loss and each gradient; then each of them vs
    the reference's formula in float64. A comparison that runs out of memory says so; the others are still
    reported."""
    inputs = make_inputs(batch, width, device)
    results = {}
    report = {}
    for method in ("chunked", "reference", "naive"):
        if method != "chunked" and not fits(method, batch, device):
            report[f"{method}"] = f"skipped: needs more than the {available_bytes(device) / GIB:.0f} GiB available"
            continue
        try:
            loss = run_loss(method, chunk_size, *inputs)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if method == "chunked" or not is_out_of_memory(error):
                raise
            report[method] = f"skipped: out of memory at batch {batch}"
            for tensor in inputs:
                tensor.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed attempt cached, for the next method
            continue
        results[method] = [loss.cpu().double()] + [t.grad.cpu().double() for t in inputs]
    names = ["loss", "grad_image", "grad_text", "grad_logit_scale"]
    for method in results.keys() - {"chunked"}:
        for name, mine, theirs in zip(names, results["chunked"], results[method]):
            report[f"{name} vs {method}"] = relative_difference(mine, theirs)
    # How far each float32 result is from the exact one (the reference's formula in float64): where chunked
    # and naive differ, this says which of the two is off, or whether both are, by float32 rounding alone.
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the methods above left cached is free for this one
    if not fits("float64", batch, device):
        report["float64"] = f"skipped: needs more than the {available_bytes(device) / GIB:.0f} GiB available"
        return report
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    try:
        exact = [whole_matrix_reference(*exact_inputs).cpu()] + [t.grad.cpu() for t in exact_inputs]
    except RuntimeError as error:  # an extra: running out of memory here keeps the comparisons above
        if not is_out_of_memory(error):
            raise
        report["float64"] = f"skipped: out of memory at batch {batch}"
        return report
    for method, values in results.items():
        for name, mine, truth in zip(names, values, exact):
            report[f"float64 error of {method}: {name}"] = relative_difference(mine, truth)
    return report


def relative_difference(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest |mine - theirs| over the largest |theirs|."""
    return ((mine - theirs).abs().max() / theirs.abs().max()).item()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return kib * 1024


def fits(method: str, batch: int, device: torch.device) -> bool:
    matrices = {"naive": NAIVE_MATRICES, "reference": REFERENCE_MATRICES, "float64": FLOAT64_MATRICES}.get(method, 0)
    # Leave a quarter of what is free for everything else on the machine.
    return matrices * batch * batch * 4 < 0.75 * available_bytes(device)


def run_in_subprocess(job: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="*", default=[4096, 32768, 65536])
    parser.add_argument("--width", type=positive_int, default=512)
    parser.add_argument("--chunk-sizes", type=positive_int, nargs="+", default=[512, 2048])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verify-batch", type=positive_int, default=None, help="check exactness at this batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement in a subprocess
    args = parser.parse_args()
    common.check_output_file(parser, "--json", args.json)
    device = torch.device(args.device)

    if args.job:
        job = json.loads(args.job)
        if job["kind"] == "verify":
            print(json.dumps(verify(job["batch"], job["width"], job["chunk_size"], device)))
        else:
            print(json.dumps(measure(job["method"], job["batch"], job["width"], job["chunk_size"], device)))
        return

    rows, verification = [], None

    def save() -> None:  # after each result: a run stopped at its time limit (gpu.sh) keeps what it measured
        if args.json:
            common.write_json(args.json, {"rows": rows, "verification": verification,
                                          "batch_sizes": args.batch_sizes}, indent=2)

    # Exactness first: with the extra peak at the verified batch, it is what the loss's target asks for
    if args.verify_batch:
        job = {"kind": "verify", "batch": args.verify_batch, "width": args.width, "chunk_size": args.chunk_sizes[0]}
        verification = {"batch": args.verify_batch, "chunk_size": args.chunk_sizes[0], **run_in_subprocess(job)}
        save()
    configurations = [("naive", None)] + [("chunked", c) for c in args.chunk_sizes]
    out_of_memory_at = {}  # (method, chunk size) -> the batch at which it ran out of memory
    for batch in args.batch_sizes:
        for method, chunk_size in configurations:
            row = {"batch": batch, "width": args.width, "method": method, "chunk_size": chunk_size, "device": str(device)}
            failed_at = out_of_memory_at.get((method, chunk_size))
            if failed_at is not None and batch > failed_at:
                # A larger batch needs more: the attempt would only spend the step's time limit to fail again
                row["skipped"] = f"out of memory at batch {failed_at} already"
            elif not fits(method, batch, device):
                need = NAIVE_MATRICES * batch * batch * 4 / GIB
                row["skipped"] = f"needs ~{need:.0f} GiB, {available_bytes(device) / GIB:.0f} GiB available"
            else:
                job = {"kind": "measure", "method": method, "batch": batch, "width": args.width, "chunk_size": chunk_size}
                row.update(run_in_subprocess(job))
                if row.get("out_of_memory"):
                    out_of_memory_at[(method, chunk_size)] = min(batch, failed_at or batch)
            rows.append(row)
            print(format_row(row), flush=True)
            save()

    print("\n| batch | method | chunk | extra peak (GiB) | loss + backward (s) | loss |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(format_row(row))
    if verification:
        print(f"\nExactness at batch {verification['batch']}, chunk {verification['chunk_size']} "
              "(max |chunked - other| / max |other|):")
        for name, value in verification.items():
            if name not in ("batch", "chunk_size"):
                print(f"- {name}: {value}")


def format_row(row: dict) -> str:
    chunk = row["chunk_size"] or "-"
    if "skipped" in row or "error" in row:
        return f"| {row['batch']} | {row['method']} | {chunk} | {row.get('skipped') or row['error']} | | |"
    return (f"| {row['batch']} | {row['method']} | {chunk} | {row['extra_peak_gib']:.3f} | "
            f"{row['seconds']:.2f} | {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
