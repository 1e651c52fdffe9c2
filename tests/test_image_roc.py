"""Official DiaretDB1 image-based ROC / EER on hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from retina_fgvis.metrics.image_roc import auc, equal_error_rate, image_roc_table, roc_curve


def test_roc_eer_exact_point():
    # scores .9 .8 .7 .6 .55 .4 ; labels 1 1 0 1 0 0 (3 pos, 3 neg); presence = score > t
    # t=-inf (1,1); .4 (fpr 2/3, tpr 1); .55 (1/3, 1); .6 (1/3, 2/3); .7 (0, 2/3); .8 (0, 1/3); .9 (0, 0)
    s = [0.9, 0.8, 0.7, 0.6, 0.55, 0.4]
    y = [1, 1, 0, 1, 0, 0]
    fpr, tpr, thr = roc_curve(s, y)
    assert np.allclose(fpr, [1, 2 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    assert np.allclose(tpr, [1, 1, 1, 2 / 3, 2 / 3, 1 / 3, 0])
    # AUC = P(pos > neg) = 8/9 (.9 and .8 beat all three negatives, .6 beats .55 and .4)
    assert auc(fpr, tpr) == pytest.approx(8 / 9)
    e = equal_error_rate(fpr, tpr, thr)
    # at t = .6: sensitivity 2/3 = specificity 1 - 1/3 -> EER 1/3
    assert e["eer"] == pytest.approx(1 / 3)
    assert e["sensitivity_at_eer"] == pytest.approx(2 / 3)
    assert e["threshold"] == 0.6
    assert e["sensitivity_at_threshold"] == pytest.approx(2 / 3)
    assert e["specificity_at_threshold"] == pytest.approx(2 / 3)


def test_eer_interpolated_and_tie_break():
    # pos .8 .4 .3 ; neg .6 .2.  ROC: (1,1) (.5,1) (.5,2/3) (.5,1/3) (0,1/3) (0,0)
    # FPR + TPR - 1 changes sign on the vertical segment (.5, 2/3)->(.5, 1/3): EER = .5.
    # Nearest points: t=.3 (sens 2/3, spec .5) and t=.4 (1/3, .5) both have gap 1/6;
    # the tie goes to the larger sens + spec -> t=.3.
    fpr, tpr, thr = roc_curve([0.8, 0.6, 0.4, 0.2, 0.3], [1, 0, 1, 0, 1])
    e = equal_error_rate(fpr, tpr, thr)
    assert e["eer"] == pytest.approx(0.5)
    assert e["threshold"] == 0.3
    assert e["sensitivity_at_threshold"] == pytest.approx(2 / 3)
    assert e["specificity_at_threshold"] == pytest.approx(0.5)
    assert auc(fpr, tpr) == pytest.approx(4 / 6)


def test_table_and_empty_class():
    t = image_roc_table({"H": [0.1, 0.2, 0.3], "SE": [0.1, 0.2, 0.3]},
                        {"H": [0, 0, 1], "SE": [0, 0, 0]})
    h = t[t.lesion == "H"].iloc[0]
    assert (h.n_positive, h.n_negative, h.auc, h.eer) == (1, 2, 1.0, 0.0)
    se = t[t.lesion == "SE"].iloc[0]
    assert math.isnan(se.auc) and math.isnan(se.eer)
