"""Atomic file writes and the rule for turning patient IDs and input files into path names.

Why atomic: screening runs are long and get killed (kill -9, OOM, power). A reader -- a
person opening report.html, a ``--resume`` run reading records -- must only ever see a
complete old file or a complete new one. Every output is written to a temporary file in the
same directory, flushed + fsynced, then ``os.replace``d over the target (atomic on POSIX
and Windows when source and target are on the same file system).

Path rule (documented in the README and report): **no patient identifier or input file name
ever becomes part of an output path.**

* patient folder: ``p-`` + the first 16 hex digits of HMAC-SHA-256 of the UTF-8 patient ID
  under the output folder's own random key (``OUT/.naming-key``), e.g. ``patients/p-3b1f0c...``.
  PatientID fields routinely contain names or national numbers, and input file names
  (``Smith_John_left.jpg``) as well; a hash is the only rule that is safe for every site's
  conventions. It is keyed because a plain SHA-256 of a 7-digit hospital number is reversed by
  trying all 10^7 numbers in a second, and would give one patient the same folder name in
  every run and at every site (linkable). The key is made once per output folder, so
  ``--resume`` and multi-process runs agree. The patient ID itself only appears *inside* the
  report and CSVs (which whoever holds them may read anyway).
* overlay file: ``<eye>-`` + the first 12 hex digits of the keyed hash of the input's
  relative path, e.g. ``right-0a1b2c3d4e5f.jpg`` (``eye`` is ``left``/``right``/``unknown``).
* record file (``OUT/records/``): 20 hex digits of the plain SHA-256 of the relative path; the
  record holds the path and the patient ID in its content anyway.

:func:`sanitise_component` is the general-purpose fallback for any other text that has to
become one path component: it keeps ``[A-Za-z0-9._-]``, maps everything else to ``_``, strips
leading/trailing dots (no ``.``/``..``/hidden files), collapses dot runs, bounds the length.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: the output folder's naming key (see module doc); hidden, readable by its owner only
NAMING_KEY_FILE = ".naming-key"


def _process_umask() -> int:
    """The process's umask (read once at import: setting and restoring it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mode of every written file: what ``open()`` would give under the user's umask (outputs hold
#: patient IDs; a site's ``umask 077`` must keep them private)
FILE_MODE = 0o666 & ~_process_umask()


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


class NamingKeyError(ValueError):
    """The output folder's naming key is damaged (a user can fix it: restore it or start anew)."""


def naming_key(out: str | Path) -> bytes:
    """The output folder's naming key: read from ``OUT/.naming-key``, or made (32 random bytes)
    when the folder has none. Its mode follows the umask like every output (a group-shared
    folder must stay resumable by the group; the CSVs beside it hold the plain IDs anyway).

    Creation is first-writer-wins, so torchrun ranks that start together all end up with the
    same key: a complete temporary file hard-linked to the name, or, where the file system has
    no hard links (FAT/exFAT drives, some network mounts), an exclusive create; a reader that
    finds that file still being written waits for it."""
    out = Path(out)
    path = out / NAMING_KEY_FILE
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        _create_key_file(path, (secrets.token_hex(32) + "\n").encode("ascii"))
    text = ""
    for attempt in range(50):  # an exclusive create by another process may still be writing
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise NamingKeyError(f"{path}: unreadable naming key ({exc.__class__.__name__})") from exc
        if len(text) >= 64 or attempt == 49:
            break
        time.sleep(0.02)
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise NamingKeyError(f"{path}: not a naming key (64 hex digits expected); restore it or screen into a new folder")
    return bytes.fromhex(text)


def _create_key_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it exists (then keep the existing file)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _write_fsynced(fd, data)
        os.chmod(tmp, FILE_MODE)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            return  # another process made it first: use theirs
        except OSError:
            pass  # no hard links here: exclusive create below
    finally:
        os.unlink(tmp)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
        return
    _write_fsynced(fd, data)


def _write_fsynced(fd: int, data: bytes) -> None:
    """Write ``data`` to the open file ``fd``, flush it to the disk and close it."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def keyed_hex(key: bytes, text: str) -> str:
    """HMAC-SHA-256 of ``text`` (UTF-8) under ``key``, as hex."""
    return hmac.new(key, str(text).encode("utf-8"), hashlib.sha256).hexdigest()


def patient_dir_name(patient_id: str, key: bytes) -> str:
    """Folder name for a patient: ``p-<16 hex of HMAC-SHA-256(key, patient_id)>`` (module doc)."""
    return "p-" + keyed_hex(key, patient_id)[:16]


def overlay_file_name(file_key: str, eye: str | None, key: bytes, suffix: str = ".png") -> str:
    """Overlay file name: ``<eye>-<12 hex of HMAC-SHA-256(key, relative input path)><suffix>``."""
    eye_part = eye if eye in ("left", "right") else "unknown"
    return f"{eye_part}-{keyed_hex(key, file_key)[:12]}{suffix}"


def record_name(file_key: str) -> str:
    """Per-image record file name under ``OUT/records/``."""
    return sha256_hex(file_key)[:20] + ".json"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + os.replace).

    A failure (no permission, disk full, read-only mount) is raised naming ``path``: the hidden
    temporary file's name means nothing to the user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _write_fsynced(fd, data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: after a power cut the folder entry may otherwise still name the
    old file (or none). Best effort: Windows cannot open a folder for fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_figure(path: str | Path, fig, **savefig: Any) -> Path:
    """A matplotlib figure as PNG, written whole or not at all (an interrupted run leaves no half
    PNG); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_image(path: str | Path, rgb, quality: int = 92) -> Path:
    """Encode an (H, W, 3) uint8 RGB array (PNG or JPEG by suffix) and write it atomically.

    Encoding happens in memory first, so a crash can never leave a truncated image."""
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
    """Delete ``.*.tmp`` leftovers of writes interrupted by a crash, only where a screening run
    writes (OUT, ``OUT/records``, ``OUT/patients/<folder>``): OUT may be a folder that holds
    other work, whose temporary files are not ours to remove."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for pattern in (".*.tmp", "records/.*.tmp", "patients/*/.*.tmp"):
        for tmp in folder.glob(pattern):
            try:
                tmp.unlink()
                n += 1
            except OSError:
                pass
    return n
