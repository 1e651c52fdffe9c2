"""Baselines (Grad-CAM, occlusion, LIME, RISE, gradient) behind explain(): shapes and sanity."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from retina_fgvis.baselines import (
    BASELINES,
    _WeightedRidge,
    explain,
    find_last_spatial_layer,
    restrict_to_fov,
    rise_masks,
)

torch.set_num_threads(1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


FAST = {
    "gradcam": {},
    "occlusion": {"window": 8, "stride": 8},
    "lime": {"n_samples": 40, "n_segments": 10},
    "rise": {"n_masks": 32, "grid": 4, "batch_size": 16},
    "gradient": {},
}


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_shapes(method):
    model = tiny_cnn()
    x = torch.randn(2, 3, 32, 24)
    imp = explain(method, model, x, torch.tensor([0, 2]), **FAST[method])
    assert imp.shape == (2, 32, 24)
    assert imp.dtype == torch.float32 and imp.device.type == "cpu"
    assert torch.isfinite(imp).all()
    # single int target broadcasts
    assert explain(method, model, x[:1], 1, **FAST[method]).shape == (1, 32, 24)


def test_gradcam_layer_is_last_conv_stage():
    model = tiny_cnn()
    layer = find_last_spatial_layer(model, torch.randn(1, 3, 16, 16))
    assert layer is model[4]  # ReLU after the second conv, before global pooling


def test_rise_and_lime_are_deterministic():
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    for m in ("rise", "lime"):
        a = explain(m, model, x, 0, **FAST[m])
        b = explain(m, model, x, 0, **FAST[m])
        assert torch.equal(a, b), m


def test_rise_masks_range_and_shape():
    g = torch.Generator().manual_seed(0)
    m = rise_masks(10, (20, 13), grid=5, p=0.5, generator=g)
    assert m.shape == (10, 20, 13)
    assert m.min() >= 0 and m.max() <= 1
    assert 0.2 < m.mean() < 0.8


def test_occlusion_finds_the_evidence():
    # The model looks only at the top-left 8x8 corner: occlusion must rank it first.
    class Corner(nn.Module):
        def forward(self, x):
            s = x[:, :, :8, :8].sum(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(s), s], dim=1)

    x = torch.ones(1, 3, 32, 32) * 0.05
    imp = explain("occlusion", Corner(), x, 1, window=8, stride=8)
    assert imp[0, :8, :8].min() > imp[0, 8:, 8:].max()


def test_weighted_ridge_recovers_linear_function():
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(200, 5, generator=g) < 0.5).float()
    coef = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    y = X @ coef + 0.7
    w = torch.rand(200, generator=g) + 0.5
    r = _WeightedRidge(alpha=1e-6)
    r.fit([(X, y, w)])
    assert torch.allclose(r.representation()[0], coef, atol=1e-4)
    assert torch.allclose(r(X), y, atol=1e-4)


def test_fov_restriction_puts_outside_last():
    imp = torch.tensor([[[5.0, -3.0], [2.0, 9.0]]])
    fov = torch.tensor([[[True, True], [True, False]]])
    out = restrict_to_fov(imp, fov)
    assert out[0, 1, 1] < out[0][fov[0]].min()
    assert torch.equal(out[0][fov[0]], imp[0][fov[0]])
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    fov = torch.zeros(1, 16, 16, dtype=torch.bool)
    fov[:, 4:12, 4:12] = True
    imp = explain("gradient", model, x, 0, fov_mask=fov)
    assert imp[0][~fov[0]].max() < imp[0][fov[0]].min()


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        explain("bogus", tiny_cnn(), torch.zeros(1, 3, 8, 8), 0)


@pytest.mark.parametrize("method", ["occlusion", "lime"])
def test_removing_to_the_image_itself_attributes_nothing(method):
    """With the image as its own baseline a removal changes nothing, so nothing is evidence: the
    baseline option must really reach the method (a method that ignored it would remove to 0)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    assert explain(method, model, x, 0, **FAST[method]).abs().amax() > 1e-6
    assert explain(method, model, x, 0, baseline=x, **FAST[method]).abs().amax() < 1e-6


def test_rise_baseline():
    """RISE: a zero tensor baseline equals the default; with the image as baseline every masked
    copy is the image, so each map is p(class | x) times the same mask average."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    default = explain("rise", model, x, 0, **FAST["rise"])
    assert torch.allclose(explain("rise", model, x, 0, baseline=torch.zeros_like(x), **FAST["rise"]), default)
    own = explain("rise", model, x, 0, baseline=x, **FAST["rise"])
    p = torch.softmax(model(x), 1)[:, 0].detach()
    assert not torch.allclose(own, default)
    assert torch.allclose(own[0] / p[0], own[1] / p[1], atol=1e-5)


def test_gradient_methods_ignore_the_baseline():
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    for method in ("gradcam", "gradient"):
        assert torch.equal(explain(method, model, x, 0, baseline=x), explain(method, model, x, 0))


def test_fgvis_plays_its_game_against_the_baseline():
    """FGVis's baseline is the game's reference r: with r = x the explanation m·x + (1-m)·r is x
    whatever the mask, so the game has nothing to remove and returns the untouched mask."""
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    opts = {"goal": "fraction", "goal_fraction": 0.5, "max_iterations": 10}
    assert explain("fgvis", model, x, 0, **opts).amax() > 0
    assert explain("fgvis", model, x, 0, baseline=x, **opts).abs().amax() == 0


def test_fgvis_undefended_is_the_same_game_without_the_defence():
    """``fgvis-undefended`` = the engine's deletion game with ``defense=False`` and nothing else
    changed; ``fgvis`` = the same game defended. Checked against the engine called directly, and
    the two must differ (else the switch would not reach the engine)."""
    from retina_fgvis.fgvis.games import FGVis

    model = tiny_cnn()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    opts = {"goal": "fraction", "goal_fraction": 0.2, "max_iterations": 30}
    target = torch.tensor([0, 1])
    maps = {m: explain(m, model, x, target, **opts) for m in ("fgvis", "fgvis-undefended")}
    for method, defended in (("fgvis", True), ("fgvis-undefended", False)):
        direct = FGVis(model, defense=defended, **opts).attribute(x, target).mean_mask.float()
        assert torch.equal(maps[method], direct), method
    assert not torch.equal(maps["fgvis"], maps["fgvis-undefended"])


def test_random_order_is_seeded_by_the_image_not_by_its_batch():
    """The control's order depends on the image alone: the same image gets the same map alone or
    in a batch (so resumed and batched runs agree), another image or seed another map, and the
    model is never called (a control that looked at the model would not be a control)."""
    class Untouchable(nn.Module):
        def forward(self, x):
            raise AssertionError("the random control must not run the model")

    x = torch.randn(3, 3, 16, 12)
    batch = explain("random", Untouchable(), x, 0)
    alone = explain("random", Untouchable(), x[1:2], 0)
    assert batch.shape == (3, 16, 12) and torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(explain("random", Untouchable(), x[1:2], 0, seed=1)[0], alone[0])
    # every pixel gets its own rank (no ties for the metric's tie-break to decide)
    assert batch[0].flatten().unique().numel() == 16 * 12


def test_random_order_stays_inside_the_field_of_view():
    x = torch.randn(1, 3, 8, 8)
    fov = torch.zeros(1, 8, 8, dtype=torch.bool)
    fov[:, 2:6, 2:6] = True
    imp = explain("random", tiny_cnn(), x, 0, fov_mask=fov)
    assert imp[fov].min() > imp[~fov].max()
