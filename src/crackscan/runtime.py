"""Process settings that make PyTorch fast on an ordinary CPU.

glibc's default allocator returns large freed blocks to the operating system with ``munmap`` and asks
for them again on the next batch; for a CNN's activation buffers that costs more than the arithmetic
(measured in ``benchmarks/throughput.py``: several times slower forward passes). crackscan therefore
tells glibc to keep its memory for its own process. ``CRACKSCAN_NO_MALLOC_TUNING=1`` or the CLI flag
``--no-malloc-tuning`` turns this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it each batch (glibc only; idempotent).

    Returns:
        True when the settings were applied (or already were), False where they cannot be.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("CRACKSCAN_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, 256 << 20) == 1
    _tuned = bool(ok)
    return _tuned


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
