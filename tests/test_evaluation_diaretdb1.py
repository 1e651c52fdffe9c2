"""DiaretDB1 evaluation pipeline on a tiny synthetic official-layout folder with a fake
explainer (no model): outputs, golden scores, cache re-use, CLI errors.

Scene (60 x 80 px, FOV circle r = 28): the fake explainer removes (importance 1.0) every
pixel whose colour differs from the background, i.e. every painted blob.
  image001: H 6x6 (grey 189 -> GT, 36 px, dark)  + HE 4x4 at grey 168 (not GT: FP, bright)
  image002: HE 4x4 (252 -> GT, bright)            + RSD 2x2 (210 -> GT, dark)
  image003: SE only outside the FOV (no GT)       + dark 3x3 blob without GT (FP)
=> coverage 100 % for H, HE, RSD (1/1 image each), SE undefined (0 images);
   5 regions, 2 false positives over 3 images = 0.667 / image; type guess 3/3 agree.
"""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from _synth_diaretdb1 import make_layout
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.evaluation_diaretdb1 import EvalSettings, evaluate_diaretdb1, read_csv
from retina_fgvis.lesions import RegionSettings

SPECS = {
    "image001": {"H": [(20, 20, 26, 26, 189)], "HE": [(30, 40, 34, 44, 168)]},
    "image002": {"HE": [(30, 40, 34, 44, 252)], "RSD": [(10, 38, 12, 40, 210)]},
    "image003": {"SE": [(0, 0, 5, 5, 252)], "rgb_only": [(28, 10, 31, 13, 0)]},
}
SETTINGS = EvalSettings(regions=RegionSettings(min_area=1, max_fov_fraction=1.0, closing_radius=0, reference_fov_diameter=None),
                        froc_thresholds=(0.5, 0.95))


class FakeExplainer:
    identity = {"fake": 1}

    def __init__(self):
        self.calls = 0

    def __call__(self, rgb, fov):
        self.calls += 1
        # importance 0.9 on every pixel that differs from the background colour, 0 elsewhere
        return 0.9 * (np.abs(rgb.astype(int) - np.array([180, 90, 40])).sum(axis=2) > 0).astype(np.float32)


@pytest.fixture()
def dataset(tmp_path):
    root = make_layout(tmp_path / "data", SPECS, train=list(SPECS), test=["image009"],
                       write_test_images=False)
    return DiaretDB1(root, "train")


def test_pipeline_golden_and_outputs(dataset, tmp_path):
    out = tmp_path / "out"
    fake = FakeExplainer()
    res = evaluate_diaretdb1(dataset, fake, out, settings=SETTINGS)
    assert fake.calls == 3
    sens = read_csv(out / "sensitivity.csv")
    assert list(sens.columns) == ["lesion", "overlap", "mode", "n_images", "detected", "sensitivity"]
    cov = sens[sens["mode"] == "coverage"].set_index(["lesion", "overlap"])
    for lesion in ("H", "HE", "RSD"):
        assert cov.loc[(lesion, 0.5), "sensitivity"] == 1.0 and cov.loc[(lesion, 0.5), "n_images"] == 1
    assert cov.loc[("SE", 0.25), "n_images"] == 0 and np.isnan(cov.loc[("SE", 0.25), "sensitivity"])
    ll = res.lesion_level
    assert ll.fp_regions.iloc[0] == 2 and ll.n_regions.iloc[0] == 5
    assert ll.fp_per_image.iloc[0] == pytest.approx(2 / 3)
    agree = res.type_agreement.set_index("kind")
    assert agree.loc["all", ["n_regions", "agree"]].tolist() == [3, 3]
    # FROC: threshold 0.95 is above every importance and flags nothing
    froc = read_csv(out / "froc.csv")
    allc = froc[(froc.lesion == "all") & (froc["mode"] == "coverage") & (froc.overlap == 0.25)]
    assert allc.set_index("threshold").sensitivity.to_dict() == {0.5: 1.0, 0.95: 0.0}
    roc = read_csv(out / "image_roc.csv")
    assert roc[(roc.lesion == "H") & (roc.score == "flagged_fraction")].auc.iloc[0] == 1.0
    for name in ("lesion_level.csv", "froc.png", "per_image.csv", "regions.csv", "type_agreement.csv"):
        assert (out / name).is_file()
    assert (out / "sensitivity.csv").read_text().startswith("# Research use only, not a diagnosis")
    summary = (out / "summary.md").read_text()
    assert "Research use only, not a diagnosis" in summary and "94.7" in summary and "86.0" in summary
    assert "0.67" in summary
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["image001.png", "image002.png", "image003.png"]
    assert len(list((out / "cache").glob("*.npz"))) == 3
    assert not list(out.rglob(".*.tmp"))


