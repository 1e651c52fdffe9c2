"""One input image a run left out, and why: the value every evaluation reports skips with.

Why a value and not only a printed line: a skipped image is left out of every number, so the
outputs (per-image tables, summary.md, run.json) must say which files are missing, or a
sensitivity over 27 images reads as one over 28. Shared by the DiaretDB1 evaluation, the game
study and the faithfulness / defence evaluations, so all of them say it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SkippedImage"]


@dataclass(frozen=True)
class SkippedImage:
    file: str        # the unusable file as the outputs show it (DiaretDB1: below its resources folder)
    reason: str      # in words, e.g. "cannot read image: image file is truncated"
    image: str = ""  # the data set's own name for the image, where it has one ("image003")

    def line(self, shown: str | None = None) -> str:
        """The one console line, ``skipped <file>: <reason>``; ``shown`` replaces the file (a
        full path on the console where the tables keep a relative one)."""
        return f"skipped {shown or self.file}: {self.reason}"

    def __str__(self) -> str:
        return self.line()

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}
