"""Threshold-free lesion scores of the game study, with hand-computed golden numbers."""
from __future__ import annotations

import numpy as np
import pytest

from retina_fgvis.game_study import lesion_scores


def test_enrichment_and_topk_precision_by_hand() -> None:
    fov = np.zeros((10, 20), bool)
    fov[:, :10] = True  # 100 FOV pixels
    gt = np.zeros_like(fov)
    gt[0, :4] = True  # 4 GT pixels -> GT share 0.04
    imp = np.zeros((10, 20))
    imp[0, :2] = 1.0  # 2 removed pixels on GT, mass 2
    imp[5, :2] = 0.5  # 2 off GT, mass 1
    imp[:, 15] = 9.0  # outside the FOV: ignored
    s = lesion_scores(imp, gt, fov)
    assert s["gt_share"] == pytest.approx(0.04)
    assert s["mass_inside_gt"] == pytest.approx(2 / 3)
    assert s["enrichment"] == pytest.approx((2 / 3) / 0.04)  # 16.67x
    # top 1 % of 100 FOV pixels = 1 pixel: the first 1.0 pixel (stable order) is on GT
    assert s["precision_top1"] == pytest.approx(1.0)


def test_uniform_importance_is_chance() -> None:
    fov = np.ones((20, 20), bool)
    gt = np.zeros_like(fov)
    gt[:5] = True
    s = lesion_scores(np.ones((20, 20)), gt, fov)
    assert s["enrichment"] == pytest.approx(1.0)
