"""Regenerate ``data/samples/``: the small default input of ``retina-fgvis screen``.

Only shippable material is used (never anything from ../shared/data):

* ``SYNA_left.png``  -- ``skimage.data.retina()`` (CC0 1.0, Mikael Häggström, Wikimedia
  Commons "Fundus photograph of normal left eye"), resized to 512 px. Patient and eye come
  from the file-name rule ``<patient>_<eye>``.
* ``IM000001.dcm``     -- the same photograph mirrored left-right (so it looks like a right
  eye), stored as an RLE-compressed Ophthalmic Photography DICOM with a synthetic patient
  (PatientID ``SYNA``, ImageLaterality ``R``, StudyDate 2024-01-15). The file name says
  nothing on purpose: patient and eye come from the DICOM header.
* ``SYNB_right.png`` -- a generated phantom fundus (no real photograph involved): field of
  view, vessels, optic disc, macula, plus drawn red dots (microaneurysms), blot haemorrhages
  and hard exudates.

Run ``python -m retina_fgvis.samples [OUT_DIR]``; output is deterministic.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

SIZE = 512
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT / "data" / "samples"


def retina_sample(size: int = SIZE) -> np.ndarray:
    """skimage's CC0 retina photograph (a left eye), resized to ``size`` px."""
    from skimage import data

    rgb = data.retina()
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float, amp: float) -> np.ndarray:
    small = rng.normal(0.0, 1.0, (max(2, int(size / scale)),) * 2).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) * amp


