"""Probe: does the deletion metric's grey substrate, not FGVis's ranking, decide the RDR result?

Why: on the RDR classifier FGVis's deletion curve falls fastest over the first ~2 % of pixels and
then climbs back above every baseline. Two measurements tell apart "the game ranks badly" from
"removing pixels to the data-mean grey is itself evidence for this classifier":

1. *Hard removal of the game's own pixels*: the probability of the explained class after
   setting every pixel whose mean removal exceeds τ to the substrate (all channels, as the
   metric does), against the game's soft answer m·x.
2. *The same metric with a lesion-free substrate*: each eye's median-blurred photograph
   (:func:`retina_fgvis.faithfulness.substrate_batch`, the stand-in the game study uses),
   for FGVis (played with either reference) and the baselines.

Runs on held-out tuning eyes that are NOT among the 60 the faithfulness evaluation reports
(:func:`fgvis_ranking.tuning_batch`). Maps and curves are cached in ``--out`` so that a stopped
run continues where it was.

    python evaluation/faithfulness/probes/deletion_substrate.py --data-root ../shared/data --eyes 6 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgvis_ranking import tuning_batch  # noqa: E402

from retina_fgvis.baselines import explain, restrict_to_fov  # noqa: E402
from retina_fgvis.faithfulness import FAITHFULNESS_FGVIS_SETTINGS, substrate_batch  # noqa: E402
from retina_fgvis.fgvis.games import FGVis  # noqa: E402
from retina_fgvis.metrics.deletion import causal_curves  # noqa: E402

VARIANTS = ("fgvis_r0", "lime", "fgvis_bg", "gradcam", "occlusion", "rise", "gradient", "fgvis_r0_nodefense")
HARD_LEVELS = (0.5, 0.2, 0.05, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--eyes", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS[:5]),
                    help=f"comma-separated, in this order of computation; from {', '.join(VARIANTS)}")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    em, images, x, fov, target = tuning_batch(a.data_root, a.weights, a.eyes)
    background = substrate_batch(em, images, "background", x.device)  # what `--substrate background` uses
    print("eyes", [im.name for im in images], "explained class", target.tolist(), flush=True)

    def cached(name: str, make: Callable[[], object]):
        f = out / f"{name}-{a.eyes}.pt"
        if f.exists():
            return torch.load(f, weights_only=False)  # this probe's own cache (maps, CausalCurves)
        t0 = time.perf_counter()
        value = make()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        torch.save(value, f)
        return value

    def game(reference: torch.Tensor | None, defense: bool = True) -> torch.Tensor:
        r = FGVis(em.model, defense=defense, **FAITHFULNESS_FGVIS_SETTINGS).attribute(
            x, target, fov_mask=fov, reference=reference)
        print("  p after (soft mask)", [round(v, 3) for v in r.target_prob_after.tolist()],
              "changed > 0.5:", [round(v, 4) for v in r.changed_fraction.tolist()], flush=True)
        return r.mean_mask

    makers: dict[str, Callable[[], torch.Tensor]] = {
        "fgvis_r0": lambda: game(None),
        "fgvis_bg": lambda: game(background),
        # the paper does not say whether Table 2 used the defence: does the metric reward a game without it?
        "fgvis_r0_nodefense": lambda: game(None, defense=False),
        "lime": lambda: explain("lime", em.model, x, target, fov_mask=fov, n_samples=500),
        "gradcam": lambda: explain("gradcam", em.model, x, target, fov_mask=fov),
        "occlusion": lambda: explain("occlusion", em.model, x, target, fov_mask=fov),
        "rise": lambda: explain("rise", em.model, x, target, fov_mask=fov, n_masks=1000),
        "gradient": lambda: explain("gradient", em.model, x, target, fov_mask=fov),
    }
    summary: dict[str, object] = {"eyes": [im.name for im in images], "explained_class": target.tolist()}
    for variant in a.variants.split(","):
        imp = restrict_to_fov(cached(variant, makers[variant]).float(), fov.cpu())
        for sub_name, substrate in (("zero", "zero"), ("background", background)):
            cur = cached(f"curve_{variant}_{sub_name}", lambda: causal_curves(
                em.model, x, imp.to(x.device), target=target, mode="deletion", substrate=substrate, batch_size=32))
            summary[f"{variant}|{sub_name}"] = cur.auc.tolist()
            print(f"{variant:10s} {sub_name:10s}", " ".join(f"{v:.3f}" for v in cur.auc.tolist()),
                  f"mean {float(cur.auc.mean()):.4f}", flush=True)
        if variant.startswith("fgvis"):
            substrate = background if variant == "fgvis_bg" else torch.zeros_like(x)
            with torch.no_grad():
                for tau in HARD_LEVELS:
                    hard = (imp > tau)[:, None].to(x.device) & fov[:, None]
                    p = torch.softmax(em.model(torch.where(hard, substrate, x)), 1).gather(1, target[:, None])[:, 0]
                    frac = hard.flatten(1).float().sum(1) / fov.flatten(1).sum(1)
                    summary[f"{variant}|hard>{tau}"] = {"fraction": frac.tolist(), "p": p.tolist()}
                    print(f"  hard removal of pixels with removal > {tau}: FOV share",
                          " ".join(f"{v:.4f}" for v in frac.tolist()), "| p", " ".join(f"{v:.3f}" for v in p.tolist()),
                          flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
