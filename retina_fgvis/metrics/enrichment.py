"""Threshold-free agreement of an importance map with lesion ground truth.

Why threshold-free: whether an explanation lands on lesions must be judged before any region
threshold is tuned, otherwise a bad mask and a bad threshold cannot be told apart.
"""
from __future__ import annotations

import numpy as np


def lesion_scores(importance: np.ndarray, gt_any: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """Threshold-free agreement of an importance map with GT (all arrays on one grid)."""
    imp = np.where(fov, np.clip(importance, 0, None), 0).astype(np.float64)
    gt = gt_any & fov
    gt_share = gt.sum() / max(fov.sum(), 1)
    total = imp.sum()
    inside = imp[gt].sum() / total if total > 0 else float("nan")
    out = {"gt_share": float(gt_share), "mass_inside_gt": float(inside),
           "enrichment": float(inside / gt_share) if gt_share > 0 and total > 0 else float("nan")}
    values = imp[fov]
    labels = gt[fov]
    order = np.argsort(-values, kind="stable")
    for name, q in (("top0.5", 0.005), ("top1", 0.01)):
        k = max(1, int(round(q * values.size)))
        top = order[:k]
        out[f"precision_{name}"] = float(labels[top].mean()) if values[top[-1]] > 0 else float("nan")
    return out
