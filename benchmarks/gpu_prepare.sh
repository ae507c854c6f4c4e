#!/usr/bin/env bash
# Run on a machine with package-registry access before benchmarks/gpu.sh goes to a GPU machine that has no
# network: puts into .gpu_carry/ (ignored by git) what that machine lacks for a full run.
#   .gpu_carry/wheels/  pure-Python wheels of the packages missing there: ftfy and wcwidth (the tokenizer
#                       imports ftfy, so without it nothing of ours imports) and open_clip_torch (the peer
#                       the targets are ratios against). Its other needs (torch, torchvision, regex, tqdm,
#                       timm, huggingface_hub, safetensors) are part of that machine's image.
#   .gpu_carry/cache/   OpenAI's BPE merges file, so captions go through clip.tokenize rather than random ids.
# Then send .gpu_carry along with the checkout (about 2 MB) and run gpu.sh there; it installs the wheels
# into a temporary folder and points CLIP_CACHE_DIR at the carried cache by itself:
#
#     bash benchmarks/gpu_prepare.sh
#     # on the GPU machine, from the checkout with .gpu_carry beside it:
#     OUT=/some/folder bash benchmarks/gpu.sh
#
# The versions are those the CPU benchmarks in docs/benchmarks.md ran against; override them with
# OPEN_CLIP_VERSION=... FTFY_VERSION=... WCWIDTH_VERSION=... if needed.
set -euo pipefail

cd "$(dirname "$0")/.."
CARRY=.gpu_carry
OPEN_CLIP_VERSION="${OPEN_CLIP_VERSION:-3.3.0}"
FTFY_VERSION="${FTFY_VERSION:-6.3.1}"
WCWIDTH_VERSION="${WCWIDTH_VERSION:-0.7.0}"

rm -rf "$CARRY/wheels"
mkdir -p "$CARRY/wheels" "$CARRY/cache"
# All three are py3-none-any wheels, so one download serves any Python 3 on the GPU machine.
python -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q -d "$CARRY/wheels" \
    "ftfy==$FTFY_VERSION" "wcwidth==$WCWIDTH_VERSION" "open_clip_torch==$OPEN_CLIP_VERSION"

# The merges file, from the local cache (downloaded there first if absent) and checked against its SHA256.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python - "$CARRY/cache" <<'PYTHON'
import shutil
import sys
from pathlib import Path

from clip.download import download
from clip.tokenizer import MERGES_SHA256, MERGES_URL

source = download(MERGES_URL, MERGES_SHA256)  # verified; a cached copy is checked, not fetched again
target = Path(sys.argv[1]) / source.name
shutil.copyfile(source, target)
print(f"merges file: {target}")
PYTHON

ls -l "$CARRY/wheels"
du -sh "$CARRY"
