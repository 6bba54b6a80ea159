"""CPU settings for training and encoding with torch on Linux.

Neither is applied on import: the training commands (``mmformer fit|validate|test``,
:func:`mmformer.training.recipes.run_recipe`, and ``mmformer demo``) call both before any torch
work; call them yourself before CPU work that allocates large blocks every step (training,
long-document encoding).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch


def flush_denormals() -> None:
    """Flush denormal floats to zero on the CPU (``torch.set_flush_denormal``).

    The fusion's attention weights far from the needle underflow into denormals, and CPU matmuls
    over their gradients run several times slower. The setting belongs to a thread
    and is inherited by the threads it starts, so the command line sets it before any torch
    work; :meth:`mmformer.training.longdoc.LongDocModule.on_fit_start` sets it again for the
    thread that runs fit.
    """
    torch.set_flush_denormal(True)


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above 32 MB with its own ``mmap`` and unmaps it on
    free, so each training step's large activations and chunk states are fresh pages that the
    kernel must fault in and zero. Raising the mmap threshold (and the trim threshold) keeps
    them on the heap: far less system time in long-document training (see the benchmarks pages);
    the process's resident memory stays at its peak. Returns False (and changes nothing) where the C library has no
    ``mallopt`` (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_trim_threshold, 2**31 - 1))
