"""Control: what does the deletion metric give an importance map that knows nothing?

Why: a sparse FGVis map (the defended game with ``goal=reference`` changes 0-8 % of the field of
view) leaves almost every pixel tied, and the metric's deterministic tie-break (pixel index, i.e.
raster order) then decides most of the curve. On the tuning eyes that tie-break, not the game, was
what made ``goal=reference`` look good (``fgvis_goal_ladder.py``). This control scores two orders
that carry no information about the eye, on the **reported** held-out eyes (nothing is tuned on
them: no setting is chosen here), so the committed AUCs of every method can be read against them:

* ``raster``: every pixel tied (importance 0 in the FOV): pixel-index order, the metric's tie-break;
* ``random``: a seeded uniformly random order (one generator per batch, seeded by the batch's first
  eye index plus ``--seed``, one draw per eye).

    python evaluation/faithfulness/probes/deletion_controls.py --data-root ../shared/data --limit 60 \
        --compare evaluation/faithfulness/rdr-cpu-shipped-60/auc_per_image.csv \
        --compare evaluation/faithfulness/rdr-cpu-shipped-60-goal-reference/auc_per_image.csv --out DIR

    python evaluation/faithfulness/probes/deletion_controls.py --model imagenet --batch-size 1 \
        --compare evaluation/faithfulness/imagenet/auc_per_image.csv --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from retina_fgvis.baselines import restrict_to_fov
from retina_fgvis.faithfulness import (EvalImage, EvalModel, imagenet_images, load_imagenet_model, load_rdr_model,
                                       predict, rdr_images, rdr_validation_table, sample_rdr, stack_images)
from retina_fgvis.memory_layout import model_layout
from retina_fgvis.metrics.deletion import deletion
from retina_fgvis.runtime import keep_freed_memory, trim_freed_memory


def control_maps(shape: torch.Size, seed: int = 0) -> dict[str, torch.Tensor]:
    """The two information-free orders for a (B, H, W) batch (random: one seeded draw per eye)."""
    g = torch.Generator().manual_seed(seed)
    return {"raster": torch.zeros(shape), "random": torch.stack([torch.rand(shape[1:], generator=g)
                                                                 for _ in range(shape[0])])}


def summarise(df: pd.DataFrame, by_rdr_class: bool = True) -> pd.DataFrame:
    """Mean / sem / median per method, by explained class (RDR only: ImageNet's classes are one image
    each), and on how many eyes each method is lower than each control (paired by eye)."""
    summary = df.groupby("method", sort=False)["deletion_auc"].agg(["mean", "sem", "median"])
    for cls, label in ((0, "non_referable"), (1, "referable")) if by_rdr_class else ():
        summary[label] = df[df.target == cls].groupby("method", sort=False)["deletion_auc"].mean()
    wide = df.pivot_table(index="image", columns="method", values="deletion_auc")
    for control in [c for c in wide.columns if str(c).startswith("control-")]:
        lower = wide.lt(wide[control], axis=0).sum()
        summary[f"lower_than_{control}"] = lower.reindex(summary.index).astype(int)
    summary["eyes" if by_rdr_class else "images"] = df.groupby("method", sort=False)["image"].nunique()
    return summary


def _new_rows(seen: pd.DataFrame | None, other: pd.DataFrame, folder: str) -> pd.DataFrame:
    """``other``'s rows that ``seen`` lacks: a method with the same AUCs on every eye (records copied
    from an earlier evaluation) is dropped, one with different AUCs is kept as ``method@folder``."""
    if seen is None:
        return other
    keep = []
    for method, rows in other.groupby("method", sort=False):
        known = seen[seen["method"] == method].set_index("image")["deletion_auc"]
        if known.empty:
            keep.append(rows)
        elif not np.array_equal(known.reindex(rows["image"]).to_numpy(), rows["deletion_auc"].to_numpy()):
            keep.append(rows.assign(method=f"{method}@{folder}"))
    return pd.concat(keep) if keep else other.iloc[:0]


def report(controls: pd.DataFrame, compare: list[str] | None, out: Path, by_rdr_class: bool = True) -> None:
    """Print and write the summary of the controls, beside an evaluation's rows for the same eyes."""
    frames: list[pd.DataFrame] = []
    for path in compare or []:
        other = pd.read_csv(path)[["image", "target", "method", "deletion_auc"]]
        frames.append(_new_rows(pd.concat(frames) if frames else None,
                                other[other["image"].isin(controls["image"])], Path(path).parent.name))
    df = pd.concat([*frames, controls])
    summary = summarise(df, by_rdr_class)
    print(summary.round(4).to_string())
    summary.to_csv(out / "summary.csv")


def evaluation_inputs(a: argparse.Namespace) -> tuple[EvalModel, list[EvalImage]]:
    """The model and the images of the evaluation the controls stand beside (same sample, same order)."""
    if a.model == "imagenet":
        em = load_imagenet_model()
        return em, imagenet_images(em, a.images, a.limit if a.images else None)
    em = load_rdr_model(a.weights)
    return em, rdr_images(em, sample_rdr(rdr_validation_table(em.classifier.metadata, a.data_root), a.limit))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("rdr", "imagenet"), default="rdr")
    ap.add_argument("--images", default=None, help="imagenet: a folder instead of the skimage.data sample")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--limit", type=int, default=60, help="the evaluation's balanced sample (as --limit)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--compare", action="append", default=None,
                    help="an evaluation's auc_per_image.csv to set beside (repeatable)")
    ap.add_argument("--seed", type=int, default=0,
                    help="added to each batch's seed (0 = the committed draws); another value, another random order")
    ap.add_argument("--summary-only", action="store_true",
                    help="rebuild summary.csv from OUT/auc_per_image.csv (no model, no metric)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    keep_freed_memory()  # as the CLI
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.summary_only:
        report(pd.read_csv(out / "auc_per_image.csv"), a.compare, out, a.model == "rdr")
        return
    em, images = evaluation_inputs(a)
    rows, t0 = [], time.perf_counter()
    with model_layout(em.model, channels_last=True):  # the evaluation's CPU layout
        for start in range(0, len(images), a.batch_size):
            batch = images[start:start + a.batch_size]
            x, fov = stack_images(batch, em.device)
            target = predict(em, x).argmax(1)
            for name, imp in control_maps(x.shape[:1] + x.shape[2:], seed=a.seed + start).items():
                if fov is not None:  # RDR eyes carry a FOV mask; photographs have none
                    imp = restrict_to_fov(imp, fov.cpu())
                cur = deletion(em.model, x, imp.to(x.device), target=target.to(x.device), batch_size=64)
                rows += [{"image": im.name, "target": int(target[i]), "method": f"control-{name}",
                          "deletion_auc": float(cur.auc[i])} for i, im in enumerate(batch)]
            trim_freed_memory()
            pd.DataFrame(rows).to_csv(out / "auc_per_image.csv", index=False)
            print(f"{start + len(batch)}/{len(images)} eyes, {time.perf_counter() - t0:.0f} s", flush=True)
    report(pd.DataFrame(rows), a.compare, out, a.model == "rdr")
    (out / "run.json").write_text(json.dumps({"model": a.model, "eyes": len(images), "seed": a.seed, "seconds": time.perf_counter() - t0,
                                              "compare": a.compare}, indent=1))


if __name__ == "__main__":
    main()
