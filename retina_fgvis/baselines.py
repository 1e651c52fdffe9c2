"""Baseline attribution methods behind one interface, for the faithfulness comparison.

Why: the deletion metric only means something relative to other explanation methods (paper
Table 2 compares FGVis with Grad-CAM, sliding-window occlusion, LIME and RISE). Wherever a
well-kept implementation exists we use it (Captum), so that a difference in the metric is a
difference between methods, not between our re-implementations:

* ``gradcam``   Captum ``LayerGradCam`` on the last layer with a spatial (4-D) output
                (found with forward hooks; for EfficientNet-Lite0 the activated ``bn2`` after
                ``conv_head``), ReLU, bilinear upsampling to the input size.
* ``occlusion`` Captum ``Occlusion`` (sliding window, Zeiler & Fergus): window = 1/7 of the
                shorter side, stride = half a window, baseline 0 (the mean colour),
                on softmax probabilities.
* ``lime``      Captum ``Lime`` on SLIC superpixels (skimage), ``n_samples`` = 500 by default,
                with a closed-form weighted ridge regression (alpha 1, the LIME default) as
                the surrogate, because Captum's default surrogate needs scikit-learn.
* ``rise``      RISE (Petsiuk et al. 2018) in a few lines of torch: N random binary s x s
                grids (p = 0.5), bilinearly upsampled to (s+1) cells and randomly shifted,
                importance = sum_i P(class | x * M_i) M_i / (N p). Defaults N = 4000, s = 7
                (the RISE paper's ImageNet setting). Idea from eclique/RISE (MIT); not copied.
* ``gradient``  Captum ``Saliency`` (|d logit / d x|, max over colour channels).
* ``fgvis``     FGVis deletion game with the adversarial defence (Eq. 6); importance =
                ``FGVisResult.mean_mask``.
* ``fgvis-undefended``  the same game without the defence. The paper does not say whether its
                Table 2 masks were defended; on a two-class model the difference decides the
                ranking (evaluation/faithfulness/README.md), so both are measured.
* ``random``    a control, not an explanation: a uniformly random pixel order, seeded by the
                image's content (the same image gets the same order in any batch, run or
                resumption). Why: the deletion metric rewards scattered removals for their own
                sake (a random order beat every smooth baseline on the ImageNet sample and was level
                with the defended game on the RDR eyes, ``evaluation/faithfulness/``), so a method's
                AUC means little until it is read against this line.

``explain(method, model, x, target)`` returns a (B, H, W) float32 CPU tensor, higher = more
important for ``target``. With ``fov_mask`` the importance outside the field of view is set
below every value inside it, for every method alike: outside pixels already equal the
deletion substrate, so this only stops a method from wasting removal steps on them.
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["METHODS", "BASELINES", "explain", "find_last_spatial_layer", "restrict_to_fov",
           "gradcam", "occlusion", "lime", "rise", "gradient", "fgvis_importance", "USES_BASELINE",
           "FGVIS_METHODS", "CONTROLS", "random_order"]

BASELINES: tuple[str, ...] = ("gradcam", "occlusion", "lime", "rise", "gradient")
#: FGVis's deletion game with and without the defence: the same engine, one switch apart.
FGVIS_METHODS: tuple[str, ...] = ("fgvis", "fgvis-undefended")
#: Information-free orders the methods are read against (not explanations, never "best baseline").
CONTROLS: tuple[str, ...] = ("random",)
METHODS: tuple[str, ...] = BASELINES + FGVIS_METHODS + CONTROLS


class _Softmax(nn.Module):
    """Model -> class probabilities: perturbation methods score probabilities, as RISE does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.model(x), dim=1)


def _targets(target: int | Tensor | list[int], batch: int) -> Tensor:
    t = torch.as_tensor(target, dtype=torch.int64).reshape(-1).cpu()
    if t.numel() == 1:
        t = t.expand(batch).clone()
    if t.numel() != batch:
        raise ValueError(f"target has {t.numel()} entries for a batch of {batch}")
    return t


