#!/usr/bin/env bash
# Re-runs the commands behind the CPU records under evaluation/ that today's code can reproduce,
# each with the options of its committed record (the shipped classifier, the CPU). It does NOT
# reproduce every recorded number: the records it leaves out, and why, are listed below.
#
# Every step writes into its own folder under a new runs/run_all-<UTC date-time>/ (ignored by git);
# nothing under evaluation/ is written. Compare each output with the committed record named at its
# step. Data: DATA=... (default ../shared/data, holding diaretdb1/, odir5k_512/, eyepacs1098_400/).
# Long: run it in the background with a log (nohup evaluation/run_all.sh > runs/run_all.log 2>&1 &).
#
# Re-run with the options of their records, in this order (time on this project's 2-core CPU, as
# the committed record gives it; timings never repeat to the digit on this shared machine):
#   game study, 28 images, defended + undefended  game-study/{summary.md,per_image.csv,study.log}  22.4 min (summary.md)
#   DiaretDB1 region-rule sweep (12 re-scorings)   diaretdb1/region-sweep-train.md                 not recorded; each
#                                                  re-scoring is one `evaluate diaretdb1` from the cache (50.2 s below)
#   DiaretDB1 lesion detection, 28 images          diaretdb1/summary-train.md, froc-train.png      50.2 s (summary-train.md)
#   full CPU bench                                 bench/cpu-session5.md, its last full bench      10.8 min (cpu-session5.md)
#   classifier, patient-wise held-out images       evaluation/classifier/                         142 s (metrics.json)
#   faithfulness, ImageNet sample (5 photos)       faithfulness/imagenet/                          1478.7 s = 24.6 min of compute
#                                                  summed over its 40 results (run.json seconds_in_results; the committed
#                                                  results were computed in sessions 8 and 14 and reused)
#   defence, ImageNet sample                       defense/imagenet/                               103.4 s (run.json)
#   defence, RDR, 50 eyes                          defense/rdr/                                    4528.4 s = 75.5 min (run.json; CPU partly shared)
#   screening of the bundled samples               samples/ (README "Screening the bundled samples")  114 s (run.json)
#   checks on the samples (explain, 20 its, no prune) samples/checks/checks.log                  ~12 min under load (checks.log)
#   only with RDR60=1: faithfulness, RDR, 60 eyes  faithfulness/rdr-cpu-shipped-60/                hours: its run.json sums
#                                                  32710.5 s = 9.1 h of compute over 480 results (sessions 6-9 and 14, partly
#                                                  on a shared CPU); ~4.4 h estimated: 60 eyes x (~4.1 min for the seven
#                                                  methods, faithfulness README's session-9 rows + 18.7 s random, summary.md)
# Re-run, but the committed logs came from earlier versions of the scripts (game-study README), so
# their format and possibly digits differ:
#   game-study probes                              game-study/probes/prune_levels-first4.log (8 images, as in the
#                                                  log), backtrack-4-misses.log (755 s by its log)
# NOT reproduced by this script:
#   - GPU records: bench/gpu-h100*, defense/rdr-h100-*/, faithfulness/rdr-h100-deletion-aware/
#     (evaluation/bench/gpu_check.sh on a GPU; session 4 ran all but rdr-h100-shipped/ with the
#     deletion-aware checkpoint, see that script's header).
#   - records of earlier engines or earlier code: game-study noprune-*, every-iteration-*,
#     candidates-first8-* (session-2 engine without pruning; today's -lamq99 setting prunes),
#     lr0.3-first4-*, deletion-aware-* (engine of 77c9c5b); diaretdb1/*-noprune*;
#     bench/cpu.md (session 3), cpu-session4.md, defense-ab-cpu*.md, the bench probes and the
#     other batch-4 runs of cpu-session5.md.
#   - records that need training checkpoints that are not shipped (runs/stage1/epoch2.pt,
#     runs/stage2/epoch3.pt from weights/README.md "Reproduce", an epoch-1 checkpoint):
#     game-study ckpt-*, pilot-epoch1-*, probes/oracle_deletion.*.
#   - time-boxed runs and probes: faithfulness/rdr-cpu-shipped-8/ (--max-minutes 20),
#     rdr-cpu-shipped-60-goal-reference/, *-controls/, faithfulness/probes/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${DATA:-../shared/data}")
export CUDA_VISIBLE_DEVICES=   # the records ran on the CPU: --device auto must mean the CPU here too
R=$PWD/runs/run_all-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$R"
step() { echo "== $(date -u +%H:%M:%S) $*"; }
echo "outputs: $R"

