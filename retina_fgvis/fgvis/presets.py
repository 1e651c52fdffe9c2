"""FGVis configured for the shipped referable-DR classifier: one place, used by every command.

Why a preset: `explain`, `screen` and `evaluate diaretdb1` must run the *same* game, otherwise
the numbers in evaluation/ would not describe what users get. The deletion goal is the
classifier's own operating threshold: the explanation removes exactly enough evidence for
the eye to stop being called referable. Other settings are the engine defaults, chosen by the
study in evaluation/game-study/.
"""
from __future__ import annotations

from typing import Any

from retina_fgvis.fgvis.games import FGVis


def fundus_fgvis(classifier: Any, defense: bool = True, **overrides: Any) -> FGVis:
    """FGVis for ``classifier`` (a :class:`retina_fgvis.classifier.model.Classifier`)."""
    settings: dict[str, Any] = {"goal": "threshold", "goal_level": float(classifier.threshold)}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return FGVis(classifier.model, defense=defense, **settings)
