"""Image and DICOM flavours a screening programme meets: what a viewer shows is what is read.

TIFF orientation tags, transparent PNGs, DICOM written without its preamble or file meta, a
missing JPEG decoder, and library chatter on damaged files."""
from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from retina_fgvis.fundus.dicom import write_dicom
from retina_fgvis.fundus.io import FundusReadError, read_fundus
from retina_fgvis.fundus.intake import read_fundus_file

sys.path.insert(0, str(Path(__file__).parent))
from _screening_fakes import fundus_rgb  # noqa: E402


def _asymmetric(h: int = 24, w: int = 40) -> np.ndarray:
    """An image whose every rotation and mirror differs from the others."""
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_is_read_as_viewers_show_it(tmp_path: Path, orientation: int) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / f"o{orientation}.tif"
    tifffile.imwrite(path, _asymmetric(), photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    with Image.open(path) as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = read_fundus(path).rgb
    assert got.shape == shown.shape and np.array_equal(got, shown)


def test_transparent_png_background_becomes_black_not_its_stored_colour(tmp_path: Path) -> None:
    rgb = fundus_rgb(1)
    fov = rgb.sum(axis=2) > 0
    rgba = np.dstack([np.where(fov[..., None], rgb, 255), np.where(fov, 255, 0)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")  # white but transparent surround
    got = read_fundus(tmp_path / "t.png").rgb
    assert np.array_equal(got[fov], rgb[fov])          # opaque pixels exactly as stored
    assert not got[~fov].any()                          # transparent ones over black
    half = rgba.copy()
    half[..., 3] = np.where(fov, 128, 0)
    Image.fromarray(half, "RGBA").save(tmp_path / "h.png")
    assert np.abs(read_fundus(tmp_path / "h.png").rgb[fov].astype(int) - np.round(rgb[fov].astype(int) * 128 / 255)).max() <= 1


def test_dicom_without_preamble_or_file_meta_is_read(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    rgb = fundus_rgb(2)
    full = tmp_path / "full.dcm"
    write_dicom(full, rgb, patient_id="P7", eye="left", compression=None)
    no_preamble = tmp_path / "nopre.dcm"
    no_preamble.write_bytes(full.read_bytes()[132:])  # starts at the (0002,xxxx) file meta group
    ds = pydicom.dcmread(full)
    del ds.file_meta
    bare = tmp_path / "bare.dcm"  # no preamble, no file meta: starts at (0008,xxxx)
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    for path in (no_preamble, bare):
        fundus = read_fundus_file(path, is_dicom=True)
        assert np.array_equal(fundus.rgb, rgb) and fundus.patient_id == "P7", path.name
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file at all, just text")
    with pytest.raises(FundusReadError, match="not a DICOM file"):
        read_fundus_file(text, is_dicom=True)


def test_a_missing_jpeg_decoder_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    """pydicom's message puts the packages to install after its first line, which a one-line
    error would cut off."""
    import pydicom.pixels

    path = tmp_path / "j.dcm"
    write_dicom(path, fundus_rgb(3), patient_id="P", compression=None)

    def no_decoder(*_a, **_k):
        raise RuntimeError("Unable to decode as exceptions were raised by all available plugins:\n"
                           "  gdcm: missing dependencies: ...\n  pylibjpeg: missing dependencies: ...")

    def no_plugins(*_a, **_k):
        raise RuntimeError("Unable to decode the pixel data as all plugins are missing dependencies:\n"
                           "    gdcm - requires gdcm>=3.0.10\n    pylibjpeg - requires pylibjpeg>=2.0")

    for failure in (no_plugins,):
        monkeypatch.setattr(pydicom.pixels, "pixel_array", failure)
        with pytest.raises(FundusReadError, match=r"no decoder installed for it \(pip install pylibjpeg "
                                                  r"pylibjpeg-libjpeg, or python-gdcm\)"):
            read_fundus_file(path, is_dicom=True)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    with pytest.raises(FundusReadError, match="cannot decode"):
        read_fundus_file(path, is_dicom=True)


@pytest.mark.parametrize("claimed", [3000, 60000])
def test_a_damaged_tiff_gives_one_line_and_no_library_chatter(tmp_path: Path, capfd, caplog, recwarn,
                                                              claimed: int) -> None:
    """tifffile logs and Pillow warns (without naming the file) besides our one line: in a run
    over thousands of files those lines cannot be told apart."""
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, np.zeros((20, 20, 3), np.uint8), photometric="rgb")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        for tag in (256, 257):  # width and height claim far more than the strips hold
            t = tf.pages[0].tags[tag]
            data[t.valueoffset:t.valueoffset + 2] = struct.pack("<H", claimed)
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError) as err:  # FundusReadError or ImageRejected
        read_fundus_file(path)
    assert "\n" not in str(err.value)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in recwarn] == []
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
