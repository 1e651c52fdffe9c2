"""Causal faithfulness metrics of Petsiuk et al. (RISE, BMVC 2018): deletion and insertion.

Why this module exists: an importance map is only useful to a clinician if the pixels it
ranks highest really drive the model's decision. The deletion metric tests exactly that:
remove the pixels in order of decreasing importance and watch the probability of the
predicted class fall; the faster it falls, the smaller the area under the curve (AUC) and the
more faithful the map. FGVis (Wagner et al., CVPR 2019, Table 2) is evaluated this way.

Protocol (as in the reference implementation ``CausalMetric`` of eclique/RISE, re-written):

* the class is the model's top prediction on the *unperturbed* image (unless given);
* pixels are ranked by decreasing importance; ties are broken by the flat pixel index
  (row-major), i.e. a stable sort on ``(-importance, index)``. FGVis masks contain many exact
  ties (all the 0s of an untouched mask), so without a rule the result would depend on the
  sort algorithm and the device. The ranking is always computed on the CPU in float64, so the
  CPU and CUDA code paths remove the same pixels in the same order;
* all channels of a pixel are removed at once, ``step`` pixels per step; the default
  ``step = ceil(H*W / 224)`` gives 224 steps, i.e. 225 model evaluations including the
  unperturbed image, for 224x224 inputs (the reference setting), and in general
  ``ceil(H*W / step) + 1`` evaluations;
* deletion substrate: zeros in the *normalised* input space (the dataset mean colour);
* insertion (bonus) starts from a blurred copy of the image (Gaussian, kernel 11, sigma 5 as in
  the reference; ``substrate="zero"`` starts from zeros instead) and inserts the original pixels;
* score = softmax probability of the class; AUC by the trapezoid rule on [0, 1] with the
  x axis = fraction of pixels changed (identical to the reference's uniform spacing when
  ``step`` divides ``H*W``, and exact when the last step is shorter).

Implementation notes: the reference code writes the removed pixels into
``tensor.cpu().numpy()``; on a CUDA tensor that is a copy, so the removal silently does
nothing there. Here every perturbed image is built fresh with ``torch.where`` from a rank map
(``rank[p] < k * step``), the (image, step) evaluations of a whole batch are flattened and
run in chunks of ``batch_size`` to bound memory, and nothing is modified in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalCurves",
    "auc",
    "default_step",
    "removal_order",
    "removal_rank",
    "causal_curves",
    "deletion",
    "insertion",
    "blur_substrate",
]

DEFAULT_STEPS = 224  # number of removal steps of the reference protocol (224x224, 224 px/step)


@dataclass
class CausalCurves:
    """Deletion or insertion curves of a batch (CPU tensors).

    ``scores[b, k]`` is the probability of ``target[b]`` after ``k`` steps; ``fractions[k]`` is
    the share of pixels changed after ``k`` steps (x axis, from 0 to 1).
    """

    mode: str                # "deletion" | "insertion"
    scores: Tensor           # (B, n_steps + 1) float64
    fractions: Tensor        # (n_steps + 1,) float64
    auc: Tensor              # (B,) float64
    target: Tensor           # (B,) int64
    step: int                # pixels changed per step

    @property
    def n_evaluations(self) -> int:
        return int(self.scores.shape[1])


def default_step(height: int, width: int, n_steps: int = DEFAULT_STEPS) -> int:
    """Pixels per step so that there are at most ``n_steps`` steps (exactly 224 for 224x224)."""
    return max(1, math.ceil(height * width / n_steps))


def auc(scores: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Trapezoid-rule area under ``scores`` (..., N) on [0, 1].

    Without ``fractions`` the N points are spaced uniformly (reference formula
    ``(sum - first/2 - last/2) / (N - 1)``).
    """
    scores = scores.to(torch.float64)
    n = scores.shape[-1]
    if n < 2:
        raise ValueError("need at least two points on a curve to compute its area")
    if fractions is None:
        fractions = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    return torch.trapezoid(scores, fractions.to(torch.float64).to(scores.device), dim=-1)


def removal_order(importance: Tensor) -> Tensor:
    """Flat pixel indices (B, H*W) by decreasing importance, ties by increasing index.

    Computed on the CPU in float64 with a stable sort of ``-importance``, so the order is
    identical whatever device the importance map lives on. NaN is refused (it has no rank).
    """
    if importance.dim() != 3:
        raise ValueError(f"importance must be (B, H, W), got shape {tuple(importance.shape)}")
    flat = importance.detach().to("cpu", torch.float64).reshape(importance.shape[0], -1)
    if torch.isnan(flat).any():
        raise ValueError("importance map contains NaN")
    # -0.0 and 0.0 compare equal, so they tie and fall back to the index order.
    return torch.sort(-flat, dim=1, stable=True).indices


def removal_rank(importance: Tensor) -> Tensor:
    """Inverse of :func:`removal_order`: ``rank[b, p]`` = position of pixel ``p`` (B, H*W)."""
    order = removal_order(importance)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], dtype=order.dtype).expand_as(order)
    return rank.scatter(1, order, positions)


