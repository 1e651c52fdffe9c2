"""Probe: the fused defence gives the same defended game as the hook defence, bit for bit.

Runs the default defended deletion game (shipped classifier, 512 px) on DiaretDB1 training
images twice -- indicators fused into the ReLU6 backward (default) and applied by gradient
hooks (``fuse=False``) -- and compares the masks with ``torch.equal``. Usage (repository root):

    python evaluation/bench/probes/fused_identity.py [--data-dir DIR] [--images image001 image003] [--iterations 30]
"""
from __future__ import annotations

import argparse
import time

import torch

from retina_fgvis import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.game_study import load_images, prepare_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data/diaretdb1")
    ap.add_argument("--images", nargs="+", default=["image001", "image003"])
    ap.add_argument("--iterations", type=int, default=30)
    args = ap.parse_args()
    clf = load_classifier()
    images = [im for im in load_images(DiaretDB1(args.data_dir, split="train")) if im.name in args.images]
    _, x, fov, _ = prepare_batch(clf, images)
    results = {}
    for fuse in (True, False):
        t0 = time.perf_counter()
        results[fuse] = fundus_fgvis(clf, max_iterations=args.iterations, defense_fuse=fuse).attribute(
            x, target=1, game="deletion", fov_mask=fov)
        print(f"fuse={fuse}: {time.perf_counter() - t0:.1f} s, p after "
              f"{[round(float(p), 4) for p in results[fuse].target_prob_after]}", flush=True)
    a, b = results[True], results[False]
    print(f"{len(images)} images, {args.iterations} iterations: masks equal {torch.equal(a.mask, b.mask)}, "
          f"mean masks equal {torch.equal(a.mean_mask, b.mean_mask)}, "
          f"probabilities equal {torch.equal(a.target_prob_after, b.target_prob_after)}, "
          f"changed elements {(a.mask < 1).sum().item()}")


if __name__ == "__main__":
    main()
