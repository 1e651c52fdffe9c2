"""DICOM reading: compressed/uncompressed colour, header fields, and every refusal as a
one-line FundusReadError. All files are built in the test with pydicom (tiny, synthetic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from retina_fgvis.fundus.dicom import is_dicom, read_dicom, read_dicom_header, write_dicom  # noqa: E402
from retina_fgvis.fundus.io import FundusReadError, read_fundus  # noqa: E402


def _rgb(h: int = 40, w: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], axis=2).astype(np.uint8)


def _dataset(rows: int = 32, cols: int = 32, **kw) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "TEST-1"
    ds.Modality = "OP"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize("compression", [None, "rle"])
def test_uncompressed_and_rle_roundtrip(tmp_path, compression):
    rgb = _rgb()
    p = write_dicom(tmp_path / "a.dcm", rgb, patient_id="SYN-9", eye="left",
                    study_date="2023-05-06", compression=compression)
    f = read_dicom(p)
    assert f.rgb.dtype == np.uint8 and f.rgb.shape == rgb.shape
    np.testing.assert_array_equal(f.rgb, rgb)  # both are lossless
    assert (f.patient_id, f.eye, f.study_date) == ("SYN-9", "left", "2023-05-06")
    if compression == "rle":
        assert pydicom.dcmread(str(p)).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    # the suffix dispatch of read_fundus reaches the DICOM reader
    assert read_fundus(p).patient_id == "SYN-9"


def test_jpeg_ybr_is_converted_to_rgb(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 90, 40  # fundus-like orange
    p = write_dicom(tmp_path / "j.dcm", rgb, patient_id="J", eye="right", compression="jpeg")
    assert pydicom.dcmread(str(p)).PhotometricInterpretation == "YBR_FULL_422"
    f = read_dicom(p)
    assert np.abs(f.rgb.astype(int) - rgb).max() <= 6  # lossy, but RGB (not YCbCr)
    assert f.eye == "right"


def test_laterality_fallbacks(tmp_path):
    ds = _dataset(Rows=20, Columns=20, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                  PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
                  PixelRepresentation=0, Laterality="R", StudyDate="20240229")
    ds.PixelData = np.full((20, 20, 3), 120, np.uint8).tobytes()
    f = read_dicom(_save(ds, tmp_path / "lat.dcm"))
    assert f.eye == "right" and f.study_date == "2024-02-29"
    ds.ImageLaterality = "B"  # both eyes -> unknown (do not guess), takes precedence as present
    ds.Laterality = ""
    assert read_dicom(_save(ds, tmp_path / "lat2.dcm")).eye is None


def test_header_probe_and_magic(tmp_path):
    p = write_dicom(tmp_path / "IM0001", _rgb(24, 30), patient_id="P", compression=None)
    assert is_dicom(p)
    h = read_dicom_header(p)
    assert (h.rows, h.columns, h.frames, h.has_pixel_data) == (24, 30, 1, True)
    (tmp_path / "x.txt").write_text("hello")
    assert not is_dicom(tmp_path / "x.txt")


def test_grey_monochrome_is_replicated(tmp_path):
    grey = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    ds = _dataset(Rows=16, Columns=16, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                  BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds.PixelData = grey.tobytes()
    f = read_dicom(_save(ds, tmp_path / "g.dcm"))
    assert f.rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(f.rgb[..., 0], grey)
    np.testing.assert_array_equal(f.rgb[..., 0], f.rgb[..., 2])


def test_monochrome1_is_inverted(tmp_path):
    ds = _dataset(Rows=16, Columns=16, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME1",
                  BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds.PixelData = np.zeros((16, 16), np.uint8).tobytes()
    assert read_dicom(_save(ds, tmp_path / "m1.dcm")).rgb.min() == 255


def test_sixteen_bit_colour_scaled_by_bits_stored(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint16)
    arr[..., 0] = 4095  # 12 bits stored: full scale
    arr[..., 1] = 2048
    ds = _dataset(Rows=16, Columns=16, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                  PlanarConfiguration=0, BitsAllocated=16, BitsStored=12, HighBit=11,
                  PixelRepresentation=0)
    ds.PixelData = arr.tobytes()
    f = read_dicom(_save(ds, tmp_path / "c16.dcm"))
    assert f.rgb.dtype == np.uint8
    assert f.rgb[0, 0, 0] == 255 and f.rgb[0, 0, 1] == 128 and f.rgb[0, 0, 2] == 0


def _reason(path: Path) -> str:
    with pytest.raises(FundusReadError) as info:
        read_dicom(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return info.value.reason


def test_no_pixel_data_is_refused(tmp_path):
    ds = _dataset()
    assert "no pixel data" in _reason(_save(ds, tmp_path / "sr.dcm"))


def test_not_dicom_and_truncated(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 50)
    assert "not a DICOM" in _reason(bad)
    good = write_dicom(tmp_path / "g.dcm", _rgb(), patient_id="P", compression=None)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(data[: len(data) - 2000])
    reason = _reason(trunc)
    assert "DICOM" in reason or "pixel" in reason


def test_truncated_rle(tmp_path):
    good = write_dicom(tmp_path / "r.dcm", _rgb(64, 64), patient_id="P", compression="rle")
    data = good.read_bytes()
    trunc = tmp_path / "rt.dcm"
    trunc.write_bytes(data[: int(len(data) * 0.6)])
    # pydicom reads the cut-off encapsulated data without raising (it only warns): the reason must
    # still say truncated, not "no pixel data"
    assert "truncated" in _reason(trunc)


def test_file_cut_inside_the_header_is_truncated_not_missing_pixels(tmp_path):
    good = write_dicom(tmp_path / "h.dcm", _rgb(), patient_id="P", compression=None)
    trunc = tmp_path / "h200.dcm"
    trunc.write_bytes(good.read_bytes()[:200])  # file meta only
    assert "truncated" in _reason(trunc)
    with pytest.raises(FundusReadError, match="truncated"):
        read_dicom_header(trunc)


def test_multiframe_is_refused(tmp_path):
    ds = _dataset(Rows=8, Columns=8, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                  PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
                  PixelRepresentation=0, NumberOfFrames=2)
    ds.PixelData = np.zeros((2, 8, 8, 3), np.uint8).tobytes()
    assert "multi-frame" in _reason(_save(ds, tmp_path / "mf.dcm"))
