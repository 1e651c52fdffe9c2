"""Reading fundus photographs into one in-memory type, :class:`Fundus`.

Why a single reader: training, prediction, screening and evaluation must see exactly the same
pixels for the same file (8-bit RGB on the original grid), whatever the container format. Errors
are one line (``"<path>: <reason>"``) because users hand us folders of arbitrary files.

Formats are dispatched by file suffix through :data:`READERS`. DICOM is added by the screening
module by registering a reader there (see the marked hook below); nothing else needs to change.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retina_fgvis.fundus.quiet import quiet_library


class FundusReadError(ValueError):
    """One-line, user-facing: ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Fundus:
    """A fundus photograph on its original pixel grid.

    ``rgb`` is always (H, W, 3) uint8 so that every downstream step can assume one format.
    """

    rgb: np.ndarray
    source: str
    patient_id: str | None = None
    eye: str | None = None  # "left" | "right" | None
    study_date: str | None = None


def to_rgb8(arr: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Convert grey / RGBA / 16-bit / float pixel data to (H, W, 3) uint8.

    16-bit and float images are scaled by their dtype range (not min-max stretched) so that a
    dark image stays dark: stretching would change what the classifier sees.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # channel-first TIFF
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = _over_black(a[..., :3], a[..., 3])
    elif a.ndim == 3 and a.shape[2] == 2:  # grey + alpha
        a = np.repeat(_over_black(a[..., :1], a[..., 1]), 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise FundusReadError(path, f"unsupported pixel array shape {np.asarray(arr).shape}")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.uint16:
        out = (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype == bool:
        out = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        hi = 1.0 if float(np.nanmax(a)) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        hi = 255 if a.max() <= 255 else (4095 if a.max() <= 4095 else info.max)
        out = np.clip(a.astype(np.float64) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise FundusReadError(path, f"unsupported pixel type {a.dtype}")
    if out.shape[0] < 16 or out.shape[1] < 16:
        raise FundusReadError(path, f"image too small ({out.shape[1]}x{out.shape[0]} px)")
    return np.ascontiguousarray(out)


def _over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` composited over black by ``alpha`` (same dtype). Why: a transparent background
    may store any colour (often white), which dropping the alpha channel would turn into a
    white surround, and the field of view is found against a dark one. Opaque pixels are
    returned exactly."""
    if np.issubdtype(alpha.dtype, np.integer):
        full = float(np.iinfo(alpha.dtype).max)
    elif alpha.dtype == bool:
        full = 1.0
    else:
        full = 1.0 if float(np.nanmax(alpha)) <= 1.0 else 255.0
    frac = np.clip(alpha.astype(np.float64) / full, 0.0, 1.0)[..., None]
    if bool((frac == 1.0).all()):
        return colour
    mixed = colour.astype(np.float64) * frac
    if np.issubdtype(colour.dtype, np.integer):
        return np.round(mixed).astype(colour.dtype)
    return mixed.astype(colour.dtype)


#: TIFF/EXIF Orientation (tag 274) -> how to turn the stored array into what a viewer shows
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],                       # mirrored left-right
    3: lambda a: a[::-1, ::-1],                    # rotated 180
    4: lambda a: a[::-1, :],                       # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),                 # transposed
    6: lambda a: np.rot90(a, -1),                  # rotated 90 clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),     # transversed
    8: lambda a: np.rot90(a, 1),                   # rotated 90 counter-clockwise
}


def quiet_image_libraries() -> contextlib.AbstractContextManager[None]:
    """tifffile's log lines and Pillow's warnings silenced (:mod:`retina_fgvis.fundus.quiet`)."""
    return quiet_library("tifffile")


_EYE_RE = re.compile(r"(?:^|[_\-\s.])(left|right|od|os|l|r)(?:$|[_\-\s.])", re.IGNORECASE)
_PATIENT_RE = re.compile(r"^(\d+)[_\-]")


def _guess_eye_patient(path: Path) -> tuple[str | None, str | None]:
    """Eye and patient from names like ``10003_left.jpeg`` (EyePACS / ODIR style)."""
    stem = path.stem
    eye = None
    m = _EYE_RE.search(stem)
    if m:
        tok = m.group(1).lower()
        eye = "left" if tok in ("left", "os", "l") else "right"
    pm = _PATIENT_RE.match(stem)
    return eye, (pm.group(1) if pm else None)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with quiet_image_libraries(), Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone/camera JPEGs may carry a rotation tag
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im)
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
            return np.asarray(im.convert("RGBA"))  # to_rgb8 composites it over black
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        return np.asarray(im)


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile

        with quiet_image_libraries(), tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            arr = page.asarray()
            # 1-bit masks such as DiaretDB1's fmask.tif are stored "min is white": invert so
            # that the pixel values mean what a viewer (and Pillow) shows.
            if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
                arr = ~arr if arr.dtype == bool else np.iinfo(arr.dtype).max - arr
            tag = page.tags.get(274)
            orientation = int(tag.value) if tag is not None else 1
        if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] not in (3, 4):
            arr = arr[0]  # multi-page: first page
        if arr.ndim == 4:
            arr = arr[0]
        if orientation in _ORIENTATIONS:  # shown rotated/mirrored by viewers: turn it the same way
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                arr = np.moveaxis(arr, 0, -1)  # channel-first: make the image axes come first
            arr = np.ascontiguousarray(_ORIENTATIONS[orientation](arr))
        return arr
    except Exception:  # noqa: BLE001 - fall back to Pillow for odd TIFF flavours
        return _read_pillow(path)


Reader = Callable[[Path], "np.ndarray | Fundus"]

#: Suffix -> reader. A reader returns a pixel array (converted by :func:`to_rgb8`) or a full
#: :class:`Fundus` (when the file carries metadata such as patient id / eye / date).
READERS: dict[str, Reader] = {
    ".png": _read_pillow,
    ".jpg": _read_pillow,
    ".jpeg": _read_pillow,
    ".bmp": _read_pillow,
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    # ------------------------------------------------------------------------------------
    # DICOM HOOK (owner: screening helper): register ".dcm" (and ".dicom") here, e.g.
    #     from retina_fgvis.fundus.dicom import read_dicom_fundus
    #     READERS[".dcm"] = read_dicom_fundus      # returns a Fundus with patient_id/eye/date
    # or call register_reader(".dcm", read_dicom_fundus) from the DICOM module.
    # ------------------------------------------------------------------------------------
}

# DICOM hook (screening helper): .dcm/.dicom/.dic -> fundus/dicom.py (Fundus with patient/eye/date).
from retina_fgvis.fundus.dicom import DICOM_SUFFIXES, read_dicom  # noqa: E402
READERS.update(dict.fromkeys(DICOM_SUFFIXES, read_dicom))


def register_reader(suffix: str, reader: Reader) -> None:
    """Add or replace the reader for a file suffix (lower case, with the dot)."""
    READERS[suffix.lower()] = reader


def supported_suffixes() -> tuple[str, ...]:
    return tuple(sorted(READERS))


def read_fundus(path: str | Path) -> Fundus:
    """Read one fundus photograph as 8-bit RGB on its original grid.

    Raises :class:`FundusReadError` (one line) for a missing, unsupported or undecodable file.
    """
    p = Path(path)
    if not p.exists():
        raise FundusReadError(p, "file not found")
    if not p.is_file():
        raise FundusReadError(p, "not a file")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise FundusReadError(
            p, f"unsupported file type '{p.suffix}' (supported: {', '.join(supported_suffixes())})"
        )
    try:
        out = reader(p)
    except FundusReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one user-facing line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FundusReadError(p, f"cannot decode image ({msg})") from None
    if isinstance(out, Fundus):
        out.rgb = to_rgb8(out.rgb, p)
        return out
    eye, patient = _guess_eye_patient(p)
    return Fundus(rgb=to_rgb8(out, p), source=str(p), patient_id=patient, eye=eye)
