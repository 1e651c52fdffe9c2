"""The four FGVis games (paper §3.1, Eq. 1-3), batched, with an adaptive sparsity weight λ.

Each game optimises a per-pixel, per-channel mask ``m in [0,1]^{3xHxW}`` and explains with
``e = m*x + (1-m)*r`` (``r`` = 0 in normalised space by default, i.e. the data-mean colour):

=============  =====  ======================================  =========================
game           m0     similarity term                          sparsity term
=============  =====  ======================================  =========================
deletion       1      minimise evidence of the target         λ·mean(1-m)  (remove few)
preservation   1      keep the evidence of the target         λ·mean(m)    (keep few)
generation     0      create the evidence of the target       λ·mean(m)    (add few)
repression     0      keep the target's evidence away         λ·mean(1-m)  (add many)
=============  =====  ======================================  =========================

Choices the paper leaves open (the README's method section gives the measurements):

* **Goal.** A game succeeds when the target probability crosses ``goal_prob``: for deletion /
  repression ``p <= goal_prob``, for preservation / generation ``p >= goal_prob``. The level is
  a fixed probability (``goal="threshold"``), a fraction of the original probability
  (``goal="fraction"``) or the probability of the reference image ``r`` itself
  (``goal="reference"``: "the model sees no more evidence than in a blank image"), or the
  larger of a fixed level and that (``goal="threshold_or_reference"``: deletion can never
  take p below what the fully deleted image scores, so a fixed level under p(r) is unreachable).
* **λ rule.** λ is per sample and adapted at every check (``check_every`` steps): multiplied by
  ``lambda_up`` while the goal holds (restore pixels: fewer changes), by ``lambda_down`` while it
  does not (the similarity term dominates). The returned mask is the goal-reaching snapshot
  with the least removed mass among the checks, so λ only has to visit the right range, not
  settle in it (``snapshots`` also allows every iteration; measured worse, see the setting).
* **Stopping.** A sample stops once it reached the goal and its best snapshot has not improved
  for more than ``patience`` checks (the default 3 tolerates three checks without a better
  snapshot and stops at the fourth, 40 iterations after the best one), or at ``max_iterations``.
  ``give_up_patience`` (off by default) stops a sample that has *not* reached its goal the same
  way, counting checks without a nearer-to-goal iterate. Finished samples leave the batch (and the
  defence's bounds are sub-selected), so they cost nothing. In deletion and generation, whose
  start mask costs nothing, a sample whose goal already holds at m0 (e.g. an eye already below
  the deletion goal) returns m0 after 0 iterations.
* **Missed goal.** A sample that never reaches its goal at a check returns the iterate with
  the lowest target probability (deletion/repression; highest for the other two) over every
  iteration, possibly m0 itself: the last iterate can be worse than where the game started.
  If that iterate (after pruning) meets the goal, the goal counts as reached: ``goal_reached``
  describes the returned explanation.
* **Pruning.** Normalised gradient steps move every pixel in proportion to its evidence, so after
  200 steps the mask carries a faint haze of removals everywhere (on DiaretDB1 ~85 % of the
  removed mass sits in pixels changed by < 0.5). In deletion and generation, whose sparse
  direction is back towards m0, the finished mask is cleaned: changes smaller than ``τ`` are
  undone for the largest ``τ`` in ``prune_levels`` whose explanation still meets the goal (a
  missed goal: scores no worse than the game's result). Only forward passes, no gradient: the
  pruned explanation is a mix of the optimised one and the original image, so it cannot hold
  evidence the defended optimisation did not find.
* **Optimiser.** By default ``sgd_normalized``: steps of ``lr`` times the gradient divided by its
  per-sample maximum, the mask projected onto [0,1] after each step (chosen by the study in
  evaluation/game-study/). Alternatives: ``adam`` (with a tiny epsilon: under the defence the
  gradient reaching the mask is ~1000× smaller than without it, and Adam's usual eps=1e-8 would
  then silently scale the steps down) and ``sign`` (steps of ``lr`` times the gradient's sign).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Literal

import torch

from retina_fgvis.fgvis.defense import activation_bounds
from retina_fgvis.fgvis.result import FGVisResult

GameName = Literal["deletion", "preservation", "generation", "repression"]


@dataclass(frozen=True)
class GameSpec:
    mask_init: float
    removes_evidence: bool  # deletion/repression push the target probability down

    @property
    def start_is_free(self) -> bool:
        """Whether m0 has sparsity cost 0 (deletion, generation): no later snapshot can beat it."""
        return self.mask_init == (1.0 if self.removes_evidence else 0.0)

    def sparsity(self, m: torch.Tensor) -> torch.Tensor:
        """Per-element sparsity cost whose mean the game minimises (times λ)."""
        return 1 - m if self.removes_evidence else m


GAMES: dict[str, GameSpec] = {
    "deletion": GameSpec(mask_init=1.0, removes_evidence=True),
    "preservation": GameSpec(mask_init=1.0, removes_evidence=False),
    "generation": GameSpec(mask_init=0.0, removes_evidence=False),
    "repression": GameSpec(mask_init=0.0, removes_evidence=True),
}


@dataclass(frozen=True)
class FGVisSettings:
    """Every knob of the optimisation. Defaults come from the study in evaluation/game-study/."""

    optimizer: Literal["adam", "sgd_normalized", "sign"] = "sgd_normalized"
    lr: float = 0.3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-12
    max_iterations: int = 200
    check_every: int = 10
    similarity: Literal["prob", "log_prob", "log_odds"] = "log_odds"
    lambda_schedule: Literal["adaptive", "fixed"] = "adaptive"
    lambda_init: float = 1.0
    lambda_up: float = 1.5
    lambda_down: float = 0.5
    lambda_min: float = 1e-4
    lambda_max: float = 1e3
    warmup_iterations: int = 0  # λ = 0 for these first steps
    # λ in units of the image's own evidence gradient: at the first sparsity step the per-element
    # sparsity gradient is set to this quantile of |d similarity / d m| over the FOV (None: λ is
    # absolute). lambda_init/min/max then scale that unit.
    lambda_calibration_quantile: float | None = None
    goal: Literal["threshold", "fraction", "reference", "threshold_or_reference"] = "threshold"
    goal_level: float = 0.5
    goal_fraction: float = 0.1
    patience: int = 3  # checks without improvement tolerated after the goal is reached; the next one stops
    # a game that has NOT reached its goal: checks without a nearer-to-goal iterate tolerated, as
    # `patience` (3: stops at the fourth such check, 40 iterations after the nearest); it returns
    # the nearest. None: it runs its whole budget (default: on the 7 missed DiaretDB1 training
    # games the budget gets further on 5; evaluation/game-study/README.md, "Giving up")
    give_up_patience: int | None = None
    # which iterates are snapshot candidates: "checks" (every check_every steps), "closest_every_iteration"
    # (the goal-reaching snapshot from checks, the closest-to-goal one from every iteration) or
    # "every_iteration" (both from every iteration). Under the defence p swings by ±0.1 between
    # checks, so a missed game's closest point is often between two checks; a between-check goal
    # crossing is an early, undeveloped removal (study: median enrichment 2.67× vs 3.26×)
    snapshots: Literal["checks", "closest_every_iteration", "every_iteration"] = "closest_every_iteration"
    # "backtrack": a step that made the objective worse is taken back and retried from the previous
    # point with half the step size; accepted steps grow it by step_grow (per sample, no sync)
    step_control: Literal["none", "backtrack"] = "none"
    step_grow: float = 1.2
    step_scale_max: float = 4.0
    defense_tolerance: float = 1e-6
    # Eq. 6 fused into the ReLU/ReLU6 backward (False: gradient hooks everywhere; same numbers, slower)
    defense_fuse: bool = True
    # after the game (deletion, generation): undo every change smaller than the largest of these
    # levels whose explanation still meets the goal (or, where the goal was missed, scores no
    # worse than the game's own result); () = keep the optimised mask as it is
    prune_levels: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7)
    autocast: bool = False  # CUDA only: bf16 forward/backward (the mask stays fp32)
    # CUDA only: feed the model NHWC tensors (convert the model too: ``model.to(memory_format=
    # torch.channels_last)``); cuDNN's tensor-core convolutions prefer that layout, the mask stays NCHW
    channels_last: bool = False

    def validate(self) -> "FGVisSettings":
        if self.optimizer not in ("adam", "sgd_normalized", "sign"):
            raise ValueError(f"unknown optimizer '{self.optimizer}'")
        if self.similarity not in ("prob", "log_prob", "log_odds"):
            raise ValueError(f"unknown similarity '{self.similarity}'")
        if self.snapshots not in ("checks", "closest_every_iteration", "every_iteration"):
            raise ValueError(f"unknown snapshots '{self.snapshots}'")
        if self.step_control not in ("none", "backtrack"):
            raise ValueError(f"unknown step_control '{self.step_control}'")
        if self.lambda_schedule not in ("adaptive", "fixed"):
            raise ValueError(f"unknown lambda_schedule '{self.lambda_schedule}'")
        if self.goal not in ("threshold", "fraction", "reference", "threshold_or_reference"):
            raise ValueError(f"unknown goal '{self.goal}'")
        q = self.lambda_calibration_quantile
        if q is not None and not 0.0 < q < 1.0:
            raise ValueError(f"lambda_calibration_quantile must be in (0, 1), got {q}")
        if any(not 0.0 < level < 1.0 for level in self.prune_levels):
            raise ValueError(f"prune_levels must lie in (0, 1), got {self.prune_levels}")
        if self.give_up_patience is not None and not (_is_int(self.give_up_patience) and self.give_up_patience >= 0):
            raise ValueError(f"give_up_patience must be None or an integer >= 0, got {self.give_up_patience!r}")
        for name, low in (("max_iterations", 1), ("check_every", 1), ("warmup_iterations", 0), ("patience", 0)):
            value = getattr(self, name)
            if not (_is_int(value) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r} (a negative step adds evidence)")
        if self.goal_level is None:
            if self.goal != "fraction":  # every other goal builds its level from goal_level
                raise ValueError(f"goal_level None needs goal='fraction', got goal='{self.goal}'")
        elif not (_is_real(self.goal_level) and 0.0 <= self.goal_level <= 1.0):
            raise ValueError(f"goal_level must be a probability in [0, 1], got {self.goal_level!r}")
        if not (_is_real(self.goal_fraction) and 0.0 < self.goal_fraction <= 1.0):
            raise ValueError(f"goal_fraction must be in (0, 1], got {self.goal_fraction!r}")
        # λ: lambda_init 0 is legitimate (no sparsity term: the defence protocol's fixed λ = 0)
        _require(self, "lambda_init", lambda v: v >= 0, ">= 0")
        for name in ("lambda_min", "lambda_up", "lambda_down", "adam_eps", "step_grow", "step_scale_max"):
            _require(self, name, lambda v: v > 0, "> 0")
        _require(self, "lambda_max", lambda v: v >= self.lambda_min, f">= lambda_min ({self.lambda_min!r})")
        _require(self, "defense_tolerance", lambda v: v >= 0, ">= 0")
        # adaptive: λ starts at lambda_init and is clamped to [lambda_min, lambda_max] at every check;
        # a start outside that range would jump at the first check (0 = start without sparsity)
        if self.lambda_schedule == "adaptive" and self.lambda_init > 0 and not (
                self.lambda_min <= self.lambda_init <= self.lambda_max):
            raise ValueError(f"lambda_init must lie in [lambda_min, lambda_max] = [{self.lambda_min!r}, "
                             f"{self.lambda_max!r}] for the adaptive schedule (or be 0), got {self.lambda_init!r}")
        betas = self.adam_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        return self


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(settings: FGVisSettings, name: str, ok: Callable[[float], bool], what: str) -> None:
    value = getattr(settings, name)
    if not (_is_real(value) and ok(value)):
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")


def _target_tensor(target: object, batch: int, device: torch.device) -> torch.Tensor:
    """``target`` as a (B,) long tensor: an int (one class for all) or an integer tensor, a scalar
    or one class per sample. Why: ``as_tensor(0.7, dtype=long)`` is silently class 0."""
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must be an int or an integer tensor (class indices), got a {target.dtype} tensor")
        if not (target.dim() == 0 or (target.dim() == 1 and target.shape[0] in (1, batch))):
            raise ValueError(f"target must be a scalar or one class per sample, shape ({batch},), "
                             f"got shape {tuple(target.shape)}")
        t = target.to(device=device, dtype=torch.long)
    elif isinstance(target, numbers.Integral) and not isinstance(target, bool):
        t = torch.as_tensor(int(target), device=device, dtype=torch.long)
    else:
        raise ValueError(f"target must be an int or an integer tensor (class indices), got {target!r} "
                         f"({type(target).__name__})")
    t = t.expand(batch).contiguous()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"target must be a class index >= 0, got {t.tolist()}")
    return t


def _check_logits(logits: object, target: torch.Tensor) -> None:
    """The model's output must be (B, C) logits, C >= 2, and every target one of the C classes."""
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == len(target)
            and logits.shape[1] >= 2):
        raise ValueError(f"the model must return logits of shape (B, C) with C >= 2 classes, got {shape} "
                         "(the softmax of a single logit is always 1)")
    classes = logits.shape[1]
    if len(target) and int(target.max()) >= classes:
        raise ValueError(f"target {target.tolist()} out of range: the model has {classes} classes "
                         f"(0 <= target < {classes})")


