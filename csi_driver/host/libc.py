"""The C library, for the system calls Python's os module lacks (mount, umount2,
statx, statmount, unshare)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
