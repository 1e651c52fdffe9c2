"""The four games on a task with known evidence (planted blobs), batching and determinism."""
from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
import pytest

from _synthetic_blobs import make_blobs, trained_blob_cnn
from retina_fgvis import FGVis

torch.set_num_threads(1)


def share_inside(result, blobs: torch.Tensor) -> torch.Tensor:
    importance = result.mean_mask
    return (importance * blobs).flatten(1).sum(1) / importance.flatten(1).sum(1)


def test_defended_deletion_removes_the_blob() -> None:
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(8, seed=11, positive=True)
    result = FGVis(model, defense=True).attribute(x, target=1, game="deletion")
    assert bool(result.goal_reached.all())
    assert float(result.target_prob_before.min()) > 0.99
    assert float(result.target_prob_after.max()) < 0.5
    inside = share_inside(result, blobs)
    # blobs are ~4 % of the image; most of the removed mass must lie on them
    assert float(inside.min()) > 0.6, inside
    assert float(result.removed_mass.max()) < 0.05


def test_generation_fabricates_evidence_only_without_the_defence() -> None:
    # Paper Table 1 on the synthetic model: generation game, no sparsity term, target = the
    # blob class on images without a blob. Adam is the strongest attacker of our optimisers.
    model = trained_blob_cnn()
    x, _, _ = make_blobs(8, seed=12, positive=False)
    settings = dict(optimizer="adam", lr=0.05, max_iterations=300, lambda_schedule="fixed", lambda_init=0.0, goal_level=0.99)
    undefended = FGVis(model, defense=False, **settings).attribute(x, target=1, game="generation")
    defended = FGVis(model, defense=True, **settings).attribute(x, target=1, game="generation")
    assert float(undefended.target_prob_before.max()) < 0.01
    assert float(undefended.target_prob_after.min()) > 0.5
    assert float(defended.target_prob_after.max()) < 0.5


def test_batch_equals_single_runs() -> None:
    model = trained_blob_cnn()
    x, _, _ = make_blobs(4, seed=13, positive=True)
    fgvis = FGVis(model, defense=True)
    batched = fgvis.attribute(x, target=1)
    for i in range(4):
        single = fgvis.attribute(x[i : i + 1], target=1)
        assert torch.allclose(single.mask[0], batched.mask[i], atol=1e-4)
        assert int(single.iterations[0]) == int(batched.iterations[i])


def test_deterministic_on_cpu() -> None:
    model = trained_blob_cnn()
    x, _, _ = make_blobs(2, seed=14, positive=True)
    a = FGVis(model).attribute(x, target=1)
    b = FGVis(model).attribute(x, target=1)
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("game,m0", [("deletion", 1.0), ("preservation", 1.0), ("generation", 0.0), ("repression", 0.0)])
def test_four_games_shapes_and_semantics(game: str, m0: float) -> None:
    model = trained_blob_cnn()
    x, _, _ = make_blobs(2, seed=15, positive=True)
    fov = torch.zeros(2, 32, 32, dtype=torch.bool)
    fov[:, 4:28, 4:28] = True
    r = FGVis(model, max_iterations=20).attribute(x, target=1, game=game, fov_mask=fov)
    assert r.mask.shape == x.shape and r.mean_mask.shape == (2, 32, 32)
    assert float(r.mask.min()) >= 0 and float(r.mask.max()) <= 1
    assert torch.all(r.mask[:, :, ~fov[0]] == m0)  # outside the FOV nothing moves
    assert torch.allclose(r.explanation, r.mask * x)
    if game in ("deletion", "repression"):
        assert torch.allclose(r.complementary_mask, 1 - r.mask)
    else:
        assert torch.allclose(r.complementary_mask, r.mask)
    assert torch.allclose(r.mean_mask, r.complementary_mask.mean(1))
    assert len(r.lambda_trajectory) == 2 and len(r.lambda_trajectory[0]) >= 1
    assert r.summary(0)["game"] == game


