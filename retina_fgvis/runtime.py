"""Process-wide settings the command-line tool applies at start-up (never on import).

Why an allocator setting: on a CPU a batch of 512-px fundus games allocates activations of tens
to hundreds of MB every iteration. glibc's malloc serves blocks above its mmap threshold (at most
32 MB) with fresh mmaps and returns freed memory at the top of the heap to the kernel, so every
iteration faults its memory in again: measured on this project's 2-core Xeon, batch 4, a
defended deletion game took 38-580 thousand minor page faults and 822 ms per iteration (1.27x a
plain fwd+bwd); with freed memory kept for reuse, no faults and 759 ms (1.15x)
(`evaluation/bench/probes/page_faults.py` and its logs). The price is that the process keeps its
peak memory until it exits (bench peak RSS 4060 vs 3977 MiB), which a command that runs games for
its whole life needs anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory", "trim_freed_memory", "allocator_mode", "compile_defence_masks"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_mode = "system default"


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt semantics below are glibc's), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory: no mmap for large blocks, no trimming.

    Returns the allocator mode in words (also on other C libraries, where nothing is changed).
    ``RETINA_FGVIS_MALLOC=system`` leaves the allocator alone (e.g. to compare).
    """
    global _mode
    if os.environ.get("RETINA_FGVIS_MALLOC", "").strip().lower() == "system":
        _mode = "system default (RETINA_FGVIS_MALLOC=system)"
        return _mode
    libc = _glibc()
    if libc is None:
        _mode = "system default (not glibc)"
        return _mode
    # documented in mallopt(3): M_MMAP_MAX = 0 disables mmap for large requests,
    # M_TRIM_THRESHOLD = -1 disables trimming completely
    if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1:
        _mode = f"glibc {libc.gnu_get_libc_version().decode()} malloc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)"
    else:
        _mode = "system default (mallopt refused)"
    return _mode


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now, keeping the allocator's mode.

    Why: a long run that mixes methods (``evaluate faithfulness``: six methods with very different
    allocation sizes, for hours) needs both. With glibc's defaults every 512-px forward pass faults
    its activations in again: a batch of 32 took 7.0 s and 2.5 M minor faults, against 2.9 s and
    0.07 M with freed memory kept (2-core Xeon, NHWC, shared CPU;
    ``evaluation/bench/probes/forward_allocator.py`` and its log). With memory kept and never handed
    back, the heap only grew until the OOM killer stopped a 60-eye run at 24 GB (session 6). Kept
    memory inside a method and this call between methods gives the speed of the first and bounds
    the heap by one method's peak. Returns False where the C library is not glibc (nothing done).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def allocator_mode() -> str:
    """What :func:`keep_freed_memory` did in this process, in words (for benchmark headers)."""
    return _mode


def compile_defence_masks() -> bool:
    """Let the defence build its CPU masks with one compiled kernel (see
    :func:`retina_fgvis.fgvis.defense.use_compiled_masks`); ``RETINA_FGVIS_COMPILE=0`` keeps them eager.
    Returns whether it is on."""
    from retina_fgvis.fgvis.defense import use_compiled_masks

    enabled = os.environ.get("RETINA_FGVIS_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
    use_compiled_masks(enabled)
    return enabled
