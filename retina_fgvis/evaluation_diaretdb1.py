"""DiaretDB1 evaluation of FGVis lesion regions (paper §5.2, Table 3) — the library side.

Pipeline per image: official image + FOV + binarised GT -> importance map on the original
grid (an *explainer*: by default classifier + FGVis deletion game for class "referable",
``FGVisResult.mean_mask`` mapped back with ``GridMapping.map_to_original``) -> regions
(:func:`retina_fgvis.lesions.find_regions`) -> scores (:mod:`retina_fgvis.metrics`).

Why the cache: the deletion game is the only expensive step (hundreds of forward/backward
passes per image on a CPU). Each image's importance map is stored as a compressed ``.npz``
under ``OUT/cache``, keyed by the SHA-256 of the explainer's identity (weights sha256, game,
target, defence and every FGVis setting) and of the image file's bytes, so re-scoring with
other region thresholds, overlaps or modes never re-runs the game, while a new checkpoint or
setting can never be confused with an old one.

The explainer is any callable ``(rgb, fov) -> Explanation | ndarray`` (importance on the
original grid), so the scoring is testable with a fake explainer and no model.
Nothing here prints; progress goes through an optional callback. Research use only, not a
diagnosis.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from retina_fgvis.datasets.diaretdb1 import (
    LESION_KIND, LESION_TYPES, DiaretDB1, DiaretDB1Error,
)
from retina_fgvis.report.files import atomic_write_bytes, atomic_write_text
from retina_fgvis.skipped import SkippedImage, skipped_last
from retina_fgvis.report.tables import NOTICE_LINE
from retina_fgvis.lesions import RegionSettings, find_regions, label_regions, regions_table
from retina_fgvis.metrics.enrichment import lesion_scores
from retina_fgvis.metrics.detection import (
    DEFAULT_AGGREGATION, DEFAULT_MODE, DEFAULT_OVERLAPS, OVERLAP_MODES, ImageScore,
    froc_table, image_sensitivity, lesion_level, score_image, type_agreement,
)
from retina_fgvis.metrics.image_roc import image_roc_table

__all__ = [
    "RESEARCH_ONLY", "CSV_NOTICE", "PAPER_TABLE3", "DEFAULT_FROC_THRESHOLDS", "Explanation",
    "FGVisExplainer", "ImportanceCache", "EvalSettings", "EvalResult", "SkippedImage", "evaluate_diaretdb1",
    "threshold_sweep", "suggest_threshold",
    "write_outputs", "read_csv",
]

RESEARCH_ONLY = "Research use only, not a diagnosis"
CSV_NOTICE = NOTICE_LINE  # the first line of every table the project writes
#: Paper Table 3, FGVis rows (image-level sensitivity %, DiaretDB1).
PAPER_TABLE3: dict[float, dict[str, float]] = {
    0.25: {"H": 100.0, "HE": 94.7, "SE": 90.0, "RSD": 88.4},
    0.5: {"H": 90.5, "HE": 81.6, "SE": 80.0, "RSD": 86.0},
}
#: Absolute importance levels swept for the FROC (the region rule's threshold).
DEFAULT_FROC_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CACHE_VERSION = 2  # 2: lowest-p snapshot for missed goals, pruning


# --------------------------------------------------------------------------- explainers
@dataclass
class Explanation:
    """An importance map on the ORIGINAL grid plus what the game reported."""

    importance: np.ndarray                       # (H, W) float, 0 = kept, 1 = fully removed
    info: dict[str, Any] = field(default_factory=dict)  # p_before, p_after, iterations, ...


Explainer = Callable[[np.ndarray, np.ndarray], "Explanation | np.ndarray"]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if hasattr(obj, "tolist"):  # tensors / arrays
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


class FGVisExplainer:
    """Classifier + FGVis game -> importance on the original grid (the real path).

    The image is prepared with the official DiaretDB1 FOV (so the crop and the game's FOV
    restriction follow the dataset's mask), the game is run for ``target`` (1 = referable),
    and ``mean_mask`` (channel mean of ``1 - m`` for deletion) is mapped back with bilinear
    interpolation. ``identity`` is what the cache key is made of.
    """

    def __init__(self, classifier: Any, target: int = 1, game: str = "deletion", defense: bool = True,
                 **fgvis_settings: Any):
        from retina_fgvis.fgvis.presets import fundus_fgvis  # lazy: torch only when the real path runs

        self.classifier = classifier
        self.target = int(target)
        self.game = game
        # the same game as `explain` and `screen` (goal = the classifier's threshold)
        self.fgvis = fundus_fgvis(classifier, defense=defense, **fgvis_settings)
        self.identity = {
            "weights_sha256": getattr(classifier, "sha256", None),
            "input_size": getattr(classifier, "input_size", None),
            "target": self.target,
            "game": game,
            "defense": bool(defense),
            "reference": _jsonable(getattr(self.fgvis, "reference", None)),
            "settings": _jsonable(getattr(self.fgvis, "settings", fgvis_settings)),
            "mapping": "map_to_original(order=1)",
        }

    def __call__(self, rgb: np.ndarray, fov: np.ndarray) -> Explanation:
        import torch

        try:
            prepared = self.classifier.prepare(rgb, fov=fov)
        except TypeError:  # a prepare() without the fov keyword detects the FOV itself
            prepared = self.classifier.prepare(rgb)
        device = getattr(self.classifier, "device", torch.device("cpu"))
        batch = prepared.tensor[None].to(device)
        fov_model = torch.from_numpy(np.ascontiguousarray(prepared.fov_model))[None].to(device)
        t0 = time.perf_counter()
        result = self.fgvis.attribute(batch, target=self.target, game=self.game, fov_mask=fov_model)
        seconds = time.perf_counter() - t0
        model_map = result.mean_mask[0].detach().float().cpu().numpy()
        importance = prepared.mapping.map_to_original(model_map, order=1).astype(np.float32)
        info = {
            "p_before": float(result.target_prob_before[0]),
            "p_after": float(result.target_prob_after[0]),
            "iterations": int(result.iterations[0]),
            "goal_reached": bool(result.goal_reached[0]),
            "changed_fraction": float(result.changed_fraction[0]),
            "prune_level": None if result.prune_level is None else float(result.prune_level[0]),
            "game_seconds": seconds,
        }
        return Explanation(importance=importance, info=info)


# --------------------------------------------------------------------------- atomic I/O
def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    """CSV with the research-use notice as first line (read with ``read_csv``)."""
    _write_text(path, CSV_NOTICE + "\n" + df.to_csv(index=False, float_format="%.6g"))


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV written here (skips the notice line)."""
    return pd.read_csv(path, skiprows=1)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- cache
class ImportanceCache:
    """Per-image importance maps as compressed ``.npz`` (float16; ~1e-3 resolution is far
    below any threshold step). File name ``<image>-<key[:16]>.npz``; the full key and the
    explainer identity are stored inside and checked on load."""

    def __init__(self, folder: str | Path, identity: Mapping[str, Any]):
        self.folder = Path(folder)
        self.identity = _jsonable(identity)
        self._id_json = json.dumps(self.identity, sort_keys=True)

    def key(self, image_sha256: str) -> str:
        payload = json.dumps({"v": CACHE_VERSION, "explainer": self.identity, "image": image_sha256},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, name: str, image_sha256: str) -> Path:
        return self.folder / f"{name}-{self.key(image_sha256)[:16]}.npz"

    def load(self, name: str, image_sha256: str) -> Explanation | None:
        p = self.path(name, image_sha256)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["key"]) != self.key(image_sha256):
                    return None
                imp = z["importance"].astype(np.float32)
                info = json.loads(str(z["info"]))
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed, not trusted
        return Explanation(importance=imp, info=info)

    def save(self, name: str, image_sha256: str, expl: Explanation) -> Path:
        p = self.path(name, image_sha256)
        buf = io.BytesIO()
        np.savez_compressed(buf, importance=np.asarray(expl.importance, dtype=np.float16),
                            key=np.array(self.key(image_sha256)), identity=np.array(self._id_json),
                            info=np.array(json.dumps(_jsonable(expl.info))))
        atomic_write_bytes(p, buf.getvalue())
        return p


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvalSettings:
    regions: RegionSettings = field(default_factory=RegionSettings)
    overlaps: tuple[float, ...] = DEFAULT_OVERLAPS
    modes: tuple[str, ...] = OVERLAP_MODES
    default_mode: str = DEFAULT_MODE
    aggregate: str = DEFAULT_AGGREGATION
    froc_thresholds: tuple[float, ...] = DEFAULT_FROC_THRESHOLDS
    overlays: bool = True


