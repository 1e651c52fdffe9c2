"""fp32 vs bf16-autocast (and NHWC) agreement and throughput of the defended deletion game on DiaretDB1.

Run on a GPU (evaluation/bench/gpu_check.sh): bf16 is only worth having if the lesion
regions it produces are the ones fp32 produces, so the check compares the thresholded
regions (IoU of the flagged pixels, original grid) image by image. Throughput is the full
defended deletion game at the engine's defaults (pruning included), images already decoded
and on the device, after one untimed warm-up game (cuDNN autotuning, allocator).

    python -m retina_fgvis.gpu_agreement --data-dir ../shared/data/diaretdb1 --limit 16 --out agreement.md
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retina_fgvis.bench import hardware
from retina_fgvis.classifier.model import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.fundus.preprocess import stack_prepared
from retina_fgvis.lesions import flag_pixels

#: (label, autocast, channels_last); the first is the reference the others are compared with.
VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("fp32", False, False), ("bf16", True, False), ("bf16 + channels_last", True, True),
)


def flagged_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean maps; two empty maps agree (1.0)."""
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--weights", default=None, help="classifier checkpoint (default: shipped)")
    ap.add_argument("--max-iterations", type=int, default=None, help="iteration cap (quick checks)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    clf = load_classifier(args.weights, device=dev)
    data = DiaretDB1(args.data_dir, split="train")
    n = min(args.limit, len(data))
    items = [data[i] for i in range(n)]
    prepared = [clf.prepare(it.rgb, fov=it.fov) for it in items]
    chunks = []
    for k in range(0, n, args.batch_size):
        part = prepared[k : k + args.batch_size]
        chunks.append((part, *stack_prepared(part, dev)))
    lines = [f"# Defended deletion game on {n} DiaretDB1 training images: fp32 vs bf16 (vs NHWC)", "",
             f"Hardware: {hardware()}; batch {args.batch_size}; classifier {clf.sha256[:12]}…", "",
             "| variant | images/s | s total | mean iterations | goal reached | IoU vs fp32 mean | IoU min |",
             "|---|---|---|---|---|---|---|"]
    flagged: dict[str, list[np.ndarray]] = {}
    for label, autocast, nhwc in VARIANTS:
        if (autocast or nhwc) and dev != "cuda":
            continue
        clf.model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        _, x0, f0 = chunks[0]
        fundus_fgvis(clf, autocast=autocast, channels_last=nhwc, max_iterations=5).attribute(
            x0[:2], target=1, fov_mask=f0[:2])  # warm-up, untimed
        fgvis = fundus_fgvis(clf, autocast=autocast, channels_last=nhwc, max_iterations=args.max_iterations)
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        iters, reached, maps = [], 0, []
        for part, x, fov in chunks:
            res = fgvis.attribute(x, target=1, fov_mask=fov)
            iters += res.iterations.tolist()
            reached += int(res.goal_reached.sum())
            maps += [(p, res.mean_mask[i].numpy()) for i, p in enumerate(part)]
        if dev == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - start
        flagged[label] = [flag_pixels(p.mapping.map_to_original(m, order=1), it.fov)
                          for (p, m), it in zip(maps, items)]
        ious = [flagged_iou(a, b) for a, b in zip(flagged["fp32"], flagged[label])]
        lines.append(f"| {label} | {n / sec:.3f} | {sec:.1f} | {np.mean(iters):.1f} | {reached}/{n} | "
                     f"{np.mean(ious):.3f} | {np.min(ious):.3f} |")
        print(lines[-1], flush=True)
    clf.model.to(memory_format=torch.contiguous_format)
    lines += ["", "IoU: flagged pixels (the lesion-region threshold of `retina_fgvis.lesions.flag_pixels`) on the "
              "original grid, per image; goal >= 0.9 for a variant to replace fp32.", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
