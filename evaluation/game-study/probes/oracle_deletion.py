"""Probe: is the classifier's referable evidence in the expert-marked lesions at all?

The defended game can only be enriched on lesions if deleting the lesions is what lowers the
classifier's p(referable). This probe deletes the DiaretDB1 ground truth itself (any lesion type,
consensus >= 0.75, on the model's 512-px grid; e = m * x with the game's zero reference) and asks
whether p falls below the game's goal max(threshold, p(blank eye)):

* ``gt``: the GT pixels, dilated by 0 / 2 / 5 px (marking is coarse at this scale);
* ``control``: the same GT shape (dilated 2 px) moved to random places inside the FOV (mean of
  3 shifts) -- the same area deleted where the experts marked nothing;
* ``only_gt``: everything *except* the dilated GT deleted (do the lesions alone carry the call?).

Usage (repository root; several --weights for classifier comparisons, each PATH or LABEL=PATH):

    python evaluation/game-study/probes/oracle_deletion.py [--data-dir DIR] [--weights [LABEL=]W ...] [--out CSV]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from retina_fgvis import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.game_study import load_images, prepare_batch


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _shifted(mask: np.ndarray, fov: np.ndarray, rng: np.random.Generator, tries: int = 50) -> np.ndarray:
    """``mask`` rolled to a random offset, preferring offsets that keep it inside the FOV and off itself."""
    best, best_score = mask, -1.0
    for _ in range(tries):
        dy, dx = rng.integers(-mask.shape[0] // 3, mask.shape[0] // 3, size=2)
        moved = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        score = (moved & fov & ~mask).sum() / max(moved.sum(), 1)
        if score > best_score:
            best, best_score = moved, score
        if score > 0.95:
            break
    return best & fov


@torch.no_grad()
def _p(clf, x: torch.Tensor, keep: np.ndarray | None) -> float:
    e = x if keep is None else x * torch.from_numpy(keep.astype(np.float32))[None, None]
    return float(torch.softmax(clf.model(e), 1)[0, 1])


def probe(spec: str | None, data_dir: str, seed: int = 0) -> pd.DataFrame:
    label, _, weights = (spec or "shipped=").rpartition("=") if spec and "=" in spec else (None, "", spec)
    clf = load_classifier(weights or None)
    size = clf.input_size
    p_blank = _p(clf, torch.zeros(1, 3, size, size), None)
    goal = max(float(clf.threshold), p_blank)
    rng = np.random.default_rng(seed)
    rows = []
    for im in load_images(DiaretDB1(data_dir, split="train")):
        prep, x, fov, gts = prepare_batch(clf, [im])
        fov_np = prep[0].fov_model.astype(bool)
        gt = gts[0] & fov_np
        row = {"weights": label or (Path(weights).name if weights else "shipped"), "image": im.name, "goal": goal,
               "p_before": _p(clf, x, None), "gt_share": gt.sum() / fov_np.sum()}
        if gt.any():
            for px in (0, 2, 5):
                g = _dilate(gt, px) & fov_np
                row[f"p_gt_deleted_d{px}"] = _p(clf, x, ~g)
                row[f"share_d{px}"] = g.sum() / fov_np.sum()
            g2 = _dilate(gt, 2) & fov_np
            row["p_control_d2"] = float(np.mean([_p(clf, x, ~_shifted(g2, fov_np, rng)) for _ in range(3)]))
            row["p_only_gt_d5"] = _p(clf, x, _dilate(gt, 5) & fov_np)
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return pd.DataFrame(rows)


def _logit(p: pd.Series) -> pd.Series:
    p = p.clip(1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per classifier. 'share of the needed drop': how much of the log-odds fall the game must achieve
    (logit p_before - logit goal) deleting the GT (+2 px) achieves, on images that start above the goal."""
    out = []
    for w, g in df.groupby("weights", sort=False):
        les = g.dropna(subset=["p_gt_deleted_d0"])  # the images with GT lesions
        above = les[les.p_before > les.goal]
        needed = _logit(above.p_before) - _logit(above.goal)
        by_gt = _logit(above.p_before) - _logit(above.p_gt_deleted_d2)
        by_control = _logit(above.p_before) - _logit(above.p_control_d2)
        out.append({
            "weights": w, "goal (p <=)": g.goal.iloc[0], "images with GT": len(les),
            "median p before": les.p_before.median(),
            **{f"GT deleted (+{px} px): goal reached": f"{int((les[f'p_gt_deleted_d{px}'] <= les.goal).sum())}/{len(les)}"
               for px in (0, 2, 5)},
            "median p, GT +2 px deleted": les.p_gt_deleted_d2.median(),
            "median p, same area elsewhere": les.p_control_d2.median(),
            "control: goal reached": f"{int((les.p_control_d2 <= les.goal).sum())}/{len(les)}",
            "median p, only GT +5 px kept": les.p_only_gt_d5.median(),
            "median share of the needed log-odds drop: GT +2 px": (by_gt / needed).median(),
            "… same area elsewhere": (by_control / needed).median(),
            "median GT share of FOV (+2 px)": les.share_d2.median(),
        })
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/diaretdb1")
    ap.add_argument("--weights", nargs="*", default=[None])
    ap.add_argument("--out", default=None, help="per-image CSV (the summary is printed as markdown)")
    args = ap.parse_args()
    df = pd.concat([probe(w, args.data_dir) for w in args.weights], ignore_index=True)
    if args.out:
        df.to_csv(args.out, index=False)
    print(summarise(df).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
