"""Probe: the defence's cost per iteration with realistic masks (session 4).

defense_ab.py times m = 0.9 on x ~ 0.5 N(0, 1); this times plain vs defended fwd+bwd at batch 4 for
m = 0.9, m = 1 and the mask after 6 defended game iterations, x ~ N(0, 1) times SCALE (default 1;
0.5 reproduces defense_ab.py's input). Output: ab_realistic.log.
    python evaluation/bench/probes/ab_realistic.py [SCALE]
"""
import sys, torch, time, statistics
from retina_fgvis import load_classifier
from retina_fgvis.fgvis.defense import activation_bounds
from retina_fgvis.fgvis.games import FGVis
clf = load_classifier(); model = clf.model.eval()
for p in model.parameters(): p.requires_grad_(False)
torch.manual_seed(0)
x = torch.randn(4, 3, 512, 512) * (float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
res = FGVis(model, defense=True, max_iterations=6, check_every=6, goal_level=0.0, prune_levels=()).attribute(x, target=1)
masks = {"m=0.9": torch.full_like(x, 0.9), "m=1": torch.ones_like(x), "game mask (6 it)": res.mask}
def it(m0):
    m = m0.clone().requires_grad_(True)
    torch.autograd.grad(model(m * x)[:, 1].sum(), m)
out = {}
for r in range(3):
    for name, m0 in masks.items():
        for d in (False, True):
            ctx = activation_bounds(model, x, tolerance=1e-6) if d else None
            if ctx: ctx.__enter__()
            try:
                it(m0); t = time.perf_counter(); it(m0); it(m0); dt = (time.perf_counter() - t) / 2
            finally:
                if ctx: ctx.__exit__(None, None, None)
            out.setdefault((name, d), []).append(dt)
for name in masks:
    a, c = statistics.median(out[(name, False)]), statistics.median(out[(name, True)])
    print(f"{name:18s} plain {a*1000:.0f} ms  defended {c*1000:.0f} ms  ratio {c/a:.2f}", flush=True)
