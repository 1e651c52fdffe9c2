"""fp32 vs bf16-autocast agreement and throughput of the defended deletion game on DiaretDB1.

Run on a GPU (evaluation/bench/gpu_check.sh): bf16 is only worth having if the lesion
regions it produces are the ones fp32 produces, so the check compares the thresholded
regions (IoU of the flagged pixels, original grid) image by image.

    python -m retina_fgvis.gpu_agreement --data-dir ../shared/data/diaretdb1 --limit 16 --out agreement.md
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retina_fgvis.classifier.model import load_classifier
from retina_fgvis.datasets.diaretdb1 import DiaretDB1
from retina_fgvis.fgvis.presets import fundus_fgvis
from retina_fgvis.lesions import flag_pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    clf = load_classifier(device=dev)
    data = DiaretDB1(args.data_dir, split="train")
    items = [data[i] for i in range(min(args.limit, len(data)))]
    prepared = [clf.prepare(it.rgb, fov=it.fov) for it in items]
    maps: dict[bool, list[np.ndarray]] = {}
    lines = [f"# fp32 vs bf16, defended deletion game, {len(items)} DiaretDB1 training images, device {dev}", ""]
    for autocast in (False, True):
        fgvis = fundus_fgvis(clf, autocast=autocast)
        maps[autocast] = []
        start = time.perf_counter()
        iters = []
        for k in range(0, len(items), args.batch_size):
            chunk = prepared[k : k + args.batch_size]
            x = torch.stack([p.tensor for p in chunk]).to(dev)
            fov = torch.stack([torch.from_numpy(np.ascontiguousarray(p.fov_model)) for p in chunk]).to(dev)
            res = fgvis.attribute(x, target=1, fov_mask=fov)
            iters += res.iterations.tolist()
            for i, p in enumerate(chunk):
                maps[autocast].append(p.mapping.map_to_original(res.mean_mask[i].numpy(), order=1))
        if dev == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - start
        lines.append(f"- {'bf16' if autocast else 'fp32'}: {len(items) / sec:.2f} images/s, mean iterations {np.mean(iters):.1f}")
    ious = []
    for a, b, it in zip(maps[False], maps[True], items):
        fa, fb = flag_pixels(a, it.fov), flag_pixels(b, it.fov)
        union = (fa | fb).sum()
        ious.append(float((fa & fb).sum() / union) if union else 1.0)
    lines += ["", f"IoU of flagged pixels fp32 vs bf16: mean {np.mean(ious):.3f}, min {np.min(ious):.3f} (goal >= 0.9)"]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
