"""Outputs that carry user text safely: CSV cells that would start a spreadsheet formula,
the referral threshold and p(referable) in report.html, file names on the console (rich markup)."""
from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retina_fgvis import screening as S
from retina_fgvis.report import html as H
from retina_fgvis.report import tables as T

sys.path.insert(0, str(Path(__file__).parent))
from _screening_fakes import FakeClassifier, FakeExplainer, make_folder

EVIL = ['=HYPERLINK("x","click"),a_right.png', "+SUM(1+1).png", "-2+3.png", "@cmd.png",
        "\tTab.png", "\rCr.png", "'=already.png", "''+twice.png"]
PLAIN = ["P01_left.png", "it's.png", "'quoted.png", "-", "a=b.png"]


def _records():
    recs = []
    for k, name in enumerate(EVIL + PLAIN):
        ok = k % 2 == 0
        recs.append(S.ImageRecord(
            file=name, patient=f"=cmd|'/C calc'!A{k}" if k == 0 else f"p{k}", eye="left",
            grouping="name", status="ok" if ok else "error",
            error="" if ok else f"-bad {name}", p_referable=0.25 if ok else None,
            referable=False if ok else None, flagged_area_pct=0.0 if ok else None,
            overlay=f"patients/p{k}/x.png" if ok else None,
            regions=[{"id": 1, "kind": "red", "area": 3, "bbox": [1, 2, 3, 4],
                      "centroid": [2.0, 3.0], "mean_importance": 0.5,
                      "mean_rgb": [1, 2, 3]}] if ok else []))
    return recs


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text.split("\n", 1)[1], newline="")))


@pytest.mark.parametrize("frame", [T.results_frame, T.lesions_frame])
def test_csv_cells_that_would_start_a_formula_are_quoted(frame):
    text = T.csv_text(frame(_records()))
    for row in _cells(text)[1:]:
        for cell in row:
            assert not cell[:1] in ("=", "+", "-", "@", "\t", "\r"), row
    files = {row[0] for row in _cells(text)[1:]}
    assert "'=HYPERLINK(\"x\",\"click\"),a_right.png" in files
    assert "'-2+3.png" in files and "''=already.png" in files
    assert "P01_left.png" in files  # plain names are left alone


def test_numbers_stay_numbers():
    df = pd.DataFrame({"name": ["-2+3", "-1.5", "x"], "value": [-2.5, -1.0, 3.0],
                       "text_num": ["-0.1250", "-inf", "1e-5"]})
    rows = _cells(T.csv_text(df))
    assert rows[1] == ["'-2+3", "-2.5", "-0.1250"]
    assert rows[2] == ["-1.5", "-1.0", "-inf"]
    assert rows[3] == ["x", "3.0", "1e-5"]


@pytest.mark.parametrize("frame", [T.results_frame, T.lesions_frame])
def test_csv_round_trip_is_exact(tmp_path, frame):
    df = frame(_records())
    T.write_csv(df, tmp_path / "t.csv")
    back = T.read_csv(tmp_path / "t.csv")
    for col in ("file", "patient", "eye", "kind", "overlay", "error", "status"):
        if col in df.columns:
            assert back[col].tolist() == df[col].tolist(), col
    if "p_referable" in df.columns:
        assert back.p_referable.dropna().tolist() == [0.25] * int(df.p_referable.ne("").sum())


def test_escape_and_unescape_are_inverse():
    for s in EVIL + PLAIN + ["", "'", "''", "'-"]:
        assert T.unescape_cell(T.escape_cell(s)) == s
    assert T.escape_cell(-3) == -3 and T.escape_cell(None) is None


# --- report.html: threshold and p(referable) -------------------------------------------------

def _num(pct: str) -> float:
    return float(pct.rstrip("%"))


@pytest.mark.parametrize("thr", [0.1463, 0.5, 0.15, 0.123456, 0.07])
def test_shown_p_compares_with_the_shown_threshold_as_the_raw_values_do(thr):
    shown_t = H.threshold_pct(thr)
    assert abs(_num(shown_t) - 100 * thr) < 1e-9  # the threshold is shown exactly
    for delta in (-0.01, -0.0002, -0.00005, -1e-6, 0.0, 1e-6, 0.00005, 0.0002, 0.01):
        p = round(thr + delta, 6)
        shown_p = H._pct(p, thr)
        assert (_num(shown_p) >= _num(shown_t)) == (p >= thr), (p, shown_p, shown_t)


def test_pct_keeps_one_decimal_away_from_the_threshold():
    assert H._pct(0.83219, 0.1463) == "83.2%"
    assert H._pct(None, 0.5) == "–"
    assert H._pct(0.148, 0.1463) == "14.8%"
    # 14.6 < 14.63 already says "below"; 0.1464 needs 2 decimals to say "above"
    assert H._pct(0.1462, 0.1463) == "14.6%" and H._pct(0.1464, 0.1463) == "14.64%"
    assert H._pct(0.146302, 0.146301) == "14.6302%" and H.threshold_pct(0.146301) == "14.6301%"


