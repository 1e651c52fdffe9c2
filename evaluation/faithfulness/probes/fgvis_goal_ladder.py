"""Probe: can one FGVis importance map serve both explained classes of the RDR model?

Why: on the 60 reported eyes the defended game's best goal differs by class. ``goal=reference``
(stop at the blank eye's probability) wins on eyes explained as non-referable (0.515 against
fraction 0.1's 0.709) and loses on the referable ones (0.448 against 0.341): a referable eye's
lesions can be deleted *below* the blank level (the healthy retina that is left speaks for
"non-referable"), and a map that stops at the blank level leaves those pixels in raster order.
A goal ladder keeps both: the pixels needed to reach the blank level first, then those a stricter
goal removes. Two ways of combining the two games' maps are compared, on held-out tuning eyes that
are NOT among the 60 reported ones (the same 8 as ``fgvis_goal.py``, so its LIME and Grad-CAM
numbers apply), with the single games as controls (they must reproduce ``fgvis_goal-8eyes.log``)
and three orderings that carry no game information, to see how much of a sparse map's score is
the metric's tie-break (raster order of the untouched pixels):

* ``mean``: importance = mean of the two maps (each a mean removal in [0, 1]);
* ``ladder``: lexicographic, the reference game's changed pixels by their removal, then the rest
  by the stricter game's map (``fgvis_ranking.lexicographic``);
* ``raster``: every pixel tied (importance 0): the metric's tie-break alone;
* ``random``: a seeded random order; ``reference, then random``: the reference game's changed
  pixels first, the rest in random order instead of raster order.

``--only NAME;NAME`` recomputes the named variants from the cached games and keeps the other rows.

    python evaluation/faithfulness/probes/fgvis_goal_ladder.py --data-root ../shared/data --eyes 8 --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from deletion_controls import control_maps
from fgvis_ranking import lexicographic, tuning_batch

from retina_fgvis.baselines import fgvis_importance, restrict_to_fov
from retina_fgvis.faithfulness import FAITHFULNESS_FGVIS_SETTINGS
from retina_fgvis.memory_layout import model_layout
from retina_fgvis.metrics.deletion import deletion
from retina_fgvis.runtime import keep_freed_memory

#: game name -> overrides on top of the evaluation's FGVis settings (as ``--fgvis-setting`` would give)
GAMES: dict[str, dict] = {
    "reference": {"goal": "reference"},
    "fraction-0.1": {},
    "fraction-0.01": {"goal_fraction": 0.01},
}


def run_games(model: torch.nn.Module, x: torch.Tensor, fov: torch.Tensor, target: torch.Tensor,
              chunk: int, cache: Path) -> dict[str, torch.Tensor]:
    """Each game's importance map for every eye, ``chunk`` eyes at a time (cached in ``cache``)."""
    if cache.exists():
        with np.load(cache) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    maps: dict[str, torch.Tensor] = {}
    for name, overrides in GAMES.items():
        t0 = time.perf_counter()
        parts = [fgvis_importance(model, x[i:i + chunk], target[i:i + chunk], fov_mask=fov[i:i + chunk],
                                  **{**FAITHFULNESS_FGVIS_SETTINGS, **overrides})
                 for i in range(0, x.shape[0], chunk)]
        maps[name] = torch.cat(parts).cpu()
        print(f"game {name}: {(time.perf_counter() - t0) / x.shape[0]:.1f} s/eye", flush=True)
    np.savez_compressed(cache, **{k: v.numpy() for k, v in maps.items()})
    return maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eyes", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4, help="eyes per game batch")
    ap.add_argument("--only", default="", help="semicolon-separated variant names to (re)compute")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    keep_freed_memory()  # as the CLI: without it every 512-px forward pass faults its memory in again (~6x slower)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    em, images, x, fov, target = tuning_batch(a.data_root, a.weights, a.eyes)
    print("tuning eyes:", ", ".join(im.name for im in images), flush=True)
    maps = run_games(em.model, x, fov, target, a.chunk, out / "maps.npz")
    ref = maps["reference"]
    variants = dict(maps)
    for strict in ("fraction-0.1", "fraction-0.01"):
        variants[f"mean(reference, {strict})"] = (ref + maps[strict]) / 2
        variants[f"ladder(reference, {strict})"] = lexicographic(ref, maps[strict])
    variants.update(control_maps(ref.shape, seed=0))  # "raster", "random"
    variants["reference, then random"] = lexicographic(ref, variants["random"])
    wanted = [v for v in a.only.split(";") if v] or list(variants)
    old = pd.read_csv(out / "auc_per_image.csv") if a.only and (out / "auc_per_image.csv").exists() else None
    fov_cpu = fov.cpu().reshape(ref.shape).bool()
    for name in GAMES:
        share = [float((maps[name][i][fov_cpu[i]] > 0).float().mean()) for i in range(ref.shape[0])]
        print(f"{name}: share of the FOV with importance > 0:", " ".join(f"{v:.4f}" for v in share), flush=True)
    rows = []
    with model_layout(em.model, channels_last=True):  # the evaluation's CPU layout
        for name in wanted:
            imp = restrict_to_fov(variants[name], fov_cpu)
            cur = deletion(em.model, x, imp.to(x.device), target=target, batch_size=64)
            for i, im in enumerate(images):
                rows.append({"image": im.name, "target": int(target[i]), "variant": name,
                             "deletion_auc": float(cur.auc[i])})
            print(name, " ".join(f"{v:.3f}" for v in cur.auc.tolist()), f"mean {float(cur.auc.mean()):.4f}",
                  flush=True)
    df = pd.DataFrame(rows)
    if old is not None:
        df = pd.concat([old[~old["variant"].isin(wanted)], df])
    df.to_csv(out / "auc_per_image.csv", index=False)
    summary = df.groupby("variant", sort=False)["deletion_auc"].agg(["mean", "median"])
    for cls, label in ((0, "non_referable"), (1, "referable")):
        summary[label] = df[df.target == cls].groupby("variant", sort=False)["deletion_auc"].mean()
    print(summary.round(4).to_string())
    summary.to_csv(out / "summary.csv")
    (out / "run.json").write_text(json.dumps({"eyes": [im.name for im in images],
                                              "target": target.tolist(), "games": GAMES}, indent=1))


if __name__ == "__main__":
    main()
