"""gpu.sh's set-up checks in one Python process: where the BPE merges file is, whether CUDA is there, whether
the library and open_clip import, and the description of the software at the top of gpu.log.

Each was a Python start of its own that imported torch (seven in all, about 33 s of the GPU machine's
8-minute budget before anything was measured). What the shell needs back is written to --env-file as
`NAME=value` lines for it to source:

    CLIP_CACHE_DIR  the carried cache folder, where clip's own cache folder has no merges file and it has
    LIBRARIES       "ours open_clip", or "ours" where open_clip does not import
    INFERENCE_FLAGS "--no-open-clip" where open_clip does not import

Exit status 1 (with one line saying why) where nothing can be measured: no CUDA device for --device cuda, or
the library does not import.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

MERGES_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def merges_folder(carry: Path) -> str | None:
    """The carried cache folder to point CLIP_CACHE_DIR at, or None where clip's own cache folder has the
    merges file (or neither has it: captions are then random ids, which benchmarks/common.py says)."""
    from clip.download import cache_dir

    if (cache_dir() / MERGES_FILE_NAME).is_file() or not (carry / "cache" / MERGES_FILE_NAME).is_file():
        return None
    return str((carry / "cache").resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--carry", type=Path, required=True, help="the folder gpu_prepare.sh filled")
    parser.add_argument("--env-file", type=Path, required=True, help="where the NAME=value lines go")
    parser.add_argument("--dry-run", default="", help="DRY_RUN's value, for the description")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; nothing to measure", file=sys.stderr)
        return 1
    try:  # before anything of clip's: the package imports its tokenizer, and so ftfy
        import clip.train  # noqa: F401  (what every step imports)
    except Exception as error:  # an ImportError, or any error of a module's import: nothing would run
        print(f"the library does not import here ({type(error).__name__}: {error}; a missing ftfy: run "
              f"benchmarks/gpu_prepare.sh first and carry {args.carry})", file=sys.stderr)
        return 1
    settings: dict[str, str] = {}
    folder = merges_folder(args.carry)
    if folder is not None:
        os.environ["CLIP_CACHE_DIR"] = folder  # for the caption check below, and (through the file) the steps
        settings["CLIP_CACHE_DIR"] = folder
    try:
        import open_clip
    except Exception as error:
        print(f"open_clip is not importable here ({type(error).__name__}: {error}): measuring ours only "
              "(open_clip rows skipped)", file=sys.stderr)
        settings.update(LIBRARIES="ours", INFERENCE_FLAGS="--no-open-clip")
        open_clip_version = "missing"
    else:
        settings.update(LIBRARIES="ours open_clip", INFERENCE_FLAGS="")
        open_clip_version = open_clip.__version__

    import common  # beside this script, on sys.path as its folder: the steps' own rule for captions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
    print("open_clip", open_clip_version)
    print("captions:", "clip.tokenize" if common.merges_file_available() else "random ids (no merges file)")
    print(f"cpus: {len(os.sched_getaffinity(0))}; python: Python {platform.python_version()}; "
          f"dry run: {args.dry_run or 'no'}")
    args.env_file.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
