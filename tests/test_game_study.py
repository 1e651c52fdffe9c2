"""Threshold-free lesion scores of the game study, with hand-computed golden numbers."""
from __future__ import annotations

import re

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

    from retina_fgvis import game_study as gs
    from retina_fgvis.cli import app
    from retina_fgvis.evaluation_diaretdb1 import CSV_NOTICE, read_csv

    root, weights = _tiny_layout_and_weights(
        tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}, "image002": {"HE": [(30, 40, 34, 44, 252)]}})
    study, ev = tmp_path / "study", tmp_path / "eval"
    monkeypatch.chdir(tmp_path)  # the report names the weights relative to the working directory
    r = CliRunner().invoke(app, ["evaluate", "game-study", "--data-dir", str(root), "--out", str(study),
                                 "--weights", str(weights), "--setting", "sgdn-logodds-lr0.3",
                                 "--seed-diaretdb1", str(ev)])
    assert r.exit_code == 0, r.output
    for name in ("per_image.csv", "summary.csv", "curves.csv"):  # the notice DiaretDB1's tables carry
        assert (study / name).read_text().splitlines()[0] == CSV_NOTICE
    table = gs.read_csv(study / "summary.csv")
    assert set(table.defense) == {True, False} and (table.images == 2).all()
    assert "Classifier: `tiny.pt` (sha256" in (study / "summary.md").read_text()
    # re-summarising runs no game and rebuilds the same table from per_image.csv
    (study / "summary.csv").unlink()
    r = CliRunner().invoke(app, ["evaluate", "game-study", "--data-dir", str(root), "--out", str(study),
                                 "--weights", str(weights), "--summarise-only"])
    assert r.exit_code == 0, r.output
    again = gs.read_csv(study / "summary.csv")
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
    from retina_fgvis.game_study import read_csv

    rows = read_csv(study / "per_image.csv")
    assert list(rows.setting) == ["sgdn-logodds-lr0.3-blurref"] and rows.p_before.notna().all()
    assert not any(p.is_file() for p in ev.rglob("*"))


def test_study_tables_from_before_the_notice_still_read(tmp_path) -> None:
    """The recorded studies in evaluation/game-study/ have no notice line: --summarise-only reads both."""
    import pandas as pd

    from retina_fgvis import game_study as gs

    df = pd.DataFrame({"setting": ["a"], "defense": [True], "image": ["image001"], "enrichment": [2.5]})
    (tmp_path / "old.csv").write_text(df.to_csv(index=False))
    gs.write_csv(tmp_path / "new.csv", df)
    assert gs.read_csv(tmp_path / "old.csv").equals(df) and gs.read_csv(tmp_path / "new.csv").equals(df)


