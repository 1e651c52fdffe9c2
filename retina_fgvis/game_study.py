"""Study of the defended deletion game on DiaretDB1 (issue: "it must converge, and its removals
must land on lesions").

For each candidate setting, with and without the Eq. 6 defence, every image of a split is
explained and scored with threshold-free numbers:

* goal reached (p(referable) at or below the classifier's threshold) and p before / after;
* changed-pixel fraction (mask < 0.5 in any channel) and removed mass (mean 1 - m);
* **lesion enrichment** = (share of the removed mass inside GT lesions) / (GT share of the
  FOV): 1 = chance, 16 = the removal is 16× denser on lesions than elsewhere;
* precision of the top 0.5 % / 1 % most-removed FOV pixels against GT (any type, >= 0.75);
* enrichment at every check of the optimisation (for the enrichment-vs-iterations plot);
* iterations and seconds per image.

Only the training split may be used to choose settings (the test split is the benchmark).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import pandas as pd
import torch

from retina_fgvis.skipped import SkippedImage, skipped_last
from retina_fgvis.fgvis.presets import background_reference, fundus_fgvis
from retina_fgvis.fundus.preprocess import stack_prepared
from retina_fgvis.metrics.enrichment import lesion_scores

#: Candidate settings (name -> FGVis overrides); "sgdn-logodds-lr0.3" is the engine default.
CANDIDATES: dict[str, dict[str, Any]] = {
    # normalised-gradient steps: a pixel moves in proportion to its share of the evidence
    "sgdn-logodds-lr0.1": dict(optimizer="sgd_normalized", lr=0.1, similarity="log_odds"),
    "sgdn-logodds-lr0.3": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds"),
    # further candidates, not in the recorded run (CPU budget): pass --setting NAME
    # warm start without sparsity, then λ adapted
    "sgdn-logodds-lr0.1-warmup30": dict(optimizer="sgd_normalized", lr=0.1, similarity="log_odds",
                                        warmup_iterations=30),
    # the probe of FINDINGS.md: Adam on the softmax score
    "adam-prob-lr0.05": dict(optimizer="adam", lr=0.05, similarity="prob"),
    "sgdn-logodds-goal-reference": dict(optimizer="sgd_normalized", lr=0.1, similarity="log_odds", goal="reference"),
    "adam-logodds-lr0.05": dict(optimizer="adam", lr=0.05, similarity="log_odds"),
    # λ in units of each image's evidence gradient (99th percentile): a sparse mask, no haze
    "sgdn-logodds-lr0.3-lamq99": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds",
                                      lambda_calibration_quantile=0.99),
    # removed pixels become the median-blurred photo (local background) instead of the mean colour
    "sgdn-logodds-lr0.3-blurref": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds",
                                       reference="background"),
    # the engine default before pruning: the optimised mask as it is, haze included
    "sgdn-logodds-lr0.3-noprune": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds", prune_levels=()),
    # snapshot candidates: only checks (the earlier default) / every iteration for both snapshots
    "sgdn-logodds-lr0.3-checks": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds", snapshots="checks"),
    "sgdn-logodds-lr0.3-every-iteration": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds",
                                               snapshots="every_iteration"),
    # take back steps that made the objective worse, halve the step (measured: stalls, see README)
    # a missed game stops at the 4th check without a nearer-to-goal iterate (the default runs its budget)
    "sgdn-logodds-lr0.3-giveup3": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds",
                                       give_up_patience=3),
    "sgdn-logodds-lr0.3-backtrack": dict(optimizer="sgd_normalized", lr=0.3, similarity="log_odds",
                                         step_control="backtrack"),
}
RECORDED = ["sgdn-logodds-lr0.3", "sgdn-logodds-lr0.1", "adam-prob-lr0.05"]  # first = engine default
#: a per-image row's key: a re-run of the same key replaces the row, other rows of OUT stay
KEY = ["setting", "defense", "image"]
#: what made a row besides its key; rows that differ here are never merged into one table
PROVENANCE = ["split", "weights_sha256", "max_iterations"]


@dataclass
class StudyImage:
    name: str
    rgb: np.ndarray
    fov: np.ndarray
    gt_any: np.ndarray
    path: Path | None = None


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prepare_batch(
    classifier: Any, batch: list[StudyImage], device: Any = "cpu"
) -> tuple[list, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(prepared items, model inputs x, model-grid FOV masks, model-grid GT) of study images;
    shared by the study and its probes (evaluation/game-study/probes/)."""
    prepared = [classifier.prepare(im.rgb, fov=im.fov) for im in batch]
    x, fov = stack_prepared(prepared, device)
    gt_model = [p.mapping.crop_from_original(im.gt_any.astype(np.uint8), cv2.INTER_NEAREST) > 0
                for p, im in zip(prepared, batch)]
    return prepared, x, fov, gt_model


