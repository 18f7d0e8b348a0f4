"""Freed CPU memory back to the system between chunks and steps.

glibc's malloc keeps the blocks PyTorch frees on the CPU and reuses them only for requests that fit, so a run
that allocates many tensor sizes grows its resident memory chunk after chunk although its live tensors do not
(a 16k-token row in 4k chunks: live tensors 0.24 GB throughout, resident memory 1.8 -> 2.8 GB). ``malloc_trim``
hands the free pages back; called between chunks and steps it costs a heap walk, far less than a chunk's compute.
No-op on other C libraries and on GPUs (whose memory PyTorch's caching allocator manages).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory(device: torch.device) -> bool:
    """Give the C library's free pages back to the system when ``device`` is the CPU; True if that was done."""
    trim = _malloc_trim() if torch.device(device).type == "cpu" else None
    if trim is None:
        return False
    trim(0)
    return True
