"""Command modules. Each module exposes ``register(app, evaluate_app)``.

Modules are listed here explicitly (not discovered) so a missing module is a loud import
error, not a silently missing command.
"""
from __future__ import annotations

import importlib

import typer

COMMAND_MODULES: list[str] = ["classifier", "explain", "game_study", "bench", "diaretdb1", "faithfulness", "screen"]


def register_all(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"retina_fgvis.commands.{name}")
        module.register(app, evaluate_app)
