"""Folder screening: discovery, patient grouping, bad inputs, exit codes, path sanitising,
resume after a crash, sharding. Fake classifier/explainer (tests/_screening_fakes.py) keep
every test to about a second; the real preprocessing, regions and overlay are used."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from retina_fgvis import screening as S
from retina_fgvis.commands.screen import run_screen
from retina_fgvis.fundus.dicom import write_dicom
from retina_fgvis.report.files import (
    NamingKeyError,
    naming_key,
    overlay_file_name,
    patient_dir_name,
    sanitise_component,
    sha256_hex,
)

sys.path.insert(0, str(Path(__file__).parent))
from _screening_fakes import FakeClassifier, FakeExplainer, fundus_rgb, make_folder, write_png  # noqa: E402


def _screen(inputs, out, explainer=None, **kw) -> int:
    kw.setdefault("batch_size", 2)
    return run_screen(inputs=[Path(p) for p in inputs], out=Path(out), device="cpu",
                      classifier=FakeClassifier(),
                      screener_kwargs={"explainer": explainer or FakeExplainer()}, **kw)


def _results(out: Path):
    return S.read_results_csv(out / "results.csv")


def _same_key(*outs: Path) -> None:
    """Give output folders one naming key, as a user does by copying ``.naming-key``: only then
    are two runs' folder and overlay names (and so their tables and reports) the same."""
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".naming-key").write_text("ab" * 32 + "\n")


# ------------------------------------------------------------------ discovery and grouping


def test_discovery_recursive_sorted_and_filtered(tmp_path):
    src = tmp_path / "in"
    write_png(src / "b" / "X1_left.png", fundus_rgb(1))
    write_png(src / "a.png", fundus_rgb(2))
    write_png(src / ".hidden" / "h.png", fundus_rgb(3))
    write_png(src / "b" / ".h2.png", fundus_rgb(3))
    (src / "notes.txt").write_text("not an image")
    write_dicom(src / "c" / "IM0001", fundus_rgb(4), patient_id="D1", compression=None)
    write_png(src / "out" / "old.png", fundus_rgb(5))  # the output folder inside the input
    items, skipped = S.discover_inputs([src], exclude=[src / "out"])
    assert [i.file for i in items] == ["a.png", "b/X1_left.png", "c/IM0001"]
    assert [i.is_dicom for i in items] == [False, False, True]
    assert [p.name for p in skipped] == ["notes.txt"]
    # explicit files are always taken; several roots are told apart by their folder name
    items2, _ = S.discover_inputs([src / "a.png", src / "notes.txt"])
    assert [i.file for i in items2] == ["a.png", "notes.txt"]
    items3, _ = S.discover_inputs([src / "b", src / "c", src / "a.png"])
    assert [i.file for i in items3] == ["b/X1_left.png", "c/IM0001", "in/a.png"]


def test_nested_roots_key_files_by_the_first_root_given(tmp_path):
    """A file under two given roots takes the first in argument order (the root lookup walks the
    file's parents, once per file, instead of scanning every root for every file)."""
    src = tmp_path / "in"
    write_png(src / "b" / "x.png", fundus_rgb(1))
    write_png(src / "a.png", fundus_rgb(2))
    items, _ = S.discover_inputs([src / "b", src])
    assert [i.file for i in items] == ["b/x.png", "in/a.png"]
    items, _ = S.discover_inputs([src, src / "b"])
    assert [i.file for i in items] == ["in/a.png", "in/b/x.png"]
    many = [src / "a.png", *(write_png(tmp_path / f"p{k}" / "left.png", fundus_rgb(k)) or tmp_path / f"p{k}"
                             for k in range(3))]
    items, _ = S.discover_inputs(many)
    assert [i.file for i in items] == ["in/a.png", "p0/left.png", "p1/left.png", "p2/left.png"]


def test_group_from_name_rules():
    assert S.group_from_name("P001_right.png") == ("P001", "right")
    assert S.group_from_name("sub/10003_LEFT.jpeg") == ("10003", "left")
    assert S.group_from_name("a_b-OD.tif") == ("a_b", "right")
    assert S.group_from_name("P7/os.png") == ("P7", "left")
    assert S.group_from_name("scan_0001.png") == (None, None)
    assert S.group_from_name("left.png") == (None, "left") or S.group_from_name("left.png")[0] in (None, "")


