"""Synthetic fundus photographs for tests (no dataset needed)."""
from __future__ import annotations

import cv2
import numpy as np


def synthetic_fundus(h: int = 300, w: int = 400, cx: float | None = None, cy: float | None = None,
                     r: float | None = None, lesions: int = 0, seed: int = 0) -> np.ndarray:
    """Orange-red disc on black with a brighter optic disc, a few dark vessels, mild noise, and
    ``lesions`` small dark-red dots (a crude stand-in for microaneurysms/haemorrhages)."""
    rng = np.random.default_rng(seed)
    cx = w / 2.0 if cx is None else cx
    cy = h / 2.0 if cy is None else cy
    r = 0.45 * min(h, w) if r is None else r
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    d = np.hypot(xx - cx, yy - cy)
    inside = d <= r
    shade = np.clip(1.0 - 0.45 * (d / r) ** 2, 0, 1)  # vignetting towards the rim
    img = np.zeros((h, w, 3), np.float32)
    base = np.array([200, 95, 40], np.float32)
    img[inside] = base * shade[inside, None]
    od = np.hypot(xx - (cx + 0.35 * r), yy - cy) < 0.12 * r
    img[od & inside] = [250, 220, 160]
    for k in range(4):
        a = rng.uniform(0, 2 * np.pi)
        p1 = (int(cx + 0.35 * r), int(cy))
        p2 = (int(cx + 0.9 * r * np.cos(a)), int(cy + 0.9 * r * np.sin(a)))
        cv2.line(img, p1, p2, (120, 40, 20), max(1, int(0.015 * r)))
    for k in range(lesions):
        rr = rng.uniform(0.1, 0.7) * r
        a = rng.uniform(0, 2 * np.pi)
        cv2.circle(img, (int(cx + rr * np.cos(a)), int(cy + rr * np.sin(a))),
                   max(1, int(0.02 * r)), (90, 10, 10), -1)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    img[~inside] = rng.uniform(0, 4, (int((~inside).sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def true_disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.hypot(xx - cx, yy - cy) <= r
