"""The official DiaretDB1 image-based protocol (Kauppi et al. 2007; toolkit ``evaldiaretdb1.m``).

Each method gives one score per image and lesion type; an image is declared to contain the
type when ``score > threshold``; sweeping the threshold over the scores gives an ROC over
images against "the GT has any pixel at mean confidence >= 0.75". The protocol's summary
number is the equal error rate (EER), where sensitivity equals specificity.

Our score (FGVis explanation -> regions) is the share of FOV pixels flagged in an image.
The plain score does not depend on the lesion type (one explanation per image); a typed
variant counts only regions whose colour guess matches the type's family (red for H/RSD,
bright for HE/SE), see ``retina_fgvis.evaluation_diaretdb1``.

EER: the ROC polyline (FPR, TPR) is interpolated linearly to the point where
``FPR == 1 - TPR``; ``eer`` is that common error, and ``sensitivity_at_eer`` /
``specificity_at_eer`` are ``1 - eer``. The threshold reported is that of the nearest
actual ROC point (smallest |sensitivity - specificity|), with that point's own
sensitivity and specificity in ``*_at_threshold`` columns, so a user can operate at it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["roc_curve", "auc", "equal_error_rate", "image_roc_table"]


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC for ``presence = score > threshold`` over all distinct thresholds.

    Thresholds run from ``-inf`` (every image positive: TPR = FPR = 1) through every
    distinct score in increasing order (the largest score gives TPR = FPR = 0). Returns
    ``(fpr, tpr, thresholds)`` ordered from (1, 1) down to (0, 0). NaN when a class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    thr = np.concatenate([[-np.inf], np.unique(s)])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    pred = s[None, :] > thr[:, None]
    tp = (pred & y[None, :]).sum(axis=1)
    fp = (pred & ~y[None, :]).sum(axis=1)
    tpr = tp / n_pos if n_pos else np.full(thr.shape, np.nan)
    fpr = fp / n_neg if n_neg else np.full(thr.shape, np.nan)
    return fpr.astype(float), tpr.astype(float), thr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under the ROC polyline (NaN if undefined)."""
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    order = np.lexsort((tpr, fpr))
    f, t = fpr[order], tpr[order]
    return float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2.0))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> dict:
    """EER by linear interpolation on the ROC polyline, plus the nearest actual point.

    Returns ``eer``, ``sensitivity_at_eer``, ``specificity_at_eer`` (interpolated) and
    ``threshold``, ``sensitivity_at_threshold``, ``specificity_at_threshold`` (the ROC point
    with the smallest |sensitivity - specificity|; ties -> larger sensitivity + specificity,
    then the larger threshold).
    """
    nan = float("nan")
    out = dict(eer=nan, sensitivity_at_eer=nan, specificity_at_eer=nan, threshold=nan,
               sensitivity_at_threshold=nan, specificity_at_threshold=nan)
    if len(fpr) == 0 or np.isnan(fpr).any() or np.isnan(tpr).any():
        return out
    # d = FPR - (1 - TPR) = FPR + TPR - 1 runs from +1 at (1, 1) down to -1 at (0, 0).
    d = fpr + tpr - 1.0
    eer = nan
    for k in range(len(d) - 1):
        d0, d1 = d[k], d[k + 1]
        if d0 == 0:
            eer = float(fpr[k])
            break
        if (d0 > 0) != (d1 > 0) or d1 == 0:
            s = d0 / (d0 - d1)
            eer = float(fpr[k] + s * (fpr[k + 1] - fpr[k]))
            break
    out.update(eer=eer, sensitivity_at_eer=1.0 - eer, specificity_at_eer=1.0 - eer)
    spec = 1.0 - fpr
    gap = np.abs(tpr - spec)
    best = np.lexsort((-np.asarray(thresholds, dtype=float), -(tpr + spec), gap))[0]
    out.update(threshold=float(thresholds[best]), sensitivity_at_threshold=float(tpr[best]),
               specificity_at_threshold=float(spec[best]))
    return out


def image_roc_table(scores: Mapping[str, np.ndarray] | pd.DataFrame,
                    labels: Mapping[str, np.ndarray] | pd.DataFrame,
                    score_name: str = "flagged_fraction") -> pd.DataFrame:
    """ROC summary per lesion type over images.

    ``scores[lesion]`` and ``labels[lesion]`` are per-image arrays in the same image order
    (or DataFrames with one column per lesion type). Columns: lesion, score, n_images,
    n_positive, n_negative, auc, eer, sensitivity_at_eer, specificity_at_eer, threshold,
    sensitivity_at_threshold, specificity_at_threshold.
    """
    rows = []
    lesions = list(labels.columns if isinstance(labels, pd.DataFrame) else labels.keys())
    for lesion in lesions:
        s = np.asarray(scores[lesion], dtype=float)
        y = np.asarray(labels[lesion]).astype(bool)
        fpr, tpr, thr = roc_curve(s, y)
        e = equal_error_rate(fpr, tpr, thr)
        rows.append(dict(lesion=lesion, score=score_name, n_images=int(y.size), n_positive=int(y.sum()),
                         n_negative=int((~y).sum()), auc=auc(fpr, tpr), **e))
    return pd.DataFrame(rows, columns=["lesion", "score", "n_images", "n_positive", "n_negative", "auc",
                                       "eer", "sensitivity_at_eer", "specificity_at_eer", "threshold",
                                       "sensitivity_at_threshold", "specificity_at_threshold"])