@pytest.fixture()
def wide_errors(monkeypatch):
    """Typer's usage-error panel as wide as the message: a long tmp path is not wrapped mid-text."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 400)


def _study(*args: str):
    from typer.testing import CliRunner

    from retina_fgvis.cli import app

    return CliRunner().invoke(app, ["evaluate", "game-study", *args])


def _one_error_line(result, exit_code: int = 2) -> str:
    """The command's single `error: ...` line (stderr is mixed into output), and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_study_refuses_data_set_and_weights_problems_in_one_line(tmp_path) -> None:
    """Layout, split, an unreadable image and a weights file that is not one: `error: ...`, exit 2,
    nothing written (these were tracebacks, a corrupt image after OUT was made)."""
    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}})
    out = tmp_path / "study"
    base = ["--out", str(out), "--weights", str(weights), "--device", "cpu"]
    assert "folder does not exist" in _one_error_line(_study("--data-dir", str(tmp_path / "nope"), *base))
    assert "not a DiaretDB1 folder" in _one_error_line(_study("--data-dir", str(tmp_path), *base))
    assert "unknown split 'bogus'" in _one_error_line(_study("--data-dir", str(root), "--split", "bogus", *base))
    assert "split 'test' lists no images" in _one_error_line(_study("--data-dir", str(root), "--split", "test", *base))
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    line = _one_error_line(_study("--data-dir", str(root), "--out", str(out), "--weights", str(bad)))
    assert line.startswith(f"error: {bad}")
    image = root / "diaretdb1_v_1_1" / "resources" / "images" / "ddb1_fundusimages" / "image001.png"
    image.write_bytes(b"not a png")
    r = _study("--data-dir", str(root), "--limit", "1", *base)
    assert r.exit_code == 2 and r.output.splitlines()[0] == (
        f"skipped {image}: cannot read image: not an image file PIL can decode (unknown format or damaged header)")
    assert r.output.splitlines()[1:] == [(f"error: {image.parent}: no usable images: all 1 image(s) of split "
                                          "'train' were skipped (each reported above)")], r.output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--limit", "--batch-size", "--max-iterations"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_study_counts_below_one_are_refused_naming_the_option(tmp_path, wide_errors, option, value) -> None:
    """--limit 0 ran no image and crashed (KeyError) leaving files behind; --batch-size 0 was a
    ValueError; --max-iterations 0 was silently ignored."""
    out = tmp_path / "study"
    r = _study("--data-dir", str(tmp_path), "--out", str(out), option, value)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_study_refuses_a_bad_out_device_or_summary_source(tmp_path, wide_errors) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        r = _study("--data-dir", str(tmp_path), "--out", str(out))
        assert r.exit_code == 2 and f"Invalid value for --out: {a_file}: exists and is not a folder" in r.output, \
            r.output
    r = _study("--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "bogus")
    assert r.exit_code == 2 and "'bogus' is not a device" in r.output, r.output
    r = _study("--data-dir", str(tmp_path), "--out", str(tmp_path), "--summarise-only")
    line = _one_error_line(r)
    assert f"{tmp_path / 'per_image.csv'} does not exist" in line and "run the study first" in line


def _quick(root, weights, out, *args: str):
    """One cheap study run: the first image, two iterations, no undefended twin."""
    return _study("--data-dir", str(root), "--out", str(out), "--weights", str(weights), "--device", "cpu",
                  "--max-iterations", "2", "--undefended=", *args)


def test_unreadable_image_is_skipped_and_listed(tmp_path) -> None:
    """A ground-truth map that is a text file stopped the study up front; now the image is skipped
    with one line, the rest is studied, and per_image.csv and summary.md name it."""
    from retina_fgvis import game_study as gs

    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}, "image002": {}})
    gt = root / "diaretdb1_v_1_1" / "resources" / "images" / "ddb1_groundtruth" / "hardexudates" / "image002.png"
    gt.write_text("not a png")
    out = tmp_path / "study"
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3")
    assert r.exit_code == 0, r.output
    assert f"skipped {gt}: cannot read ground-truth map: not an image file PIL can decode" in r.output
    rows = gs.read_csv(out / "per_image.csv")
    assert rows.image.tolist() == ["image001", "image002"] and rows.columns[-1] == "skipped"
    assert rows.skipped.isna().tolist() == [True, False]
    assert rows.skipped[1].startswith("images/ddb1_groundtruth/hardexudates/image002.png: cannot read ground-truth")
    assert gs.read_csv(out / "summary.csv").images.tolist() == [1]
    summary = (out / "summary.md").read_text()
    assert "## Skipped images" in summary and "- image002: images/ddb1_groundtruth/hardexudates/image002.png" in summary
    assert "skipped " in (out / "study.log").read_text()


def test_rerun_into_the_same_out_merges_rows_by_key(tmp_path) -> None:
    """A second setting into the same --out overwrote per_image.csv with its rows alone (while
    study.log kept both): rows are now merged by (setting, defense, image), a re-run replaces its
    own row, the summary is rebuilt from the merged table, and another iteration cap is refused."""
    from retina_fgvis import game_study as gs

    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}})
    out = tmp_path / "gs1"
    for setting in ("sgdn-logodds-lr0.3", "adam-prob-lr0.05", "sgdn-logodds-lr0.3"):
        r = _quick(root, weights, out, "--setting", setting)
        assert r.exit_code == 0, r.output
    rows = gs.read_csv(out / "per_image.csv")
    assert rows.setting.tolist() == ["adam-prob-lr0.05", "sgdn-logodds-lr0.3"]  # the re-run replaced its row
    assert set(rows.max_iterations) == {2} and rows.weights_sha256.nunique() == 1 and set(rows.split) == {"train"}
    assert gs.read_csv(out / "summary.csv").setting.tolist() == rows.setting.tolist()
    before = (out / "per_image.csv").read_text()
    r = _study("--data-dir", str(root), "--out", str(out), "--weights", str(weights), "--device", "cpu",
               "--max-iterations", "3", "--undefended=", "--setting", "adam-prob-lr0.05")
    line = _one_error_line(r)
    assert f"{out / 'per_image.csv'}: holds rows made with another max_iterations (2; this run: 3)" in line
    assert "use a new --out" in line and (out / "per_image.csv").read_text() == before


