"""Threshold-free lesion scores of the game study, with hand-computed golden numbers."""
from __future__ import annotations

import numpy as np
import pytest

from retina_fgvis.metrics.enrichment import lesion_scores


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


def _tiny_layout_and_weights(tmp_path, specs):
    """A synthetic DiaretDB1 training split and a tiny 32-px classifier checkpoint."""
    from _synth_diaretdb1 import make_layout
    from retina_fgvis.classifier.model import build_model, save_checkpoint

    root = make_layout(tmp_path / "data", specs, train=list(specs), test=[], write_test_images=False)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(build_model("tiny"), {"arch": "tiny", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                          "class_names": ["non-referable", "referable"], "threshold": 0.5}, weights)
    return root, weights


def test_study_cli_seeds_the_diaretdb1_cache(tmp_path, monkeypatch) -> None:
    """The study's default-game maps are reused by `evaluate diaretdb1` (no second game)."""
    from typer.testing import CliRunner

    from retina_fgvis.cli import app
    from retina_fgvis.evaluation_diaretdb1 import read_csv

    root, weights = _tiny_layout_and_weights(
        tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}, "image002": {"HE": [(30, 40, 34, 44, 252)]}})
    study, ev = tmp_path / "study", tmp_path / "eval"
    monkeypatch.chdir(tmp_path)  # the report names the weights relative to the working directory
    r = CliRunner().invoke(app, ["evaluate", "game-study", "--data-dir", str(root), "--out", str(study),
                                 "--weights", str(weights), "--setting", "sgdn-logodds-lr0.3",
                                 "--seed-diaretdb1", str(ev)])
    assert r.exit_code == 0, r.output
    table = __import__("pandas").read_csv(study / "summary.csv")
    assert set(table.defense) == {True, False} and (table.images == 2).all()
    assert "Classifier: `tiny.pt` (sha256" in (study / "summary.md").read_text()
    # re-summarising runs no game and rebuilds the same table from per_image.csv
    (study / "summary.csv").unlink()
    r = CliRunner().invoke(app, ["evaluate", "game-study", "--data-dir", str(root), "--out", str(study),
                                 "--weights", str(weights), "--summarise-only"])
    assert r.exit_code == 0, r.output
    again = __import__("pandas").read_csv(study / "summary.csv")
    assert again.equals(table) and "enrichment_goal_reached" in again.columns
    assert (study / "enrichment_vs_iterations_sgdn-logodds-lr0.3.png").is_file()
    r = CliRunner().invoke(app, ["evaluate", "diaretdb1", "--data-dir", str(root), "--split", "train",
                                 "--out", str(ev), "--weights", str(weights), "--no-overlays"])
    assert r.exit_code == 0, r.output
    per = read_csv(ev / "per_image.csv")
    assert per.cached.all()  # the study's maps were used
    assert "enrichment" in per.columns


def test_background_reference_setting_runs_and_never_seeds_the_cache(tmp_path) -> None:
    """A setting with another reference is a different game: its maps must not enter the cache."""
    from typer.testing import CliRunner

    from retina_fgvis.cli import app

    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}})
    study, ev = tmp_path / "study", tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", "game-study", "--data-dir", str(root), "--out", str(study),
                                 "--weights", str(weights), "--setting", "sgdn-logodds-lr0.3-blurref",
                                 "--undefended", "", "--seed-diaretdb1", str(ev), "--max-iterations", "5"])
    assert r.exit_code == 0, r.output
    rows = __import__("pandas").read_csv(study / "per_image.csv")
    assert list(rows.setting) == ["sgdn-logodds-lr0.3-blurref"] and rows.p_before.notna().all()
    assert not any(p.is_file() for p in ev.rglob("*"))
