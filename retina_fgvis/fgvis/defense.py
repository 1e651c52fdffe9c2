"""FGVis adversarial defence (Wagner et al. 2019, §3.2, Eq. 4-6) for any CNN.

Why per *call* and not per module: ResNet reuses one in-place ``nn.ReLU`` module three times
per block (17 modules, 49 calls per forward pass) and DenseNet/GoogLeNet call ``F.relu``
directly. Bounds recorded per module silently mix activations of different layers; bounds
recorded per call in call order are exact.

How calls are caught: a :class:`torch.overrides.TorchFunctionMode` sees every Python-level
call of ``torch.relu``, ``F.relu``, ``Tensor.relu_``, ``F.hardtanh`` (``nn.ReLU6``), ... no
matter whether it comes from a module, a functional call or a tensor method, in-place or not.
Nothing global is patched: the mode is thread-local and popped in ``__exit__``; the two hooks
on the root module (which delimit one forward pass) are removed there too, also when the body
raises.

What happens in a call:

* clean pass (inside ``__enter__``): ``h(x)`` is recorded per call and per sample;
* later forward passes: the nonlinearity runs unchanged (the defence is the identity in the
  forward pass, activations are *not* clamped) and a gradient hook multiplies the incoming
  gradient by Eq. 6's indicator ``[b_l <= h(e) <= b_u]`` with ``b_u = max(0, h(x))`` and
  ``b_l = min(0, h(x))``.

Softmax / log-softmax (the final classification layer) are never clipped. Nonlinearities for
which the bound argument has not been checked (PReLU, SELU, Mish, ...) raise
:class:`UnsupportedNonlinearityError` rather than silently leaving a hole in the defence.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "ActivationBounds",
    "activation_bounds",
    "DefenseError",
    "UnsupportedNonlinearityError",
    "CallSequenceError",
    "SUPPORTED_NONLINEARITIES",
]


class DefenseError(RuntimeError):
    """Base class of the defence's errors (one line, names the op)."""


class UnsupportedNonlinearityError(DefenseError):
    """The model calls a nonlinearity whose Eq. 4 bounds the defence does not implement."""


class CallSequenceError(DefenseError):
    """A forward pass calls nonlinearities in another order/shape than the clean pass did."""


def _names(*funcs: Callable[..., Any]) -> dict[Callable[..., Any], str]:
    return {f: getattr(f, "__name__", repr(f)).rstrip("_") for f in funcs}


# Nonlinearities whose output is always >= 0 (b_l = 0, so only the upper bound can be left).
_NONNEGATIVE = _names(
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
    F.relu6, F.sigmoid, torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_,
    F.hardsigmoid,
)
# Signed nonlinearities: both bounds apply.
_SIGNED = _names(
    F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.silu, F.gelu, F.hardswish, F.tanh, torch.tanh, torch.tanh_, torch.Tensor.tanh,
    torch.Tensor.tanh_,
)
# Known nonlinearities the defence refuses, loudly.
_UNSUPPORTED = _names(
    F.prelu, torch.prelu, F.selu, torch.selu, torch.selu_, F.celu, torch.celu, torch.celu_,
    F.mish, F.softplus, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_, F.glu, F.logsigmoid,
    F.threshold, F.threshold_, torch.threshold, torch.threshold_, F.softsign, F.tanhshrink,
    F.softshrink, F.hardshrink,
)
SUPPORTED_NONLINEARITIES: frozenset[str] = frozenset(_NONNEGATIVE.values()) | frozenset(_SIGNED.values())


