"""Probe: how should FGVis rank the pixels its deletion game leaves untouched?

Why: on the RDR classifier the FGVis curve falls fastest of all methods over the first ~2 % of
pixels (the game's removals) and then climbs back above every baseline: the untouched pixels
(all ties at importance 0) go in raster order. This probe compares secondary orderings for
those ties, each taken from the game itself, on held-out eyes that are NOT among the 60 the
faithfulness evaluation reports (tuning only; the reported eyes stay untouched).

    python evaluation/faithfulness/probes/fgvis_ranking.py --data-root ../shared/data --eyes 6 --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms.functional import gaussian_blur

from retina_fgvis.baselines import explain, restrict_to_fov
from retina_fgvis.faithfulness import (FAITHFULNESS_FGVIS_SETTINGS, load_rdr_model, predict,
                                       rdr_images, rdr_validation_table, sample_rdr,
                                       stack_images)
from retina_fgvis.fgvis.games import FGVis
from retina_fgvis.metrics.deletion import deletion


def tuning_eyes(table: pd.DataFrame, n: int, reported: int = 60) -> pd.DataFrame:
    """Held-out eyes after the ``reported`` balanced ones, half referable (same permutation)."""
    t = sample_rdr(table, None)
    pos, neg = t[t["rdr"] == 1], t[t["rdr"] == 0]
    skip = reported // 2
    return pd.concat([pos.iloc[skip: skip + n // 2], neg.iloc[skip: skip + n - n // 2]]).reset_index(drop=True)


def tuning_batch(data_root: str, weights: str | None, eyes: int):
    """(model, images, x, fov, explained class) of the ``eyes`` tuning eyes: every probe's setup."""
    em = load_rdr_model(weights)
    images = rdr_images(em, tuning_eyes(rdr_validation_table(em.classifier.metadata, data_root), eyes))
    x, fov = stack_images(images, em.device)
    return em, images, x, fov, predict(em, x).argmax(1)


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, H, W) maps, kernel ±3σ, reflect padding (torchvision's)."""
    r = int(3 * sigma)
    return gaussian_blur(img[:, None], kernel_size=[2 * r + 1, 2 * r + 1], sigma=[sigma, sigma])[:, 0]


def lexicographic(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Pixels the game changed first (by their removal), then the rest by ``secondary``."""
    s = secondary - secondary.flatten(1).amin(1).view(-1, 1, 1)
    s = s / s.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1)
    return torch.where(primary > 0, 2.0 + primary, s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eyes", type=int, default=6)
    ap.add_argument("--lime-samples", type=int, default=500)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    em, images, x, fov, target = tuning_batch(a.data_root, a.weights, a.eyes)
    t0 = time.perf_counter()
    path_sum = torch.zeros(x.shape[0], *x.shape[2:])
    path_n = torch.zeros(x.shape[0])

    def snap(t, idx, masks, probs):
        path_sum[idx] += (1 - masks).mean(1)
        path_n[idx] += 1

    res = FGVis(em.model, defense=True, **FAITHFULNESS_FGVIS_SETTINGS).attribute(x, target, fov_mask=fov,
                                                                                 snapshot=snap)
    t_game = time.perf_counter() - t0
    final = res.mean_mask
    path = path_sum / path_n.clamp_min(1).view(-1, 1, 1)
    # defended d log-odds / d m at the game's answer: positive = removing lowers the class
    g = FGVis(em.model, defense=True).mask_gradient(x, res.mask.to(x.device), target).cpu()
    ev_pos = g.clamp_min(0).sum(1)          # channels whose removal lowers the class
    ev_net = g.sum(1)                        # net: negative = removal would raise it
    maps = {
        "final_raster": final,
        "final_then_path": lexicographic(final, path),
        "final_then_blur16": lexicographic(final, blur(final, 16)),
        "final_then_blur48": lexicographic(final, blur(final, 48)),
        "final_then_evidence": lexicographic(final, ev_net),
        "final_then_evidence_blur8": lexicographic(final, blur(ev_net, 8)),
        "final_then_evidence_blur24": lexicographic(final, blur(ev_net, 24)),
        "final_then_evidence_pos_blur24": lexicographic(final, blur(ev_pos, 24)),
    }
    t1 = time.perf_counter()
    maps["lime"] = explain("lime", em.model, x, target, fov_mask=fov, n_samples=a.lime_samples)
    t_lime = time.perf_counter() - t1
    rows, curves = [], {}
    for name, imp in maps.items():
        imp = restrict_to_fov(imp, fov.cpu())
        cur = deletion(em.model, x, imp.to(x.device), target=target, batch_size=64)
        curves[name] = cur.scores.numpy()
        for i, im in enumerate(images):
            rows.append({"image": im.name, "label": im.label, "target": int(target[i]), "variant": name,
                         "deletion_auc": float(cur.auc[i]),
                         "changed_fraction": float(res.changed_fraction[i])})
        print(name, " ".join(f"{v:.3f}" for v in cur.auc.tolist()), f"mean {float(cur.auc.mean()):.4f}",
              flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "auc_per_image.csv", index=False)
    summary = df.groupby("variant", sort=False)["deletion_auc"].agg(["mean", "median"])
    summary["mean_referable_target"] = df[df.target == 1].groupby("variant", sort=False)["deletion_auc"].mean()
    summary["mean_nonreferable_target"] = df[df.target == 0].groupby("variant", sort=False)["deletion_auc"].mean()
    print(summary.round(4).to_string())
    summary.to_csv(out / "summary.csv")
    np.savez_compressed(out / "curves.npz", **curves)
    (out / "run.json").write_text(json.dumps({"eyes": [im.name for im in images], "seconds_game": t_game,
                                              "seconds_lime": t_lime, "goal_reached": res.goal_reached.tolist(),
                                              "changed_fraction": res.changed_fraction.tolist()}, indent=1))


if __name__ == "__main__":
    main()
