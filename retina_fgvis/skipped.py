"""One input image a run left out, and why: the value every evaluation reports skips with.

Why a value and not only a printed line: a skipped image is left out of every number, so the
outputs (per-image tables, summary.md, run.json) must say which files are missing, or a
sensitivity over 27 images reads as one over 28. Shared by the DiaretDB1 evaluation, the game
study and the faithfulness / defence evaluations, so all of them say it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Any

__all__ = ["SkippedImage", "skipped_last"]


@dataclass(frozen=True)
class SkippedImage:
    file: str        # the unusable file as the outputs show it (DiaretDB1: below its resources folder)
    reason: str      # in words, e.g. "cannot read image: image file is truncated"
    image: str = ""  # the data set's own name for the image, where it has one ("image003")
    path: str = ""   # the full path, for the console, where ``file`` is shortened for the tables

    def line(self) -> str:
        """The one console line, ``skipped <path>: <reason>``."""
        return f"skipped {self.path or self.file}: {self.reason}"

    def __str__(self) -> str:
        return self.line()

    def cell(self) -> str:
        """The table cell (column ``skipped``): ``<file>: <reason>``."""
        return f"{self.file}: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


def skipped_last(table: Any) -> Any:
    """A per-image table (pandas) with its ``skipped`` column last, whatever order the rows came in."""
    return table[[c for c in table.columns if c != "skipped"] + ["skipped"]]