def find_last_spatial_layer(model: nn.Module, example: Tensor) -> nn.Module:
    """The module whose forward finishes last with a 4-D output of more than one pixel.

    That is the last convolutional feature map before global pooling: Grad-CAM's layer.
    Found with forward hooks on one forward pass of ``example[:1]``.
    """
    found: list[nn.Module] = []

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            found.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError("the model has no layer with a spatial (B, C, H, W) output for Grad-CAM")
    return found[-1]


def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None = None) -> Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    layer = layer if layer is not None else find_last_spatial_layer(model, x)
    attr = LayerGradCam(model, layer).attribute(x, target=target.to(x.device), relu_attributions=True)
    attr = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return attr[:, 0]


def occlusion(model: nn.Module, x: Tensor, target: Tensor, window: int | None = None,
              stride: int | None = None, batch_size: int = 32, baseline: float | Tensor = 0.0) -> Tensor:
    from captum.attr import Occlusion

    c, h, w = x.shape[1:]
    window = window or max(1, round(min(h, w) / 7))
    stride = stride or max(1, window // 2)
    attr = Occlusion(_Softmax(model)).attribute(
        x, target=target.to(x.device), sliding_window_shapes=(c, window, window),
        strides=(c, stride, stride), baselines=baseline, perturbations_per_eval=batch_size,
    )
    return attr.mean(dim=1)


class _WeightedRidge:
    """Closed-form weighted ridge regression with intercept (LIME's surrogate, alpha = 1).

    Implements Captum's ``Model`` protocol (fit on a DataLoader of (x, y, w), representation =
    coefficients (1, F)) without scikit-learn.
    """

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha
        self.coef: Tensor | None = None
        self.intercept: Tensor | None = None

    def fit(self, train_data: Any, **_: Any) -> None:
        xs, ys, ws = [], [], []
        for batch in train_data:
            xs.append(batch[0])
            ys.append(batch[1])
            ws.append(batch[2] if len(batch) > 2 else torch.ones(len(batch[0])))
        X = torch.cat(xs).double().reshape(sum(len(b) for b in xs), -1)
        y = torch.cat(ys).double().reshape(-1)
        w = torch.cat(ws).double().reshape(-1).clamp_min(0)
        wn = w / w.sum().clamp_min(1e-12)
        xm = (wn[:, None] * X).sum(0)  # weighted means: the intercept is not penalised
        ym = (wn * y).sum()
        Xc, yc = X - xm, y - ym
        # minimise sum_i w_i (y_i - x_i b - c)^2 + alpha |b|^2 (sklearn Ridge with sample_weight)
        A = Xc.T @ (w[:, None] * Xc) + self.alpha * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
        self.coef = torch.linalg.solve(A, Xc.T @ (w * yc))
        self.intercept = ym - xm @ self.coef

    def representation(self) -> Tensor:
        assert self.coef is not None, "fit first"
        return self.coef.float()[None]

    def __call__(self, x: Tensor) -> Tensor:
        assert self.coef is not None and self.intercept is not None
        return (x.double() @ self.coef + self.intercept).float()


# Captum checks isinstance(..., Model) nowhere at run time, but register for clarity.
try:  # pragma: no cover - only typing nicety
    from captum._utils.models.model import Model as _CaptumModel

    _CaptumModel.register(_WeightedRidge)
except Exception:  # noqa: BLE001
    pass


def _to_unit_rgb(x: Tensor, mean: Any = None, std: Any = None) -> np.ndarray:
    """(C, H, W) normalised tensor -> (H, W, C) float image in [0, 1] for SLIC."""
    img = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        img = img * s + m
    else:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo).clamp_min(1e-8)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def superpixels(x: Tensor, n_segments: int = 50, compactness: float = 10.0,
                mean: Any = None, std: Any = None) -> Tensor:
    """SLIC superpixel labels (H, W) int64 starting at 0 for one (C, H, W) image."""
    from skimage.segmentation import slic

    rgb = _to_unit_rgb(x, mean, std)
    channel_axis = -1 if rgb.shape[2] > 1 else None
    img = rgb if channel_axis is not None else rgb[..., 0]
    labels = slic(img, n_segments=n_segments, compactness=compactness, start_label=0,
                  channel_axis=channel_axis, convert2lab=rgb.shape[2] == 3)
    _, labels = np.unique(labels, return_inverse=True)  # consecutive 0..F-1
    return torch.from_numpy(labels.reshape(rgb.shape[:2]).astype(np.int64))


