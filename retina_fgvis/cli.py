"""Typer command-line interface: thin. It parses options, calls the library and prints.

Each command group lives in ``retina_fgvis/commands/<name>.py`` and registers itself on
``app`` (or on ``evaluate_app``) when imported below, so that modules stay small and
independent.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="retina-fgvis",
    help="Explain a referable-DR classifier with FGVis and turn the explanation into lesion "
    "detections. Research use only, not a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
evaluate_app = typer.Typer(help="Evaluations (DiaretDB1, faithfulness, defence).", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")

# Command modules register on `app` / `evaluate_app` at import time.
from retina_fgvis.commands import register_all  # noqa: E402

register_all(app, evaluate_app)


def main() -> None:
    from retina_fgvis.runtime import compile_defence_masks, keep_freed_memory

    keep_freed_memory()  # a CLI process runs games for its whole life: no page faults per iteration
    compile_defence_masks()  # one compiled kernel per defence mask on the CPU (compiled on first use)
    app()


if __name__ == "__main__":
    main()