def test_grouping_priority_dicom_manifest_name_file(tmp_path):
    src = tmp_path / "in"
    write_png(src / "P1_left.png", fundus_rgb(1))              # file-name rule
    write_png(src / "scan7.png", fundus_rgb(2))                # manifest
    write_png(src / "lone.png", fundus_rgb(3))                 # one patient per file
    write_png(src / "Q9_right.png", fundus_rgb(4))             # manifest beats the name
    write_dicom(src / "ZZ_left.dcm", fundus_rgb(5), patient_id="DCM-42", eye="right",
                compression="rle")                             # header beats name + manifest
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient,eye\nscan7.png,M-1,OS\nQ9_right.png,M-2,\nZZ_left.dcm,M-3,left\n")
    out = tmp_path / "out"
    assert _screen([src], out, manifest=manifest) == 0
    df = _results(out).set_index("file")
    assert (df.loc["P1_left.png", "patient"], df.loc["P1_left.png", "eye"]) == ("P1", "left")
    assert (df.loc["scan7.png", "patient"], df.loc["scan7.png", "eye"]) == ("M-1", "left")
    assert (df.loc["Q9_right.png", "patient"], df.loc["Q9_right.png", "eye"]) == ("M-2", "right")
    assert df.loc["lone.png", "patient"] == "lone" and df.loc["lone.png", "eye"] == ""
    assert (df.loc["ZZ_left.dcm", "patient"], df.loc["ZZ_left.dcm", "eye"]) == ("DCM-42", "right")
    rec = S.read_record(out, "ZZ_left.dcm")
    assert rec.grouping == "dicom" and rec.study_date is None


def test_one_patient_per_file_never_merges_two_files(tmp_path):
    """The fallback names a patient after its file without the suffix, unless two files differ
    only in their suffix: then each keeps it (two photographs, two patients)."""
    src = tmp_path / "in"
    for name in ("scan01.png", "scan01.jpg", "lone.png"):
        write_png(src / name, fundus_rgb(len(name)))
    items, _ = S.assign_groups(S.discover_inputs([src])[0])
    assert {it.file: (it.patient, it.grouping) for it in items} == {
        "lone.png": ("lone", "file"), "scan01.jpg": ("scan01.jpg", "file"), "scan01.png": ("scan01.png", "file")}


def test_manifest_paths_relative_to_the_manifest_or_absolute(tmp_path):
    src = tmp_path / "in"
    write_png(src / "sub" / "a.png", fundus_rgb(1))
    write_png(src / "b.png", fundus_rgb(2))
    items, _ = S.discover_inputs([src])
    manifest = {"in/sub/a.png": ("PA", "right"), str(src / "b.png"): ("PB", "left"), "zzz.png": ("PZ", None)}
    grouped, unmatched = S.assign_groups(items, manifest, base_dirs=[tmp_path])
    assert [(i.file, i.patient, i.eye, i.grouping) for i in grouped] == [
        ("b.png", "PB", "left", "manifest"), ("sub/a.png", "PA", "right", "manifest")]
    assert unmatched == ["zzz.png"]


def test_composed_and_decomposed_names_are_one_patient_and_match_the_manifest(tmp_path):
    """"José" written with a composed é (spreadsheets) and with e + U+0301 (macOS file names, some
    PACS exports) is one patient, and a manifest typed in a spreadsheet matches the decomposed
    file name. Byte-wise comparison made two patients and an unmatched manifest line."""
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
    assert composed != decomposed
    src = tmp_path / "in"
    write_png(src / f"{composed}_left.png", fundus_rgb(1))
    write_png(src / f"{decomposed}_right.png", fundus_rgb(2))
    write_png(src / f"{decomposed}_scan.png", fundus_rgb(3))
    items, _ = S.discover_inputs([src])
    grouped, unmatched = S.assign_groups(items, {f"{composed}_scan.png": (f"{decomposed}-M", "left")})
    assert unmatched == []
    by_eye = {(it.patient, it.eye, it.grouping) for it in grouped}
    assert by_eye == {(composed, "left", "filename"), (composed, "right", "filename"),
                      (f"{composed}-M", "left", "manifest")}
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    df = _results(out)
    assert set(df["patient"]) == {composed, f"{composed}_scan"}
    assert len({S.read_record(out, f).patient_dir for f in df["file"] if "scan" not in f}) == 1


def test_a_dicom_patient_id_is_compared_in_nfc(tmp_path):
    import unicodedata

    src = tmp_path / "in"
    write_png(src / f"{unicodedata.normalize('NFC', 'Zoë')}_left.png", fundus_rgb(1))
    write_dicom(src / "IM0002", fundus_rgb(2), patient_id=unicodedata.normalize("NFD", "Zoë"), eye="right",
                compression=None)
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    recs = [S.read_record(out, f) for f in _results(out)["file"]]
    assert {r.patient for r in recs} == {unicodedata.normalize("NFC", "Zoë")}
    assert len({r.patient_dir for r in recs}) == 1


def test_names_that_differ_in_spaces_or_only_in_unicode_form_stay_two_patients(tmp_path):
    """File names are compared in NFC but not stripped: " scan.png" and "scan.png" are two
    photographs, and so are two names that differ only in their Unicode form (Linux keeps both)."""
    import unicodedata

    src = tmp_path / "in"
    names = [" scan.png", "scan.png", unicodedata.normalize("NFC", "Zoë.png"), unicodedata.normalize("NFD", "Zoë.png")]
    for k, name in enumerate(names):
        write_png(src / name, fundus_rgb(k + 1))
    grouped, _ = S.assign_groups(S.discover_inputs([src])[0])
    assert len({it.patient for it in grouped}) == 4


