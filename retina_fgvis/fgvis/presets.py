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
    settings: dict[str, Any] = {"goal": "threshold_or_reference", "goal_level": float(classifier.threshold)}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return FGVis(classifier.model, defense=defense, **settings)


def background_reference(prepared: Any, mean: Any, std: Any, kernel_fraction: float = 0.06) -> Any:
    """A lesion-free stand-in for each pixel: the median-blurred photo (normalised, (3, S, S)).

    Why: r = 0 is the data-mean colour, and a grey patch where a dark haemorrhage was can
    itself look like a pale lesion to the classifier; the local background does not. Median
    filtering with a kernel of ~6 % of the field of view removes lesions (much smaller) and
    keeps the background's colour and illumination.
    """
    return background_of(prepared.tensor, prepared.fov_model, mean, std, kernel_fraction)


def background_of(tensor: Any, fov: Any, mean: Any, std: Any, kernel_fraction: float = 0.06) -> Any:
    """:func:`background_reference` for a normalised (3, S, S) tensor and its (S, S) field of view
    (None: the whole image); zero (the data-mean colour) outside the field of view."""
    import cv2
    import numpy as np
    import torch

    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = ((tensor.detach().float().cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    k = max(3, int(kernel_fraction * rgb.shape[0]) | 1)
    blurred = cv2.medianBlur(np.ascontiguousarray(rgb), k)
    out = (torch.from_numpy(blurred).permute(2, 0, 1).float() / 255 - m) / s
    if fov is None:
        return out
    return out * torch.as_tensor(np.ascontiguousarray(np.asarray(fov, dtype=bool)))[None]
