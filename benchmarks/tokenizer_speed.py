"""Captions per second of clip.tokenizer against a literal pure-Python tokenizer and open_clip's, on fresh text.

Every tokenizer is a new instance (empty caches) and every caption is generated for this run, so caches only
help as much as they would on a new dataset. The script also checks that all of them give identical ids.

    CLIP_CACHE_DIR=/tmp/clip-cache python benchmarks/tokenizer_speed.py --captions 20000 --json speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from clip.cli.common import positive_int  # noqa: E402
from clip.download import download  # noqa: E402
from clip.tokenizer import END_OF_WORD, MERGES_SHA256, MERGES_URL, Tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PUNCTUATION = [",", ".", "!", "?", ";", ":", "'s", "-", "...", "(", ")", '"', "&", "#1", "2020", "4k", "10%"]
NON_ASCII_WORDS = [
    "café", "naïve", "über", "niño", "façade", "crème", "brûlée", "smörgåsbord", "Zürich", "São",
    "東京", "写真", "猫", "犬", "Москва", "собака", "κόσμος", "🐶", "🐱", "❤️", "👍🏽", "—", "“quoted”", "½",
    "&amp;", "&quot;",
]


def load_reference_tokenizer_class() -> type:
    """tests/reference_tokenizer.py, imported by path (tests/ is not a package)."""
    path = REPO_ROOT / "tests" / "reference_tokenizer.py"
    spec = importlib.util.spec_from_file_location("reference_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceTokenizer


def vocabulary_words(tokenizer: Tokenizer) -> list[str]:
    """Whole lower-case ASCII words of the vocabulary, in id order (roughly most frequent first)."""
    words = []
    for token in tokenizer.vocab:
        word = token.removesuffix(END_OF_WORD)
        if token.endswith(END_OF_WORD) and len(word) > 1 and word.isascii() and word.isalpha():
            words.append(word)
    return words


def make_captions(words: list[str], count: int, seed: int, zipf: bool, non_ascii_fraction: float = 0.125) -> list[str]:
    """Captions of 4-24 words; a few capitalised, some with punctuation or numbers, some with a non-ASCII word."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 10) for rank in range(len(words))] if zipf else None
    captions = []
    for _ in range(count):
        length = rng.randint(4, 24)
        chosen = rng.choices(words, weights=weights, k=length)
        parts = []
        for word in chosen:
            if rng.random() < 0.1:
                word = word.capitalize()
            if rng.random() < 0.15:
                word += rng.choice(PUNCTUATION)
            parts.append(word)
        if rng.random() < non_ascii_fraction:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(NON_ASCII_WORDS))
        captions.append(" ".join(parts))
    return captions


def time_tokenizer(tokenize_batch, captions: list[str], batch_size: int) -> tuple[float, float, list[list[int]]]:
    """(CPU seconds, wall seconds, rows of ids). CPU time is the fairer measure on a shared machine."""
    rows = []
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for begin in range(0, len(captions), batch_size):
        rows.append(tokenize_batch(captions[begin : begin + batch_size]))
    cpu_seconds, wall_seconds = time.process_time() - start_cpu, time.perf_counter() - start_wall
    ids = [row for batch in rows for row in (batch.tolist() if torch.is_tensor(batch) else batch)]
    return cpu_seconds, wall_seconds, ids


def run(args: argparse.Namespace) -> dict:
    merges_path = download(MERGES_URL, MERGES_SHA256)
    results: dict[str, dict] = {}
    outputs: dict[str, list[list[int]]] = {}

    def measure(name: str, build, to_batch_function) -> None:
        """Best of `args.repeats` runs, each with a new instance (cold caches) on the same fresh captions."""
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokenizer = build()
            build_seconds = time.perf_counter() - start
            cpu_seconds, wall_seconds, outputs[name] = time_tokenizer(
                to_batch_function(tokenizer), captions, args.batch_size
            )
            runs.append((cpu_seconds, wall_seconds, build_seconds))
        cpu_seconds, wall_seconds, build_seconds = min(runs)
        results[name] = {
            "build_s": build_seconds,
            "cpu_s": cpu_seconds,
            "wall_s": wall_seconds,
            "captions_per_cpu_s": len(captions) / cpu_seconds,
        }

    words = vocabulary_words(Tokenizer(merges_path))
    captions = make_captions(words, args.captions, args.seed, args.distribution == "zipf", args.non_ascii_fraction)
    measure("clip.tokenizer", lambda: Tokenizer(merges_path), lambda tok: lambda batch: tok(batch, truncate=True))
    reference_class = load_reference_tokenizer_class()
    measure("pure-Python reference", lambda: reference_class(merges_path), lambda tok: tok.tokenize)
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        print("open_clip is not installed (pip install -e .[bench]); measuring without it", file=sys.stderr)
    else:
        measure("open_clip", lambda: SimpleTokenizer(str(merges_path)), lambda tok: tok)

    baseline = results["pure-Python reference"]["captions_per_cpu_s"]
    open_clip_rate = results.get("open_clip", {}).get("captions_per_cpu_s")
    for name, result in results.items():
        result["speedup_vs_reference"] = result["captions_per_cpu_s"] / baseline
        if open_clip_rate:  # the ratio the benchmark target is stated in
            result["speedup_vs_open_clip"] = result["captions_per_cpu_s"] / open_clip_rate
        result["ids_identical"] = outputs[name] == outputs["clip.tokenizer"]
    return {
        "captions": len(captions),
        "distribution": args.distribution,
        "non_ascii_fraction": sum(not caption.isascii() for caption in captions) / len(captions),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }


def print_table(report: dict) -> None:
    print(
        f"{report['captions']} fresh captions ({report['distribution']} word frequencies, "
        f"{report['non_ascii_fraction']:.0%} with non-ASCII), batches of {report['batch_size']}, "
        f"best of {report['repeats']} runs with a new instance each\n"
    )
    print("| tokenizer | build (s) | CPU s | wall s | captions per CPU s | vs reference | vs open_clip | ids identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, result in report["results"].items():
        versus_open_clip = f"{result['speedup_vs_open_clip']:.2f}x" if "speedup_vs_open_clip" in result else "-"
        print(
            f"| {name} | {result['build_s']:.2f} | {result['cpu_s']:.2f} | {result['wall_s']:.2f} | "
            f"{result['captions_per_cpu_s']:,.0f} | {result['speedup_vs_reference']:.1f}x | {versus_open_clip} | "
            f"{result['ids_identical']} |"
        )


def fraction(text: str) -> float:
    """argparse type: a share between 0 and 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=positive_int, default=20_000, help="how many fresh captions to tokenize")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="captions per tokenize call")
    parser.add_argument("--distribution", choices=["zipf", "uniform"], default="zipf", help="word frequencies")
    parser.add_argument(
        "--non-ascii-fraction", type=fraction, default=0.125, help="share of captions given a non-ASCII word"
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per tokenizer; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    common.check_output_file(parser, "--json", args.json)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not all(result["ids_identical"] for result in report["results"].values()):
        sys.exit("ids differ between tokenizers")


if __name__ == "__main__":
    main()