def test_resume_puts_an_earlier_versions_decomposed_dicom_patient_with_its_other_images(tmp_path):
    """A record of an earlier version kept a DICOM's decomposed patient ID; a resume compares it in
    NFC, as this version reads the header, so the patient is one report section and one folder."""
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")
    src = tmp_path / "in"
    write_dicom(src / "IM0001", fundus_rgb(1), patient_id=composed, eye="left", compression=None)
    write_png(src / f"{composed}_right.png", fundus_rgb(2))
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    old = S.read_record(out, "IM0001")
    old.patient, old.patient_dir = decomposed, "p-from-an-earlier-version"
    S.write_record(out, old)
    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, resume=True) == 0
    assert ex.images == 0
    records = [S.read_record(out, f) for f in ("IM0001", f"{composed}_right.png")]
    assert {r.patient for r in records} == {composed} and len({r.patient_dir for r in records}) == 1
    assert all((out / r.overlay).is_file() for r in records)


def test_manifest_errors_are_usage_errors(tmp_path):
    make_folder(tmp_path / "in", 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,who\nx,y\n")
    assert _screen([tmp_path / "in"], tmp_path / "o1", manifest=bad) == 2
    assert _screen([tmp_path / "in"], tmp_path / "o2", manifest=tmp_path / "missing.csv") == 2


# ------------------------------------------------------------------ bad inputs and exit codes


def _huge_png_header(path: Path, w: int = 30000, h: int = 30000) -> None:
    """A PNG that *claims* 30000x30000 (900 MP) with almost no data: must be refused from
    the header, before any attempt to decode it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_bad_inputs_become_error_rows_and_the_run_continues(tmp_path, capsys):
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = tmp_path / "in"
    make_folder(src, 2)                                           # 2 good images
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good_jpg = src / "trunc.jpg"
    cv2.imwrite(str(good_jpg), fundus_rgb(3)[..., ::-1])
    good_jpg.write_bytes(good_jpg.read_bytes()[:300])             # truncated JPEG
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.PatientID = meta, "SR-1"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.save_as(str(src / "report.dcm"), enforce_file_format=True)  # DICOM without pixel data
    grey = fundus_rgb(4)[..., 1]
    cv2.imwrite(str(src / "grey.png"), grey)                       # grey-scale 8-bit
    cv2.imwrite(str(src / "grey16.png"), grey.astype(np.uint16) * 257)  # grey-scale 16-bit
    cv2.imwrite(str(src / "colour16.png"), (fundus_rgb(5)[..., ::-1].astype(np.uint16) * 257))
    write_png(src / "nofundus.png", np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    _huge_png_header(src / "huge.png")
    (src / "empty.tif").write_bytes(b"")

    out = tmp_path / "out"
    code = _screen([src], out)
    assert code == 1
    df = _results(out).set_index("file")
    ok = {"P00_left.png", "P00_right.png", "colour16.png"}  # 16-bit colour is converted, not refused
    assert set(df.index[df.status == "ok"]) == ok
    err = df[df.status == "error"]
    assert set(err.index) == {"corrupt.png", "trunc.jpg", "report.dcm", "grey.png", "grey16.png",
                              "nofundus.png", "huge.png", "empty.tif"}
    assert all(isinstance(e, str) and e and "\n" not in e for e in err.error)
    assert "no pixel data" in df.loc["report.dcm", "error"]
    assert "grey-scale" in df.loc["grey.png", "error"] and "grey-scale" in df.loc["grey16.png", "error"]
    assert "too large" in df.loc["huge.png", "error"]
    assert "field of view" in df.loc["nofundus.png", "error"]
    assert err.p_referable.isna().all()
    assert df.loc["empty.tif", "error"] == "empty file (0 bytes)"
    assert not any(str(src) in e for e in err.error)  # no absolute paths in reasons
    logged = capsys.readouterr().err
    for name in err.index:  # one log line per failure
        assert sum(name in line and "failed" in line for line in logged.splitlines()) == 1


def test_links_fifos_and_tiny_images_never_stop_the_run(tmp_path, capsys):
    """A link to a photograph elsewhere is screened under its own name; a broken link and a
    thumbnail get one error line each; a FIFO is skipped (opening it to hash or sniff would block
    the run for ever)."""
    src = tmp_path / "in"
    make_folder(src, 1)
    elsewhere = write_png(tmp_path / "elsewhere" / "X_right.png", fundus_rgb(2))
    (src / "linked_left.png").symlink_to(elsewhere)
    (src / "broken.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(src / "pipe.png")
    write_png(src / "thumb.png", fundus_rgb(3, size=24))  # below half the fake classifier's 64 px
    out = tmp_path / "out"
    assert _screen([src], out) == 1
    df = _results(out).set_index("file")
    assert set(df.index) == {"P00_right.png", "linked_left.png", "broken.png", "thumb.png"}
    assert set(df.index[df.status == "ok"]) == {"P00_right.png", "linked_left.png"}
    assert (df.loc["linked_left.png", "patient"], df.loc["linked_left.png", "eye"]) == ("linked", "left")
    assert df.loc["broken.png", "error"] == "broken symbolic link (its target does not exist)"
    assert df.loc["thumb.png", "error"].startswith("image too small (24x24 px")
    assert json.loads((out / "run.json").read_text())["skipped_non_image_files"] == 1  # the FIFO
    logged = capsys.readouterr().err
    assert sum("failed" in line and "broken.png" in line for line in logged.splitlines()) == 1
    # named on the command line: the same answers, and a FIFO gets its error line
    out2 = tmp_path / "out2"
    assert _screen([src / "broken.png", src / "pipe.png", src / "linked_left.png"], out2, min_side=16) == 1
    df2 = _results(out2).set_index("file")
    assert df2.loc["linked_left.png", "status"] == "ok"
    assert df2.loc["pipe.png", "error"].startswith("not a regular file")
    assert df2.loc["broken.png", "error"].startswith("broken symbolic link")


def test_eye_named_files_take_their_real_folder_as_patient(tmp_path):
    """`pat/left.png`: patient pat, whether the parent folder, the patient folder itself or the
    files are named on the command line."""
    write_png(tmp_path / "in" / "pat" / "left.png", fundus_rgb(1))
    write_png(tmp_path / "in" / "pat" / "right.png", fundus_rgb(2))
    pat = tmp_path / "in" / "pat"
    for n, inputs in enumerate(([tmp_path / "in"], [pat], [pat / "left.png", pat / "right.png"])):
        out = tmp_path / f"out{n}"
        assert _screen(inputs, out) == 0
        df = _results(out)
        assert list(zip(df.patient, df.eye)) == [("pat", "left"), ("pat", "right")], inputs


def test_resume_with_a_new_manifest_regroups_without_replaying_the_games(tmp_path):
    src = tmp_path / "in"
    write_png(src / "a_left.png", fundus_rgb(1))
    write_png(src / "b_right.png", fundus_rgb(2))
    out = tmp_path / "out"
    fresh = tmp_path / "fresh"
    _same_key(out, fresh)
    assert _screen([src], out) == 0
    old_overlays = sorted(p.relative_to(out) for p in (out / "patients").rglob("*.jpg"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient,eye\na_left.png,X1,left\nb_right.png,X1,right\n")
    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, resume=True, manifest=manifest) == 0
    assert ex.images == 0  # records reused, only regrouped
    assert _screen([src], fresh, manifest=manifest) == 0
    assert _outputs(out) == _outputs(fresh)
    new_overlays = sorted(p.relative_to(out) for p in (out / "patients").rglob("*.jpg"))
    assert new_overlays == sorted(p.relative_to(fresh) for p in (fresh / "patients").rglob("*.jpg"))
    assert not set(old_overlays) & set(new_overlays)  # moved, not copied beside the old ones
    assert {r.patient for r in (S.read_record(out, f) for f in ("a_left.png", "b_right.png"))} == {"X1"}


def test_a_refused_dicom_keeps_its_header_grouping_and_size(tmp_path):
    """The pixel checks run after the header is read: a grey-scale DICOM's error row still names
    its patient and eye (and the image size), as a readable one would."""
    src = tmp_path / "in"
    grey = np.repeat(fundus_rgb(1)[..., 1:2], 3, axis=2)
    write_dicom(src / "scan001.dcm", grey, patient_id="DCM-7", eye="right", compression=None)
    out = tmp_path / "out"
    assert _screen([src], out) == 1
    df = _results(out).set_index("file")
    assert (df.loc["scan001.dcm", "patient"], df.loc["scan001.dcm", "eye"]) == ("DCM-7", "right")
    assert "grey-scale" in df.loc["scan001.dcm", "error"]
    rec = S.read_record(out, "scan001.dcm")
    assert (rec.height, rec.width) == grey.shape[:2]


def test_a_file_named_through_a_linked_folder_is_one_input(tmp_path):
    real = tmp_path / "real"
    write_png(real / "P1_left.png", fundus_rgb(1))
    (tmp_path / "lnk").symlink_to(real)
    items, _ = S.discover_inputs([tmp_path / "lnk", tmp_path / "lnk" / "P1_left.png"])
    assert [i.file for i in items] == ["P1_left.png"]


def test_exit_codes(tmp_path):
    make_folder(tmp_path / "in", 2)
    assert _screen([tmp_path / "in"], tmp_path / "ok") == 0
    (tmp_path / "empty").mkdir()
    assert _screen([tmp_path / "empty"], tmp_path / "o2") == 2
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    assert _screen([tmp_path / "txt"], tmp_path / "o3") == 2
    assert _screen([tmp_path / "nope"], tmp_path / "o4") == 2
    assert _screen([tmp_path / "in"], tmp_path / "o5", batch_size=0) == 2
    # an existing run is neither overwritten nor silently mixed in
    assert _screen([tmp_path / "in"], tmp_path / "ok") == 2
    assert _screen([tmp_path / "in"], tmp_path / "ok", overwrite=True) == 0


def test_batch_failure_is_retried_image_by_image(tmp_path):
    make_folder(tmp_path / "in", 3)
    ex = FakeExplainer(fail_on=1.0)  # every multi-image batch raises
    assert _screen([tmp_path / "in"], tmp_path / "out", explainer=ex, batch_size=3) == 0
    assert ex.calls == 1 + 3


class _Broken(FakeExplainer):
    def attribute(self, inputs, target=1, game="deletion", fov_mask=None):
        raise RuntimeError("CUDA out of memory\nmore text")


def test_explain_errors_are_retried_on_resume_input_errors_are_not(tmp_path):
    src = tmp_path / "in"
    make_folder(src, 2)
    (src / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out"
    assert _screen([src], out, explainer=_Broken()) == 1
    df = _results(out).set_index("file")
    assert df.loc["P00_right.png", "error"] == "explain failed (RuntimeError: CUDA out of memory)"
    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, resume=True) == 1  # bad.png still bad
    assert ex.images == 2
    assert (_results(out).status == "ok").sum() == 2


# ------------------------------------------------------------------ path sanitising


@pytest.mark.parametrize("pid", ["../../etc/passwd", "Smith^John", "a/b\\c", "x\x00y\n", "..", "",
                                 "Ölçer José", "CON"])
def test_patient_dir_is_a_hash_never_the_id(pid):
    key = bytes(range(32))
    d = patient_dir_name(pid, key)
    assert d.startswith("p-") and len(d) == 18 and all(c in "p-0123456789abcdef" for c in d)
    assert patient_dir_name(pid, key) == d  # deterministic under one key
    assert patient_dir_name(pid, bytes(32)) != d  # another output folder's key: another name


def test_folder_names_are_keyed_per_output_folder(tmp_path):
    """A plain SHA-256 of a hospital number is reversed by trying every number and names one
    patient alike in every run; the keyed hash is neither (its key stays with the output)."""
    src = tmp_path / "in"
    write_png(src / "0482913_left.png", fundus_rgb(1))
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert _screen([src], out) == 0
    dirs = [sorted(p.name for p in (out / "patients").iterdir()) for out in runs]
    assert len(dirs[0]) == len(dirs[1]) == 1 and dirs[0] != dirs[1]  # not linkable across runs
    plain = "p-" + sha256_hex("0482913")[:16]  # what a dictionary attack on the old rule finds
    assert plain not in dirs[0] + dirs[1]
    key_file = runs[0] / ".naming-key"
    from retina_fgvis.report.files import FILE_MODE

    assert key_file.stat().st_mode & 0o777 == FILE_MODE  # like every output: the umask decides
    assert naming_key(runs[0]) == bytes.fromhex(key_file.read_text().strip())
    assert dirs[0] == [patient_dir_name("0482913", naming_key(runs[0]))]
    ex = FakeExplainer()  # resume keeps the folder's key and so its names
    assert _screen([src], runs[0], explainer=ex, resume=True) == 0
    assert ex.images == 0 and sorted(p.name for p in (runs[0] / "patients").iterdir()) == dirs[0]
    # --overwrite starts a new folder: a new key
    assert _screen([src], runs[0], overwrite=True) == 0
    assert sorted(p.name for p in (runs[0] / "patients").iterdir()) != dirs[0]


def test_the_key_is_made_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """FAT/exFAT drives and some network mounts refuse os.link: the key is then made by an
    exclusive create, once, and no temporary file is left behind."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "fat"
    key = naming_key(out)
    assert len(key) == 32 and naming_key(out) == key
    assert [p.name for p in out.iterdir()] == [".naming-key"]


def test_a_damaged_naming_key_is_refused_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".naming-key").write_text("not hex\n")
    with pytest.raises(NamingKeyError, match=r"\.naming-key: not a naming key \(64 hex digits expected\)"):
        naming_key(out)
    assert (out / ".naming-key").read_text() == "not hex\n"


