"""The host allocator for large models on CPU.

glibc's malloc serves blocks above a *dynamic* mmap threshold from mmap and returns them to the system on
free; but the first free of such a block raises the threshold to its size (up to 32 MiB), so from then on a
training step's large temporaries (gradients, QR workspaces, dequantized moments) are carved out of the heap,
and what they leave behind stays resident as fragmented free space. Measured on the 7b CPU step: a basis
refresh left 1.29 GiB more resident with no tensor grown (docs/benchmarks.md). A fixed threshold keeps every
block of at least that size mapped, and freed for real.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8


def compact_host_heap(mmap_threshold_bytes: int = 1 << 20, arenas: int = 2) -> bool:
    """Fix glibc's mmap threshold at `mmap_threshold_bytes` and cap its heaps at `arenas`, for this process
    (what `MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2` set at start-up). Applies to later allocations;
    call it before the model is built. Returns False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
