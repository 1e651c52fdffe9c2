"""Reading one fundus photograph for the classifier, with the checks every command shares.

Why one place: ``screen``, ``explain`` and ``predict`` must refuse the same inputs for the same
reasons, in one line each -- a blank frame, a grey-scale or red-free photograph, a thumbnail, a decompression
bomb, a FIFO or a broken link -- rather than each command handing the classifier whatever its
reader could decode (a 40-px thumbnail gets a confident p and an "explanation" of nothing).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from retina_fgvis.fundus.io import Fundus, quiet_image_libraries

#: Largest image accepted (width x height). Real fundus cameras stay below ~25 MP; the limit
#: is checked from the file header *before* decoding, so a decompression bomb costs nothing.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageRejected(ValueError):
    """An input the classifier must not be shown; ``str()`` is the one-line reason."""


def _not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, or None when it is a regular file."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return "broken symbolic link (its target does not exist)"
    if not path.exists():
        return "file not found"
    return "not a regular file (a folder, FIFO, socket or device)"


def probe_size(path: Path, is_dicom: bool) -> tuple[int, int] | None:
    """(width, height) from the header without decoding pixels; None if unknown.

    Pillow refuses images above 2x its bomb limit before allocating anything; we turn that
    into the same "too large" rejection."""
    if is_dicom:
        from retina_fgvis.fundus.dicom import read_dicom_header

        h = read_dicom_header(path)  # FundusReadError for non-DICOM / corrupt headers
        if h.rows and h.columns:
            return int(h.columns), int(h.rows)
        return None
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with quiet_image_libraries(), tifffile.TiffFile(path) as tf:
                shape = tf.pages[0].shape
            if len(shape) >= 2:
                hw = shape[:2] if len(shape) == 2 or shape[-1] in (1, 2, 3, 4) else shape[-2:]
                return int(hw[1]), int(hw[0])
            return None
        from PIL import Image

        with quiet_image_libraries(), Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ == "DecompressionBombError":
            m = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(m.group(1)) / 1e6:.0f} MP" if m else "over Pillow's limit"
            raise ImageRejected(f"image too large ({size}; refused before decoding)") from None
        return None  # leave the real error to the reader


def is_greyscale(rgb: np.ndarray, tol: int = 3, share: float = 0.995) -> bool:
    """True when the three channels are (nearly) equal on the lit pixels: a grey-scale or
    red-free photograph, which the colour classifier cannot judge."""
    sub = rgb[:: max(1, rgb.shape[0] // 256), :: max(1, rgb.shape[1] // 256)].astype(np.int16)
    lit = sub.max(axis=2) > 10
    if not lit.any():
        return True
    spread = (sub.max(axis=2) - sub.min(axis=2))[lit]
    return float((spread <= tol).mean()) >= share


def min_side_for(input_size: int, override: int | None = None) -> int:
    """The shortest image side accepted: ``override``, else half the classifier's input size (a
    smaller photograph would be enlarged more than 2x: a 40-px thumbnail has no lesions to find,
    yet gets a p). One rule for ``screen``, ``explain`` and ``predict``."""
    return int(override) if override is not None else int(input_size) // 2


def read_fundus_file(path: str | Path, *, is_dicom: bool | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Fundus:
    """Read ``path`` (DICOM when ``is_dicom``; None: by suffix or DICM magic) as 8-bit RGB, refusing
    what is not a readable regular file and what is too large from its header, before decoding
    (a decompression bomb costs nothing). Raises :class:`ImageRejected` or ``FundusReadError``."""
    from retina_fgvis.fundus.dicom import DICOM_SUFFIXES, is_dicom as sniff_dicom, read_dicom
    from retina_fgvis.fundus.io import read_fundus

    path = Path(path)
    not_a_file = _not_a_regular_file(path)
    if not_a_file:
        raise ImageRejected(not_a_file)
    try:
        if path.stat().st_size == 0:
            raise ImageRejected("empty file (0 bytes)")
    except OSError as exc:
        raise ImageRejected(f"cannot open the file ({exc.strerror or type(exc).__name__})") from None
    if is_dicom is None:
        is_dicom = path.suffix.lower() in DICOM_SUFFIXES or sniff_dicom(path)
    size = probe_size(path, is_dicom)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageRejected(f"image too large ({size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} MP; "
                            f"limit {max_pixels / 1e6:.0f} MP)")
    return read_dicom(path) if is_dicom else read_fundus(path)


def check_fundus_pixels(rgb: np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> None:
    """Refuse decoded pixels the classifier must not judge: a thumbnail, an image over the size
    limit (for formats whose header did not say), a blank frame, a grey-scale or red-free photograph. Separate
    from reading so that a caller can keep what the file says (a DICOM's patient and eye, the
    size) for the error row of a refused image."""
    if min(rgb.shape[:2]) < min_side:
        raise ImageRejected(f"image too small ({rgb.shape[1]}x{rgb.shape[0]} px; the shorter side must be "
                            f"at least {min_side} px, --min-side)")
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise ImageRejected(f"image too large ({rgb.shape[1]}x{rgb.shape[0]})")
    if int(rgb.max()) - int(rgb.min()) <= 10:
        raise ImageRejected("blank image (all pixels nearly the same value): no photograph in it")
    if is_greyscale(rgb):
        raise ImageRejected("grey-scale image (all colour channels equal): a colour fundus photograph is needed")


def read_checked_fundus(path: str | Path, *, is_dicom: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                        min_side: int = 0) -> Fundus:
    """:func:`read_fundus_file` then :func:`check_fundus_pixels` (``explain``, ``predict``)."""
    fundus = read_fundus_file(path, is_dicom=is_dicom, max_pixels=max_pixels)
    check_fundus_pixels(fundus.rgb, max_pixels=max_pixels, min_side=min_side)
    return fundus
