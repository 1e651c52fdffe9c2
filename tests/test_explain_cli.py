"""`retina-fgvis explain`: Fig. 2 pictures at the original resolution, JSON, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from retina_fgvis.classifier.model import build_model, save_checkpoint
from retina_fgvis.cli import app

META = {"arch": "tiny", "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
        "class_names": ["non-referable", "referable"], "threshold": 0.5}


def _fundus(path: Path, h: int = 90, w: int = 120) -> None:
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.42 * h) ** 2
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[disc] = (170, 80, 40)
    rgb[(yy - 40) ** 2 + (xx - 70) ** 2 <= 9] = (90, 20, 10)  # a red dot
    Image.fromarray(rgb).save(path)


def test_explain_writes_fig2_pictures_and_json(tmp_path: Path) -> None:
    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    image = tmp_path / "Jane_Doe_left.png"
    _fundus(image)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(image), str(bad), "--out", str(out), "--weights",
                                      str(weights), "--iterations", "5"])
    assert result.exit_code == 1, result.output  # one bad file -> exit 1, the good one still done
    assert "broken.png" in result.output
    jsons = list(out.glob("*.json"))
    assert len(jsons) == 1
    assert "Jane" not in jsons[0].name  # no patient name in output file names
    # named by a hash keyed with the output folder's own key, not a plain hash of the path
    from retina_fgvis.report.files import keyed_hex, naming_key, sha256_hex

    assert jsons[0].name == f"image-{keyed_hex(naming_key(out), str(image))[:12]}.json"
    assert sha256_hex(str(image))[:12] not in jsons[0].name
    info = json.loads(jsons[0].read_text())
    assert info["source"] == str(image) and info["game"] == "deletion"
    assert 0 <= info["p_referable_after"] <= 1 and info["iterations"] <= 5
    assert "Research use only" in info["research_use_only"]
    assert result.output.rstrip().splitlines()[-1] == "Research use only, not a diagnosis."
    assert "% of pixels changed by more than half" in result.output and "mean mask change" in result.output
    for kind, name in info["files"].items():
        img = np.asarray(Image.open(out / name))
        assert img.shape[:2] == (90, 120), kind  # the original grid, not the model's 64 px


def test_explain_and_predict_refuse_what_screen_refuses(tmp_path: Path) -> None:
    """The same intake checks as `screen` (retina_fgvis.fundus.intake): a grey-scale photograph and
    a thumbnail below half the classifier's input get one error line each; the good image is done."""
    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    good = tmp_path / "good.png"
    _fundus(good)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.asarray(Image.open(good))[..., 1]).save(grey)
    thumb = tmp_path / "thumb.png"
    _fundus(thumb, 24, 30)  # half of the tiny model's 64 px input is 32
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(good), str(grey), str(thumb), "--out", str(out),
                                   "--weights", str(weights), "--iterations", "3"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert "grey.png" in errors[0] and "grey-scale" in errors[0]
    assert "thumb.png" in errors[1] and "image too small (30x24 px" in errors[1]
    assert len(list(out.glob("*.json"))) == 1
    res = CliRunner().invoke(app, ["predict", str(good), str(grey), str(thumb), "--weights", str(weights)])
    assert res.exit_code == 1, res.output  # like screen and explain: some image was not scored
    assert sum(line.startswith("error:") for line in res.output.splitlines()) == 2
    assert "p(referable)=" in res.output and "image too small" in res.output
    res = CliRunner().invoke(app, ["predict", str(thumb), "--weights", str(weights), "--min-side", "16"])
    assert res.exit_code == 0 and "p(referable)=" in res.output, res.output


def test_predict_csv_is_safe_to_open_in_a_spreadsheet(tmp_path: Path, monkeypatch) -> None:
    """File names are user text: one starting with '=' must not become a formula in the CSV."""
    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    monkeypatch.chdir(tmp_path)
    _fundus(tmp_path / "=1+1.png")
    res = CliRunner().invoke(app, ["predict", "=1+1.png", "--weights", str(weights), "--csv", "p.csv"])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[1].startswith("'=1+1.png,") and not any(r.startswith("=") for r in rows)


