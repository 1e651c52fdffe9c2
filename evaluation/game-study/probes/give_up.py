"""Probe: does giving up a missed game early (``give_up_patience``) change its answer, and what
does it save? (session 16)

Runs the defended deletion game (engine default) with the whole budget and with
``give_up_patience=3`` (stop at the 4th check, 40 iterations, without a nearer-to-goal iterate) on
the DiaretDB1 training images that missed their goal in the recorded 28-image game study
(`evaluation/game-study/per_image.csv`), one image at a time, and prints per image: iterations,
seconds, p after, goal reached, enrichment, top-1 % precision, the largest difference of the two
importance maps, and the p at each check of the full game. Games that reach their goal are not
affected by the option (tested: tests/test_games.py), so only the missed ones are run.
Usage (from the repository root):

    python evaluation/game-study/probes/give_up.py [--data-dir DIR] [--images image010 ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from retina_fgvis import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.game_study import load_images, prepare_batch, read_csv
from retina_fgvis.metrics.enrichment import lesion_scores

RECORD = "evaluation/game-study/per_image.csv"


def missed_in_the_record() -> list[str]:
    rows = read_csv(RECORD)
    rows = rows[(rows.setting == "sgdn-logodds-lr0.3") & rows.defense.astype(str).eq("True")]
    return sorted(rows[~rows.goal_reached.astype(str).eq("True")].image)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/diaretdb1")
    ap.add_argument("--images", nargs="+", default=None, help="default: the record's missed games")
    ap.add_argument("--patience", type=int, default=3)
    args = ap.parse_args()
    names = args.images or missed_in_the_record()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; images {' '.join(names)}", flush=True)
    clf = load_classifier()
    images = [im for im in load_images(DiaretDB1(args.data_dir, split="train")) if im.name in names]
    games = {"full": fundus_fgvis(clf, defense=True),
             f"give_up_{args.patience}": fundus_fgvis(clf, defense=True, give_up_patience=args.patience)}
    totals = {name: 0.0 for name in games}
    for im in images:
        prep, x, fov, gts = prepare_batch(clf, [im])
        maps = {}
        for name, fgvis in games.items():
            t0 = time.perf_counter()
            r = fgvis.attribute(x, target=1, game="deletion", fov_mask=fov)
            seconds = time.perf_counter() - t0
            totals[name] += seconds
            maps[name] = r.mean_mask[0].numpy()
            sc = lesion_scores(maps[name], gts[0], prep[0].fov_model)
            print(f"{im.name} {name:12s} it {int(r.iterations[0]):3d} {seconds:6.1f} s  p {float(r.target_prob_before[0]):.3f}"
                  f"->{float(r.target_prob_after[0]):.4f} goal {float(r.goal_prob[0]):.3f} reached {bool(r.goal_reached[0])!s:5s} "
                  f"enrich {sc['enrichment']:.3f} top1 {sc['precision_top1']:.3f}", flush=True)
            if name == "full":
                print("  p at each check:", " ".join(f"{p:.2f}" for p in r.prob_trajectory[0]), flush=True)
        a, b = maps.values()
        print(f"  largest importance difference {float(np.abs(a - b).max()):.3g}", flush=True)
    print("total seconds " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items())
          + f" (ratio {totals['full'] / max(list(totals.values())[1], 1e-9):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
