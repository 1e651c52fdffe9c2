"""Probe: how input discovery scales with the number of inputs given (session 16).

`screen site/*/` (one folder per patient) or `screen site/*/*.png` names one input root per
folder or file. Discovery used to scan every root for every file (quadratic: 5000 roots took
31 s in the session-16 scale audit); it now walks each file's parents once. This times
`discover_inputs` on N patient folders with two (empty) eye files each, given three ways, and
prints the hardware. Output: discovery_roots.log.
    python evaluation/bench/probes/discovery_roots.py [N ...]
"""
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from retina_fgvis.screening import discover_inputs


def timed(inputs):
    start = time.perf_counter()
    items, _ = discover_inputs(inputs)
    return time.perf_counter() - start, len(items)


def main(sizes):
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            base = Path(tmp) / f"site{n}"
            for k in range(n // 2):
                folder = base / f"P{k:05d}"
                folder.mkdir(parents=True)
                for eye in ("left", "right"):
                    (folder / f"{eye}.png").write_bytes(b"")
            folders = sorted(p for p in base.iterdir())
            files = sorted(base.glob("*/*.png"))
            one, n_one = timed([base])
            many, n_many = timed(folders)
            each, n_each = timed(files)
            assert n_one == n_many == n_each == n
            print(f"{n:6d} images: one folder {one:6.2f} s | {len(folders):5d} folders {many:6.2f} s | "
                  f"{len(files):5d} files {each:6.2f} s")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [500, 2000, 5000])
