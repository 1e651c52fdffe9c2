"""Probe: why the deletion goal includes p(blank eye), and how small the defended gradient is
(session 17; backs two sentences of the README's "The games" table).

On the bundled phantom ``data/samples/SYNB_right.png`` (the shipped classifier), runs the
defended deletion game with the pure threshold goal (``goal="threshold"``: p(referable) at or
below the operating threshold, 0.146) for the full budget, without pruning, and prints p at
each check and the p of the iterate the game returns. Then, at that returned mask, it computes
the gradient of the log-odds of "referable" with respect to the mask with and without the
Eq. 6 defence (``FGVis.mask_gradient``: the game's own similarity, reference and defence), and prints mean and largest |gradient| over the field of view and their ratios:
how much of the gradient the defence lets through once the mask has moved away from 1.
Usage (from the repository root, ~2 min on a 2-core CPU):

    python evaluation/game-study/probes/threshold_goal.py [--image data/samples/SYNB_right.png]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from retina_fgvis import load_classifier
from retina_fgvis.classifier.model import REFERABLE
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.fundus.io import read_fundus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="data/samples/SYNB_right.png")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"image {args.image}", flush=True)
    clf = load_classifier()
    prepared = clf.prepare(read_fundus(args.image).rgb)
    x = prepared.tensor[None]
    fov = torch.from_numpy(prepared.fov_model)[None]
    games = {d: fundus_fgvis(clf, defense=d, goal="threshold", prune_levels=()) for d in (False, True)}
    fgvis = games[True]
    t0 = time.perf_counter()
    r = fgvis.attribute(x, target=REFERABLE, game="deletion", fov_mask=fov)
    seconds = time.perf_counter() - t0
    print(f"threshold goal p <= {float(r.goal_prob[0]):.3f}: p {float(r.target_prob_before[0]):.3f} -> "
          f"{float(r.target_prob_after[0]):.3f} (returned iterate), {int(r.iterations[0])} iterations, "
          f"goal reached {bool(r.goal_reached[0])}, {seconds:.1f} s", flush=True)
    print("  p at each check:", " ".join(f"{p:.2f}" for p in r.prob_trajectory[0]), flush=True)
    in_fov = fov[:, None].expand_as(x).bool()
    grads = {d: game.mask_gradient(x, r.mask, REFERABLE)[in_fov].abs() for d, game in games.items()}
    for d, g in grads.items():
        print(f"  {'defended  ' if d else 'undefended'} |d log-odds / d m| over the FOV: mean {float(g.mean()):.3e}, "
              f"largest {float(g.max()):.3e}", flush=True)
    print(f"  undefended / defended: mean {float(grads[False].mean() / grads[True].mean()):.1f}x, "
          f"largest {float(grads[False].max() / grads[True].max()):.1f}x", flush=True)


if __name__ == "__main__":
    main()
