"""`clip-export SOURCE OUTPUT`: a model's weights alone, as a file to share or to load elsewhere.

SOURCE is anything `clip.load` reads: a released name, a weights file, a training checkpoint, or a run directory
(its newest checkpoint). The optimizer's state and the rest of a training checkpoint are left out. See
`clip.export` for the two layouts.
"""

from __future__ import annotations

import argparse
import logging
import os

from clip.export import DTYPES, LAYOUTS, ExportError, OutputExistsError, export_weights

from .common import errors_help, run_command, setup_logging

logger = logging.getLogger("clip.export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-export", description=__doc__.split("\n\n")[0],
        epilog=errors_help("a missing or damaged weights file, an OUTPUT that exists without --overwrite"),
    )
    parser.add_argument("source", help="released name, weights/checkpoint file, or run directory")
    parser.add_argument("output", help="the file to write")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="clip",
        help="clip (the default): the weights with their architecture, which clip.load and train.init_weights "
        "read as this exact model; openai: a plain state dict that openai/CLIP's build_model(torch.load(path)) "
        "and open_clip's load_openai_model read (refused for a model they would read as another architecture)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="of the floating-point tensors (default float32; float16 halves the file)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--download-root", default=None,
                        help="where a released model is downloaded (default: $CLIP_CACHE_DIR or ~/.cache/clip)")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    try:
        exported = export_weights(
            os.path.expanduser(args.source), os.path.expanduser(args.output), layout=args.layout, dtype=args.dtype,
            overwrite=args.overwrite, download_root=args.download_root,
        )
    except OutputExistsError as error:  # its message names overwrite=True, the Python caller's words
        raise ExportError(f"{error.output} exists; pass --overwrite to replace it") from error
    source = exported.source
    origin = source.released or str(source.path) + (f" (step {source.step})" if source.step is not None else "")
    logger.info("exported %s: %s", origin, exported.architecture)
    print(f"{exported.path}  {exported.layout} layout, {exported.dtype}, {exported.size_bytes / 2**20:.1f} MiB")
    print(f"sha256 {exported.sha256}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("clip-export", export, args)


if __name__ == "__main__":
    raise SystemExit(main())
