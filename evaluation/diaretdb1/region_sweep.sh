#!/usr/bin/env bash
# Region-rule sweep on the DiaretDB1 TRAINING split from cached deletion masks (no game is re-run).
# Needs a finished `evaluate diaretdb1 --out $SRC` (its cache/). Writes region-sweep-train.md here.
# Usage: evaluation/diaretdb1/region_sweep.sh [SRC=runs/diaretdb1-train28]   (TABLE_ONLY=1: only rebuild the table)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-runs/diaretdb1-train28}
DATA=${DATA:-../shared/data/diaretdb1}
THRESHOLDS=0.01,0.02,0.05,0.1,0.2,0.3
[ "${TABLE_ONLY:-0}" = 1 ] || for c in 2 6 10; do
  for a in 10 60 150 300; do
    d=runs/region-sweep/c$c-a$a
    mkdir -p "$d" && rm -rf "$d/cache" && ln -s "$(realpath "$SRC/cache")" "$d/cache"   # read-only reuse, no copy
    retina-fgvis evaluate diaretdb1 --data-dir "$DATA" --split train --out "$d" --closing-radius $c \
        --min-area $a --no-overlays --froc-thresholds $THRESHOLDS > "$d.log" 2>&1
    rm "$d/cache"
  done
done
python - <<'PY'
import glob, re
import pandas as pd
rows = []
for path in sorted(glob.glob("runs/region-sweep/c*-a*/froc.csv")):
    c, a = map(int, re.search(r"c(\d+)-a(\d+)", path).groups())
    f = pd.read_csv(path, skiprows=1)
    f = f[(f["mode"] == "coverage") & (f.lesion != "all")]
    for t, g in f.groupby("threshold"):
        s25 = 100 * g[g.overlap == 0.25].image_sensitivity.mean()
        s50 = 100 * g[g.overlap == 0.5].image_sensitivity.mean()
        row = {"closing_radius": c, "min_area": a, "threshold": t, "mean_sens_25": s25, "mean_sens_50": s50,
               "fp_per_image": g.fp_per_image.iloc[0]}
        for r in g.itertuples():
            row[f"{r.lesion}@{int(r.overlap * 100)}"] = 100 * r.image_sensitivity
        rows.append(row)
t = pd.DataFrame(rows)
t["closing_radius"] = t.closing_radius.astype(int)
t["min_area"] = t.min_area.astype(int)
ok = t[(t.mean_sens_25 >= t.mean_sens_25.max() - 5) & (t.mean_sens_50 >= t.mean_sens_50.max() - 5)]
pick = ok.sort_values(["fp_per_image", "threshold"], ascending=[True, False]).iloc[0]
shown = t.sort_values(["closing_radius", "min_area", "threshold"]).copy()
for col in shown.columns:
    fmt = "{:g}" if col in ("closing_radius", "min_area", "threshold") else "{:.1f}"
    shown[col] = shown[col].map(fmt.format)
md = ["# Region-rule sweep, DiaretDB1 training split (28 images, cached default-game masks)", "",
      "Research use only, not a diagnosis. Image-level sensitivity %, coverage overlap; area cap 5 % of the FOV",
      "on flagged pixels and on the final regions. Made by `evaluation/diaretdb1/region_sweep.sh`.", "",
      "Rule: the fewest false-positive regions per image among the settings whose mean image-level",
      "sensitivity at 25 % and at 50 % overlap are each within 5 points of the best.", "",
      f"**Pick: closing radius {int(pick.closing_radius)}, min area {int(pick.min_area)}, threshold {pick.threshold:g}** "
      f"(mean sensitivity {pick.mean_sens_25:.1f} % @25, {pick.mean_sens_50:.1f} % @50, {pick.fp_per_image:.1f} FP regions / image).", "",
      shown.to_markdown(index=False, disable_numparse=True), ""]
open("evaluation/diaretdb1/region-sweep-train.md", "w").write("\n".join(md))
print("\n".join(md[:9]))
PY
