"""Probe: how much faster is the faithfulness evaluation with NHWC (channels-last) weights on a
CPU, and do its numbers change?

Why: on a 2-core CPU one eye of the 60-eye RDR evaluation costs minutes per method, almost all of
it forward passes (225 per deletion curve, 1000 for RISE). ``retina_fgvis.memory_layout`` makes
NHWC the CPU default; this probe is the measurement behind that default and behind the claim that
records from NCHW and NHWC runs may be mixed in one table.

It times, per layout, the three kinds of work on the RDR classifier (512 px): the deletion metric
(225 forward passes per eye, of a plain-gradient map), RISE (``--rise-masks`` forward passes per
eye) and the defended FGVis game (``--fgvis-iterations`` forward + backward passes); NCHW runs
first and again last, so a drift of the machine's speed shows. It then prints the largest
difference between the layouts: deletion AUCs, RISE maps and FGVis masks.

Runs on held-out tuning eyes that are NOT among the 60 the faithfulness evaluation reports.

    python evaluation/faithfulness/probes/memory_layout_cpu.py --data-root ../shared/data --eyes 2
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgvis_ranking import tuning_batch  # noqa: E402

from retina_fgvis.baselines import explain  # noqa: E402
from retina_fgvis.faithfulness import FAITHFULNESS_FGVIS_SETTINGS  # noqa: E402
from retina_fgvis.memory_layout import model_layout  # noqa: E402
from retina_fgvis.metrics.deletion import deletion  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eyes", type=int, default=2)
    ap.add_argument("--rise-masks", type=int, default=128)
    ap.add_argument("--fgvis-iterations", type=int, default=20)
    a = ap.parse_args()
    em, images, x, fov, target = tuning_batch(a.data_root, a.weights, a.eyes)
    if em.device.type != "cpu":
        sys.exit("this probe measures the CPU path; run it without a GPU or with CUDA_VISIBLE_DEVICES=")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(images)} tuning eyes at {x.shape[-1]} px", flush=True)
    fgvis_opts = {**FAITHFULNESS_FGVIS_SETTINGS, "max_iterations": a.fgvis_iterations}

    def measure(channels_last: bool) -> dict:
        out: dict = {}
        with model_layout(em.model, channels_last):
            grad = explain("gradient", em.model, x, target)
            t0 = time.perf_counter()
            out["auc"] = deletion(em.model, x, grad, target=target, batch_size=64).auc
            out["metric"] = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            out["rise_map"] = explain("rise", em.model, x, target, n_masks=a.rise_masks, batch_size=64)
            out["rise"] = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            out["fgvis_map"] = explain("fgvis", em.model, x, target, fov_mask=fov, **fgvis_opts)
            out["fgvis"] = (time.perf_counter() - t0) / len(images)
        return out

    nchw, nhwc, nchw_again = measure(False), measure(True), measure(False)
    work = {"metric": "deletion metric (225 forward passes)",
            "rise": f"RISE ({a.rise_masks} masks)",
            "fgvis": f"FGVis defended ({a.fgvis_iterations} iterations)"}
    print("\n| work, s per eye | NCHW | NHWC | NCHW again | speed-up (mean NCHW / NHWC) |\n|---|---|---|---|---|")
    for k, label in work.items():
        ref = (nchw[k] + nchw_again[k]) / 2
        print(f"| {label} | {nchw[k]:.1f} | {nhwc[k]:.1f} | {nchw_again[k]:.1f} | {ref / nhwc[k]:.2f}x |")
    print(f"\nlargest |difference| NHWC vs NCHW: deletion AUC {(nhwc['auc'] - nchw['auc']).abs().max():.2e}, "
          f"RISE map {(nhwc['rise_map'] - nchw['rise_map']).abs().max():.2e} "
          f"(map range {float(nchw['rise_map'].max() - nchw['rise_map'].min()):.3f}), "
          f"FGVis mean mask {(nhwc['fgvis_map'] - nchw['fgvis_map']).abs().max():.2e}")
    print(f"NCHW run twice: deletion AUC {(nchw_again['auc'] - nchw['auc']).abs().max():.2e}, "
          f"FGVis mean mask {(nchw_again['fgvis_map'] - nchw['fgvis_map']).abs().max():.2e} (run-to-run)")


if __name__ == "__main__":
    main()
