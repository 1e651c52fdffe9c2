"""Folder screening: fundus photographs in, per-image records, then CSVs + an HTML report out.

Design (why it looks like this):

* **Deterministic input list.** :func:`discover_inputs` returns items sorted by their
  relative path (``InputItem.file``). Everything downstream -- batching, sharding over
  torchrun ranks (:func:`shard_chunks`), resume -- is defined on that list, so two runs on
  the same folder do the same work in the same groups.
* **One record per image, written atomically** (``OUT/records/<hash>.json``) as soon as the
  image is finished (status ``ok`` or ``error``). Records are the only state: the CSVs,
  report and run.json are *derived* from them by :func:`merge_outputs`. That gives resume
  after kill -9 (finished images are skipped), and multi-process runs (every rank writes its
  own images' records; rank 0 merges) for free.
* **Fixed batches.** Images are processed in fixed chunks of ``batch_size`` consecutive
  items. On resume a chunk whose records are all present is skipped; a partly finished
  chunk is recomputed as a whole, so every image is explained in exactly the same batch as
  in an uninterrupted run (batched float arithmetic can differ in the last bits with batch
  composition; this keeps resumed outputs byte-identical).
* **Bad input never stops the run.** Every per-image failure becomes ``status="error"`` with
  a one-line reason; a failing batch is retried image by image so one bad image cannot take
  its batch-mates down with it.
* **Dependency injection.** The classifier, explainer, region finder and overlay renderer are
  passed in (with the real ones as defaults), so tests run the whole pipeline in seconds
  with fakes, and the CLI stays a thin shell.

Patient grouping, in order of trust: DICOM header (PatientID / laterality), else the
``--manifest`` CSV (columns ``file, patient, eye``), else the file name ``<patient>_<eye>``
(``eye`` = left/right/OD/OS, separator ``_`` or ``-``; a file named just ``left.png`` takes
its folder name as the patient), else one patient per file (the relative path without suffix;
with it where two files differ only in their suffix). Patient IDs and manifest names are compared
in Unicode NFC (:func:`canonical_text`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retina_fgvis.fundus.intake import (DEFAULT_MAX_PIXELS, ImageRejected, check_fundus_pixels, is_greyscale,
                                        min_side_for, read_fundus_file)
from retina_fgvis.report.files import (
    atomic_write_bytes,
    atomic_write_image,
    atomic_write_text,
    file_sha256,
    naming_key,
    overlay_file_name,
    patient_dir_name,
    record_name,
    sha256_hex,
)

NOTICE = "Research use only, not a diagnosis."
RECORD_SCHEMA = 1
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_EYE_TOKENS = {"left": "left", "os": "left", "l": "left", "right": "right", "od": "right", "r": "right"}
_NAME_RE = re.compile(r"^(?P<patient>.+?)[_-](?P<eye>left|right|od|os)$", re.IGNORECASE)


class ScreeningUsageError(ValueError):
    """A problem with how screening was called (empty input, bad manifest): exit code 2."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One input file. ``file`` (posix path relative to the inputs' common base) is the key:
    unique, stable across runs and machines, used for sorting, sharding and record names."""

    path: Path
    file: str
    is_dicom: bool = False
    patient: str | None = None  # pre-read grouping (manifest / file name / file)
    eye: str | None = None
    grouping: str = "file"  # "manifest" | "filename" | "file" ("dicom" decided after reading)


def nfc(value: str) -> str:
    """Unicode NFC form. Why: one name can be written with composed or decomposed accents ("José"
    as é or as e + U+0301; macOS file systems and some PACS exports decompose, spreadsheets
    compose). Byte-wise they differ, so one patient would become two (two folders, two report
    sections) and a manifest typed in a spreadsheet would match no decomposed file name. File
    names and paths go through this (not stripped: " scan.png" and "scan.png" are two files)."""
    return unicodedata.normalize("NFC", value)


def canonical_text(value: str) -> str:
    """:func:`nfc`, stripped: a patient ID or a manifest cell (a spreadsheet's stray spaces)."""
    return nfc(value).strip()


def normalise_eye(value: Any) -> str | None:
    """left/right/L/R/OD/OS (any case) -> "left"/"right"; anything else -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _EYE_TOKENS.get(str(value).strip().lower())


def _looks_like_input(path: Path) -> tuple[bool, bool]:
    """(include?, is_dicom?) for a file found while walking a folder."""
    from retina_fgvis.fundus.dicom import DICOM_SUFFIXES, is_dicom

    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True, True
    if suffix in IMAGE_SUFFIXES:
        return True, False
    # DICOM exports often have no suffix or a numeric one (IM000001, 1.2.840...): sniff.
    if is_dicom(path):
        return True, True
    return False, False


def discover_inputs(
    inputs: Sequence[str | Path], exclude: Sequence[str | Path] = ()
) -> tuple[list[InputItem], list[Path]]:
    """Walk folders (recursively) and explicit files; return (items sorted by ``file``,
    skipped non-image files). Hidden files/folders and anything under ``exclude`` (the
    output folder, when it lies inside the input) are ignored. Explicitly named files are
    always included (so the user gets an error line for an unsupported one).

    Symbolic links to files are inputs under the link's own path (data sets are often linked
    in from elsewhere); a broken link with an image suffix is an input too, so it gets its
    error line. FIFOs, sockets and devices found in a folder are skipped: opening one to
    sniff or hash it would block the run."""
    from retina_fgvis.fundus.dicom import DICOM_SUFFIXES, is_dicom

    excluded = [Path(e).resolve() for e in exclude]
    found: dict[Path, bool] = {}
    skipped: list[Path] = []
    roots: list[Path] = []
    for raw in inputs:
        root = Path(raw).expanduser()
        if not root.exists() and not root.is_symlink():  # a broken link gets its error line
            raise ScreeningUsageError(f"{raw}: no such file or folder")
        if root.is_dir():
            root = root.resolve()
            roots.append(root)
            for dirpath, dirnames, filenames in os.walk(root):
                here = Path(dirpath)
                dirnames[:] = sorted(
                    d for d in dirnames
                    if not d.startswith(".") and not any(_within(here / d, e) for e in excluded)
                )
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    p = here / name
                    if not p.is_file():  # broken link, FIFO, socket, device
                        if p.is_symlink() and p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES:
                            found[p] = p.suffix.lower() in DICOM_SUFFIXES
                        else:
                            skipped.append(p)
                        continue
                    ok, dicom = _looks_like_input(p)
                    if ok:
                        found[p] = dicom
                    else:
                        skipped.append(p)
        else:
            # the folder resolved as folder inputs are (one file, one key), the file keeping its own
            # name (a linked file is screened under the link's name)
            root = Path(os.path.abspath(root)).parent.resolve() / root.name
            roots.append(root.parent)
            found[root] = root.suffix.lower() in DICOM_SUFFIXES or (root.is_file() and is_dicom(root))
    if not found:
        return [], skipped
    # Keys: relative to the root for one root; "<root name>/<relative path>" for several
    # (a counter keeps equal root names apart). Absolute paths never enter keys, so outputs
    # do not depend on where the folder lives.
    unique_roots = list(dict.fromkeys(roots))
    root_order = {r: i for i, r in enumerate(unique_roots)}
    labels: dict[Path, str] = {}
    if len(unique_roots) > 1:
        used: dict[str, int] = {}
        for r in unique_roots:
            name = r.name or "input"
            used[name] = used.get(name, 0) + 1
            labels[r] = name if used[name] == 1 else f"{name}~{used[name]}"
    items = []
    for p, d in found.items():
        # every path was built under its root: compare the paths as written (resolving would
        # follow a symbolic link out of its folder)
        # the first root in argument order that holds p, found among p's parents: a scan of every
        # root per file was quadratic (`screen site/*/*.png`: 5000 roots, 31 s before any image)
        root = min((a for a in p.parents if a in root_order), key=root_order.__getitem__)
        rel = p.relative_to(root).as_posix()
        key = f"{labels[root]}/{rel}" if labels else rel
        items.append(InputItem(path=p, file=key, is_dicom=d))
    items.sort(key=lambda it: it.file)
    seen: set[str] = set()
    unique_items = []
    for it in items:
        if it.file not in seen:
            seen.add(it.file)
            unique_items.append(it)
    return unique_items, skipped


def _within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent)
        return True
    except ValueError:
        return False


def load_manifest(path: str | Path) -> dict[str, tuple[str | None, str | None]]:
    """Manifest CSV with columns ``file, patient, eye`` -> {file: (patient, eye)}.

    ``file`` may be the path relative to the input folder, an absolute path, or a bare file
    name (matched when unique). Raises ScreeningUsageError for a missing/ill-formed file."""
    import pandas as pd

    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, comment=None)
    except FileNotFoundError:
        raise ScreeningUsageError(f"{p}: manifest not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ScreeningUsageError(f"{p}: unreadable manifest ({exc})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = {"file", "patient"} - set(df.columns)
    if missing:
        raise ScreeningUsageError(
            f"{p}: manifest needs columns file, patient[, eye]; missing {', '.join(sorted(missing))}"
        )
    out: dict[str, tuple[str | None, str | None]] = {}
    for _, row in df.iterrows():
        key = str(row["file"]).strip()  # NFC in assign_groups, which every manifest goes through
        if not key:
            continue
        patient = str(row["patient"]).strip() or None
        eye = normalise_eye(row["eye"]) if "eye" in df.columns else None
        out[key] = (patient, eye)
    return out


def group_from_name(file: str, folder: str | None = None) -> tuple[str | None, str | None]:
    """``<patient>_<eye>`` file-name rule; ``<folder>/left.png`` -> (folder, left).

    ``folder``: the name of the folder the file really sits in, for a key without one (the
    folder itself, or the files, were named on the command line): ``screen pat/`` and
    ``screen pat/left.png`` must group like ``screen parent/`` does."""
    rel = Path(file)
    stem = rel.stem
    m = _NAME_RE.match(stem)
    if m:
        return m.group("patient"), normalise_eye(m.group("eye"))
    eye = normalise_eye(stem) if stem.lower() in ("left", "right", "od", "os") else None
    patient = rel.parent.name or folder
    if eye and patient:
        return patient, eye
    return None, None


def assign_groups(
    items: Sequence[InputItem], manifest: dict[str, tuple[str | None, str | None]] | None = None,
    base_dirs: Sequence[str | Path] = (),
) -> tuple[list[InputItem], list[str]]:
    """Pre-read grouping (manifest, else file name, else one patient per file).

    A manifest ``file`` matches an input by its key (path relative to the input folder),
    by absolute path, by a path relative to one of ``base_dirs`` (the manifest's folder, the
    working directory), or by bare file name when that name is unique. The DICOM header, when
    present, overrides all this after the file is read. Returns the updated items and the
    manifest keys that matched no input (for a warning)."""
    # names compared in NFC (canonical_text): a manifest typed in a spreadsheet must match a
    # file whose name a Mac wrote decomposed
    manifest = {nfc(k): (canonical_text(p) if p else p, e) for k, (p, e) in (manifest or {}).items()}
    by_abs: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    for key in manifest:
        kp = Path(key)
        if kp.is_absolute():
            by_abs[nfc(str(kp.resolve()))] = key
        else:
            for base in base_dirs:
                by_abs.setdefault(nfc(str((Path(base) / kp).resolve())), key)
        by_name.setdefault(kp.name, []).append(key)
    used: set[str] = set()
    out: list[InputItem] = []
    for it in items:
        key = None
        file, path, name = nfc(it.file), nfc(str(it.path)), nfc(it.path.name)
        if file in manifest:
            key = file
        elif path in by_abs:
            key = by_abs[path]
        elif len(by_name.get(name, [])) == 1 and "/" not in by_name[name][0]:
            key = by_name[name][0]
        name_patient, name_eye = group_from_name(file, folder=nfc(it.path.parent.name))
        if key is not None and manifest[key][0]:
            used.add(key)
            patient, eye = manifest[key]
            out.append(_replace(it, patient=patient, eye=eye or name_eye, grouping="manifest"))
        elif name_patient:
            out.append(_replace(it, patient=name_patient, eye=name_eye, grouping="filename"))
        else:
            stem = file.rsplit(".", 1)[0] if "." in Path(file).name else file
            out.append(_replace(it, patient=stem, eye=name_eye, grouping="file"))
    # one patient per file: two files that differ only in their suffix (scan01.png, scan01.jpg)
    # are two patients, so they keep their suffix rather than merge into one
    stems = Counter(it.patient for it in out if it.grouping == "file")
    out = [_replace(it, patient=nfc(it.file)) if it.grouping == "file" and stems[it.patient] > 1 else it
           for it in out]
    # two files whose names differ only in their Unicode form (possible on Linux) stay two as well
    names = Counter(it.patient for it in out if it.grouping == "file")
    out = [_replace(it, patient=it.file) if it.grouping == "file" and names[it.patient] > 1 else it for it in out]
    unmatched = sorted(set(manifest) - used)
    return out, unmatched


def _replace(it: InputItem, **kw) -> InputItem:
    from dataclasses import replace

    return replace(it, **kw)


def plan_chunks(items: Sequence[InputItem], batch_size: int) -> list[list[InputItem]]:
    """Fixed batches of consecutive items of the sorted list. Batches -- not images -- are
    the unit of resume and of sharding, so every image is always explained together with
    the same batch-mates (batched float arithmetic can differ in the last bits with batch
    composition); 1 process, N processes and resumed runs therefore agree exactly."""
    bs = max(1, int(batch_size))
    return [list(items[i:i + bs]) for i in range(0, len(items), bs)]


def shard_chunks(chunks: Sequence[list[InputItem]], rank: int, world_size: int) -> list[list[InputItem]]:
    """The chunks a torchrun rank processes: round-robin over the fixed chunk list
    (deterministic, balanced within one chunk per rank)."""
    if world_size <= 1:
        return list(chunks)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return [c for i, c in enumerate(chunks) if i % world_size == rank]


# ---------------------------------------------------------------------------------------------
# Settings and records
# ---------------------------------------------------------------------------------------------


@dataclass
class ScreenSettings:
    """Everything that changes results goes into :meth:`result_key` (records made with other
    settings are recomputed on resume); batch size/device/workers only change speed."""

    batch_size: int = 4
    iterations: int | None = None  # None: the engine's default
    game: str = "deletion"
    target: int = 1  # REFERABLE
    defense: bool = True
    engine: dict[str, Any] = field(default_factory=dict)  # extra FGVis settings
    regions: dict[str, Any] = field(default_factory=dict)  # RegionSettings overrides
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: shortest image side accepted; None: the rule of fundus.intake.min_side_for
    min_side: int | None = None
    overlay_max_side: int = 1600
    explain_all: bool = False  # run the game even where its goal already holds (no effect but time)
    device: str = "cpu"
    loader_threads: int = 1
    post_threads: int | None = None  # regions + overlays; None: 0 on CPU, up to 4 with a GPU

    def result_key(self, weights_sha256: str | None) -> str:
        payload = {
            "schema": RECORD_SCHEMA,
            "weights": weights_sha256,
            "iterations": self.iterations,
            "game": self.game,
            "target": self.target,
            "defense": self.defense,
            "engine": self.engine,
            "regions": self.regions,
            "max_pixels": self.max_pixels,
            "min_side": self.min_side,
            "overlay_max_side": self.overlay_max_side,
        }
        return sha256_hex(json.dumps(payload, sort_keys=True, default=str))[:16]


@dataclass
class ImageRecord:
    """Per-image result; serialised to ``OUT/records/<hash>.json``."""

    file: str
    patient: str
    eye: str | None
    grouping: str
    status: str = "error"  # "ok" | "error"
    error: str = ""
    p_referable: float | None = None
    referable: bool | None = None
    n_regions: int = 0
    n_red: int = 0
    n_bright: int = 0
    flagged_area_pct: float | None = None
    study_date: str | None = None
    width: int | None = None
    height: int | None = None
    overlay: str | None = None  # relative to OUT
    patient_dir: str = ""
    input_sha256: str | None = None
    result_key: str = ""
    threshold: float | None = None
    target_prob_after: float | None = None
    iterations: int | None = None
    goal_reached: bool | None = None
    prune_level: float | None = None  # the game's changes below this were undone (0: none)
    explained: bool | None = None  # False: p(referable) already below the deletion goal
    error_stage: str = ""  # "input" (deterministic: kept on resume) | "explain" (redone on resume)
    regions: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    schema: int = RECORD_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def records_dir(out: str | Path) -> Path:
    return Path(out) / "records"


def record_path(out: str | Path, file: str) -> Path:
    return records_dir(out) / record_name(file)


def write_record(out: str | Path, rec: ImageRecord) -> Path:
    return atomic_write_text(record_path(out, rec.file), rec.to_json())


def read_record(out: str | Path, file: str) -> ImageRecord | None:
    """The stored record for ``file``, or None when absent/unreadable (then it is redone)."""
    p = record_path(out, file)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        rec = ImageRecord.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None
    return rec if rec.file == file else None


# ---------------------------------------------------------------------------------------------
# Per-image helpers
# ---------------------------------------------------------------------------------------------


def _resize_max_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    side = max(h, w)
    if max_side <= 0 or side <= max_side:
        return rgb
    scale = max_side / side
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def region_to_dict(region: Any) -> dict[str, Any]:
    """LesionRegion -> JSON-safe dict (works for any dataclass-like region object)."""
    from dataclasses import is_dataclass

    d = asdict(region) if is_dataclass(region) else dict(vars(region))
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (tuple, list)):
            v = [_jsonable(x) for x in v]
        else:
            v = _jsonable(v)
        out[k] = v
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return round(f, 6) if math.isfinite(f) else None
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# ---------------------------------------------------------------------------------------------
# Defaults for the injectable parts
# ---------------------------------------------------------------------------------------------


def default_explainer(classifier: Any, settings: ScreenSettings) -> Any:
    """The real FGVis engine with the fundus preset (deletion goal = the classifier's
    operating threshold), the same game `explain` and `evaluate diaretdb1` run."""
    from retina_fgvis.fgvis.presets import fundus_fgvis

    kw = dict(settings.engine)
    if settings.iterations is not None:
        kw["max_iterations"] = int(settings.iterations)
    return fundus_fgvis(classifier, defense=settings.defense, **kw)


def default_region_finder(settings: ScreenSettings) -> Callable[..., tuple[np.ndarray, list]]:
    from retina_fgvis.lesions import RegionSettings, find_regions

    rs = RegionSettings(**settings.regions) if settings.regions else RegionSettings()

    def _find(importance: np.ndarray, fov: np.ndarray, rgb: np.ndarray):
        return find_regions(importance, fov, rgb, rs)

    return _find


#: Fill opacity of flagged regions in screening overlays: low, so that the clinician still
#: sees the lesion under the colour; the outline carries the location.
OVERLAY_ALPHA = 0.15


def default_overlay() -> Callable[..., np.ndarray]:
    """Overlay renderer of report/overlay.py: outlined regions coloured by red/bright guess,
    legend and the research-use caption burnt into the picture (it travels without the page)."""
    from retina_fgvis.report.overlay import draw_overlay

    def _draw(rgb: np.ndarray, labels: np.ndarray, regions: list, importance: np.ndarray,
              fov: np.ndarray) -> np.ndarray:
        return draw_overlay(rgb, labels, regions=regions, alpha=OVERLAY_ALPHA)

    return _draw


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    item: InputItem
    record: ImageRecord
    rgb: np.ndarray | None = None
    prepared: Any = None  # PreparedFundus


@dataclass
class ScreenSummary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    reused: int = 0
    seconds: float = 0.0
    records: list[ImageRecord] = field(default_factory=list)


ProgressFn = Callable[[ImageRecord, bool], None]  # (record, reused_from_resume)


class Screener:
    """Runs the per-image pipeline over a list of items and writes per-image records.

    ``classifier`` follows the Classifier contract (``prepare``, ``predict_proba``,
    ``threshold``, ``model``, ``sha256``); ``explainer`` has ``attribute(batch, target, game,
    fov_mask) -> FGVisResult``; ``region_finder(importance, fov, rgb) -> (labels, regions)``;
    ``overlay(rgb, labels, regions, importance, fov) -> (H, W, 3) uint8``.
    """

    def __init__(
        self,
        classifier: Any,
        out: str | Path,
        settings: ScreenSettings | None = None,
        *,
        explainer: Any = None,
        region_finder: Callable[..., tuple[np.ndarray, list]] | None = None,
        overlay: Callable[..., np.ndarray] | None = None,
    ) -> None:
        self.classifier = classifier
        self.out = Path(out)
        self.settings = settings or ScreenSettings()
        self.explainer = explainer if explainer is not None else default_explainer(classifier, self.settings)
        self.region_finder = region_finder or default_region_finder(self.settings)
        self.overlay = overlay or default_overlay()
        self.result_key = self.settings.result_key(getattr(classifier, "sha256", None))
        #: optional status hook (text), called while a batch's game runs (progress bars)
        self.on_step: Callable[[str], None] | None = None
        self.threshold = float(getattr(classifier, "threshold", 0.5))
        self.min_side = min_side_for(int(getattr(classifier, "input_size", 0) or 0), self.settings.min_side)
        #: key of the patient-folder and overlay names (report.files module doc)
        self.naming_key = naming_key(self.out)

    # -- resume ------------------------------------------------------------------------------
    def finished_record(self, item: InputItem) -> ImageRecord | None:
        """A stored record that is still valid: same settings, same input bytes, overlay on
        disk. Anything else means the image is done again."""
        rec = read_record(self.out, item.file)
        if rec is None or rec.result_key != self.result_key or rec.status not in ("ok", "error"):
            return None
        if rec.status == "error" and rec.error_stage != "input":
            return None  # may have been transient (out of memory, a bug fixed since): retry
        sha = _input_sha256(item.path)
        if rec.input_sha256 != sha:
            return None
        if rec.status == "ok" and (not rec.overlay or not (self.out / rec.overlay).is_file()):
            return None
        return self._regrouped(rec, item)

    def _regrouped(self, rec: ImageRecord, item: InputItem) -> ImageRecord | None:
        """A reused record under this run's grouping (a manifest added or changed since, a file
        renamed into a patient folder): patient, eye and overlay folder follow the grouping,
        the game is not played again. The overlay is copied to its new place before the record
        names it and the old copy goes last, so an interruption leaves a valid record (at worst
        an orphan picture). A DICOM's grouping comes from its header, known only after reading
        it: such a record is redone instead (None) when its patient changed (its eye may come from
        the header, so an eye that differs is not a change there)."""
        patient = item.patient or item.file
        same_patient = (rec.patient, rec.grouping) == (patient, item.grouping)
        if rec.grouping == "dicom":
            # a header's ID, as an earlier version stored it: compared in NFC since session 16
            canonical = canonical_text(rec.patient)
            changed, rec.patient = canonical != rec.patient, canonical
            return self._renamed(rec, regrouped=changed)
        if same_patient and (item.is_dicom or rec.eye == item.eye):
            return self._renamed(rec, regrouped=False)
        if item.is_dicom:
            return None
        rec.patient, rec.eye, rec.grouping = patient, item.eye, item.grouping
        return self._renamed(rec, regrouped=True)

    def _renamed(self, rec: ImageRecord, regrouped: bool) -> ImageRecord:
        """``rec`` with its patient folder and overlay under this folder's naming rule (a record
        of an earlier version, named by the unkeyed hash, moves on ``--resume``); written only
        when a name changed. Copy first, record next, old copy last: an interruption leaves a
        valid record (at worst an orphan picture)."""
        patient_dir = patient_dir_name(rec.patient, self.naming_key)
        old_overlay = rec.overlay
        overlay = old_overlay
        if rec.status == "ok" and old_overlay:
            name = overlay_file_name(rec.file, rec.eye, self.naming_key, Path(old_overlay).suffix)
            overlay = f"patients/{patient_dir}/{name}"
        if (patient_dir, overlay) == (rec.patient_dir, old_overlay) and not regrouped:
            return rec
        rec.patient_dir, rec.overlay = patient_dir, overlay
        if overlay != old_overlay:
            atomic_write_bytes(self.out / overlay, (self.out / old_overlay).read_bytes())
        write_record(self.out, rec)
        if old_overlay and overlay != old_overlay:
            _remove_overlay(self.out / old_overlay)
        return rec

    # -- stages ------------------------------------------------------------------------------
    def _base_record(self, item: InputItem) -> ImageRecord:
        patient = item.patient or item.file
        rec = ImageRecord(
            file=item.file, patient=patient, eye=item.eye, grouping=item.grouping,
            patient_dir=patient_dir_name(patient, self.naming_key), result_key=self.result_key,
            threshold=self.threshold,
        )
        rec.input_sha256 = _input_sha256(item.path)
        return rec

    def load(self, item: InputItem) -> _Prepared:
        """Read, check and prepare one image (runs in a loader thread); never raises."""
        from retina_fgvis.fundus.io import FundusReadError

        rec = self._base_record(item)
        t0 = time.perf_counter()
        try:
            fundus = read_fundus_file(item.path, is_dicom=item.is_dicom, max_pixels=self.settings.max_pixels)
            if item.is_dicom:
                if fundus.patient_id:  # in NFC from the reader (fundus.dicom)
                    rec.patient = fundus.patient_id
                    rec.patient_dir = patient_dir_name(fundus.patient_id, self.naming_key)
                    rec.grouping = "dicom"
                if fundus.eye:
                    rec.eye = fundus.eye
                rec.study_date = fundus.study_date
            rgb = fundus.rgb
            rec.height, rec.width = int(rgb.shape[0]), int(rgb.shape[1])
            # after the header's patient/eye and the size are in the record: a refused image's row
            # still groups with its patient
            check_fundus_pixels(rgb, max_pixels=self.settings.max_pixels, min_side=self.min_side)
            prepared = self.classifier.prepare(rgb)
            rec.timings["read"] = round(time.perf_counter() - t0, 4)
            return _Prepared(item, rec, rgb, prepared)
        except FundusReadError as exc:
            rec.error = exc.reason
        except ImageRejected as exc:
            rec.error = str(exc)
        except MemoryError:
            rec.error = "out of memory while reading the image (image too large?)"
        except Exception as exc:  # noqa: BLE001 - NoFundusError and decoder surprises
            rec.error = _reason(exc)
        rec.status = "error"
        rec.error_stage = "input"
        # the absolute path may name the patient's folder; the record already has `file`
        rec.error = rec.error.replace(str(item.path), item.path.name)
        rec.timings["read"] = round(time.perf_counter() - t0, 4)
        return _Prepared(item, rec)

    def _explain(self, batch: list[_Prepared]) -> np.ndarray:
        """Classify + deletion game for a batch of prepared images (the accelerator part).

        Fills p(referable) and the game's outcome into the records; returns the importance
        maps on the model grid, (B, S, S)."""
        import torch

        model = getattr(self.classifier, "model", None)
        from retina_fgvis.classifier.model import module_device
        from retina_fgvis.fundus.preprocess import stack_prepared

        device = module_device(model)
        n = len(batch)
        x, fov = stack_prepared([p.prepared for p in batch])
        if device.type == "cuda":  # pinned host memory: the copy overlaps with queued work
            x, fov = x.pin_memory().to(device, non_blocking=True), fov.pin_memory().to(device, non_blocking=True)
        else:
            x, fov = x.to(device), fov.to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = self.classifier.predict_proba(x).detach().float().cpu().numpy()
        t1 = time.perf_counter()
        # Deletion game with a threshold goal: an eye already below the goal needs nothing
        # removed -- the game's solution is the empty mask at iteration 0 -- so it is not run.
        # Screening populations are mostly such eyes; this is where most of the time goes.
        need = [i for i in range(n) if not self._goal_met(float(probs[i]))]
        mean_mask = np.zeros((n, *x.shape[-2:]), dtype=np.float32)
        after = iters = goal = pruned = None
        if need:
            sel = torch.as_tensor(need, device=x.device)
            xs, fs = (x, fov) if len(need) == n else (x.index_select(0, sel), fov.index_select(0, sel))
            kwargs: dict[str, Any] = {}
            if self.on_step is not None and _accepts(self.explainer.attribute, "progress"):
                total = getattr(getattr(self.explainer, "settings", None), "max_iterations", None)
                of = f"/{total}" if total else ""
                k = len(need)
                kwargs["progress"] = lambda it, active: self.on_step(
                    f"iteration {it}{of}, {active} of {k} in the batch")
            result = self.explainer.attribute(xs, target=self.settings.target, game=self.settings.game,
                                              fov_mask=fs, **kwargs)
            mean_mask[need] = result.mean_mask.detach().float().cpu().numpy()
            after = _opt_array(getattr(result, "target_prob_after", None))
            iters = _opt_array(getattr(result, "iterations", None))
            goal = _opt_array(getattr(result, "goal_reached", None))
            pruned = _opt_array(getattr(result, "prune_level", None))
        t2 = time.perf_counter()
        pos = {i: j for j, i in enumerate(need)}
        for i, p in enumerate(batch):
            rec = p.record
            rec.p_referable = round(float(probs[i]), 6)
            rec.referable = bool(rec.p_referable >= self.threshold)
            j = pos.get(i)
            rec.explained = j is not None
            if j is None:
                rec.target_prob_after, rec.iterations, rec.goal_reached = rec.p_referable, 0, True
            else:
                rec.target_prob_after = None if after is None else round(float(after[j]), 6)
                rec.iterations = None if iters is None else int(iters[j])
                rec.goal_reached = None if goal is None else bool(goal[j])
                rec.prune_level = None if pruned is None else round(float(pruned[j]), 4)
            rec.timings["classify"] = round((t1 - t0) / n, 4)
            rec.timings["explain"] = round((t2 - t1) / max(1, len(need)), 4) if j is not None else 0.0
        return mean_mask

    def _goal_met(self, p: float) -> bool:
        """True when the explainer's deletion goal already holds for probability ``p``
        (threshold goal only; other goals, other games and unknown explainers always run)."""
        if self.settings.explain_all or self.settings.game != "deletion":
            return False
        s = getattr(self.explainer, "settings", None)
        # p <= threshold implies p <= max(threshold, p(reference)): the goal holds either way
        if getattr(s, "goal", None) not in ("threshold", "threshold_or_reference"):
            return False
        level = getattr(s, "goal_level", None)
        return level is not None and p <= float(level)

    def _finish(self, p: _Prepared, model_map: np.ndarray) -> None:
        """Importance map -> original grid -> regions -> overlay file -> record fields.

        CPU-only work; runs in a worker thread on GPU machines so that the accelerator can
        start the next batch's game meanwhile."""
        rec = p.record
        t0 = time.perf_counter()
        prepared = p.prepared
        importance = prepared.mapping.map_to_original(np.asarray(model_map, dtype=np.float32))
        fov = np.asarray(prepared.fov_original, dtype=bool)
        labels, regions = self.region_finder(importance, fov, p.rgb)
        rec.regions = [region_to_dict(r) for r in regions]
        rec.n_regions = len(regions)
        rec.n_red = sum(1 for r in regions if getattr(r, "kind", "") == "red")
        rec.n_bright = sum(1 for r in regions if getattr(r, "kind", "") == "bright")
        fov_area = int(fov.sum())
        flagged = int(sum(int(getattr(r, "area", 0)) for r in regions))
        rec.flagged_area_pct = round(100.0 * flagged / fov_area, 4) if fov_area else 0.0
        t1 = time.perf_counter()
        picture = self.overlay(p.rgb, labels, regions, importance, fov)
        picture = _resize_max_side(np.asarray(picture, dtype=np.uint8), self.settings.overlay_max_side)
        rel = f"patients/{rec.patient_dir}/{overlay_file_name(rec.file, rec.eye, self.naming_key, '.jpg')}"
        atomic_write_image(self.out / rel, picture)
        rec.overlay = rel
        rec.status, rec.error, rec.error_stage = "ok", "", ""
        rec.timings["regions"] = round(t1 - t0, 4)
        rec.timings["overlay"] = round(time.perf_counter() - t1, 4)

    def _finish_safe(self, p: _Prepared, model_map: np.ndarray) -> None:
        try:
            self._finish(p, model_map)
        except Exception:  # noqa: BLE001 - one image's regions/overlay cannot stop the run
            self._fail(p, "regions/overlay")
        finally:
            p.rgb = p.prepared = None  # free the pixels early; the record is all we keep

    def _explain_chunk(self, loaded: list[_Prepared]) -> list[tuple[_Prepared, np.ndarray]]:
        """The game for a chunk's readable images; a failing batch is retried image by
        image so that one bad image cannot sink its batch-mates. Returns (image, map) jobs."""
        good = [p for p in loaded if p.prepared is not None]
        if not good:
            return []
        try:
            maps = self._explain(good)
            return list(zip(good, maps))
        except Exception:  # noqa: BLE001
            if len(good) == 1:
                self._fail(good[0], "explain")
                return []
        jobs = []
        for p in good:
            _reset(p.record)
            try:
                jobs.append((p, self._explain([p])[0]))
            except Exception:  # noqa: BLE001
                self._fail(p, "explain")
        return jobs

    def _fail(self, p: _Prepared, stage: str) -> None:
        import sys

        exc = sys.exc_info()[1]
        rec = p.record
        _reset(rec)
        rec.status = "error"
        rec.error_stage = stage
        rec.error = f"{stage} failed ({_reason(exc)})" if exc else f"{stage} failed"

    def _post_threads(self) -> int:
        if self.settings.post_threads is not None:
            return max(0, int(self.settings.post_threads))
        # CPU: the game already uses every core; threads would only compete with it
        return 0 if str(self.settings.device).startswith("cpu") else min(4, os.cpu_count() or 1)

    # -- driver ------------------------------------------------------------------------------
    def run(self, items: Sequence[InputItem], resume: bool = False,
            progress: ProgressFn | None = None, rank: int = 0, world_size: int = 1) -> ScreenSummary:
        """Process ``items`` (the full sorted list) in fixed chunks of ``batch_size``; with
        ``world_size > 1`` only this rank's chunks. Returns the records of those images.

        Pipeline per chunk: load (loader threads, one chunk ahead) -> game (this thread, the
        accelerator) -> regions + overlay (post threads, while the next game runs) -> records
        (written in chunk order, each atomically)."""
        t_start = time.perf_counter()
        chunks = shard_chunks(plan_chunks(items, self.settings.batch_size), rank, world_size)
        summary = ScreenSummary(total=sum(len(c) for c in chunks))
        plan: list[tuple[list[InputItem], list[ImageRecord] | None]] = []
        for chunk in chunks:
            done = [self.finished_record(it) for it in chunk] if resume else [None] * len(chunk)
            if resume and all(r is not None for r in done):
                plan.append((chunk, done))  # type: ignore[arg-type]
            else:
                plan.append((chunk, None))
        workers = max(0, int(self.settings.loader_threads))
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        n_post = self._post_threads()
        post = ThreadPoolExecutor(max_workers=n_post) if n_post > 0 else None
        futures: dict[int, list[Future]] = {}
        pending: list[tuple[list[_Prepared], list[Future]]] = []

        def submit(idx: int) -> None:
            if pool is None or idx >= len(plan) or plan[idx][1] is not None or idx in futures:
                return
            futures[idx] = [pool.submit(self.load, it) for it in plan[idx][0]]

        def drain(keep: int) -> None:
            while len(pending) > keep:
                loaded, futs = pending.pop(0)
                for f in futs:
                    f.result()
                for p in loaded:
                    write_record(self.out, p.record)
                for p in loaded:
                    summary.records.append(p.record)
                    if progress:
                        progress(p.record, False)

        try:
            for idx, (chunk, reused) in enumerate(plan):
                if reused is not None:
                    drain(0)  # keep records and progress in list order
                    for rec in reused:
                        summary.records.append(rec)
                        summary.reused += 1
                        if progress:
                            progress(rec, True)
                    continue
                submit(idx)
                # prefetch the next chunk that needs work while this one is explained
                nxt = next((j for j in range(idx + 1, len(plan)) if plan[j][1] is None), None)
                if nxt is not None:
                    submit(nxt)
                if pool is None:
                    loaded = [self.load(it) for it in chunk]
                else:
                    loaded = [f.result() for f in futures.pop(idx)]
                jobs = self._explain_chunk(loaded)
                if post is None:
                    for p, m in jobs:
                        self._finish_safe(p, m)
                    pending.append((loaded, []))
                else:
                    pending.append((loaded, [post.submit(self._finish_safe, p, m) for p, m in jobs]))
                drain(1 if post is not None else 0)
            drain(0)
        finally:
            for ex in (pool, post):
                if ex is not None:
                    ex.shutdown(wait=True, cancel_futures=True)
        summary.ok = sum(1 for r in summary.records if r.status == "ok")
        summary.failed = sum(1 for r in summary.records if r.status != "ok")
        summary.seconds = time.perf_counter() - t_start
        return summary


