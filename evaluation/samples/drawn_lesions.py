"""Where are the regions found on the phantom SYNB, relative to the lesions drawn into it?

The phantom is generated (``retina_fgvis.samples.phantom_fundus``, seed 7, 512 px, the
bundled ``data/samples/SYNB_right.png``), so its drawn lesions are known exactly: red dots,
blot haemorrhages and hard-exudate clusters, each a centre and a radius. For every SYNB region
of a ``lesions.csv`` this prints the nearest drawn lesion and the gap between the region's
bounding box and the lesion's disc (0: they touch or overlap). Usage, from the repository root:

    python evaluation/samples/drawn_lesions.py evaluation/samples/lesions.csv [more lesions.csv ...]
"""
from __future__ import annotations

import argparse
import math

from retina_fgvis.samples import phantom_fundus
from retina_fgvis.screening import read_results_csv


def box_gap(box: tuple[int, int, int, int], x: float, y: float, r: float) -> float:
    """Pixels between a (row0, col0, row1, col1) box, ends inclusive, and the disc at (x, y) of radius r."""
    row0, col0, row1, col1 = box
    dy = max(row0 - y, 0.0, y - row1)
    dx = max(col0 - x, 0.0, x - col1)
    return max(0.0, math.hypot(dx, dy) - r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lesions_csv", nargs="+")
    args = ap.parse_args()
    _, drawn = phantom_fundus(seed=7, eye="right")
    for path in args.lesions_csv:
        rows = read_results_csv(path)
        rows = rows[rows.file == "SYNB_right.png"]
        print(f"{path}: {len(rows)} SYNB regions")
        for _, reg in rows.iterrows():
            box = (int(reg.row0), int(reg.col0), int(reg.row1), int(reg.col1))
            gap, kind, (x, y, r) = min((box_gap(box, *lesion), kind, lesion)
                                       for kind, lesions in drawn.items() for lesion in lesions)
            print(f"  region {int(reg.region)} ({reg.kind}, {int(reg.area_px)} px, rows {box[0]}-{box[2]}, "
                  f"cols {box[1]}-{box[3]}): nearest drawn lesion {kind} at row {y}, col {x}, radius {r}; gap {gap:.1f} px")


if __name__ == "__main__":
    main()