def lime(model: nn.Module, x: Tensor, target: Tensor, n_samples: int = 500, n_segments: int = 50,
         compactness: float = 10.0, batch_size: int = 32, mean: Any = None, std: Any = None,
         seed: int = 0, baseline: float | Tensor = 0.0) -> Tensor:
    from captum.attr import Lime

    explainer = Lime(_Softmax(model), interpretable_model=_WeightedRidge(alpha=1.0))
    out = []
    for i in range(x.shape[0]):
        seg = superpixels(x[i], n_segments, compactness, mean, std).to(x.device)[None, None]
        with torch.random.fork_rng(devices=[]):  # Captum samples with the global RNG
            torch.manual_seed(seed + i)
            attr = explainer.attribute(
                x[i : i + 1], target=int(target[i]), baselines=_one(baseline, i), feature_mask=seg,
                n_samples=n_samples, perturbations_per_eval=batch_size, return_input_shape=True,
            )
        out.append(attr[0].mean(dim=0))
    return torch.stack(out)


def rise_masks(n: int, size: tuple[int, int], grid: int = 7, p: float = 0.5,
               generator: torch.Generator | None = None) -> Tensor:
    """N smooth random masks (N, H, W) in [0, 1]: binary grid, bilinear upsampling, random shift."""
    h, w = size
    cell_h, cell_w = math.ceil(h / grid), math.ceil(w / grid)
    binary = (torch.rand(n, 1, grid, grid, generator=generator) < p).float()
    up = F.interpolate(binary, size=((grid + 1) * cell_h, (grid + 1) * cell_w),
                       mode="bilinear", align_corners=False)[:, 0]
    dy = torch.randint(0, cell_h, (n,), generator=generator)
    dx = torch.randint(0, cell_w, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]       # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]       # (N, 1, W)
    return up[torch.arange(n)[:, None, None], rows, cols]   # (N, H, W), fresh tensor


