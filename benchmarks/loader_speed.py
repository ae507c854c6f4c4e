"""Training data loading speed: our pipeline vs a plain torchvision/PIL one, in images per second per core.

    python benchmarks/loader_speed.py                       # 2000 synthetic 500x375 JPEGs, 224 px
    python benchmarks/loader_speed.py --images 4000 --workers 1 4 --json results.json

The data: JPEGs of web-photo size (500 x 375, quality 90, smooth shapes plus sensor-like noise so they
compress like photos, ~45 KB), written once as image files + a CSV manifest and as WebDataset shards.

Pipelines, each producing normalised FloatTensor[B, 3, 224, 224] batches:
- plain: an ImageFolder-style map dataset over the files -- PIL open, convert("RGB"), Resize(224, bicubic),
  CenterCrop(224), ToTensor, Normalize -- in a torch DataLoader with the default collate;
- ours (shards) / ours (manifest): `clip.data.build_train_data` on the shards / the manifest, which also
  tokenises the captions in the workers (with the real BPE tokenizer when its merges file is available).
  Its workers hand over uint8 pixels, which training normalises on its device; here the main process
  normalises them on the CPU (`clip.data.PixelNormalizer`) inside the measured time.
Measured after the first batch (worker start-up excluded): images per wall-clock second, also divided by
the number of workers (with workers=0 everything runs in this process: one core, no inter-process
transfer); and images per CPU-second consumed by the training process and its workers together, which
stays meaningful on a shared, busy machine. Each configuration runs `--repeats` times, interleaved, and the
best run counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from clip.cli.common import non_negative_int, positive_int  # noqa: E402
from clip.data import DataConfig, PixelNormalizer, SourceConfig, build_train_data  # noqa: E402
from clip.preprocess import OPENAI_MEAN, OPENAI_STD  # noqa: E402

WIDTH, HEIGHT = 500, 375
JPEG_QUALITY = 90
PER_SHARD = 100
# Written last by write_data: what the folder's data is. --data-dir holding other data (another --images) was
# measured as if it were the data asked for.
SETTINGS_FILE = "loader_speed_data.json"
# The names write_data gives its files, the only ones it removes from a --data-dir before writing again.
WRITTEN_NAMES = {"images": re.compile(r"\d{6,}\.jpg"), "shards": re.compile(r"bench-\d{6,}\.tar|sizes\.json"),
                 ".": re.compile(rf"train\.csv|{re.escape(SETTINGS_FILE)}")}


def photo_like(index: int) -> Image.Image:
    """A smooth gradient with a few blurred shapes and per-pixel noise: compresses like a photo."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = rng.uniform(40, 200, 3) + rng.uniform(-0.2, 0.2, 3) * x[..., None] + rng.uniform(-0.2, 0.2, 3) * y[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, WIDTH - 60), rng.integers(0, HEIGHT - 60)
        box = (x0, y0, x0 + rng.integers(30, 200), y0 + rng.integers(30, 150))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def data_settings(count: int, per_shard: int = PER_SHARD) -> dict:
    return {"images": count, "width": WIDTH, "height": HEIGHT, "jpeg_quality": JPEG_QUALITY, "per_shard": per_shard}


def prepare_data(folder: Path, count: int) -> None:
    """`count` images in `folder`, written unless it already holds exactly those (as its settings file says).
    Other data there is removed first: the plain pipeline reads every image file in the folder."""
    wanted = data_settings(count)
    try:
        held = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):  # none (a fresh folder, or a write that was stopped), or unreadable
        held = None
    if held == wanted:
        return
    if held is not None:
        differences = ", ".join(f"{key} {held.get(key)!r} (not {value!r})" for key, value in wanted.items()
                                if held.get(key) != value) if isinstance(held, dict) else "unreadable settings"
        print(f"--data-dir {folder} holds other data ({differences}): writing it again", file=sys.stderr)
    remove_written_data(folder)
    started = time.perf_counter()
    write_data(folder, count)
    print(f"wrote {count} JPEGs in {time.perf_counter() - started:.0f}s", file=sys.stderr)


