"""A/B of the defence's implementation, interleaved in one process (the shared CPU is noisy).

Times one deletion-game iteration (forward + backward w.r.t. the mask) of the shipped classifier
at 512 px: (a) plain, (c_old) the defence as of git revision OLD_REV, (c_new) the current
defence. Usage, from the repository root:

    python evaluation/bench/defense_ab.py [--old-rev 3a02fb8] [--batch 4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from retina_fgvis import load_classifier
from retina_fgvis.fgvis.defense import activation_bounds


def load_old_defense(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:retina_fgvis/fgvis/defense.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_defense.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_defense", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_defense"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="3a02fb8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    old = load_old_defense(args.old_rev)
    model = load_classifier().model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 512, 512) * 0.5
    m0 = torch.full_like(x, 0.9)

    def iteration() -> None:
        m = m0.clone().requires_grad_(True)
        torch.autograd.grad(model(m * x)[:, 1].sum(), m)

    variants = {
        "a_plain": lambda: None,
        "c_old": lambda: old.activation_bounds(model, x, tolerance=1e-6),
        "c_new": lambda: activation_bounds(model, x, tolerance=1e-6),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, make in variants.items():
            ctx = make()
            if ctx is not None:
                ctx.__enter__()
            try:
                iteration()  # warm-up (allocations, buffers)
                t0 = time.perf_counter()
                for _ in range(3):
                    iteration()
                times[name].append((time.perf_counter() - t0) / 3)
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
    a = statistics.median(times["a_plain"])
    print(f"# defence A/B, batch {args.batch}, 512 px, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print("| variant | ms / iteration | ratio to (a) |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1000 * med:.0f} | {med / a:.2f} |")


if __name__ == "__main__":
    main()
