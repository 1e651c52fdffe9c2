"""Profile of one defended and one undefended deletion game (4 iterations, batch 4, 512 px,
shipped classifier, pruning off) on the CPU: which ops grow under the defence.

    python evaluation/bench/probes/profile_defended_game.py > evaluation/bench/probes/profile_defended_game.log
"""
import time, torch
from torch.profiler import profile, ProfilerActivity
from retina_fgvis import load_classifier
from retina_fgvis.fgvis.games import FGVis
torch.manual_seed(0)
clf = load_classifier(); model = clf.model.eval()
x = torch.randn(4, 3, 512, 512)
t = torch.ones(4, dtype=torch.long)
def run(defense, n):
    FGVis(model, defense=defense, max_iterations=n, check_every=n, goal_level=0.0, prune_levels=()).attribute(x, target=t)
run(True, 1); run(False, 1)
for d in (False, True):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter(); run(d, 4); el = time.perf_counter() - t0
    print("defense", d, "total", round(el, 2))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
