"""Every long-running command refuses a bad --device, an --out in the way and impossible counts
at once, in one line with exit code 2, before it loads a model or reads data (the shared checks
are unit-tested in test_cli_checks.py; here: that each command actually uses them)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from retina_fgvis.cli import app

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "SYNA_left.png"


@pytest.fixture()
def wide_errors(monkeypatch):
    """Typer's usage-error panel as wide as the message: a long tmp path is not wrapped mid-text."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 400)


def _commands(tmp_path: Path, out: Path) -> dict[str, list[str]]:
    """Each command with its --out; every other argument valid (or never reached)."""
    return {
        "evaluate diaretdb1": ["evaluate", "diaretdb1", "--data-dir", str(tmp_path), "--out", str(out)],
        "evaluate game-study": ["evaluate", "game-study", "--data-dir", str(tmp_path), "--out", str(out)],
        "evaluate faithfulness": ["evaluate", "faithfulness", "--model", "imagenet", "--out", str(out)],
        "evaluate defense": ["evaluate", "defense", "--model", "imagenet", "--out", str(out)],
        "explain": ["explain", str(SAMPLE), "--out", str(out)],
        "bench": ["bench", "--out", str(out / "bench.md")],
    }


@pytest.mark.parametrize("command", ["evaluate diaretdb1", "evaluate game-study", "evaluate faithfulness",
                                     "evaluate defense", "explain", "bench"])
def test_an_out_in_the_way_is_refused_before_any_work(tmp_path, wide_errors, command) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    args = _commands(tmp_path, a_file)[command]
    r = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for --out: {a_file}: exists and is not a folder" in r.output
    assert "Hardware:" not in r.output  # bench: nothing was measured first
    assert a_file.read_text() == "x"


def test_bench_out_that_is_a_folder_is_refused(tmp_path, wide_errors) -> None:
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 2 and f"Invalid value for --out: {tmp_path}: is a folder, a file name is needed" in r.output


@pytest.mark.parametrize("command", ["evaluate diaretdb1", "evaluate game-study", "evaluate faithfulness",
                                     "evaluate defense", "explain", "bench"])
def test_a_bogus_device_is_one_usage_error(tmp_path, wide_errors, command) -> None:
    args = _commands(tmp_path, tmp_path / "o")[command]
    r = CliRunner().invoke(app, [*args, "--device", "bogus"])
    assert r.exit_code == 2, r.output
    assert "Invalid value for --device: 'bogus' is not a device (use auto, cpu, cuda or cuda:N)" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, option", [(["--batch", "0"], "--batch"), (["--batch", "4", "--batch", "-1"], "--batch"),
                                          (["--repeats", "0"], "--repeats")])
def test_bench_counts_below_one_are_refused(wide_errors, args, option) -> None:
    """--batch 0 divided by zero after the whole benchmark, -1 was a RuntimeError, --repeats 0 a
    StatisticsError."""
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output and "Hardware:" not in r.output


def test_bench_weights_that_are_not_a_checkpoint_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--batch", "1", "--repeats", "1", "--weights", str(bad)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}"), r.output


def test_explain_iteration_cap_below_one_is_refused(tmp_path, wide_errors) -> None:
    r = CliRunner().invoke(app, ["explain", str(SAMPLE), "--out", str(tmp_path / "o"), "--iterations", "0"])
    assert r.exit_code == 2 and "Invalid value for '--iterations'" in r.output


@pytest.fixture()
def write_protected(tmp_path, monkeypatch):
    """A folder in which no file can be created. Root ignores permission bits, so the creation
    test is made to fail there the way a read-only mount or an immutable folder fails it."""
    import tempfile

    folder = tmp_path / "protected"
    folder.mkdir()
    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    return folder


@pytest.mark.parametrize("command", ["evaluate diaretdb1", "evaluate game-study", "evaluate faithfulness",
                                     "evaluate defense", "explain", "bench"])
def test_a_write_protected_out_is_refused_before_any_work(tmp_path, wide_errors, write_protected, command) -> None:
    """Before: the whole benchmark or evaluation ran, then writing its results failed, naming a
    hidden temporary file."""
    args = _commands(tmp_path, write_protected / "results")[command]
    r = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for --out: {write_protected}: not writable (Permission denied)" in r.output
    assert "Hardware:" not in r.output  # bench: nothing was measured first
    assert not (write_protected / "results").exists()


def test_a_truly_read_only_folder_is_refused(tmp_path) -> None:
    """The same check on the real file system (permission bits; root bypasses them: skipped)."""
    import os

    import typer

    from retina_fgvis.commands.checks import output_file, output_folder

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        with pytest.raises(typer.BadParameter, match="not writable"):
            output_folder(folder / "out")
        with pytest.raises(typer.BadParameter, match="not writable"):
            output_file(folder / "bench.md")
    finally:
        folder.chmod(0o755)
    output_folder(folder / "out")  # writable again: accepted


def test_a_log_appended_in_place_and_a_read_only_cache_are_not_refused(write_protected) -> None:
    """The write probe is for files made anew in a folder. An existing log is appended to in place
    and a complete image cache is only read, so a protected folder holding them is fine (the
    review found both refused)."""
    import typer

    from retina_fgvis.commands.checks import output_file, output_folder

    log = write_protected / "train.log"
    log.write_text("earlier\n")
    assert output_file(log, "--log-file", appended=True) == log
    with pytest.raises(typer.BadParameter, match="not writable"):
        output_file(log, "--out")  # replaced atomically: a new file in the folder
    with pytest.raises(typer.BadParameter, match="not writable"):
        output_file(write_protected / "new.log", "--log-file", appended=True)  # made anew
    assert output_folder(write_protected / "cache", "--cache-dir", writable=False) == write_protected / "cache"
