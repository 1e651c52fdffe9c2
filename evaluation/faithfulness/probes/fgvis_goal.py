"""Probe: which deletion-game settings should the faithfulness evaluation's FGVis use on the RDR model?

Why: the paper gives no settings for its Table 2 masks. The evaluation uses the engine defaults
plus ``goal=fraction, goal_fraction=0.1`` (chosen by argument: with the default goal p <= 0.5 an
eye already below 0.5 keeps an untouched mask); nothing was measured against alternatives. This
probe runs the evaluation's own code path (``retina-fgvis evaluate faithfulness``, one call per
setting, records kept per setting) on held-out tuning eyes that are NOT among the 60 reported
ones (the next referable and non-referable eyes of the same permutation, as in
``fgvis_ranking.py``), with LIME and Grad-CAM beside them for scale.

    python evaluation/faithfulness/probes/fgvis_goal.py --data-root ../shared/data --eyes 8 --out DIR
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgvis_ranking import tuning_eyes  # noqa: E402  (same tuning eyes as the earlier probes)

from retina_fgvis.faithfulness import load_rdr_model, rdr_validation_table  # noqa: E402

#: setting name -> --fgvis-setting overrides on top of the evaluation's (goal=fraction, 0.1)
VARIANTS: dict[str, list[str]] = {
    "fraction-0.1 (evaluation)": [],
    "fraction-0.01": ["goal_fraction=0.01"],
    "fraction-0.3": ["goal_fraction=0.3"],
    "reference (p of the blank eye)": ["goal=reference"],
    "fraction-0.1 no pruning": ["prune_levels=[]"],
    "fraction-0.1 400 iterations": ["max_iterations=400"],
}


def link_tuning_eyes(data_root: str, eyes: int, folder: Path) -> pd.DataFrame:
    """Symlink the tuning eyes into ``folder`` (names keep source and file, no patient data)."""
    em = load_rdr_model(None)
    table = tuning_eyes(rdr_validation_table(em.classifier.metadata, data_root), eyes)
    folder.mkdir(parents=True, exist_ok=True)
    for row in table.itertuples():
        link = folder / f"{row.source}__{Path(row.path).name}"
        if not link.exists():
            link.symlink_to(Path(row.path).resolve())
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--eyes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="semicolon-separated names of VARIANTS")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    eyes = link_tuning_eyes(a.data_root, a.eyes, out / "eyes")
    print("tuning eyes:", ", ".join(eyes["file"].astype(str)), flush=True)
    frames = []
    for name in [v for v in a.variants.split(";") if v]:
        cmd = ["retina-fgvis", "evaluate", "faithfulness", "--model", "rdr", "--images", str(out / "eyes"),
               "--methods", "gradcam,lime,fgvis", "--device", "cpu", "--batch-size", str(a.batch_size),
               "--out", str(out / "run")]
        for s in VARIANTS[name]:
            cmd += ["--fgvis-setting", s]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        df = pd.read_csv(out / "run" / "auc_per_image.csv")
        df["variant"] = name
        frames.append(df)
        pd.concat(frames).to_csv(out / "auc_per_image.csv", index=False)
    df = pd.concat(frames)
    fg = df[df["method"] == "fgvis"]
    table = fg.pivot_table(index="variant", columns="target_name", values="deletion_auc", aggfunc="mean", sort=False)
    table["all"] = fg.groupby("variant", sort=False)["deletion_auc"].mean()
    table["seconds_explain"] = fg.groupby("variant", sort=False)["seconds_explain"].mean()
    base = df[(df["method"] != "fgvis") & (df["variant"] == df["variant"].iloc[0])]
    ref = base.pivot_table(index="method", columns="target_name", values="deletion_auc", aggfunc="mean")
    ref["all"] = base.groupby("method")["deletion_auc"].mean()
    print("\nFGVis (defended) by setting, mean deletion AUC (lower is better):")
    print(table.round(4).to_string())
    print("\nbaselines on the same eyes:")
    print(ref.round(4).to_string())
    table.to_csv(out / "summary_fgvis.csv")
    ref.to_csv(out / "summary_baselines.csv")


if __name__ == "__main__":
    main()