def _vessel_tree(rng: np.random.Generator, disc: tuple[float, float], size: int) -> np.ndarray:
    """Darkening map (0..1) of vessels: two arcades leaving the disc vertically and curving
    around the macula toward the temporal side, with side branches, plus short nasal vessels."""
    canvas = np.zeros((size, size), np.float32)
    cx, cy = disc
    temporal = np.pi if cx > size / 2 else 0.0  # direction from the disc toward the macula

    def branch(x, y, angle, target, width, length, depth, pull=0.022, outward=0):
        pts = [(x, y)]
        for _ in range(int(length / 5)):
            diff = (target - angle + np.pi) % (2 * np.pi) - np.pi
            angle += pull * diff + rng.normal(0, 0.05)
            x += 5 * np.cos(angle)
            y += 5 * np.sin(angle)
            pts.append((x, y))
        arr = np.round(np.array(pts)).astype(np.int32)
        cv2.polylines(canvas, [arr], False, 1.0, max(1, int(round(width))), cv2.LINE_AA)
        if depth > 0 and len(pts) > 6:
            for k in rng.choice(np.arange(3, len(pts) - 2), size=2, replace=False):
                bx, by = pts[int(k)]
                side = outward if outward else rng.choice([-1, 1])
                new = angle + side * rng.uniform(0.5, 0.9)
                branch(bx, by, new, new + side * 0.3, width * 0.6, length * 0.45, depth - 1, 0.02)

    towards = -1.0 if temporal == np.pi else 1.0  # x direction of the macula
    for sign in (-1, 1):  # superior (-) and inferior (+) arcades
        # leave the disc almost vertically, then bend around the macula
        a_vert = np.arctan2(sign * 1.0, 0.35 * towards)
        # branches turn away from the macula (up for the superior, down for the inferior arcade)
        out_side = int(-sign * towards)
        for w, tilt in ((5.0, 0.0), (3.5, 0.35)):
            a0 = np.arctan2(sign * 1.0, (0.35 + tilt) * towards)
            branch(cx, cy, a0 if tilt else a_vert, temporal, w, size * 0.8, 2, outward=out_side)
    for ang in np.linspace(-1.0, 1.0, 4) + (temporal + np.pi):  # nasal vessels
        branch(cx, cy, ang, ang, 2.5, size * 0.18, 1, 0.0)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def phantom_fundus(size: int = SIZE, seed: int = 7, eye: str = "right") -> tuple[np.ndarray, dict]:
    """A synthetic colour fundus with drawn lesions; returns (rgb, lesion positions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    radius = size * 0.47
    r = np.hypot(xx - c, yy - c) / radius
    fov = r <= 1.0

    disc = (c + (0.62 if eye == "right" else -0.62) * radius, c - 0.04 * radius)
    macula = (c - (0.12 if eye == "right" else -0.12) * radius, c + 0.02 * radius)

    # background: orange-red, darker towards the rim (vignetting), mottled texture
    shade = np.clip(1.0 - 0.35 * r**2.2, 0, 1) + _smooth_noise(rng, size, 24, 0.03)
    base = np.array([205.0, 92.0, 48.0], np.float32)
    img = shade[..., None] * base[None, None, :]
    dm = np.hypot(xx - macula[0], yy - macula[1]) / (0.16 * radius)
    img *= (1.0 - 0.28 * np.exp(-dm**2))[..., None]  # macula: darker
    dd = np.hypot(xx - disc[0], yy - disc[1]) / (0.09 * radius)
    disc_w = np.exp(-dd**6)[..., None]
    img = img * (1 - disc_w) + disc_w * np.array([250.0, 214.0, 150.0], np.float32)

    vessels = _vessel_tree(rng, disc, size)
    vessel_col = np.array([120.0, 28.0, 22.0], np.float32)
    img = img * (1 - 0.75 * vessels[..., None]) + 0.75 * vessels[..., None] * vessel_col

    lesions: dict[str, list[tuple[int, int, int]]] = {"red_dot": [], "blot": [], "exudate": []}

    def free_spot(min_r: float, max_r: float) -> tuple[int, int]:
        for _ in range(200):
            ang = rng.uniform(0, 2 * np.pi)
            rad = rng.uniform(min_r, max_r) * radius
            x, y = macula[0] + rad * np.cos(ang), macula[1] + rad * np.sin(ang)
            if np.hypot(x - c, y - c) < 0.85 * radius and np.hypot(x - disc[0], y - disc[1]) > 0.2 * radius:
                if vessels[int(y), int(x)] < 0.05:
                    return int(x), int(y)
        return int(macula[0]), int(macula[1])

    paint = np.zeros((size, size), np.float32)
    for _ in range(14):  # microaneurysms: small sharp red dots
        x, y = free_spot(0.12, 0.6)
        rr = int(rng.integers(2, 4))
        cv2.circle(paint, (x, y), rr, 1.0, -1, cv2.LINE_AA)
        lesions["red_dot"].append((x, y, rr))
    for _ in range(5):  # blot haemorrhages: larger irregular dark-red patches
        x, y = free_spot(0.2, 0.7)
        for _k in range(4):
            ox, oy = rng.normal(0, 3, 2)
            rr = int(rng.integers(5, 9))
            cv2.circle(paint, (int(x + ox), int(y + oy)), rr, 1.0, -1, cv2.LINE_AA)
        lesions["blot"].append((x, y, 10))
    paint = cv2.GaussianBlur(paint, (0, 0), 0.9)
    red_col = np.array([105.0, 18.0, 15.0], np.float32)
    img = img * (1 - paint[..., None]) + paint[..., None] * red_col

    bright = np.zeros((size, size), np.float32)
    for _ in range(3):  # hard exudates: clusters of small waxy yellow flecks
        x, y = free_spot(0.15, 0.45)
        for _k in range(int(rng.integers(4, 8))):
            ox, oy = rng.normal(0, 6, 2)
            rr = int(rng.integers(2, 5))
            cv2.circle(bright, (int(x + ox), int(y + oy)), rr, 1.0, -1, cv2.LINE_AA)
        lesions["exudate"].append((x, y, 14))
    bright = cv2.GaussianBlur(bright, (0, 0), 0.8)
    ex_col = np.array([246.0, 214.0, 92.0], np.float32)
    img = img * (1 - bright[..., None]) + bright[..., None] * ex_col

    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # sensor noise
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img[~fov] = 0
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return rgb, lesions


def make_samples(out_dir: str | Path = DEFAULT_DIR) -> list[Path]:
    """Write the three sample files into ``out_dir`` (atomically); returns their paths."""
    from retina_fgvis.fundus.dicom import write_dicom
    from retina_fgvis.report.files import atomic_write_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    left = retina_sample()
    paths = [atomic_write_image(out / "SYNA_left.png", left)]
    paths.append(write_dicom(out / "IM000001.dcm", np.ascontiguousarray(left[:, ::-1]),
                             patient_id="SYNA", eye="right", study_date="2024-01-15",
                             compression="rle"))
    phantom, _ = phantom_fundus(eye="right")
    paths.append(atomic_write_image(out / "SYNB_right.png", phantom))
    return paths


if __name__ == "__main__":
    for p in make_samples(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR):
        print(p, p.stat().st_size, "bytes")
