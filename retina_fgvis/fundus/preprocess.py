"""Fundus preprocessing shared by training, prediction, screening and evaluation.

Steps: find the circular field of view (FOV), crop a square around the FOV circle with a small
margin (padding with black where the square leaves the image, e.g. DiaretDB1 1500x1152 where
the circle touches the top and bottom), resize to the model's working size, paint everything
outside the FOV with the normalisation mean (so it becomes exactly 0 after normalisation, the
same value FGVis uses for "removed"), normalise.

Why keep an exact :class:`GridMapping`: explanations are computed on the model grid but must be
drawn back onto the original photograph (and scored against DiaretDB1 ground truth on the
1500x1152 grid). The crop box has integer corners and an integer side, so the resize is a pure
scale and the mapping is an exact affine map in both directions.

Coordinate convention: pixel ``i`` covers ``[i, i + 1)`` in "edge" coordinates, its centre is at
``i + 0.5``. Arrays of points are ``(..., 2)`` with columns ``(x, y)`` = (column, row).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Margin around the FOV circle, as a fraction of its diameter.
CROP_MARGIN = 0.02
#: Working resolution of the FOV detector (longest side); detection is coarse on purpose.
_DETECT_SIDE = 384


class NoFundusError(ValueError):
    """The image does not contain a detectable circular fundus field of view."""

    def __init__(self, detail: str):
        super().__init__(f"no circular field of view found ({detail})")
        self.detail = detail


@dataclass
class FOVCircle:
    """FOV circle in original pixel edge coordinates."""

    cx: float
    cy: float
    r: float


# ---------------------------------------------------------------------------------------------
# FOV detection
# ---------------------------------------------------------------------------------------------


def _fit_circle(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle fit."""
    a = np.stack([xs, ys, np.ones_like(xs)], axis=1)
    b = xs**2 + ys**2
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r = float(np.sqrt(max(sol[2] + cx**2 + cy**2, 0.0)))
    return float(cx), float(cy), r


def detect_fov_circle(rgb: np.ndarray) -> tuple[np.ndarray, FOVCircle]:
    """Detect the FOV; return the (H, W) bool mask and the fitted circle.

    Method: brightness (max of R, G, B, smoothed) thresholded just above the background level,
    holes filled, largest connected component; a circle is fitted to the component boundary
    points that do not lie on the image border (the FOV may be cut by the image edge). The mask
    is that circle (shrunk by ~0.5 %, the dark blurred rim) clipped to the image.

    Raises :class:`NoFundusError` for blank, black, noisy or non-circular images.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise NoFundusError(f"expected an RGB image, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    scale = min(1.0, _DETECT_SIDE / max(h, w))
    small = rgb if scale == 1.0 else cv2.resize(
        rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    sh, sw = small.shape[:2]
    val = small.max(axis=2).astype(np.float32)
    grey = small.astype(np.float32).mean(axis=2)
    # Noise check: fundus photos are smooth at this scale; random noise is not.
    resid = grey - cv2.GaussianBlur(grey, (0, 0), 1.5)
    if float(resid.std()) > 20.0:
        raise NoFundusError("image looks like noise")
    smooth = cv2.GaussianBlur(val, (0, 0), 2.0)
    lo = float(np.percentile(smooth, 2))
    hi = float(np.percentile(smooth, 99))
    if hi < 25.0:
        raise NoFundusError("image is black or nearly black")
    if hi - lo < 20.0:
        raise NoFundusError("image is blank (no contrast between fundus and background)")
    thr = lo + max(5.0, 0.04 * (hi - lo))
    binary = (smooth > thr).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        raise NoFundusError("nothing brighter than the background")
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    comp = (labels == k).astype(np.uint8)
    area_frac = stats[k, cv2.CC_STAT_AREA] / float(sh * sw)
    if area_frac < 0.08:
        raise NoFundusError(f"bright region covers only {area_frac:.0%} of the image")
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours], axis=0).astype(np.float64)
    inner = (pts[:, 0] > 1) & (pts[:, 0] < sw - 2) & (pts[:, 1] > 1) & (pts[:, 1] < sh - 2)
    pts = pts[inner]
    r_guess = np.sqrt(stats[k, cv2.CC_STAT_AREA] / np.pi)
    # Enough boundary, spread around the image: cropped photos (EyePACS/ODIR) show only the four
    # corner arcs of a circle larger than the square, which is still enough for a fit.
    sectors = np.unique((np.degrees(np.arctan2(pts[:, 1] - sh / 2.0, pts[:, 0] - sw / 2.0)) // 30))
    if len(pts) < max(12, 0.04 * 2 * np.pi * r_guess) or len(sectors) < 3:
        raise NoFundusError("no circular boundary visible (bright region fills the image)")
    # pixel centres in edge coordinates
    cx, cy, r = _fit_circle(pts[:, 0] + 0.5, pts[:, 1] + 0.5)
    # robust refit: drop boundary points far from the circle (notches, glare at the rim)
    d = np.abs(np.hypot(pts[:, 0] + 0.5 - cx, pts[:, 1] + 0.5 - cy) - r)
    keep = d < max(2.0, 0.03 * r)
    if keep.sum() >= 12 and keep.mean() > 0.5:
        cx, cy, r = _fit_circle(pts[keep, 0] + 0.5, pts[keep, 1] + 0.5)
    if not (0.2 * min(sh, sw) <= r <= 0.8 * max(sh, sw)):
        raise NoFundusError(f"implausible FOV radius {r / scale:.0f} px")
    # The circle must explain the component: high overlap between disc and bright region.
    yy, xx = np.mgrid[0:sh, 0:sw]
    disc = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) <= r
    filled = comp.copy()
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    inter = float(np.logical_and(disc, filled > 0).sum())
    union = float(np.logical_or(disc, filled > 0).sum())
    if union == 0 or inter / union < 0.8:
        raise NoFundusError(f"bright region is not circular (overlap {inter / max(union, 1):.2f})")
    circle = FOVCircle(cx=cx / scale, cy=cy / scale, r=r / scale)
    return circle_mask((h, w), circle, shrink=max(1.0, 0.005 * circle.r)), circle


def circle_mask(shape: tuple[int, int], c: FOVCircle, shrink: float = 0.0) -> np.ndarray:
    """Bool mask of pixels whose centre lies within the circle (radius minus ``shrink``)."""
    h, w = shape
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5
    return (xx - c.cx) ** 2 + (yy - c.cy) ** 2 <= (c.r - shrink) ** 2


def detect_fov(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool field-of-view mask of a fundus photograph (see :func:`detect_fov_circle`)."""
    return detect_fov_circle(rgb)[0]


