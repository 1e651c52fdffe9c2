"""results.csv and lesions.csv from screening records.

Both CSVs start with one notice line (``# Research use only, not a diagnosis. ...``) so the
warning travels with the file into spreadsheets; read them with
:func:`retina_fgvis.screening.read_results_csv` (plain ``pandas.read_csv(path, skiprows=1)`` also
works, but keeps the formula quote described below).
Numbers are rounded to fixed decimals so that files are byte-identical between an
uninterrupted run, a resumed run and a multi-process run.

Text cells that a spreadsheet would take for a formula (file names, patient IDs and error
messages come from the user's folders) are written with a leading ``'``; see
:func:`escape_cell`. :func:`read_csv` undoes it, so a round trip is exact.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from retina_fgvis.report.files import atomic_write_text

NOTICE_LINE = "# Research use only, not a diagnosis. Read with pandas.read_csv(path, skiprows=1)."

RESULTS_COLUMNS = [
    "file", "patient", "eye", "p_referable", "referable", "n_regions", "n_red", "n_bright",
    "flagged_area_pct", "explained", "p_referable_after", "status", "error",
]
LESIONS_COLUMNS = [
    "file", "patient", "eye", "region", "kind", "area_px", "centroid_row", "centroid_col",
    "row0", "col0", "row1", "col1", "mean_importance", "mean_r", "mean_g", "mean_b", "green_contrast", "overlay",
]


def _fmt(v: Any, nd: int) -> Any:
    if v is None:
        return ""
    return f"{float(v):.{nd}f}"


def results_frame(records: Sequence[Any]) -> pd.DataFrame:
    """One row per image, columns :data:`RESULTS_COLUMNS`, sorted by file.

    ``referable`` is ``yes``/``no`` (empty on error); ``p_referable`` has 4 decimals,
    ``flagged_area_pct`` (regions' area as % of the field of view) 3. ``explained`` says whether
    the deletion game ran (``no`` below the threshold: 0 regions then means "not looked for",
    not "none found"); ``p_referable_after`` is p with the removed evidence gone (4 decimals,
    empty when not explained)."""
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
            "explained": ("no" if getattr(r, "explained", None) is False else "yes") if ok else "",
            "p_referable_after": (_fmt(getattr(r, "target_prob_after", None), 4)
                                  if ok and getattr(r, "explained", None) is not False else ""),
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
                # the number behind `kind` (bright: > 0, red: <= 0), so a reader can see that a
                # region at -0.007 is "red" by a hair
                "green_contrast": _fmt(reg.get("contrast"), 4),
                "overlay": r.overlay or "",
            })
    return pd.DataFrame(rows, columns=LESIONS_COLUMNS)


# a cell a spreadsheet would evaluate: starts with = + - @ tab or CR, possibly behind quotes
# this module added (so that a name that itself starts with ' round-trips too)
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")
# a plain number as this module writes it (_fmt, or pandas for float columns): not a formula
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def escape_cell(v: Any) -> Any:
    """``v`` as written to a CSV cell, safe against spreadsheet formula injection (OWASP "CSV
    injection"): a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return gets a leading ``'``, since Excel, LibreOffice and Google Sheets would otherwise
    evaluate it as a formula (``=HYPERLINK(...)``, ``=cmd|...``) when the file is opened, and
    file names, patient IDs and error messages come from the user's folders and manifests.
    Only text is changed: numbers, and text that is a plain number (``-0.1250``), stay as
    they are. A text that already starts with quotes before one of those characters gets
    one more, so :func:`unescape_cell` can always strip exactly one."""
    if not isinstance(v, str) or not _FORMULA_START.match(v) or _NUMBER.fullmatch(v):
        return v
    return "'" + v


def unescape_cell(v: Any) -> Any:
    """Inverse of :func:`escape_cell` for a text cell read back from a CSV written here."""
    if isinstance(v, str) and _ESCAPED.match(v):
        return v[1:]
    return v


def safe_csv(df: pd.DataFrame) -> str:
    """``df`` as CSV text (``\\n`` line ends on every platform) safe to open in a spreadsheet:
    text cells that would start a formula are quoted with ``'`` (:func:`escape_cell`). A
    carriage return inside a text cell (a file name may hold one) does not make the csv writer
    quote the cell when lines end in ``\\n``, and readers would split the row there: such a
    table is written with every cell quoted. For every CSV that carries user paths or text."""
    safe = df.copy()
    quote_all = False
    for col in safe.columns:
        if pd.api.types.is_string_dtype(safe[col].dtype):
            safe[col] = safe[col].map(escape_cell)
            quote_all = quote_all or any(isinstance(v, str) and "\r" in v for v in safe[col])
    quoting = csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
    return safe.to_csv(index=False, lineterminator="\n", quoting=quoting)


def csv_text(df: pd.DataFrame) -> str:
    """The notice line followed by :func:`safe_csv` of ``df``."""
    return NOTICE_LINE + "\n" + safe_csv(df)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` with the notice line, atomically."""
    return atomic_write_text(path, csv_text(df))


TEXT_COLUMNS = frozenset({"file", "patient", "eye", "referable", "explained", "status", "error", "kind", "overlay"})


def unescape_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (read as text) with the formula quotes of :func:`escape_cell` removed."""
    for col in df.columns:
        if pd.api.types.is_string_dtype(df[col].dtype):
            df[col] = df[col].map(unescape_cell)
    return df


def read_csv(path: str | Path, text_columns: frozenset[str] | set[str] = TEXT_COLUMNS) -> pd.DataFrame:
    """Read a CSV :func:`write_csv` wrote (results.csv, lesions.csv): skips the notice line,
    undoes the formula quotes (:func:`escape_cell`) so the round trip is exact, keeps
    ``text_columns`` as text (a patient called "NA" stays "NA") and the other columns as
    numbers (NaN where empty)."""
    df = unescape_frame(pd.read_csv(path, skiprows=1, dtype=str, keep_default_na=False))
    for col in df.columns:
        if col not in text_columns:
            df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    return df
