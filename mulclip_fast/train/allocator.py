"""Keep freed memory in the process on glibc, so that a CPU step does not page-fault its tensors in anew.

PyTorch's CPU allocator is ``malloc``. glibc serves a block above its mmap threshold (at most 32 MiB once
raised) with a fresh ``mmap`` and unmaps it on ``free``, and trims the heap top back to the kernel past its
trim threshold: every step of the default run then allocates its activations, tens of MiB, as new pages,
which the kernel zeroes and faults in one by one (about 30,000 minor faults a step on the tiny preset, and
the padded evaluation's 100+ MiB tensors the same). With mmap off and no trimming, freed blocks stay in the
heap and the next step reuses them: no value changes, only where the bytes live (PyTorch aligns every CPU
tensor to 64 bytes either way). The peak resident memory stays about what it was (the heap reuses its free
blocks), but the process does not hand memory back to the system until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB of free heap top before any trim


# glibc's own settings from the environment (GLIBC_TUNABLES=glibc.malloc.…, MALLOC_TRIM_THRESHOLD_, …): a user
# who set any of them chose the allocator's behaviour, which this module then leaves alone.
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming; True if done (glibc only, and only where
    the environment does not set glibc's malloc itself, else a no-op).

    glibc still falls back to mmap when the heap cannot grow, so a request is never refused for this."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
