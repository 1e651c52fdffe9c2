"""Detection metrics on synthetic GT/proposals with hand-computed golden values.

Scene (20 x 20 grids), three images:

image "a": GT H  A = rows 0-3, cols 0-3 (16 px);  B = rows 10-11, cols 10-13 (8 px)
           P1 = rows 0-1, cols 0-6 (14 px): P1 ∩ A = rows 0-1 x cols 0-3 = 8 px
           P2 = rows 3-4, cols 2-3 (4 px):  P2 ∩ A = row 3 x cols 2-3   = 2 px
           P3 = rows 15-16, cols 15-16 (4 px): touches nothing -> false positive
  A, union of touching {P1, P2}: |P∩G| = 10, |P| = 18, |G| = 16
      coverage 10/16 = 0.625, precision 10/18 = 0.5556, IoU 10/(18+16-10) = 10/24 = 0.41667
  A, pair: P1: cov 8/16 = .5, prec 8/14 = .5714, IoU 8/(14+16-8) = 8/22 = .3636
           P2: cov 2/16 = .125, prec 2/4 = .5, IoU 2/(4+16-2) = 2/18 = .1111
      -> best per mode: cov .5, prec .5714, IoU .3636
  B untouched: 0 in every mode.
image "b": GT H  C = rows 5-9, cols 5-9 (25 px); P = rows 5-9, cols 9-13 (25 px), ∩ = col 9 = 5 px
      cov 5/25 = .2, prec 5/25 = .2, IoU 5/45 = .1111  (not detected even at 25 %)
           GT HE D = rows 0-1, cols 0-1 (4 px); Q = rows 0-3, cols 0-3 (16 px), ∩ = 4
      cov 4/4 = 1, prec 4/16 = .25 (exactly the 25 % boundary), IoU 4/16 = .25
image "c": no GT; one proposal -> false positive.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from retina_fgvis.metrics.detection import (
    false_positive_regions, froc_table, image_sensitivity, lesion_level, overlap_scores,
    score_image, type_agreement,
)

KIND = {"H": "red", "RSD": "red", "HE": "bright", "SE": "bright"}


def _img_a():
    gt = np.zeros((20, 20), bool)
    gt[0:4, 0:4] = True
    gt[10:12, 10:14] = True
    lab = np.zeros((20, 20), np.int32)
    lab[0:2, 0:7] = 1
    lab[3:5, 2:4] = 2
    lab[15:17, 15:17] = 3
    return {"H": gt, "HE": np.zeros_like(gt), "SE": np.zeros_like(gt)}, lab


def _img_b():
    h = np.zeros((20, 20), bool)
    h[5:10, 5:10] = True
    he = np.zeros((20, 20), bool)
    he[0:2, 0:2] = True
    lab = np.zeros((20, 20), np.int32)
    lab[5:10, 9:14] = 1
    lab[0:4, 0:4] = 2
    return {"H": h, "HE": he, "SE": np.zeros_like(h)}, lab


def _img_c():
    lab = np.zeros((20, 20), np.int32)
    lab[18:20, 0:3] = 1
    z = np.zeros((20, 20), bool)
    return {"H": z, "HE": z, "SE": z}, lab


def _scores():
    (ga, la), (gb, lb), (gc, lc) = _img_a(), _img_b(), _img_c()
    return [score_image(ga, la, "a", region_kinds={1: "red", 2: "bright", 3: "red"}),
            score_image(gb, lb, "b", region_kinds={1: "red", 2: "bright"}),
            score_image(gc, lc, "c", region_kinds={1: "bright"})]


def test_overlap_union_golden():
    gt, lab = _img_a()
    df = overlap_scores(gt["H"], lab, aggregate="union")
    a, b = df.iloc[0], df.iloc[1]
    assert (a.gt_area, a.n_touching, a.intersection, a.proposal_area) == (16, 2, 10, 18)
    assert a.coverage == pytest.approx(0.625)
    assert a.precision == pytest.approx(10 / 18)
    assert a.iou == pytest.approx(10 / 24)
    assert (b.gt_area, b.n_touching, b.coverage, b.precision, b.iou) == (8, 0, 0, 0, 0)


def test_overlap_pair_golden():
    gt, lab = _img_a()
    a = overlap_scores(gt["H"], lab, aggregate="pair").iloc[0]
    assert a.coverage == pytest.approx(0.5)
    assert a.precision == pytest.approx(8 / 14)
    assert a.iou == pytest.approx(8 / 22)
    assert (a.intersection, a.proposal_area) == (8, 14)  # the best-IoU pair, P1


def test_bool_mask_proposals_equal_labels():
    gt, lab = _img_b()
    pd.testing.assert_frame_equal(overlap_scores(gt["HE"], lab > 0), overlap_scores(gt["HE"], lab))


def test_false_positives():
    gt, lab = _img_a()
    assert false_positive_regions(gt, lab).tolist() == [3]
    s = _scores()
    assert [x.fp_regions for x in s] == [1, 0, 1]
    assert [x.n_regions for x in s] == [3, 2, 1]


def test_image_sensitivity_golden():
    t = image_sensitivity(_scores(), overlaps=(0.25, 0.5))
    get = lambda l, o, m: t[(t.lesion == l) & (t.overlap == o) & (t["mode"] == m)].iloc[0]
    # H: images a and b contain H; only a reaches the overlap (b scores .2 / .2 / .111)
    assert get("H", 0.25, "coverage")[["n_images", "detected"]].tolist() == [2, 1]
    assert get("H", 0.5, "coverage").sensitivity == 0.5          # A: .625 >= .5
    assert get("H", 0.5, "precision").sensitivity == 0.5         # A: .5556 >= .5
    assert get("H", 0.25, "iou").sensitivity == 0.5              # A: .4167 >= .25
    assert get("H", 0.5, "iou").sensitivity == 0.0               # A: .4167 < .5
    # HE: only image b; D: cov 1, prec .25, IoU .25 (exact boundary counts as reached)
    assert get("HE", 0.5, "coverage").sensitivity == 1.0
    assert get("HE", 0.25, "precision").sensitivity == 1.0
    assert get("HE", 0.5, "precision").sensitivity == 0.0
    assert get("HE", 0.25, "iou").sensitivity == 1.0
    # SE: no image has it -> undefined
    assert get("SE", 0.25, "coverage").n_images == 0 and math.isnan(get("SE", 0.25, "coverage").sensitivity)
    assert list(t.columns) == ["lesion", "overlap", "mode", "n_images", "detected", "sensitivity"]
    assert len(t) == 3 * 2 * 3


def test_image_sensitivity_pair_mode_differs():
    (ga, la) = _img_a()
    s = [score_image(ga, la, "a", aggregate="pair")]
    t = image_sensitivity(s, overlaps=(0.5,), modes=("coverage", "iou"))
    # pair: best coverage is P1's .5 (>= .5 reached), best IoU .3636 (< .5)
    assert t.sensitivity.tolist()[:2] == [1.0, 0.0]


def test_lesion_level_golden():
    t = lesion_level(_scores(), overlaps=(0.25,), modes=("coverage",))
    row = lambda l: t[t.lesion == l].iloc[0]
    # H: A, B, C; coverage >= .25 only A; touched A and C
    assert row("H")[["n_lesions", "hits", "touched"]].tolist() == [3, 1, 2]
    assert row("H").hit_fraction == pytest.approx(1 / 3)
    assert row("HE")[["n_lesions", "hits"]].tolist() == [1, 1]
    assert row("all")[["n_lesions", "hits"]].tolist() == [4, 2]
    # 2 FP regions (a:P3, c) over 3 images, 6 regions in all
    assert row("all")[["n_regions", "fp_regions"]].tolist() == [6, 2]
    assert row("all").fp_per_image == pytest.approx(2 / 3)


def test_froc_table():
    (ga, la), (gb, lb) = _img_a(), _img_b()
    strict_a = np.where(la == 2, 0, la)  # a stricter threshold drops P2
    by_thr = {0.5: [score_image(ga, la, "a"), score_image(gb, lb, "b")],
              0.9: [score_image(ga, strict_a, "a"), score_image(gb, np.zeros_like(lb), "b")]}
    f = froc_table(by_thr, overlaps=(0.25,), modes=("coverage",))
    allrow = f[f.lesion == "all"].set_index("threshold")
    # thr .5: lesions A,B,C,D; hits A (.625), D (1.0) -> 2/4; FP: P3 -> 1 over 2 images
    assert allrow.loc[0.5, "sensitivity"] == 0.5 and allrow.loc[0.5, "fp_per_image"] == 0.5
    # thr .9: only P1 (A coverage 8/16 = .5 hit) and P3 (FP) -> 1/4, FP 1/2 images
    assert allrow.loc[0.9, "sensitivity"] == 0.25 and allrow.loc[0.9, "fp_per_image"] == 0.5
    h = f[(f.lesion == "H") & (f.threshold == 0.9)].iloc[0]
    assert h.image_sensitivity == 0.5  # a detected, b not


def test_type_agreement_golden():
    t = type_agreement(_scores(), KIND).set_index("kind")
    # a: P1 red on H (agree), P2 bright on H (disagree); b: P red on H, Q bright on HE (agree)
    assert t.loc["red", ["n_regions", "agree"]].tolist() == [3, 2]
    assert t.loc["bright", ["n_regions", "agree"]].tolist() == [1, 1]
    assert t.loc["all", "agreement"] == pytest.approx(0.75)


def test_images_must_have_unique_names_to_be_scored_together():
    """Hits are joined to images by name: two unnamed (or same-named) images would share them,
    a miss would count as detected (1/2 read as 2/2)."""
    gt = {"H": np.zeros((20, 20), bool)}
    gt["H"][5:9, 5:9] = True
    hit = np.zeros((20, 20), bool)
    hit[5:9, 5:9] = True
    miss = np.zeros((20, 20), bool)
    named = [score_image(gt, hit, "a"), score_image(gt, miss, "b")]
    assert image_sensitivity(named, overlaps=(0.5,), modes=("coverage",)).sensitivity.tolist() == [0.5]
    for names, shown in ((("x", "x"), "'x' twice"), (("", "b"), "'' (empty)")):
        scores = [score_image(gt, hit, names[0]), score_image(gt, miss, names[1])]
        with pytest.raises(ValueError, match=f"image names must be unique and non-empty.*{re.escape(shown)}"):
            image_sensitivity(scores)
        with pytest.raises(ValueError, match="image names must be unique"):
            lesion_level(scores)
