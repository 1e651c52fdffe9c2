"""The paper's Fig. 2 b-f pictures of one explanation, at the ORIGINAL photo's resolution.

Why on the original grid: a clinician compares the explanation with the photograph they
know, and masks must line up with lesions at 1500x1152, not with the classifier's 512 px crop.
Pixels outside the model's crop count as "not removed" (mask 1 for deletion).
"""
from __future__ import annotations

import numpy as np

from retina_fgvis.fgvis.result import FGVisResult
from retina_fgvis.fundus.preprocess import PreparedFundus


def explanation_images(
    rgb: np.ndarray,
    prepared: PreparedFundus,
    result: FGVisResult,
    index: int,
    mean: tuple[float, float, float],
) -> dict[str, np.ndarray]:
    """uint8 images keyed by kind: ``mask`` (b), ``explanation`` (c), ``complementary_mask``
    (d, true colours), ``evidence`` (e: the removed/kept evidence on grey), ``mean_mask`` (f).

    ``mean`` is the classifier's normalisation mean (0..1): the reference r = 0 in normalised
    space is that colour in pixel space.
    """
    removes = result.game in ("deletion", "repression")
    comp_model = result.complementary_mask[index].permute(1, 2, 0).numpy()  # (S, S, 3)
    # outside the crop: nothing removed (deletion) / nothing kept (preservation)
    comp = np.clip(prepared.mapping.map_to_original(np.ascontiguousarray(comp_model, np.float32)), 0, 1)
    comp = comp * prepared.fov_original[..., None]
    mask = 1.0 - comp if removes else comp
    img = rgb.astype(np.float32) / 255.0
    grey = np.asarray(mean, np.float32)[None, None, :]
    explanation = mask * img + (1 - mask) * grey  # e = m*x + (1-m)*r, in pixel space
    evidence = comp * img + (1 - comp) * grey  # paper's ẽ: only the important evidence
    mean_mask = comp.mean(axis=2)

    def u8(a: np.ndarray) -> np.ndarray:
        return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)

    return {
        "mask": u8(mask),
        "explanation": u8(explanation),
        "complementary_mask": u8(comp),
        "evidence": u8(evidence),
        "mean_mask": u8(mean_mask / max(float(mean_mask.max()), 1e-6)),
    }
