"""Input handling of `train`, `predict`, `evaluate classifier`: every bad option, data folder,
image or weights file ends in one line naming the problem (exit 2), never a traceback, and
nothing is overwritten or half-written. Tiny synthetic data, ``--arch tiny``, 64 px."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from retina_fgvis.classifier.data import build_cache, load_labels
from retina_fgvis.classifier.model import WeightsError, load_classifier
from retina_fgvis.classifier.train import TrainConfig, train
from retina_fgvis.cli import app
from retina_fgvis.fundus.io import FundusReadError
from tests._fundus_synth import synthetic_fundus

torch.set_num_threads(1)

TINY = ["--arch", "tiny", "--stages", "64:1:3e-3", "--threads", "1"]


def _flat(text: str) -> str:
    """CLI output on one line: typer draws usage errors in a wrapped box."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]+", " ", text)).strip()


def _invoke(args: list[str]):
    r = CliRunner().invoke(app, args)
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def _source(root: Path, name: str, n_patients: int = 4, seed: int = 0, nested: bool = True,
            absolute: bool = False) -> Path:
    """A data folder whose labels.csv lists nested (``imgs/<pid>/x.png``) or absolute paths: the
    layouts the old metadata code guessed the folder from wrongly."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = []
    for pid in range(n_patients):
        for eye in ("left", "right"):
            rdr = (pid + (eye == "left")) % 2
            img = synthetic_fundus(72, 72, r=32, lesions=12 if rdr else 0, seed=seed * 100 + 2 * pid + rdr)
            rel = Path("imgs") / str(pid) / f"{eye}.png" if nested else Path(f"{pid}_{eye}.png")
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / rel)
            rows.append({"file": str(folder / rel) if absolute else str(rel), "rdr": rdr, "patient": pid})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


def _add_junk(folder: Path, name: str = "junk.png", patient: str = "99", rdr: int = 1) -> Path:
    junk = folder / name
    junk.write_bytes(b"this is not an image")
    with open(folder / "labels.csv", "a") as fh:
        fh.write(f"{name},{rdr},{patient}\n")
    return junk


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, data folder): one tiny model trained on a nested-layout folder."""
    root = tmp_path_factory.mktemp("trained")
    data = _source(root, "srcN", n_patients=4, nested=True)
    out = root / "w" / "tiny.pt"
    train(TrainConfig(data=[str(data)], out=str(out), val_fractions=[0.5], arch="tiny",
                      stages="64:1:3e-3", batch_size=8, threads=1, log_every=0,
                      checkpoint_dir=str(root / "ck")), log=lambda _m: None)
    return out, data


# --------------------------------------------------------------------------- 1. unreadable images


def test_train_unreadable_image_is_one_line_and_leaves_no_cache(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcJ", n_patients=3)
    junk = _add_junk(data)
    ck = tmp_path / "ck"
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(tmp_path / "o.pt"),
                 "--checkpoint-dir", str(ck), *TINY])
    assert r.exit_code == 2
    assert f"error: {junk}: cannot decode image" in r.output
    assert not (tmp_path / "o.pt").exists()
    assert not [p for p in (ck / "cache").iterdir()]  # no half-built cache a later run could trust


