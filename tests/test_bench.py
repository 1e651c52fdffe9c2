"""Benchmark helpers: they must measure what they say (not timing assertions: speed is reported
by `retina-fgvis bench`, never asserted in unit tests)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from retina_fgvis.bench import BenchRow, bench_iterations, hardware
from retina_fgvis.gpu_agreement import flagged_iou


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


def test_bench_iterations_reports_three_positive_times_and_restores_the_model():
    model = _tiny()
    flags = [p.requires_grad for p in model.parameters()]
    row = bench_iterations(model, 16, 2, torch.device("cpu"), repeats=1, channels_last=True)
    assert isinstance(row, BenchRow) and row.batch == 2
    assert row.plain_ms > 0 and row.game_ms > 0 and row.defended_ms > 0
    assert np.isclose(row.ratio_defended, row.defended_ms / row.plain_ms)
    assert [p.requires_grad for p in model.parameters()] == flags  # parameters given back
    assert "torch" in hardware()


def test_flagged_iou():
    a = np.zeros((4, 4), bool)
    assert flagged_iou(a, a) == 1.0  # two empty maps agree
    b = a.copy()
    b[0, :2] = True
    c = a.copy()
    c[0, 1:3] = True
    assert flagged_iou(b, b) == 1.0
    assert np.isclose(flagged_iou(b, c), 1 / 3)
    assert flagged_iou(b, a) == 0.0


def _tiny_weights(tmp_path):
    from retina_fgvis.classifier.model import build_model, save_checkpoint

    weights = tmp_path / "tiny.pt"
    save_checkpoint(build_model("tiny"), {"arch": "tiny", "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                          "class_names": ["non-referable", "referable"], "threshold": 0.5}, weights)
    return weights


def test_bench_finds_the_bundled_samples_from_any_folder(tmp_path, monkeypatch):
    """Before: the default `data/samples` was looked up in the current folder, so run elsewhere
    the throughput line was silently missing and the table's last rows were printed twice."""
    from typer.testing import CliRunner

    from retina_fgvis.cli import app

    weights = _tiny_weights(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--batch", "1", "--repeats", "1", "--weights", str(weights),
                                 "--out", "bench.md"])
    assert r.exit_code == 0, r.output
    assert "Full defended deletion game, default settings, 3 images in one batch" in r.output
    assert sum(line.startswith("| 1 |") for line in r.output.splitlines()) == 1  # the row printed once
    assert "Full defended deletion game, default settings, 3 images" in (tmp_path / "bench.md").read_text()


def test_bench_says_when_no_image_was_usable_and_names_each_once(tmp_path):
    from typer.testing import CliRunner

    from retina_fgvis.cli import app

    weights = _tiny_weights(tmp_path)
    missing = tmp_path / "nope.png"
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--batch", "1", "--repeats", "1", "--weights", str(weights),
                                 "--images", str(missing)])
    assert r.exit_code == 0, r.output
    skip = [line for line in r.output.splitlines() if line.startswith("skip ")]
    assert len(skip) == 1 and skip[0].count(str(missing)) == 1  # was "skip nope.png: nope.png: file not found"
    assert "Full defended deletion game: not run, no readable image among the 1 given." in r.output
    assert sum(line.startswith("| 1 |") for line in r.output.splitlines()) == 1