def _input_sha256(path: Path) -> str | None:
    """The input's content hash for resume checks; None for anything but a readable regular file
    (hashing a FIFO would block for ever)."""
    if not path.is_file():
        return None
    try:
        return file_sha256(path)
    except OSError:
        return None


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _reset(rec: ImageRecord) -> None:
    rec.p_referable = rec.referable = rec.target_prob_after = None
    rec.iterations = rec.goal_reached = rec.prune_level = rec.overlay = rec.explained = None
    rec.flagged_area_pct = None
    rec.n_regions = rec.n_red = rec.n_bright = 0
    rec.regions = []


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    lines = str(exc).strip().splitlines()
    msg = lines[0].strip() if lines else ""
    if type(exc).__name__ in ("NoFundusError",) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _opt_array(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    try:
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------
# Merge: records -> results.csv, lesions.csv, report.html, run.json
# ---------------------------------------------------------------------------------------------


def collect_records(out: str | Path, items: Iterable[InputItem]) -> list[ImageRecord]:
    """Records of ``items`` (in item order) from ``OUT/records``; missing ones become errors
    (a rank that died leaves holes; the merge must still produce complete tables)."""
    recs = []
    key = naming_key(out)
    for it in items:
        rec = read_record(out, it.file)
        if rec is None:
            patient = it.patient or it.file
            rec = ImageRecord(file=it.file, patient=patient, eye=it.eye, grouping=it.grouping,
                              patient_dir=patient_dir_name(patient, key), status="error",
                              error="not processed (no record; run again with --resume)")
        recs.append(rec)
    return recs


def records_of_other_inputs(out: str | Path, items: Iterable[InputItem]) -> list[Path]:
    """Record files in ``OUT/records`` that belong to none of ``items`` (inputs removed since an
    earlier run into OUT). They are in no table or report of this run, but their files still
    name a patient: the screen command says so, and forgets them on request."""
    wanted = {record_path(out, it.file).name for it in items}
    return sorted(p for p in records_dir(out).glob("*.json") if p.name not in wanted)


def _record_overlay(path: Path) -> str | None:
    """The overlay a record file names (None when unreadable or it names none)."""
    try:
        overlay = json.loads(path.read_text(encoding="utf-8")).get("overlay")
    except (OSError, ValueError, AttributeError):
        return None
    return overlay if isinstance(overlay, str) else None


def _remove_overlay(picture: Path) -> None:
    """Delete an overlay and its patient folder once that is empty."""
    picture.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        picture.parent.rmdir()  # only when empty


def forget_records(out: str | Path, record_files: Iterable[Path]) -> int:
    """Delete these records and their overlays (and a patient folder left empty); returns how
    many records went. The overlay goes first: an interruption leaves a record whose overlay is
    missing, which a later run redoes or forgets, never an overlay no record names."""
    out = Path(out)
    n = 0
    for path in record_files:
        overlay = _record_overlay(path)
        if overlay and overlay.startswith("patients/") and ".." not in Path(overlay).parts:
            _remove_overlay(out / overlay)
        path.unlink(missing_ok=True)
        n += 1
    return n


def remove_unnamed_overlays(out: str | Path, records: Sequence[ImageRecord] | None = None,
                            other_record_files: Iterable[Path] = ()) -> int:
    """Delete overlays under ``OUT/patients`` that no record in ``OUT/records`` names (and
    patient folders left empty); returns how many went.

    Why: an image redone on ``--resume`` (new settings, a changed file) gets its overlay under
    today's name, and the earlier one -- possibly named by an earlier version's reversible plain
    hash -- would stay beside it for ever; an interrupted move leaves one too. Records of inputs
    no longer given still name theirs, so those are kept (``--forget-missing`` removes them).

    ``records``: the run's records, already read (:func:`collect_records`), with the record files
    of the other inputs (:func:`records_of_other_inputs`): only those are read again. None reads
    every record file."""
    out = Path(out)
    if records is None:
        named = {_record_overlay(path) for path in records_dir(out).glob("*.json")}
    else:
        named = {r.overlay for r in records} | {_record_overlay(path) for path in other_record_files}
    n = 0
    for folder in sorted((out / "patients").glob("*")):
        if not folder.is_dir():
            continue
        for picture in sorted(folder.iterdir()):
            if picture.is_file() and not picture.name.startswith(".") and \
                    f"patients/{folder.name}/{picture.name}" not in named:
                picture.unlink(missing_ok=True)
                n += 1
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return n


def merge_outputs(out: str | Path, records: Sequence[ImageRecord], run_info: dict[str, Any],
                  embed_images: bool = False) -> dict[str, Path]:
    """Write results.csv, lesions.csv, report.html and run.json (each atomically).

    ``report.html`` and the CSVs depend only on the records and the settings in
    ``run_info`` (no timestamps), so an interrupted+resumed run reproduces them byte for byte;
    times live in run.json."""
    from retina_fgvis.report.html import render_report
    from retina_fgvis.report.tables import lesions_frame, results_frame, write_csv

    out = Path(out)
    records = sorted(records, key=lambda r: r.file)
    paths = {
        "results": write_csv(results_frame(records), out / "results.csv"),
        "lesions": write_csv(lesions_frame(records), out / "lesions.csv"),
    }
    html = render_report(records, run_info, out, embed_images=embed_images)
    paths["report"] = atomic_write_text(out / "report.html", html)
    info = dict(run_info)
    info["notice"] = NOTICE
    info["counts"] = {
        "images": len(records),
        "ok": sum(r.status == "ok" for r in records),
        "error": sum(r.status != "ok" for r in records),
        "referable": sum(bool(r.referable) for r in records if r.status == "ok"),
        "patients": len({r.patient for r in records}),
    }
    stage_totals: dict[str, float] = {}
    for r in records:
        for k, v in (r.timings or {}).items():
            stage_totals[k] = round(stage_totals.get(k, 0.0) + float(v), 4)
    info.setdefault("timings", {})["per_stage_seconds_total"] = stage_totals
    paths["run"] = atomic_write_text(out / "run.json", json.dumps(info, indent=2, sort_keys=True, default=str))
    return paths


def versions() -> dict[str, str]:
    """Versions of the things that change results (for run.json)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("retina-fgvis", "torch", "torchvision", "timm", "numpy", "scikit-image",
                 "opencv-python-headless", "pydicom", "pillow", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_results_csv(path: str | Path):
    """Read results.csv / lesions.csv written here: skips the notice line, undoes the formula
    quotes, keeps text columns as text (a patient called "NA" stays "NA"), numbers as numbers
    (NaN where empty); see :func:`retina_fgvis.report.tables.read_csv`."""
    from retina_fgvis.report.tables import read_csv

    return read_csv(path)


__all__ = [
    "NOTICE", "InputItem", "ImageRecord", "ScreenSettings", "Screener", "ScreenSummary",
    "ScreeningUsageError", "discover_inputs", "load_manifest", "assign_groups", "group_from_name",
    "collect_records", "records_of_other_inputs", "forget_records", "remove_unnamed_overlays", "merge_outputs", "versions", "read_results_csv",
    "normalise_eye", "is_greyscale", "plan_chunks", "shard_chunks",
]
