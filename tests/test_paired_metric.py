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


def test_faithfulness_paired_splits_by_explained_class():
    """Overall rows pair every image; per-class rows pair only the images explained as that class
    (classes with fewer than 5 images get none), so a game can lose overall and still be level
    with the baseline within one class."""
    from retina_fgvis.faithfulness import ALL_CLASSES, FaithfulnessRun, faithfulness_paired, _paired_lines

    referable = [(0.20, 0.30), (0.25, 0.20), (0.10, 0.40), (0.30, 0.50), (0.40, 0.50)]  # fgvis, lime
    healthy = [(0.70, 0.50), (0.70, 0.60), (0.80, 0.50), (0.65, 0.50), (0.75, 0.50)]
    rows = []
    for cls, pairs in (("referable", referable), ("non-referable", healthy), ("ungradable", [(0.9, 0.1)])):
        for i, (fg, lime) in enumerate(pairs):
            rows += [{"image": f"{cls}{i}", "method": "fgvis", "target_name": cls, "deletion_auc": fg},
                     {"image": f"{cls}{i}", "method": "lime", "target_name": cls, "deletion_auc": lime}]
    run = FaithfulnessRun(per_image=pd.DataFrame(rows), curves={}, fractions=np.zeros(1), model_kind="rdr")
    t = faithfulness_paired(run).set_index("explained_class")
    assert list(t.index) == [ALL_CLASSES, "non-referable", "referable"]  # "ungradable": 1 image, no row
    assert (t["method"] == "fgvis").all() and (t["other"] == "lime").all()
    assert t.loc[ALL_CLASSES, "n"] == 11 and t.loc[ALL_CLASSES, "lower"] == 4
    assert t.loc["referable", "n"] == 5 and t.loc["referable", "lower"] == 4
    assert t.loc["referable", "mean_difference"] == pytest.approx((-0.10 + 0.05 - 0.30 - 0.20 - 0.10) / 5)
    assert t.loc["non-referable", "n"] == 5 and t.loc["non-referable", "lower"] == 0
    assert t.loc["non-referable", "mean_difference"] == pytest.approx(0.20)
    # exact two-sided Wilcoxon, 5 differences of one sign: p = 2 / 2**5
    assert t.loc["non-referable", "wilcoxon_p"] == pytest.approx(0.0625)
    assert len(faithfulness_paired(run, min_images_per_class=1)) == 4  # the 1-image class too
    md = "\n".join(_paired_lines(run))
    assert "| non-referable | referable |" in md
    assert "0 of 5; +0.2000; p = 0.062" in md and "4 of 5; -0.1300" in md


def test_faithfulness_paired_one_class_has_only_overall_rows():
    from retina_fgvis.faithfulness import ALL_CLASSES, FaithfulnessRun, faithfulness_paired, _paired_lines

    rows = [{"image": f"e{i}", "method": m, "target_name": "cat", "deletion_auc": v}
            for i in range(3) for m, v in (("fgvis", 0.1 * i), ("gradcam", 0.5))]
    run = FaithfulnessRun(per_image=pd.DataFrame(rows), curves={}, fractions=np.zeros(1))
    t = faithfulness_paired(run)
    assert list(t["explained_class"]) == [ALL_CLASSES] and t["lower"].iloc[0] == 3
    assert "within each explained class" not in "\n".join(_paired_lines(run))