def _as_written_by_the_unkeyed_version(out: Path) -> list[str]:
    """Rename OUT's overlays and rewrite its records as the previous version (plain SHA-256
    names) wrote them; returns the legacy overlay paths."""
    legacy_paths = []
    for rec_path in sorted((out / "records").glob("*.json")):
        rec = S.ImageRecord.from_dict(json.loads(rec_path.read_text()))
        if rec.overlay:
            legacy = f"patients/p-{sha256_hex(rec.patient)[:16]}/{rec.eye or 'unknown'}-{sha256_hex(rec.file)[:12]}.jpg"
            (out / legacy).parent.mkdir(parents=True, exist_ok=True)
            (out / rec.overlay).rename(out / legacy)
            rec.overlay = legacy
            legacy_paths.append(legacy)
        rec.patient_dir = f"p-{sha256_hex(rec.patient)[:16]}"
        S.write_record(out, rec)
    for d in (out / "patients").iterdir():
        if not any(d.iterdir()):
            d.rmdir()
    return legacy_paths


def test_images_redone_on_resume_leave_no_overlay_behind(tmp_path, capsys):
    """An image redone on --resume (new settings here) gets its overlay under today's name; the
    earlier one -- named by the unkeyed hash of the previous version -- must not stay beside it."""
    src = tmp_path / "in"
    make_folder(src, 4)
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    legacy = _as_written_by_the_unkeyed_version(out)
    assert legacy and all((out / p).is_file() for p in legacy)
    capsys.readouterr()
    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, resume=True, iterations=7) == 0
    assert ex.images == 4  # other settings: every game replayed
    assert not any((out / p).exists() for p in legacy)
    named = {S.read_record(out, f).overlay for f in _results(out).file}
    assert {p.relative_to(out).as_posix() for p in (out / "patients").rglob("*") if p.is_file()} == named
    assert f"removed {len(legacy)} overlay(s) that no record names" in " ".join(capsys.readouterr().err.split())


