"""Probe: seconds and minor page faults per inference forward pass (the deletion metric's and
RISE's work), glibc's default allocator vs the CLI's kept freed memory, NCHW vs NHWC weights.

Why: ``evaluate faithfulness`` is thousands of forward passes per eye. With glibc's defaults
every activation above the mmap threshold is a fresh mapping, so each pass faults its memory in
again; the CLI keeps freed memory (``retina_fgvis.runtime``). Each configuration runs in its own
process, because the allocator mode is process-wide. Usage (repository root):

    python evaluation/bench/probes/forward_allocator.py [--batch 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from retina_fgvis import runtime
allocator, layout, batch, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if allocator == "kept":
    runtime.keep_freed_memory()
from retina_fgvis import load_classifier
model = load_classifier(None, device="cpu").model
if layout == "NHWC":
    model.to(memory_format=torch.channels_last)
torch.manual_seed(0)
x = torch.randn(batch, 3, 512, 512)
with torch.no_grad():
    model(x)  # first pass: the process's own growth
    faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(repeats):
        model(x)
    seconds = (time.perf_counter() - t0) / repeats
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / repeats
print(json.dumps({"seconds": seconds, "faults": faults,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from retina_fgvis.bench import hardware

    print(f"{hardware()}; RDR classifier at 512 px, batch {a.batch}, "
          f"mean of {a.repeats} forward passes after one warm-up, each row its own process\n")
    print("| allocator | weights | s per batch | s per image | minor faults per batch | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for allocator in ("glibc default", "kept"):
        for layout in ("NCHW", "NHWC"):
            env_alloc = "kept" if allocator == "kept" else "default"
            out = subprocess.run([sys.executable, "-c", CHILD, env_alloc, layout, str(a.batch), str(a.repeats)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[(allocator, layout)] = r
            print(f"| {allocator} | {layout} | {r['seconds']:.2f} | {r['seconds'] / a.batch:.3f} | "
                  f"{r['faults']:.0f} | {r['peak_rss_gb']:.2f} |", flush=True)
    base = rows[("glibc default", "NCHW")]["seconds"]
    print("\nspeed-up against glibc default + NCHW: "
          + ", ".join(f"{al} + {lay} {base / r['seconds']:.2f}x" for (al, lay), r in rows.items()))


if __name__ == "__main__":
    main()
