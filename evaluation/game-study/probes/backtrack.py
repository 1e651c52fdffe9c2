"""Probe: does taking back worse steps (``step_control="backtrack"``) help the four slow images?

Runs the defended deletion game with backtracking on DiaretDB1 training images that missed
their goal with the plain default, and prints p, goal, enrichment and the p trajectory.
Usage (from the repository root):

    python evaluation/game-study/probes/backtrack.py [--data-dir DIR] [--images image013 ...]
"""
from __future__ import annotations

import argparse
import time

from retina_fgvis import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.game_study import load_images, prepare_batch
from retina_fgvis.metrics.enrichment import lesion_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/diaretdb1")
    ap.add_argument("--images", nargs="+", default=["image013", "image014", "image024", "image025"])
    args = ap.parse_args()
    clf = load_classifier()
    images = [im for im in load_images(DiaretDB1(args.data_dir, split="train")) if im.name in args.images]
    fgvis = fundus_fgvis(clf, defense=True, step_control="backtrack")
    prep, x, fov, gts = prepare_batch(clf, images)
    t0 = time.perf_counter()
    r = fgvis.attribute(x, target=1, game="deletion", fov_mask=fov)
    for i, im in enumerate(images):
        sc = lesion_scores(r.mean_mask[i].numpy(), gts[i], prep[i].fov_model)
        print(f"{im.name} p {float(r.target_prob_before[i]):.3f}->{float(r.target_prob_after[i]):.3f} "
              f"goal {float(r.goal_prob[i]):.3f} reached {bool(r.goal_reached[i])} it {int(r.iterations[i])} "
              f"prune {float(r.prune_level[i]):.2f} enrich {sc['enrichment']:.2f} top1 {sc['precision_top1']:.3f} "
              f"mass {float(r.removed_mass[i]):.4f}", flush=True)
        print("  p at each check:", " ".join(f"{p:.2f}" for p in r.prob_trajectory[i]), flush=True)
    print(f"seconds {time.perf_counter() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
