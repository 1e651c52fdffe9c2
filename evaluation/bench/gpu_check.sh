#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (device tool, ~15 min budget):
#   run it from the repo root with a timeout that leaves room for a rerun; results land in $OUT.
# 1. benchmark at batch 1/16/64, fp32 and bf16 autocast
# 2. defended deletion game on 16 DiaretDB1 training images (needs ../shared/data or DIARETDB1 set),
#    fp32 vs bf16 masks compared (IoU of thresholded regions)
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python -m pip install -q -e . 2>&1 | tail -1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
retina-fgvis bench --device cuda --batch 1 --batch 16 --batch 64 --out "$OUT/bench_fp32.md"
retina-fgvis bench --device cuda --batch 1 --batch 16 --batch 64 --autocast --out "$OUT/bench_bf16.md"
DDB=${DIARETDB1:-../shared/data/diaretdb1}
if [ -d "$DDB" ]; then
  python -m retina_fgvis.gpu_agreement --data-dir "$DDB" --limit 16 --out "$OUT/agreement.md"
else
  echo "no DiaretDB1 at $DDB: agreement check skipped" | tee "$OUT/agreement.md"
fi