def blur_substrate(inputs: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian-blurred copy of ``inputs`` (B, C, H, W): the reference insertion start image.

    Zero padding as in the reference (``nn.functional.conv2d(..., padding=klen // 2)``).
    """
    half = kernel_size // 2
    x = torch.arange(kernel_size, dtype=inputs.dtype, device=inputs.device) - half
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(inputs.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(inputs, kernel.contiguous(), padding=half, groups=inputs.shape[1])


def _probabilities(model: nn.Module, batch: Tensor) -> Tensor:
    return torch.softmax(model(batch).to(torch.float64), dim=1)


@torch.no_grad()
def causal_curves(
    model: nn.Module,
    inputs: Tensor,
    importance: Tensor,
    mode: Literal["deletion", "insertion"] = "deletion",
    target: Tensor | int | None = None,
    step: int | None = None,
    substrate: Literal["zero", "blur"] | Tensor | None = None,
    batch_size: int = 32,
) -> CausalCurves:
    """Deletion or insertion curves for a batch.

    Args:
        model: returns logits (B, K); it is used as is (call ``.eval()`` first).
        inputs: (B, C, H, W) normalised images, on the model's device.
        importance: (B, H, W) importance maps (any device), higher = more important.
        mode: "deletion" (start = image, finish = substrate) or "insertion" (the reverse).
        target: class per image; None = the model's prediction on the unperturbed image.
        step: pixels per step; None = :func:`default_step`.
        substrate: "zero" (normalised zeros), "blur", or a tensor shaped like ``inputs``.
            None = "zero" for deletion, "blur" for insertion.
        batch_size: model evaluations per forward pass (memory bound).
    """
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(inputs.shape)}")
    b, c, h, w = inputs.shape
    if tuple(importance.shape) != (b, h, w):
        raise ValueError(
            f"importance shape {tuple(importance.shape)} does not match inputs (B, H, W) = {(b, h, w)}"
        )
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    n_pixels = h * w
    step = default_step(h, w) if step is None else int(step)
    if step < 1:
        raise ValueError("step must be >= 1")
    n_steps = math.ceil(n_pixels / step)
    device = inputs.device

    if substrate is None:
        substrate = "zero" if mode == "deletion" else "blur"
    if isinstance(substrate, Tensor):
        if substrate.shape != inputs.shape:
            raise ValueError("a substrate tensor must have the shape of inputs")
        sub = substrate.to(device=device, dtype=inputs.dtype)
    elif substrate == "zero":
        sub = torch.zeros_like(inputs)
    elif substrate == "blur":
        sub = blur_substrate(inputs)
    else:
        raise ValueError(f"unknown substrate {substrate!r} (use 'zero', 'blur' or a tensor)")
    start, finish = (inputs, sub) if mode == "deletion" else (sub, inputs)

    if target is None:
        target_t = model(inputs).argmax(dim=1).to("cpu", torch.int64)
    elif isinstance(target, int):
        target_t = torch.full((b,), target, dtype=torch.int64)
    else:
        target_t = torch.as_tensor(target, dtype=torch.int64).to("cpu").reshape(-1)
        if target_t.numel() == 1 and b > 1:
            target_t = target_t.expand(b).clone()
        if target_t.numel() != b:
            raise ValueError(f"target has {target_t.numel()} entries for a batch of {b}")

    rank = removal_rank(importance).to(device).view(b, 1, h, w)  # int64
    # Number of pixels changed after k steps, k = 0..n_steps (last step may be shorter).
    changed = torch.clamp(torch.arange(n_steps + 1, dtype=torch.int64) * step, max=n_pixels)
    fractions = changed.to(torch.float64) / n_pixels

    # Flatten all (image, step) evaluations and run them in chunks.
    img_idx = torch.arange(b).repeat_interleave(n_steps + 1)
    step_idx = torch.arange(n_steps + 1).repeat(b)
    scores = torch.empty(b * (n_steps + 1), dtype=torch.float64)
    target_dev = target_t.to(device)
    changed_dev = changed.to(device)
    for lo in range(0, img_idx.numel(), batch_size):
        ii = img_idx[lo : lo + batch_size].to(device)
        kk = step_idx[lo : lo + batch_size].to(device)
        take_finish = rank[ii] < changed_dev[kk].view(-1, 1, 1, 1)  # (n, 1, H, W), all channels
        batch = torch.where(take_finish, finish[ii], start[ii])     # fresh tensor, no in-place
        probs = _probabilities(model, batch)
        scores[lo : lo + batch_size] = probs.gather(1, target_dev[ii].view(-1, 1)).squeeze(1).cpu()
    scores = scores.view(b, n_steps + 1)
    return CausalCurves(
        mode=mode, scores=scores, fractions=fractions, auc=auc(scores, fractions),
        target=target_t, step=step,
    )


def deletion(model: nn.Module, inputs: Tensor, importance: Tensor, **kwargs) -> CausalCurves:
    """Deletion curves (lower AUC = more faithful). See :func:`causal_curves`."""
    return causal_curves(model, inputs, importance, mode="deletion", **kwargs)


def insertion(model: nn.Module, inputs: Tensor, importance: Tensor, **kwargs) -> CausalCurves:
    """Insertion curves (higher AUC = more faithful). See :func:`causal_curves`."""
    return causal_curves(model, inputs, importance, mode="insertion", **kwargs)
