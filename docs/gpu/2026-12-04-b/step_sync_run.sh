set -u
SITE=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu_carry/wheels/ftfy*.whl .gpu_carry/wheels/wcwidth*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$SITE" CLIP_CACHE_DIR=$PWD/.gpu_carry/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"
S=$SECONDS
timeout 150 python3 benchmarks/step_sync.py --compile default --profile-steps 3 --json $OUT/compiled_256.json > $OUT/compiled_256.log 2>&1; echo "compiled_256 rc=$? $((SECONDS-S))s"; grep -E "ms/step" $OUT/compiled_256.log
timeout 60 python3 benchmarks/step_sync.py --compile none --json $OUT/eager_256.json > $OUT/eager_256.log 2>&1; echo "eager rc=$? $((SECONDS-S))s"; grep -E "ms/step" $OUT/eager_256.log
timeout 170 python3 benchmarks/step_sync.py --compile reduce-overhead --json $OUT/graphs_256.json > $OUT/graphs_256.log 2>&1; echo "graphs rc=$? $((SECONDS-S))s"; grep -E "ms/step|Error" $OUT/graphs_256.log | tail -8
timeout 130 python3 benchmarks/step_sync.py --compile default --batch 512 --json $OUT/compiled_512.json > $OUT/compiled_512.log 2>&1; echo "compiled_512 rc=$? $((SECONDS-S))s"; grep -E "ms/step|Error" $OUT/compiled_512.log | tail -8
for f in $OUT/*.json; do python3 -c "import json,sys; d=json.load(open('$f')); print('$f', d['warmup_s'], d.get('peak_gib'), {k:(round(v['step_ms'],2), round(v.get('mfu',0),4), v.get('device_busy_fraction')) for k,v in d['variants'].items()})"; done
