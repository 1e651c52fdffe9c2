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
from retina_fgvis.fgvis.defense import CallSequenceError, UnsupportedNonlinearityError

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
    model = TwoLayer(nn.ReLU())
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
    model = TwoLayer(nn.LeakyReLU(0.1))
    x, m = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.25, 1.0]])
    assert torch.allclose(mask_gradient(model, x, m, True), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(mask_gradient(model, x, m, False), torch.tensor([[1.1, 1.8]]))
    # m = [.5, .6]: e = [.5, 1.2], h3(e) = -.07 inside [-.1, 0] -> nothing clipped
    m2 = torch.tensor([[0.5, 0.6]])
    assert torch.allclose(mask_gradient(model, x, m2, True), mask_gradient(model, x, m2, False))


def test_relu6_upper_bound_and_forward_is_unchanged() -> None:
    model = TwoLayer(nn.ReLU6(inplace=True))
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
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.PReLU())
    with pytest.raises(UnsupportedNonlinearityError, match="prelu"):
        with activation_bounds(model, torch.randn(1, 3, 4, 4)):
            pass
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Mish())
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

    model, x = Variable(), torch.randn(1, 3, 4, 4)
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
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
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
