"""Keep freed memory inside the process on the CPU, so large tensors are not page-faulted in again and again.

glibc hands every allocation above 32 MiB straight to the kernel (mmap) and unmaps it on free.  An SD VAE decode
at 512² allocates and frees hundreds of such activations, and each new one page-faults all of its pages back in:
measured here, 10 s of kernel time in a 28 s decode (2.6 M minor faults).  With mmap off and trimming raised,
freed blocks stay in the heap and are reused: the same decode takes 20 s, with bit-identical results.  The price
is that the process keeps its peak memory until it exits rather than returning it between images.

Linux/glibc only (a no-op elsewhere); `SRKIT_KEEP_FREED_MEMORY=0` turns it off.  It affects the whole process,
so srkit applies it only when it runs a model on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory (idempotent); returns whether the setting is in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SRKIT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
