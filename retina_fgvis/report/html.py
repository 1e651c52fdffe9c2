"""The screening report: one self-contained HTML page (inline CSS, no scripts, no network).

Layout, top to bottom: the research-use notice; a summary (images, patients, referable,
failures, model); how to read the pictures; an index of patients sorted by risk (highest
p(referable) of any eye first); one section per patient with the right eye (OD) then the
left eye (OS), each with its overlay and region table; the list of files that failed.

Overlays are linked relatively (``patients/<p-hash>/<eye>-<hash>.jpg``, next to the report)
so the page stays small for thousands of images; ``embed_images=True`` inlines them as
base64 for a single file that can be mailed. The page contains no timestamps, so an
interrupted + resumed run renders byte-identically (times are in run.json).
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NOTICE = "Research use only, not a diagnosis."
MAX_REGION_ROWS = 15

_CSS = """
:root{--fg:#1d232a;--muted:#5b6670;--line:#d8dee4;--bg:#f6f8fa;--ref:#b42318;--ok:#166c2f;--warn:#8a5c00}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);margin:0;background:#fff}
main{max-width:1180px;margin:0 auto;padding:0 20px 40px}
.notice{background:#fff4ce;border-bottom:2px solid #e3b341;color:#4d3800;padding:10px 20px;font-weight:600;text-align:center}
h1{font-size:26px;margin:22px 0 4px}
h2{font-size:20px;margin:0}
h3{font-size:16px;margin:0 0 6px}
.sub{color:var(--muted);margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0 18px}
.stat{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:140px}
.stat b{display:block;font-size:24px}
.stat span{color:var(--muted);font-size:13px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid var(--line);padding:6px 8px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12.5px;font-weight:700;white-space:nowrap}
.b-ref{background:#ffe1de;color:var(--ref)}
.b-no{background:#dcf5e3;color:var(--ok)}
.b-err{background:#eceff2;color:#57606a}
.b-warn{background:#fff4d6;color:var(--warn)}
.bar{position:relative;display:inline-block;width:70px;height:8px;background:#e6e9ec;border-radius:4px;vertical-align:middle;margin-right:6px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--ok)}
.bar i.hi{background:var(--ref)}
.bar b{position:absolute;top:0;bottom:0;width:2px;background:#1d232a;opacity:.55}
.patient{border:1px solid var(--line);border-radius:10px;margin:22px 0;overflow:hidden}
.phead{display:flex;gap:12px;align-items:center;flex-wrap:wrap;background:var(--bg);padding:10px 14px;border-bottom:1px solid var(--line)}
.phead .meta{color:var(--muted);font-size:13px}
.eyes{display:grid;grid-template-columns:1fr 1fr;gap:0}
.eye{padding:12px 14px;min-width:0}
.eye+.eye{border-left:1px solid var(--line)}
.eye.right{grid-column:1}
.eye.left{grid-column:2}
.eye.empty{color:var(--muted);font-size:13.5px;display:flex;align-items:center;justify-content:center}
@media (max-width:760px){.eyes{grid-template-columns:1fr}.eye.right,.eye.left{grid-column:1}.eye+.eye{border-left:0;border-top:1px solid var(--line)}.eye.empty{display:none}}
.eye img{width:100%;height:auto;border-radius:6px;background:#000;display:block}
.facts{margin:4px 0 10px;color:var(--fg);display:flex;flex-wrap:wrap;gap:4px 14px;align-items:center}
.facts span{white-space:nowrap}
.file{color:var(--muted);font-size:12.5px;word-break:break-all}
.note{font-size:13.5px;color:var(--muted);margin:0 0 8px}
.note.warn{color:var(--warn)}
.err{color:#57606a;background:var(--bg);border-radius:6px;padding:10px}
.legend{font-size:14px;color:var(--fg);background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.legend ul{margin:6px 0 0 18px;padding:0}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;margin-right:4px}
details{margin-top:8px}
summary{cursor:pointer;color:var(--muted);font-size:13.5px}
footer{color:var(--muted);font-size:12.5px;border-top:1px solid var(--line);margin-top:30px;padding-top:10px}
a{color:#0b5cad}
@media print{.eye img{max-width:100%}.patient{break-inside:avoid}}
"""

_EYE_ORDER = {"right": 0, "left": 1, None: 2}
_EYE_LABEL = {"right": "Right eye (OD)", "left": "Left eye (OS)", None: "Eye not known"}


def _kind_colour(kind: str) -> str:
    """The overlay's outline colour for a region kind, as CSS (legend = picture)."""
    try:
        from retina_fgvis.report.overlay import REGION_COLORS
    except ImportError:  # pragma: no cover - overlay module is part of the package
        REGION_COLORS = {"red": (0, 255, 0), "bright": (255, 0, 255), "unknown": (0, 255, 0)}
    r, g, b = REGION_COLORS.get(kind, REGION_COLORS.get("unknown", (0, 255, 0)))
    return f"rgb({int(r)},{int(g)},{int(b)})"


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


# p(referable) is recorded with 6 decimals, i.e. 4 decimals of a percent: enough to show
# every recorded p and any threshold of that precision exactly
_MAX_PCT_DECIMALS = 4


def _threshold_decimals(threshold: float) -> int:
    """Fewest decimals (of a percent) that show ``threshold`` exactly (at most 4)."""
    t = 100.0 * float(threshold)
    for d in range(_MAX_PCT_DECIMALS + 1):
        if abs(float(f"{t:.{d}f}") - t) < 1e-9:
            return d
    return _MAX_PCT_DECIMALS


def _shown_threshold_percent(threshold: float) -> float:
    """The threshold as a percent on the shown grid: exact when 4 decimals hold it, else rounded
    *up* to 4 decimals, so that no p below the threshold can be shown at or above it."""
    t = 100.0 * float(threshold)
    d = _threshold_decimals(threshold)
    if abs(float(f"{t:.{d}f}") - t) < 1e-9:
        return float(f"{t:.{d}f}")
    scale = 10 ** _MAX_PCT_DECIMALS
    return math.ceil(t * scale - 1e-9) / scale


def threshold_pct(threshold: float) -> str:
    """The referral threshold as a percent (0.1463 -> ``14.63%``, never ``15%``; beyond 4
    decimals rounded up: 0.14627485 -> ``14.6275%``)."""
    return f"{_shown_threshold_percent(threshold):.{_threshold_decimals(threshold)}f}%"


def _threshold_text(threshold: float) -> str:
    """The threshold as a probability and a percent on the same grid: ``0.1463 (14.63%)``."""
    d = _threshold_decimals(threshold)
    return f"{_shown_threshold_percent(threshold) / 100:.{max(2, d + 2)}f} ({threshold_pct(threshold)})"


def _pct(p: float | None, threshold: float | None = None) -> str:
    """p as a percent, 1 decimal; near ``threshold`` with as many more decimals (up to 4) as
    it takes for the shown p to compare with the shown threshold (:func:`threshold_pct`) as
    the raw values do: 14.8% is never badged referable under a threshold shown as 15%, and
    0.1462 / 0.1464 under 0.1463 show as 14.62% / 14.64%, not both as 14.6%."""
    if p is None:
        return "–"
    v = 100.0 * float(p)
    if threshold is None:
        return f"{v:.1f}%"
    shown_t = _shown_threshold_percent(threshold)
    above = float(p) >= float(threshold)
    for d in range(1, _MAX_PCT_DECIMALS + 1):
        if (float(f"{v:.{d}f}") >= shown_t) == above:
            return f"{v:.{d}f}%"
    # closer to the threshold than 4 decimals resolve: round toward the side p is on
    scale = 10 ** _MAX_PCT_DECIMALS
    v = (math.ceil(v * scale - 1e-6) if above else math.floor(v * scale + 1e-6)) / scale
    return f"{v:.{_MAX_PCT_DECIMALS}f}%"


def _bar(p: float | None, threshold: float) -> str:
    if p is None:
        return ""
    w = max(0.0, min(1.0, float(p))) * 100
    cls = "hi" if float(p) >= threshold else ""
    t = max(0.0, min(1.0, float(threshold))) * 100
    return (f'<span class="bar" title="tick: referral threshold {threshold_pct(threshold)}">'
            f'<i class="{cls}" style="width:{w:.2f}%"></i><b style="left:{t:.2f}%"></b></span>')


def _badge(rec_or_flag: Any) -> str:
    if rec_or_flag is None:
        return '<span class="badge b-err">failed</span>'
    if rec_or_flag == "incomplete":
        return '<span class="badge b-warn">incomplete: grade manually</span>'
    if rec_or_flag:
        return '<span class="badge b-ref">referable</span>'
    return '<span class="badge b-no">not referable</span>'


def patient_status(recs: Sequence[Any]) -> bool | str | None:
    """A patient's result: True (an eye is referable), "incomplete" (no screened eye is, but an
    image could not be screened: the patient is *not* cleared), None (every image failed),
    False (every image screened, none referable).

    Why: a patient with one failed eye and one eye below the threshold was badged "not
    referable" and sorted among the cleared patients, though half of them was never looked at."""
    ok = [r for r in recs if r.status == "ok"]
    if not ok:
        return None
    if any(r.referable for r in ok):
        return True
    return "incomplete" if len(ok) < len(recs) else False


def _img_src(out: Path, rel: str, embed: bool) -> str | None:
    """Relative link if the overlay exists (base64 data URI when embedding); None if missing."""
    path = out / rel
    if not path.is_file():
        return None
    if not embed:
        return _e(rel)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img_size(path: Path) -> str:
    """`` width=W height=H`` of a picture, read from its header (no decoding). Why: a lazy image
    without a size is 0 px tall until it loads, so a report of thousands of eyes jumps while the
    reader scrolls and the patient index lands in the wrong place; with the size the browser
    reserves the space (the CSS still scales it to the column)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            width, height = picture.size
    except (OSError, ValueError):
        return ""
    return f" width={int(width)} height={int(height)}"


def patient_groups(records: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """Records grouped by patient, sorted by what needs action: referable patients, then patients
    with an image that could not be screened (some eyes, then all), then the cleared ones; by the
    highest p(referable) of any eye within each group; ties by patient ID."""
    groups: dict[str, list[Any]] = {}
    for r in records:
        groups.setdefault(r.patient, []).append(r)
    order = {True: 0, "incomplete": 1, None: 2, False: 3}

    def risk(item: tuple[str, list[Any]]):
        ps = [float(r.p_referable) for r in item[1] if r.status == "ok" and r.p_referable is not None]
        return (order[patient_status(item[1])], -(max(ps) if ps else 0.0), item[0])

    out = []
    for pid, recs in sorted(groups.items(), key=risk):
        recs = sorted(recs, key=lambda r: (_EYE_ORDER.get(r.eye, 2), r.file))
        out.append((pid, recs))
    return out


def _region_table(rec: Any) -> str:
    regions = sorted(rec.regions or [], key=lambda g: int(g.get("id", 0)))
    if not regions:
        return '<p class="sub">No region flagged by the explanation.</p>'
    rows = []
    for g in regions[:MAX_REGION_ROWS]:
        cen = g.get("centroid") or [0, 0]
        kind = g.get("kind", "")
        colour = _kind_colour(kind)
        rows.append(
            f"<tr><td class=num>{int(g.get('id', 0))}</td>"
            f'<td><span class="sw" style="background:{colour}"></span>{_e(kind)}</td>'
            f"<td class=num>{int(g.get('area', 0))}</td>"
            f"<td class=num>{float(cen[1]):.0f}, {float(cen[0]):.0f}</td>"
            f"<td class=num>{float(g.get('mean_importance') or 0):.4f}</td></tr>"  # as lesions.csv
        )
    more = ""
    if len(regions) > MAX_REGION_ROWS:
        more = f'<p class="sub">{len(regions) - MAX_REGION_ROWS} more regions in lesions.csv.</p>'
    return (
        # open: a printed report (how many clinics review) shows no closed <details>' content
        f"<details open><summary>{len(regions)} region"
        f"{'s' if len(regions) != 1 else ''} (pixels on the original photograph)</summary>"
        "<table><thead><tr><th class=num>#</th><th>kind</th><th class=num>area px</th>"
        "<th class=num>centre x, y</th><th class=num>importance</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>" + more + "</details>"
    )


def _eye_card(rec: Any, out: Path, threshold: float, embed: bool, pin: bool = True) -> str:
    label = _EYE_LABEL.get(rec.eye, _EYE_LABEL[None])
    cls = f"eye {rec.eye}" if pin and rec.eye in ("left", "right") else "eye"
    head = f"<h3>{_e(label)}</h3><div class=file>{_e(rec.file)}</div>"
    if rec.status != "ok":
        return (f'<div class="{cls}">{head}<p>{_badge(None)}</p>'
                f'<div class="err">Could not be screened: {_e(rec.error)}</div></div>')
    explained = getattr(rec, "explained", None) is not False
    after = getattr(rec, "target_prob_after", None)
    counts = (
        f"<span>{int(rec.n_red)} red · {int(rec.n_bright)} bright</span>"
        f"<span>flagged {float(rec.flagged_area_pct or 0):.3f}% of the field</span>"  # as results.csv
        + (f"<span>p(referable) with the evidence removed {_pct(after, threshold)}</span>" if after is not None else "")
        if explained else ""
    )
    facts = (
        f'<div class="facts"><span>{_badge(rec.referable)}</span>'
        f"<span>p(referable) {_bar(rec.p_referable, threshold)}<b>{_pct(rec.p_referable, threshold)}</b></span>"
        f"{counts}</div>"
    )
    src = _img_src(out, rec.overlay, embed) if rec.overlay else None
    if src is None:
        img = '<div class="err">Overlay image missing.</div>'
    else:
        tag = f'<img src="{src}"{_img_size(out / rec.overlay)}'
        img = (f'{tag} alt="overlay for {_e(label)}">' if embed else
               f'<a href="{src}" title="open full size">{tag} loading="lazy" alt="overlay for {_e(label)}"></a>')
    date = f'<div class="file">study date {_e(rec.study_date)}</div>' if rec.study_date else ""
    note = ""
    if not explained:
        note = ('<p class="note">No explanation computed: p(referable) is already below the '
                "referral threshold, so no evidence has to be removed.</p>")
    elif getattr(rec, "goal_reached", None) is False:
        note = ('<p class="note warn">The explanation did not reach its goal'
                + (f" in {int(rec.iterations)} iterations" if rec.iterations else "")
                + (f" (p(referable) still {_pct(after, threshold)})" if after is not None else "")
                + (": the outlined regions may be incomplete.</p>" if rec.n_regions else
                   ": it found no evidence it could remove, so no region is shown. This is a "
                   "limit of the explanation, not a sign of a healthy eye.</p>"))
    elif rec.referable and not rec.n_regions:
        note = ('<p class="note warn">The explanation reached its goal, but none of the evidence it removed '
                "formed a region large or strong enough to outline. This is a limit of the region rule, "
                "not a sign of a healthy eye.</p>")
    unconverged_empty = getattr(rec, "goal_reached", None) is False and not rec.n_regions
    table = _region_table(rec) if explained and not unconverged_empty else ""
    return f'<div class="{cls}">{head}{date}{facts}{note}{img}{table}</div>'


def render_report(records: Sequence[Any], run_info: dict[str, Any], out: str | Path,
                  embed_images: bool = False) -> str:
    """The report page as a string (caller writes it atomically next to ``patients/``)."""
    out = Path(out)
    model = run_info.get("model", {}) or {}
    settings = run_info.get("settings", {}) or {}
    threshold = float(model.get("threshold", 0.5) or 0.5)
    groups = patient_groups(records)
    n_img = len(records)
    n_ok = sum(r.status == "ok" for r in records)
    n_ref = sum(1 for r in records if r.status == "ok" and r.referable)
    n_err = n_img - n_ok
    status = {pid: patient_status(recs) for pid, recs in groups}
    n_ref_pat = sum(1 for flag in status.values() if flag is True)
    n_manual = sum(1 for flag in status.values() if flag in ("incomplete", None))

    parts: list[str] = []
    parts.append(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>Fundus screening report — {NOTICE}</title><style>{_CSS}</style></head><body>"
        f'<div class="notice">{NOTICE} Findings are machine-generated explanations of a '
        "classifier and must be reviewed by a qualified clinician.</div><main id=\"top\">"
        "<h1>Fundus screening report</h1>"
        f'<p class="sub">Referable diabetic retinopathy classifier with FGVis deletion-game '
        f"explanations · model {_e(model.get('arch', '?'))}, weights sha256 "
        f"{_e(str(model.get('sha256') or '?')[:12])}, operating threshold p ≥ {_threshold_text(threshold)}</p>"
    )
    parts.append(
        '<div class="cards">'
        f'<div class="stat"><b>{len(groups)}</b><span>patients</span></div>'
        f'<div class="stat"><b>{n_img}</b><span>images</span></div>'
        f'<div class="stat"><b style="color:var(--ref)">{n_ref_pat}</b><span>patients with a referable eye</span></div>'
        f'<div class="stat"><b style="color:var(--ref)">{n_ref}</b><span>referable images</span></div>'
        f'<div class="stat"><b>{n_err}</b><span>images that failed</span></div>'
        f'<div class="stat"><b style="color:var(--warn)">{n_manual}</b><span>patients to grade manually '
        "(an image failed, no referable eye)</span></div></div>"
    )
    parts.append(
        '<div class="legend"><b>How to read the pictures.</b> <i>p(referable)</i> is the '
        "classifier's probability that the eye needs referral; at or above the threshold (the "
        "tick on the bar) the eye is marked <span class='badge b-ref'>referable</span>; a patient "
        "with an image that could not be screened and no referable eye is marked "
        "<span class='badge b-warn'>incomplete: grade manually</span>. For referable eyes, outlined "
        "regions are the model's evidence: what the explanation (FGVis deletion game) removed from "
        "the photograph to lower p(referable) to its goal, the referral threshold or, if higher, "
        "what a blank eye scores, so p with the evidence removed can stay above the threshold. "
        "Each region is labelled by its colour against the surrounding retina, a guess and not a "
        "lesion type:<ul>"
        f'<li><span class="sw" style="background:{_kind_colour("red")}"></span><b>red</b> (outlined in '
        "this colour): darker than its surroundings, as haemorrhages and microaneurysms are;</li>"
        f'<li><span class="sw" style="background:{_kind_colour("bright")}"></span><b>bright</b> '
        "(outlined in this colour): brighter, as exudates and cotton-wool spots are.</li></ul>"
        "Eyes below the threshold are not explained (no outlines, regions “–”). Absent outlines do "
        "not mean a healthy eye, and outlined regions are not confirmed lesions. Regions are "
        "numbered as in the table under each picture; small ones are ringed. In the table, "
        "<i>importance</i> is how much of the region the explanation removed on average (0 = kept, "
        "1 = removed entirely); the label follows the sign of the region's green contrast, a "
        "column of lesions.csv (near 0 the label is a toss-up). Click a picture for full size.</div>"
    )

    # index
    rows = []
    for rank, (pid, recs) in enumerate(groups, start=1):
        anchor = recs[0].patient_dir or f"p{rank}"
        ok = [r for r in recs if r.status == "ok"]
        ps = [float(r.p_referable) for r in ok if r.p_referable is not None]
        best = max(ps) if ps else None
        flag = status[pid]
        eyes = " · ".join(
            f"{'R' if r.eye == 'right' else 'L' if r.eye == 'left' else '?'} "
            + ((_pct(r.p_referable, threshold) + (" referable" if r.referable else "")) if r.status == "ok"
               else "failed")
            for r in recs
        )
        explained = [r for r in ok if getattr(r, "explained", None) is not False]
        nreg = sum(int(r.n_regions) for r in explained) if explained else "–"
        rows.append(
            f"<tr><td class=num>{rank}</td><td><a href='#{_e(anchor)}'>{_e(pid)}</a></td>"
            f"<td>{_badge(flag)}</td><td class=num>{_bar(best, threshold)}{_pct(best, threshold)}</td>"
            f"<td>{_e(eyes)}</td><td class=num>{nreg}</td></tr>"
        )
    parts.append(
        "<h2 style='margin-top:24px'>Patients by risk</h2>"
        "<p class=sub>Referable patients first, then patients with an image that could not be "
        "screened, then the others; by the highest p(referable) of any eye within each group. "
        "Regions: “–” when no eye was explained (all below the threshold).</p>"
        "<table><thead><tr><th class=num>#</th><th>patient</th><th>result</th>"
        "<th class=num>highest p(referable)</th><th>eyes</th><th class=num>regions</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table>"
    )

    # patients
    for pid, recs in groups:
        anchor = recs[0].patient_dir
        flag = status[pid]
        dates = sorted({r.study_date for r in recs if r.study_date})
        meta = f"{len(recs)} image{'s' if len(recs) != 1 else ''}"
        if dates:
            meta += " · study " + ", ".join(_e(d) for d in dates)
        eyes = [r.eye for r in recs]
        # pin right eye -> left column, left eye -> right column (as the clinician faces the
        # patient) when each eye has one image; otherwise let the pictures flow
        pin = len(set(eyes)) == len(eyes) and all(e in ("left", "right") for e in eyes)
        cards = "".join(_eye_card(r, out, threshold, embed_images, pin) for r in recs)
        if len(recs) == 1 and recs[0].eye in ("left", "right"):
            # keep the clinical layout (right eye on the left) and the picture half-width
            other = "left" if recs[0].eye == "right" else "right"
            placeholder = f'<div class="eye {other} empty">no {other}-eye image</div>'
            cards = cards + placeholder if other == "left" else placeholder + cards
        elif len(recs) == 1:
            cards += '<div class="eye empty"></div>'
        parts.append(
            f'<section class="patient" id="{_e(anchor)}"><div class="phead"><h2>Patient '
            f"{_e(pid)}</h2>{_badge(flag)}<span class=meta>{meta}</span>"
            f"<span class=meta style='margin-left:auto'><a href='#top'>index</a></span></div>"
            f'<div class="eyes">{cards}</div></section>'
        )

    failed = [r for r in records if r.status != "ok"]
    if failed:
        parts.append(
            f"<h2>Images that could not be screened ({len(failed)})</h2><table><thead><tr>"
            "<th>file</th><th>patient</th><th>reason</th></tr></thead><tbody>"
            + "".join(f"<tr><td class=file>{_e(r.file)}</td><td>{_e(r.patient)}</td>"
                      f"<td>{_e(r.error)}</td></tr>" for r in sorted(failed, key=lambda r: r.file))
            + "</tbody></table>"
        )

    iters = settings.get("iterations")
    parts.append(
        f"<footer>{NOTICE} Generated by retina-fgvis {_e(run_info.get('version', ''))}; "
        f"explanation: FGVis {_e(settings.get('game', 'deletion'))} game for the referable "
        f"class{', defence on' if settings.get('defense', True) else ''}"
        f"{f', {int(iters)} iterations' if iters else ''}. "
        "Tables: results.csv, lesions.csv; run details: run.json. Overlay folders and files are "
        "named by a hash keyed with this output folder's own random key, so no patient identifier "
        "or file name appears in a path, and the names cannot be traced back without the key."
        "</footer>"
        "</main></body></html>\n"
    )
    return "".join(parts)