@contextlib.contextmanager
def _explaining(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of a game, restored afterwards.

    Eval mode keeps samples independent (BatchNorm running statistics); frozen parameters
    skip the weight gradients, roughly a third of a backward pass.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _Optimizer:
    """Per-element optimiser state over the full batch; updates only the active samples."""

    def __init__(self, settings: FGVisSettings, like: torch.Tensor) -> None:
        self.s = settings
        if settings.optimizer == "adam":
            self.m1 = torch.zeros_like(like)
            self.m2 = torch.zeros_like(like)

    def step(self, grad: torch.Tensor, idx: torch.Tensor, t: int) -> torch.Tensor:
        s = self.s
        if s.optimizer == "adam":
            b1, b2 = s.adam_betas
            m1 = self.m1[idx].mul_(b1).add_(grad, alpha=1 - b1)
            m2 = self.m2[idx].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self.m1[idx], self.m2[idx] = m1, m2
            denom = (m2 / (1 - b2**t)).sqrt_().add_(s.adam_eps)
            return s.lr * (m1 / (1 - b1**t)) / denom
        if s.optimizer == "sgd_normalized":
            scale = grad.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
            return s.lr * grad / scale
        return s.lr * grad.sign()


class FGVis:
    """Fine-grained visual explanations (Wagner et al., CVPR 2019), Captum-style.

    ``FGVis(model, defense=True).attribute(x, target=1, game="deletion")`` runs the game for a
    batch ``x`` (B,3,H,W, normalised as the model expects) and returns an
    :class:`FGVisResult`. ``model`` must return logits; softmax is applied here and is never
    clipped by the defence (the paper's "besides the final layer").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        defense: bool = True,
        reference: float | torch.Tensor = 0.0,
        settings: FGVisSettings | None = None,
        **overrides: object,
    ) -> None:
        self.model = model
        self.defense = defense
        self.reference = reference
        base = settings or FGVisSettings()
        self.settings = replace(base, **overrides).validate() if overrides else base.validate()

    # ------------------------------------------------------------------ helpers
    def _log_probs(self, e: torch.Tensor, target: torch.Tensor,
                   check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) and the log-odds log p/(1-p), both computed stably from the logits.

        A confident classifier gives p = 1.0 exactly in float32, where the softmax score has a
        zero gradient; the log-odds keep a usable gradient at any confidence. ``check``: first
        make sure the model's output is (B, C) logits and ``target`` a valid class of them.
        """
        if self.settings.channels_last and e.device.type == "cuda":
            e = e.contiguous(memory_format=torch.channels_last)
        with self._autocast(e.device):
            logits = self.model(e)
        if check:
            _check_logits(logits, target)
        log_p = torch.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target[:, None])[:, 0]
        others = log_p.scatter(1, target[:, None], float("-inf"))
        return log_pt, log_pt - torch.logsumexp(others, dim=1)

    def _check_inputs(self, x: torch.Tensor) -> None:
        """Refuse inputs the model cannot take or the game cannot explain, before any work.

        Why: torch's own errors (``Input type (double) and bias type (float) should be the
        same``) do not say what to pass, and a NaN/inf pixel runs every iteration and returns NaN.
        """
        if x.dim() != 4:
            raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"inputs must be a floating-point tensor, normalised as the model expects, got "
                             f"{x.dtype} (a uint8 image must be prepared first, e.g. Classifier.prepare)")
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if param is not None and x.dtype != param.dtype:
            raise ValueError(f"inputs are {x.dtype}, the model's parameters {param.dtype}: pass inputs.to("
                             f"{param.dtype}) (settings.autocast runs bf16 passes from {torch.float32} inputs)")
        if param is not None and x.device != param.device:
            raise ValueError(f"inputs are on {x.device}, the model on {param.device}: pass inputs.to('{param.device}')")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("inputs contain NaN or infinite values")

    def _probs(self, e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._log_probs(e, target)[0].exp()

    def _similarity(self, log_pt: torch.Tensor, log_odds: torch.Tensor) -> torch.Tensor:
        s = self.settings.similarity
        return log_pt.exp() if s == "prob" else log_pt if s == "log_prob" else log_odds

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.settings.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reference_for(self, x: torch.Tensor, reference: float | torch.Tensor | None) -> torch.Tensor:
        """The reference r as a (B, C, H, W) tensor: a constant, one image for all, or one per sample."""
        ref = torch.as_tensor(self.reference if reference is None else reference, dtype=x.dtype, device=x.device)
        if ref.dim() == 4 and ref.shape[0] == x.shape[0]:
            return ref
        return ref.expand_as(x[:1] if ref.dim() < 4 else ref).expand_as(x).contiguous()

    def _goal(self, spec: GameSpec, p_before: torch.Tensor, ref: torch.Tensor, target: torch.Tensor,
              x: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
        """The game's stopping level per sample. p(reference) is that of the most the game can delete:
        r inside the field of view, the image outside it (pixels there stay at m0)."""
        s = self.settings
        if s.goal == "fraction":
            return p_before * s.goal_fraction
        level = torch.full_like(p_before, s.goal_level)
        if s.goal in ("reference", "threshold_or_reference") and spec.removes_evidence:
            with torch.no_grad():
                p_ref = self._probs(torch.where(fov, ref, x), target)
            return p_ref if s.goal == "reference" else torch.maximum(level, p_ref)
        return level

    def _evidence_unit(self, grad_sim: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
        """λ's unit per sample: the q-quantile of |d similarity / d m| times the mask size.

        Why: the sparsity term is a mean over ~10^6 mask elements, so λ = 1 gives each element a
        gradient of ~1e-6, thousands of times below the evidence gradient of a fundus photo:
        the term then does nothing and the mask collects a faint haze of removals everywhere.
        Measuring λ in units of the image's own gradient makes "λ = 1" mean "only the pixels
        above the q-quantile of evidence may move", for any model and resolution.
        """
        fov_e = fov.expand_as(grad_sim)
        n = fov_e.flatten(1).sum(1).clamp_min(1)
        q = self.settings.lambda_calibration_quantile
        unit = torch.stack([
            torch.quantile(g[f].abs().float(), q) if f.any() else g.new_zeros(())
            for g, f in zip(grad_sim, fov_e)
        ])
        return (unit * n).clamp_min(1e-12)

    @staticmethod
    def _sparsity_grad(fov: torch.Tensor, like: torch.Tensor, spec: GameSpec) -> torch.Tensor:
        """d(mean sparsity)/dm per element: -1/n (deletion, repression) or +1/n inside the FOV."""
        fov_e = fov.expand_as(like).to(like.dtype)
        n = fov_e.flatten(1).sum(1).clamp_min(1).view(-1, 1, 1, 1)
        return fov_e / n * (-1.0 if spec.removes_evidence else 1.0)

    @staticmethod
    def _track_best(
        active: torch.Tensor, m: torch.Tensor, ok: torch.Tensor, cost: torch.Tensor, best: torch.Tensor,
        best_cost: torch.Tensor, reached: torch.Tensor,
    ) -> None:
        """Keep (in place, for ``active``) the goal-reaching snapshot with the lowest sparsity cost."""
        better = ok & (cost < best_cost[active])
        best[active] = torch.where(better.view(-1, 1, 1, 1), m, best[active])
        best_cost[active] = torch.where(better, cost, best_cost[active])
        reached[active] |= ok

    @staticmethod
    def _track_closest(
        spec: GameSpec, active: torch.Tensor, m: torch.Tensor, p: torch.Tensor, closest: torch.Tensor,
        closest_p: torch.Tensor,
    ) -> None:
        """Keep (in place, for ``active``) the snapshot closest to the goal: a missed game's answer."""
        if len(active) == len(closest):  # whole batch active: in place, no gather/scatter copies
            nearer = p < closest_p if spec.removes_evidence else p > closest_p
            torch.where(nearer.view(-1, 1, 1, 1), m, closest, out=closest)
            torch.where(nearer, p, closest_p, out=closest_p)
            return
        nearer = p < closest_p[active] if spec.removes_evidence else p > closest_p[active]
        closest[active] = torch.where(nearer.view(-1, 1, 1, 1), m, closest[active])
        closest_p[active] = torch.where(nearer, p, closest_p[active])

    def _backtrack(
        self, active: torch.Tensor, m: torch.Tensor, grad: torch.Tensor, sim: torch.Tensor,
        sparse: torch.Tensor, lam: torch.Tensor, sign: float, prev_mask: torch.Tensor,
        prev_grad: torch.Tensor, prev_sim: torch.Tensor, prev_sparse: torch.Tensor,
        step_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accept or take back this iteration's point; return (base mask, its gradient, step scale).

        Why: under the defence the gradient is a *clipped* gradient, not the true one, so a full
        step along it can raise the objective; on DiaretDB1 p(referable) then oscillates for
        hundreds of steps. Comparing the true objective of consecutive points (same λ) and
        halving the step after a worse one makes the game monotone, with no extra forward pass
        and no host synchronisation. The state tensors are updated in place for ``active``.
        """
        obj = sign * sim + lam * sparse
        obj_prev = sign * prev_sim[active] + lam * prev_sparse[active]
        # False at the first step (NaN); a tie within float noise (batched vs single kernels) is no worse
        worse = obj > obj_prev + 1e-5 * (1 + obj_prev.abs())
        w4 = worse.view(-1, 1, 1, 1)
        base = torch.where(w4, prev_mask[active], m)
        base_grad = torch.where(w4, prev_grad[active], grad)
        s = self.settings
        scale = torch.where(worse, step_scale[active] * 0.5, (step_scale[active] * s.step_grow).clamp_(max=s.step_scale_max))
        step_scale[active] = scale
        prev_mask[active], prev_grad[active] = base, base_grad
        prev_sim[active] = torch.where(worse, prev_sim[active], sim)
        prev_sparse[active] = torch.where(worse, prev_sparse[active], sparse)
        return base, base_grad, scale.view(-1, 1, 1, 1)

    def _prune(
        self, spec: GameSpec, mask: torch.Tensor, p_game: torch.Tensor, x: torch.Tensor, ref: torch.Tensor,
        target: torch.Tensor, goal: torch.Tensor, fov: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Undo the changes smaller than the largest admissible level of ``prune_levels``; return
        (pruned mask, level per sample, p of the pruned explanation).

        Admissible per sample: the pruned explanation meets the goal, or scores no worse than the
        unpruned one (``p_game``). Every level is tried (the probability is not monotone in the
        level: a faint removal can even raise it), one forward pass of the batch per level.
        """
        m0 = spec.mask_init
        limit = torch.maximum(goal, p_game) if spec.removes_evidence else torch.minimum(goal, p_game)
        pruned, level, p_pruned = mask, torch.zeros_like(p_game), p_game
        for tau in sorted(self.settings.prune_levels):
            candidate = mask.masked_fill((mask - m0).abs() < tau, m0)
            p = self._probs(candidate * x + (1 - candidate) * ref, target)
            ok = p <= limit if spec.removes_evidence else p >= limit
            ok &= ((candidate - m0).abs() * fov).flatten(1).sum(1) > 0  # never prune to nothing
            pruned = torch.where(ok.view(-1, 1, 1, 1), candidate, pruned)
            level = torch.where(ok, torch.full_like(level, tau), level)
            p_pruned = torch.where(ok, p, p_pruned)
        return pruned, level, p_pruned

    def _defended(self, x: torch.Tensor):
        """The defence's bounds for ``x`` (clean pass included), or None when the defence is off.

        The clean pass runs under the game's autocast: bounds recorded in fp32 and compared with
        bf16 activations put units "out of bounds" by rounding alone (measured on an H100:
        flagged-region IoU bf16 vs fp32 0.18 with fp32 bounds).
        """
        if not self.defense:
            return None
        s = self.settings
        return activation_bounds(self.model, x, tolerance=s.defense_tolerance, fuse=s.defense_fuse,
                                 clean_pass_context=lambda: self._autocast(x.device))

    def mask_gradient(
        self, inputs: torch.Tensor, mask: torch.Tensor, target: int | torch.Tensor,
        reference: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d similarity / d m at ``mask`` (B, C, H, W), under the defence when it is on.

        Positive where lowering m (removing the pixel) lowers the class's evidence: what the
        deletion game would remove next from that point. Why it is here: a game's answer is
        sparse by design, and a consumer that needs every pixel ranked (the deletion metric) can
        order the pixels the game left untouched by the game's own, defended, gradient instead
        of by an arbitrary rule. One forward and one backward pass.
        """
        x = inputs.detach()
        self._check_inputs(x)
        target = _target_tensor(target, x.shape[0], x.device)
        ref = self._reference_for(x, reference)
        with _explaining(self.model):
            defended = self._defended(x)
            with defended if defended is not None else contextlib.nullcontext():
                if defended is not None:
                    defended.select(None)
                m = mask.detach().to(x).clone().requires_grad_(True)
                sim = self._similarity(*self._log_probs(m * x + (1 - m) * ref, target, check=True))
                (grad,) = torch.autograd.grad(sim.sum(), m)
        return grad

    # ------------------------------------------------------------------ the game
    def attribute(
        self,
        inputs: torch.Tensor,
        target: int | torch.Tensor,
        game: GameName = "deletion",
        fov_mask: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        snapshot: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        reference: float | torch.Tensor | None = None,
    ) -> FGVisResult:
        """Run ``game`` for class ``target`` on the batch ``inputs``.

        ``fov_mask`` (B,H,W) or (B,1,H,W) bool: pixels outside it keep m0 and are not counted in
        the sparsity term or the changed-pixel fraction (a fundus photo's black surround is no
        evidence of anything). ``progress(iteration, active_samples)`` is called at each check;
        ``snapshot(iteration, sample_indices, masks, probs)`` too, with the active samples'
        current masks (for studies of how the explanation evolves; costs a copy).
        ``reference`` overrides the constructor's r for this call (e.g. one blurred copy of each
        image, (B, C, H, W)).
        """
        if game not in GAMES:
            raise ValueError(f"unknown game '{game}' (choose from {', '.join(GAMES)})")
        spec, s = GAMES[game], self.settings
        x = inputs.detach()
        self._check_inputs(x)
        device, B = x.device, x.shape[0]
        target = _target_tensor(target, B, device)
        ref = self._reference_for(x, reference)
        if fov_mask is None:
            fov = torch.ones(B, 1, *x.shape[2:], dtype=torch.bool, device=device)
        else:
            fov = fov_mask.to(device=device, dtype=torch.bool)
            fov = fov[:, None] if fov.dim() == 3 else fov
            if fov.dim() != 4 or fov.shape[0] != B or fov.shape[1] != 1 or fov.shape[2:] != x.shape[2:]:
                raise ValueError(f"fov_mask must be (B, H, W) or (B, 1, H, W) = {(B, *x.shape[2:])}, "
                                 f"got shape {tuple(fov_mask.shape)}")
        fov_pixels = fov.flatten(1).sum(1).clamp_min(1)

        m0 = spec.mask_init
        mask = torch.full_like(x, m0)
        m0_t = torch.tensor(m0, dtype=x.dtype, device=device)
        best = mask.clone()
        best_cost = torch.full((B,), float("inf"), device=device)
        reached = torch.zeros(B, dtype=torch.bool, device=device)
        since_best = torch.zeros(B, dtype=torch.long, device=device)
        cost_at_check = best_cost.clone()  # best cost at the previous check (patience counts from it)
        # for samples that never reach the goal: the snapshot closest to it (m0 to start with)
        closest = mask.clone()
        iterations = torch.zeros(B, dtype=torch.long, device=device)
        lam = torch.full((B,), s.lambda_init, device=device)
        lam_unit = torch.ones(B, device=device)  # set by the calibration step, if any
        calibrate_at = s.warmup_iterations + 1 if s.lambda_calibration_quantile is not None else None
        lam_hist: list[list[float]] = [[] for _ in range(B)]
        prob_hist: list[list[float]] = [[] for _ in range(B)]
        active = torch.arange(B, device=device)
        optimizer = _Optimizer(s, mask)
        backtrack = s.step_control == "backtrack"
        if backtrack:  # the last accepted point: its mask, gradient and objective parts
            prev_mask, prev_grad = mask.clone(), torch.zeros_like(mask)
            prev_sim = torch.full((B,), float("nan"), device=device)
            prev_sparse = torch.zeros(B, device=device)
            step_scale = torch.ones(B, device=device)
        sign = 1.0 if spec.removes_evidence else -1.0

        with _explaining(self.model):
            with torch.no_grad():
                p_before = self._log_probs(x, target, check=True)[0].exp()
                goal = self._goal(spec, p_before, ref, target, x, fov)
                p_start = p_before if m0 == 1.0 else self._probs(m0 * x + (1 - m0) * ref, target)
                closest_p = p_start.clone()
                closest_at_check = closest_p.clone()  # give_up_patience counts from it
                since_closer = torch.zeros(B, dtype=torch.long, device=device)
                # deletion / generation: m0 costs nothing (sparsity 0), so a sample whose goal already
                # holds at m0 is done, and no later snapshot can beat it; it never enters the loop.
                # (preservation / repression start at the most expensive mask and must optimise.)
                if spec.start_is_free:
                    done = p_start <= goal if spec.removes_evidence else p_start >= goal
                    reached |= done
                    best_cost = torch.where(done, torch.zeros_like(best_cost), best_cost)
                    cost_at_check = best_cost.clone()
                    active = active[~done]
            defended = self._defended(x) if len(active) else None
            with defended if defended is not None else contextlib.nullcontext():
                for t in range(1, s.max_iterations + 1 if len(active) else 1):
                    if defended is not None:
                        defended.select(None if len(active) == B else active)
                    # whole batch active (the common case): views, not index copies of mask-sized tensors
                    full = len(active) == B
                    xa, fa, ra = (x, fov, ref) if full else (x[active], fov[active], ref[active])
                    m = (mask.clone() if full else mask[active]).requires_grad_(True)
                    e = m * xa + (1 - m) * ra
                    log_pt, log_odds = self._log_probs(e, target[active])
                    p = log_pt.exp()
                    sim = self._similarity(log_pt, log_odds)
                    sparse = (spec.sparsity(m) * fa).flatten(1).sum(1) / (fov_pixels[active] * x.shape[1])
                    lam_now = (lam * lam_unit)[active] if t > s.warmup_iterations else torch.zeros_like(sim)
                    if t == calibrate_at:
                        lam_now = torch.zeros_like(sim)  # this step's gradient is the evidence alone
                    loss = (sign * sim + lam_now * sparse).sum()
                    (grad,) = torch.autograd.grad(loss, m)
                    # pixels outside the FOV never move: their evidence must not set the step size
                    # of a normalised step (a no-op where the image equals r there, as in the CLI)
                    grad.mul_(fa)
                    if t == calibrate_at:
                        with torch.no_grad():
                            lam_unit[active] = self._evidence_unit(grad, fa)
                            d_sparse = self._sparsity_grad(fa, grad, spec)
                            grad = grad + ((lam * lam_unit)[active]).view(-1, 1, 1, 1) * d_sparse
                    with torch.no_grad():
                        m_used = m.detach()
                        if backtrack:
                            base, base_grad, scale = self._backtrack(
                                active, m_used, grad, sim.detach(), sparse.detach(), lam_now.detach(), sign,
                                prev_mask, prev_grad, prev_sim, prev_sparse, step_scale,
                            )
                            new = (base - scale * optimizer.step(base_grad, active, t)).clamp_(0, 1)
                        else:
                            new = (m_used - optimizer.step(grad, active, t)).clamp_(0, 1)
                        if full:
                            torch.where(fa, new, m0_t, out=mask)
                        else:
                            mask[active] = torch.where(fa, new, m0_t)
                        iterations[active] += 1
                        if s.snapshots != "checks":  # tensor ops only: no host synchronisation
                            p_it = p.detach()
                            ok_it = p_it <= goal[active] if spec.removes_evidence else p_it >= goal[active]
                            if s.snapshots == "every_iteration":
                                self._track_best(active, m_used, ok_it, sparse.detach(), best, best_cost, reached)
                            self._track_closest(spec, active, m_used, p_it, closest, closest_p)
                    if t % s.check_every and t != s.max_iterations:
                        continue
                    # ---- check: the only host-device synchronisation of the loop
                    with torch.no_grad():
                        p_now = p.detach()
                        ok = p_now <= goal[active] if spec.removes_evidence else p_now >= goal[active]
                        if s.snapshots != "every_iteration":
                            self._track_best(active, m_used, ok, sparse.detach(), best, best_cost, reached)
                        if s.snapshots == "checks":
                            self._track_closest(spec, active, m_used, p_now, closest, closest_p)
                        improved = best_cost[active] < cost_at_check[active]
                        cost_at_check[active] = best_cost[active]
                        since_best[active] = torch.where(improved, 0, since_best[active] + 1)
                        if s.lambda_schedule == "adaptive" and t > s.warmup_iterations:
                            lam_a = lam[active]
                            lam[active] = torch.where(ok, lam_a * s.lambda_up, lam_a * s.lambda_down).clamp_(
                                s.lambda_min, s.lambda_max
                            )
                        lam_log = (lam * lam_unit)[active] if t > s.warmup_iterations else torch.zeros_like(p_now)
                        for i, pi, li in zip(active.tolist(), p_now.tolist(), lam_log.tolist()):
                            prob_hist[i].append(pi)
                            lam_hist[i].append(li)
                        if snapshot is not None:
                            snapshot(t, active.cpu(), m_used.cpu(), p_now.cpu())
                        finished = reached[active] & (since_best[active] > s.patience)
                        if s.give_up_patience is not None and t > 1:  # iteration 1 evaluates the start mask
                            cp = closest_p[active]
                            closer = cp != closest_at_check[active]  # _track_closest only moves it nearer
                            closest_at_check[active] = cp
                            since_closer[active] = torch.where(closer, 0, since_closer[active] + 1)
                            finished |= ~reached[active] & (since_closer[active] > s.give_up_patience)
                        active = active[~finished]
                    if progress is not None:
                        progress(t, len(active))
                    if len(active) == 0:
                        break

            with torch.no_grad():
                final = torch.where(reached[:, None, None, None], best, closest)
                explanation = final * x + (1 - final) * ref
                p_after = self._probs(explanation, target)
                prune_level = torch.zeros(B, device=device)
                if spec.start_is_free and s.prune_levels:
                    final, prune_level, p_after = self._prune(spec, final, p_after, x, ref, target, goal, fov)
                    explanation = final * x + (1 - final) * ref
                # "reached" describes the returned explanation: pruning a missed game's closest
                # snapshot can take it across the goal (p is not monotone in the mask)
                reached |= p_after <= goal if spec.removes_evidence else p_after >= goal

        comp = 1 - final if spec.removes_evidence else final
        moved = ((final - m0).abs() > 0.5).any(1, keepdim=True) & fov
        removed = ((final - m0).abs() * fov).flatten(1).sum(1) / (fov_pixels * x.shape[1])
        cpu = lambda t_: t_.detach().cpu()  # noqa: E731
        return FGVisResult(
            game=game,
            mask=cpu(final),
            explanation=cpu(explanation),
            complementary_mask=cpu(comp),
            mean_mask=cpu(comp.mean(1)),
            target=cpu(target),
            target_prob_before=cpu(p_before),
            target_prob_after=cpu(p_after),
            goal_prob=cpu(goal),
            goal_reached=cpu(reached),
            iterations=cpu(iterations),
            changed_fraction=cpu(moved.flatten(1).sum(1) / fov_pixels),
            removed_mass=cpu(removed),
            final_lambda=cpu(lam * lam_unit),
            prune_level=cpu(prune_level),
            lambda_trajectory=lam_hist,
            prob_trajectory=prob_hist,
            settings={"defense": self.defense, **asdict(self.settings)},
        )
