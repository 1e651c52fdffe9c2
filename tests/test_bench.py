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
