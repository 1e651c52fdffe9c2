"""Reader for the official DiaretDB1 v2.1 folder layout (Kauppi et al., BMVC 2007).

Why a dedicated reader: the paper's Table 3 is scored against DiaretDB1, and the official
protocol fixes details that change the numbers — four experts' confidence maps are *fused*
by averaging (grey value = 21 * sum of the experts' confidences, so ``value / 252`` is the
mean confidence), a lesion pixel is one with mean confidence >= 0.75, and everything is
restricted to the shared field-of-view mask. Getting one of these wrong silently shifts the
image counts, so the reader implements them once, here, and the tests pin the official
training-split counts (HE 18, SE 6, RSD 19, H 21).

Layout (``data_dir`` may be the folder holding ``diaretdb1_v_1_1``, that folder itself, or
its ``resources`` folder)::

    diaretdb1_v_1_1/resources/images/ddb1_fundusimages/imageNNN.png
    diaretdb1_v_1_1/resources/images/ddb1_fundusmask/fmask.tif
    diaretdb1_v_1_1/resources/images/ddb1_groundtruth/<type folder>/imageNNN.png
    diaretdb1_v_1_1/resources/traindatasets/trainset.txt
    diaretdb1_v_1_1/resources/testdatasets/testset.txt

Only file handling lives here; nothing prints. Errors for users are one line
(:class:`DiaretDB1Error`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from retina_fgvis.skipped import SkippedImage

__all__ = [
    "LESION_TYPES",
    "GT_FOLDERS",
    "LESION_KIND",
    "CONFIDENCE_THRESHOLD",
    "GT_MAX_VALUE",
    "SPLITS",
    "DiaretDB1Error",
    "DiaretDB1ImageError",
    "DiaretDB1Image",
    "DiaretDB1",
    "binarise_gt",
    "find_root",
    "read_split_names",
]

#: Lesion type codes in the order of the paper's Table 3.
LESION_TYPES: tuple[str, ...] = ("H", "HE", "SE", "RSD")
#: Ground-truth folder of each lesion type.
GT_FOLDERS: dict[str, str] = {
    "H": "hemorrhages",
    "HE": "hardexudates",
    "SE": "softexudates",
    "RSD": "redsmalldots",
}
#: Colour family of each type: haemorrhages and microaneurysms are dark-red ("red lesions"),
#: exudates and cotton-wool spots are pale ("bright lesions"). Used to score the type guess.
LESION_KIND: dict[str, str] = {"H": "red", "RSD": "red", "HE": "bright", "SE": "bright"}
#: Official fused-confidence threshold (tech report section 3.3).
CONFIDENCE_THRESHOLD: float = 0.75
#: Grey value of "all four experts marked with high confidence" (21 * 4 * 3).
GT_MAX_VALUE: int = 252
SPLITS: tuple[str, ...] = ("train", "test", "all")

_SPLIT_FILES = {
    "train": ("traindatasets", "trainset.txt"),
    "test": ("testdatasets", "testset.txt"),
}
_MAX_NAMED = 3  # how many missing files an error message names before "... (N missing)"


class DiaretDB1Error(ValueError):
    """One-line, user-facing: ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DiaretDB1ImageError(DiaretDB1Error):
    """One image (its photograph or one of its ground-truth maps) cannot be used.

    Why a subclass: a run over a split skips such an image and goes on with the rest, while a
    plain :class:`DiaretDB1Error` (layout, split list, the shared FOV mask) concerns every
    image and stays fatal.
    """


