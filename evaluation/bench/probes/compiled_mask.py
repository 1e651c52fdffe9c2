"""Probe: the fused defence's 0/1 mask, eager (four in-place passes) vs one torch.compile'd kernel.

One batch-4 EfficientNet-Lite0 expansion activation at 512 px (4 x 96 x 256 x 256), median of 9
interleaved rounds, plus the compile time (cold, or warm from Inductor's on-disk cache when run
a second time). Run with the CLI's allocator setting so that page faults do not blur it:

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
        python evaluation/bench/probes/compiled_mask.py
"""
from __future__ import annotations

import time

import torch

from retina_fgvis.bench import hardware
from retina_fgvis.fgvis.defense import _eager_mask, _mask_expression


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = (4, 96, 256, 256)
    h = (torch.randn(shape) * 3).clamp_(0, 6)
    upper = (torch.randn(shape) * 3).clamp_(0, 5.99)
    start = time.perf_counter()
    compiled = torch.compile(_mask_expression, dynamic=True)
    same = torch.equal(compiled(h, upper), _eager_mask(h, upper))
    print(f"{hardware()}; activation {shape}")
    print(f"compile + first call {time.perf_counter() - start:.1f} s; identical to the eager mask: {same}")
    variants = {"eager (clone.le_.mul_.sign_)": lambda: _eager_mask(h, upper),
                "compiled": lambda: compiled(h, upper), "a plain clone, for scale": lambda: h.clone()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(9):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"  {name:30s} {1000 * sorted(ts)[4]:6.1f} ms")


if __name__ == "__main__":
    main()
