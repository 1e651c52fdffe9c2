"""The Eq. 4-6 defence: exact gradients on hand-checkable networks, per-call bounds on real
architectures, and a clean undo (also after exceptions)."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import pytest

from torchvision.models.googlenet import BasicConv2d

from retina_fgvis import activation_bounds
from retina_fgvis.fgvis.defense import CallSequenceError, DefenseError, UnsupportedNonlinearityError

torch.set_num_threads(1)


class TwoLayer(nn.Module):
    """f(v) = w2 · h(W1 v) with W1 = [[1,0],[0,1],[1,-1]], w2 = [1,1,1]: gradients by hand."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, 3, bias=False)
        self.l2 = nn.Linear(3, 1, bias=False)
        self.act = act
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.l2.weight.fill_(1.0)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.l2(self.act(self.l1(v)))


def mask_gradient(model: nn.Module, x: torch.Tensor, m: torch.Tensor, defend: bool) -> torch.Tensor:
    m = m.clone().requires_grad_(True)
    if defend:
        with activation_bounds(model, x):
            model(m * x).sum().backward()
    else:
        model(m * x).sum().backward()
    return m.grad


def test_relu_gradient_matches_eq6_by_hand() -> None:
    # x = [1, 1]: W1 x = [1, 1, 0] -> bounds b_u = [1, 1, 0], b_l = 0.
    # m = [1, .5]: e = [1, .5], W1 e = [1, .5, .5]; relu' = [1, 1, 1];
    # Eq. 6 indicator [h(e) <= b_u] = [1, 1, 0] (unit 3 would exceed its bound 0).
    # defended  dL/de = W1^T [1, 1, 0] = [1, 1];  dL/dm = x * dL/de = [1, 1]
    # undefended dL/de = W1^T [1, 1, 1] = [2, 0]
    model = TwoLayer(nn.ReLU()).eval()
    x, m = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.5]])
    assert torch.allclose(mask_gradient(model, x, m, True), torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(mask_gradient(model, x, m, False), torch.tensor([[2.0, 0.0]]))


def test_leaky_relu_lower_bound_by_hand() -> None:
    # leaky slope .1; x = [1, 2]: W1 x = [1, 2, -1] -> h(x) = [1, 2, -.1]
    # b_u = [1, 2, 0], b_l = [0, 0, -.1]
    # m = [.25, 1]: e = [.25, 2], W1 e = [.25, 2, -1.75], h(e) = [.25, 2, -.175]
    # indicator = [1, 1, 0]  (-.175 < b_l = -.1);  h' = [1, 1, .1]
    # defended  dL/de = W1^T [1, 1, 0] = [1, 1]      -> dL/dm = x * . = [1, 2]
    # undefended dL/de = W1^T [1, 1, .1] = [1.1, .9] -> dL/dm = [1.1, 1.8]
    model = TwoLayer(nn.LeakyReLU(0.1)).eval()
    x, m = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.25, 1.0]])
    assert torch.allclose(mask_gradient(model, x, m, True), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(mask_gradient(model, x, m, False), torch.tensor([[1.1, 1.8]]))
    # m = [.5, .6]: e = [.5, 1.2], h3(e) = -.07 inside [-.1, 0] -> nothing clipped
    m2 = torch.tensor([[0.5, 0.6]])
    assert torch.allclose(mask_gradient(model, x, m2, True), mask_gradient(model, x, m2, False))


def test_relu6_upper_bound_and_forward_is_unchanged() -> None:
    model = TwoLayer(nn.ReLU6(inplace=True)).eval()
    x = torch.tensor([[1.0, 1.0]])
    e = torch.tensor([[3.0, 0.5]], requires_grad=True)  # W1 e = [3, .5, 2.5] > bounds [1, 1, 0]
    with activation_bounds(model, x) as bounds:
        out = model(e)
        assert bounds.num_calls == 1 and bounds.records[0].op == "hardtanh"
        out.sum().backward()
    # units 1 and 3 exceed their bounds, unit 2 does not: dL/de = W1^T [0, 1, 0] = [0, 1]
    assert torch.allclose(e.grad, torch.tensor([[0.0, 1.0]]))
    # the defence never changes the forward pass (activations are not clamped)
    assert torch.allclose(out, model(e.detach()))


def _module_call_count(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> int:
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def test_resnet50_records_every_call_of_reused_inplace_relus() -> None:
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    n_modules = sum(isinstance(m, nn.ReLU) for m in model.modules())
    with activation_bounds(model, x) as bounds:
        assert bounds.num_calls == 49 == _module_call_count(model, x, (nn.ReLU,))
    assert n_modules == 17


def test_densenet121_functional_relu_is_covered() -> None:
    model = torchvision.models.densenet121().eval()
    x = torch.randn(1, 3, 64, 64)
    module_calls = _module_call_count(model, x, (nn.ReLU,))
    with activation_bounds(model, x) as bounds:
        # every nn.ReLU call plus the F.relu in DenseNet.forward
        assert bounds.num_calls == module_calls + 1 == 121
        assert bounds.records[-1].shape == (1, 1024, 2, 2)


def test_googlenet_functional_inplace_relus() -> None:
    model = torchvision.models.googlenet(aux_logits=False, init_weights=True).eval()
    x = torch.randn(1, 3, 64, 64)
    n_basic = _module_call_count(model, x, (BasicConv2d,))
    with activation_bounds(model, x) as bounds:
        assert bounds.num_calls == n_basic == 57


def test_efficientnet_lite0_relu6() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with activation_bounds(model, x) as bounds:
        assert bounds.num_calls == _module_call_count(model, x, (nn.ReLU6,)) == 33
        assert {r.op for r in bounds.records} == {"hardtanh"}
        assert all(r.nonnegative for r in bounds.records)


@pytest.mark.parametrize("name", ["vgg16", "alexnet"])
def test_sequential_relu_models(name: str) -> None:
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 64, 64)
    with activation_bounds(model, x) as bounds:
        assert bounds.num_calls == _module_call_count(model, x, (nn.ReLU,))


def _state(model: nn.Module) -> tuple:
    return (
        F.relu, torch.relu, torch.relu_, torch.Tensor.relu, F.hardtanh,
        tuple((id(m), len(m._forward_hooks), len(m._forward_pre_hooks), getattr(m, "inplace", None)) for m in model.modules()),
        tuple(p.requires_grad for p in model.parameters()),
        torch._C._len_torch_function_stack(),
    )


class Boom(RuntimeError):
    pass


def test_everything_restored_after_normal_exit_and_exception() -> None:
    model = torchvision.models.resnet18().eval()
    list(model.parameters())[3].requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    before = _state(model)
    with activation_bounds(model, x):
        model(x)
    assert _state(model) == before
    with pytest.raises(Boom):
        with activation_bounds(model, x):
            model(x)
            raise Boom()
    assert _state(model) == before
    # an exception inside the model's own forward pass (during the clean pass)
    def explode(*_: object) -> None:
        raise Boom()
    handle = model.layer2.register_forward_hook(explode)
    with pytest.raises(Boom):
        with activation_bounds(model, x):
            pass
    handle.remove()
    assert _state(model) == before
    # gradients after the context are the plain, unclipped ones again
    e = (x * 0.5).requires_grad_(True)
    model(e).sum().backward()
    g_plain = e.grad.clone()
    e.grad = None
    with torch.no_grad():
        pass
    model(e).sum().backward()
    assert torch.equal(e.grad, g_plain)


def test_fgvis_restores_requires_grad_when_the_game_fails() -> None:
    from retina_fgvis import FGVis

    model = TwoLayerImage()
    flags = [p.requires_grad for p in model.parameters()]
    model.fail_after = 2
    with pytest.raises(Boom):
        FGVis(model, max_iterations=5, goal_level=0.0).attribute(torch.randn(1, 3, 4, 4), target=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training is True
    assert torch._C._len_torch_function_stack() == 0


class TwoLayerImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)
        self.calls, self.fail_after = 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Boom()
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_unsupported_nonlinearity_fails_loudly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.PReLU()).eval()
    with pytest.raises(UnsupportedNonlinearityError, match="prelu"):
        with activation_bounds(model, torch.randn(1, 3, 4, 4)):
            pass
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Mish()).eval()
    with pytest.raises(UnsupportedNonlinearityError, match="mish"):
        with activation_bounds(model, torch.randn(1, 3, 4, 4)):
            pass


