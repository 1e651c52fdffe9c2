"""Paired comparison of two attribution methods on the same images.

Why paired: every method in a faithfulness run explains the *same* images, and the deletion AUC
varies far more between eyes (a confident referable eye vs a borderline healthy one) than between
methods on one eye. Comparing means with their separate standard errors hides that; the per-image
difference does not. For each (method, other) pair this reports on how many images the method is
lower (better), the mean paired difference with its standard error, and the two-sided Wilcoxon
signed-rank p-value (``scipy.stats.wilcoxon``; exact for small samples without ties, normal
approximation otherwise; zero differences dropped, Wilcoxon's convention). No correction for
multiple comparisons is applied: the table says how many pairs it holds.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

__all__ = ["paired_difference", "paired_comparison_table"]


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Summarise ``a - b`` over paired samples (lower ``a`` = method a is better).

    Returns n, ``lower`` (a < b), ``ties`` (a == b), the mean difference, its standard error and
    the two-sided Wilcoxon signed-rank p-value (NaN when fewer than one non-zero difference).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    d = a - b
    n = int(d.size)
    nonzero = d[d != 0]
    p = float(wilcoxon(nonzero).pvalue) if nonzero.size else float("nan")
    return {
        "n": n,
        "lower": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "mean_difference": float(d.mean()) if n else float("nan"),
        "sem_difference": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "wilcoxon_p": p,
    }


def paired_comparison_table(per_image: pd.DataFrame, methods: Sequence[str], others: Sequence[str],
                            value: str = "deletion_auc") -> pd.DataFrame:
    """One row per (method, other) pair over the images both methods have.

    ``per_image`` has one row per (image, method) with columns ``image``, ``method`` and ``value``.
    Images missing for either method are left out of that pair (its ``n`` says how many remain).
    """
    wide = per_image.pivot_table(index="image", columns="method", values=value, aggfunc="first")
    rows = []
    for method in methods:
        for other in others:
            if method == other or method not in wide or other not in wide:
                continue
            both = wide[[method, other]].dropna()
            rows.append({"method": method, "other": other,
                         **paired_difference(both[method].to_numpy(), both[other].to_numpy())})
    return pd.DataFrame(rows, columns=["method", "other", "n", "lower", "ties", "mean_difference",
                                       "sem_difference", "wilcoxon_p"])