def test_build_cache_raises_the_read_error_and_rebuilds_a_stale_cache(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcC", n_patients=1)
    good = load_labels(data)["path"].tolist()
    with pytest.raises(FundusReadError, match="missing.png: file not found"):
        build_cache(good + [str(data / "missing.png")], 32, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())
    cache = build_cache(good, 32, tmp_path / "cache")
    assert cache.images.shape == (2, 32, 32, 3) and cache.images.any()
    # a cache whose image file was cut short (disk full, copied half) is rebuilt, not trusted
    img_f = next((tmp_path / "cache").glob("*.img.u8"))
    img_f.write_bytes(img_f.read_bytes()[:100])
    again = build_cache(good, 32, tmp_path / "cache")
    assert np.array_equal(np.asarray(again.images), np.asarray(cache.images))


# --------------------------------------------------------------------------- 2. labels.csv


@pytest.mark.parametrize("text, message", [
    ("", "labels.csv: empty file"),
    ("file,rdr\na.png,1\n", "labels.csv: missing column 'patient'"),
    ("file,rdr,patient\n", "labels.csv: no images listed"),
    ("file,rdr,patient\na.png,1,1\nb.png,yes,2\n", "labels.csv: column 'rdr' must be 0 or 1 (line 3: 'yes'"),
    ("file,rdr,patient\na.png,2,1\n", "labels.csv: column 'rdr' must be 0 or 1 (line 2: '2'"),
    ("file,rdr,patient\na.png,,1\n", "labels.csv: column 'rdr' must be 0 or 1 (line 2: empty"),
    ("file,rdr,patient\na.png,1,\n", "labels.csv: column 'patient' is empty (line 2"),
])
def test_bad_labels_csv_names_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "labels.csv").write_text(text)
    with pytest.raises(ValueError) as e:
        load_labels(folder)
    assert str(e.value).startswith(f"{folder / 'labels.csv'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    r = _invoke(["train", "--data", str(folder), "--out", str(tmp_path / "o.pt"), *TINY])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == f"error: {e.value}"


# --------------------------------------------------------------------------- 3. numeric options


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--val-fraction", "0"], "Invalid value for --val-fraction: 0 is not between 0 and 1"),
    (["--val-fraction", "1.5"], "Invalid value for --val-fraction: 1.5 is not between 0 and 1"),
    (["--val-fraction", "-0.2"], "Invalid value for --val-fraction: -0.2 is not between 0 and 1"),
    (["--val-fraction", "0.2", "--val-fraction", "0.3"], "Invalid value for --val-fraction: 2 values for 1 --data"),
    (["--max-images", "0"], "Invalid value for '--max-images'"),
    (["--max-images", "-1"], "Invalid value for '--max-images'"),
    (["--min-sensitivity", "2"], "Invalid value for '--min-sensitivity'"),
    (["--threads", "0"], "Invalid value for '--threads'"),
])
def test_train_refuses_bad_numbers_naming_the_option(tmp_path: Path, args: list[str], message: str) -> None:
    r = _invoke(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o.pt"), "--arch", "tiny", *args])
    assert r.exit_code == 2 and message in _flat(r.output)
    assert not (tmp_path / "o.pt").exists() and not Path("runs/o").exists()


def test_train_refuses_a_split_without_validation_images(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcV", n_patients=3)
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.01", "--out", str(tmp_path / "o.pt"),
                 "--checkpoint-dir", str(tmp_path / "ck"), *TINY])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == ("error: srcV: no validation images (--val-fraction 0.01 "
                                                 "of 3 patient(s) holds out none); raise --val-fraction or add data")
    assert not (tmp_path / "ck").exists()


# --------------------------------------------------------------------------- 4. overwrite


def test_train_never_overwrites_out_without_overwrite_but_resumes(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcO", n_patients=3)
    out, ck = tmp_path / "o.pt", tmp_path / "ck"
    base = ["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(out), "--checkpoint-dir", str(ck), *TINY]
    assert _invoke(base).exit_code == 0
    before = out.read_bytes()
    r = _invoke(base)
    assert r.exit_code == 2
    assert f"Invalid value for --out: {out}: exists; pass --overwrite to replace it" in _flat(r.output)
    assert out.read_bytes() == before
    r = _invoke(base + ["--overwrite"])
    assert r.exit_code == 0 and "resumed" in r.output
    # an interrupted run (final file not written yet) resumes without the flag
    out.unlink()
    r = _invoke(base)
    assert r.exit_code == 0 and "resumed" in r.output and out.exists()


# --------------------------------------------------------------------------- 5. metadata folder


@pytest.mark.parametrize("absolute", [False, True])
def test_metadata_records_the_data_folder_as_given(tmp_path: Path, absolute: bool) -> None:
    data = _source(tmp_path, "srcM", n_patients=3, nested=True, absolute=absolute)
    out = tmp_path / "m.pt"
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(out),
                 "--checkpoint-dir", str(tmp_path / "ck"), *TINY])
    assert r.exit_code == 0, r.output
    rec = load_classifier(out).metadata["training_data"]
    assert [s["folder"] for s in rec] == [str(data)]
    r = _invoke(["evaluate", "classifier", "--weights", str(out), "--n-boot", "5"])
    assert r.exit_code == 0, r.output
    assert "| srcM |" in r.output