def test_changed_call_sequence_fails_loudly() -> None:
    class Variable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(self.n):
                x = F.relu(x)
            return x.mean((1, 2, 3))

    model, x = Variable().eval(), torch.randn(1, 3, 4, 4)
    with activation_bounds(model, x):
        model.n = 2
        with pytest.raises(CallSequenceError, match="relu"):
            model(x)
        model.n = 0
        with pytest.raises(CallSequenceError, match="0 nonlinearity calls"):
            model(x)


def test_subset_selection_uses_each_samples_own_bounds() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(3, 3, 32, 32)
    e = (x * torch.rand_like(x)).requires_grad_(True)
    with activation_bounds(model, x) as bounds:
        model(e).sum().backward()
        full = e.grad.clone()
        sub = e.detach()[[2, 0]].clone().requires_grad_(True)
        bounds.select(torch.tensor([2, 0]))
        model(sub).sum().backward()
    assert torch.allclose(sub.grad, full[[2, 0]], atol=1e-6)



def test_bounds_are_recorded_in_the_games_precision() -> None:
    """With a reduced-precision game (bf16 autocast), the clean pass must run in that precision
    too: fp32 bounds compared with bf16 activations mark units "out of bounds" by rounding alone,
    so the unperturbed image (m = 1) would already lose gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    x = torch.randn(4, 16)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with activation_bounds(model, x, clean_pass_context=bf16, track_violations=True) as bounds:
        assert all(r.upper.dtype == torch.bfloat16 for r in bounds.records)
        e = x.clone().requires_grad_(True)
        with bf16():
            model(e).float().sum().backward()
        assert bounds.last_violation_fraction == 0.0  # m = 1: every unit inside its own bounds
    with activation_bounds(model, x, track_violations=True) as bounds:  # fp32 bounds: the artefact
        assert all(r.upper.dtype == torch.float32 for r in bounds.records)
        e = x.clone().requires_grad_(True)
        with bf16():
            model(e).float().sum().backward()
        assert bounds.last_violation_fraction > 0.05


# ----------------------------------------------------------------- the fused path (ReLU family)

def _defended_grad(model: nn.Module, x: torch.Tensor, e: torch.Tensor, fuse: bool, **kw: object) -> torch.Tensor:
    e = e.clone().requires_grad_(True)
    with activation_bounds(model, x, fuse=fuse, **kw):
        (g,) = torch.autograd.grad(model(e)[:, 0].sum(), e)
    return g


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "densenet121", "mobilenet_v2"])
def test_fused_indicator_gives_the_hook_paths_gradient_bit_for_bit(name: str) -> None:
    """The fused backward (one multiply by h'·[h <= b_u]) must equal op backward + hook multiply
    exactly, on in-place reused ReLUs (ResNet), functional ReLUs (DenseNet) and ReLU6/hardtanh
    (EfficientNet-Lite, MobileNetV2) -- and must actually clip (else the test proves nothing)."""
    torch.manual_seed(0)
    if name.startswith("tf_"):
        model = timm.create_model(name, pretrained=False, num_classes=2).eval()
    else:
        model = getattr(torchvision.models, name)(num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64) * 3  # large inputs: ReLU6 units saturate in the clean pass
    e = x * torch.rand(2, 1, 64, 64) * 1.5  # some units below, some above their bounds
    fused, hooked = _defended_grad(model, x, e, True), _defended_grad(model, x, e, False)
    ep = e.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(ep)[:, 0].sum(), ep)
    assert torch.equal(fused, hooked)
    assert (fused - plain).abs().max() > 1e-2 * plain.abs().max()  # untrained nets: tiny gradients


class _Chain(nn.Module):
    """relu, relu6, hardtanh(0, 2) (fusable), then leaky_relu, hardtanh(-1, 1) (hook path)."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_fns: list[str] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.grad_fns.clear()
        h = h * 1.0
        for f in (F.relu, F.relu6, lambda t: F.hardtanh(t, 0.0, 2.0), F.leaky_relu, F.hardtanh):
            h = f(h)
            self.grad_fns.append(type(h.grad_fn).__name__)
        return h


def test_fused_path_is_taken_for_relu_family_and_hook_path_for_the_rest() -> None:
    model, x = _Chain().eval(), torch.randn(1, 8)
    with activation_bounds(model, x):
        model(x.clone().requires_grad_(True))
    assert model.grad_fns[:3] == ["_ClampWithIndicatorBackward"] * 3
    assert model.grad_fns[3:] == ["LeakyReluBackward0", "HardtanhBackward0"]
    with activation_bounds(model, x, fuse=False):
        model(x.clone().requires_grad_(True))
    assert "_ClampWithIndicatorBackward" not in model.grad_fns


def test_saturated_relu6_unit_passes_no_gradient_by_hand() -> None:
    # W1 x = [7, 6, 0] for x = [7, 6]: b_u = [6, 6, 0] (h = relu6).
    # e = [8, 5]: W1 e = [8, 5, 3] -> h = [6, 5, 3]; relu6' = [0 (saturated), 1, 1];
    # indicator [h <= b_u] = [1, 1, 0] -> only unit 2 passes: dL/de = W1^T [0, 1, 0] = [0, 1]
    model = TwoLayer(nn.ReLU6()).eval()
    x, e = torch.tensor([[7.0, 6.0]]), torch.tensor([[8.0, 5.0]])
    for fuse in (True, False):
        assert torch.equal(_defended_grad(model, x, e, fuse), torch.tensor([[0.0, 1.0]]))
    # unit 2 exactly at the clean value 6 = b_u: relu6'(6) = 0 (PyTorch's convention), so no gradient
    e2 = torch.tensor([[5.0, 6.0]])  # W1 e = [5, 6, -1] -> passes unit 1 only
    for fuse in (True, False):
        assert torch.equal(_defended_grad(model, x, e2, fuse), torch.tensor([[1.0, 0.0]]))


def test_violation_fraction_is_the_same_on_both_paths() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU6(inplace=True), nn.Linear(64, 2)).eval()
    x = torch.randn(4, 16) * 4
    fractions = []
    for fuse in (True, False):
        with activation_bounds(model, x, fuse=fuse, track_violations=True) as bounds:
            model((x * 1.3).requires_grad_(True)).sum().backward()
            fractions.append(bounds.last_violation_fraction)
    assert fractions[0] == fractions[1] > 0


