"""Probe: what the defence adds to one ReLU6 activation's forward+backward, hook vs fused.

One batch-4 EfficientNet-Lite0 stem activation at 512 px (4 x 32 x 256 x 256 floats, 33 MB):
``e * 1 -> ReLU6 (in place) -> backward``, plain, defended with hooks (``fuse=False``: indicator
in the forward, the op's backward, then a hook multiply) and defended fused (one in-place
multiply replaces the op's backward). Variants interleaved, median of ``--rounds``. Usage:

    python evaluation/bench/probes/fused_defense_micro.py [--rounds 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn as nn

from retina_fgvis.bench import hardware
from retina_fgvis.fgvis.defense import activation_bounds


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU6(inplace=True)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.act(e * 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Stem().eval()  # the defence refuses a model in training mode
    x = torch.randn(4, 32, 256, 256) * 3
    e0 = x * torch.rand_like(x) * 1.5
    g = torch.randn_like(x)
    contexts = {"plain": lambda: contextlib.nullcontext(),
                "defended, hooks": lambda: activation_bounds(model, x, fuse=False),
                "defended, fused": lambda: activation_bounds(model, x, fuse=True)}
    times: dict[str, list[float]] = {k: [] for k in contexts}
    for _ in range(args.rounds):
        for name, ctx in contexts.items():
            with ctx():
                e = e0.clone().requires_grad_(True)
                start = time.perf_counter()
                torch.autograd.grad(model(e), e, g)
                times[name].append(time.perf_counter() - start)
    print(f"{hardware()}; activation {tuple(x.shape)}, "
          f"median of {args.rounds} interleaved rounds (the clean pass is outside the timing)")
    base = sorted(times["plain"])[len(times["plain"]) // 2]
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        print(f"  {name:16s} {1000 * t:7.1f} ms   defence adds {1000 * (t - base):6.1f} ms")


if __name__ == "__main__":
    main()
