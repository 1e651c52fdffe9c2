"""``--fgvis-setting KEY=VALUE``: one parser for every command that lets users override the game.

Why one place: `evaluate diaretdb1`, `evaluate faithfulness` and `evaluate defense` accept the same
overrides, and a value must mean the same in each (JSON when it parses, e.g. ``0.3``, ``[]``,
``true``; otherwise the plain string, e.g. ``goal=fraction``).
"""
from __future__ import annotations

import json
from typing import Any

import typer


def parse_fgvis_settings(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items to a settings dict (later items win); a malformed item is a usage error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expects KEY=VALUE, got {item!r}", param_hint="--fgvis-setting")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
