"""Keep freed memory in the process for reuse (glibc's malloc), so a training loop stops paying page faults.

A CPU training step allocates and frees the same few-hundred-kilobyte to few-megabyte activation buffers
every step. glibc serves allocations above its mmap threshold with fresh ``mmap`` calls, raises that threshold
only as large blocks are freed, and hands the top of its heap back to the kernel once more than the trim
threshold is free. Depending on the order of the first steps' allocations, a process then settles into
mapping, zeroing and unmapping pages every step or not: measured here on the Fashion-MNIST recipe, ~6,000
against ~700 minor page faults per step, and 2,086-2,628 images/s from one fresh process to the next, against
2,343-2,417 with the settings below (``docs/performance.md``). Fixing the thresholds removes that lottery.
The cost: memory freed by the process is kept by it (up to its peak use) instead of returned to the system.
Blocks of 512 MiB and more (32 MiB where glibc refuses a higher threshold) are still mapped afresh each time.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = (
    (M_MMAP_THRESHOLD, 512 << 20),  # blocks below 512 MiB come from the heap (a B/16 MLP buffer: 39 MiB)
    (M_TRIM_THRESHOLD, 1 << 30),  # never give the heap's top back below 1 GiB free
    (M_TOP_PAD, 64 << 20),  # grow the heap in steps of 64 MiB: fewer brk calls
)
# older glibc versions refuse mmap thresholds above 32 MiB on 64-bit (2.36 here accepts 512 MiB): then 32 MiB
OLD_GLIBC_MMAP_THRESHOLD = 32 << 20
# the same knobs as environment variables (and glibc's tunables): a user who set any of them keeps their choice
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


_applied = False


def applied() -> bool:
    """Whether :func:`keep_freed_memory` has set this process's malloc (benchmarks record it)."""
    return _applied


def keep_freed_memory() -> bool:
    """Apply :data:`SETTINGS` to this process's glibc malloc; True if applied. False, with nothing changed, off
    Linux, on another C library (musl has no ``mallopt``), with ``VITLAB_MALLOC=0``, or when the user set
    glibc's own variables for these knobs (:data:`ENV_VARS`, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``)."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("VITLAB_MALLOC", "1") == "0"
        or any(v in os.environ for v in ENV_VARS)
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = [mallopt(param, value) == 1 for param, value in SETTINGS]  # every setting tried
    if not ok[0]:
        ok[0] = mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MMAP_THRESHOLD) == 1
    global _applied
    _applied = _applied or all(ok)
    return all(ok)
