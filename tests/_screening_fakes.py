"""Fast stand-ins for the classifier and the FGVis engine, and tiny synthetic fundus files,
so the screening pipeline (reading, grouping, regions, overlays, records, CSVs, report) is
tested end to end in seconds. The real preprocessing, region finder and overlay are used."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from retina_fgvis.fundus.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare_fundus
from retina_fgvis.report.files import atomic_write_image
from retina_fgvis.samples import phantom_fundus

SIZE = 64


class FakeClassifier:
    """Classifier contract: p(referable) rises with the share of dark-red pixels."""

    def __init__(self, size: int = SIZE, threshold: float = 0.5):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.model.eval()
        self.metadata = {"arch": "fake", "input_size": size, "mean": IMAGENET_MEAN,
                         "std": IMAGENET_STD, "threshold": threshold}
        self.sha256 = "f" * 64
        self.path = None
        self.threshold = threshold
        self.input_size = size

    def prepare(self, rgb: np.ndarray):
        return prepare_fundus(rgb, size=self.input_size)

    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        dark = _darkness(batch)
        return torch.sigmoid(40 * (dark - 0.02)).cpu()


def _darkness(batch: torch.Tensor) -> torch.Tensor:
    """Share of pixels whose green channel is far below the fundus background."""
    g = batch[:, 1]
    return ((g < -1.6) & (g > -2.0)).float().flatten(1).mean(1)


class FakeExplainer:
    """Explainer contract: the importance map marks dark pixels inside the field of view."""

    def __init__(self, fail_on: float | None = None):
        self.calls = 0
        self.images = 0
        self.fail_on = fail_on

    def attribute(self, inputs, target=1, game="deletion", fov_mask=None):
        self.calls += 1
        self.images += inputs.shape[0]
        g = inputs[:, 1]
        imp = torch.clamp((-1.2 - g) / 0.6, 0, 1)
        if fov_mask is not None:
            imp = imp * fov_mask.to(imp.dtype)
        if self.fail_on is not None and inputs.shape[0] > 1:
            raise RuntimeError("simulated batch failure")
        b = inputs.shape[0]
        return SimpleNamespace(mean_mask=imp, target_prob_after=torch.full((b,), 0.1),
                               iterations=torch.full((b,), 7), goal_reached=torch.ones(b, dtype=torch.bool))


def fundus_rgb(seed: int = 1, size: int = 96) -> np.ndarray:
    rgb, _ = phantom_fundus(size=size, seed=seed)
    return rgb


def write_png(path: Path, rgb: np.ndarray) -> Path:
    return atomic_write_image(path, rgb)


def make_folder(root: Path, n: int = 5) -> list[Path]:
    """``n`` tiny phantom fundus photographs named ``P<k>_<eye>.png`` (2 eyes per patient)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        eye = "left" if k % 2 else "right"
        paths.append(write_png(root / f"P{k // 2:02d}_{eye}.png", fundus_rgb(seed=k + 1)))
    return paths