def _hardtanh_is_nonnegative(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    min_val = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    return float(min_val) >= 0.0


@dataclass
class CallRecord:
    """One nonlinearity call of the clean pass: op name, output shape, Eq. 5 bounds.

    The bounds are computed once here (tolerance included) rather than at every iteration:
    ``upper`` = max(0, h(x)), ``lower`` = min(0, h(x)), or None for nonnegative ops, whose
    output can never fall below b_l = 0.
    """

    op: str
    shape: tuple[int, ...]
    upper: torch.Tensor  # batch-first
    lower: torch.Tensor | None
    nonnegative: bool


class _BoundsMode(TorchFunctionMode):
    """Intercepts nonlinearity calls while the explained model's forward pass runs."""

    def __init__(self, owner: "ActivationBounds") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        owner = self.owner
        if not owner._in_forward:
            return func(*args, **kwargs)
        if func in _UNSUPPORTED:
            raise UnsupportedNonlinearityError(
                f"activation_bounds: the model calls '{_UNSUPPORTED[func]}', a nonlinearity the "
                f"FGVis defence does not support (supported: {', '.join(sorted(SUPPORTED_NONLINEARITIES))})"
            )
        name = _NONNEGATIVE.get(func) or _SIGNED.get(func)
        if name is None:
            return func(*args, **kwargs)
        nonnegative = func in _NONNEGATIVE or (name == "hardtanh" and _hardtanh_is_nonnegative(args, kwargs))
        out = func(*args, **kwargs)
        owner._on_call(name, out, nonnegative)
        return out


class ActivationBounds:
    """Context manager implementing Eq. 6 for ``model`` around the original batch ``x``.

    Use::

        with activation_bounds(model, x) as bounds:
            logits = model(mask * x)      # forward unchanged, backward clipped per Eq. 6
            loss.backward()

    ``bounds.select(indices)`` restricts later passes to a subset of the original samples
    (the games drop finished samples from the batch); ``bounds.records`` lists the clean
    pass's calls; ``bounds.last_violation_fraction`` is the share of units outside their
    bounds in the latest pass (a diagnostic, computed only when ``track_violations``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        *,
        tolerance: float = 0.0,
        track_violations: bool = False,
        clean_pass_context: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model
        # e.g. the explainer's bf16 autocast: bounds must come from the precision the later
        # passes run in, or rounding alone puts units outside them
        self.clean_pass_context = clean_pass_context
        self.x = x
        self.tolerance = float(tolerance)
        self.track_violations = track_violations
        self.records: list[CallRecord] = []
        self._recording = False
        self._in_forward = False
        self._call_index = 0
        self._selection: torch.Tensor | None = None
        self._selected_refs: list[torch.Tensor] | None = None
        self._handles: list[Any] = []
        self._mode: _BoundsMode | None = None
        self._violations: list[torch.Tensor] = []
        self.last_violation_fraction: float | None = None

    # ----------------------------------------------------------------- context protocol
    def __enter__(self) -> "ActivationBounds":
        self._handles.append(self.model.register_forward_pre_hook(self._forward_starts))
        self._handles.append(self.model.register_forward_hook(self._forward_ends, always_call=True))
        self._mode = _BoundsMode(self)
        self._mode.__enter__()
        try:
            self._recording = True
            with torch.no_grad(), (self.clean_pass_context() if self.clean_pass_context else contextlib.nullcontext()):
                self.model(self.x)
            self._recording = False
            if not self.records:
                raise UnsupportedNonlinearityError(
                    f"activation_bounds: {type(self.model).__name__} called no supported "
                    "nonlinearity in its forward pass; nothing to defend"
                )
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._in_forward = False
        self._recording = False

    # ----------------------------------------------------------------- public helpers
    @property
    def num_calls(self) -> int:
        return len(self.records)

    def select(self, indices: torch.Tensor | None) -> None:
        """Restrict following passes to the original samples ``indices`` (None = all)."""
        if indices is None:
            self._selection, self._selected_refs = None, None
            return
        indices = indices.to(self.x.device)
        if self._selection is not None and torch.equal(indices, self._selection):
            return
        self._selection = indices
        self._selected_refs = [
            (r.upper.index_select(0, indices), None if r.lower is None else r.lower.index_select(0, indices))
            for r in self.records
        ]

    def bounds(self, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_l, b_u) of Eq. 5 for call number ``call`` (all samples, tolerance included)."""
        r = self.records[call]
        return (torch.zeros_like(r.upper) if r.lower is None else r.lower), r.upper

    # ----------------------------------------------------------------- hooks
    def _forward_starts(self, module: torch.nn.Module, args: Any) -> None:
        self._in_forward = True
        self._call_index = 0
        self._violations = []

    def _forward_ends(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        was_in_forward, self._in_forward = self._in_forward, False
        if not was_in_forward or self._recording or sys.exc_info()[0] is not None:
            return  # (the forward pass itself raised: let that error through, unmasked)
        if self._call_index < len(self.records):  # more calls already raised in _on_call
            raise CallSequenceError(
                f"activation_bounds: this forward pass made {self._call_index} nonlinearity calls, "
                f"the clean pass made {len(self.records)}"
            )
        if self.track_violations and self._violations:
            total = sum(v[1] for v in self._violations)
            self.last_violation_fraction = float(sum(v[0] for v in self._violations) / max(total, 1))

    def _on_call(self, op: str, out: torch.Tensor, nonnegative: bool) -> None:
        if self._recording:
            ref = out.detach()
            tol = self.tolerance
            upper = ref.clamp(min=0)  # a new tensor: later in-place ops on `out` cannot touch it
            upper = upper + tol * (1 + upper) if tol else upper
            lower = None
            if not nonnegative:
                lower = ref.clamp(max=0)
                lower = lower - tol * (1 - lower) if tol else lower
            self.records.append(CallRecord(op, tuple(out.shape), upper, lower, nonnegative))
            return
        k = self._call_index
        self._call_index += 1
        if k >= len(self.records):
            raise CallSequenceError(
                f"activation_bounds: call #{k} ('{op}') has no counterpart in the clean pass "
                f"({len(self.records)} calls)"
            )
        record = self.records[k]
        upper, lower = (record.upper, record.lower) if self._selected_refs is None else self._selected_refs[k]
        if record.op != op or tuple(out.shape) != tuple(upper.shape):
            raise CallSequenceError(
                f"activation_bounds: call #{k} is '{op}' with shape {tuple(out.shape)}, the clean "
                f"pass had '{record.op}' with shape {tuple(upper.shape)}"
            )
        if not (torch.is_grad_enabled() and out.requires_grad):
            return
        # Eq. 6: [b_l <= h(e) <= b_u]; for h >= 0 the lower bound b_l = 0 always holds. Stored as a
        # float 0/1 tensor: the backward is then one multiply, ~3x cheaper on a CPU than a where/
        # masked_fill on a bool mask (which also converts the scalar and the mask per element).
        # Built by an in-place comparison on a float copy: same-dtype compare kernels are
        # vectorised, while le(..., out=float) computes a bool temporary and casts it (measured on
        # this CPU, a batch-4 activation: 5.3 ms -> 2.7 ms).
        h = out.detach()
        keep = h.clone().le_(upper)
        if lower is not None:
            keep.mul_(h.clone().ge_(lower))
        if self.track_violations:
            self._violations.append((keep.numel() - keep.sum(), keep.numel()))
        out.register_hook(_KeepOnly(keep))


class _KeepOnly:
    """Gradient hook: Eq. 6's product with the indicator (``keep`` is 1 inside the bounds, else 0)."""

    __slots__ = ("keep",)

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.keep


def activation_bounds(
    model: torch.nn.Module, x: torch.Tensor, *, tolerance: float = 0.0, track_violations: bool = False,
    clean_pass_context: Callable[[], Any] | None = None,
) -> ActivationBounds:
    """Defend ``model`` for explanations of the batch ``x`` (Eq. 4-6). See :class:`ActivationBounds`."""
    return ActivationBounds(model, x, tolerance=tolerance, track_violations=track_violations,
                            clean_pass_context=clean_pass_context)
