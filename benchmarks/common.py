"""Helpers shared by the benchmark scripts: the machine's description, process memory, subprocess jobs,
timing, realistic caption batches, Markdown tables and command-line checks.

Importing this module does no work; nothing here imports open_clip.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from clip.cli.common import writable_output_dir
from clip.run_log import replaced_atomically

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
MERGES_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# Words of everyday image captions; almost every one is a single BPE token.
CAPTION_WORDS = (
    "a an the of in on with and at by near under over two three small large red blue green white black "
    "yellow old young man woman child dog cat bird horse car bus train bike boat plane street road city "
    "park beach river lake mountain tree flower table chair kitchen room window door house building sign "
    "people group person girl boy sitting standing walking running holding looking playing eating riding "
    "next to front top side view photo picture close up background sky water grass snow field wall food "
    "plate pizza sandwich ball frisbee umbrella bench phone laptop book bag shirt hat is are very bright "
    "dark sunny cloudy night day morning"
).split()


# ---- the machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a reader needs to judge the numbers: hardware, software versions, date and load."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        info["open_clip"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ---- memory ------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing ------------------------------------------------------------------------------------------


def time_calls(function: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for `calls` calls of `function`, device work included.
    CPU seconds count every thread of the process, so with N threads they can reach N x wall."""
    synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        function()
    synchronize(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- subprocess jobs ---------------------------------------------------------------------------------


def run_job(script: Path, job: dict, timeout_s: float | None = None) -> dict:
    """Runs `python script --job JSON` in a fresh process (so peak memory is that job's alone) and returns
    the JSON object its last stdout line holds, or {"error": ...}."""
    command = [sys.executable, str(script), "--job", json.dumps(job)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit code {result.returncode}: {last}"}
    return json.loads(lines[-1])


# ---- inputs ------------------------------------------------------------------------------------------


def realistic_captions(count: int, seed: int) -> list[str]:
    """Captions of 6-26 common words (8-30 BPE tokens with the start and end tokens), some with a comma."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = rng.choices(CAPTION_WORDS, k=rng.randint(6, 26))
        if len(words) > 8 and rng.random() < 0.3:
            words[rng.randrange(2, len(words) - 2)] += ","
        captions.append(" ".join(words).capitalize() + ("." if len(words) < 26 else ""))
    return captions


def merges_file_available() -> bool:
    from clip.download import cache_dir

    return (cache_dir() / MERGES_FILE_NAME).is_file()


def caption_token_ids(count: int, seed: int, context_length: int = 77) -> tuple[torch.Tensor, str]:
    """(IntTensor[count, context_length] as clip.tokenize returns, how it was made). Realistic captions through `clip.tokenize`
    when the BPE merges file is cached; otherwise (an offline machine) random ids between the start and
    end tokens with the same length distribution (8-30 tokens), which costs the models the same work."""
    if merges_file_available():
        from clip.tokenizer import tokenize

        ids = tokenize(realistic_captions(count, seed), context_length=context_length, truncate=True)
        return ids, "clip.tokenize"
    start_token, end_token = 49406, 49407
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(count, context_length, dtype=torch.int32)
    for row in range(count):
        length = min(int(torch.randint(8, 31, (1,), generator=generator)), context_length)
        ids[row, 0] = start_token
        ids[row, 1 : length - 1] = torch.randint(1, start_token, (length - 2,), generator=generator)
        ids[row, length - 1] = end_token
    return ids, "random ids (BPE merges file not cached)"


def token_lengths(ids: torch.Tensor) -> dict:
    """min / median / max tokens per caption, start and end tokens included."""
    lengths = (ids.argmax(dim=-1) + 1).tolist()
    return {"min": min(lengths), "median": median(lengths), "max": max(lengths)}


def make_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Normalised-looking pixels; the models' cost does not depend on the values."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- reporting ---------------------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


# ---- the command line --------------------------------------------------------------------------------


def positive_seconds(text: str) -> float:
    """argparse type: a time limit above 0 (at 0 or below every script or run would be stopped at once)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def write_json(path: Path, data: dict, indent: int = 1) -> None:
    """`data` as `path`'s whole new text, replacing it at once: the scripts rewrite their results after each
    measurement, and gpu.sh's time limit kills a step that outlasts it, possibly mid-write, which left a torn
    file in place of the results measured so far."""
    with replaced_atomically(path) as file:
        json.dump(data, file, indent=indent)
        file.write("\n")


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: Path | None) -> None:
    """A usage error now, before anything is measured, where `path` cannot be written: found only when the
    results were written, a folder that is a file or read-only lost the whole run's work."""
    if path is None:
        return
    if path.is_dir():
        parser.error(f"{flag} {path}: is a folder; give a file name")
    try:
        writable_output_dir(path.parent)
    except OSError as error:
        parser.error(f"{flag} {path}: {error}")


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: Path | None) -> None:
    """As check_output_file, for a folder the script writes files into (created if missing)."""
    if path is None:
        return
    try:
        writable_output_dir(path)
    except OSError as error:
        parser.error(f"{flag} {path}: {error}")
