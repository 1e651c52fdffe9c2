"""Probe behind the pruning step: is the haze of faint removals needed for the goal?

Runs the defended deletion game *without* pruning (``prune_levels=()``) on DiaretDB1 training
images, then undoes every removal below τ for a grid of τ and re-scores p(referable) and the
lesion enrichment. Usage (from the repository root):

    python evaluation/game-study/probes/prune_levels.py [--data-dir DIR] [--limit 4]
"""
from __future__ import annotations

import argparse
import time

import torch

from retina_fgvis import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.game_study import load_images, prepare_batch
from retina_fgvis.metrics.enrichment import lesion_scores

TAUS = [0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/diaretdb1")
    ap.add_argument("--limit", type=int, default=4)
    args = ap.parse_args()
    clf = load_classifier()
    images = load_images(DiaretDB1(args.data_dir, split="train"), limit=args.limit)
    fgvis = fundus_fgvis(clf, defense=True, prune_levels=())
    for b in range(0, len(images), 4):
        batch = images[b : b + 4]
        prep, x, fov, gts = prepare_batch(clf, batch)
        t0 = time.perf_counter()
        r = fgvis.attribute(x, target=1, game="deletion", fov_mask=fov)
        dt = (time.perf_counter() - t0) / len(batch)
        with torch.no_grad():
            for tau in TAUS:
                m = torch.where(1 - r.mask < tau, torch.ones_like(r.mask), r.mask)
                p = torch.softmax(clf.model(m * x), 1)[:, 1]
                for i, im in enumerate(batch):
                    sc = lesion_scores((1 - m[i]).mean(0).numpy(), gts[i], prep[i].fov_model)
                    print(f"{im.name} it={int(r.iterations[i])} goal={float(r.goal_prob[i]):.3f} tau={tau:.2f} "
                          f"p={float(p[i]):.3f} ok={float(p[i]) <= float(r.goal_prob[i])} "
                          f"mass={float((1 - m[i]).mean()):.4f} enrich={sc['enrichment']:.2f} "
                          f"top1={sc['precision_top1']:.3f} ({dt:.0f} s/image)", flush=True)


if __name__ == "__main__":
    main()
