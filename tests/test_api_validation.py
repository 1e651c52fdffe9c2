"""Input checks of the library API: a wrong argument is refused with a clear error before any
work, instead of a torch error deep inside, a silently wrong answer, or a mutated model."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from retina_fgvis import FGVis, FGVisSettings, activation_bounds
from retina_fgvis.fgvis.defense import DefenseError

torch.set_num_threads(1)


def small_cnn(classes: int = 2, norm_and_dropout: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    if norm_and_dropout:
        layers += [nn.BatchNorm2d(8)]
    layers += [nn.ReLU()]
    if norm_and_dropout:
        layers += [nn.Dropout(0.5)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ 1. the defence in training mode

def test_activation_bounds_refuses_a_model_in_training_mode_and_leaves_it_unchanged() -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DefenseError, match=r"'1' \(BatchNorm2d\) is in training mode; call model.eval\(\)"):
        with activation_bounds(model, x):
            pass
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BatchNorm statistics updated
    assert torch._C._len_torch_function_stack() == 0
    # one submodule left in training mode is enough (Dropout draws a new mask every pass)
    model.eval()
    model[3].train()
    with pytest.raises(DefenseError, match=r"'3' \(Dropout\) is in training mode"):
        with activation_bounds(model, x):
            pass
    # the explainer switches to eval mode itself and restores training mode afterwards
    model.train()
    r = FGVis(model, max_iterations=2, check_every=1, goal_level=0.0).attribute(x, target=1)
    assert r.mask.shape == x.shape and model.training and model[1].training
    model.eval()
    with activation_bounds(model, x) as bounds:
        assert bounds.num_calls == 1


# ------------------------------------------------------------------ 2. settings

@pytest.mark.parametrize("bad", [
    dict(goal_level=2.0), dict(goal_level=-0.1), dict(goal_level=float("nan")), dict(goal_level=None),
    dict(goal_fraction=-1), dict(goal_fraction=0.0), dict(goal_fraction=1.5),
    dict(patience=-1), dict(patience=1.5), dict(patience=True),
    dict(max_iterations=2.5), dict(max_iterations=0), dict(max_iterations=True), dict(max_iterations="200"),
    dict(check_every=0), dict(check_every=2.0), dict(warmup_iterations=-1), dict(warmup_iterations=1.5),
    dict(lambda_init=-1), dict(lambda_init=float("inf")), dict(lambda_min=0.0), dict(lambda_min=-1e-4),
    dict(lambda_max=1e-5), dict(lambda_up=0.0), dict(lambda_down=-0.5),
    dict(lambda_init=1e4), dict(lambda_init=1e-5),  # outside [lambda_min, lambda_max], adaptive
    dict(adam_betas=(0.9, 1.0)), dict(adam_betas=(-0.1, 0.999)), dict(adam_betas=(0.9,)), dict(adam_eps=0.0),
    dict(step_grow=0.0), dict(step_scale_max=-1.0), dict(defense_tolerance=-1e-6),
], ids=repr)
def test_nonsense_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FGVisSettings(**bad).validate()
    with pytest.raises(ValueError):
        FGVis(nn.Identity(), **bad)


def test_goal_level_out_of_range_no_longer_reaches_its_goal_without_iterating() -> None:
    with pytest.raises(ValueError, match=r"goal_level must be a probability in \[0, 1\], got 2.0"):
        FGVis(small_cnn().eval(), goal_level=2.0)


@pytest.mark.parametrize("ok", [
    dict(goal_level=0.0), dict(goal_level=1.0), dict(goal="fraction", goal_level=None),
    dict(goal_fraction=1.0), dict(patience=0), dict(warmup_iterations=0), dict(max_iterations=1, check_every=1),
    dict(lambda_schedule="fixed", lambda_init=0.0), dict(lambda_init=0.0),  # adaptive from λ = 0
    dict(lambda_schedule="fixed", lambda_init=5e3), dict(lambda_init=1e-4), dict(lambda_init=1e3),
    dict(adam_betas=[0.9, 0.99]), dict(defense_tolerance=0.0), dict(prune_levels=[]),
], ids=repr)
def test_sensible_edge_settings_still_validate(ok: dict) -> None:
    FGVisSettings(**ok).validate()


def _shipped_threshold() -> list[float]:
    path = Path(__file__).resolve().parents[1] / "weights" / "rdr-effnet-lite0.pt"
    if not path.exists():
        return []
    return [float(torch.load(path, map_location="cpu", weights_only=True)["metadata"]["threshold"])]


def test_every_settings_combination_the_project_uses_still_validates() -> None:
    """The defaults, the fundus preset, every game-study candidate on top of it, the faithfulness /
    defence protocols, the commands', bench's and the evaluation probes' settings."""
    from retina_fgvis.commands.fgvis_options import parse_fgvis_settings
    from retina_fgvis.faithfulness import (
        DEFENSE_FGVIS_SETTINGS,
        FAITHFULNESS_FGVIS_SETTINGS,
    )
    from retina_fgvis.fgvis.presets import fundus_fgvis
    from retina_fgvis.game_study import CANDIDATES

    model = nn.Identity()
    checked = [FGVisSettings().validate()]
    for threshold in [0.0, 0.5, 1.0, *_shipped_threshold()]:
        clf = SimpleNamespace(model=model, threshold=threshold)
        preset_uses = [
            {}, {"max_iterations": 5}, {"max_iterations": 200, "prune_levels": ()},  # explain, screen
            {"autocast": True, "channels_last": True, "max_iterations": 5},  # gpu_agreement, bench command
            *({k: v for k, v in c.items() if k != "reference"} for c in CANDIDATES.values()),  # game study
            {"defense_fuse": False},  # evaluation/bench/probes/fused_identity.py
        ]
        for overrides in preset_uses:
            for defense in (True, False):
                checked.append(fundus_fgvis(clf, defense=defense, **overrides).settings)
    # evaluate faithfulness (+ --fgvis-max-iterations) and the goal probes' variants on top of it
    faithfulness_variants = [[], ["goal_fraction=0.01"], ["goal_fraction=0.3"], ["goal=reference"],
                             ["prune_levels=[]"], ["max_iterations=400"]]
    for items in faithfulness_variants:
        for extra in ({}, {"max_iterations": 50}):
            checked.append(FGVis(model, **{**FAITHFULNESS_FGVIS_SETTINGS, **parse_fgvis_settings(items),
                                           **extra}).settings)
    # evaluate defense: fixed λ = 0, no pruning
    for extra in ({}, {"max_iterations": 300}):
        checked.append(FGVis(model, **{**DEFENSE_FGVIS_SETTINGS, **extra}).settings)
    # bench (retina_fgvis/bench.py) and its probes: goal_level 0, one check at the end
    for n in (1, 2, 6):
        for autocast in (False, True):
            checked.append(FGVis(model, max_iterations=n, check_every=n, goal_level=0.0, autocast=autocast,
                                 channels_last=autocast, defense_fuse=not autocast).settings)
        checked.append(FGVis(model, max_iterations=n, check_every=n, goal_level=0.0, prune_levels=()).settings)
    assert len(checked) > 60
    for s in checked:
        s.validate()


