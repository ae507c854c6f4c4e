"""Inference throughput: encode_image (images/s) and encode_text (texts/s), this library against open_clip.

    python benchmarks/inference.py                                  # CPU, fp32: ViT-B/32 and RN50
    python benchmarks/inference.py --archs ViT-B/16 --image-batch 256 --text-batch 1024 --device cuda

Both models hold the same weights (ours, randomly initialised, loaded into open_clip's "<arch>-quickgelu"
with strict=True), run in eval mode under torch.inference_mode, and get the same inputs: random pixels and
realistic captions (8-30 BPE tokens through clip.tokenize, padded to the 77-token context). The largest
difference between the two libraries' features is reported as a check that they compute the same thing.
Ours' encode_text runs only up to the batch's last end-of-text token (32 of the 77 positions for these
captions), open_clip's all 77: the same features for less work, which is most of the encode_text ratio.
--text-length full makes ours run all 77 positions too (encode_text(..., trim=False)); --text-length
trimmed full times both. Either way the last block of ours' towers computes only the position read from it
(the class token, the end-of-text token).
Calls alternate ours, theirs, theirs, ours, ...; the median of --repeats timed calls counts, after one
untimed warm-up call each. On CUDA both run under bf16 autocast by default (--precision).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from train_step import check_archs, display_name, importlib_missing, model_config, open_clip_model, ours_name  # noqa: E402

from clip.cli.common import non_negative_int, positive_int  # noqa: E402
from clip.evaluation.features import AUTOCAST_DTYPES, autocast  # noqa: E402


class UntrimmedText(torch.nn.Module):
    """Ours, with encode_text running every position of the context, as open_clip's does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(texts, trim=False)


def build_models(arch: str, device: torch.device, with_open_clip: bool,
                 text_lengths: tuple[str, ...] = ("trimmed",)) -> dict[str, torch.nn.Module]:
    """Ours once per text length ("ours": trimmed, its default; "ours, full text": all 77 positions), the
    same weights each time, and open_clip's model holding them too."""
    from clip.model import create_model

    ours = create_model(model_config(arch)).to(device).eval()
    models = {ours_name(length): ours if length == "trimmed" else UntrimmedText(ours) for length in text_lengths}
    if with_open_clip:
        theirs = open_clip_model(arch)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        models["open_clip"] = theirs.to(device).eval()
    return models