def test_interrupted_run_keeps_earlier_rows_and_a_matching_summary(tmp_path, monkeypatch) -> None:
    """Interrupted during its second setting, a run into a folder holding an earlier study left
    per_image.csv with its one new row while summary.md/csv still showed the old table."""
    from retina_fgvis import game_study as gs

    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}})
    out = tmp_path / "gs1"
    assert _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.1").exit_code == 0
    real = gs.run_setting

    def interrupted(clf, images, name, *args, **kwargs):
        if name == "adam-prob-lr0.05":
            raise KeyboardInterrupt
        return real(clf, images, name, *args, **kwargs)

    monkeypatch.setattr(gs, "run_setting", interrupted)
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3", "--setting", "adam-prob-lr0.05")
    assert r.exit_code != 0
    rows = gs.read_csv(out / "per_image.csv")
    assert rows.setting.tolist() == ["sgdn-logodds-lr0.1", "sgdn-logodds-lr0.3"]
    assert gs.read_csv(out / "summary.csv").setting.tolist() == rows.setting.tolist()
    assert "sgdn-logodds-lr0.3" in (out / "summary.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_merge_rows_replaces_by_key_only() -> None:
    import pandas as pd

    from retina_fgvis import game_study as gs

    earlier = pd.DataFrame({"setting": ["a", "a", "b"], "defense": [True, False, True], "image": ["i1"] * 3,
                            "enrichment": [1.0, 2.0, 3.0]})
    new = pd.DataFrame({"setting": ["a"], "defense": [True], "image": ["i1"], "enrichment": [9.0],
                        "skipped": [""]})
    merged = gs.merge_rows(earlier, new)
    assert merged[["setting", "defense", "enrichment"]].values.tolist() == [["a", False, 2.0], ["b", True, 3.0],
                                                                            ["a", True, 9.0]]
    assert merged.columns[-1] == "skipped"


def test_a_damaged_curves_table_or_an_old_study_folder_is_one_line_and_the_run_time_is_kept(tmp_path) -> None:
    """Review of the merge: a damaged curves.csv in --out was a traceback; a folder of an older
    study was told to try "this study's options", which cannot help; summary.md lost the run time."""
    from retina_fgvis import game_study as gs

    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": {"H": [(20, 20, 26, 26, 189)]}})
    out = tmp_path / "gs"
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3")
    assert r.exit_code == 0, r.output
    assert re.search(r"1 images; run time: this run \d+\.\d min", (out / "summary.md").read_text())
    good_curves = (out / "curves.csv").read_bytes()
    (out / "curves.csv").write_bytes(b"\xff\xfe\x00garbage")
    line = _one_error_line(_quick(root, weights, out, "--setting", "adam-prob-lr0.05"))
    assert f"{out / 'curves.csv'}: not a game-study curves table" in line
    (out / "curves.csv").write_bytes(good_curves)
    rows = gs.read_csv(out / "per_image.csv")
    gs.write_csv(out / "per_image.csv", rows.drop(columns=list(gs.PROVENANCE)))  # as written before the merge
    line = _one_error_line(_quick(root, weights, out, "--setting", "adam-prob-lr0.05"))
    assert "cannot be added to; use a new --out" in line and "this study's options" not in line


def test_an_interrupted_setting_keeps_its_finished_batches_and_resume_plays_only_the_rest(tmp_path, monkeypatch) -> None:
    """A setting runs for half an hour on a CPU and its rows were written only at its end: a
    killed run lost every finished image (12 of 28 in session 17). Rows are now saved after each
    batch, and --resume plays only the games OUT does not hold yet."""
    from retina_fgvis import game_study as gs
    from retina_fgvis.fgvis.games import FGVis

    lesion = {"H": [(20, 20, 26, 26, 189)]}
    root, weights = _tiny_layout_and_weights(tmp_path, {"image001": lesion, "image002": lesion, "image003": {}})
    out = tmp_path / "gs"
    played: list[int] = []
    real = FGVis.attribute

    def counted(self, x, *args, **kwargs):
        played.append(int(x.shape[0]))
        if len(played) == 2 and stop_second:
            raise KeyboardInterrupt
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(FGVis, "attribute", counted)
    stop_second = True
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3", "--batch-size", "1")
    assert r.exit_code != 0
    rows = gs.read_csv(out / "per_image.csv")
    assert rows.image.tolist() == ["image001"]  # the first batch was kept
    assert gs.read_csv(out / "summary.csv").images.tolist() == [1]
    stop_second, played[:] = False, []
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3", "--batch-size", "1", "--resume")
    assert r.exit_code == 0, r.output
    assert played == [1, 1]  # image002 and image003 only
    assert gs.read_csv(out / "per_image.csv").image.tolist() == ["image001", "image002", "image003"]
    assert gs.read_csv(out / "summary.csv").images.tolist() == [3]
    played[:] = []
    r = _quick(root, weights, out, "--setting", "sgdn-logodds-lr0.3", "--batch-size", "1")
    assert r.exit_code == 0 and played == [1, 1, 1]  # without --resume every game is played again
    assert gs.read_csv(out / "per_image.csv").image.tolist() == ["image001", "image002", "image003"]