# ------------------------------------------------------------------ 3. target

@pytest.mark.parametrize("target", [0.7, 1.0, True, torch.tensor(0.7), torch.tensor([1.0, 0.0]),
                                    torch.tensor([True, False]), "1", None, [1, 1]], ids=repr)
def test_a_target_that_is_not_a_class_index_is_refused(target: object) -> None:
    fgvis = FGVis(small_cnn().eval(), defense=False, max_iterations=2)
    with pytest.raises(ValueError, match="target must be an int or an integer tensor"):
        fgvis.attribute(torch.randn(2, 3, 8, 8), target=target)
    with pytest.raises(ValueError, match="target must be an int or an integer tensor"):
        fgvis.mask_gradient(torch.randn(2, 3, 8, 8), torch.ones(2, 3, 8, 8), target=target)


@pytest.mark.parametrize("target, match", [
    (2, r"out of range: the model has 2 classes \(0 <= target < 2\)"),
    (torch.tensor([0, 5]), "out of range"), (-1, "class index >= 0"), (torch.tensor([1, -1]), "class index >= 0"),
    (torch.tensor([0, 1, 1]), r"one class per sample, shape \(2,\)"), (torch.tensor([[0, 1]]), "one class per sample"),
])
def test_an_out_of_range_or_misshapen_target_is_refused(target: object, match: str) -> None:
    for defense in (False, True):
        fgvis = FGVis(small_cnn().eval(), defense=defense, max_iterations=2)
        with pytest.raises(ValueError, match=match):
            fgvis.attribute(torch.randn(2, 3, 8, 8), target=target)
        with pytest.raises(ValueError, match=match):
            fgvis.mask_gradient(torch.randn(2, 3, 8, 8), torch.ones(2, 3, 8, 8), target=target)
    assert torch._C._len_torch_function_stack() == 0


