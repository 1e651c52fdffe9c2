"""Silence an image library's own warnings and log lines while it reads one file.

Why: pydicom, tifffile and Pillow warn or log about every oddity of a damaged file without
naming it; the readers turn real problems into one line that does, and in a run over thousands
of files the libraries' lines cannot be told apart.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_library(logger_name: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Ignore warnings and raise ``logger_name``'s level to ``level`` inside the block."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)
