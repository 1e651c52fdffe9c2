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

step "game study (issue 8): all training images, default game, with and without the defence"
retina-fgvis evaluate game-study --data-dir "$DATA/diaretdb1" --split train --out runs/game-study-28 \
    --setting sgdn-logodds-lr0.3 --seed-diaretdb1 runs/diaretdb1-train28   # the maps are reused below
cp runs/game-study-28/{summary.md,summary.csv,per_image.csv,study.log} runs/game-study-28/enrichment_vs_iterations_*.png evaluation/game-study/
step "game study: calibrated-λ candidate, first 8 images"
retina-fgvis evaluate game-study --data-dir "$DATA/diaretdb1" --split train --out runs/game-study-candidates \
    --setting sgdn-logodds-lr0.3-lamq99 --undefended "" --limit 8
for f in summary.md per_image.csv study.log; do cp runs/game-study-candidates/$f evaluation/game-study/candidates-first8-$f; done

step "game-study probes behind the pruning and backtracking choices"
python evaluation/game-study/probes/prune_levels.py --data-dir "$DATA/diaretdb1" --limit 4 > evaluation/game-study/probes/prune_levels-first4.log
python evaluation/game-study/probes/backtrack.py --data-dir "$DATA/diaretdb1" > evaluation/game-study/probes/backtrack-4-misses.log

step "DiaretDB1 region-rule sweep and lesion detection (issue 4)"
DATA="$DATA/diaretdb1" evaluation/diaretdb1/region_sweep.sh runs/diaretdb1-train28
retina-fgvis evaluate diaretdb1 --data-dir "$DATA/diaretdb1" --split train --out runs/diaretdb1-train28
cp runs/diaretdb1-train28/summary.md evaluation/diaretdb1/summary-train.md
cp runs/diaretdb1-train28/froc.png evaluation/diaretdb1/froc-train.png

step "benchmark (issue 7)"
retina-fgvis bench --out evaluation/bench/cpu.md
python evaluation/bench/defense_ab.py --rounds 7 > evaluation/bench/defense-ab-cpu.md   # old vs new defence, interleaved

step "screening of the bundled samples (issue 5)"
retina-fgvis screen data/samples --out runs/samples || true

# Faithfulness and defence validation. The ImageNet sample fits a CPU (~20 min together); the RDR
# runs at 512 px take hours on a CPU (~110 s per image per method) and are meant for a GPU (add --device cuda).
step "faithfulness and defence, ImageNet sample (issue 6)"
retina-fgvis evaluate faithfulness --model imagenet --insertion --rise-masks 1000 --out runs/faithfulness-imagenet
retina-fgvis evaluate defense --model imagenet --out runs/defense-imagenet
cp runs/faithfulness-imagenet/{summary.md,summary.csv,auc_per_image.csv,mean_deletion_curves.csv,deletion_curves.png,run.json} evaluation/faithfulness/imagenet/
cp runs/defense-imagenet/{summary.md,defense_per_image.csv,run.json} evaluation/defense/imagenet/
step "defence, RDR, 8 eyes (issue 6)"
retina-fgvis evaluate defense --model rdr --limit 8 --out runs/defense-rdr
cp runs/defense-rdr/{summary.md,defense_per_image.csv,run.json} evaluation/defense/rdr/   # no example figures: data-set photos
step "RDR faithfulness and full defence (GPU)"
retina-fgvis evaluate faithfulness --model rdr --limit 60 --insertion --out runs/faithfulness-rdr
retina-fgvis evaluate defense --model rdr --limit 100 --out runs/defense-rdr-100