def diaretdb1_seed_cache(classifier: Any, overrides: dict[str, Any], folder: Path) -> Any | None:
    """The `evaluate diaretdb1` cache under ``folder`` if ``overrides`` describe exactly the game that
    command runs (same settings, same reference), else None: a different game must not seed it."""
    from retina_fgvis.evaluation_diaretdb1 import FGVisExplainer, ImportanceCache

    overrides = dict(overrides)
    if overrides.pop("reference", None) is not None:
        return None
    explainer = FGVisExplainer(classifier)
    if fundus_fgvis(classifier, **overrides).settings != explainer.fgvis.settings:
        return None
    return ImportanceCache(folder / "cache", explainer.identity)


def run_setting(
    classifier: Any,
    images: list[StudyImage],
    name: str,
    overrides: dict[str, Any],
    defense: bool,
    batch_size: int = 4,
    log: Callable[[str], None] = print,
    seed_cache: Any | None = None,
    on_batch: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Explain every image with one setting; return (per-image rows, per-check curve rows).

    ``seed_cache`` (an ``evaluation_diaretdb1.ImportanceCache`` whose identity is this very
    game) receives each importance map, so that `evaluate diaretdb1` does not re-run it.
    ``on_batch(rows, curve_rows)`` gets each batch's rows as soon as its game is done: a setting
    runs for half an hour on a CPU, and an interrupted run keeps every finished batch.
    """
    overrides = dict(overrides)
    reference_kind = overrides.pop("reference", None)
    fgvis = fundus_fgvis(classifier, defense=defense, **overrides)
    device = classifier.device
    rows: list[dict] = []
    curve: list[dict] = []
    for batch in _batches(images, batch_size):
        done_rows, done_curve = len(rows), len(curve)
        prepared, x, fov, gt_model = prepare_batch(classifier, batch, device)

        def snapshot(t: int, idx: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor) -> None:
            for j, i in enumerate(idx.tolist()):
                imp = (1 - masks[j]).mean(0).numpy()
                sc = lesion_scores(imp, gt_model[i], prepared[i].fov_model)
                curve.append({"setting": name, "defense": defense, "image": batch[i].name, "iteration": t,
                              "p": float(probs[j]), "enrichment": sc["enrichment"]})

        reference = None
        if reference_kind == "background":
            reference = torch.stack([background_reference(p, classifier.mean, classifier.std) for p in prepared]).to(device)
        start = time.perf_counter()
        result = fgvis.attribute(x, target=1, game="deletion", fov_mask=fov, snapshot=snapshot, reference=reference)
        seconds = (time.perf_counter() - start) / len(batch)
        for i, (im, p) in enumerate(zip(batch, prepared)):
            importance = p.mapping.map_to_original(result.mean_mask[i].numpy(), order=1)
            sc = lesion_scores(importance, im.gt_any, im.fov)
            row = {"setting": name, "defense": defense, "image": im.name,
                   "p_before": float(result.target_prob_before[i]), "p_after": float(result.target_prob_after[i]),
                   "goal_prob": float(result.goal_prob[i]),
                   "referable": float(result.target_prob_before[i]) >= classifier.threshold,
                   "goal_reached": bool(result.goal_reached[i]), "iterations": int(result.iterations[i]),
                   "changed_fraction": float(result.changed_fraction[i]), "removed_mass": float(result.removed_mass[i]),
                   "prune_level": None if result.prune_level is None else float(result.prune_level[i]),
                   "seconds": seconds, **sc}
            rows.append(row)
            if seed_cache is not None and im.path is not None:
                from retina_fgvis.evaluation_diaretdb1 import Explanation
                from retina_fgvis.report.files import file_sha256

                info = {k: row[k] for k in ("p_before", "p_after", "iterations", "goal_reached", "changed_fraction",
                                            "prune_level")}
                seed_cache.save(im.name, file_sha256(im.path), Explanation(importance.astype(np.float32),
                                                                            {**info, "game_seconds": seconds}))
            log(f"{name} defense={defense} {im.name}: p {row['p_before']:.3f}->{row['p_after']:.3f} "
                f"it {row['iterations']} enrich {row['enrichment']:.2f} top1 {row['precision_top1']:.3f} "
                f"({seconds:.1f} s)")
        if on_batch is not None:
            on_batch(rows[done_rows:], curve[done_curve:])
    return rows, curve


def is_skipped(rows: pd.DataFrame) -> pd.Series:
    """Rows of images that could not be read (column ``skipped`` holds why; tables from before
    that column have none)."""
    if "skipped" not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows["skipped"].fillna("").astype(str) != ""


def skipped_rows(setting: str, defense: bool, skipped: dict[str, str]) -> list[dict]:
    """One row per skipped image (``skipped``: image name -> "file: reason") for one setting, so
    that per_image.csv says which images a setting's numbers leave out."""
    return [{"setting": setting, "defense": defense, "image": name, "skipped": why} for name, why in skipped.items()]


def _key_text(rows: pd.DataFrame) -> pd.Series:
    """Each row's (setting, defense, image) as one string (True read back from a CSV is "True" too)."""
    return rows[KEY].astype(str).agg("\x1f".join, axis=1)


def merge_rows(earlier: pd.DataFrame, new: pd.DataFrame, replaces: pd.DataFrame | None = None) -> pd.DataFrame:
    """``earlier`` (rows of a study already in OUT) without the (setting, defense, image) keys of
    ``replaces`` (default ``new``), followed by ``new``: a re-run replaces its own rows and keeps
    every other one (before, each run overwrote per_image.csv with its rows alone). For the curves,
    ``replaces`` is the new per-image rows: an image of a re-run may have no check at all."""
    replaces = new if replaces is None else replaces
    kept = earlier
    if not earlier.empty and not replaces.empty:
        kept = earlier[~_key_text(earlier).isin(set(_key_text(replaces)))]
    frames = [f for f in (kept, new) if not f.empty]
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "skipped" in merged.columns:
        merged = skipped_last(merged)
    return merged


def _provenance_text(value: Any) -> str:
    """A provenance cell as text: empty for none, 5.0 read back from a CSV as 5."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def game_key(setting: str, defense: bool, image: str) -> str:
    """One game's (setting, defense, image) key, as :func:`_key_text` writes a row's."""
    return "\x1f".join((str(setting), str(defense), str(image)))


def finished_keys(rows: pd.DataFrame) -> set[str]:
    """The :func:`game_key` of every game ``rows`` hold a result of (skipped images excluded: a
    file may have been mended since)."""
    return set() if rows.empty else set(_key_text(rows[~is_skipped(rows)]))


def provenance_conflict(earlier: pd.DataFrame, provenance: dict[str, Any]) -> str | None:
    """Why the rows of ``earlier`` must not be merged with rows made under ``provenance`` (another
    classifier, split or iteration cap would be mixed into one summary line), or None."""
    missing = [c for c in PROVENANCE if c not in earlier.columns]
    if missing:
        return ("holds a study from before its rows recorded the classifier, split and iteration cap, "
                "so it cannot be added to; use a new --out (--summarise-only still re-summarises it)")
    for column in PROVENANCE:
        old = sorted({_provenance_text(v) for v in earlier[column]})
        new = _provenance_text(provenance[column])
        if old != [new]:
            shown = ", ".join(v or "(none)" for v in old)
            return (f"holds rows made with another {column} ({shown}; this run: {new or '(none)'}); use a new "
                    "--out, or this study's options")
    return None


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (setting, defence): the numbers the acceptance criteria name (skipped
    images have no numbers and are left out)."""
    out = []
    rows = rows[~is_skipped(rows)].copy()
    for column in ("referable", "goal_reached"):  # object dtype when skipped rows left NaN beside them
        rows[column] = rows[column].astype(bool)
    for (setting, defense), g in rows.groupby(["setting", "defense"], sort=False):
        ref = g[g.referable]
        out.append({
            "setting": setting, "defense": defense, "images": len(g), "referable": len(ref),
            "goal_reached_referable_%": 100 * ref.goal_reached.mean() if len(ref) else float("nan"),
            "median_p_after_referable": ref.p_after.median() if len(ref) else float("nan"),
            "median_enrichment": g.enrichment.median(), "median_enrichment_referable": ref.enrichment.median(),
            "images_with_lesions": int(g.enrichment.notna().sum()),
            "enrichment_goal_reached": g[g.goal_reached.astype(bool)].enrichment.median(),
            "enrichment_goal_missed": g[~g.goal_reached.astype(bool)].enrichment.median(),
            "mean_top0.5_precision": g["precision_top0.5"].mean(), "mean_top1_precision": g.precision_top1.mean(),
            "median_changed_%": 100 * g.changed_fraction.median(), "median_iterations": g.iterations.median(),
            "seconds_per_image": g.seconds.mean(),
        })
    return pd.DataFrame(out)


def plot_curves(curve: pd.DataFrame, setting: str, path: Path) -> None:
    """Median enrichment vs iteration for one setting, with and without the defence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = curve[curve.setting == setting] if "setting" in curve.columns else pd.DataFrame()
    if rows.empty:  # every image met its goal before the first check: nothing was optimised
        ax.text(0.5, 0.5, "no checks recorded (every goal met at the start)", ha="center", transform=ax.transAxes)
    else:
        for defense, g in rows.groupby("defense"):
            med = g.groupby("iteration").enrichment.median()
            ax.plot(med.index, med.values, marker="o", label="with defence" if defense else "without defence")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("iteration")
    ax.set_ylabel("median lesion enrichment (model grid)")
    ax.set_title(f"DiaretDB1 train, {setting}")
    ax.legend()
    fig.tight_layout()
    from retina_fgvis.report.files import atomic_write_figure

    atomic_write_figure(path, fig, dpi=120)


def load_images(dataset: Any, limit: int | None = None,
                on_skip: Callable[[SkippedImage], None] | None = None) -> list[StudyImage]:
    """The first ``limit`` files of the split (skipped ones count, so every run of a study means
    the same images) as study images.

    An image whose photograph or ground truth cannot be read is passed to ``on_skip`` (as the
    :class:`SkippedImage` of ``DiaretDB1.load_or_skip``) and left out; without ``on_skip`` its
    ``DiaretDB1ImageError`` is raised, as before (the probes).
    """
    images = []
    for fname in dataset.files[:limit]:
        item = dataset.load(fname) if on_skip is None else dataset.load_or_skip(fname)
        if isinstance(item, SkippedImage):
            on_skip(item)
            continue
        gt_any = np.zeros(item.fov.shape, bool)
        for mask in item.gt.values():
            gt_any |= mask
        images.append(StudyImage(item.name, item.rgb, item.fov, gt_any, item.path))
    return images


def write_csv(path: Path, df: pd.DataFrame) -> None:
    """A study table with the research-use notice as its first line, as every table of the project
    has (``report.tables.write_csv``): the per-image rows name DiaretDB1 images and the
    classifier's p(referable), and a file copied out of its folder must still say what it is."""
    from retina_fgvis.report.tables import write_csv as write_notice_csv

    write_notice_csv(df, path)


def read_csv(path: Path) -> pd.DataFrame:
    """A table :func:`write_csv` wrote (its formula quotes undone, ``report.tables``); also one from
    before the notice line (the recorded studies in evaluation/game-study/ have none), so
    `--summarise-only` reads both."""
    from retina_fgvis.report.tables import unescape_frame

    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    return unescape_frame(pd.read_csv(path, skiprows=1 if first.startswith("#") else 0))


def write_json(path: Path, obj: Any) -> None:
    from retina_fgvis.report.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
