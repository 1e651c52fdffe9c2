"""Paired comparison of methods on the same images: golden numbers (hand-computed)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from retina_fgvis.metrics.paired import paired_comparison_table, paired_difference


def test_paired_difference_golden_numbers():
    # a - b = -1, -2, -3, -4, -5: a lower on all 5; mean -3, sd sqrt(2.5), sem sqrt(2.5 / 5);
    # exact two-sided signed-rank p: only the all-negative and all-positive of 2^5 sign patterns
    # are as extreme -> 2 / 32.
    r = paired_difference(np.zeros(5), np.arange(1.0, 6.0))
    assert (r["n"], r["lower"], r["ties"]) == (5, 5, 0)
    assert r["mean_difference"] == pytest.approx(-3.0)
    assert r["sem_difference"] == pytest.approx(math.sqrt(0.5))
    assert r["wilcoxon_p"] == pytest.approx(2 / 32)


def test_paired_difference_drops_zero_differences_from_the_test_but_counts_them():
    # d = 0, 1, 2: one tie, a never lower; the test sees 1, 2 -> exact p = 2 * (1 / 4)
    r = paired_difference(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0]))
    assert (r["n"], r["lower"], r["ties"]) == (3, 0, 1)
    assert r["mean_difference"] == pytest.approx(1.0)
    assert r["wilcoxon_p"] == pytest.approx(0.5)


def test_paired_difference_all_ties_has_no_p_value():
    r = paired_difference(np.ones(4), np.ones(4))
    assert r["lower"] == 0 and r["ties"] == 4 and math.isnan(r["wilcoxon_p"])


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match="one length"):
        paired_difference(np.zeros(3), np.zeros(4))


def test_paired_table_pairs_by_image_and_skips_missing_images():
    rows = [("e1", "game", 0.1), ("e2", "game", 0.2), ("e3", "game", 0.9),
            ("e1", "lime", 0.3), ("e2", "lime", 0.5), ("e3", "lime", 0.4), ("e4", "lime", 0.0),
            ("e1", "rise", 0.05)]
    df = pd.DataFrame(rows, columns=["image", "method", "deletion_auc"])
    t = paired_comparison_table(df, ["game"], ["lime", "rise"]).set_index("other")
    assert t.loc["lime", "n"] == 3 and t.loc["lime", "lower"] == 2  # e4 has no game row
    assert t.loc["lime", "mean_difference"] == pytest.approx((-0.2 - 0.3 + 0.5) / 3)
    assert t.loc["rise", "n"] == 1 and t.loc["rise", "lower"] == 0
    assert list(paired_comparison_table(df, ["game"], ["absent"]).columns)[:3] == ["method", "other", "n"]
