"""Training data: labelled folders, patient-wise splits, a preprocessed uint8 cache, augmentation.

A data folder holds ``labels.csv`` with columns ``file,rdr,patient`` (``grade``, ``eye``
optional), ``file`` relative to the folder (the layout of ``../shared/data/odir5k_512`` and
``../shared/data/eyepacs1098_400``). The source name is the folder name.

Why a cache: decoding a JPEG and finding the FOV costs more than half a training step on this
CPU, and it is the same every epoch. Every image is decoded and preprocessed once
(:func:`retina_fgvis.fundus.preprocess.crop_fundus_uint8`, the same function inference uses) into
a uint8 memmap; epochs only augment and normalise.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import pandas as pd
import torch

from retina_fgvis.fundus.io import read_fundus
from retina_fgvis.fundus.preprocess import (FOVCircle, NoFundusError,
                                            crop_fundus_uint8, mapping_for_circle)
from retina_fgvis.report.files import atomic_write_text


def load_labels(folder: str | Path) -> pd.DataFrame:
    """``labels.csv`` of a data folder -> DataFrame with ``path, rdr, patient, source``.

    Every problem with the file raises a one-line ``ValueError`` (``FileNotFoundError`` when it is
    missing) that names the file and, for a bad value, its line: pandas' own messages ("No
    columns to parse from file", "invalid literal for int()") do not say which of several
    ``--data`` folders is wrong, nor where.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (a data folder holds labels.csv and the images)")
    csv = folder / "labels.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: labels.csv not found (expected columns file,rdr,patient)")
    try:
        df = pd.read_csv(csv, dtype={"patient": str, "file": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: empty file (expected columns file,rdr,patient)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{csv}: not a readable CSV file ({first})") from None
    except OSError as exc:
        raise ValueError(f"{csv}: cannot read ({exc.strerror or exc})") from None
    for col in ("file", "rdr", "patient"):
        if col not in df.columns:
            raise ValueError(f"{csv}: missing column '{col}' (expected columns file,rdr,patient)")
    if df.empty:
        raise ValueError(f"{csv}: no images listed")
    # line numbers as an editor shows them: the header is line 1
    rdr = pd.to_numeric(df["rdr"], errors="coerce")
    bad = ~rdr.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{csv}: column 'rdr' must be 0 or 1 (line {i + 2}: {_cell(df['rdr'].iloc[i])}; "
                         f"{int(bad.sum())} bad row(s))")
    for col in ("file", "patient"):
        empty = df[col].isna().to_numpy() | (df[col].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"{csv}: column '{col}' is empty (line {i + 2}; {int(empty.sum())} row(s))")
    df = df.copy()
    df["path"] = [str(folder / f) for f in df["file"]]
    df["source"] = folder.name
    df["rdr"] = rdr.astype(int)
    df["patient"] = df["source"] + ":" + df["patient"].astype(str)
    return df.reset_index(drop=True)


def _cell(value) -> str:
    """A CSV cell for an error message: quoted, empty cells named, long ones cut."""
    return "empty" if pd.isna(value) else repr(str(value)[:40])


def patient_split(df: pd.DataFrame, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean array, True = validation. Patient-wise: both eyes of a person on one side.

    Deterministic for a given labels.csv: patients are sorted, then permuted with ``seed``; the
    first ``round(val_fraction * n_patients)`` go to validation.
    """
    patients = np.array(sorted(df["patient"].unique()))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(patients))
    n_val = int(round(val_fraction * len(patients)))
    val_patients = set(patients[perm[:n_val]].tolist())
    return df["patient"].isin(val_patients).to_numpy()


def build_split(folders: list[str | Path], val_fractions: list[float], seed: int = 0) -> pd.DataFrame:
    """All folders' labels with a ``val`` column (per-source patient-wise split)."""
    if len(val_fractions) == 1 and len(folders) > 1:
        val_fractions = val_fractions * len(folders)
    if len(val_fractions) != len(folders):
        raise ValueError("give one --val-fraction, or one per --data folder")
    parts = []
    for folder, frac in zip(folders, val_fractions):
        if not 0.0 < float(frac) < 1.0:
            raise ValueError(f"{folder}: validation fraction {frac} must be between 0 and 1 (exclusive)")
        df = load_labels(folder)
        df["val"] = patient_split(df, frac, seed)
        df["val_fraction"] = frac
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def split_fingerprint(df: pd.DataFrame) -> str:
    """Short hash of the validation file list: lets `evaluate` prove it uses the same split."""
    names = sorted(f"{s}/{f}" for s, f in zip(df.loc[df["val"], "source"], df.loc[df["val"], "file"]))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def label_fingerprint(df: pd.DataFrame) -> str:
    """Short hash of the validation files *with their RDR labels*. Why: the file list alone stays
    the same when labels.csv is regraded, and the held-out metrics would then silently score
    other labels than the ones the threshold was picked on (checkpoints of earlier versions
    lack it; only the file list is checked for them)."""
    val = df[df["val"]]
    rows = sorted(f"{s}/{f}\t{int(r)}" for s, f, r in zip(val["source"], val["file"], val["rdr"]))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def split_mismatch(df: pd.DataFrame, metadata: dict) -> str | None:
    """Why ``df`` (a rebuilt split) is not the held-out split the checkpoint recorded, or None."""
    fp = split_fingerprint(df)
    if metadata.get("split_fingerprint") and fp != metadata["split_fingerprint"]:
        return (f"the held-out split differs from the one used in training (fingerprint {fp} != "
                f"{metadata['split_fingerprint']}): labels.csv changed?")
    lf = label_fingerprint(df)
    if metadata.get("split_label_fingerprint") and lf != metadata["split_label_fingerprint"]:
        return (f"the held-out labels differ from those the classifier was validated on (label fingerprint "
                f"{lf} != {metadata['split_label_fingerprint']}): labels.csv regraded?")
    return None


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageCache:
    images: np.ndarray  # (N, S, S, 3) uint8 (memmap)
    fovs: np.ndarray  # (N, S, S) uint8 0/1 (memmap)
    fallback: np.ndarray  # (N,) bool: FOV not detected, whole image used


def _fallback_crop(rgb: np.ndarray, size: int):
    """When no FOV is found (0.2 % of the training images: very dark or white surroundings), use
    the circle inscribed in the image's bounding square, so the image still trains."""
    h, w = rgb.shape[:2]
    c = FOVCircle(w / 2.0, h / 2.0, max(h, w) / 2.0)
    mapping = mapping_for_circle(c, (h, w), size, margin=0.0)
    fov = np.ones((h, w), bool)
    crop = mapping.crop_from_original(rgb)
    fov_model = mapping.crop_from_original(fov.astype(np.float32)) > 0.5
    return crop, fov_model


def build_cache(paths: list[str], size: int, cache_dir: str | Path,
                progress: Callable[[Iterable], Iterable] = lambda it: it) -> ImageCache:
    """Decode + preprocess every image once into ``cache_dir`` (reused when complete).

    An unreadable image raises its one-line
    :class:`~retina_fgvis.fundus.io.FundusReadError` (``"<file>: <reason>"``) and
    the run stops, rather than skipping it: the split, its fingerprint and the checkpoint
    metadata are all derived from ``labels.csv``, so a silently dropped image would make the
    recorded training data differ from the trained one; a listed file that cannot be read is a
    broken copy of the data set the user has to fix (or remove from ``labels.csv``).

    Why the cache cannot be trusted half-built: the ``.json`` that marks it complete is written
    (atomically) only after every image, and a failed or interrupted build deletes its image
    files, so a later run never reads zeros as images.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(("\n".join(paths) + f"|{size}|v1").encode()).hexdigest()[:16]
    img_f, fov_f, meta_f = (cache_dir / f"{key}.img.u8", cache_dir / f"{key}.fov.u8",
                            cache_dir / f"{key}.json")
    n = len(paths)
    meta = _complete_cache(meta_f, img_f, fov_f, paths, size)
    if meta is not None:
        images = np.memmap(img_f, np.uint8, "r", shape=(n, size, size, 3))
        fovs = np.memmap(fov_f, np.uint8, "r", shape=(n, size, size))
        return ImageCache(images, fovs, np.array(meta["fallback"], bool))
    meta_f.unlink(missing_ok=True)
    try:
        images = np.memmap(img_f, np.uint8, "w+", shape=(n, size, size, 3))
        fovs = np.memmap(fov_f, np.uint8, "w+", shape=(n, size, size))
        fallback = np.zeros(n, bool)
        for i in progress(range(n)):
            rgb = read_fundus(paths[i]).rgb  # FundusReadError: one line naming the file
            try:
                crop, fov_model, _, _ = crop_fundus_uint8(rgb, size)
            except NoFundusError:
                crop, fov_model = _fallback_crop(rgb, size)
                fallback[i] = True
            images[i] = crop
            fovs[i] = fov_model
        images.flush()
        fovs.flush()
        del images, fovs
    except BaseException:
        img_f.unlink(missing_ok=True)
        fov_f.unlink(missing_ok=True)
        raise
    atomic_write_text(meta_f, json.dumps({"paths": paths, "size": size, "fallback": fallback.tolist()}))
    return ImageCache(np.memmap(img_f, np.uint8, "r", shape=(n, size, size, 3)),
                      np.memmap(fov_f, np.uint8, "r", shape=(n, size, size)), fallback)


def _complete_cache(meta_f: Path, img_f: Path, fov_f: Path, paths: list[str], size: int) -> dict | None:
    """The cache's metadata when a finished cache for exactly these images is on disk (meta
    readable, same paths and size, image files of the full length); None otherwise."""
    try:
        meta = json.loads(meta_f.read_text())
        n = len(paths)
        complete = (meta.get("paths") == paths and int(meta.get("size", -1)) == size
                    and len(meta.get("fallback", [])) == n
                    and img_f.stat().st_size == n * size * size * 3 and fov_f.stat().st_size == n * size * size)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return meta if complete else None


# ---------------------------------------------------------------------------------------------
# Dataset + augmentation
# ---------------------------------------------------------------------------------------------


@dataclass
class AugmentSettings:
    """Fundus-appropriate augmentation: geometry that a camera/eye can produce (flips, rotation,
    slight zoom/shift) and mild photometric changes (exposure, contrast, gamma, colour cast).
    No crops that could cut lesions out, no hue rotation (red lesions must stay red)."""

    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 180.0
    scale: tuple[float, float] = (0.92, 1.08)
    shift: float = 0.03
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: float = 0.15
    colour: float = 0.05
    # Deletion awareness (for FGVis): the explanation deletes pixels towards 0 (the mean colour);
    # a classifier that reads "deleted" as disease makes the deletion game fight its own artefacts.
    delete_prob: float = 0.0  # share of samples with a random smooth deletion mask (label kept)
    delete_max_cover: float = 0.5  # at most this share of the image deleted (lesions rarely all go)
    blank_prob: float = 0.0  # share of samples replaced by a fully deleted eye, label non-referable


class CachedFundusDataset(torch.utils.data.Dataset):
    """Items: (tensor (3, S, S) normalised with 0 outside the FOV, label, index)."""

    def __init__(self, cache: ImageCache, indices: np.ndarray, labels: np.ndarray, size: int,
                 mean, std, augment: AugmentSettings | None = None, seed: int = 0):
        self.cache, self.indices, self.labels = cache, np.asarray(indices), np.asarray(labels)
        self.size, self.augment, self.seed = int(size), augment, seed
        self.mean = np.array(mean, np.float32).reshape(1, 1, 3) * 255.0
        self.std = np.array(std, np.float32).reshape(1, 1, 3) * 255.0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        idx = int(self.indices[i])
        img = np.asarray(self.cache.images[idx])
        fov = np.asarray(self.cache.fovs[idx]).astype(np.float32)
        src = img.shape[0]
        s = self.size
        if self.augment is None:
            if src != s:
                img = cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA if src > s else cv2.INTER_LINEAR)
                fov = cv2.resize(fov, (s, s), interpolation=cv2.INTER_LINEAR)
            x = img.astype(np.float32)
        else:
            a = self.augment
            rng = np.random.default_rng((self.seed, self.epoch, idx))
            ang = rng.uniform(-a.rotate_deg, a.rotate_deg)
            sc = rng.uniform(*a.scale) * s / src
            m = cv2.getRotationMatrix2D((src / 2.0, src / 2.0), ang, sc)
            m[:, 2] += (s / 2.0 - src / 2.0) + rng.uniform(-a.shift, a.shift, 2) * s
            if a.hflip and rng.random() < 0.5:
                m[0] = -m[0]
                m[0, 2] += s
            if a.vflip and rng.random() < 0.5:
                m[1] = -m[1]
                m[1, 2] += s
            # area-like quality when shrinking: pre-blur before the (linear) warp
            if sc < 0.75:
                sig = 0.5 * (1.0 / sc - 1.0)
                img = cv2.GaussianBlur(img, (0, 0), sig)
            img = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
            fov = cv2.warpAffine(fov, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
            x = img.astype(np.float32) / 255.0
            x = np.power(np.clip(x, 0, 1), math.exp(rng.uniform(-a.gamma, a.gamma)))
            x = x * (1.0 + rng.uniform(-a.brightness, a.brightness))
            mu = x.mean()
            x = (x - mu) * (1.0 + rng.uniform(-a.contrast, a.contrast)) + mu
            x = x * (1.0 + rng.uniform(-a.colour, a.colour, 3)).astype(np.float32)
            x = np.clip(x, 0, 1) * 255.0
        x = (x - self.mean) / self.std
        x = x * (fov > 0.5)[..., None]
        label = int(self.labels[i])
        if self.augment is not None and (self.augment.delete_prob > 0 or self.augment.blank_prob > 0):
            x, label = apply_deletion(x, label, self.augment, rng)
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))
        return t, label, idx


def random_deletion_mask(size: int, cover: float, rng: np.random.Generator,
                         per_channel: bool) -> np.ndarray:
    """Smooth random keep-mask (S, S, C) in [0, 1] whose deleted share is about ``cover``.

    Why smooth blobs at several scales: FGVis removals range from single microaneurysm-sized
    spots to large soft areas; the classifier should see both kinds of deletion as neutral.
    """
    channels = 3 if per_channel else 1
    cells = int(rng.choice([4, 8, 16, 32, 64]))
    noise = rng.random((cells, cells, channels)).astype(np.float32)
    field = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    field = field.reshape(size, size, channels)
    thr = np.quantile(field, cover)
    soft = max(float(field.std()) * rng.uniform(0.02, 0.3), 1e-6)
    keep = np.clip((field - thr) / soft + 0.5, 0.0, 1.0)
    return keep if per_channel else np.repeat(keep, 3, axis=2)


def apply_deletion(x: np.ndarray, label: int, a: AugmentSettings,
                   rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Deletion-aware augmentation on a normalised image (0 = deleted = the mean colour).

    - ``blank_prob``: the whole eye deleted; nothing is visible, so the label is non-referable
      (the FGVis reference image must carry no evidence for either class);
    - ``delete_prob``: a random smooth mask deletes up to ``delete_max_cover`` of the image in
      either class and the label is kept, so deletion itself carries no label information.
    """
    u = rng.random()
    if u < a.blank_prob:
        return np.zeros_like(x), 0
    if u < a.blank_prob + a.delete_prob:
        cover = rng.uniform(0.02, a.delete_max_cover)
        keep = random_deletion_mask(x.shape[0], cover, rng, per_channel=bool(rng.random() < 0.5))
        return x * keep, label
    return x, label
