"""The C library, for the system calls Python's os module lacks (mount, umount2,
statx, statmount, unshare, and the new mount API by number)."""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


AT_FDCWD = -100


def statx(dirfd: int, path: bytes, flags: int, mask: int) -> bytes:
    """statx(2): the raw ``struct statx`` (256 bytes); OSError with its errno when it fails."""
    buf = ctypes.create_string_buffer(256)
    if libc().statx(dirfd, path, flags, mask, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw


def syscall(number: int, *args) -> int:
    """syscall(2) by number (one glibc may not wrap); OSError with its errno when it fails."""
    _libc = libc()
    _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret
