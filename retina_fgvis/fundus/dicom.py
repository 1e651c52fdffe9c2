"""DICOM ophthalmic photographs -> :class:`~retina_fgvis.fundus.io.Fundus`.

Why a separate module: DICOM is the format hospitals export fundus photographs in, and it
carries what file names cannot be trusted for: the patient ID, the eye (laterality) and the
study date. Screening groups eyes by patient from these header fields.

What is accepted (everything else raises :class:`FundusReadError` with a one-line reason):

* Pixel data pydicom can decode: uncompressed, RLE Lossless (pydicom's own decoder),
  JPEG baseline/extended and JPEG 2000 (Pillow / pylibjpeg plugins when installed).
* ``RGB`` and ``YBR_FULL`` / ``YBR_FULL_422`` colour (converted to RGB by pydicom),
  ``PALETTE COLOR`` (looked up), and ``MONOCHROME1/2`` grey, which is replicated into three
  equal channels (the contract of ``Fundus.rgb``); screening then rejects grey images,
  because the classifier was trained on colour photographs.
* More than 8 stored bits (e.g. 10/12/16-bit): scaled to 8 bits by *Bits Stored*, so that
  the full declared range maps onto 0..255.

Refused: files that are not DICOM, truncated/corrupt files, datasets without pixel data
(reports, encapsulated PDFs), multi-frame datasets (one photograph per file is expected),
float pixel data, and pixel data no installed plugin can decode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retina_fgvis.fundus.quiet import quiet_library

# Pixel data elements: (7FE0,0010) Pixel Data, (7FE0,0008) Float, (7FE0,0009) Double Float.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})


@dataclass(frozen=True)
class DicomHeader:
    """Header facts read without decoding the pixels (cheap; used for grouping and the
    size check that protects against decompression bombs before any pixel is decoded)."""

    patient_id: str | None
    eye: str | None
    study_date: str | None
    rows: int | None
    columns: int | None
    frames: int
    has_pixel_data: bool


def is_dicom(path: str | Path) -> bool:
    """True when the file has the DICOM Part 10 preamble (``DICM`` at byte 128).

    DICOM exports often have no suffix at all (``IM000001``), so discovery checks the magic
    bytes instead of trusting the name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _error(path: str | Path, reason: str) -> Exception:
    from retina_fgvis.fundus.io import FundusReadError

    return FundusReadError(path, reason)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _laterality(ds) -> str | None:
    """(0020,0062) Image Laterality, else (0020,0060) Laterality: R/L -> right/left.

    B (both) and U (unknown) give None: one photograph is one eye, and guessing is worse
    than saying we do not know."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "OD"):
            return "right"
        if value in ("L", "OS"):
            return "left"
    return None


def _study_date(ds) -> str | None:
    """StudyDate (DA, ``YYYYMMDD``) as ISO ``YYYY-MM-DD``; kept verbatim if malformed."""
    raw = str(ds.get("StudyDate", "") or "").strip()
    if not raw:
        return None
    try:
        return _dt.datetime.strptime(raw, "%Y%m%d").date().isoformat()
    except ValueError:
        return raw


def _patient_id(ds) -> str | None:
    """The header's PatientID in Unicode NFC (as screening compares IDs: a decomposed "Zoë" from
    one PACS and a composed one from a manifest are one patient), None when empty."""
    import unicodedata

    value = unicodedata.normalize("NFC", str(ds.get("PatientID", "") or "")).strip()
    return value or None


def _header_from_dataset(ds) -> DicomHeader:
    rows = ds.get("Rows")
    cols = ds.get("Columns")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return DicomHeader(
        patient_id=_patient_id(ds),
        eye=_laterality(ds),
        study_date=_study_date(ds),
        rows=int(rows) if rows is not None else None,
        columns=int(cols) if cols is not None else None,
        frames=frames,
        has_pixel_data=any(tag in ds for tag in _PIXEL_TAGS),
    )


def _quiet() -> contextlib.AbstractContextManager[None]:
    """pydicom's warnings and log lines below ERROR silenced (:mod:`retina_fgvis.fundus.quiet`)."""
    return quiet_library("pydicom", logging.ERROR)