def test_resume_moves_the_outputs_of_the_unkeyed_naming(tmp_path):
    """Output folders of earlier versions (plain SHA-256 names) move to keyed names on --resume,
    without replaying a game; the result equals a fresh run with that key."""
    src = tmp_path / "in"
    make_folder(src, 4)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    _same_key(out, fresh)
    assert _screen([src], out) == 0
    _as_written_by_the_unkeyed_version(out)
    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, resume=True) == 0
    assert ex.images == 0
    assert _screen([src], fresh) == 0
    assert _outputs(out) == _outputs(fresh)  # same names, same overlays, nothing left behind
    assert sorted(p.relative_to(out) for p in (out / "patients").rglob("*")) == \
        sorted(p.relative_to(fresh) for p in (fresh / "patients").rglob("*"))


def test_records_of_removed_inputs_are_reported_and_forgotten_on_request(tmp_path, capsys):
    """A file removed from the input (a withdrawn patient) leaves its record and overlay in OUT:
    --resume says so; --resume --forget-missing deletes them; the rest stays as it was."""
    src = tmp_path / "in"
    make_folder(src, 5)
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    gone = src / "P02_right.png"  # patient P02's only image
    gone_rec = S.read_record(out, gone.name)
    gone.unlink()
    capsys.readouterr()
    assert _screen([src], out, resume=True) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 earlier image record(s)" in err and "--resume --forget-missing deletes them" in err
    assert S.read_record(out, gone.name) is not None and (out / gone_rec.overlay).is_file()
    assert gone.name not in set(_results(out).file)
    kept = {p: p.read_bytes() for p in (out / "patients").rglob("*.jpg") if p != out / gone_rec.overlay}
    assert _screen([src], out, resume=True, forget_missing=True) == 0
    assert "forgot 1 earlier image record(s)" in " ".join(capsys.readouterr().err.split())
    assert S.read_record(out, gone.name) is None and not (out / gone_rec.overlay).exists()
    assert not (out / gone_rec.overlay).parent.exists()  # the patient had one image: folder gone
    assert {p: p.read_bytes() for p in (out / "patients").rglob("*.jpg")} == kept
    assert len(list((out / "records").glob("*.json"))) == 4
    assert _screen([src], out, forget_missing=True) == 2  # only with --resume