@dataclass
class EvalResult:
    sensitivity: pd.DataFrame
    lesion_level: pd.DataFrame
    froc: pd.DataFrame
    image_roc: pd.DataFrame
    type_agreement: pd.DataFrame
    per_image: pd.DataFrame
    regions: pd.DataFrame
    summary_md: str
    seconds_total: float
    seconds_game: float
    n_cached: int
    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)


def _as_explanation(out: Explanation | np.ndarray) -> Explanation:
    return out if isinstance(out, Explanation) else Explanation(importance=np.asarray(out, dtype=np.float32))


def evaluate_diaretdb1(dataset: DiaretDB1, explainer: Explainer | None, out_dir: str | Path,
                       identity: Mapping[str, Any] | None = None,
                       settings: EvalSettings | None = None, limit: int | None = None,
                       progress: Callable[[int, int, str], None] | None = None,
                       meta: Mapping[str, Any] | None = None,
                       on_skip: Callable[[str], None] | None = None) -> EvalResult:
    """Run (or re-use) explanations for the split, score them and write every output.

    ``identity`` keys the cache (defaults to ``explainer.identity``). ``explainer=None``
    re-scores from the cache only and fails on the first uncached image. ``progress(i, n,
    name)`` is called after each image. ``meta`` adds lines to summary.md (weights, split).
    An image whose photograph or ground truth cannot be read is skipped: ``on_skip`` gets the
    line ``skipped <path>: <reason>``, and per_image.csv (column ``skipped``) and summary.md
    list it. When every image is skipped, :class:`DiaretDB1Error` is raised and no table is written (the output folder
    and its cache folder may already exist).
    """
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if identity is None:
        identity = getattr(explainer, "identity", None)
        if identity is None:
            raise ValueError("an explainer without .identity needs an explicit cache identity")
    cache = ImportanceCache(out / "cache", identity)
    files = dataset.files[: limit] if limit else list(dataset.files)
    t_start = time.perf_counter()
    seconds_game = 0.0
    n_cached = 0
    scores: list[ImageScore] = []
    froc_scores: dict[float, list[ImageScore]] = {float(t): [] for t in settings.froc_thresholds}
    per_image_rows, region_frames = [], []
    skipped: list[SkippedImage] = []
    for i, fname in enumerate(files, start=1):
        img = dataset.load_or_skip(fname)
        if isinstance(img, SkippedImage):
            skipped.append(img)
            per_image_rows.append({"image": img.image, "skipped": img.cell()})
            if on_skip is not None:
                on_skip(img.line())
            if progress is not None:
                progress(i, len(files), img.image)
            continue
        image_sha = _sha256_file(img.path)
        expl = cache.load(img.name, image_sha)
        cached = expl is not None
        if expl is None:
            if explainer is None:
                raise FileNotFoundError(f"{cache.path(img.name, image_sha)}: no cached importance map "
                                        f"(run with a classifier to compute it)")
            t0 = time.perf_counter()
            expl = _as_explanation(explainer(img.rgb, img.fov))
            expl.info.setdefault("game_seconds", time.perf_counter() - t0)
            seconds_game += float(expl.info["game_seconds"])
            cache.save(img.name, image_sha, expl)
        else:
            n_cached += 1
        imp = np.asarray(expl.importance, dtype=np.float32)
        if imp.shape != img.fov.shape:
            raise ValueError(f"{img.path}: importance map {imp.shape} does not match the image {img.fov.shape}")

        labels, regions = find_regions(imp, img.fov, img.rgb, settings.regions)
        kinds = {r.id: r.kind for r in regions}
        score = score_image(img.gt, labels, img.name, aggregate=settings.aggregate, fov=img.fov,
                            region_kinds=kinds)
        scores.append(score)
        for thr in froc_scores:
            if thr == settings.regions.threshold:
                froc_scores[thr].append(score)
                continue
            lab_t, _ = label_regions(imp, img.fov, settings.regions.replace(threshold=thr))
            froc_scores[thr].append(score_image(img.gt, lab_t, img.name, aggregate=settings.aggregate,
                                                fov=img.fov))

        n_fov = max(int(img.fov.sum()), 1)
        gt_any = np.logical_or.reduce([img.gt[t] for t in LESION_TYPES])
        agreement = lesion_scores(imp, gt_any, img.fov)
        red_ids = [r.id for r in regions if r.kind == "red"]
        bright_ids = [r.id for r in regions if r.kind == "bright"]
        row = {"image": img.name, "skipped": "", "cached": cached,
               **{k: expl.info.get(k) for k in ("p_before", "p_after", "iterations", "goal_reached",
                                                "changed_fraction", "prune_level", "game_seconds")},
               "n_regions": score.n_regions, "fp_regions": score.fp_regions,
               "flagged_fraction": score.flagged_fraction,
               "enrichment": agreement["enrichment"], "precision_top1": agreement["precision_top1"],
               "precision_top0.5": agreement["precision_top0.5"],
               "red_fraction": float(np.isin(labels, red_ids).sum() / n_fov) if red_ids else 0.0,
               "bright_fraction": float(np.isin(labels, bright_ids).sum() / n_fov) if bright_ids else 0.0}
        les = score.lesions
        for lesion in LESION_TYPES:
            row[f"has_{lesion}"] = score.present.get(lesion, False)
            sub = les[les["lesion"] == lesion] if len(les) else les
            # best overlap of any GT region of this type (NaN when the type is absent)
            row[f"{lesion}_best_{settings.default_mode}"] = (float(sub[settings.default_mode].max())
                                                            if len(sub) else float("nan"))
        per_image_rows.append(row)
        rt = regions_table(regions)
        rt.insert(0, "image", img.name)
        rt["gt_types"] = [",".join(score.region_types.get(r.id, ())) for r in regions]
        region_frames.append(rt)

        if settings.overlays:
            from retina_fgvis.report.overlay import draw_overlay

            _write_png(out / "overlays" / f"{img.name}.png",
                       draw_overlay(img.rgb, labels, img.gt, regions=regions))
        if progress is not None:
            progress(i, len(files), img.name)

    if not scores:
        raise DiaretDB1Error(dataset.image_dir, f"no usable images: all {len(files)} image(s) of split "
                                                f"{dataset.split!r} were skipped (each reported above)")
    seconds_total = time.perf_counter() - t_start
    sens = image_sensitivity(scores, settings.overlaps, settings.modes, LESION_TYPES)
    ll = lesion_level(scores, settings.overlaps, settings.modes, LESION_TYPES)
    froc = froc_table(froc_scores, settings.overlaps, settings.modes, LESION_TYPES)
    per_image = pd.DataFrame(per_image_rows)
    per_image = skipped_last(per_image)
    scored = per_image[per_image.skipped == ""].reset_index(drop=True)  # the ROC is over scored images only
    labels_df = pd.DataFrame({t: scored[f"has_{t}"].astype(bool) for t in LESION_TYPES})
    roc_plain = image_roc_table({t: scored["flagged_fraction"].to_numpy(dtype=float) for t in LESION_TYPES},
                                labels_df, score_name="flagged_fraction")
    typed = {t: scored[f"{LESION_KIND[t]}_fraction"].to_numpy(dtype=float) for t in LESION_TYPES}
    roc_typed = image_roc_table(typed, labels_df, score_name="typed_fraction")
    roc = pd.concat([roc_plain, roc_typed], ignore_index=True)
    agree = type_agreement(scores, LESION_KIND)
    regions_df = pd.concat(region_frames, ignore_index=True) if region_frames else pd.DataFrame()

    result = EvalResult(sensitivity=sens, lesion_level=ll, froc=froc, image_roc=roc,
                        type_agreement=agree, per_image=per_image, regions=regions_df, summary_md="",
                        seconds_total=seconds_total, seconds_game=seconds_game, n_cached=n_cached,
                        skipped=skipped)
    result.summary_md = summary_markdown(result, settings, split=dataset.split, n_images=len(scores),
                                         identity=identity, meta=meta)
    result.files = write_outputs(result, out, settings)
    return result