# --------------------------------------------------------------------------- 6. evaluate: bad images / data


def test_evaluate_scores_around_an_unreadable_image(tmp_path: Path, trained) -> None:
    weights, _ = trained
    ext = _source(tmp_path, "extE", n_patients=2, seed=7)
    junk = _add_junk(ext)
    out = tmp_path / "ev"
    r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--data", str(ext), "--external",
                 "--n-boot", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"warning: {junk}: cannot decode image" in r.output
    pred = pd.read_csv(out / "predictions.csv")
    row = pred[pred["file"] == "junk.png"].iloc[0]
    assert np.isnan(row["p_referable"]) and row["error"].startswith(f"{junk}: cannot decode image")
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_unreadable"] == 1 and m["sources"]["extE"]["n"] == 4
    assert "1 image(s) could not be read" in (out / "metrics.md").read_text()
    ok = pred[pred["error"].isna()]
    mean_table = (out / "metrics.md").read_text().split("Mean p(referable) by graded class")[1]
    expected = [f"{ok.loc[ok.rdr == k, 'p_referable'].mean():.3f}" if (ok.rdr == k).any() else "–" for k in (0, 1)]
    assert f"| extE | {expected[0]} | {expected[1]} |" in mean_table


@pytest.mark.parametrize("labels, message", [
    (None, "labels.csv: labels.csv not found"),
    ("file,rdr\na.png,1\n", "labels.csv: missing column 'patient'"),
    ("file,rdr,patient\na.png,yes,1\n", "labels.csv: column 'rdr' must be 0 or 1 (line 2: 'yes'"),
])
def test_evaluate_bad_data_folder_is_one_line(tmp_path: Path, trained, labels: str | None, message: str) -> None:
    weights, _ = trained
    folder = tmp_path / "extB"
    if labels is not None:
        folder.mkdir()
        (folder / "labels.csv").write_text(labels)
    r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--data", str(folder), "--external"])
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder / 'labels.csv'}: ") and message in last


# --------------------------------------------------------------------------- 7. n-boot, notice


def test_evaluate_requires_a_bootstrap_and_writes_the_notice(tmp_path: Path, trained) -> None:
    weights, _ = trained
    for n in ("0", "-5"):
        r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--n-boot", n])
        assert r.exit_code == 2 and "Invalid value for '--n-boot'" in _flat(r.output)
    r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--n-boot", "5", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["notice"] == "Research use only, not a diagnosis."


# --------------------------------------------------------------------------- 8. device, outputs


def test_bogus_device_is_refused_by_every_classifier_command(tmp_path: Path, trained) -> None:
    weights, data = trained
    img = str(next(data.rglob("*.png")))
    for args in (["train", "--data", str(data), "--out", str(tmp_path / "o.pt"), *TINY],
                 ["predict", img, "--weights", str(weights)],
                 ["evaluate", "classifier", "--weights", str(weights)]):
        r = _invoke(args + ["--device", "bogus"])
        assert r.exit_code == 2
        assert "Invalid value for --device: 'bogus' is not a device" in _flat(r.output)
    assert not (tmp_path / "o.pt").exists()