def test_only_our_own_temporary_files_are_cleaned_up(tmp_path):
    """OUT may hold other work: leftovers are removed only where a screening run writes."""
    from retina_fgvis.report.files import remove_stale_temp_files

    ours = [tmp_path / ".results.csv.x1.tmp", tmp_path / "records" / ".r.json.x2.tmp",
            tmp_path / "patients" / "p-0" / ".left-0.jpg.x3.tmp"]
    theirs = [tmp_path / "notes" / ".draft.tmp", tmp_path / "patients" / "p-0" / "deep" / ".y.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert remove_stale_temp_files(tmp_path) == 3
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Outputs hold patient IDs: a site's umask must decide who may read them."""
    target = tmp_path / "x.txt"
    code = ("import os, sys; os.umask(int(sys.argv[2], 8)); "
            "from retina_fgvis.report.files import atomic_write_text; atomic_write_text(sys.argv[1], 'x')")
    subprocess.run([sys.executable, "-c", code, str(target), oct(umask)[2:]], check=True, timeout=120)
    assert target.stat().st_mode & 0o777 == mode


def test_sanitise_component():
    assert sanitise_component("../../x") == "x"
    assert sanitise_component("a/b") == "a_b"
    assert sanitise_component("\x00\x1f..") == "x"
    assert sanitise_component(".hidden") == "hidden"
    assert sanitise_component("ok-Name_1.2") == "ok-Name_1.2"
    assert len(sanitise_component("y" * 500)) == 64


def test_output_paths_carry_no_names(tmp_path):
    src = tmp_path / "in"
    write_png(src / "Smith John_left.png", fundus_rgb(1))
    write_dicom(src / "x.dcm", fundus_rgb(2), patient_id="../../Doe^Jane", eye="left", compression=None)
    out = tmp_path / "out"
    assert _screen([src], out) == 0
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert not any("Smith" in n or "Doe" in n or "Jane" in n or ".." in n for n in names)
    overlays = sorted(p for p in (out / "patients").rglob("*.jpg"))
    assert len(overlays) == 2 and all(p.resolve().is_relative_to(out.resolve()) for p in overlays)
    assert overlay_file_name("a/Smith_left.png", "left", naming_key(out)).startswith("left-")


# ------------------------------------------------------------------ resume and sharding


def _outputs(out: Path) -> dict[str, bytes]:
    keep = {"results.csv", "lesions.csv", "report.html"}
    files = {n: (out / n).read_bytes() for n in keep}
    for p in sorted((out / "patients").rglob("*")):
        if p.is_file():
            files[p.relative_to(out).as_posix()] = p.read_bytes()
    return files


def test_resume_after_crash_gives_identical_outputs(tmp_path, monkeypatch):
    src = tmp_path / "in"
    make_folder(src, 7)
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    _same_key(ref, out)
    assert _screen([src], ref, batch_size=3) == 0

    # crash in the middle of writing the second batch's records
    real_write = S.write_record
    count = {"n": 0}

    def crashing_write(out, rec):
        count["n"] += 1
        if count["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_write(out, rec)

    monkeypatch.setattr(S, "write_record", crashing_write)
    assert _screen([src], out, batch_size=3) == 130  # Ctrl-C: exit code 130, a message, no tables
    monkeypatch.setattr(S, "write_record", real_write)
    assert len(list((out / "records").glob("*.json"))) == 4
    assert not (out / "results.csv").exists()

    ex = FakeExplainer()
    assert _screen([src], out, explainer=ex, batch_size=3, resume=True) == 0
    assert ex.images == 4  # batch 1 (3 images) skipped; the half-written batch 2 is redone whole
    assert _outputs(out) == _outputs(ref)
    info = json.loads((out / "run.json").read_text())
    assert info["timings"]["images_reused_from_previous_run"] == 3

    # a changed input is screened again on resume
    write_png(src / "P00_right.png", fundus_rgb(42))
    ex2 = FakeExplainer()
    assert _screen([src], out, explainer=ex2, batch_size=3, resume=True) == 0
    assert ex2.images == 3


_KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from _screening_fakes import FakeClassifier, FakeExplainer
from retina_fgvis.commands.screen import run_screen

class Slow(FakeExplainer):
    def attribute(self, inputs, target=1, game="deletion", fov_mask=None):
        time.sleep(0.4)
        return super().attribute(inputs, target, game, fov_mask)

run_screen(inputs=[Path(sys.argv[1])], out=Path(sys.argv[2]), device="cpu", batch_size=2,
           classifier=FakeClassifier(), screener_kwargs={"explainer": Slow()}, resume=True)
"""


def test_kill_9_then_resume(tmp_path):
    src = tmp_path / "in"
    make_folder(src, 6)
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    _same_key(ref, out)
    assert _screen([src], ref) == 0
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), str(Path(__file__).parent)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "records").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list((out / "records").glob("*.json")))
    assert 2 <= n_done < 6, "the kill came too late to test anything"
    assert _screen([src], out, resume=True) == 0
    assert _outputs(out) == _outputs(ref)


def test_chunks_and_shards_cover_everything_once(tmp_path):
    items = [S.InputItem(path=tmp_path / f"{k}.png", file=f"{k:02d}.png") for k in range(11)]
    chunks = S.plan_chunks(items, 3)
    assert [len(c) for c in chunks] == [3, 3, 3, 2]
    for world in (1, 2, 3, 5):
        seen = [it.file for r in range(world) for c in S.shard_chunks(chunks, r, world) for it in c]
        assert sorted(seen) == [it.file for it in items]


def test_two_ranks_then_merge_equals_one_process(tmp_path):
    src = tmp_path / "in"
    make_folder(src, 5)
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    _same_key(ref, out)
    assert _screen([src], ref, batch_size=2) == 0
    items, _ = S.discover_inputs([src])
    items, _ = S.assign_groups(items)
    for rank in (0, 1):  # what each torchrun rank does, sequentially
        scr = S.Screener(FakeClassifier(), out, S.ScreenSettings(batch_size=2), explainer=FakeExplainer())
        scr.run(items, rank=rank, world_size=2)
    run_info = json.loads((ref / "run.json").read_text())
    S.merge_outputs(out, S.collect_records(out, items), run_info)
    assert _outputs(out) == _outputs(ref)


# ------------------------------------------------------------------ the real CLI, engine and torchrun


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A real checkpoint of the test architecture (64 px): the whole real stack, in seconds."""
    import torch

    from retina_fgvis.classifier.model import LITE_MEAN, LITE_STD, TinyNet, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(TinyNet(), {"arch": "tiny", "input_size": 64, "mean": LITE_MEAN, "std": LITE_STD,
                                "class_names": ["non-referable", "referable"], "threshold": 0.5}, path)
    return path


def _cli(*args, env_extra=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "retina_fgvis", "screen", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_real_engine_on_samples(tmp_path, tiny_weights):
    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    out = tmp_path / "out"
    proc = _cli(samples, "--out", out, "--weights", tiny_weights, "--device", "cpu",
                "--iterations", "3", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    df = _results(out)
    assert list(df.file) == ["IM000001.dcm", "SYNA_left.png", "SYNB_right.png"]
    assert (df.status == "ok").all() and set(df.patient) == {"SYNA", "SYNB"}
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["iterations"] == 3 and len(info["model"]["sha256"]) == 64
    records = [json.loads(f.read_text()) for f in (out / "records").glob("*.json")]
    explained = [r for r in records if r["explained"]]
    assert all(r["prune_level"] is None for r in records if not r["explained"])
    assert all(isinstance(r["prune_level"], float) and 0 <= r["prune_level"] < 1 for r in explained)
    # --no-prune: the optimised mask as it is, and a different result key (no mixing on resume)
    dense = tmp_path / "dense"
    proc = _cli(samples, "--out", dense, "--weights", tiny_weights, "--device", "cpu",
                "--iterations", "3", "--batch-size", "2", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    dense_records = [json.loads(f.read_text()) for f in (dense / "records").glob("*.json")]
    assert all(r["prune_level"] in (None, 0.0) for r in dense_records)
    assert {r["result_key"] for r in dense_records}.isdisjoint({r["result_key"] for r in records})
    # usage errors are exit code 2, with one readable line
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli(empty, "--out", tmp_path / "o2", "--weights", tiny_weights)
    assert proc.returncode == 2 and "no fundus images found" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, tiny_weights):
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    src = tmp_path / "in"
    make_folder(src, 5)
    (src / "bad.png").write_bytes(b"x")
    args = [src, "--weights", tiny_weights, "--device", "cpu", "--iterations", "3", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the two ranks start on a folder without a naming key: they must make one between them
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "retina_fgvis", "screen",
                          *map(str, args), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode != 0  # the bad file: exit code 1 on every rank (torchrun reports failure)
    assert "bad.png" in two.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")) == [".naming-key"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / ".naming-key").write_bytes((tmp_path / "two" / ".naming-key").read_bytes())
    one = _cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 1, one.stderr
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["settings"]["world_size"] == 2


def test_threaded_pipeline_gives_the_same_outputs(tmp_path):
    """Loader and post-processing threads (the GPU configuration) change nothing but speed."""
    src = tmp_path / "in"
    make_folder(src, 5)
    (src / "bad.png").write_bytes(b"x")
    items, _ = S.assign_groups(S.discover_inputs([src])[0])
    outs = []
    _same_key(tmp_path / "serial", tmp_path / "threaded")
    for name, threads in (("serial", (0, 0)), ("threaded", (2, 3))):
        out = tmp_path / name
        settings = S.ScreenSettings(batch_size=2, loader_threads=threads[0], post_threads=threads[1])
        scr = S.Screener(FakeClassifier(), out, settings, explainer=FakeExplainer())
        seen = []
        summary = scr.run(items, progress=lambda rec, reused: seen.append(rec.file))
        assert seen == [it.file for it in items] and summary.failed == 1
        S.merge_outputs(out, S.collect_records(out, items), {"settings": {}, "model": {}})
        outs.append(_outputs(out))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_cli_with_the_shipped_weights(tmp_path):
    """README's first command with the real classifier (2 game iterations to stay short)."""
    weights = Path(__file__).resolve().parents[1] / "weights" / "rdr-effnet-lite0.pt"
    if not weights.exists():
        pytest.skip("weights/rdr-effnet-lite0.pt not present (train it or fetch the release)")
    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    out = tmp_path / "out"
    proc = _cli(samples, "--out", out, "--device", "cpu", "--iterations", "2", "--batch-size", "3",
                env_extra={"RETINA_FGVIS_WEIGHTS": str(weights)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df = _results(out)
    assert (df.status == "ok").all() and df.p_referable.between(0, 1).all()
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["sha256"] and info["model"]["arch"] == "tf_efficientnet_lite0"
    assert (out / "report.html").read_text().count("<img") == 3


def test_game_is_skipped_where_the_deletion_goal_already_holds(tmp_path):
    """Threshold goal: an eye below it needs nothing removed; only the others are explained."""
    from types import SimpleNamespace

    class GoalExplainer(FakeExplainer):
        settings = SimpleNamespace(goal="threshold", goal_level=0.93, max_iterations=9)

    src = tmp_path / "in"
    make_folder(src, 4)
    items, _ = S.assign_groups(S.discover_inputs([src])[0])
    clf = FakeClassifier()
    ex = GoalExplainer()
    scr = S.Screener(clf, tmp_path / "out", S.ScreenSettings(batch_size=4), explainer=ex)
    recs = scr.run(items).records
    above = [r for r in recs if r.p_referable > 0.93]
    below = [r for r in recs if r.p_referable <= 0.93]
    assert above and below
    assert ex.images == len(above)
    assert all(r.explained is False and r.n_regions == 0 and r.iterations == 0 for r in below)
    assert all(r.explained is True for r in above)
    ex_all = GoalExplainer()
    S.Screener(clf, tmp_path / "out2", S.ScreenSettings(batch_size=4, explain_all=True),
               explainer=ex_all).run(items)
    assert ex_all.images == 4
