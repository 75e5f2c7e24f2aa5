"""Image files on xfs opened "invisibly": writes through the descriptor leave
the file's mtime and ctime alone.

Why: a loop device turns each cache flush of the file system inside an image
(every fsync in a volume) into an fsync of the image file. On xfs that fsync
forces the log whenever the image's inode changed, and an image written through
a loop device changes at every write, if only its mtime. With the state dir on a
pool (xfs on a loop device over a file of the host), each log force is a write
with a cache flush before and after it, so every fsync in a volume cost two
flushes of the host file instead of one. Opened by handle, the descriptor has
FMODE_NOCMTIME (xfs's "invisible I/O", made for backup and HSM tools): an
overwrite in a volume no longer dirties the image's inode, and its fsync is one
cache flush. Nobody reads an image's mtime; the data itself is as durable as
before (allocations still commit through the log).

Needs CAP_SYS_ADMIN, as the driver has; where the call is refused (another file
system, no privilege) the caller opens the file the usual way.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

XFS_SUPER_MAGIC = 0x58465342


class _HandleRequest(ctypes.Structure):
    """struct xfs_fsop_handlereq (xfs_fs.h)."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("path", ctypes.c_void_p),
        ("oflags", ctypes.c_uint32),
        ("ihandle", ctypes.c_void_p),
        ("ihandlen", ctypes.c_uint32),
        ("ohandle", ctypes.c_void_p),
        ("ohandlen", ctypes.c_void_p),
    ]


def _iowr(nr: int) -> int:
    return (3 << 30) | (ctypes.sizeof(_HandleRequest) << 16) | (ord("X") << 8) | nr


XFS_IOC_PATH_TO_HANDLE = _iowr(105)
XFS_IOC_OPEN_BY_HANDLE = _iowr(107)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def on_xfs(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type & 0xFFFFFFFF == XFS_SUPER_MAGIC


def open_invisible(path: Path, flags: int) -> int:
    """Open ``path`` (a regular file on xfs) by its handle: a descriptor whose
    writes do not update mtime or ctime. OSError where xfs refuses it."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        name = ctypes.create_string_buffer(os.fsencode(path))
        handle = ctypes.create_string_buffer(128)
        length = ctypes.c_uint32(len(handle))
        find = _HandleRequest(
            path=ctypes.addressof(name), ohandle=ctypes.addressof(handle), ohandlen=ctypes.addressof(length)
        )
        fcntl.ioctl(directory, XFS_IOC_PATH_TO_HANDLE, find)
        # O_CLOEXEC is not an open flag xfs passes on: set it after
        request = _HandleRequest(
            oflags=flags & ~os.O_CLOEXEC, ihandle=ctypes.addressof(handle), ihandlen=length.value
        )
        fd = fcntl.ioctl(directory, XFS_IOC_OPEN_BY_HANDLE, request)
    finally:
        os.close(directory)
    os.set_inheritable(fd, False)
    return fd


def open_image(path: Path, flags: int) -> int:
    """An image file for a loop device: invisibly on xfs, else the usual way."""
    if on_xfs(path.parent):
        try:
            return open_invisible(path, flags)
        except OSError:
            pass  # no CAP_SYS_ADMIN, or an xfs without handles: mtime updates are only slower
    return os.open(path, flags)
