"""Lesion regions from an FGVis importance map (paper §5.2, Fig. 2 f, Fig. A21).

The deletion game learns a mask ``m`` that removes the evidence for "referable DR"; the
importance map is the channel mean of ``1 - m`` (``FGVisResult.mean_mask``): 0 = kept,
1 = fully removed. Mapped back to the original image grid, the removed pixels are the
weakly-supervised lesion detections. This module turns that map into regions:

1. **FOV restriction** – importance outside the field of view is set to 0 (the classifier
   never saw meaningful pixels there; the ground truth is FOV-restricted too).
2. **Threshold** (the documented rule) – a pixel is *flagged* when

       importance >= settings.threshold                       (absolute level)
       and importance >= quantile_FOV(importance, 1 - settings.max_fov_fraction)   (area cap)

   *Why the absolute level:* the mask lives in [0, 1] and 0.5 is the point where a pixel is
   more removed than kept; the engine's ``changed_fraction`` uses the same 0.5. The level
   is the FROC parameter and is tuned only on the DiaretDB1 training split.
   *Why the area cap:* image-level sensitivity can be won by flagging the whole retina. The
   cap bounds the flagged share of the FOV (default 5 %, far above the lesion share of a
   typical DiaretDB1 image) so a diffuse or saturated mask cannot buy sensitivity with area.
   When the cap binds, only the most-removed pixels are kept. Closing (step 3) adds area, so
   the cap is applied once more to the final regions: regions are taken in order of mean
   importance, and one that does not fit in what is left of the budget is skipped (a smaller,
   less important one after it may still fit). Set it to 1.0 to disable.
3. **Closing** – a small disk closing (radius in original pixels) joins the speckled,
   fine-grained removed pixels of one lesion into one region; the map is upsampled from the
   model grid (about 3 original pixels per model pixel at 512 px), so radius 2 bridges
   one-model-pixel gaps without merging separate lesions.
4. **Connected components** (8-connectivity, scikit-image) and a **minimum area** that drops
   specks of a single model pixel (about 9 original pixels at 1500x1152 / 512 px).
5. Per region: id, bbox, area, centroid, mean importance, mean colour of the *removed*
   (flagged) pixels and a colour-based type guess.

Type guess (our addition, not in the paper): red lesions (haemorrhages, microaneurysms)
are darker than the surrounding retina in the green channel, where fundus contrast is
highest; bright lesions (hard exudates, cotton-wool spots) are brighter. The local
background is the median of non-flagged FOV pixels in a margin around the region's bbox
(a median ignores vessels and other lesions in the margin). ``kind = "bright"`` when the
relative green contrast ``(G_region - G_bg) / G_bg`` is positive, else ``"red"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.measure import label as cc_label

__all__ = ["RegionSettings", "LesionRegion", "flag_pixels", "label_regions", "find_regions",
           "regions_table"]


@dataclass(frozen=True)
class RegionSettings:
    """How an importance map becomes regions; see the module docstring for the rule."""

    # defaults: evaluation/diaretdb1/region-sweep-train.md (DiaretDB1 training split only)
    threshold: float = 0.02         # absolute importance level (mask in [0, 1])
    max_fov_fraction: float = 0.05  # at most this share of FOV pixels flagged (1.0 = no cap)
    closing_radius: int = 2         # disk radius, px at the reference FOV (0 = no closing)
    min_area: int = 150             # smaller regions are dropped (px at the reference FOV)
    connectivity: int = 2           # 2 = 8-connected, 1 = 4-connected
    background_margin: int = 15     # min margin (px) around a bbox for the local background
    # closing_radius and min_area are given for a field of view of this equivalent diameter
    # (DiaretDB1's, 1339 px at 1500x1152) and scaled to each image's FOV; None = absolute pixels
    reference_fov_diameter: float | None = 1339.0

    def __post_init__(self) -> None:
        # importance = 1 - mask lies in [0, 1]: a level <= 0 flags the whole FOV, one > 1 nothing
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.max_fov_fraction <= 1.0:
            raise ValueError("max_fov_fraction must be in (0, 1]")
        if self.closing_radius < 0 or self.min_area < 1 or self.background_margin < 1:
            raise ValueError("closing_radius >= 0, min_area >= 1 and background_margin >= 1 required")
        if self.connectivity not in (1, 2):
            raise ValueError("connectivity must be 1 or 2")
        if self.reference_fov_diameter is not None and not self.reference_fov_diameter > 0:
            raise ValueError("reference_fov_diameter must be > 0 (or None for absolute pixels)")

    def scaled_to(self, fov: np.ndarray) -> tuple[int, int]:
        """(closing radius, min area) in this image's pixels.

        Why: the rule is tuned on DiaretDB1 photographs; a 512-px screening photo shows the same
        lesion ~2.6x smaller, so pixel sizes follow the FOV's equivalent diameter.
        """
        if self.reference_fov_diameter is None:
            return self.closing_radius, self.min_area
        scale = 2.0 * math.sqrt(float(np.count_nonzero(fov)) / math.pi) / self.reference_fov_diameter
        radius = max(1, round(self.closing_radius * scale)) if self.closing_radius > 0 else 0
        return radius, max(1, round(self.min_area * scale * scale))

    def replace(self, **changes) -> "RegionSettings":
        from dataclasses import replace
        return replace(self, **changes)


@dataclass
class LesionRegion:
    """One proposed lesion on the original pixel grid."""

    id: int                                   # label value in the label image (1..N)
    bbox: tuple[int, int, int, int]           # (row0, col0, row1, col1), end-exclusive
    area: int                                 # pixels in the region (after closing)
    centroid: tuple[float, float]             # (row, col)
    mean_importance: float                    # over the region's pixels
    mean_rgb: tuple[float, float, float]      # mean colour of the flagged (removed) pixels
    kind: str                                 # "red" | "bright" (colour-based guess)
    contrast: float = 0.0                     # relative green contrast vs local background
    background_rgb: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))


def _check_inputs(importance: np.ndarray, fov: np.ndarray, rgb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    importance = np.asarray(importance)
    if importance.ndim != 2:
        raise ValueError(f"importance must be (H, W), got shape {importance.shape}")
    fov = np.asarray(fov).astype(bool)
    if fov.shape != importance.shape:
        raise ValueError(f"fov shape {fov.shape} != importance shape {importance.shape}")
    if rgb is not None and (rgb.ndim != 3 or rgb.shape[:2] != importance.shape or rgb.shape[2] < 3):
        raise ValueError(f"rgb must be (H, W, 3) matching importance {importance.shape}, got {rgb.shape}")
    imp = np.where(fov, np.nan_to_num(importance.astype(np.float32), nan=0.0), 0.0).astype(np.float32)
    return imp, fov


def flag_pixels(importance: np.ndarray, fov: np.ndarray,
                settings: RegionSettings = RegionSettings()) -> np.ndarray:
    """Step 1-2 of the rule: FOV restriction + absolute threshold + FOV area cap -> bool mask."""
    imp, fov = _check_inputs(importance, fov, None)
    flagged = fov & (imp >= settings.threshold)
    if settings.max_fov_fraction < 1.0 and fov.any():
        n_fov = int(fov.sum())
        budget = int(math.floor(settings.max_fov_fraction * n_fov))
        if int(flagged.sum()) > budget:
            if budget <= 0:
                return np.zeros_like(flagged)
            # The budget-th largest FOV value; ties at the cut are kept together (they are
            # indistinguishable), which can exceed the budget only by the tie size.
            vals = imp[fov]
            cut = np.partition(vals, n_fov - budget)[n_fov - budget]
            flagged &= imp >= cut
    return flagged


def _local_background(rgb: np.ndarray, free: np.ndarray, bbox: tuple[int, int, int, int],
                      margin: int) -> np.ndarray | None:
    r0, c0, r1, c1 = bbox
    h, w = free.shape
    rr0, cc0, rr1, cc1 = max(0, r0 - margin), max(0, c0 - margin), min(h, r1 + margin), min(w, c1 + margin)
    sel = free[rr0:rr1, cc0:cc1]
    if int(sel.sum()) < 10:
        return None
    return np.median(rgb[rr0:rr1, cc0:cc1][sel].astype(np.float32), axis=0)


def label_regions(importance: np.ndarray, fov: np.ndarray,
                  settings: RegionSettings = RegionSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4 only (no per-region description): ``(labels int32, flagged bool)``.

    Same labels as :func:`find_regions`; cheap enough to sweep thresholds for an FROC.
    """
    imp, fov = _check_inputs(importance, fov, None)
    flagged = flag_pixels(imp, fov, settings)
    closing_radius, min_area = settings.scaled_to(fov)
    closed = flagged
    if closing_radius > 0 and flagged.any():
        # OpenCV's closing treats the image border neutrally (no erosion from outside).
        kernel = morphology.disk(closing_radius).astype(np.uint8)
        closed = cv2.morphologyEx(flagged.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool) & fov
    raw = cc_label(closed, connectivity=settings.connectivity)
    n = int(raw.max())
    if n == 0:
        return np.zeros(imp.shape, dtype=np.int32), flagged
    areas = np.bincount(raw.ravel(), minlength=n + 1)
    sums = np.bincount(raw.ravel(), weights=imp.ravel().astype(np.float64), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_area]
    keep.sort(key=lambda i: (-sums[i] / areas[i], i))
    if settings.max_fov_fraction < 1.0:
        # the area cap again, on the final regions: closing adds area, and a large closing
        # radius must not buy sensitivity with it. Most important regions first; a region
        # that does not fit in what is left of the budget is dropped.
        budget, used, capped = math.floor(settings.max_fov_fraction * int(fov.sum())), 0, []
        for i in keep:
            if used + int(areas[i]) <= budget:
                capped.append(i)
                used += int(areas[i])
        keep = capped
    remap = np.zeros(n + 1, dtype=np.int32)
    for new_id, old in enumerate(keep, start=1):
        remap[old] = new_id
    return remap[raw], flagged