def test_report_states_the_exact_threshold(tmp_path):
    rec = S.ImageRecord(file="a.png", patient="p", eye="left", grouping="name", status="ok",
                        p_referable=0.148, referable=True, flagged_area_pct=0.0, explained=False)
    rec2 = S.ImageRecord(file="b.png", patient="q", eye="left", grouping="name", status="ok",
                         p_referable=0.1464, referable=True, flagged_area_pct=0.0, explained=False)
    page = H.render_report([rec, rec2], {"model": {"threshold": 0.1463}}, tmp_path)
    assert "p ≥ 0.15<" not in page and "15%" not in page
    assert "p ≥ 0.1463 (14.63%)" in page and "threshold 14.63%" in page
    assert "14.8%" in page and "14.64%" in page
    assert not re.search(r"\b14\.6%", page)


# --- console: file names and errors are not rich markup --------------------------------------

def test_console_prints_file_names_with_brackets_verbatim(tmp_path, capsys):
    from retina_fgvis.commands.screen import run_screen

    src = tmp_path / "in[x]"
    make_folder(src, 2)
    (src / "scan[b].png").write_bytes(b"not a png")
    (src / "Smith [right] eye.png").write_bytes(b"not a png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient,eye\nnone[bold].png,p,left\n")
    code = run_screen(inputs=[src], out=tmp_path / "out[b]", device="cpu", batch_size=2,
                      manifest=manifest, classifier=FakeClassifier(),
                      screener_kwargs={"explainer": FakeExplainer()})
    assert code == 1
    logged = capsys.readouterr().err
    assert "failed scan[b].png" in logged
    assert "failed Smith [right] eye.png" in logged
    assert "none[bold].png" in logged
    assert "out[b]" in logged

    code = run_screen(inputs=[tmp_path / "nothing[here]"], out=tmp_path / "o2", device="cpu",
                      classifier=FakeClassifier())
    assert code == 2
    assert "nothing[here]" in capsys.readouterr().err


def test_shown_p_never_contradicts_the_shown_threshold_fuzz():
    """Thresholds finer than 4 decimals of a percent (the shipped one is 0.14627485) are shown
    rounded up, so a p just below one can never be shown at or above it."""
    rng = np.random.default_rng(0)
    for _ in range(20000):
        thr = float(rng.uniform(0.01, 0.99))
        p = round(thr + float(rng.choice([-1, 1])) * float(rng.uniform(0, 2e-4)), 6)
        assert (_num(H._pct(p, thr)) >= _num(H.threshold_pct(thr))) == (p >= thr), (p, thr)
    assert H.threshold_pct(0.1462748497724533) == "14.6275%"
    assert H._threshold_text(0.1462748497724533) == "0.146275 (14.6275%)"


def _rec(file, patient, eye, *, status="ok", p=None, referable=None, explained=True, n_regions=0,
         after=None, goal=True):
    return S.ImageRecord(file=file, patient=patient, eye=eye, grouping="name", status=status,
                         p_referable=p, referable=referable, n_regions=n_regions, flagged_area_pct=0.0,
                         explained=explained, target_prob_after=after, goal_reached=goal,
                         error="" if status == "ok" else "cannot decode image")


def test_a_patient_with_a_failed_eye_is_never_cleared(tmp_path):
    """One eye failed, the other below the threshold: the patient was badged "not referable" and
    sorted among the cleared ones; half of them was never looked at."""
    recs = [
        _rec("A_left.png", "A", "left", p=0.02, referable=False, explained=False),
        _rec("A_right.png", "A", "right", status="error"),
        _rec("B_left.png", "B", "left", p=0.05, referable=False, explained=False),
        _rec("B_right.png", "B", "right", p=0.03, referable=False, explained=False),
        _rec("C_left.png", "C", "left", p=0.60, referable=True, n_regions=0, after=0.40),
    ]
    assert H.patient_status(recs[:2]) == "incomplete" and H.patient_status(recs[2:4]) is False
    assert [pid for pid, _ in H.patient_groups(recs)] == ["C", "A", "B"]
    page = H.render_report(recs, {"model": {"threshold": 0.1463}}, tmp_path)
    index = page.split("Patients by risk")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", index)[1:]
    assert "incomplete: grade manually" in rows[1] and ">A<" in rows[1]
    assert "not referable" in rows[2] and rows[2].endswith("<td class=num>–</td>")  # not explained
    assert "L 60.0% referable" in rows[0]
    # the referable eye whose evidence formed no region says so instead of looking clean
    assert "not a sign of a healthy eye" in page.split("Patient C")[1].split("</section>")[0]
    assert "p(referable) with the evidence removed 40.0%" in page
    assert re.search(r"<b[^>]*>1</b><span>patients to grade manually", page)


def test_results_csv_tells_not_explained_from_no_regions():
    from retina_fgvis.report.tables import results_frame

    recs = [_rec("a.png", "A", "left", p=0.02, referable=False, explained=False),
            _rec("b.png", "B", "left", p=0.60, referable=True, n_regions=0, after=0.40),
            _rec("c.png", "C", "left", status="error")]
    df = results_frame(recs).set_index("file")
    assert df.loc["a.png", ["n_regions", "explained", "p_referable_after"]].tolist() == [0, "no", ""]
    assert df.loc["b.png", ["n_regions", "explained", "p_referable_after"]].tolist() == [0, "yes", "0.4000"]
    assert df.loc["c.png", ["explained", "p_referable_after"]].tolist() == ["", ""]
