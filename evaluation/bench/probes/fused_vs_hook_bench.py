"""Probe: the bench's (c)/(a) with the defence fused (default) and with hooks (``fuse=False``).

Alternates ``retina_fgvis.bench.bench_iterations`` (the `retina-fgvis bench` measurement: (a)
plain fwd+bwd, (b) game, (c) defended game, interleaved) between the two defence paths for
``--rounds`` rounds at one batch size, shipped classifier, 512 px. Usage (repository root):

    python evaluation/bench/probes/fused_vs_hook_bench.py [--batch 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from retina_fgvis import load_classifier
from retina_fgvis.bench import bench_iterations, hardware


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    clf = load_classifier()
    ratios: dict[bool, list[float]] = {True: [], False: []}
    print(f"{hardware()}; batch {args.batch}, "
          f"{clf.input_size} px", flush=True)
    for r in range(args.rounds):
        for fuse in (True, False):
            row = bench_iterations(clf.model, clf.input_size, args.batch, torch.device("cpu"), repeats=1,
                                   defense_fuse=fuse)
            ratios[fuse].append(row.ratio_defended)
            print(f"round {r + 1} {'fused' if fuse else 'hooks'}: (a) {row.plain_ms:.0f} ms  (b) {row.game_ms:.0f} ms  "
                  f"(c) {row.defended_ms:.0f} ms  (b)/(a) {row.ratio_game:.2f}  (c)/(a) {row.ratio_defended:.2f}",
                  flush=True)
    for fuse, v in ratios.items():
        print(f"{'fused' if fuse else 'hooks'}: (c)/(a) median {statistics.median(v):.2f} over {len(v)} rounds "
              f"({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
