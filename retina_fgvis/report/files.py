"""Atomic file writes and the rule for turning patient IDs and input files into path names.

Why atomic: screening runs are long and get killed (kill -9, OOM, power). A reader -- a
person opening report.html, a ``--resume`` run reading records -- must only ever see a
complete old file or a complete new one. Every output is written to a temporary file in the
same directory, flushed + fsynced, then ``os.replace``d over the target (atomic on POSIX
and Windows when source and target are on the same file system).

Path rule (documented in the README and report): **no patient identifier or input file name
ever becomes part of an output path.**

* patient folder: ``p-`` + the first 16 hex digits of SHA-256 of the UTF-8 patient ID,
  e.g. ``patients/p-3b1f0c...``. PatientID fields routinely contain names or national
  numbers, and input file names (``Smith_John_left.jpg``) as well; hashing is the only rule
  that is safe for every site's conventions, and it is deterministic, so ``--resume`` and
  multi-process runs agree. The patient ID itself only appears *inside* the report and CSVs.
* overlay file: ``<eye>-`` + the first 12 hex digits of SHA-256 of the input's relative
  path, e.g. ``right-0a1b2c3d4e5f.jpg`` (``eye`` is ``left``/``right``/``unknown``).

:func:`sanitise_component` is the general-purpose fallback for any other text that has to
become one path component: it keeps ``[A-Za-z0-9._-]``, maps everything else to ``_``, strips
leading/trailing dots (no ``.``/``..``/hidden files), collapses dot runs, bounds the length.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (for provenance and resume: a changed input is redone)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sanitise_component(text: str, max_len: int = 64, fallback: str = "x") -> str:
    """One safe path component: no separators, no ``..``, no control characters, no
    leading dot, at most ``max_len`` characters; never empty."""
    cleaned = _UNSAFE.sub("_", str(text))
    cleaned = re.sub(r"\.{2,}", "_", cleaned)  # no ".." anywhere
    cleaned = re.sub(r"_{2,}", "_", cleaned).strip("._")
    cleaned = cleaned[:max_len].rstrip("._")
    return cleaned or fallback


def shown_path(path: str | Path) -> str:
    """A path as reports show it: relative to the working directory when it lies below it, so a
    committed report names ``weights/…`` rather than one machine's checkout (a sha256 beside it
    identifies the file); otherwise as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def patient_dir_name(patient_id: str) -> str:
    """Folder name for a patient: ``p-<16 hex of sha256(patient_id)>`` (see module doc)."""
    return "p-" + sha256_hex(str(patient_id))[:16]


def overlay_file_name(file_key: str, eye: str | None, suffix: str = ".png") -> str:
    """Overlay file name: ``<eye>-<12 hex of sha256(relative input path)><suffix>``."""
    eye_part = eye if eye in ("left", "right") else "unknown"
    return f"{eye_part}-{sha256_hex(file_key)[:12]}{suffix}"


def record_name(file_key: str) -> str:
    """Per-image record file name under ``OUT/records/``."""
    return sha256_hex(file_key)[:20] + ".json"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_image(path: str | Path, rgb, quality: int = 92) -> Path:
    """Encode an (H, W, 3) uint8 RGB array (PNG or JPEG by suffix) and write it atomically.

    Encoding happens in memory first, so a crash can never leave a truncated image."""
    import io

    import numpy as np
    from PIL import Image

    path = Path(path)
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img = Image.fromarray(arr)
    if fmt == "JPEG":
        # 4:4:4 chroma keeps thin coloured outlines crisp (4:2:0 smears them)
        img.save(buf, format=fmt, quality=quality, subsampling=0)
    else:
        img.save(buf, format=fmt, compress_level=6)
    return atomic_write_bytes(path, buf.getvalue())


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete ``.*.tmp`` leftovers of writes interrupted by a crash (only our own pattern)."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in folder.rglob(".*.tmp"):
        try:
            tmp.unlink()
            n += 1
        except OSError:
            pass
    return n
