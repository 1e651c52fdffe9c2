"""Classifier metrics: ROC AUC with a patient-level bootstrap CI, operating points.

Why patient-level bootstrap: both eyes of a person are correlated (same camera, same disease
state); resampling images would understate the uncertainty.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2). NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None,
                     n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling ``groups`` (patients) with replacement."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.nonzero(inv == g)[0] for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        a = roc_auc(y[idx], p[idx])
        if not np.isnan(a):
            aucs.append(a)
    if not aucs:
        return float("nan"), float("nan")
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of ``p >= threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    sens = float(pred[y].mean()) if y.any() else float("nan")
    spec = float((~pred[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (sensitivity/specificity)."""
    if n == 0:
        return float("nan"), float("nan")
    ph = k / n
    den = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / den
    h = z * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return float(c - h), float(c + h)


def pick_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float | None = 0.85) -> float:
    """Operating threshold on p(referable).

    With ``min_sensitivity``: the highest threshold whose sensitivity is at least that (screening
    wants few missed referable eyes, then as few false referrals as possible). Without it: the
    Youden point (max sens + spec - 1).

    The threshold returned lies halfway between the chosen score and the next lower one: the
    same decisions on these scores, but the eye that sets it no longer sits exactly on it, where
    a change of p in the 7th decimal (thread count, device) would flip it.
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    cands = np.unique(p)[::-1]

    def below(i: int) -> float:  # halfway to the next lower score (the lowest stays as it is)
        return float((cands[i] + cands[i + 1]) / 2) if i + 1 < len(cands) else float(cands[i])

    best_i, best_j = None, -1.0
    for i, t in enumerate(cands):
        se, sp = sens_spec(y, p, t)
        if min_sensitivity is not None:
            if se >= min_sensitivity:
                return below(i)
        elif se + sp - 1 > best_j:
            best_i, best_j = i, se + sp - 1
    if min_sensitivity is None:
        return below(best_i) if best_i is not None else 0.5
    return below(len(cands) - 1)


def summarise(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, threshold: float,
              n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC + 95 % CI, sensitivity/specificity (+ Wilson CI) at ``threshold``, counts."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    auc = roc_auc(y, p)
    lo, hi = bootstrap_auc_ci(y, p, groups, n_boot=n_boot, seed=seed)
    se, sp = sens_spec(y, p, threshold)
    tp = int(((p >= threshold) & y).sum())
    tn = int(((p < threshold) & ~y).sum())
    return {
        "n": int(len(y)), "n_referable": int(y.sum()),
        "n_patients": int(len(np.unique(groups))) if groups is not None else int(len(y)),
        "auc": auc, "auc_ci95": [lo, hi],
        "threshold": float(threshold),
        "sensitivity": se, "sensitivity_ci95": list(wilson_ci(tp, int(y.sum()))),
        "specificity": sp, "specificity_ci95": list(wilson_ci(tn, int((~y).sum()))),
        # per-class mean p: two sources scored on different scales (a source shortcut) show here
        # even when each source's AUC is fine; None for a class with no images
        "mean_p_non_referable": float(p[~y].mean()) if (~y).any() else None,
        "mean_p_referable": float(p[y].mean()) if y.any() else None,
    }
