"""Screening outputs: report.html (links that exist, risk order, escaping, notice), the CSVs
(notice line, columns) and run.json. Fake classifier/explainer keep it to seconds."""
from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from retina_fgvis import screening as S
from retina_fgvis.commands.screen import run_screen
from retina_fgvis.report.tables import LESIONS_COLUMNS, NOTICE_LINE, RESULTS_COLUMNS

sys.path.insert(0, str(Path(__file__).parent))
from _screening_fakes import FakeClassifier, FakeExplainer, fundus_rgb, make_folder, write_png  # noqa: E402


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: list[str] = []
        self.patients: list[str] = []
        self._in_index_link = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    src = root / "in"
    make_folder(src, 5)
    (src / "broken.png").write_bytes(b"not a png")
    write_png(src / "evil.png", fundus_rgb(9))
    manifest = root / "m.csv"
    manifest.write_text('file,patient,eye\nevil.png,"<script>alert(1)</script>",left\n')
    out = root / "out"
    code = run_screen(inputs=[src], out=out, device="cpu", batch_size=2, manifest=manifest,
                      classifier=FakeClassifier(), screener_kwargs={"explainer": FakeExplainer()})
    assert code == 1  # broken.png
    return out


def test_report_links_exist_and_cover_every_overlay(screened):
    html = (screened / "report.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(html)
    files = [link for link in parser.links if not link.startswith(("#", "data:", "http"))]
    assert files, "no overlay linked"
    for link in files:
        assert not link.startswith("/") and ".." not in link
        assert (screened / link).is_file(), link
    anchors = [link[1:] for link in parser.links if link.startswith("#") and link != "#top"]
    assert anchors and all(a in parser.ids for a in anchors)
    df = S.read_results_csv(screened / "results.csv")
    ok = df[df.status == "ok"]
    overlays = {S.read_record(screened, f).overlay for f in ok.file}
    assert overlays <= set(files)
    assert "http://" not in html and "https://" not in html and "<script" not in html.replace("&lt;script", "")


def test_report_text(screened):
    html = (screened / "report.html").read_text(encoding="utf-8")
    assert html.count("Research use only, not a diagnosis") >= 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "broken.png" in html and "Images that could not be screened (1)" in html


def _contrast(fg: str, bg: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_badges_and_text_meet_wcag_aa_contrast():
    """Badge text is 12.5 px bold, not "large" text: WCAG AA asks 4.5:1. The green "not
    referable" badge was 4.4:1 and the amber warning 4.44:1."""
    from retina_fgvis.report.html import _CSS

    colours = dict(re.findall(r"--(\w+):(#[0-9a-f]{6})", _CSS))
    pairs = {name: (fg, bg) for name, bg, fg in re.findall(
        r"\.(b-\w+)\{background:(#[0-9a-f]{6});color:(var\(--\w+\)|#[0-9a-f]{6})\}", _CSS)}
    assert set(pairs) == {"b-ref", "b-no", "b-err", "b-warn"}
    for name, (fg, bg) in pairs.items():
        fg = colours[fg[6:-1]] if fg.startswith("var") else fg
        assert _contrast(fg, bg) >= 4.5, (name, fg, bg, round(_contrast(fg, bg), 2))
    for text in ("fg", "muted", "ref", "ok", "warn"):
        for background in ("#ffffff", colours["bg"]):
            assert _contrast(colours[text], background) >= 4.5, (text, background)


def test_region_tables_are_open_so_they_print(screened):
    html = (screened / "report.html").read_text(encoding="utf-8")
    assert html.count("<details") >= 1 and html.count("<details") == html.count("<details open>")


def test_overlay_images_carry_their_size(screened):
    """Lazy images without a size are 0 px tall until loaded: a long report jumps while it is
    read. Every <img> names the overlay file's own width and height."""
    from PIL import Image

    html = (screened / "report.html").read_text(encoding="utf-8")
    tags = re.findall(r'<img src="([^"]+)" width=(\d+) height=(\d+) loading="lazy"', html)
    assert tags and len(tags) == html.count("<img ")
    for src, width, height in tags:
        assert Image.open(screened / src).size == (int(width), int(height))


def test_embedding_is_refused_for_a_large_run_before_any_work(tmp_path, monkeypatch, capsys):
    from retina_fgvis.commands import screen as screen_command

    monkeypatch.setattr(screen_command, "MAX_EMBEDDED_IMAGES", 2)
    make_folder(tmp_path / "in", 3)  # 3 images
    code = run_screen(inputs=[tmp_path / "in"], out=tmp_path / "out", device="cpu", embed_images=True,
                      classifier=FakeClassifier(), screener_kwargs={"explainer": FakeExplainer()})
    assert code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "--embed-images" in err and "up to 2 images" in err


def test_patients_sorted_by_risk(screened):
    html = (screened / "report.html").read_text(encoding="utf-8")
    df = S.read_results_csv(screened / "results.csv")
    ok = df[df.status == "ok"]
    risk = ok.groupby("patient").p_referable.max().sort_values(ascending=False, kind="stable")
    index = html.split("Patients by risk", 1)[1].split("</table>", 1)[0]
    order = re.findall(r"<a href='#p-[0-9a-f]+'>(.*?)</a>", index)
    import html as html_mod

    order = [html_mod.unescape(o) for o in order]
    expected_ok = list(risk.index)
    assert order[: len(expected_ok)] == sorted(expected_ok, key=lambda p: (-risk[p], p))
    assert order[-1] == "broken"  # a patient whose only image failed comes last


def test_csvs_have_notice_and_columns(screened):
    for name, cols in (("results.csv", RESULTS_COLUMNS), ("lesions.csv", LESIONS_COLUMNS)):
        text = (screened / name).read_text(encoding="utf-8")
        assert text.splitlines()[0] == NOTICE_LINE
        assert "Research use only, not a diagnosis" in text.splitlines()[0]
        assert list(S.read_results_csv(screened / name).columns) == cols
    df = S.read_results_csv(screened / "results.csv")
    les = S.read_results_csv(screened / "lesions.csv")
    assert len(les) == int(df[df.status == "ok"].n_regions.sum())
    assert set(df.referable) <= {"yes", "no", ""}
    # "0 regions" below the threshold means "not looked for": the table says which it is
    ok = df[df.status == "ok"]
    for rec in (S.read_record(screened, f) for f in ok.file):
        row = ok[ok.file == rec.file].iloc[0]
        assert row.explained == ("no" if rec.explained is False else "yes")
        if rec.explained is False:
            assert row.p_referable_after != row.p_referable_after  # NaN: empty cell
        else:
            assert row.p_referable_after == pytest.approx(rec.target_prob_after, abs=5e-5)
    assert set(df[df.status != "ok"].explained) == {""}


def test_run_json(screened):
    info = json.loads((screened / "run.json").read_text())
    assert info["notice"] == "Research use only, not a diagnosis."
    assert info["model"]["sha256"] == "f" * 64
    assert {"torch", "numpy", "pydicom", "python"} <= set(info["versions"])
    assert info["settings"]["batch_size"] == 2
    assert info["counts"]["error"] == 1 and info["counts"]["images"] == 7
    assert info["timings"]["wall_seconds"] >= 0 and "per_stage_seconds_total" in info["timings"]


def test_embedded_report_is_one_file(tmp_path):
    make_folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert run_screen(inputs=[tmp_path / "in"], out=out, device="cpu", embed_images=True,
                      classifier=FakeClassifier(), screener_kwargs={"explainer": FakeExplainer()}) == 0
    html = (out / "report.html").read_text()
    assert "data:image/jpeg;base64," in html
    parser = _Links()
    parser.feed(html)
    assert all(link.startswith(("#", "data:")) for link in parser.links)


def test_lesions_csv_carries_the_contrast_behind_each_kind(screened):
    """`kind` is the sign of the region's green contrast; a region at -0.007 is "red" by a hair,
    so the number is a column beside the label."""
    from retina_fgvis.report.tables import read_csv

    table = read_csv(screened / "lesions.csv")
    assert len(table)
    for _, row in table.iterrows():
        region = next(g for g in S.read_record(screened, row["file"]).regions if int(g["id"]) == int(row["region"]))
        assert float(row["green_contrast"]) == pytest.approx(region["contrast"], abs=5e-5)
        assert row["kind"] == ("bright" if region["contrast"] > 0 else "red")


def test_the_last_console_line_counts_eyes_patients_failures_and_skipped_files():
    from types import SimpleNamespace as R

    from retina_fgvis.commands.screen import _summary_line

    records = [R(status="ok", referable=True, patient="a"), R(status="ok", referable=False, patient="a"),
               R(status="ok", referable=True, patient="c"), R(status="error", referable=None, patient="b")]
    assert _summary_line(records, ["notes.txt"], 2, 12.3) == (
        "4 images of 3 patients in 12 s (2 finished by an earlier run): 3 screened, 1 failed; "
        "2 referable eyes in 2 patients; 1 non-image file skipped.")
    assert _summary_line(records[:1], [], 0, 0.4) == (
        "1 image of 1 patient in 0 s: 1 screened, 0 failed; 1 referable eye in 1 patient.")


def test_report_numbers_match_the_csvs(screened):
    """The report showed the flagged area with 2 decimals (0.06 %) where results.csv has 3 (0.065)
    and region importance with 2 (0.0309 and 0.0276 both 0.03)."""
    from retina_fgvis.report.tables import read_csv

    html = (screened / "report.html").read_text(encoding="utf-8")
    results = read_csv(screened / "results.csv")
    pd_ok = results[results.status == "ok"]
    for value in pd_ok.flagged_area_pct:
        assert f"flagged {value:.3f}% of the field" in html
    from retina_fgvis.report.html import MAX_REGION_ROWS

    lesions = read_csv(screened / "lesions.csv")
    shown = lesions[lesions.region <= MAX_REGION_ROWS]  # the rows of the report's tables
    assert len(shown)
    for value in shown.mean_importance:
        assert f"<td class=num>{value:.4f}</td>" in html