def test_outputs_in_the_way_are_refused_before_any_work(tmp_path: Path, trained) -> None:
    weights, data = trained
    afile = tmp_path / "afile"
    afile.write_text("x")
    ckdir = tmp_path / "ckdir"  # its default cache folder is taken by a file
    ckdir.mkdir()
    (ckdir / "cache").write_text("x")
    train = ["train", "--data", str(data), *TINY]
    cases = [
        (train + ["--out", str(tmp_path / "o.pt"), "--checkpoint-dir", str(ckdir)],
         f"Invalid value for --cache-dir: {ckdir / 'cache'}: exists and is not a folder"),
        (train + ["--out", str(afile / "o.pt")], f"Invalid value for --out: {afile}: exists and is not a folder"),
        (train + ["--out", str(tmp_path)], f"Invalid value for --out: {tmp_path}: is a folder"),
        (train + ["--out", str(tmp_path / "o.pt"), "--checkpoint-dir", str(afile)],
         f"Invalid value for --checkpoint-dir: {afile}: exists and is not a folder"),
        (["evaluate", "classifier", "--weights", str(weights), "--out", str(afile)],
         f"Invalid value for --out: {afile}: exists and is not a folder"),
        (["evaluate", "classifier", "--weights", str(weights), "--out", str(afile / "sub")],
         f"Invalid value for --out: {afile}: exists and is not a folder"),
    ]
    for args, message in cases:
        r = _invoke(args)
        assert r.exit_code == 2 and message in _flat(r.output), r.output
        assert "| pooled |" not in r.output and not re.search(r"cache: \d+ images", r.output)  # refused before any work
    assert afile.read_text() == "x" and not (tmp_path / "o.pt").exists()


# --------------------------------------------------------------------------- 9. weights error text


def test_a_non_checkpoint_file_gets_a_short_readable_reason(tmp_path: Path) -> None:
    text = tmp_path / "bad.pt"
    text.write_text("notackpt\n")
    with pytest.raises(WeightsError) as e:
        load_classifier(text)
    # before: "(torch.load could not read it: Unsupported operand 110)", the pickle opcode of 'n'
    assert str(e.value) == f"{text}: not a retina-fgvis checkpoint (not a file written by torch.save)"
    cut = tmp_path / "cut.pt"  # a torch.save archive cut short: torch.load's own reason
    torch.save({"state_dict": {}}, cut)
    cut.write_bytes(cut.read_bytes()[:64])
    with pytest.raises(WeightsError, match=r"cut.pt: not a retina-fgvis checkpoint \(torch.load could not read it: "):
        load_classifier(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty.pt: not a retina-fgvis checkpoint \(empty file\)$"):
        load_classifier(empty)
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        load_classifier(tmp_path)
    r = _invoke(["predict", str(text), "--weights", str(text)])
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {text}: not a retina-fgvis checkpoint") and "PyTorch 2.6" not in last


# --------------------------------------------------------------------------- 10. split integrity


def test_evaluate_refuses_regraded_held_out_labels(tmp_path: Path, trained) -> None:
    """The split fingerprint covers the held-out file names only: a regraded labels.csv kept it,
    and the held-out metrics silently scored other labels. The label fingerprint catches it."""
    import shutil

    from retina_fgvis.classifier.data import build_split, label_fingerprint

    weights, data = trained
    meta = torch.load(weights, weights_only=True)["metadata"]
    copy = tmp_path / "relabelled" / data.name
    shutil.copytree(data, copy)
    split = build_split([copy], [0.5], seed=meta["split_seed"])
    assert label_fingerprint(split) == meta["split_label_fingerprint"]
    labels = pd.read_csv(copy / "labels.csv")
    first_val = split.loc[split["val"], "file"].iloc[0]
    labels.loc[labels["file"] == first_val, "rdr"] ^= 1
    labels.to_csv(copy / "labels.csv", index=False)
    r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--data", str(copy)])
    assert r.exit_code == 2, r.output
    assert "error: the held-out labels differ from those the classifier was validated on" in r.output
    ok = _invoke(["evaluate", "classifier", "--weights", str(weights), "--data", str(data), "--n-boot", "5"])
    assert ok.exit_code == 0, ok.output


def test_init_from_a_checkpoint_of_another_split_is_refused(tmp_path: Path, trained) -> None:
    """Fine-tuning a model trained on another split puts its training images into this run's
    validation set: refused unless asked for."""
    weights, data = trained
    base = ["train", "--data", str(data), "--val-fraction", "0.5", "--init-from", str(weights), *TINY,
            "--checkpoint-dir", str(tmp_path / "ck")]
    r = _invoke(base + ["--seed", "1", "--out", str(tmp_path / "o1.pt")])
    assert r.exit_code != 0 and "trained on another split" in _flat(r.output + str(r.exception or ""))
    assert not (tmp_path / "o1.pt").exists()
    assert not (tmp_path / "ck").exists()  # refused before the cache (hours on real data) was built
    r = _invoke(base + ["--seed", "1", "--out", str(tmp_path / "o2.pt"), "--allow-other-split",
                        "--checkpoint-dir", str(tmp_path / "ck2")])
    assert r.exit_code == 0, r.output
    r = _invoke(base + ["--out", str(tmp_path / "o3.pt"), "--checkpoint-dir", str(tmp_path / "ck3")])
    assert r.exit_code == 0, r.output  # same split: accepted


# --------------------------------------------------------------------------- 11. found by the session-17 audit


def test_an_unknown_architecture_is_refused_before_the_cache_is_built(tmp_path: Path) -> None:
    """Before: the whole image cache (hours on a full data set) was built first."""
    data = _source(tmp_path, "srcA", n_patients=2)
    ck = tmp_path / "ck"
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(tmp_path / "o.pt"),
                 "--checkpoint-dir", str(ck), "--arch", "bogusnet", "--stages", "64:1:3e-3", "--threads", "1"])
    assert r.exit_code == 2 and "unknown architecture 'bogusnet'" in r.output
    assert "cache:" not in r.output
    assert not (ck / "cache").exists() or not any((ck / "cache").iterdir())