def _reason(exc: BaseException, path: Path) -> str:
    """Why PIL could not read ``path``, in words: the message's first line without the path
    PIL repeats in it (the error names the file already), the class name only when PIL gave
    no message."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can decode (unknown format or damaged header)"
    first = (str(exc).splitlines() or [""])[0]
    first = first.replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return first or exc.__class__.__name__


def binarise_gt(grey: np.ndarray, fov: np.ndarray | None = None,
                threshold: float = CONFIDENCE_THRESHOLD) -> np.ndarray:
    """Official lesion mask: ``value / 252 >= threshold``, restricted to ``fov``.

    ``grey`` is the fused 8-bit map (an RGB map is reduced by its channel maximum, so a
    grey map saved as RGB reads the same). With the default 0.75 the cut is grey >= 189:
    three of four experts "high", or all four at least "medium/high" on average.
    A tiny epsilon keeps 189/252 (exactly 0.75 in real numbers) on the lesion side despite
    floating point.
    """
    grey = np.asarray(grey)
    if grey.ndim == 3:
        grey = grey.max(axis=2)
    if grey.ndim != 2:
        raise ValueError(f"ground-truth map must be 2-D, got shape {grey.shape}")
    mask = grey.astype(np.float64) / GT_MAX_VALUE >= threshold - 1e-9
    if fov is not None:
        if fov.shape != mask.shape:
            raise ValueError(f"FOV shape {fov.shape} != ground-truth shape {mask.shape}")
        mask &= fov.astype(bool)
    return mask


def find_root(data_dir: str | Path) -> Path:
    """Return the ``resources`` folder for any of the accepted ``data_dir`` spellings."""
    base = Path(data_dir).expanduser()
    for cand in (base / "diaretdb1_v_1_1" / "resources", base / "resources", base):
        if (cand / "images" / "ddb1_fundusimages").is_dir():
            return cand
    if not base.exists():
        raise DiaretDB1Error(base, "folder does not exist")
    raise DiaretDB1Error(base, "not a DiaretDB1 folder (no diaretdb1_v_1_1/resources/images/"
                               "ddb1_fundusimages inside)")


def read_split_names(resources: Path, split: str) -> list[str]:
    """Image file names (``imageNNN.png``) of an official split, in list order.

    The list files hold one name per line, sometimes with a path prefix; only the base name
    is kept. ``all`` is train followed by test (duplicates dropped).
    """
    if split not in SPLITS:
        raise DiaretDB1Error(resources, f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    parts = ("train", "test") if split == "all" else (split,)
    names: list[str] = []
    for part in parts:
        sub, fname = _SPLIT_FILES[part]
        path = resources / sub / fname
        if not path.is_file():
            raise DiaretDB1Error(path, f"official {part} split list is missing")
        for line in path.read_text().splitlines():
            line = line.strip().replace("\\", "/")
            if line and not line.startswith("#"):
                name = line.rsplit("/", 1)[-1]
                if name not in names:
                    names.append(name)
    return names


@dataclass
class DiaretDB1Image:
    """One image with its FOV and binarised ground truth (original 1500x1152 grid)."""

    name: str                     # "image001" (no extension; safe for file names)
    rgb: np.ndarray               # (H, W, 3) uint8
    fov: np.ndarray               # (H, W) bool, the official fmask
    gt: dict[str, np.ndarray]     # lesion type -> (H, W) bool, value/252 >= 0.75 within FOV
    path: Path
    gt_paths: dict[str, Path] = field(default_factory=dict)

    def has(self, lesion: str) -> bool:
        """Official image-level presence: any GT pixel at >= 0.75."""
        return bool(self.gt[lesion].any())


#: what PIL raises for a file it cannot decode (a decompression bomb is no OSError)
_PIL_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as exc:
        raise DiaretDB1ImageError(path, f"cannot read image: {_reason(exc, path)}") from None


def _read_grey(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except _PIL_ERRORS as exc:
        raise DiaretDB1ImageError(path, f"cannot read ground-truth map: {_reason(exc, path)}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return arr


class DiaretDB1:
    """The images of one official split, loaded lazily (about 10 MB each in memory).

    Construction checks that every file of the split exists and raises a one-line
    :class:`DiaretDB1Error` naming the first few missing files and the count, so that
    ``--split test`` on the training-only package fails clearly instead of mid-run.
    """

    def __init__(self, data_dir: str | Path, split: str = "train",
                 threshold: float = CONFIDENCE_THRESHOLD):
        self.resources = find_root(data_dir)
        self.split = split
        self.threshold = threshold
        self.image_dir = self.resources / "images" / "ddb1_fundusimages"
        self.gt_dir = self.resources / "images" / "ddb1_groundtruth"
        self.fov_path = self.resources / "images" / "ddb1_fundusmask" / "fmask.tif"
        self.files = read_split_names(self.resources, split)
        if not self.files:
            raise DiaretDB1Error(self.resources, f"split {split!r} lists no images")
        self._check_files()
        self._fov: np.ndarray | None = None

    # -- checks -------------------------------------------------------------------------
    def _check_files(self) -> None:
        if not self.fov_path.is_file():
            raise DiaretDB1Error(self.fov_path, "FOV mask is missing")
        missing: list[str] = []
        missing_images = 0
        for fname in self.files:
            if not (self.image_dir / fname).is_file():
                missing.append(fname)
                missing_images += 1
                continue
            for lesion in LESION_TYPES:
                if not (self.gt_dir / GT_FOLDERS[lesion] / fname).is_file():
                    missing.append(f"{GT_FOLDERS[lesion]}/{fname}")
        if missing:
            shown = ", ".join(missing[:_MAX_NAMED]) + (", ..." if len(missing) > _MAX_NAMED else "")
            what = (f"{missing_images} of {len(self.files)} images" if missing_images
                    else f"{len(missing)} ground-truth maps")
            raise DiaretDB1Error(self.resources, f"split {self.split!r} is incomplete: {what} "
                                                 f"missing ({len(missing)} files: {shown})")

    # -- access -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Image names without extension (``image001``), in split order."""
        return [Path(f).stem for f in self.files]

    @property
    def fov(self) -> np.ndarray:
        """The shared official FOV mask (H, W) bool."""
        if self._fov is None:
            try:
                with Image.open(self.fov_path) as im:
                    arr = np.asarray(im)
            except _PIL_ERRORS as exc:  # every image needs it: fatal, not skipped
                raise DiaretDB1Error(self.fov_path, f"cannot read FOV mask: {_reason(exc, self.fov_path)}") from None
            if arr.ndim == 3:
                arr = arr.max(axis=2)
            self._fov = arr > 0
        return self._fov

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> DiaretDB1Image:
        return self.load(self.files[index])

    def __iter__(self) -> Iterator[DiaretDB1Image]:
        for fname in self.files:
            yield self.load(fname)

    def load_or_skip(self, fname: str) -> DiaretDB1Image | SkippedImage:
        """The image, or why it cannot be used (its file shown below the resources folder, as
        the tables name files): one unreadable file must not stop a run of hours. An unusable
        FOV mask concerns every image and still raises."""
        try:
            return self.load(fname)
        except DiaretDB1ImageError as exc:
            path = Path(exc.path)
            shown = path.relative_to(self.resources) if path.is_relative_to(self.resources) else path
            return SkippedImage(file=str(shown), reason=exc.reason, image=Path(fname).stem, path=str(path))

    def load(self, fname: str) -> DiaretDB1Image:
        """Load one image (file name with or without ``.png``).

        A file of this image that cannot be used raises :class:`DiaretDB1ImageError` (callers
        skip the image); an unusable FOV mask raises a plain :class:`DiaretDB1Error`.
        """
        if not fname.endswith(".png"):
            fname = f"{fname}.png"
        path = self.image_dir / fname
        rgb = _read_rgb(path)
        fov = self.fov
        if fov.shape != rgb.shape[:2]:
            raise DiaretDB1ImageError(path, f"image size {rgb.shape[1]}x{rgb.shape[0]} does not match "
                                       f"the FOV mask {fov.shape[1]}x{fov.shape[0]}")
        gt: dict[str, np.ndarray] = {}
        gt_paths: dict[str, Path] = {}
        for lesion in LESION_TYPES:
            gpath = self.gt_dir / GT_FOLDERS[lesion] / fname
            grey = _read_grey(gpath)
            if grey.shape != fov.shape:
                raise DiaretDB1ImageError(gpath, f"ground-truth size {grey.shape[1]}x{grey.shape[0]} "
                                            f"does not match the image")
            gt[lesion] = binarise_gt(grey, fov, self.threshold)
            gt_paths[lesion] = gpath
        return DiaretDB1Image(name=Path(fname).stem, rgb=rgb, fov=fov, gt=gt, path=path,
                              gt_paths=gt_paths)

    def load_gt(self, fname: str) -> dict[str, np.ndarray]:
        """Only the binarised GT maps (skips decoding the colour image)."""
        if not fname.endswith(".png"):
            fname = f"{fname}.png"
        return {lesion: binarise_gt(_read_grey(self.gt_dir / GT_FOLDERS[lesion] / fname),
                                    self.fov, self.threshold)
                for lesion in LESION_TYPES}