def time_encoder(models: dict, encoder: str, inputs: torch.Tensor, repeats: int, device: torch.device,
                 autocast) -> dict[str, list[float]]:
    """Seconds per call for each model, alternating ABBA, after one warm-up call each."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), autocast():
        for model in models.values():
            getattr(model, encoder)(inputs)
        names = list(models)
        for round_index in range(repeats):
            for name in names if round_index % 2 == 0 else names[::-1]:
                wall_s, _ = common.time_calls(lambda: getattr(models[name], encoder)(inputs), 1, device)
                seconds[name].append(wall_s)
    return seconds


def largest_differences(models: dict, images: torch.Tensor, texts: torch.Tensor, autocast) -> dict[str, dict]:
    """The largest absolute difference of each of ours' features from open_clip's, per call and model."""
    if "open_clip" not in models:
        return {}
    theirs = models["open_clip"]
    ours = {name: model for name, model in models.items() if name != "open_clip"}
    with torch.inference_mode(), autocast():
        image_features = theirs.encode_image(images[:4])
        text_features = theirs.encode_text(texts)
        first = next(iter(ours.values()))
        return {"encode_image": {"ours": (first.encode_image(images[:4]) - image_features).abs().max().item()},
                "encode_text": {name: (model.encode_text(texts) - text_features).abs().max().item()
                                for name, model in ours.items()}}


def run_arch(arch: str, args: argparse.Namespace, device: torch.device, with_open_clip: bool) -> dict:
    def in_precision():
        return autocast(device, args.precision)

    torch.manual_seed(args.seed)
    models = build_models(arch, device, with_open_clip, tuple(dict.fromkeys(args.text_length)))
    config = model_config(arch)
    images = common.make_images(args.image_batch, config.vision.image_size, args.seed).to(device)
    texts, text_source = common.caption_token_ids(args.text_batch, args.seed, config.text.context_length)
    texts = texts.to(device)
    row = {"arch": display_name(arch), "image_batch": args.image_batch, "text_batch": args.text_batch, "text_source": text_source,
           "caption_tokens": common.token_lengths(texts.cpu()),
           "max_abs_difference": largest_differences(models, images, texts, in_precision)}
    # The image tower is the same whatever the text length: timed once, as "ours".
    ours_models = [name for name in models if name != "open_clip"]
    image_models = {"ours": models[ours_models[0]], **({"open_clip": models["open_clip"]} if with_open_clip else {})}
    for encoder, inputs, unit, timed in (("encode_image", images, "images_per_s", image_models),
                                         ("encode_text", texts, "texts_per_s", models)):
        seconds = time_encoder(timed, encoder, inputs, args.repeats, device, in_precision)
        row[encoder] = {name: {unit: inputs.shape[0] / common.median(s), "seconds": s} for name, s in seconds.items()}
        if "open_clip" in seconds:
            row[encoder]["speedups"] = {name: common.median(seconds["open_clip"]) / common.median(s)
                                        for name, s in seconds.items() if name != "open_clip"}
        print(f"{display_name(arch)} {encoder}: " + ", ".join(f"{n} {v[unit]:.1f} {unit.replace('_per_s', '/s')}"
                                               for n, v in row[encoder].items() if n != "speedups"),
              file=sys.stderr, flush=True)
    return row


def format_rows(rows: list[dict]) -> str:
    table = []
    for row in rows:
        for encoder, unit in (("encode_image", "images_per_s"), ("encode_text", "texts_per_s")):
            result = row[encoder]
            theirs = result.get("open_clip", {}).get(unit)
            batch = row["image_batch"] if encoder == "encode_image" else row["text_batch"]
            differences = row["max_abs_difference"]
            # Results written before --text-length took both lengths: one "ours", its "speedup" a number and its
            # differences under "image_features" / "text_features".
            old_difference = differences.get("image_features" if encoder == "encode_image" else "text_features")
            for name in (n for n, value in result.items() if n != "open_clip" and isinstance(value, dict) and unit in value):
                speedup = result.get("speedups", {}).get(name, result.get("speedup") if name == "ours" else None)
                difference = differences.get(encoder, {}).get(name, old_difference if name == "ours" else None)
                call = encoder if name == "ours" else f"{encoder} (ours: all 77 positions)"
                table.append([row["arch"], call, batch, f"{result[name][unit]:.1f}",
                              f"{theirs:.1f}" if theirs else "-", f"{speedup:.2f}x" if speedup else "-",
                              f"{difference:.1e}" if difference is not None else "-"])
    headers = ["arch", "call", "batch", "ours per s", "open_clip per s", "speed ratio", "max abs feature difference"]
    return common.markdown_table(headers, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B/32", "RN50"])
    parser.add_argument("--image-batch", type=positive_int, default=32)
    parser.add_argument("--text-batch", type=positive_int, default=128)
    parser.add_argument("--threads", type=non_negative_int, default=os.cpu_count() or 1, help="torch intra-op threads (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default=None,
                        help="autocast dtype (default: fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per library; the median counts")
    parser.add_argument("--text-length", nargs="+", choices=["trimmed", "full"], default=["trimmed"],
                        help="ours' encode_text: to the batch's last end-of-text token (its default), or the whole "
                             "context, the same inputs as open_clip's; both time it each way (one row each)")
    parser.add_argument("--no-open-clip", action="store_true", help="measure ours only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    check_archs(parser, args.archs)
    common.check_output_file(parser, "--json", args.json)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    with_open_clip = not args.no_open_clip and not importlib_missing("open_clip")
    if not with_open_clip and not args.no_open_clip:
        print("open_clip is not installed (pip install -e .[bench]); measuring ours only", file=sys.stderr)
    rows = []
    report = {"machine": common.machine_info(), "device": str(device), "precision": args.precision,
              "threads": args.threads, "repeats": args.repeats, "text_lengths": args.text_length, "rows": rows}
    for arch in args.archs:
        rows.append(run_arch(arch, args, device, with_open_clip))
        if args.json:  # after every architecture: gpu.sh's time limit, which this last step meets most often,
            # left no file at all when it stopped the run during the second one
            common.write_json(args.json, report)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
