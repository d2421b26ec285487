"""Worker processes that end with the process that started them."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies


def _die_with_parent(parent: int) -> None:
    """In a worker: be killed when `parent` dies, so a killed stage leaves no workers decoding on."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    try:
        os.kill(parent, 0)  # the parent died before prctl took effect
    except ProcessLookupError:
        os._exit(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of `workers` processes that are killed when this process dies, even by SIGKILL."""
    # The workers are forked at the pool's first task. Garbage they inherit, such as an ONNX Runtime session
    # in a reference cycle, would be finalised in a worker whose copies of the session's threads do not run,
    # and its destructor would wait on them forever: free it here, where those threads exist.
    gc.collect()
    return ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),))