def test_explain_takes_max_iterations_as_the_evaluations_spell_it(tmp_path: Path) -> None:
    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    image = tmp_path / "eye.png"
    _fundus(image)
    res = CliRunner().invoke(app, ["explain", str(image), "--out", str(tmp_path / "out"), "--weights",
                                   str(weights), "--max-iterations", "2"])
    assert res.exit_code == 0, res.output
    info = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert info["iterations"] <= 2 and info["settings"]["max_iterations"] == 2


def test_a_blank_frame_is_called_blank_not_grey_scale(tmp_path: Path) -> None:
    """An all-black export (a failed capture) was refused as "grey-scale", which sends the reader
    looking for a red-free setting instead of a missing photograph."""
    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(black)
    res = CliRunner().invoke(app, ["predict", str(black), "--weights", str(weights)])
    assert res.exit_code == 1
    (line,) = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert "black.png" in line and "blank image" in line and "grey-scale" not in line


def test_predict_fails_only_the_row_of_an_image_the_model_cannot_take(tmp_path: Path, monkeypatch) -> None:
    """A file that reads but breaks in preparation or in the model (a ValueError or torch's
    RuntimeError) was a traceback that ended the run; now it is one error line and the others are scored."""
    from retina_fgvis.classifier import model as model_module

    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    good, odd = tmp_path / "good.png", tmp_path / "odd.png"
    _fundus(good)
    _fundus(odd, 91, 121)
    real_prepare = model_module.Classifier.prepare

    def prepare(self, rgb):
        if rgb.shape[0] == 91:
            raise RuntimeError("simulated failure in the model\nsecond line of a torch message")
        return real_prepare(self, rgb)

    monkeypatch.setattr(model_module.Classifier, "prepare", prepare)
    res = CliRunner().invoke(app, ["predict", str(odd), str(good), "--weights", str(weights)])
    assert res.exit_code == 1, res.output
    assert "good.png\tp(referable)=" in res.output
    (line,) = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert "odd.png" in line and "simulated failure" in line
    assert "second line" not in res.output  # one line per failed image


def test_predict_lets_a_programming_error_through(tmp_path: Path, monkeypatch) -> None:
    from retina_fgvis.classifier import model as model_module

    weights = tmp_path / "m.pt"
    save_checkpoint(build_model("tiny"), META, weights)
    _fundus(tmp_path / "eye.png")

    def prepare(self, rgb):
        raise NotImplementedError("a bug, not a bad image")

    monkeypatch.setattr(model_module.Classifier, "prepare", prepare)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "eye.png"), "--weights", str(weights)])
    assert isinstance(res.exception, NotImplementedError)


def test_the_blank_rule_refuses_a_uniform_frame_and_keeps_a_dark_photograph() -> None:
    from retina_fgvis.fundus.intake import ImageRejected, check_fundus_pixels

    for value in (0, 128, 255):
        frame = np.full((90, 120, 3), value, np.uint8)
        frame[::7, ::5] += np.uint8(4 if value < 250 else 0)  # sensor noise stays "nearly one value"
        try:
            check_fundus_pixels(frame)
        except ImageRejected as err:
            assert "blank image" in str(err)
        else:
            raise AssertionError(f"uniform frame {value} accepted")
    dark = np.zeros((90, 120, 3), np.uint8)
    yy, xx = np.mgrid[:90, :120]
    dark[(yy - 45) ** 2 + (xx - 60) ** 2 <= 35 ** 2] = (30, 14, 6)  # underexposed, but a colour disc
    check_fundus_pixels(dark)


def test_explain_refuses_a_damaged_naming_key_before_loading_the_weights(tmp_path: Path, monkeypatch) -> None:
    """Like `screen`: a damaged key is a usage error, reported before the classifier is loaded."""
    import retina_fgvis.classifier.model as model

    def no_load(*args, **kwargs):
        raise AssertionError("the classifier was loaded before the naming key was checked")

    monkeypatch.setattr(model, "load_classifier", no_load)
    image = tmp_path / "eye.png"
    _fundus(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".naming-key").write_text("not a key\n")
    res = CliRunner().invoke(app, ["explain", str(image), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "not a naming key" in res.output and ".naming-key" in res.output
