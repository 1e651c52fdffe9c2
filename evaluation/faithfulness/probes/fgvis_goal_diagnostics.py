"""Probe: what the defended deletion game returns under the evaluation's goals, per tuning eye.

Why: ``fgvis_goal.py`` found the same deletion AUC for goal fractions 0.01, 0.1 and 0.3 on several
non-referable tuning eyes, as if the game's map did not depend on the goal. This prints the game's
own diagnostics (goal, probability reached, whether the goal was reached, changed and removed
share of the field of view, pruning level, share of FOV pixels the map leaves tied at zero) for
the goal settings compared there, on the same tuning eyes (not among the 60 reported ones).

    python evaluation/faithfulness/probes/fgvis_goal_diagnostics.py --data-root ../shared/data --eyes 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgvis_goal import VARIANTS  # noqa: E402  (the goal probe's settings, by name)
from fgvis_ranking import tuning_batch  # noqa: E402  (same tuning eyes as the other probes)

from retina_fgvis.commands.fgvis_options import parse_fgvis_settings  # noqa: E402
from retina_fgvis.faithfulness import FAITHFULNESS_FGVIS_SETTINGS  # noqa: E402
from retina_fgvis.fgvis.games import FGVis  # noqa: E402

#: the goal probe's variants looked at here, resolved exactly as ``evaluate faithfulness`` does
#: (the evaluation's FGVis settings, then the variant's ``--fgvis-setting`` overrides)
GOALS: dict[str, dict] = {
    name: {**FAITHFULNESS_FGVIS_SETTINGS, **parse_fgvis_settings(VARIANTS[name])}
    for name in ("fraction-0.1 (evaluation)", "fraction-0.3", "reference (p of the blank eye)")
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--eyes", type=int, default=8)
    a = ap.parse_args()
    em, images, x, fov, target = tuning_batch(a.data_root, None, a.eyes)
    rows = []
    for name, settings in GOALS.items():
        res = FGVis(em.model, defense=True, **settings).attribute(x, target, game="deletion", fov_mask=fov, reference=0.0)
        inside = fov.cpu().bool() if fov is not None else torch.ones_like(res.mean_mask, dtype=torch.bool)
        for i, im in enumerate(images):
            s = res.summary(i)
            untouched = (res.mean_mask[i][inside[i]] == 0).float().mean().item()
            rows.append({"setting": name, "image": im.name, "class": em.class_name(int(target[i])),
                         "p_before": round(s["target_prob_before"], 4), "goal": round(s["goal_prob"], 4),
                         "p_after": round(s["target_prob_after"], 4), "reached": s["goal_reached"],
                         "iterations": s["iterations"], "changed_%": round(100 * s["changed_fraction"], 3),
                         "removed_mass": round(s["removed_mass"], 5), "prune_level": s["prune_level"],
                         "untouched_%": round(100 * untouched, 2)})
        print(pd.DataFrame(rows[-len(images):]).to_string(index=False), flush=True)
    pd.set_option("display.width", 200)
    print("\nall settings:\n" + pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
