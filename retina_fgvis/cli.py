"""Typer command-line interface: thin. It parses options, calls the library and prints.

Each command group lives in ``retina_fgvis/commands/<name>.py`` and registers itself on
``app`` (or on ``evaluate_app``) when imported below, so that modules stay small and
independent.
"""
from __future__ import annotations

import errno

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


def user_error_line(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix (a file that is missing, unreadable or in
    the way, a weights file that is not one, a data set in the wrong layout); None for anything
    else, which is a bug and keeps its traceback."""
    from retina_fgvis.classifier.model import WeightsError
    from retina_fgvis.datasets.diaretdb1 import DiaretDB1Error
    from retina_fgvis.fundus.io import FundusReadError
    from retina_fgvis.report.files import NamingKeyError

    if isinstance(exc, (WeightsError, DiaretDB1Error, FundusReadError, NamingKeyError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)) or (
            isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS):
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where and exc.strerror else str(exc).splitlines()[0]
    return None


#: storage the user must fix: a read-only mount, a full disk, an exhausted quota
_STORAGE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def main() -> None:
    import sys

    from retina_fgvis.runtime import compile_defence_masks, keep_freed_memory

    keep_freed_memory()  # a CLI process runs games for its whole life: no page faults per iteration
    compile_defence_masks()  # one compiled kernel per defence mask on the CPU (compiled on first use)
    # the click that typer uses (typer >= 0.20 vendors its own copy as typer._click)
    click_errors = sys.modules[typer.BadParameter.__module__]
    # "no arguments: here is the help" is a UsageError with an empty message (click >= 8.2)
    no_args_help = getattr(click_errors, "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except click_errors.ClickException as exc:
        if isinstance(exc, click_errors.UsageError) and not isinstance(exc, no_args_help):
            # one line, the whole reason on it: rich's error box wraps long paths across lines
            # (copying the path and grepping logs break) and click's own form adds usage lines
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            typer.echo(f"Error: {exc.format_message()}{hint}", err=True)
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except Exception as exc:  # the safety net under every command's own checks
        line = user_error_line(exc)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) comes back as n


if __name__ == "__main__":
    main()
