"""Probe: which part of the defended game's extra cost is what (session 4, CPU, batch 4, 512 px).

Runs `retina_fgvis.bench.bench_iterations` (the bench's (a)/(b)/(c)) under three variants:
  1. the indicator and gradient hook switched off (bounds still recorded, call bookkeeping kept);
  2. the full defence;
  3. pruning off in both games (`prune_levels=()`), to rule out the one-off pruning passes;
  4. flush-to-zero on and off (`torch.set_flush_denormal`), to rule out denormal arithmetic.

    python evaluation/bench/probes/defense_cost_split.py     # ~10 min on the 2-core CPU
The session-4 output is at the end of ab_realistic.log.
"""
from __future__ import annotations

import torch

from retina_fgvis import load_classifier
from retina_fgvis.bench import bench_iterations
from retina_fgvis.fgvis import defense as D
from retina_fgvis.fgvis.games import FGVis


def report(label: str, model: torch.nn.Module) -> None:
    r = bench_iterations(model, 512, 4, torch.device("cpu"), repeats=3)
    print(f"{label:42s} a {r.plain_ms:.0f} b {r.game_ms:.0f} c {r.defended_ms:.0f} ms  "
          f"b/a {r.ratio_game:.2f} c/a {r.ratio_defended:.2f}", flush=True)


def main() -> None:
    model = load_classifier().model
    on_call = D.ActivationBounds._on_call

    def bookkeeping_only(self, op, out, nonnegative):  # noqa: ANN001
        if self._recording:
            return on_call(self, op, out, nonnegative)
        self._call_index += 1

    D.ActivationBounds._on_call = bookkeeping_only
    try:
        report("no indicator, no hook (bounds recorded)", model)
    finally:
        D.ActivationBounds._on_call = on_call
    report("full defence", model)

    init = FGVis.__init__

    def no_pruning(self, *args, **kw):  # noqa: ANN001
        kw.setdefault("prune_levels", ())
        init(self, *args, **kw)

    FGVis.__init__ = no_pruning
    try:
        report("full defence, prune_levels=()", model)
    finally:
        FGVis.__init__ = init
    for ftz in (True, False):
        torch.set_flush_denormal(ftz)
        report(f"full defence, flush_denormal={ftz}", model)


if __name__ == "__main__":
    main()
