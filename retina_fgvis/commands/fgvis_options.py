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


def check_fgvis_settings(settings: dict[str, Any], option: str = "--fgvis-setting") -> dict[str, Any]:
    """Refuse, before any work, a setting the game would refuse later (or silently misuse).

    Why here: an unknown key used to surface as a TypeError once the first FGVis method ran
    (after the baselines' hours) or never, when no FGVis method was chosen; a negative step
    size (``lr``) ran a game that adds evidence (``FGVisSettings.validate`` refuses it now). Every
    command that takes ``--fgvis-setting`` checks the same way, whatever methods it runs.
    Returns ``settings`` unchanged.
    """
    from dataclasses import fields

    from retina_fgvis.fgvis.games import FGVisSettings

    known = [f.name for f in fields(FGVisSettings)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise typer.BadParameter(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(known)})",
                                 param_hint=option)
    try:
        FGVisSettings(**settings).validate()
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                 param_hint=option) from None
    return settings