def test_preservation_keeps_the_evidence() -> None:
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(4, seed=16, positive=True)
    r = FGVis(model, goal_level=0.9).attribute(x, target=1, game="preservation")
    assert bool(r.goal_reached.all()) and float(r.target_prob_after.min()) >= 0.9
    assert float(share_inside(r, blobs).min()) > 0.1  # the kept pixels favour the blob (4 % at chance)


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.resnet50(),
        lambda: torchvision.models.vgg16(),
        lambda: torchvision.models.alexnet(),
        lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),  # its own init gives a dead net
        lambda: torchvision.models.densenet121(),
        lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
    ],
    ids=["resnet50", "vgg16", "alexnet", "googlenet", "densenet121", "efficientnet_lite0"],
)
def test_defended_game_runs_on_standard_cnns(build) -> None:
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)
    # random weights: p(target) is ~1/1000 already, so the goal is a fraction of it
    r = FGVis(model, max_iterations=3, check_every=1, goal="fraction", lambda_init=1e-4).attribute(
        x, target=torch.tensor([1, 2])
    )
    assert r.mask.shape == x.shape
    assert torch.all(r.iterations == 3) or bool(r.goal_reached.any())
    assert float((1 - r.mask).abs().sum()) > 0  # the mask moved: gradient reached it


def test_per_sample_reference_with_early_stopping() -> None:
    """A (B, C, H, W) reference follows its own sample when finished samples leave the batch."""
    model = trained_blob_cnn()
    x, _, _ = make_blobs(3, seed=17, positive=True)
    ref = torch.stack([torch.full_like(x[0], v) for v in (0.0, -0.2, 0.1)])
    fgvis = FGVis(model)
    batched = fgvis.attribute(x, target=1, reference=ref)
    for i in range(3):
        single = fgvis.attribute(x[i : i + 1], target=1, reference=ref[i : i + 1])
        assert torch.allclose(single.explanation[0], batched.explanation[i], atol=1e-4)
    assert torch.allclose(batched.explanation, batched.mask * x + (1 - batched.mask) * ref)


def test_lambda_calibration_sets_lambda_from_the_evidence_gradient() -> None:
    """λ's unit = q-quantile of |d log-odds / d m| over the FOV times the number of mask elements."""
    model = trained_blob_cnn()
    x, _, _ = make_blobs(2, seed=18, positive=True)
    fov = torch.zeros(2, 32, 32, dtype=torch.bool)
    fov[:, 2:30, 2:30] = True
    q = 0.9
    r = FGVis(model, defense=True, lambda_calibration_quantile=q, lambda_schedule="fixed", lambda_init=2.0,
              max_iterations=1).attribute(x, target=1, fov_mask=fov)
    # the same gradient by hand: at m = 1 the defence passes everything (h(e) = h(x))
    m = torch.ones_like(x, requires_grad=True)
    log_p = torch.log_softmax(model(m * x), 1)
    (g,) = torch.autograd.grad((log_p[:, 1] - log_p[:, 0]).sum(), m)
    f3 = fov[:, None].expand_as(g)
    expected = torch.stack([2.0 * torch.quantile(gi[fi].abs(), q) * fi.sum() for gi, fi in zip(g, f3)])
    assert torch.allclose(r.final_lambda, expected, rtol=1e-4)


def test_lambda_calibration_removes_the_haze_off_the_evidence() -> None:
    """With λ in evidence units the mass off the blob shrinks; an absolute λ = 1 is negligible."""
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(4, seed=19, positive=True)
    absolute = FGVis(model, defense=True, prune_levels=()).attribute(x, target=1)
    calibrated = FGVis(model, defense=True, lambda_calibration_quantile=0.99, prune_levels=()).attribute(x, target=1)
    assert bool(calibrated.goal_reached.all())
    off_blob = lambda r: ((r.mean_mask * ~blobs).flatten(1).sum(1))  # noqa: E731
    assert float(off_blob(calibrated).sum()) < float(off_blob(absolute).sum())
    assert float(share_inside(calibrated, blobs).mean()) >= float(share_inside(absolute, blobs).mean())


def test_lambda_calibration_quantile_is_validated() -> None:
    with pytest.raises(ValueError, match="lambda_calibration_quantile"):
        FGVis(trained_blob_cnn(), lambda_calibration_quantile=1.5)