step "game study, all 28 training images (record: evaluation/game-study/summary.md, per_image.csv, study.log)"
retina-fgvis evaluate game-study --data-dir "$DATA/diaretdb1" --split train --out "$R/game-study-28" \
    --setting sgdn-logodds-lr0.3 --seed-diaretdb1 "$R/diaretdb1-train28"   # the maps are reused below

step "DiaretDB1 region-rule sweep (record: evaluation/diaretdb1/region-sweep-train.md)"
# region_sweep.sh writes evaluation/diaretdb1/region-sweep-train.md and runs/region-sweep/ relative to
# the folder two levels above its own; run an unchanged copy from a scratch root so the committed
# record is not overwritten: the table lands in $R/region-sweep/evaluation/diaretdb1/.
mkdir -p "$R/region-sweep/evaluation/diaretdb1"
cp evaluation/diaretdb1/region_sweep.sh "$R/region-sweep/evaluation/diaretdb1/"
DATA="$DATA/diaretdb1" bash "$R/region-sweep/evaluation/diaretdb1/region_sweep.sh" "$R/diaretdb1-train28"

step "DiaretDB1 lesion detection (record: evaluation/diaretdb1/summary-train.md, froc-train.png)"
retina-fgvis evaluate diaretdb1 --data-dir "$DATA/diaretdb1" --split train --out "$R/diaretdb1-train28"

step "game-study probes (records: evaluation/game-study/probes/*.log, from earlier script versions)"
python evaluation/game-study/probes/prune_levels.py --data-dir "$DATA/diaretdb1" --limit 8 > "$R/prune_levels-first8.log"
python evaluation/game-study/probes/backtrack.py --data-dir "$DATA/diaretdb1" > "$R/backtrack-4-misses.log"

step "full CPU bench (record: the last full bench of evaluation/bench/cpu-session5.md)"
retina-fgvis bench --out "$R/bench/cpu.md"

step "classifier on the patient-wise held-out images (record: weights/README.md, Held-out results)"
retina-fgvis evaluate classifier --weights weights/rdr-effnet-lite0.pt \
    --data "$DATA/odir5k_512" --data "$DATA/eyepacs1098_400" --out "$R/eval-classifier"

step "screening of the bundled samples (record: evaluation/samples/)"
mkdir -p "$R/samples" && cp evaluation/samples/.naming-key "$R/samples/"   # the record's folder names
retina-fgvis screen data/samples --out "$R/samples" --device cpu || echo "screen exited with status $? (see its failed lines)"

step "checks on the bundled samples (record: evaluation/samples/checks/checks.log)"
bash evaluation/samples/checks.sh "$R/samples-checks"

step "faithfulness, ImageNet sample (record: evaluation/faithfulness/imagenet/run.json's command)"
retina-fgvis evaluate faithfulness --model imagenet \
    --methods gradcam,occlusion,lime,rise,gradient,fgvis,fgvis-undefended,random --device cpu --batch-size 1 \
    --insertion --rise-masks 1000 --lime-samples 500 --out "$R/faithfulness-imagenet"

step "defence, ImageNet sample (record: evaluation/defense/imagenet/run.json's command)"
retina-fgvis evaluate defense --model imagenet --device auto --batch-size 4 --examples 4 --out "$R/defense-imagenet"

step "defence, RDR, 50 eyes (record: evaluation/defense/rdr/run.json's command)"
retina-fgvis evaluate defense --model rdr --limit 50 --data-root "$DATA" --device cpu --batch-size 4 \
    --max-p-referable 0.05 --examples 4 --out "$R/defense-rdr"

if [ "${RDR60:-0}" = 1 ]; then
  step "faithfulness, RDR, 60 eyes (record: evaluation/faithfulness/rdr-cpu-shipped-60/run.json's command; hours)"
  retina-fgvis evaluate faithfulness --model rdr --limit 60 \
      --methods gradcam,occlusion,lime,rise,gradient,fgvis,fgvis-undefended,random --data-root "$DATA" \
      --device cpu --batch-size 4 --rise-masks 1000 --lime-samples 500 --out "$R/faithfulness-rdr-60"
fi
step "done: $R"
