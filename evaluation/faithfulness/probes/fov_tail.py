"""How much of an RDR deletion AUC is the flat tail outside the field of view?

Why: the metric's x-axis runs over the whole 512x512 input, as the RISE protocol does, but the
pixels outside the fundus field of view are already at the substrate (0 in normalised space),
so every method removes them last (``baselines.restrict_to_fov``) and every curve ends in a
flat stretch at its end value. That stretch adds the same area to every method and pulls
ratios between methods towards 1. This probe reads the committed per-(image, method) records,
finds each curve's flat tail (the fraction after its last change) and reports the AUC over the
part before it, rescaled to [0, 1] (the AUC a field-of-view-only x-axis would give, up to the
step containing the FOV's last pixel). Reads only committed files; seconds.

    python evaluation/faithfulness/probes/fov_tail.py evaluation/faithfulness/rdr-cpu-shipped-60
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def flat_tail(curve: np.ndarray, fractions: np.ndarray, tol: float = 1e-6) -> float:
    """Share of the x-axis after the curve's last change (0 when its last step still changes it)."""
    k = len(curve) - 1
    while k > 0 and abs(curve[k - 1] - curve[-1]) < tol:
        k -= 1
    return float(1.0 - fractions[k])


def records(folder: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((folder / "progress").glob("*/record-*.json")):
        rec = json.loads(path.read_text())
        curve, fractions = np.asarray(rec["curve"], float), np.asarray(rec["fractions"], float)
        tail = flat_tail(curve, fractions)
        auc = float(rec["row"]["deletion_auc"])
        rows.append({"method": rec["method"], "image": rec["image"], "tail": tail, "auc": auc,
                     "auc_before_tail": (auc - tail * curve[-1]) / (1.0 - tail) if tail < 1 else float("nan")})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="an evaluate-faithfulness output folder with progress/ records")
    ap.add_argument("--best-baseline", default="lime", help="the baseline the ratios are taken against")
    a = ap.parse_args()
    df = records(a.folder)
    table = df.groupby("method")[["tail", "auc", "auc_before_tail"]].mean()
    print(f"{a.folder}: {df.image.nunique()} images, {len(df)} records (means over images)\n")
    print("| method | flat tail (share of x-axis) | deletion AUC (as reported) | AUC before the tail, rescaled |")
    print("|---|---|---|---|")
    for method, r in table.iterrows():
        print(f"| {method} | {r['tail']:.3f} | {r['auc']:.4f} | {r['auc_before_tail']:.4f} |")
    base = table.loc[a.best_baseline]
    print()
    for method in ("fgvis", "fgvis-undefended", "random"):
        if method in table.index:
            r = table.loc[method]
            print(f"{method} / {a.best_baseline}: {r.auc / base.auc:.2f} as reported, "
                  f"{r.auc_before_tail / base.auc_before_tail:.2f} before the tail")


if __name__ == "__main__":
    main()
