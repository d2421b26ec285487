"""glibc malloc settings for CPU training: reuse freed memory instead of mapping fresh pages for every large tensor.

By default glibc serves allocations above 32 MB (a batch's activations at 112x224) with mmap and
unmaps them on free, so every training step faults in its activations again, page by page: about
26 000 page faults a step for efficientnet-lite0 at 112x224, batch 32, and 7 % of its speed on 2
CPU cores (bench/allocator_speed.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def reuse_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and keep freed memory for reuse; True where glibc took the settings.

    The process keeps its peak memory until it exits (a few percent more than before).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
