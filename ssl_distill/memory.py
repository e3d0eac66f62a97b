"""How the process allocates memory: :func:`keep_freed_memory` (no torch import: the command line calls it first)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h) and what keep_freed_memory sets them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BELOW = 2**30  # blocks under 1 GiB come from the heap (glibc's default maps those over 128 KiB-32 MiB)
_NEVER_TRIM = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next tensor instead of handing it back to the kernel.

    By default glibc maps every large block (a 65,536 x 256 last layer's 64 MiB weight, its gradient, AdamW's
    temporaries, the activations of a ViT-S/16 batch) fresh from the kernel and unmaps it when it is freed, so
    the next step's tensor of the same size touches new pages: each 4 KiB page a fault the kernel serves
    zeroed. Measured on the 2-core AMD EPYC (benchmarks/bench_step_profile.py's ViT-S/16 DINO step, batch 8,
    bf16, 3 rounds of 8 steps): ~170,000 page faults and 0.31-0.36 s of system time a step before, ~8,000
    and 0.02 s after; the step's median 3.77-4.11 -> 3.49-3.85 s; peak memory +4-6% (freed blocks stay in
    the process). PyTorch's CPU tensors come from malloc, so this is the setting that reaches them; a
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` of the user's is left as
    set. Process-wide, once (training and evaluation processes call it at their start). Returns whether it
    applied (False off glibc).
    """
    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_THRESHOLD, _HEAP_BELOW) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
