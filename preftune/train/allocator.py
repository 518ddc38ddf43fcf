"""Large CPU tensors reused instead of page-faulted anew: the glibc allocator set up for training.

A training step on CPU frees and re-allocates the same large buffers over and over: a chunk's
``[rows, vocabulary]`` logits and their gradient, activations, parameter gradients. glibc serves every
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to the system on
``free``, so each such tensor is page-faulted and zero-filled by the kernel again on every use:
measured here, allocating and filling a 64 MiB tensor costs ~30 ms of CPU against ~3 ms to fill one
that is already mapped, and a ``[512, 32000]`` head projection runs 25% faster into reused memory.

:func:`reuse_freed_memory` tells glibc to take every block from its heap (no per-block ``mmap``) and to
keep the freed top of the heap (up to 2 GiB) instead of trimming it, so freed buffers are reused. The
numbers computed are unchanged; the resident set stays near its high-water mark between steps rather
than shrinking. It is applied at the start of a CPU run unless ``PREFTUNE_REUSE_FREED_MEMORY=0``; it
does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1      # <malloc.h>
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 2**31 - 1
SWITCH = "PREFTUNE_REUSE_FREED_MEMORY"


def reuse_freed_memory() -> bool:
    """Set glibc's allocator to serve large blocks from its heap and keep freed memory; True if it was set."""
    if os.environ.get(SWITCH, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