def test_second_backward_through_a_fused_graph_is_refused() -> None:
    """The fused backward reuses its mask buffer for the gradient; a retained graph must not
    silently give a wrong second gradient."""
    model = TwoLayer(nn.ReLU()).eval()
    x = torch.tensor([[1.0, 1.0]])
    e = x.clone().requires_grad_(True)
    with activation_bounds(model, x):
        out = model(e).sum()
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_defended_game_masks_are_identical_with_the_fused_path() -> None:
    from retina_fgvis import FGVis

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(0.01)  # an untrained head saturates p at 1: nothing to delete
    x = torch.randn(2, 3, 64, 64)
    results = []
    for fuse in (True, False):
        results.append(FGVis(model, max_iterations=12, goal_level=0.0, defense_fuse=fuse).attribute(x, target=1).mask)
    assert torch.equal(results[0], results[1])
    assert (results[0] < 1).any()


def test_fused_path_under_bf16_autocast_matches_hooks_and_keeps_m1_in_bounds() -> None:
    """bf16 games (CUDA autocast; CPU autocast here): the fused ReLU6 bound is capped just below 6
    in bf16 (5.96875), gradients equal the hook path's, and at m = 1 nothing is out of bounds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU6(inplace=True), nn.Linear(64, 64), nn.ReLU6(), nn.Linear(64, 2)).eval()
    x = torch.randn(4, 16) * 4
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    grads = []
    for fuse in (True, False):
        with activation_bounds(model, x, clean_pass_context=bf16, fuse=fuse, track_violations=True) as bounds:
            if fuse:
                assert all(r.grad_upper is not None and r.grad_upper.dtype == torch.bfloat16 for r in bounds.records)
                assert max(float(r.grad_upper.max()) for r in bounds.records) <= 5.96875
            e = x.clone().requires_grad_(True)
            with bf16():
                model(e).float().sum().backward()
            assert bounds.last_violation_fraction == 0.0
            e2 = (x * 1.5).requires_grad_(True)
            with bf16():
                (g,) = torch.autograd.grad(model(e2).float()[:, 0].sum(), e2)
            grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_compiled_masks_give_the_eager_gradients_and_fall_back_when_compiling_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI builds the fused path's masks with torch.compile (one kernel): same 0/1 values, so the
    same gradients; a machine without a working compiler gets one warning and the eager kernels."""
    from retina_fgvis.fgvis import defense

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64) * 3
    e = x * torch.rand(2, 1, 64, 64) * 1.5
    eager = _defended_grad(model, x, e, True)
    monkeypatch.setattr(defense, "_compiled_mask", None)
    defense.use_compiled_masks(True)
    assert defense.compiled_masks_enabled()
    assert torch.equal(_defended_grad(model, x, e, True), eager)

    def broken(*_: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(defense, "_compiled_mask", broken)
    with pytest.warns(RuntimeWarning, match="compiled defence masks unavailable.*no C\\+\\+ compiler"):
        assert torch.equal(_defended_grad(model, x, e, True), eager)
    assert not defense.compiled_masks_enabled()


class _SliceInPlace(nn.Module):
    """An in-place nonlinearity on a channel slice (a view) whose base goes on through the network;
    ``out_of_place=True`` is the same function written without the in-place call."""

    def __init__(self, op, out_of_place: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)
        self.op, self.out_of_place = op, out_of_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        if self.out_of_place:
            h = torch.cat([self.op(h[:, :4].clone()), h[:, 4:]], 1)
        else:
            self.op(h[:, :4])
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name", ["relu_", "leaky_relu_", "tanh_"])
def test_inplace_call_on_a_view_is_defended(name: str, fuse: bool) -> None:
    """A gradient hook on a view changed in place never fires (the gradient flows through the
    base's history): such a call was silently undefended on the hook path. Its defended gradient
    must equal that of the same model written out of place, and differ from the undefended one."""
    op = {"relu_": torch.relu_, "leaky_relu_": lambda t: F.leaky_relu_(t, 0.1), "tanh_": torch.tanh_}[name]
    x = torch.randn(2, 3, 8, 8)
    m0 = 1 - 0.3 * torch.rand_like(x)
    grads = []
    for out_of_place in (False, True):
        net = _SliceInPlace(op, out_of_place).eval().requires_grad_(False)
        m = m0.clone().requires_grad_(True)
        with activation_bounds(net, x, fuse=fuse):
            net(m * x)[:, 1].sum().backward()
        grads.append(m.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.allclose(grads[0], mask_gradient_of(_SliceInPlace(op).eval().requires_grad_(False), x, m0))


def mask_gradient_of(net: nn.Module, x: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    m = m0.clone().requires_grad_(True)
    net(m * x)[:, 1].sum().backward()
    return m.grad


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_is_refused_and_everything_is_undone(reentrant: bool, fuse: bool) -> None:
    """Checkpointed blocks are recomputed in the backward pass, outside the defence: the gradient
    would silently lose Eq. 6 (or take the wrong saved tensor on the fused path)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            h = checkpoint(lambda t: torch.relu(self.block(t)), h, use_reentrant=reentrant)
            return self.fc(h.mean((2, 3)))

    net = Net().eval().requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    m = torch.full_like(x, 0.7).requires_grad_(True)
    with pytest.raises(DefenseError, match="checkpointing"):
        with activation_bounds(net, x, fuse=fuse):
            net(m * x).sum().backward()
    assert not net._forward_pre_hooks and not net._forward_hooks
    net(m * x).sum().backward()  # the plain model still works


def test_a_call_on_a_parameter_keeps_its_bounds_when_samples_leave_the_batch() -> None:
    """``sigmoid(gate)`` has no batch dimension: sub-selecting its bounds like an activation's
    made a batched game fail as soon as one sample finished."""
    from retina_fgvis.fgvis.games import FGVis

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2)
            self.gate = nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c(x)) * torch.sigmoid(self.gate)[None, :, None, None]
            return self.fc(h.mean((2, 3)))

    model = Gated().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    # sample 1 explains its least likely class: p < 0.5 already holds at m0, it leaves the batch at once
    target = torch.stack([logits[0].argmax(), logits[1].argmin(), logits[2].argmax()])
    fgvis = FGVis(model, defense=True, max_iterations=30, check_every=5, goal="threshold", goal_level=0.5)
    batched = fgvis.attribute(x, target)
    singles = [fgvis.attribute(x[i:i + 1], target[i:i + 1]) for i in range(3)]
    assert len(set(int(n) for n in batched.iterations)) > 1  # samples did leave the batch
    for i, single in enumerate(singles):
        assert int(batched.iterations[i]) == int(single.iterations[0])
        assert torch.allclose(batched.mask[i], single.mask[0], atol=1e-5)
