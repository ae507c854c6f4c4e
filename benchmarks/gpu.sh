#!/usr/bin/env bash
# GPU benchmarks on one GPU (written for an H200), in under 8 minutes, with no network access:
#   1. bf16 training throughput, peak memory and MFU of ViT-B/16 and RN50 at batch 256, ours beside
#      open_clip in the same run (eager);
#   2. the contrastive loss's memory and exactness at global batch 4k / 32k / 64k;
#   3. if time is left: ViT-B/16 training again under torch.compile, and inference throughput.
#
#     bash benchmarks/gpu.sh                 # results in ./gpu_results
#     OUT=/some/folder bash benchmarks/gpu.sh
#
# Writes $OUT/{env.txt, train_step.json, loss_memory.json, train_step_compile.json, inference.json,
# gpu_results.md, gpu.log}. Runs from a checkout without installing anything; open_clip rows are skipped
# (with a message) when open_clip is not importable. Captions go through clip.tokenize when the BPE merges
# file is cached ($CLIP_CACHE_DIR, default ~/.cache/clip); otherwise they are random ids of the same
# lengths (8-30 tokens), which cost the models the same work.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-470}"  # the whole script; each step's timeout is cut to what is left
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu.log") 2>&1

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# run_step NAME MAX_SECONDS COMMAND...: runs COMMAND with a timeout of at most MAX_SECONDS and at most
# what is left of the budget; a failure or timeout is reported and the script goes on.
run_step() {
    local name="$1" max_s="$2"
    shift 2
    local left=$((BUDGET_S - SECONDS))
    local limit=$((left < max_s ? left : max_s))
    if ((limit < 30)); then
        say "SKIP $name: only ${left}s of the budget left"
        return 0
    fi
    say "START $name (timeout ${limit}s): $*"
    local status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    if ((status == 124 || status == 137)); then
        say "TIMEOUT $name after ${limit}s"
    elif ((status != 0)); then
        say "FAILED $name (exit code $status)"
    else
        say "DONE $name"
    fi
    return 0
}

say "checking the environment"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device visible to torch; nothing to measure"
    exit 1
fi
LIBRARIES="ours open_clip"
INFERENCE_FLAGS=""
if ! python -c 'import open_clip' 2>/dev/null; then
    say "open_clip is not importable here: measuring ours only (open_clip rows skipped)"
    LIBRARIES="ours"
    INFERENCE_FLAGS="--no-open-clip"
fi
{  # a description of the machine; nothing here may stop the script
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' || true
    python -c 'import open_clip; print("open_clip", open_clip.__version__)' 2>/dev/null || echo "open_clip: missing"
    python -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print("captions:", "clip.tokenize" if common.merges_file_available() else "random ids (no merges file)")' || true
    echo "cpus: $(nproc)"
} | tee "$OUT/env.txt"

# 1. Eager bf16 training: 2 archs x 2 libraries x 2 alternating runs, 5 warm-up + 20 timed steps each.
run_step "training step, eager" 240 \
    python benchmarks/train_step.py --device cuda --precision bf16 --archs ViT-B/16 RN50 --batch-sizes 256 \
    --threads 0 --libraries $LIBRARIES --repeats 2 --warmup 5 --steps 20 --job-timeout 120 \
    --json "$OUT/train_step.json"

# 2. Loss memory at 4k / 32k / 64k and exactness at 32k.
run_step "loss memory" 150 \
    python benchmarks/loss_memory.py --device cuda --batch-sizes 4096 32768 65536 --chunk-sizes 512 2048 \
    --verify-batch 32768 --json "$OUT/loss_memory.json"

# 3. Only with time to spare: torch.compile (compilation takes a minute or more per model), inference.
run_step "training step, torch.compile (ViT-B/16)" 200 \
    python benchmarks/train_step.py --device cuda --precision bf16 --archs ViT-B/16 --batch-sizes 256 \
    --threads 0 --libraries $LIBRARIES --repeats 1 --warmup 5 --steps 20 --compile --job-timeout 180 \
    --json "$OUT/train_step_compile.json"
run_step "inference" 60 \
    python benchmarks/inference.py --device cuda --archs ViT-B/16 RN50 --image-batch 256 --text-batch 1024 \
    --threads 0 --repeats 10 $INFERENCE_FLAGS --json "$OUT/inference.json"

say "writing $OUT/gpu_results.md"
python benchmarks/run_all.py --gpu-page "$OUT" || say "FAILED to write the summary page"
say "finished in ${SECONDS}s"