# --------------------------------------------------------------------------- outputs
def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def threshold_sweep(froc: pd.DataFrame, mode: str = DEFAULT_MODE) -> pd.DataFrame:
    """One row per region threshold: mean image-level sensitivity over the lesion types
    present (per overlap), lesion-level hit fraction of all GT regions, FP regions / image.
    Columns: threshold, img_sens_<pct> ..., hit_<pct> ..., fp_per_image, score (mean of the
    img_sens columns: what :func:`suggest_threshold` maximises)."""
    rows = []
    for thr in sorted(froc.threshold.unique()):
        sub = froc[(froc.threshold == thr) & (froc["mode"] == mode)]
        row: dict[str, float] = {"threshold": float(thr)}
        sens_cols = []
        for ov in sorted(sub.overlap.unique()):
            per = sub[(sub.overlap == ov) & (sub.lesion != "all")]
            col = f"img_sens_{100 * ov:g}"
            row[col] = float(np.nanmean(per.image_sensitivity)) if per.image_sensitivity.notna().any() else float("nan")
            sens_cols.append(col)
            alln = sub[(sub.overlap == ov) & (sub.lesion == "all")]
            row[f"hit_{100 * ov:g}"] = float(alln.sensitivity.iloc[0]) if len(alln) else float("nan")
        row["fp_per_image"] = float(sub.fp_per_image.iloc[0]) if len(sub) else float("nan")
        vals = [row[c] for c in sens_cols if not np.isnan(row[c])]
        row["score"] = float(np.mean(vals)) if vals else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def suggest_threshold(froc: pd.DataFrame, mode: str = DEFAULT_MODE, tolerance: float = 0.01) -> float:
    """The documented tuning rule (apply on the TRAINING split only): among the swept
    thresholds, the highest one whose mean image-level sensitivity (over the lesion types
    and both overlaps, ``mode``) is within ``tolerance`` of the best. Higher thresholds
    flag fewer pixels, so among equally sensitive settings this picks the one with the
    fewest false positives. NaN when nothing was swept."""
    sweep = threshold_sweep(froc, mode)
    if not len(sweep) or sweep.score.isna().all():
        return float("nan")
    best = float(sweep.score.max())
    return float(sweep[sweep.score >= best - tolerance - 1e-12].threshold.max())