def test_goal_met_at_the_start_returns_the_untouched_mask() -> None:
    """Nothing to remove: an image already below the deletion goal costs no iteration."""
    model = trained_blob_cnn()
    neg, _, _ = make_blobs(2, seed=20, positive=False)
    pos, _, _ = make_blobs(1, seed=21, positive=True)
    x = torch.cat([neg, pos])
    r = FGVis(model, defense=True).attribute(x, target=1, game="deletion")
    assert float(r.target_prob_before[:2].max()) < 0.5 < float(r.target_prob_before[2])
    assert r.iterations[:2].tolist() == [0, 0] and bool(r.goal_reached.all())
    assert torch.equal(r.mask[:2], torch.ones_like(r.mask[:2]))
    assert int(r.iterations[2]) > 0 and float((1 - r.mask[2]).sum()) > 0
    only_neg = FGVis(model, defense=True).attribute(neg, target=1, game="deletion")
    assert only_neg.iterations.tolist() == [0, 0] and torch.equal(only_neg.explanation, neg)


class _Parabola(torch.nn.Module):
    """log-odds of class 1 = w·(mean(e) - 0.3)²: deleting helps only down to mean 0.3, then hurts."""

    def __init__(self, w: float = 10.0) -> None:
        super().__init__()
        self.w = w

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        z = self.w * (e.flatten(1).mean(1) - 0.3) ** 2
        return torch.stack([torch.zeros_like(z), z], 1)


def test_missed_goal_returns_the_snapshot_closest_to_it() -> None:
    """Sign steps of 0.5 oscillate between m = 0.5 (p lowest) and m = 0; the last iterate is m = 0."""
    x = torch.ones(1, 3, 4, 4)
    settings = dict(optimizer="sign", lr=0.5, max_iterations=4, check_every=1, goal_level=1e-3, prune_levels=())
    r = FGVis(_Parabola(), defense=False, **settings).attribute(x, target=1, game="deletion")
    assert not bool(r.goal_reached[0])
    assert torch.allclose(r.mask, torch.full_like(r.mask, 0.5))  # not the last iterate (0)
    expected = torch.sigmoid(torch.tensor(10.0 * 0.2**2))
    assert torch.allclose(r.target_prob_after[0], expected, atol=1e-5)
    assert float(r.target_prob_after[0]) == pytest.approx(min(r.prob_trajectory[0]), abs=1e-6)


def test_a_missed_game_gives_up_after_patience_checks_without_a_nearer_iterate() -> None:
    """The parabola's p bottoms out at the first step (m = 0.5, evaluated at iteration 2) and the
    sign steps then oscillate: with give_up_patience=2 the game stops 3 checks later (iteration 5)
    with the same answer as the whole budget; without it, it runs all 40 iterations. A game that
    reaches its goal is not affected."""
    x = torch.ones(1, 3, 4, 4)
    settings = dict(optimizer="sign", lr=0.5, max_iterations=40, check_every=1, goal_level=1e-3, prune_levels=())
    full = FGVis(_Parabola(), defense=False, **settings).attribute(x, target=1, game="deletion")
    quick = FGVis(_Parabola(), defense=False, give_up_patience=2, **settings).attribute(x, target=1, game="deletion")
    assert int(full.iterations[0]) == 40 and int(quick.iterations[0]) == 5
    assert not bool(quick.goal_reached[0])
    assert torch.equal(quick.mask, full.mask) and torch.equal(quick.target_prob_after, full.target_prob_after)
    reachable = dict(settings, goal_level=0.6, patience=1)
    a = FGVis(_Parabola(), defense=False, **reachable).attribute(x, target=1, game="deletion")
    b = FGVis(_Parabola(), defense=False, give_up_patience=0, **reachable).attribute(x, target=1, game="deletion")
    assert bool(a.goal_reached[0]) and torch.equal(a.mask, b.mask) and int(a.iterations[0]) == int(b.iterations[0])
    with pytest.raises(ValueError, match="give_up_patience"):
        FGVis(_Parabola(), defense=False, give_up_patience=-1)


def test_pruning_undoes_faint_changes_and_keeps_the_goal() -> None:
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(4, seed=22, positive=True)
    raw = FGVis(model, defense=True, prune_levels=()).attribute(x, target=1)
    pruned = FGVis(model, defense=True).attribute(x, target=1)
    assert bool(raw.goal_reached.all()) and bool(pruned.goal_reached.all())
    assert bool((pruned.target_prob_after <= pruned.goal_prob + 1e-6).all())
    assert float(pruned.prune_level.max()) > 0 and float(raw.prune_level.max()) == 0
    change = 1 - pruned.mask
    for i in range(4):  # every change left is at least the sample's prune level
        kept = change[i][change[i] > 0]
        assert kept.numel() > 0 and float(kept.min()) >= float(pruned.prune_level[i])
    assert bool((pruned.removed_mass <= raw.removed_mass + 1e-7).all())
    assert float(share_inside(pruned, blobs).mean()) > float(share_inside(raw, blobs).mean())
    assert pruned.summary(0)["prune_level"] == pytest.approx(float(pruned.prune_level[0]))