def _dcmread(path: str | Path, *, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _quiet(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                if not _starts_with_a_dicom_group(path):
                    raise
                # no 128-byte preamble, but the first element is a DICOM one (some devices and
                # older exports write the data set straight away): read it as such
                ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
            _default_transfer_syntax(ds)
    except InvalidDicomError:
        raise _error(path, "not a DICOM file (no DICM preamble)") from None
    except FileNotFoundError:
        raise _error(path, "file not found") from None
    except Exception as exc:  # truncated/corrupt files raise many different types
        raise _error(path, f"unreadable DICOM ({_one_line(exc)})") from None
    # pydicom reads a cut-off file without raising: it warns, or stops at the file meta header
    if any("End of file reached" in str(w.message) for w in caught):
        raise _error(path, "truncated DICOM (the file ends inside a data element)")
    if len(ds) == 0:
        raise _error(path, "truncated or empty DICOM (no data elements after the file meta header)")
    return ds


def _starts_with_a_dicom_group(path: str | Path) -> bool:
    """Whether the file opens with a little-endian (0002,xxxx) file-meta or (0008,xxxx)
    identifying element: a DICOM data set written without the preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _default_transfer_syntax(ds) -> None:
    """A data set read without file meta has no transfer syntax; DICOM's default for such files
    is Implicit VR Little Endian (what pydicom's forced read assumed while parsing it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = getattr(ds, "is_implicit_VR", True)
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian


def read_dicom_header(path: str | Path) -> DicomHeader:
    """Header only (no pixel decoding). Raises FundusReadError for non-DICOM/corrupt files."""
    ds = _dcmread(path, stop_before_pixels=True)
    header = _header_from_dataset(ds)
    # stop_before_pixels hides the pixel element itself: look at the raw tag list instead.
    if not header.has_pixel_data:
        header = dataclasses.replace(header, has_pixel_data=_file_has_pixel_tag(path))
    return header


def _file_has_pixel_tag(path: str | Path) -> bool:
    """Whether a pixel data element is present, without decoding it (reads elements lazily)."""
    import pydicom

    try:
        with _quiet():
            ds = pydicom.dcmread(str(path), defer_size=256)
    except Exception:
        return False
    return any(tag in ds for tag in _PIXEL_TAGS)


def _to_uint8(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Scale integer samples with ``bits_stored`` significant bits to uint8.

    The declared range (not the image's own min/max) is used so that a dark photograph
    stays dark: contrast stretching would change what the classifier sees."""
    if arr.dtype == np.uint8 and bits_stored <= 8:
        return arr
    bits_stored = max(1, min(int(bits_stored), 8 * arr.dtype.itemsize))
    values = arr.astype(np.float64)
    if signed:
        values += float(2 ** (bits_stored - 1))
    top = float(2**bits_stored - 1)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255)
    return scaled.astype(np.uint8)


def read_dicom(path: str | Path):
    """Read one DICOM photograph as a :class:`Fundus` (8-bit RGB + patient/eye/date).

    Raises :class:`FundusReadError` (``str(err) == f"{path}: {reason}"``) for anything that
    is not a single decodable image."""
    from retina_fgvis.fundus.io import Fundus

    ds = _dcmread(path, stop_before_pixels=False)
    header = _header_from_dataset(ds)
    if not header.has_pixel_data:
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", None) or str(ds.get("SOPClassUID", "?"))
        raise _error(path, f"DICOM has no pixel data (SOP class: {sop})")
    if 0x7FE00010 not in ds:
        raise _error(path, "DICOM has float pixel data; a photograph with integer samples is needed")
    if header.frames > 1:
        raise _error(path, f"multi-frame DICOM ({header.frames} frames); one photograph per file is expected")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1

    try:
        from pydicom.pixels import pixel_array

        with _quiet():
            arr = pixel_array(ds)  # YBR_FULL(_422) -> RGB by default (raw=False)
    except (NotImplementedError, RuntimeError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", None) or str(ts)
        if "missing dependencies" in str(exc) or "no pixel data decoders" in str(exc).lower():
            # pydicom's first line ends in "...missing dependencies:"; the packages come after
            raise _error(path, f"cannot decode {name} pixel data: no decoder installed for it "
                               "(pip install pylibjpeg pylibjpeg-libjpeg, or python-gdcm)") from None
        raise _error(path, f"cannot decode {name} pixel data ({_one_line(exc)})") from None
    except Exception as exc:  # truncated pixel data, bad lengths, broken codestreams
        raise _error(path, f"corrupt DICOM pixel data ({_one_line(exc)})") from None

    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
            bits_stored = 16 if arr.dtype.itemsize > 1 else 8
            signed = False
            samples = 3
        except Exception as exc:
            raise _error(path, f"cannot apply the palette colour table ({_one_line(exc)})") from None

    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _error(path, f"unexpected pixel array shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise _error(path, f"unsupported pixel sample type {arr.dtype}")

    if arr.shape[2] == 1 or samples == 1:
        grey = _to_uint8(arr[:, :, 0], bits_stored, signed)
        if photometric == "MONOCHROME1":  # MONOCHROME1: 0 is white
            grey = 255 - grey
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif arr.shape[2] == 3:
        rgb = _to_uint8(arr, bits_stored, signed)
    else:
        raise _error(path, f"unsupported number of samples per pixel ({arr.shape[2]})")

    return Fundus(
        rgb=np.ascontiguousarray(rgb),
        source=str(path),
        patient_id=header.patient_id,
        eye=header.eye,
        study_date=header.study_date,
    )


def write_dicom(
    path: str | Path,
    rgb: np.ndarray,
    *,
    patient_id: str,
    eye: str | None = None,
    study_date: str | None = None,
    compression: str | None = "rle",
    patient_name: str = "SYNTHETIC^SAMPLE",
) -> Path:
    """Write an 8-bit RGB array as an Ophthalmic Photography DICOM (for samples and tests).

    ``compression``: None (explicit VR little endian), ``"rle"`` (RLE Lossless, pydicom's
    native encoder) or ``"jpeg"`` (baseline JPEG via Pillow, YBR_FULL_422, encapsulated by
    hand because pydicom has no JPEG encoder). The patient is synthetic by construction."""
    import io as _io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
        generate_uid,
    )

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("write_dicom expects (H, W, 3) uint8")
    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
    # Deterministic UIDs from the content so regenerated samples are byte-identical.
    seed = f"{patient_id}|{eye}|{study_date}|{rgb.shape}|{int(rgb.astype(np.uint64).sum())}"
    sop_uid = generate_uid(entropy_srcs=[seed, "sop"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["retina-fgvis"])

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.Modality = "OP"
    if not (patient_id + patient_name).isascii():
        # without a declared character set pydicom writes non-ASCII as "?" (ISO 8859)
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    if study_date:
        ds.StudyDate = study_date.replace("-", "")
    if eye:
        ds.ImageLaterality = {"right": "R", "left": "L"}[eye]
        ds.Laterality = ds.ImageLaterality
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()

    if compression == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
    elif compression == "jpeg":
        from PIL import Image
        from pydicom.encaps import encapsulate

        buf = _io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=2)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}")

    from retina_fgvis.report.files import atomic_write_bytes

    buf = _io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())