def summary_markdown(res: EvalResult, settings: EvalSettings, split: str, n_images: int,
                     identity: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> str:
    """summary.md: Table-3-shaped sensitivities beside the paper, FP/image, lesion level,
    image ROC, type-guess agreement, run time."""
    s = res.sensitivity
    ll = res.lesion_level
    fp_pi = float(ll["fp_per_image"].iloc[0]) if len(ll) else float("nan")
    n_regions = int(ll["n_regions"].iloc[0]) if len(ll) else 0
    lines = [
        "# DiaretDB1 lesion detection from FGVis deletion masks (paper Table 3)",
        "",
        f"**{RESEARCH_ONLY}.** Image-level sensitivity of lesion regions derived from the "
        "explanation of a referable-DR classifier; the classifier never saw a lesion label.",
        "",
        f"- split: `{split}` ({n_images} image{'s' if n_images != 1 else ''}"
        + (f"; {len(res.skipped)} more skipped as unusable, listed under \"Skipped images\")"
           if res.skipped else ")"),
    ]
    for k, v in (meta or {}).items():
        lines.append(f"- {k}: {v}")
    if identity:
        ident = dict(identity)
        sha = ident.get("weights_sha256")
        if sha:
            lines.append(f"- weights sha256: `{sha}`")
        lines.append(f"- explainer: game `{ident.get('game')}`, target {ident.get('target')}, "
                     f"defence {ident.get('defense')}")
    r = settings.regions
    scaled = "" if r.reference_fov_diameter is None else (
        f" (sizes at a {r.reference_fov_diameter:g}-px FOV diameter, scaled to each image)")
    lines += [
        f"- region rule: importance >= {r.threshold:g} and within the top {100 * r.max_fov_fraction:g} % "
        f"of FOV pixels and of final region area; closing radius {r.closing_radius} px; min area {r.min_area} px"
        f"{scaled}; "
        f"{'8' if r.connectivity == 2 else '4'}-connected",
        f"- overlap: GT connected component vs the {settings.aggregate} of touching proposals; default "
        f"mode **{settings.default_mode}** (all modes below)",
        "",
        "## Image-level sensitivity (%), Table 3 layout",
        "",
        "| method | overlap | mode | H | HE | SE | RSD | FP regions / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ov in settings.overlaps:
        paper = PAPER_TABLE3.get(round(float(ov), 4))
        if paper:
            lines.append(f"| paper FGVis | {100 * ov:g} % | – | " +
                         " | ".join(f"{paper[t]:.1f}" for t in LESION_TYPES) + " | – |")
        modes = [settings.default_mode] + [m for m in settings.modes if m != settings.default_mode]
        for mode in modes:
            cells = []
            for t in LESION_TYPES:
                row = s[(s.lesion == t) & (s.overlap == float(ov)) & (s["mode"] == mode)]
                if len(row):
                    rr = row.iloc[0]
                    cells.append(f"{_pct(rr.sensitivity)} ({int(rr.detected)}/{int(rr.n_images)})")
                else:
                    cells.append("–")
            name = "ours" + (" (default)" if mode == settings.default_mode else "")
            lines.append(f"| {name} | {100 * ov:g} % | {mode} | " + " | ".join(cells) + f" | {fp_pi:.2f} |")
    lines += ["", f"False-positive regions (touching no GT lesion of any type): {fp_pi:.2f} per image "
              f"({n_regions} regions in all).", "",
              f"## Lesion level ({settings.default_mode})", "",
              "| lesion | GT regions | touched % | hit % @25 | hit % @50 |", "|---|---|---|---|---|"]
    for lesion in [*LESION_TYPES, "all"]:
        sub = ll[(ll.lesion == lesion) & (ll["mode"] == settings.default_mode)]
        if not len(sub):
            continue
        hit = {float(o): sub[sub.overlap == float(o)].hit_fraction.iloc[0] for o in sub.overlap}
        lines.append(f"| {lesion} | {int(sub.n_lesions.iloc[0])} | {_pct(sub.touched_fraction.iloc[0])} | "
                     f"{_pct(hit.get(0.25, float('nan')))} | {_pct(hit.get(0.5, float('nan')))} |")
    lines += ["", "## Official DiaretDB1 image-based protocol (ROC over images, EER)", "",
              "| lesion | score | pos/neg | AUC | EER % | sens = spec at EER % |", "|---|---|---|---|---|---|"]
    for _, rr in res.image_roc.iterrows():
        auc_s = "–" if np.isnan(rr.auc) else f"{rr.auc:.3f}"
        lines.append(f"| {rr.lesion} | {rr.score} | {int(rr.n_positive)}/{int(rr.n_negative)} | {auc_s} | "
                     f"{_pct(rr.eer)} | {_pct(rr.sensitivity_at_eer)} |")
    lines += ["", "`flagged_fraction`: share of FOV pixels in any region; `typed_fraction`: only regions "
              "whose colour guess matches the type's family (red for H/RSD, bright for HE/SE).", "",
              "## Type guess (red / bright from colour) vs GT type touched", "",
              "| GT family | regions | agree | agreement % |", "|---|---|---|---|"]
    for _, rr in res.type_agreement.iterrows():
        lines.append(f"| {rr.kind} | {int(rr.n_regions)} | {int(rr.agree)} | {_pct(rr.agreement)} |")
    amb = int(res.type_agreement.n_ambiguous.iloc[0]) if len(res.type_agreement) else 0
    lines += ["", f"{amb} regions touch both red and bright GT and are left out.", ""]
    sweep = threshold_sweep(res.froc, settings.default_mode)
    if len(sweep):
        ov_cols = [c for c in sweep.columns if c.startswith("img_sens_")]
        hit_cols = [c for c in sweep.columns if c.startswith("hit_")]
        lines += [f"## Threshold sweep ({settings.default_mode}; FROC points, froc.csv / froc.png)", "",
                  "| threshold | " + " | ".join(f"mean image sens. % @{c[9:]}" for c in ov_cols) + " | " +
                  " | ".join(f"GT regions hit % @{c[4:]}" for c in hit_cols) + " | FP regions / image |",
                  "|---" * (2 + len(ov_cols) + len(hit_cols)) + "|"]
        for _, rr in sweep.iterrows():
            lines.append(f"| {rr.threshold:g} | " + " | ".join(_pct(rr[c]) for c in ov_cols) + " | " +
                         " | ".join(_pct(rr[c]) for c in hit_cols) + f" | {rr.fp_per_image:.2f} |")
        sugg = suggest_threshold(res.froc, settings.default_mode)
        note = ("" if split == "train" else
                " — informative only: thresholds are tuned on the training split, never on this one")
        lines += ["", f"Tuning rule (training split only): highest threshold within 1 point of the best mean "
                      f"image-level sensitivity -> **{sugg:g}**{note}.", ""]
    lines += ["## Run time", "",
              f"- total {res.seconds_total:.1f} s for {n_images} image{'s' if n_images != 1 else ''}; FGVis games {res.seconds_game:.1f} s "
              f"({n_images - res.n_cached} run, {res.n_cached} from cache)",
              "", *_skipped_section(res.skipped),
              "Files: sensitivity.csv, lesion_level.csv, froc.csv (+ froc.png), image_roc.csv, "
              "per_image.csv, regions.csv, overlays/*.png (proposals filled: green = red guess, magenta = "
              "bright guess; GT outlines: H blue, HE yellow, SE white, RSD cyan).", "",
              f"*{RESEARCH_ONLY}.*", ""]
    return "\n".join(lines)


def _skipped_section(skipped: Sequence[SkippedImage]) -> list[str]:
    """summary.md lines naming each skipped image and why (none when nothing was skipped): the
    numbers above leave these images out."""
    if not skipped:
        return []
    return ["## Skipped images", "",
            (f"{len(skipped)} image(s) could not be used and are left out of every number above "
             "(per_image.csv lists them in its `skipped` column):"), "",
            *[f"- {s.image}: `{s.file}`: {s.reason}" for s in skipped], ""]


def froc_figure_png(froc: pd.DataFrame, mode: str, overlaps: Sequence[float]) -> bytes:
    """FROC plot (lesion-level hit fraction vs FP regions per image) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot(111)
    colours = {"all": "black", "H": "tab:blue", "HE": "tab:olive", "SE": "tab:gray", "RSD": "tab:cyan"}
    styles = ["-", "--", ":", "-."]
    for k, ov in enumerate(overlaps):
        for lesion, col in colours.items():
            sub = froc[(froc.lesion == lesion) & (froc["mode"] == mode) & (froc.overlap == float(ov))]
            sub = sub.sort_values("fp_per_image")
            if not len(sub) or sub.n_lesions.iloc[0] == 0:
                continue
            ax.plot(sub.fp_per_image, sub.sensitivity, styles[k % 4], color=col, marker="o", ms=3,
                    label=f"{lesion} @{100 * ov:g}%", lw=2 if lesion == "all" else 1)
            if lesion == "all" and k == 0:
                for _, rr in sub.iterrows():
                    ax.annotate(f"{rr.threshold:g}", (rr.fp_per_image, rr.sensitivity), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("false-positive regions per image")
    ax.set_ylabel(f"GT regions hit ({mode})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"FROC over the importance threshold — {RESEARCH_ONLY}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_outputs(res: EvalResult, out: Path, settings: EvalSettings) -> list[Path]:
    """Write every table, the summary and the FROC plot atomically; returns the paths."""
    out = Path(out)
    written = []
    for name, df in (("sensitivity.csv", res.sensitivity), ("lesion_level.csv", res.lesion_level),
                     ("froc.csv", res.froc), ("image_roc.csv", res.image_roc),
                     ("type_agreement.csv", res.type_agreement), ("per_image.csv", res.per_image),
                     ("regions.csv", res.regions)):
        _write_csv(out / name, df)
        written.append(out / name)
    atomic_write_bytes(out / "froc.png", froc_figure_png(res.froc, settings.default_mode, settings.overlaps))
    written.append(out / "froc.png")
    _write_text(out / "summary.md", res.summary_md)
    written.append(out / "summary.md")
    return written