@torch.no_grad()
def rise(model: nn.Module, x: Tensor, target: Tensor, n_masks: int = 4000, grid: int = 7,
         p: float = 0.5, batch_size: int = 64, seed: int = 0, baseline: float | Tensor = 0.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    sal = torch.zeros(b, h, w, dtype=torch.float64, device=x.device)
    done = 0
    while done < n_masks:  # masks generated in chunks (memory), the same for every image
        n = min(batch_size, n_masks - done)
        masks = rise_masks(n, (h, w), grid, p, gen).to(x.device, x.dtype)
        for i in range(b):
            kept = x[i : i + 1] * masks[:, None]
            if not (isinstance(baseline, float) and baseline == 0.0):  # the zero path stays bit-identical
                kept = kept + (1 - masks[:, None]) * _one(baseline, i)
            probs = torch.softmax(model(kept), dim=1)[:, int(target[i])]
            sal[i] += (probs.double()[:, None, None] * masks.double()).sum(0)
        done += n
    return (sal / (n_masks * p)).float()


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    from captum.attr import Saliency

    x = x.detach().clone().requires_grad_(True)
    attr = Saliency(model).attribute(x, target=target.to(x.device), abs=True)
    return attr.amax(dim=1)


def fgvis_importance(model: nn.Module, x: Tensor, target: Tensor, fov_mask: Tensor | None = None,
                     defense: bool = True, game: str = "deletion", baseline: float | Tensor = 0.0,
                     **settings: Any) -> Tensor:
    """FGVis importance map = mean (complementary) mask of the chosen game (deletion); the game's
    reference r is ``baseline``."""
    from retina_fgvis.fgvis.games import FGVis  # the engine (lead's module)

    result = FGVis(model, defense=defense, **settings).attribute(x, target.to(x.device), game=game,
                                                                fov_mask=fov_mask, reference=baseline)
    return result.mean_mask


def image_seed(image: Tensor, seed: int = 0) -> int:
    """A 63-bit seed from an image's values (and ``seed``): the same image, the same seed, wherever
    it sits in a batch and whichever device holds it."""

    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


def random_order(model: nn.Module, x: Tensor, target: Tensor, seed: int = 0) -> Tensor:
    """Uniform random importance per pixel, one draw per image seeded by :func:`image_seed`; the
    model and the target are not looked at (that is the point of the control)."""
    del model, target
    return torch.stack([torch.rand(x.shape[-2:], generator=torch.Generator().manual_seed(image_seed(im, seed)))
                        for im in x])


_DISPATCH: dict[str, Callable[..., Tensor]] = {
    "gradcam": gradcam,
    "occlusion": occlusion,
    "lime": lime,
    "rise": rise,
    "gradient": gradient,
    "fgvis": fgvis_importance,
    "fgvis-undefended": functools.partial(fgvis_importance, defense=False),
    "random": random_order,
}


def _one(baseline: float | Tensor, i: int) -> float | Tensor:
    """Image ``i``'s baseline: a constant as it is, a (B, C, H, W) tensor as its (1, C, H, W) slice."""
    return baseline[i : i + 1] if isinstance(baseline, Tensor) else baseline


#: Methods that replace removed pixels with a baseline (their ``baseline`` option); the others
#: (Grad-CAM, gradient) read the model's gradients only.
USES_BASELINE: frozenset[str] = frozenset({"occlusion", "lime", "rise", *FGVIS_METHODS})


def restrict_to_fov(importance: Tensor, fov_mask: Tensor) -> Tensor:
    """Importance outside the FOV set just below the per-image minimum inside it (ties keep raster order)."""
    if fov_mask.dim() == 4:  # (B, 1, H, W) or (B, C, H, W)
        fov_mask = fov_mask.bool().any(dim=1)
    fov = fov_mask.to(importance.device).bool().expand_as(importance)
    inside_min = torch.where(fov, importance, torch.full_like(importance, math.inf))
    inside_min = inside_min.flatten(1).amin(dim=1).clamp(max=1e30).view(-1, 1, 1)
    return torch.where(fov, importance, (inside_min - 1.0).expand_as(importance))


def explain(method: str, model: nn.Module, x: Tensor, target: int | Tensor | list[int],
            fov_mask: Tensor | None = None, baseline: float | Tensor | None = None, **options: Any) -> Tensor:
    """Importance maps (B, H, W), float32 on the CPU, for ``target`` of ``model`` at ``x``.

    ``x`` is the normalised batch on the model's device; ``options`` go to the method
    (e.g. ``n_masks`` for rise, ``n_samples`` for lime, FGVis settings for fgvis).
    ``baseline`` (a constant or a (B, C, H, W) tensor in normalised space, default 0 = the mean
    colour) is what removed pixels become, for the methods in :data:`USES_BASELINE` (FGVis: the
    game's reference r); the deletion metric should remove to the same substrate.
    """
    if method not in _DISPATCH:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    t = _targets(target, x.shape[0])
    if method in FGVIS_METHODS:
        options = {**options, "fov_mask": fov_mask}
    if baseline is not None and method in USES_BASELINE:
        options = {**options, "baseline": baseline.to(x) if isinstance(baseline, Tensor) else float(baseline)}
    imp = _DISPATCH[method](model, x, t, **options).detach()
    if tuple(imp.shape) != (x.shape[0], *x.shape[-2:]):
        raise RuntimeError(f"{method} returned shape {tuple(imp.shape)}, expected (B, H, W)")
    imp = imp.float()
    if fov_mask is not None:
        imp = restrict_to_fov(imp, fov_mask)
    return imp.cpu()
