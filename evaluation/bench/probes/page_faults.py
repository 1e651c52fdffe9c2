"""Probe: wall time and minor page faults of each iteration, plain fwd+bwd vs the games.

Timestamps and ``getrusage`` fault counts at every forward pass of the model (so intervals are
whole iterations: forward, backward, the game's bookkeeping), for (a) plain fwd+bwd, (b) the
undefended game, (c) the defended game with the fused indicator and (c') with hooks. Round 0
includes the process's first growth; round 1 is the steady state. Usage (repository root):

    python evaluation/bench/probes/page_faults.py [--batch 4] [--iterations 8] [--keep-freed-memory] [--compiled-masks]

``--keep-freed-memory`` / ``--compiled-masks`` apply the CLI's allocator setting / compiled defence
masks (``retina_fgvis.runtime``) first.
"""
from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import torch

from retina_fgvis import load_classifier
from retina_fgvis.bench import hardware
from retina_fgvis.fgvis.defense import compiled_masks_enabled, use_compiled_masks
from retina_fgvis.fgvis.games import FGVis
from retina_fgvis.runtime import allocator_mode, keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--keep-freed-memory", action="store_true")
    ap.add_argument("--compiled-masks", action="store_true")
    args = ap.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    use_compiled_masks(args.compiled_masks)
    torch.manual_seed(0)
    model = load_classifier().model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, 3, 512, 512)
    target = torch.ones(args.batch, dtype=torch.long)
    stamps: list[tuple[float, int]] = []

    def stamp(*_: object) -> None:
        stamps.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    model.register_forward_pre_hook(stamp)

    def plain(n: int) -> None:
        for _ in range(n):
            e = x.clone().requires_grad_(True)
            torch.softmax(model(e), 1)[:, 1].sum().backward()
        stamp()

    def game(defense: bool, fuse: bool, n: int) -> None:
        FGVis(model, defense=defense, max_iterations=n, check_every=n, goal_level=0.0, prune_levels=(),
              defense_fuse=fuse).attribute(
            x, target=target)

    variants = {"(a) plain": plain, "(b) game": functools.partial(game, False, True),
                "(c) defended, fused": functools.partial(game, True, True),
                "(c') defended, hooks": functools.partial(game, True, False)}
    print(f"{hardware()}; allocator: {allocator_mode()}; compiled masks: {compiled_masks_enabled()}; "
          f"batch {args.batch}, 512 px", flush=True)
    steady: dict[str, float] = {}
    for r in range(2):
        for name, run in variants.items():
            stamps.clear()
            run(args.iterations)
            # game: the first forward is the no-grad p_before pass, the defended game's second the
            # clean pass; the last `iterations` intervals are the iterations
            pairs = list(zip(stamps, stamps[1:]))[-args.iterations:]
            ms = [1000 * (b[0] - a[0]) for a, b in pairs]
            kf = [(b[1] - a[1]) / 1000 for a, b in pairs]
            print(f"round {r} {name:21s} ms/it: {' '.join(f'{v:.0f}' for v in ms)}", flush=True)
            print(f"round {r} {name:21s} k faults/it: {' '.join(f'{v:.0f}' for v in kf)}", flush=True)
            if r == 1:
                steady[name] = statistics.median(ms[2:])
    base = steady["(a) plain"]
    print("steady state (round 1, median of iterations 3..n): " + ", ".join(
        f"{k} {v:.0f} ms ({v / base:.2f}x (a))" for k, v in steady.items()))


if __name__ == "__main__":
    main()