def find_regions(importance: np.ndarray, fov: np.ndarray, rgb: np.ndarray,
                 settings: RegionSettings = RegionSettings()) -> tuple[np.ndarray, list[LesionRegion]]:
    """Regions of an importance map on the ORIGINAL grid.

    Returns ``(labels, regions)``: ``labels`` is an int32 image (0 = background, region
    ``i`` has value ``regions[i-1].id == i``), regions are ordered by decreasing mean
    importance so that id 1 is the most confidently removed region.
    """
    imp, fov = _check_inputs(importance, fov, rgb)
    labels, flagged = label_regions(imp, fov, settings)
    if labels.max() == 0:
        return labels, []

    rgb3 = np.asarray(rgb)[..., :3]
    free = fov & (labels == 0) & ~flagged   # background candidates: in FOV, not proposed
    fov_bg = np.median(rgb3[free].astype(np.float32), axis=0) if free.any() else np.full(3, 128.0, np.float32)
    regions: list[LesionRegion] = []
    slices = ndimage.find_objects(labels)
    for rid, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        rs, cs = sl
        local = labels[sl] == rid
        rows, cols = np.nonzero(local)
        area = int(rows.size)
        bbox = (int(rs.start), int(cs.start), int(rs.stop), int(cs.stop))
        centroid = (float(rows.mean() + rs.start), float(cols.mean() + cs.start))
        mean_imp = float(imp[sl][local].mean())
        removed = local & flagged[sl]
        pix = rgb3[sl][removed if removed.any() else local].astype(np.float64)
        mean_rgb = tuple(float(v) for v in pix.mean(axis=0))
        h, w = rs.stop - rs.start, cs.stop - cs.start
        margin = max(settings.background_margin, (max(h, w) + 1) // 2)
        bg = _local_background(rgb3, free, bbox, margin)
        if bg is None:
            bg = fov_bg
        contrast = float((mean_rgb[1] - bg[1]) / max(float(bg[1]), 1.0))
        kind = "bright" if contrast > 0 else "red"
        regions.append(LesionRegion(id=rid, bbox=bbox, area=area, centroid=centroid,
                                    mean_importance=mean_imp, mean_rgb=mean_rgb, kind=kind,
                                    contrast=contrast,
                                    background_rgb=tuple(float(v) for v in bg)))
    return labels, regions


def regions_table(regions: list[LesionRegion]):
    """Regions as a pandas DataFrame (one row per region), for CSVs and reports."""
    import pandas as pd

    cols = ["id", "row0", "col0", "row1", "col1", "area", "centroid_row", "centroid_col",
            "mean_importance", "mean_r", "mean_g", "mean_b", "kind", "contrast"]
    rows = [[r.id, *r.bbox, r.area, *r.centroid, r.mean_importance, *r.mean_rgb, r.kind, r.contrast]
            for r in regions]
    return pd.DataFrame(rows, columns=cols)