def test_rescore_uses_cache(dataset, tmp_path):
    out = tmp_path / "out"
    fake = FakeExplainer()
    evaluate_diaretdb1(dataset, fake, out, settings=SETTINGS, limit=2)
    assert fake.calls == 2
    strict = EvalSettings(regions=SETTINGS.regions.replace(min_area=10**7), froc_thresholds=(0.5,),
                          overlays=False)
    res = evaluate_diaretdb1(dataset, fake, out, settings=strict, limit=2)
    assert fake.calls == 2 and res.n_cached == 2          # the "game" did not run again
    assert res.lesion_level.n_regions.iloc[0] == 0
    # cache-only re-scoring works without any explainer ...
    res = evaluate_diaretdb1(dataset, None, out, identity=FakeExplainer.identity, settings=SETTINGS, limit=2)
    assert res.lesion_level.n_regions.iloc[0] == 4
    # ... and another explainer identity never reads these maps
    with pytest.raises(FileNotFoundError, match="no cached importance map"):
        evaluate_diaretdb1(dataset, None, out, identity={"fake": 2}, settings=SETTINGS, limit=1)


def test_cli_missing_split_is_one_line(dataset, tmp_path):
    typer_testing = pytest.importorskip("typer.testing")
    import typer

    from retina_fgvis.commands import diaretdb1 as cmd

    app, ev = typer.Typer(), typer.Typer()
    app.add_typer(ev, name="evaluate")
    cmd.register(app, ev)
    root = dataset.resources.parents[1]
    r = typer_testing.CliRunner().invoke(app, ["evaluate", "diaretdb1", "--data-dir", str(root),
                                               "--split", "test", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    msg = r.output.strip()   # (stderr is mixed into output by default)
    assert "image009.png" in msg and "\n" not in msg


def _tiny_weights(path):
    torch = pytest.importorskip("torch")
    from retina_fgvis.classifier.model import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("tiny"), {"arch": "tiny", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                          "class_names": ["non-referable", "referable"], "threshold": 0.5}, path)
    return path


def test_cli_real_path_with_tiny_classifier(dataset, tmp_path, monkeypatch):
    """Wiring of classifier.prepare -> FGVis deletion game -> map_to_original -> cache -> scores,
    with a random 32-px TinyNet and two iterations (what is checked is plumbing, not quality)."""
    typer_testing = pytest.importorskip("typer.testing")
    import typer

    from retina_fgvis.commands import diaretdb1 as cmd

    weights = _tiny_weights(tmp_path / "tiny.pt")
    app, ev = typer.Typer(), typer.Typer()
    app.add_typer(ev, name="evaluate")
    cmd.register(app, ev)
    root = dataset.resources.parents[1]
    out = tmp_path / "o"
    args = ["evaluate", "diaretdb1", "--data-dir", str(root), "--split", "train", "--out", str(out),
            "--limit", "2", "--weights", str(weights), "--fgvis-setting", "max_iterations=2",
            "--fgvis-setting", "goal=fraction", "--no-overlays"]
    monkeypatch.chdir(tmp_path)  # the report names the weights relative to the working directory
    r = typer_testing.CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Research use only" in r.output
    assert "- weights: tiny.pt\n" in (out / "summary.md").read_text()
    per = read_csv(out / "per_image.csv")
    assert per.cached.tolist() == [False, False] and per.iterations.max() <= 2
    assert per.p_before.between(0, 1).all()
    npz = sorted((out / "cache").glob("*.npz"))
    assert len(npz) == 2
    with np.load(npz[0]) as z:
        assert z["importance"].shape == (60, 80)
        assert "max_iterations" in str(z["identity"]) and "weights_sha256" in str(z["identity"])
    r = typer_testing.CliRunner().invoke(app, args + ["--threshold", "0.2"])
    assert r.exit_code == 0 and "(2 cached)" in r.output
    # another game setting is another cache entry
    r = typer_testing.CliRunner().invoke(app, [a if a != "max_iterations=2" else "max_iterations=1" for a in args])
    assert r.exit_code == 0 and "(0 cached)" in r.output


def test_threshold_sweep_and_suggestion():
    import pandas as pd

    from retina_fgvis.evaluation_diaretdb1 import suggest_threshold, threshold_sweep

    # mean image sensitivity: thr .3 -> (1.0 + .5)/2 ... see rows; FP falls with the threshold
    rows = []
    for thr, s25, s50, fp in ((0.3, 1.0, 0.8, 3.0), (0.5, 1.0, 0.795, 1.0), (0.7, 0.6, 0.4, 0.2)):
        for lesion in ("H", "HE"):
            rows.append([thr, lesion, 0.25, "coverage", 1, 1, 1.0, s25, 2, 4, 2, fp])
            rows.append([thr, lesion, 0.5, "coverage", 1, 1, 1.0, s50, 2, 4, 2, fp])
        rows.append([thr, "all", 0.25, "coverage", 2, 2, 1.0, np.nan, 2, 4, 2, fp])
    froc = pd.DataFrame(rows, columns=["threshold", "lesion", "overlap", "mode", "n_lesions", "hits",
                                       "sensitivity", "image_sensitivity", "n_images", "n_regions",
                                       "fp_regions", "fp_per_image"])
    sw = threshold_sweep(froc).set_index("threshold")
    assert sw.loc[0.3, "score"] == pytest.approx(0.9) and sw.loc[0.5, "score"] == pytest.approx(0.8975)
    # best .9 at .3; .5 is within 0.01 and flags less -> .5; .7 (0.5) is not
    assert suggest_threshold(froc) == 0.5
    assert suggest_threshold(froc, tolerance=0.0) == 0.3


@pytest.fixture()
def wide_errors(monkeypatch):
    """Typer's usage-error panel as wide as the message: a long tmp path is not wrapped mid-text."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 400)


@pytest.mark.parametrize("args, message", [
    (["--threshold", "-1"], "Invalid value for --threshold: must be in (0, 1]"),
    (["--threshold", "5"], "Invalid value for --threshold: must be in (0, 1]"),
    (["--threshold", "0"], "Invalid value for --threshold: must be in (0, 1]"),
    (["--froc-thresholds", "0.1,-3"], "Invalid value for --froc-thresholds: must be in (0, 1]"),
    (["--froc-thresholds", "1.5"], "Invalid value for --froc-thresholds: must be in (0, 1]"),
    (["--fgvis-setting", "lr=-1"], "Invalid value for --fgvis-setting: lr must be a number > 0, got -1"),
    (["--fgvis-setting", "lr=0"], "Invalid value for --fgvis-setting: lr must be a number > 0, got 0"),
    (["--fgvis-setting", "foo=1"], "Invalid value for --fgvis-setting: unknown setting(s) foo (known: optimizer"),
    (["--fgvis-setting", "goal=bogus"], "Invalid value for --fgvis-setting: unknown goal 'bogus'"),
    (["--max-iterations", "0"], "Invalid value for '--max-iterations'"),
])
def test_cli_refuses_levels_and_game_settings_that_cannot_work(tmp_path, wide_errors, args, message):
    """Importance lives in [0, 1] and a pixel is flagged at or above the level: -1 or 0 flags every
    FOV pixel, 5 none, and these ran silently; lr <= 0 runs a game that adds evidence; a zero
    iteration cap was blamed on --fgvis-setting. All are refused before the data set is read."""
    r = CliRunner().invoke(_diaretdb1_app(), ["evaluate", "diaretdb1", "--data-dir", str(tmp_path / "nope"),
                                              "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "--fgvis-setting" not in r.output or "--fgvis-setting" in args
    assert not (tmp_path / "o").exists()


def _diaretdb1_app():
    import typer

    from retina_fgvis.commands import diaretdb1 as cmd

    app, ev = typer.Typer(), typer.Typer()
    app.add_typer(ev, name="evaluate")
    cmd.register(app, ev)
    return app


def _break_files(dataset):
    """image002's photograph truncated, image003's hard-exudate map a text file; paths returned."""
    image = dataset.image_dir / "image002.png"
    image.write_bytes(image.read_bytes()[:200])
    gt = dataset.gt_dir / "hardexudates" / "image003.png"
    gt.write_text("not a png")
    return image, gt


def test_unreadable_image_and_gt_map_are_skipped_and_listed(dataset, tmp_path):
    """One truncated image stopped the whole run (`cannot read image (OSError)`, no tables); now
    each unusable image is reported in one line, the rest is scored, and the outputs list it."""
    image, gt = _break_files(dataset)
    out, fake, lines = tmp_path / "out", FakeExplainer(), []
    res = evaluate_diaretdb1(dataset, fake, out, settings=SETTINGS, on_skip=lines.append)
    assert fake.calls == 1
    assert lines == [f"skipped {image}: cannot read image: image file is truncated",
                     (f"skipped {gt}: cannot read ground-truth map: not an image file PIL can decode "
                      "(unknown format or damaged header)")]
    assert [s.image for s in res.skipped] == ["image002", "image003"]
    per = read_csv(out / "per_image.csv")
    assert per.image.tolist() == ["image001", "image002", "image003"] and per.columns[-1] == "skipped"
    assert per.skipped.isna().tolist() == [True, False, False]
    assert per.skipped[1] == "images/ddb1_fundusimages/image002.png: cannot read image: image file is truncated"
    assert per.skipped[2].startswith("images/ddb1_groundtruth/hardexudates/image003.png: cannot read")
    sens = read_csv(out / "sensitivity.csv")
    assert sens[sens.lesion == "H"].n_images.max() == 1 and sens[sens.lesion == "HE"].n_images.max() == 0
    summary = (out / "summary.md").read_text()
    assert "(1 image; 2 more skipped as unusable" in summary and "## Skipped images" in summary
    assert "- image002: `images/ddb1_fundusimages/image002.png`: cannot read image: image file is truncated" \
        in summary
    assert "total" in summary and "for 1 image;" in summary


def test_every_image_unusable_is_one_error_and_writes_no_table(dataset, tmp_path):
    from retina_fgvis.datasets.diaretdb1 import DiaretDB1Error

    for name in ("image001", "image002", "image003"):
        (dataset.image_dir / f"{name}.png").write_text("x")
    out = tmp_path / "out"
    with pytest.raises(DiaretDB1Error, match="no usable images: all 3 image"):
        evaluate_diaretdb1(dataset, FakeExplainer(), out, settings=SETTINGS)
    assert not (out / "per_image.csv").exists() and not (out / "summary.md").exists()


def test_cli_reports_each_skip_and_fails_in_one_line_when_none_is_left(dataset, tmp_path):
    """The command prints `skipped <path>: <reason>` per unusable image; with none left it exits 2."""
    weights = _tiny_weights(tmp_path / "tiny.pt")
    for name in ("image001", "image002"):
        (dataset.image_dir / f"{name}.png").write_text("x")
    root = dataset.resources.parents[1]
    r = CliRunner().invoke(_diaretdb1_app(), ["evaluate", "diaretdb1", "--data-dir", str(root), "--split", "train",
                                              "--out", str(tmp_path / "o"), "--limit", "2", "--weights",
                                              str(weights)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("skipped ", "error: "))]
    assert lines[:2] == [f"skipped {dataset.image_dir / n}.png: cannot read image: not an image file PIL can "
                         "decode (unknown format or damaged header)" for n in ("image001", "image002")]
    assert lines[2].startswith("error: ") and "no usable images: all 2 image(s)" in lines[2] and len(lines) == 3