# ---------------------------------------------------------------------------------------------
# Grid mapping
# ---------------------------------------------------------------------------------------------


@dataclass
class GridMapping:
    """Square crop box in ORIGINAL pixel coords (may extend outside the image: padded with 0)
    and the model grid size. Model pixel (u, v) centre <-> original (x, y) centre.

    ``x0, y0`` is the top-left edge of the box, ``side`` its side (original pixels), so model
    edge coordinate ``m`` corresponds to original edge coordinate ``x0 + m * side / size``.
    """

    x0: float
    y0: float
    side: float
    size: int
    original_shape: tuple[int, int]  # (H, W)

    @property
    def scale(self) -> float:
        """Original pixels per model pixel."""
        return self.side / self.size

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Original pixel-centre coords (x, y) -> model pixel-centre coords (u, v)."""
        p = np.asarray(xy, dtype=np.float64)
        off = np.array([self.x0, self.y0])
        return (p + 0.5 - off) / self.scale - 0.5

    def to_original(self, uv: np.ndarray) -> np.ndarray:
        """Model pixel-centre coords (u, v) -> original pixel-centre coords (x, y)."""
        p = np.asarray(uv, dtype=np.float64)
        off = np.array([self.x0, self.y0])
        return off + (p + 0.5) * self.scale - 0.5

    def crop_from_original(self, img: np.ndarray, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
        """Original-grid array -> model-grid array (crop, zero-pad, resize)."""
        h, w = img.shape[:2]
        x0, y0, side = int(round(self.x0)), int(round(self.y0)), int(round(self.side))
        pad_l, pad_t = max(0, -x0), max(0, -y0)
        pad_r, pad_b = max(0, x0 + side - w), max(0, y0 + side - h)
        sub = img[max(0, y0): min(h, y0 + side), max(0, x0): min(w, x0 + side)]
        if pad_l or pad_t or pad_r or pad_b:
            pads = ((pad_t, pad_b), (pad_l, pad_r)) + ((0, 0),) * (img.ndim - 2)
            sub = np.pad(sub, pads, mode="constant")
        if side == self.size:
            return np.ascontiguousarray(sub)
        interp = interpolation if side > self.size else (
            cv2.INTER_LINEAR if interpolation == cv2.INTER_AREA else interpolation)
        return cv2.resize(sub, (self.size, self.size), interpolation=interp)

    def map_to_original(self, model_map: np.ndarray, order: int = 1) -> np.ndarray:
        """(size, size[, C]) array on the model grid -> (H, W[, C]) on the original grid
        (0 outside the crop). ``order`` 0 = nearest, 1 = bilinear."""
        m = np.asarray(model_map)
        if m.shape[:2] != (self.size, self.size):
            raise ValueError(f"model map has shape {m.shape[:2]}, expected {(self.size, self.size)}")
        h, w = self.original_shape
        in_dtype = m.dtype
        work = m.astype(np.float32) if in_dtype in (bool, np.float64) or not (
            in_dtype in (np.uint8, np.uint16, np.int16, np.float32)) else m
        s = self.scale
        # dst (original x) -> src (model u):  u = (x + 0.5 - x0) / s - 0.5
        mat = np.array([[1.0 / s, 0.0, (0.5 - self.x0) / s - 0.5],
                        [0.0, 1.0 / s, (0.5 - self.y0) / s - 0.5]], dtype=np.float64)
        flags = (cv2.INTER_NEAREST if order == 0 else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP

        def warp(a: np.ndarray) -> np.ndarray:
            return cv2.warpAffine(a, mat, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0)

        if work.ndim == 3 and work.shape[2] > 4:
            out = np.stack([warp(np.ascontiguousarray(work[..., c])) for c in range(work.shape[2])],
                           axis=2)
        else:
            out = warp(np.ascontiguousarray(work))
            if work.ndim == 3 and out.ndim == 2:
                out = out[..., None]
        if in_dtype == bool:
            return out > 0.5
        return out.astype(in_dtype, copy=False)


def mapping_for_circle(circle: FOVCircle, shape: tuple[int, int], size: int,
                       margin: float = CROP_MARGIN) -> GridMapping:
    """Square box centred on the FOV circle, side = diameter * (1 + 2 * margin), integer-aligned."""
    side = max(1, int(round(2.0 * circle.r * (1.0 + 2.0 * margin))))
    x0 = int(round(circle.cx - side / 2.0))
    y0 = int(round(circle.cy - side / 2.0))
    return GridMapping(x0=float(x0), y0=float(y0), side=float(side), size=int(size),
                       original_shape=(int(shape[0]), int(shape[1])))


def mapping_for_mask(fov: np.ndarray, size: int, margin: float = CROP_MARGIN) -> GridMapping:
    """Square box around the bounding box of a given FOV mask (e.g. DiaretDB1's fmask.tif)."""
    ys, xs = np.nonzero(fov)
    if len(xs) == 0:
        raise NoFundusError("the given FOV mask is empty")
    cx = (xs.min() + xs.max() + 1) / 2.0
    cy = (ys.min() + ys.max() + 1) / 2.0
    diam = float(max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()))
    return mapping_for_circle(FOVCircle(cx, cy, diam / 2.0), fov.shape, size, margin)


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedFundus:
    tensor: torch.Tensor  # (3, S, S) float32, normalised with the classifier's mean/std
    fov_model: np.ndarray  # (S, S) bool
    fov_original: np.ndarray  # (H, W) bool
    mapping: GridMapping


