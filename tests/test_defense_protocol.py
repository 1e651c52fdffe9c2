"""The defence-validation protocol (paper Table 1) must report how far the attacker gets."""
from __future__ import annotations

import torch
import torch.nn as nn

from retina_fgvis.faithfulness import DEFENSE_FGVIS_SETTINGS
from retina_fgvis.fgvis.games import FGVis


class _Slope(nn.Module):
    """Two classes; the target's logit grows with the left-minus-right contrast of channel 0,
    so the generation game can raise p(target) slowly and steadily."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 2), stride=(1, 2), bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[1.0, -1.0]]]]))
            self.conv.bias.fill_(0.1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(e[:, :1])).flatten(1).mean(1)
        return torch.stack([torch.zeros_like(h), 8 * h - 4.5], 1)


def test_the_protocol_returns_the_attackers_best_not_the_first_iterate_past_one_half() -> None:
    torch.manual_seed(0)
    model = _Slope().eval()
    x = torch.ones(2, 3, 8, 8)
    target = torch.tensor([1, 1])
    game = FGVis(model, defense=False, **{**DEFENSE_FGVIS_SETTINGS, "lr": 0.02, "max_iterations": 120})
    result = game.attribute(x, target, game="generation")
    with torch.no_grad():
        p_returned = model(result.explanation).softmax(1)[:, 1]
    best_seen = torch.tensor([max(t) for t in result.prob_trajectory])
    assert (result.iterations == 120).all()  # no early stop: the whole budget is the attacker's
    assert (p_returned >= best_seen - 1e-6).all()  # the highest p of any check, not the first past 0.5
    assert (p_returned > 0.9).all()
