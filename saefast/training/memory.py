"""CPU runtime settings for training loops.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap``
and returns it to the kernel on ``free``. A training step on the CPU allocates many such blocks (the ``[N, J, D]``
reconstructions and their gradients, 64 MiB each at ``N = 4096, J = 8, D = 512``), so every step page-faults all
of them in again: measured here, that cost more than the sparse ops themselves. :func:`reuse_freed_memory` raises
the thresholds so that freed blocks stay in the heap and are reused: the process keeps its peak footprint instead
of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_tuned: bool | None = None


def reuse_freed_memory() -> bool:
    """Make glibc keep and reuse freed large blocks (``mallopt``: mmap threshold 1 GiB, trim threshold 2 GiB).

    Called by :func:`saefast.train` on the CPU. Idempotent; returns whether the setting is in effect (False on a
    non-glibc system, or when ``SAEFAST_MALLOC_TUNING=0``). It changes the process-wide allocator, which is why it is
    not done at import.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("SAEFAST_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok = ok and mallopt(_M_TOP_PAD, 64 << 20) == 1
    _tuned = bool(ok)
    return _tuned