def test_pruning_never_takes_a_missed_goal_further_from_it() -> None:
    model = trained_blob_cnn()
    x, _, _ = make_blobs(2, seed=23, positive=True)
    settings = dict(max_iterations=10, goal_level=1e-12)  # unreachable in 10 steps
    raw = FGVis(model, defense=True, prune_levels=(), **settings).attribute(x, target=1)
    pruned = FGVis(model, defense=True, **settings).attribute(x, target=1)
    assert not bool(raw.goal_reached.any()) and not bool(pruned.goal_reached.any())
    assert bool((pruned.target_prob_after <= raw.target_prob_after + 1e-6).all())


def test_prune_levels_are_validated() -> None:
    with pytest.raises(ValueError, match="prune_levels"):
        FGVis(trained_blob_cnn(), prune_levels=(0.0, 0.5))


def test_backtracking_takes_back_a_step_that_made_things_worse() -> None:
    """Plain sign steps of 0.5 oscillate (best p = sigmoid(0.4)); taking back the step that
    overshoots to m = 0 and halving it walks down to the minimum at mean(m) = 0.3 (p = 0.5)."""
    x = torch.ones(1, 3, 4, 4)
    settings = dict(optimizer="sign", lr=0.5, max_iterations=30, check_every=1, goal_level=1e-3, prune_levels=())
    plain = FGVis(_Parabola(), defense=False, **settings).attribute(x, target=1, game="deletion")
    careful = FGVis(_Parabola(), defense=False, step_control="backtrack", **settings).attribute(x, target=1)
    assert float(plain.target_prob_after[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(0.4))), abs=1e-4)
    assert float(careful.target_prob_after[0]) < 0.52
    assert abs(float(careful.mask.mean()) - 0.3) < 0.05


def test_step_control_and_snapshots_are_validated() -> None:
    with pytest.raises(ValueError, match="step_control"):
        FGVis(trained_blob_cnn(), step_control="linesearch")
    with pytest.raises(ValueError, match="snapshots"):
        FGVis(trained_blob_cnn(), snapshots="sometimes")


def test_backtracking_batch_equals_single_runs_and_reaches_the_goal() -> None:
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(3, seed=24, positive=True)
    fgvis = FGVis(model, defense=True, step_control="backtrack")
    batched = fgvis.attribute(x, target=1)
    assert bool(batched.goal_reached.all())
    assert float(share_inside(batched, blobs).min()) > 0.6
    for i in range(3):
        single = fgvis.attribute(x[i : i + 1], target=1)
        assert torch.allclose(single.mask[0], batched.mask[i], atol=1e-4)
        assert int(single.iterations[0]) == int(batched.iterations[i])


@pytest.mark.parametrize("snapshots,every", [("every_iteration", True), ("closest_every_iteration", True),
                                              ("checks", False)])
def test_a_goal_crossed_between_checks_is_kept_only_when_tracking_every_iteration(snapshots: str, every: bool) -> None:
    """Points m = 1, 0.5, 0 (p 0.99, 0.60, 0.71); goal 0.65 holds only at iteration 2, the check is at 3."""
    x = torch.ones(1, 3, 4, 4)
    settings = dict(optimizer="sign", lr=0.5, max_iterations=3, check_every=3, goal_level=0.65, prune_levels=(),
                    snapshots=snapshots)
    r = FGVis(_Parabola(), defense=False, **settings).attribute(x, target=1, game="deletion")
    assert bool(r.goal_reached[0]) is every
    if every:
        assert torch.allclose(r.mask, torch.full_like(r.mask, 0.5))
        assert float(r.target_prob_after[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(0.4))), abs=1e-5)
    else:
        assert float(r.target_prob_after[0]) > 0.65


