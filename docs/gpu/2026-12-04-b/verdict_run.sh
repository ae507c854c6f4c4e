# The second GPU run of session 38: the trainer's GPU checks, then ViT-B/16 bf16 batch 256 ours vs open_clip
# (compiled, with a profile of ours; then eager), and the loss's exactness against float64 at batch 32768.
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu_carry/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE" CLIP_CACHE_DIR=$PWD/.gpu_carry/cache PYTHONUNBUFFERED=1
python3 -c "import torch, open_clip; print(torch.__version__, open_clip.__version__)"
S=$SECONDS
timeout 130 python3 benchmarks/gpu_checks.py --device cuda --json $OUT/checks.json > $OUT/checks.log 2>&1
echo "checks rc=$? $((SECONDS-S))s"; grep -E "^(OK|FAIL)" $OUT/checks.log | cut -c1-220
timeout 215 python3 benchmarks/train_step.py --device cuda --precision bf16 --archs ViT-B/16 --batch-sizes 256 \
    --threads 0 --libraries ours open_clip --repeats 1 --warmup 5 --steps 20 --compile --job-timeout 200 \
    --profile $OUT/profile_compiled.txt --profile-steps 3 --json $OUT/train_step_compile.json > $OUT/compile.log 2>&1
echo "compiled rc=$? $((SECONDS-S))s"; tail -4 $OUT/compile.log
timeout 60 python3 benchmarks/loss_memory.py --device cuda --batch-sizes 32768 --chunk-sizes 512 \
    --verify-batch 32768 --json $OUT/loss_memory.json > $OUT/loss.log 2>&1
echo "loss rc=$? $((SECONDS-S))s"; tail -12 $OUT/loss.log
timeout 80 python3 benchmarks/train_step.py --device cuda --precision bf16 --archs ViT-B/16 --batch-sizes 256 \
    --threads 0 --libraries ours open_clip --repeats 1 --warmup 5 --steps 20 --job-timeout 70 \
    --json $OUT/train_step_eager.json > $OUT/eager.log 2>&1
echo "eager rc=$? $((SECONDS-S))s"; tail -3 $OUT/eager.log
