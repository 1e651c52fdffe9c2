"""Deletion / insertion metric (RISE protocol): known AUCs, oracle vs random, ties, devices."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from retina_fgvis.metrics.deletion import (
    auc,
    causal_curves,
    default_step,
    deletion,
    insertion,
    removal_order,
    removal_rank,
)

torch.set_num_threads(1)


class PixelVote(nn.Module):
    """Synthetic 2-class model whose evidence lives in known pixels.

    logit_1 = scale * sum(w * x) over channels and pixels, logit_0 = half of that sum for
    x = 1 everywhere. With x = 1 and the zero substrate, deleting the weighted pixels is
    exactly what lowers p(class 1), so the weights are an oracle importance map.
    """

    def __init__(self, weight: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("weight", weight)  # (H, W)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.weight).sum(dim=(1, 2, 3)) * self.scale
        half = 0.5 * x.shape[1] * self.weight.sum() * self.scale
        return torch.stack([torch.zeros_like(s) + half, s], dim=1)


def test_auc_of_known_curves():
    # Golden numbers by hand (trapezoid rule, uniform spacing on [0, 1]):
    #   [1, 0.5, 0]            -> h = 1/2: (1 + 0.5)/2 * 0.5 + (0.5 + 0)/2 * 0.5 = 0.375 + 0.125 = 0.5
    #   [1, 0, 0, 0, 0]        -> h = 1/4: only the first trapezoid, (1 + 0)/2 * 0.25 = 0.125
    #   [0.8, 0.6, 0.2, 0.2]   -> h = 1/3: (0.7 + 0.4 + 0.2) / 3 = 1.3 / 3 = 0.433333...
    #   reference formula (sum - first/2 - last/2)/(N-1): (1.8 - 0.4 - 0.1)/3 = 0.433333...
    assert auc(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.125)
    assert auc(torch.tensor([0.8, 0.6, 0.2, 0.2])).item() == pytest.approx(1.3 / 3)
    # Non-uniform x: points at 0, 0.5, 1 (last step shorter) vs. at 0, 0.8, 1.
    # [1, 1, 0] at x = [0, 0.8, 1]: 0.8 * 1 + 0.2 * 0.5 = 0.9
    assert auc(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.8, 1.0])).item() == pytest.approx(0.9)


def test_deletion_curve_on_known_model_matches_hand_computation():
    # 4x4 image of ones, one channel; logit_1 = number of ones on the top row, logit_0 = 2,
    # so p(class 1) = sigmoid(count - 2).
    w = torch.zeros(4, 4)
    w[0] = 1.0

    class Count(nn.Module):
        def forward(self, x):
            s = (x[:, 0] * w).sum(dim=(1, 2))
            return torch.stack([torch.full_like(s, 2.0), s], dim=1)

    x = torch.ones(1, 1, 4, 4)
    imp = w.clone()[None]  # oracle: top row first (ties broken by index -> pixels 0, 1, 2, 3)
    curves = deletion(Count(), x, imp, step=4)  # 16 px / 4 per step = 4 steps, 5 evaluations
    assert curves.n_evaluations == 5
    assert curves.target.tolist() == [1]  # count 4 > 2
    # After step 1 the whole top row is gone: p1 = sigmoid(4 - 2), then sigmoid(0 - 2) forever.
    p_full = 1 / (1 + math.exp(-2))
    p_gone = 1 / (1 + math.exp(2))
    expected = torch.tensor([p_full, p_gone, p_gone, p_gone, p_gone], dtype=torch.float64)
    assert torch.allclose(curves.scores[0], expected, atol=1e-12)
    # AUC by hand: 0.25 * ((p_full + p_gone) / 2 + 3 * p_gone)
    assert curves.auc.item() == pytest.approx(0.25 * ((p_full + p_gone) / 2 + 3 * p_gone))


def test_default_step_gives_225_evaluations_at_224():
    assert default_step(224, 224) == 224
    assert math.ceil(224 * 224 / default_step(224, 224)) + 1 == 225
    for h, w in [(512, 512), (300, 451), (17, 5)]:
        assert math.ceil(h * w / default_step(h, w)) <= 224


def test_oracle_ordering_beats_random_ordering():
    g = torch.Generator().manual_seed(0)
    h = w = 16
    weight = torch.zeros(h, w)
    idx = torch.randperm(h * w, generator=g)[:20]
    weight.view(-1)[idx] = torch.rand(20, generator=g) + 0.5
    model = PixelVote(weight, scale=0.3).eval()
    x = torch.ones(2, 3, h, w)
    oracle = weight.expand(2, h, w)
    random_map = torch.rand(2, h, w, generator=g)
    a_oracle = deletion(model, x, oracle, step=8).auc
    a_random = deletion(model, x, random_map, step=8).auc
    assert (a_oracle < a_random - 0.2).all(), (a_oracle, a_random)
    # Insertion: the oracle should raise the score faster (higher AUC), from a zero start.
    i_oracle = insertion(model, x, oracle, step=8, substrate="zero", target=1).auc
    i_random = insertion(model, x, random_map, step=8, substrate="zero", target=1).auc
    assert (i_oracle > i_random + 0.2).all(), (i_oracle, i_random)


def test_tie_breaking_is_deterministic_and_by_index():
    imp = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.5]]])
    order = removal_order(imp)
    assert order.tolist() == [[1, 3, 5, 0, 2, 4]]
    # -0.0 ties with 0.0, and float32 vs float64 inputs give the same order
    imp2 = torch.tensor([[[-0.0, 1.0, 0.0], [1.0, 0.0, 0.5]]], dtype=torch.float64)
    assert removal_order(imp2).tolist() == order.tolist()
    rank = removal_rank(imp)
    assert rank.tolist() == [[3, 0, 4, 1, 5, 2]]
    # All ties (an untouched FGVis mask): plain raster order, identical on every call.
    flat = torch.zeros(2, 8, 8)
    assert torch.equal(removal_order(flat), torch.arange(64).expand(2, 64))
    with pytest.raises(ValueError, match="NaN"):
        removal_order(torch.tensor([[[float("nan")]]]))


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(3, 3, 12, 12, generator=g)
    imp = torch.rand(3, 12, 12, generator=g)
    a = deletion(model, x, imp, step=7, batch_size=1)
    b = deletion(model, x, imp, step=7, batch_size=100)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert a.n_evaluations == math.ceil(144 / 7) + 1
    assert a.fractions[-1].item() == 1.0
    # deletion ends at the zero image for every importance map
    z = torch.softmax(model(torch.zeros(1, 3, 12, 12)).double(), 1)[0]
    assert torch.allclose(a.scores[:, -1], z[a.target], atol=1e-6)


def test_input_validation():
    model = PixelVote(torch.ones(4, 4))
    with pytest.raises(ValueError, match="importance shape"):
        deletion(model, torch.ones(1, 3, 4, 4), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        causal_curves(model, torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4), mode="bogus")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cpu_and_cuda_paths_agree():
    g = torch.Generator().manual_seed(2)
    weight = torch.rand(16, 16, generator=g)
    model = PixelVote(weight, scale=0.05).eval()
    x = torch.rand(2, 3, 16, 16, generator=g)
    imp = (torch.rand(2, 16, 16, generator=g) * 4).round()  # many ties on purpose
    cpu = deletion(model, x, imp, step=5)
    gpu = deletion(model.cuda(), x.cuda(), imp.cuda(), step=5)
    assert torch.equal(cpu.target, gpu.target)
    assert torch.allclose(cpu.scores, gpu.scores, atol=1e-5)
    assert torch.allclose(cpu.auc, gpu.auc, atol=1e-6)
    # and the curve really moves on CUDA (the reference's in-place removal would not)
    assert (gpu.scores[:, 0] - gpu.scores[:, -1]).abs().min() > 1e-3
