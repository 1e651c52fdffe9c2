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
    info = json.loads(jsons[0].read_text())
    assert info["source"] == str(image) and info["game"] == "deletion"
    assert 0 <= info["p_referable_after"] <= 1 and info["iterations"] <= 5
    assert "Research use only" in info["research_use_only"]
    for kind, name in info["files"].items():
        img = np.asarray(Image.open(out / name))
        assert img.shape[:2] == (90, 120), kind  # the original grid, not the model's 64 px
