"""Checks every command makes on its options before any work starts.

Why here: a typo in ``--device`` or an ``--out`` that names an existing file used to surface as a
Python traceback -- sometimes after an hour of work (a benchmark, a full evaluation) had been
done and could not be written. Each check raises ``typer.BadParameter`` (exit code 2, one line
naming the option) so every command fails the same way, at once.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NoReturn

import typer


def resolve_device(name: str, option: str = "--device") -> str:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``; anything torch cannot
    parse, or CUDA on a machine without it, is refused."""
    import torch

    name = (name or "").strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"'{name}' is not a device (use auto, cpu, cuda or cuda:N)", param_hint=option) from None
    if device.type not in ("cpu", "cuda"):
        raise typer.BadParameter(f"'{name}': this project runs on cpu or cuda only", param_hint=option)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine", param_hint=option)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise typer.BadParameter(f"'{name}': this machine has {torch.cuda.device_count()} CUDA device(s)",
                                     param_hint=option)
    return name


def fail(message: str) -> NoReturn:
    """``error: <message>`` on stderr and exit code 2: a user error found inside a command."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def image_error_line(path: Path, exc: BaseException) -> str:
    """One line for an image a command could not take: the reason's first line (torch's messages
    run over several), prefixed with the file unless the reason already names it."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return reason if str(path) in reason else f"{path}: {reason}"


def output_folder(path: Path, option: str = "--out", writable: bool = True) -> Path:
    """A folder the command may create or write into: not an existing file, no existing file on
    the way to it, and (``writable``) writable where it exists (or, where it does not yet, its
    nearest existing parent): a write-protected ``--out`` used to surface only when the results
    were written, after the whole benchmark, evaluation or training had run. ``writable=False``
    for a folder that may only be read (a complete, shared image cache)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise typer.BadParameter(f"{p}: exists and is not a folder", param_hint=option)
    if writable:
        _check_writable(next(p for p in (path, *path.parents) if p.exists()), option)
    return path


def _check_writable(folder: Path, option: str) -> None:
    """Create (and drop) an unnamed file in ``folder``: the one test that also holds for root, for
    read-only mounts and for immutable folders, where permission bits (``os.access``) say yes."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise typer.BadParameter(f"{folder}: not writable ({reason})", param_hint=option) from None


def output_file(path: Path, option: str = "--out", appended: bool = False) -> Path:
    """A file the command may write: not an existing folder, and its folder can be made and written
    (a file replaced atomically is a new file in that folder). An ``appended`` file that exists
    (a log, ``/dev/stdout``) is written in place: it only has to open for appending."""
    path = Path(path)
    if path.is_dir():
        raise typer.BadParameter(f"{path}: is a folder, a file name is needed", param_hint=option)
    if appended and path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise typer.BadParameter(f"{path}: not writable ({exc.strerror or type(exc).__name__})",
                                     param_hint=option) from None
        return path
    output_folder(path.parent, option)
    return path
