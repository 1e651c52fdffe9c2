#!/usr/bin/env bash
# Reproduces every recorded number under evaluation/ with the shipped classifier, on the CPU.
# Long: run it in the background with a log (nohup evaluation/run_all.sh > runs/run_all.log 2>&1 &).
# Data sets are read from ../shared/data (override with DATA=...). Outputs go to runs/ (ignored)
# and the summaries are copied next to this script.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
mkdir -p runs
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step "game study (issue 8)"
retina-fgvis evaluate game-study --data-dir "$DATA/diaretdb1" --split train --out runs/game-study \
    --seed-diaretdb1 runs/diaretdb1-train   # the default game's maps are reused below
cp runs/game-study/{summary.md,summary.csv,per_image.csv} runs/game-study/enrichment_vs_iterations_*.png evaluation/game-study/

step "DiaretDB1 lesion detection (issue 4)"
retina-fgvis evaluate diaretdb1 --data-dir "$DATA/diaretdb1" --split train --out runs/diaretdb1-train
cp runs/diaretdb1-train/summary.md evaluation/diaretdb1/summary-train.md

step "benchmark (issue 7)"
retina-fgvis bench --out evaluation/bench/cpu.md

step "screening of the bundled samples (issue 5)"
retina-fgvis screen data/samples --out runs/samples || true

# Faithfulness and defence validation: hours on a CPU at 512 px (~110 s per image per method);
# meant for a GPU (add --device cuda).
step "faithfulness (issue 6)"
retina-fgvis evaluate faithfulness --model rdr --limit 60 --insertion --out evaluation/faithfulness/rdr
retina-fgvis evaluate faithfulness --model imagenet --insertion --out evaluation/faithfulness/imagenet
step "defence validation (issue 6)"
retina-fgvis evaluate defense --model rdr --limit 100 --out evaluation/defense/rdr
retina-fgvis evaluate defense --model imagenet --out evaluation/defense/imagenet
