"""The result of one batched FGVis run (what the paper's Fig. 2 b-f shows, plus diagnostics)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FGVisResult:
    """Batched outputs of :meth:`retina_fgvis.FGVis.attribute` (CPU tensors).

    ``mean_mask`` is the importance map: the channel mean of ``complementary_mask``, which for
    the deletion and repression games is ``1 - m`` (what was removed, true colours, Fig. 2 d/f)
    and for the preservation and generation games is ``m`` itself (what was kept).
    """

    game: str
    mask: torch.Tensor  # (B, 3, H, W) in [0, 1]
    explanation: torch.Tensor  # (B, 3, H, W) e = m*x + (1-m)*r, normalised space
    complementary_mask: torch.Tensor  # (B, 3, H, W)
    mean_mask: torch.Tensor  # (B, H, W)
    target: torch.Tensor  # (B,) class index explained
    target_prob_before: torch.Tensor  # (B,)
    target_prob_after: torch.Tensor  # (B,)
    goal_prob: torch.Tensor  # (B,) the probability level the game had to reach
    goal_reached: torch.Tensor  # (B,) bool
    iterations: torch.Tensor  # (B,) int64, optimisation steps used per sample
    changed_fraction: torch.Tensor  # (B,) share of (FOV) pixels with any channel moved > 0.5
    removed_mass: torch.Tensor  # (B,) mean |m - m0| over (FOV) pixels and channels
    final_lambda: torch.Tensor  # (B,)
    prune_level: torch.Tensor | None = None  # (B,) changes below this were undone (0: none)
    lambda_trajectory: list[list[float]] = field(default_factory=list)  # per sample, per check
    prob_trajectory: list[list[float]] = field(default_factory=list)  # per sample, per check
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def summary(self, i: int) -> dict:
        """JSON-ready diagnostics of sample ``i`` (used by the CLI's JSON files)."""
        return {
            "game": self.game,
            "target": int(self.target[i]),
            "target_prob_before": float(self.target_prob_before[i]),
            "target_prob_after": float(self.target_prob_after[i]),
            "goal_prob": float(self.goal_prob[i]),
            "goal_reached": bool(self.goal_reached[i]),
            "iterations": int(self.iterations[i]),
            "changed_fraction": float(self.changed_fraction[i]),
            "removed_mass": float(self.removed_mass[i]),
            "final_lambda": float(self.final_lambda[i]),
            "prune_level": None if self.prune_level is None else float(self.prune_level[i]),
            "lambda_trajectory": self.lambda_trajectory[i] if self.lambda_trajectory else [],
            "prob_trajectory": self.prob_trajectory[i] if self.prob_trajectory else [],
        }