def test_a_single_logit_model_is_refused() -> None:
    """softmax over one class is 1.0 before and after any game: nothing to explain."""
    fgvis = FGVis(small_cnn(classes=1).eval(), defense=False, max_iterations=2)
    with pytest.raises(ValueError, match=r"logits of shape \(B, C\) with C >= 2 classes, got \(2, 1\)"):
        fgvis.attribute(torch.randn(2, 3, 8, 8), target=0)


def test_valid_targets_are_accepted_and_give_the_same_game() -> None:
    import numpy as np

    model, x = small_cnn().eval(), torch.randn(2, 3, 8, 8)
    fgvis = FGVis(model, max_iterations=3, check_every=1, goal_level=0.0, prune_levels=())
    ref = fgvis.attribute(x, target=1)
    for t in (np.int64(1), torch.tensor(1), torch.tensor([1]), torch.tensor([1, 1], dtype=torch.int32)):
        r = fgvis.attribute(x, target=t)
        assert torch.equal(r.mask, ref.mask) and torch.equal(r.target, torch.tensor([1, 1]))


# ------------------------------------------------------------------ 4. inputs

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_inputs_of_another_dtype_than_the_model_are_refused(dtype: torch.dtype) -> None:
    fgvis = FGVis(small_cnn().eval(), max_iterations=2)
    with pytest.raises(ValueError, match=rf"inputs are {dtype}, the model's parameters torch.float32"):
        fgvis.attribute(torch.randn(1, 3, 8, 8, dtype=dtype), target=1)


def test_uint8_inputs_are_refused() -> None:
    fgvis = FGVis(small_cnn().eval(), max_iterations=2)
    with pytest.raises(ValueError, match="floating-point tensor.*got torch.uint8"):
        fgvis.attribute(torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), target=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(bad: float) -> None:
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = bad
    for defense in (False, True):
        with pytest.raises(ValueError, match="NaN or infinite"):
            FGVis(small_cnn().eval(), defense=defense, max_iterations=2).attribute(x, target=1)


def test_inputs_on_another_device_are_refused() -> None:
    model = small_cnn().eval().to("meta")  # a second device without a GPU
    with pytest.raises(ValueError, match="inputs are on cpu, the model on meta"):
        FGVis(model, max_iterations=2).attribute(torch.randn(1, 3, 8, 8), target=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_still_takes_float32_inputs_on_cuda() -> None:
    model = small_cnn().eval().cuda()
    r = FGVis(model, max_iterations=2, check_every=1, goal_level=0.0, autocast=True).attribute(
        torch.randn(1, 3, 8, 8, device="cuda"), target=1)
    assert r.mask.dtype == torch.float32


def test_predict_proba_refuses_an_unprepared_uint8_image() -> None:
    from retina_fgvis.classifier.model import Classifier

    clf = Classifier(model=small_cnn().eval(), metadata={"input_size": 8, "mean": [0.5] * 3, "std": [0.2] * 3,
                                                         "threshold": 0.5})
    with pytest.raises(ValueError, match="expects a prepared, normalised float tensor: use Classifier.prepare"):
        clf.predict_proba(torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8))
    p = clf.predict_proba(torch.randn(1, 3, 8, 8))
    assert p.shape == (1,) and 0.0 <= float(p[0]) <= 1.0