def test_stages_that_are_not_numbers_are_one_line_naming_the_stage(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcS", n_patients=2)
    r = _invoke(["train", "--data", str(data), "--out", str(tmp_path / "o.pt"), "--arch", "tiny",
                 "--stages", "abc:1:1e-3"])
    assert r.exit_code == 2, r.output
    assert "stage 'abc:1:1e-3' is not size:epochs:lr" in _flat(r.output)
    assert "invalid literal" not in r.output


def test_a_damaged_resume_checkpoint_is_named(tmp_path: Path) -> None:
    data = _source(tmp_path, "srcR", n_patients=2)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "resume.ckpt").write_text("garbage\n")
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(tmp_path / "o.pt"),
                 "--checkpoint-dir", str(ck), *TINY])
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {ck / 'resume.ckpt'}: not a readable resume checkpoint (")
    assert last.endswith("delete it to start this training anew")
    assert not (tmp_path / "o.pt").exists()


def test_a_missing_init_from_gets_no_hint_about_the_default_weights(tmp_path: Path, monkeypatch) -> None:
    data = _source(tmp_path, "srcI", n_patients=2)
    r = _invoke(["train", "--data", str(data), "--val-fraction", "0.5", "--out", str(tmp_path / "o.pt"),
                 "--init-from", str(tmp_path / "nope.pt"), *TINY])
    assert r.exit_code == 2
    assert f"{tmp_path / 'nope.pt'}: weights file not found" in r.output and "RETINA_FGVIS_WEIGHTS" not in r.output
    monkeypatch.setenv("RETINA_FGVIS_WEIGHTS", str(tmp_path / "missing-default.pt"))
    with pytest.raises(WeightsError, match="set RETINA_FGVIS_WEIGHTS"):  # the default's hint stays
        load_classifier()


def test_a_file_given_as_data_folder_is_called_not_a_folder(tmp_path: Path) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    r = _invoke(["train", "--data", str(afile), "--out", str(tmp_path / "o.pt"), *TINY])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == f"error: {afile}: not a folder (a data folder holds labels.csv and the images)"


def test_evaluate_names_each_image_without_a_field_of_view(tmp_path: Path, trained) -> None:
    """Before: only a count ("2 image(s) without a detectable FOV were skipped"), and error cells
    without the file."""
    weights, _ = trained
    ext = _source(tmp_path, "extF", n_patients=2, seed=3)
    black = ext / "black.png"
    Image.fromarray(np.zeros((72, 72, 3), np.uint8)).save(black)
    with open(ext / "labels.csv", "a") as fh:
        fh.write("black.png,0,98\n")
    out = tmp_path / "ev"
    r = _invoke(["evaluate", "classifier", "--weights", str(weights), "--data", str(ext), "--external",
                 "--n-boot", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {black}: ") and warnings[0].endswith("(skipped)")
    pred = pd.read_csv(out / "predictions.csv")
    assert pred.loc[pred["file"] == "black.png", "error"].iloc[0].startswith(f"{black}: ")
