"""Builds a tiny synthetic DiaretDB1 folder in the official layout (for tests only).

Grey levels follow the official encoding value = 21 * sum of four experts' confidences, so
168 (= 0.667) is *below* the 0.75 cut and 189 (= 0.75) and 252 are lesion pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FOLDERS = {"H": "hemorrhages", "HE": "hardexudates", "SE": "softexudates", "RSD": "redsmalldots"}
H, W = 60, 80


def fov_mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - H / 2 + 0.5) ** 2 + (xx - W / 2 + 0.5) ** 2 <= 28 ** 2


def make_layout(root: Path, specs: dict[str, dict[str, list[tuple[int, int, int, int, int]]]],
                train: list[str], test: list[str], write_test_images: bool = True) -> Path:
    """``specs[name][lesion] = [(row0, col0, row1, col1, grey), ...]`` rectangles; the key
    ``"rgb_only"`` paints a dark-red blob without any ground truth (a false positive bait).

    Each image gets a dark-red background, red lesions darker, bright lesions paler, so the
    type guess has something to work with. Returns the folder holding ``diaretdb1_v_1_1``.
    """
    res = root / "diaretdb1_v_1_1" / "resources"
    img_dir = res / "images" / "ddb1_fundusimages"
    img_dir.mkdir(parents=True)
    (res / "images" / "ddb1_fundusmask").mkdir(parents=True)
    for f in FOLDERS.values():
        (res / "images" / "ddb1_groundtruth" / f).mkdir(parents=True)
    (res / "traindatasets").mkdir(parents=True)
    (res / "testdatasets").mkdir(parents=True)
    fov = fov_mask()
    Image.fromarray(fov.astype(np.uint8) * 255).convert("1").save(res / "images" / "ddb1_fundusmask" / "fmask.tif")
    names = train + (test if write_test_images else [])
    for name in names:
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[fov] = (180, 90, 40)
        spec = specs.get(name, {})
        for r0, c0, r1, c1, _ in spec.get("rgb_only", []):   # painted, but no ground truth
            rgb[r0:r1, c0:c1] = (120, 40, 20)
        for lesion, folder in FOLDERS.items():
            gt = np.zeros((H, W), np.uint8)
            for r0, c0, r1, c1, grey in spec.get(lesion, []):
                gt[r0:r1, c0:c1] = np.maximum(gt[r0:r1, c0:c1], grey)
                rgb[r0:r1, c0:c1] = (120, 40, 20) if lesion in ("H", "RSD") else (240, 220, 120)
            Image.fromarray(gt).save(res / "images" / "ddb1_groundtruth" / folder / f"{name}.png")
        Image.fromarray(rgb).save(img_dir / f"{name}.png")
    (res / "traindatasets" / "trainset.txt").write_text("".join(f"{n}.png\n" for n in train))
    (res / "testdatasets" / "testset.txt").write_text("".join(f"{n}.png\n" for n in test))
    return root
