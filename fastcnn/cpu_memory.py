"""Keep the memory a CPU training step frees in the process, so the next step does not fault it in again.

Why: PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults a block of
more than 128 KiB -- every activation and gradient of a CIFAR model at a useful batch -- is
mapped fresh from the kernel (``mmap``) or handed back when the top of the heap is free
(``trim``), and each 4 KiB page of it is faulted in and zeroed again by the kernel on first
touch in the next step. glibc raises its mmap threshold as it sees blocks freed, but not far
enough: measured on the 2-core CPU of bench/RESULTS.md (2026-12-02), a ResNet-20 training step
at batch 64 took 13,700 minor page faults eager and 7,800 fused, several milliseconds of a
60 ms step, and none at all with the two settings below. A GPU's caching allocator does the
same for device memory; jemalloc or tcmalloc (``LD_PRELOAD``) do it for the CPU too.

What :func:`retain_freed_memory` sets (glibc's ``mallopt``, process-wide, from then on):

* ``M_MMAP_THRESHOLD`` = 1 GiB: blocks up to that size come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1: free memory at the top of the heap is kept, not returned.

The cost: the process's resident memory stays near its peak instead of falling between steps
(as on a GPU). Setting either also turns glibc's own threshold adjustment off. Other C
libraries (musl, macOS, Windows) are left alone, and the function says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: heap blocks up to this size are not mmapped (glibc accepts up to INT_MAX)
MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap up to this size is kept
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None
_reason = ""


def retain_freed_memory() -> tuple[bool, str]:
    """Apply the settings above once per process; returns ``(applied, why not)``.

    Idempotent. Not applied (``False`` and the reason) where the C library is not glibc or
    ``mallopt`` refuses a value."""
    global _applied, _reason
    if _applied is not None:
        return _applied, _reason
    libc_name, _version = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        _applied, _reason = False, f"the C library is not glibc ({platform.system()}, {libc_name or 'unknown'})"
        return _applied, _reason
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    for param, value, name in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
                               (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(param, value) != 1:
            _applied, _reason = False, f"glibc's mallopt refused {name}={value}"
            return _applied, _reason
    _applied, _reason = True, ""
    return _applied, _reason


def status() -> str:
    """One line for logs and benchmark records: whether the settings are in force."""
    if _applied is None:
        return "malloc defaults"
    return (f"malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB)") if _applied else f"malloc defaults ({_reason})"
