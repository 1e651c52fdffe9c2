#!/usr/bin/env bash
# The README's checks on the bundled samples beside the screening record (evaluation/samples/):
#   1. the SYNB game's p at each check (explain's JSON, prob_trajectory);
#   2. `screen --iterations 20`: the same results.csv and lesions.csv as the 200-iteration record?
#   3. `screen --no-prune`: how many regions and how much of the FOV without pruning;
#   4. where the regions lie relative to the lesions drawn into the phantom (drawn_lesions.py).
# Usage, from the repository root (~5 min on a 2-core CPU):
#   bash evaluation/samples/checks.sh [OUT]      # OUT: scratch folder (default: a new temporary one)
# The log and the small files it quotes land in OUT/checks/; the committed copy is
# evaluation/samples/checks/ (the explain pictures are left out: they repeat the report's overlay).
set -euo pipefail
OUT="${1:-$(mktemp -d)}"
REC=evaluation/samples
LOG="$OUT/checks/checks.log"
mkdir -p "$OUT/checks"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
timed() {  # timed NAME CMD...: run, tee its output to the log, record its wall time
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  say "\$ $*"
  "$@" 2>&1 | tee -a "$LOG" || true
  say "$name: $(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)") s"
}
say "$(python -c 'import platform, os, torch; print(platform.processor() or platform.machine(), os.cpu_count(), "CPUs, torch", torch.__version__)')"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 1. the check-by-check p of the SYNB game
timed explain retina-fgvis explain data/samples/SYNB_right.png --out "$OUT/explain" --device cpu
cp "$OUT"/explain/image-*.json "$OUT/checks/explain-SYNB_right.json"
python - "$OUT/checks/explain-SYNB_right.json" <<'EOF' | tee -a "$LOG"
import json, sys
info = json.load(open(sys.argv[1]))
traj = info["prob_trajectory"]
print(f"SYNB: p {info['p_referable_before']:.3f} -> {info['p_referable_after']:.3f}, goal p <= {info['goal_prob']:.3f}, "
      f"{info['iterations']} iterations; p at check 1: {traj[0]:.2f}; at the {len(traj) - 1} checks after it: "
      f"{min(traj[1:]):.2f}-{max(traj[1:]):.2f}")
EOF

# 2. 20 iterations against the 200-iteration record (a copy of the record's key: the same names)
for variant in iterations-20 no-prune; do
  mkdir -p "$OUT/$variant" && cp "$REC/.naming-key" "$OUT/$variant/"
done
timed "screen --iterations 20" retina-fgvis screen data/samples --out "$OUT/iterations-20" --device cpu --iterations 20
for f in results.csv lesions.csv; do
  cp "$OUT/iterations-20/$f" "$OUT/checks/iterations-20-$f"
  if cmp -s "$REC/$f" "$OUT/iterations-20/$f"; then say "iterations 20: $f identical to the record's";
  else say "iterations 20: $f DIFFERS from the record's"; diff "$REC/$f" "$OUT/iterations-20/$f" | tee -a "$LOG" || true; fi
done

# 3. without pruning
timed "screen --no-prune" retina-fgvis screen data/samples --out "$OUT/no-prune" --device cpu --no-prune
for f in results.csv lesions.csv; do cp "$OUT/no-prune/$f" "$OUT/checks/no-prune-$f"; done
python - "$OUT/no-prune" "$REC" <<'EOF' | tee -a "$LOG"
import sys
from retina_fgvis.screening import read_results_csv
for label, folder in (("no pruning", sys.argv[1]), ("record (pruned)", sys.argv[2])):
    res = read_results_csv(f"{folder}/results.csv")
    for _, row in res[res.explained == "yes"].iterrows():
        print(f"{label}: {row.file}: {int(row.n_regions)} regions ({int(row.n_red)} red, {int(row.n_bright)} bright), "
              f"{float(row.flagged_area_pct):.3f} % of the FOV, p after {float(row.p_referable_after):.3f}")
EOF
# 4. where the regions lie relative to the drawn lesions (the phantom is generated: known exactly)
python evaluation/samples/drawn_lesions.py "$REC/lesions.csv" "$OUT/checks/no-prune-lesions.csv" | tee -a "$LOG"
say "done: $OUT"
