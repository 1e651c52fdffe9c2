"""Probe: ways to apply Eq. 6 inside a ReLU6's autograd function, timed on one large activation.

One batch-4 expansion activation of EfficientNet-Lite0 at 512 px (4 x 96 x 256 x 256), in-place
ReLU6, fwd+bwd, median of 9 interleaved rounds; every variant's gradient is checked equal to the
shipped one (F1). Run with the CLI's allocator setting so that page faults do not blur it:

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
        python evaluation/bench/probes/mask_variants.py

F1 (shipped): forward mask = clone().le_(b_u').mul_(h).sign_(), backward mask.mul_(grad).
F6: forward mask by sub / minimum / gt_. F4: nothing in the forward, backward sub +
threshold_backward + hardtanh_backward. F5: backward torch.where(h < b_u+, ...).
F8: forward [h <= b_u'] only, backward the op's hardtanh_backward multiplied into it in place.
"""
import time

import torch
import torch.nn.functional as F  # noqa: N812
torch.set_num_threads(2)
torch.manual_seed(0)
shape = (4, 96, 256, 256)
x0 = torch.randn(shape) * 3
u = (torch.randn(shape) * 3).clamp_(0, 6)
below6 = float(torch.nextafter(torch.tensor(6.0), torch.tensor(0.0)))
gu = u.clamp(max=below6)
up = torch.nextafter(gu, torch.tensor(float("inf")))  # y <= gu  <=>  y < up
g = torch.randn(shape)
HB = torch.ops.aten.hardtanh_backward
TB = torch.ops.aten.threshold_backward

def variant(save, grad):
    """An in-place ReLU6 whose forward saves ``save(h)`` and whose backward is ``grad(g, *saved)``."""
    class Variant(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = F.hardtanh(x, 0., 6., inplace=True)
            ctx.mark_dirty(x)
            ctx.save_for_backward(*save(y))
            return y

        @staticmethod
        def backward(ctx, go):
            return grad(go, *ctx.saved_tensors)
    return Variant.apply


def _f6_mask(y):
    d = torch.sub(up, y)
    torch.minimum(d, y, out=d)
    return (d.gt_(0),)


F1 = variant(lambda y: (y.clone().le_(gu).mul_(y).sign_(),), lambda go, m: m.mul_(go))
F6 = variant(_f6_mask, lambda go, m: m.mul_(go))
F4 = variant(lambda y: (y,), lambda go, y: HB(TB(go, torch.sub(up, y), 0), y, 0., 6.))
F5 = variant(lambda y: (y,), lambda go, y: torch.where(y.lt(up), HB(go, y, 0., 6.), 0.))
F8 = variant(lambda y: (y, y.clone().le_(gu)), lambda go, y, k: k.mul_(HB(go, y, 0., 6.)))


def plain(x): return F.hardtanh(x, 0., 6., inplace=True)
V = {"plain": plain, "F1 shipped": F1, "F6 sub/min/gt": F6, "F4 bwd sub+TB+HB": F4, "F5 bwd where(lt)": F5,
     "F8 le fwd, k.mul_(HB)": F8}
def run(f):
    x = x0.clone().requires_grad_(True)
    s = time.perf_counter()
    y = f(x * 1.0)
    (gx,) = torch.autograd.grad(y, x, g)
    return time.perf_counter() - s, gx
ref = run(F1)[1]
for k, f in V.items():
    print(k, "equal to F1:", torch.equal(run(f)[1], ref))
res = {k: [] for k in V}
for r in range(9):
    for k, f in V.items():
        res[k].append(run(f)[0])
base = sorted(res["plain"])[4]
for k, v in res.items():
    m = sorted(v)[4]
    print(f"{k:20s} {1000*m:7.1f} ms  extra {1000*(m-base):6.1f} ms")
