"""`retina-fgvis evaluate defense` keeps each finished game on disk and continues from it.

Why: a README run took 31 minutes and wrote nothing until the end, so Ctrl-C lost every
finished image; and a re-run with fewer --examples left the earlier run's figures behind.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.test_faithfulness_cli import HAS_ENGINE, _evaluate, make_tiny_setup

pytestmark = pytest.mark.skipif(not HAS_ENGINE, reason="FGVis engine (retina_fgvis.fgvis.games) not available")

TINY = ("--max-iterations", "2", "--batch-size", "1", "--device", "cpu")


@pytest.fixture()
def tiny_setup(tmp_path, monkeypatch):
    return make_tiny_setup(tmp_path, monkeypatch)


@pytest.fixture()
def games(monkeypatch):
    """Counts the generation games played (one call per batch and game); ``stop_at`` = n raises
    KeyboardInterrupt (Ctrl-C) at the n-th call."""
    from retina_fgvis.fgvis.games import FGVis

    state = {"calls": 0, "stop_at": None}
    play = FGVis.attribute

    def counted(self, *args, **kwargs):
        state["calls"] += 1
        if state["stop_at"] == state["calls"]:
            raise KeyboardInterrupt
        return play(self, *args, **kwargs)

    monkeypatch.setattr(FGVis, "attribute", counted)
    return state


def _defense(app, folder, out, games, *options: str):
    games["calls"] = 0
    return _evaluate(app, "defense", folder, out, *TINY, *options)


def _records(out) -> list:
    return sorted((out / "progress").glob("defense-*/record-*.json"))


def _results(out) -> pd.DataFrame:
    """The per-image table without its timings (the only columns a resumed run may change)."""
    df = pd.read_csv(out / "defense_per_image.csv")
    return df[[c for c in df.columns if not c.endswith("_seconds")]]


def test_an_interrupted_run_keeps_each_finished_game_and_the_same_command_continues(tiny_setup, games):
    app, folder, out = tiny_setup
    games["stop_at"] = 4  # Ctrl-C in the defended game of the second image
    res = _defense(app, folder, out, games, "--examples", "0")
    assert res.exit_code != 0 and not (out / "defense_per_image.csv").exists()
    records = [json.loads(f.read_text()) for f in _records(out)]  # every one complete
    assert sorted((r["image"], r["game"]) for r in records) == [
        ("im0.png", "defended"), ("im0.png", "undefended"), ("im1.png", "undefended")]
    assert not any("im0" in str(f) or "im1" in str(f) for f in _records(out))  # no file names in paths
    assert not list(out.rglob("*.tmp"))
    games["stop_at"] = None
    res = _defense(app, folder, out, games, "--examples", "0")
    assert res.exit_code == 0, res.output
    assert games["calls"] == 1  # only the game that was cut off
    assert "resuming: 3 (image, game) results of earlier runs reused; 1 of 2 images" in res.output
    assert "3 (image, game) results taken from earlier runs" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["results_from_earlier_runs"] == 3
    straight = out.parent / "straight"
    assert _defense(app, folder, straight, games, "--examples", "0").exit_code == 0
    pd.testing.assert_frame_equal(_results(out), _results(straight))


def test_records_are_reused_only_for_the_same_settings_and_the_same_image(tiny_setup, games):
    app, folder, out = tiny_setup
    assert _defense(app, folder, out, games, "--examples", "0").exit_code == 0 and games["calls"] == 4
    res = _defense(app, folder, out, games, "--examples", "0", "--fgvis-setting", "lr=0.2")
    assert res.exit_code == 0 and "resuming" not in res.output and games["calls"] == 4
    assert len(list((out / "progress").glob("defense-*"))) == 2  # both settings kept
    rng = np.random.default_rng(7)  # same name, another picture
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "im1.png")
    res = _defense(app, folder, out, games, "--examples", "0")
    assert res.exit_code == 0, res.output
    assert "resuming: 2 (image, game)" in res.output and games["calls"] == 2  # im1's two games
    default = next(f.parent for f in (out / "progress").glob("defense-*/identity.json")
                   if json.loads(f.read_text())["settings"]["lr"] != 0.2)
    sorted(default.glob("record-*.json"))[0].write_text("{not json")
    res = _defense(app, folder, out, games, "--examples", "0")
    assert res.exit_code == 0 and "unreadable record ignored" in res.output and games["calls"] == 1
    res = _defense(app, folder, out, games, "--examples", "0", "--restart")
    assert res.exit_code == 0 and "resuming" not in res.output and games["calls"] == 4
    assert len(list((out / "progress").glob("defense-*"))) == 1
    assert len(pd.read_csv(out / "defense_per_image.csv")) == 2


def test_examples_hold_exactly_the_current_runs_figures(tiny_setup, games):
    app, folder, out = tiny_setup
    assert _defense(app, folder, out, games, "--examples", "2").exit_code == 0
    examples = out / "examples"
    assert sorted(f.name for f in examples.iterdir()) == ["example-01.png", "example-02.png"]
    (examples / "notes.txt").write_text("mine")
    res = _defense(app, folder, out, games, "--examples", "1")
    assert res.exit_code == 0, res.output
    assert sorted(f.name for f in examples.iterdir()) == ["example-01.png", "notes.txt"]
    assert games["calls"] == 0  # every game and the kept figure reused
    first = (examples / "example-01.png").read_bytes()
    res = _defense(app, folder, out, games, "--examples", "2")
    assert res.exit_code == 0, res.output
    assert games["calls"] == 0  # the second figure was kept beside its records too
    assert (examples / "example-01.png").read_bytes() == first
    assert (examples / "example-02.png").stat().st_size > 1000
    res = _defense(app, folder, out, games, "--examples", "0")
    assert res.exit_code == 0 and sorted(f.name for f in examples.iterdir()) == ["notes.txt"]


def test_a_figure_missing_for_a_resumed_image_is_drawn_by_playing_its_games_again(tiny_setup, games):
    """The figures need the games' arrays, which the records do not hold: an image first run
    without a figure is played again when a later run wants one."""
    app, folder, out = tiny_setup
    assert _defense(app, folder, out, games, "--examples", "0").exit_code == 0
    res = _defense(app, folder, out, games, "--examples", "1")
    assert res.exit_code == 0, res.output
    assert games["calls"] == 2 and "resuming: 2 (image, game)" in res.output  # im0 again, im1 reused
    assert (out / "examples" / "example-01.png").stat().st_size > 1000