def stack_prepared(prepared: list[PreparedFundus], device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for the classifier and FGVis: inputs (B, 3, S, S) and model-grid FOVs (B, S, S) bool."""
    x = torch.stack([p.tensor for p in prepared])
    fov = torch.stack([torch.from_numpy(np.ascontiguousarray(p.fov_model)) for p in prepared])
    return x.to(device), fov.to(device)


def crop_fundus_uint8(rgb: np.ndarray, size: int = 512, fov: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, GridMapping]:
    """Crop + resize without normalising: ``(crop uint8 (S,S,3), fov_model, fov_original, mapping)``.

    Pixels outside the FOV are left as they are (black or padding); :func:`normalise_crop` sets
    them to exactly 0. Used by the training cache so training sees the same pixels as inference.
    """
    if fov is None:
        fov_original, circle = detect_fov_circle(rgb)
        mapping = mapping_for_circle(circle, rgb.shape[:2], size)
    else:
        fov_original = np.asarray(fov).astype(bool)
        if fov_original.shape != rgb.shape[:2]:
            raise ValueError(f"FOV mask shape {fov_original.shape} != image shape {rgb.shape[:2]}")
        mapping = mapping_for_mask(fov_original, size)
    crop = mapping.crop_from_original(rgb)
    fov_model = mapping.crop_from_original(fov_original.astype(np.float32)) > 0.5
    return crop, fov_model, fov_original, mapping


def normalise_crop(crop: np.ndarray, fov_model: np.ndarray, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (S, S, 3) -> float32 (3, S, S) normalised, exactly 0 outside the FOV."""
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (x - m) / s
    x = x * torch.from_numpy(np.ascontiguousarray(fov_model)).to(x.dtype)[None]
    return x.contiguous()


def prepare_fundus(rgb: np.ndarray, size: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   fov: np.ndarray | None = None) -> PreparedFundus:
    """Full preprocessing of one photograph for the classifier.

    Pixels outside the FOV are set to the mean colour (=> 0 after normalisation).
    Raises :class:`NoFundusError` when no fundus is found (and ``fov`` is not given).
    """
    crop, fov_model, fov_original, mapping = crop_fundus_uint8(rgb, size, fov)
    tensor = normalise_crop(crop, fov_model, mean, std)
    return PreparedFundus(tensor=tensor, fov_model=fov_model, fov_original=fov_original,
                          mapping=mapping)