def test_mask_gradient_is_the_games_gradient_and_the_defence_clips_it() -> None:
    """At the untouched mask every activation equals its bound, so the defended gradient is the
    plain one; at a mask that removes the blobs, the defence zeroes some of it (Eq. 6) and the
    blob pixels stay the evidence (positive: removing them lowers the class)."""
    model = trained_blob_cnn()
    x, _, blobs = make_blobs(2, seed=21, positive=True)
    ones = torch.ones_like(x)
    flags = [p.requires_grad for p in model.parameters()]
    plain = FGVis(model, defense=False).mask_gradient(x, ones, 1)
    m = ones.clone().requires_grad_(True)
    log_p = torch.log_softmax(model(m * x), 1)
    (expected,) = torch.autograd.grad((log_p[:, 1] - log_p[:, 0]).sum(), m)
    assert torch.allclose(plain, expected, atol=1e-6)
    assert torch.allclose(FGVis(model, defense=True).mask_gradient(x, ones, 1), plain, atol=1e-6)
    half = torch.where(blobs[:, None].bool(), 0.5, 1.0).expand_as(x)
    defended = FGVis(model, defense=True).mask_gradient(x, half, 1)
    undefended = FGVis(model, defense=False).mask_gradient(x, half, 1)
    assert not torch.allclose(defended, undefended)
    inside = (defended.clamp_min(0).sum(1) * blobs).flatten(1).sum(1)
    assert bool((inside > 0.5 * defended.clamp_min(0).sum(1).flatten(1).sum(1)).all())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training


class _Additive(nn.Module):
    """logit_1 - logit_0 = 400 · mean(relu(sum of channels)) - 2: evidence adds up over the image."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.c.weight.fill_(1.0)
            self.c.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.c(x)).mean((1, 2, 3)) * 400 - 2
        return torch.stack([torch.zeros_like(z), z], 1)


def _fov_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evidence inside a central FOV, and (stronger) outside it, where pixels can never move."""
    fov = torch.zeros(1, 32, 32, dtype=torch.bool)
    fov[:, 8:24, 8:24] = True
    inside = torch.zeros(1, 3, 32, 32)
    inside[:, :, 12:16, 12:16] = 1.0
    outside = torch.zeros(1, 3, 32, 32)
    outside[:, :, 0:4, 0:4] = 3.0
    return _Additive().eval(), fov, inside, inside + outside


def test_evidence_outside_the_fov_does_not_change_the_game_inside_it() -> None:
    """A normalised step divides by the largest gradient: that of pixels fixed at m0 must not
    count (it shrank every step inside the FOV 3x here)."""
    model, fov, x_clean, x_outside = _fov_case()
    first_steps = []
    for x in (x_clean, x_outside):
        snaps: dict[int, torch.Tensor] = {}
        FGVis(model, defense=False, max_iterations=2, check_every=1, prune_levels=()).attribute(
            x, 1, fov_mask=fov, snapshot=lambda t, idx, m, p: snaps.setdefault(t, m.clone()))
        first_steps.append(snaps[2][0][:, fov[0]])
    assert torch.equal(first_steps[0], first_steps[1])
    assert float((1 - first_steps[0]).max()) == pytest.approx(0.3)  # lr: the largest in-FOV evidence moves a full step


def test_reference_goal_is_what_the_game_can_reach_with_a_fov() -> None:
    """p(reference) for the goal is that of r inside the FOV and the image outside it (what deleting
    everything the game may touch gives), not of r everywhere."""
    model, fov, _, x = _fov_case()
    deletable = torch.where(fov[:, None], torch.zeros_like(x), x)
    with torch.no_grad():
        p_reachable = torch.softmax(model(deletable), 1)[0, 1]
    res = FGVis(model, defense=False, goal="reference", max_iterations=50).attribute(x, 1, fov_mask=fov)
    assert float(res.goal_prob[0]) == pytest.approx(float(p_reachable))
    assert bool(res.goal_reached[0])


def test_fov_mask_of_the_wrong_shape_is_refused() -> None:
    model, fov, x, _ = _fov_case()
    with pytest.raises(ValueError, match="fov_mask must be"):
        FGVis(model, defense=False, max_iterations=2).attribute(x, 1, fov_mask=fov[0])


@pytest.mark.parametrize("lr", [0.0, -0.3, float("nan")])
def test_a_step_size_that_is_not_positive_is_refused_by_the_engine(lr: float) -> None:
    """A negative step makes the deletion game add evidence; library callers get the same refusal
    as the CLI's --fgvis-setting."""
    from retina_fgvis.fgvis.games import FGVisSettings

    with pytest.raises(ValueError, match="lr must be a number > 0"):
        FGVisSettings(lr=lr).validate()
