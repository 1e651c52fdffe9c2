"""results.csv and lesions.csv from screening records.

Both CSVs start with one notice line (``# Research use only, not a diagnosis. ...``) so the
warning travels with the file into spreadsheets; read them with
``pandas.read_csv(path, skiprows=1)`` (see :func:`retina_fgvis.screening.read_results_csv`).
Numbers are rounded to fixed decimals so that files are byte-identical between an
uninterrupted run, a resumed run and a multi-process run.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from retina_fgvis.report.files import atomic_write_text

NOTICE_LINE = "# Research use only, not a diagnosis. Read with pandas.read_csv(path, skiprows=1)."

RESULTS_COLUMNS = [
    "file", "patient", "eye", "p_referable", "referable", "n_regions", "n_red", "n_bright",
    "flagged_area_pct", "status", "error",
]
LESIONS_COLUMNS = [
    "file", "patient", "eye", "region", "kind", "area_px", "centroid_row", "centroid_col",
    "row0", "col0", "row1", "col1", "mean_importance", "mean_r", "mean_g", "mean_b", "overlay",
]


def _fmt(v: Any, nd: int) -> Any:
    if v is None:
        return ""
    return f"{float(v):.{nd}f}"


def results_frame(records: Sequence[Any]) -> pd.DataFrame:
    """One row per image, columns :data:`RESULTS_COLUMNS`, sorted by file.

    ``referable`` is ``yes``/``no`` (empty on error); ``p_referable`` has 4 decimals,
    ``flagged_area_pct`` (regions' area as % of the field of view) 3."""
    rows = []
    for r in sorted(records, key=lambda r: r.file):
        ok = r.status == "ok"
        rows.append({
            "file": r.file,
            "patient": r.patient,
            "eye": r.eye or "",
            "p_referable": _fmt(r.p_referable, 4) if ok else "",
            "referable": ("yes" if r.referable else "no") if ok and r.referable is not None else "",
            "n_regions": int(r.n_regions) if ok else "",
            "n_red": int(r.n_red) if ok else "",
            "n_bright": int(r.n_bright) if ok else "",
            "flagged_area_pct": _fmt(r.flagged_area_pct, 3) if ok else "",
            "status": r.status,
            "error": (r.error or "").replace("\n", " ").replace("\r", " "),
        })
    return pd.DataFrame(rows, columns=RESULTS_COLUMNS)


def lesions_frame(records: Sequence[Any]) -> pd.DataFrame:
    """One row per region of every successfully screened image (original-pixel coordinates,
    bbox end-exclusive), sorted by file then region id."""
    rows = []
    for r in sorted(records, key=lambda r: r.file):
        if r.status != "ok":
            continue
        for reg in sorted(r.regions or [], key=lambda g: int(g.get("id", 0))):
            bbox = list(reg.get("bbox") or [None] * 4)
            cen = list(reg.get("centroid") or [None, None])
            rgb = list(reg.get("mean_rgb") or [None] * 3)
            rows.append({
                "file": r.file, "patient": r.patient, "eye": r.eye or "",
                "region": int(reg.get("id", 0)), "kind": reg.get("kind", ""),
                "area_px": int(reg.get("area", 0)),
                "centroid_row": _fmt(cen[0], 1), "centroid_col": _fmt(cen[1], 1),
                "row0": bbox[0], "col0": bbox[1], "row1": bbox[2], "col1": bbox[3],
                "mean_importance": _fmt(reg.get("mean_importance"), 4),
                "mean_r": _fmt(rgb[0], 1), "mean_g": _fmt(rgb[1], 1), "mean_b": _fmt(rgb[2], 1),
                "overlay": r.overlay or "",
            })
    return pd.DataFrame(rows, columns=LESIONS_COLUMNS)


def csv_text(df: pd.DataFrame) -> str:
    """The notice line followed by the CSV (``\\n`` line ends on every platform)."""
    return NOTICE_LINE + "\n" + df.to_csv(index=False, lineterminator="\n")


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` with the notice line, atomically."""
    return atomic_write_text(path, csv_text(df))