def remove_written_data(folder: Path) -> None:
    """The files write_data writes, by their names alone: a --data-dir may hold files of the user's too."""
    for subfolder, names in WRITTEN_NAMES.items():
        if (folder / subfolder).is_dir():
            for path in (folder / subfolder).iterdir():
                if names.fullmatch(path.name) and path.is_file():
                    path.unlink()


def write_data(folder: Path, count: int, per_shard: int = PER_SHARD) -> None:
    """folder/images/*.jpg + folder/train.csv, folder/shards/bench-*.tar + sizes.json, and last the settings
    file that says what they are."""
    import webdataset

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "shards").mkdir(exist_ok=True)
    sizes = {}
    pattern = str(folder / "shards" / "bench-%06d.tar")
    with open(folder / "train.csv", "w", newline="") as manifest, webdataset.ShardWriter(
        pattern, maxcount=per_shard, verbose=0, encoder=False
    ) as shards:
        rows = csv.writer(manifest)
        rows.writerow(["image", "caption"])
        for i in range(count):
            path = folder / "images" / f"{i:06d}.jpg"
            photo_like(i).save(path, format="JPEG", quality=JPEG_QUALITY)
            caption = f"a photo of thing number {i} with some shapes on a gradient"
            rows.writerow([f"images/{path.name}", caption])
            shards.write({"__key__": f"{i:09d}", "jpg": path.read_bytes(), "txt": caption.encode()})
            sizes[Path(pattern % (i // per_shard)).name] = sizes.get(Path(pattern % (i // per_shard)).name, 0) + 1
    (folder / "shards" / "sizes.json").write_text(json.dumps(sizes))
    (folder / SETTINGS_FILE).write_text(json.dumps(data_settings(count, per_shard)))


class PlainFiles(Dataset):
    """What a straightforward training script does: one file, one PIL pipeline, one tensor."""

    def __init__(self, folder: Path, size: int) -> None:
        self.paths = sorted((folder / "images").glob("*.jpg"))
        self.transform = transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc (Linux)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure(batches, batch_size: int, num_batches: int, worker_pids) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process and its workers)."""
    next(batches)  # the first batch pays for starting the workers
    pids = [os.getpid(), *worker_pids()]
    wall, cpu = time.perf_counter(), cpu_seconds(pids)
    for _ in range(num_batches):
        next(batches)
    images = num_batches * batch_size
    return images / (time.perf_counter() - wall), images / max(cpu_seconds(pids) - cpu, 1e-9)


def _pids(loader_iterator) -> list[int]:
    return [worker.pid for worker in getattr(loader_iterator, "_workers", [])]


def run_plain(folder: Path, size: int, workers: int, batch_size: int, num_batches: int) -> tuple[float, float]:
    dataset = PlainFiles(folder, size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    iterator = iter(loader)
    return measure(iterator, batch_size, num_batches, lambda: _pids(iterator))


def make_tokenizer():
    try:
        from clip.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
        tokenizer(["test"], context_length=77, truncate=True)
        return tokenizer, "clip BPE"
    except Exception as error:  # no merges file offline: a trivial stand-in, so only images are compared
        print(f"(real tokenizer unavailable: {error}; using a stand-in)", file=sys.stderr)
        return _ZeroTokenizer(), "stand-in"


class _ZeroTokenizer:
    def __call__(self, texts, context_length=77, truncate=True):
        return torch.zeros(len(texts), context_length, dtype=torch.long)


def run_ours(source: SourceConfig, size: int, workers: int, batch_size: int, num_batches: int, tokenizer):
    config = DataConfig(sources=[source], workers=workers, pin_memory=False)
    data = build_train_data(config, image_size=size, context_length=77, tokenizer=tokenizer,
                            batch_size=batch_size, rank=0, world_size=1, seed=0)
    # Our workers hand over uint8 pixels, which training normalises on the accelerator; here the main process
    # does it on the CPU, in the measured time, so both pipelines end with the same normalised float batch.
    normalize = PixelNormalizer("cpu")
    batches = ((normalize(images), texts) for images, texts in data)
    try:
        return measure(batches, batch_size, num_batches, lambda: _pids(data._loader_iterator))
    finally:
        data.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=2000,
                        help="images to generate (default 2000; at least two batches)")
    parser.add_argument("--size", type=positive_int, default=224, help="model input size (default 224)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1, os.cpu_count() or 1],
                        help="DataLoader worker counts to measure (default: 0, 1, and one per core)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per configuration; the best counts")
    parser.add_argument("--data-dir", help="reuse/keep the generated data here (default: a temporary folder); "
                        "written again where it holds another number of images")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch_size:  # the first batch, which starts the workers, is not timed
        parser.error(f"--images {args.images}: at least {2 * args.batch_size} (two batches of --batch-size "
                     f"{args.batch_size}) for one timed batch")
    common.check_output_file(parser, "--json", args.json)
    torch.set_num_threads(1)  # per-core figures: workers=0 must not spread over several threads either

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.data_dir or scratch)
        prepare_data(folder, args.images)
        tokenizer, tokenizer_name = make_tokenizer()
        last_shard = -(-args.images // PER_SHARD) - 1
        shards = SourceConfig(kind="shards", path=str(folder / "shards" / f"bench-{{000000..{last_shard:06d}}}.tar"))
        manifest = SourceConfig(kind="manifest", path=str(folder / "train.csv"))
        num_batches = max(1, args.images // args.batch_size - 2)
        pipelines = {
            "plain torchvision (files)": lambda w: run_plain(folder, args.size, w, args.batch_size, num_batches),
            "ours (shards)": lambda w: run_ours(shards, args.size, w, args.batch_size, num_batches, tokenizer),
            "ours (manifest)": lambda w: run_ours(manifest, args.size, w, args.batch_size, num_batches, tokenizer),
        }
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for _ in range(args.repeats):
            for workers in args.workers:
                for name, run in pipelines.items():
                    wall, cpu = run(workers)
                    old_wall, old_cpu = best.get((name, workers), (0.0, 0.0))
                    best[name, workers] = (max(wall, old_wall), max(cpu, old_cpu))
                    print(f"{name}, workers={workers}: {wall:.1f} images/s, {cpu:.1f} per CPU-second", file=sys.stderr)

    rows = []
    for workers in args.workers:
        plain_wall, plain_cpu = best["plain torchvision (files)", workers]
        for name in pipelines:
            wall, cpu = best[name, workers]
            per_core = wall / max(workers, 1)
            rows.append({
                "pipeline": name, "workers": workers, "images_per_s": round(wall, 1),
                "images_per_s_per_worker": round(per_core, 1),
                "vs_plain_per_worker": round(per_core / (plain_wall / max(workers, 1)), 2),
                "images_per_cpu_s": round(cpu, 1), "vs_plain_per_cpu_s": round(cpu / plain_cpu, 2),
            })
    print(f"\n{args.images} JPEGs {WIDTH}x{HEIGHT} -> {args.size} px, batch {args.batch_size}, "
          f"tokenizer in ours: {tokenizer_name}, torch threads per process: 1, {os.cpu_count()} cores. "
          f"Best of {args.repeats}. Per CPU-second counts the training process and its workers.\n")
    print("| pipeline | workers | images/s | per worker | vs plain | images per CPU-s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pipeline']} | {row['workers']} | {row['images_per_s']} | {row['images_per_s_per_worker']} "
              f"| {row['vs_plain_per_worker']}x | {row['images_per_cpu_s']} | {row['vs_plain_per_cpu_s']}x |")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
