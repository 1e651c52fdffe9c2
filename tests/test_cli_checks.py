"""Option checks shared by every command, and the CLI's safety net for user errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from retina_fgvis.cli import user_error_line
from retina_fgvis.commands.checks import output_file, output_folder, resolve_device


def test_device_names_are_checked_before_any_work() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(typer.BadParameter, match="'bogus' is not a device"):
        resolve_device("bogus")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(typer.BadParameter, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_output_paths_in_the_way_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(typer.BadParameter, match="afile: exists and is not a folder"):
        output_folder(a_file)
    with pytest.raises(typer.BadParameter, match="afile: exists and is not a folder"):
        output_folder(a_file / "sub")
    with pytest.raises(typer.BadParameter, match="afile: exists and is not a folder"):
        output_file(a_file / "report.md")
    with pytest.raises(typer.BadParameter, match="is a folder"):
        output_file(tmp_path)
    assert output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert output_file(tmp_path / "new" / "x.md") == tmp_path / "new" / "x.md"


def test_user_errors_become_one_line_and_bugs_keep_their_traceback(tmp_path: Path) -> None:
    from retina_fgvis.classifier.model import WeightsError

    assert user_error_line(WeightsError(tmp_path / "w.pt", "not a readable weights file")) == \
        f"{tmp_path / 'w.pt'}: not a readable weights file"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError) as info:
        (tmp_path / "afile").mkdir()
    assert user_error_line(info.value) == f"{tmp_path / 'afile'}: File exists"
    assert user_error_line(KeyError("setting")) is None
    assert user_error_line(ZeroDivisionError()) is None


def test_the_entry_points_safety_net_turns_a_file_error_no_command_checks_into_one_line(tmp_path: Path) -> None:
    """`explain --out` under a broken symbolic link passes the upfront check (nothing exists there)
    and fails in mkdir: only main()'s net stands between the user and a traceback."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "gone"
    image = Path(__file__).resolve().parents[1] / "data" / "samples" / "SYNA_left.png"
    proc = subprocess.run([sys.executable, "-c", "from retina_fgvis.cli import main; main()", "explain", str(image),
                           "--out", str(out), "--device", "cpu", "--iterations", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {out}: File exists"


def test_devices_the_project_cannot_run_on_are_refused() -> None:
    for name in ("mps", "meta"):
        with pytest.raises(typer.BadParameter, match="cpu or cuda only"):
            resolve_device(name)


def test_usage_errors_keep_the_reason_and_the_path_on_one_line(tmp_path: Path) -> None:
    """Typer's rich error box wraps a long path over several lines (copying it or grepping a log
    for it then fails); the entry point prints click's plain form: one line with the whole reason."""
    existing = tmp_path / ("a-folder-with-a-long-name-" * 3) / "weights-that-already-exist.pt"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-c", "from retina_fgvis.cli import main; main()", "train",
                           "--data", str(tmp_path), "--out", str(existing)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()  # one line: click's usage lines around it are left out
    assert line.startswith(f"Error: Invalid value for --out: {existing}: exists; pass --overwrite to replace it")
    assert line.endswith("train --help')")
    assert "╭" not in proc.stderr and "Traceback" not in proc.stderr
    assert existing.read_bytes() == b"x"


def test_the_package_lists_its_lazy_api_and_names_missing_attributes() -> None:
    import retina_fgvis

    assert {"load_classifier", "FGVis", "activation_bounds"} <= set(dir(retina_fgvis))
    assert callable(retina_fgvis.load_classifier)
    with pytest.raises(AttributeError, match="module 'retina_fgvis' has no attribute 'nope'"):
        retina_fgvis.nope  # noqa: B018


def test_no_arguments_prints_the_help_without_an_error_line() -> None:
    """Typer's "no arguments: help" is a UsageError with an empty message; the one-line error rule
    printed "Error:  (see ...)" under the help."""
    for args in ([], ["evaluate"]):
        proc = subprocess.run([sys.executable, "-c", "from retina_fgvis.cli import main; main()", *args],
                              capture_output=True, text=True, timeout=120)
        assert "Usage" in proc.stdout + proc.stderr and "Error" not in proc.stdout + proc.stderr, args


def test_iteration_options_take_both_spellings_and_state_the_engines_default() -> None:
    import re

    import typer.main

    from retina_fgvis.cli import app
    from retina_fgvis.fgvis.games import FGVisSettings

    commands = typer.main.get_command(app).commands
    for name in ("screen", "explain"):
        (option,) = [p for p in commands[name].params if p.name == "iterations"]
        assert {"--iterations", "--max-iterations"} <= set(option.opts)
        assert re.search(r"default: the engine's, (\d+)", option.help).group(1) == str(FGVisSettings().max_iterations)


def test_a_failed_atomic_write_names_the_file_asked_for_not_the_temporary_one(tmp_path, monkeypatch) -> None:
    """A full disk during an atomic write: the error names the target (the hidden temporary
    file's name meant nothing), the temporary file is gone, and the CLI makes it one line."""
    import errno
    import os

    from retina_fgvis.report import files

    def disk_full(fd: int, data: bytes) -> None:
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_fsynced", disk_full)
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as info:
        files.atomic_write_text(target, "{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    assert user_error_line(info.value) == f"{target}: No space left on device"
    assert user_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == "/mnt/x: Read-only file system"
    assert user_error_line(OSError(errno.EIO, "Input/output error", "/mnt/x")) is None  # hardware: keep the traceback
