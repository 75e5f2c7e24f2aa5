"""Sparse image files: creating, measuring, holding and copying them, and reading
an ext4 superblock."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from csi_driver.host import loopdev
from csi_driver.host.libc import AT_FDCWD, libc, statx

log = logging.getLogger(__name__)


def create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def allocated_bytes(path: str | Path) -> int:
    """Bytes the host really spends on ``path`` (a sparse file's blocks)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def allocate(path: str | Path, ranges: list[tuple[int, int]]) -> None:
    """Give the (offset, length) ranges of a sparse file real blocks (unwritten
    extents: nothing is written, reads stay zero) so writes there need no new space.
    fallocate(2) itself: glibc's posix_fallocate would write zeros where the file
    system cannot allocate, racing a mounted image's own writes."""
    _each_range(path, ranges, 0)


def unshare(path: str | Path, ranges: list[tuple[int, int]]) -> None:
    """Give the ranges their own blocks where a reflink shares them."""
    _each_range(path, ranges, _UNSHARE_RANGE)


def _each_range(path: str | Path, ranges: list[tuple[int, int]], mode: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        for offset, length in ranges:
            length = min(length, size - offset)
            if length > 0:
                _fallocate(fd, mode, offset, length)
    finally:
        os.close(fd)


FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_UNWRITTEN, _FIEMAP_LAST, _FIEMAP_FLAG_SYNC = 0x800, 0x1, 0x1
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_UNSHARE_RANGE = 0x40  # FALLOC_FL_UNSHARE_RANGE


def release_unwritten(path: str | Path) -> int:
    """Punch out the ranges ``allocate`` held that were never written (they read as
    zeros either way, so the contents do not change); the bytes given back."""
    fd = os.open(path, os.O_RDWR)
    released = 0
    try:
        start = 0
        while True:
            count = 512
            buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, count, 0)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):  # no extent map: nothing to give back
                    return released
                raise
            mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
            last = mapped == 0
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
                )
                if flags & _FIEMAP_UNWRITTEN:
                    _fallocate(fd, _PUNCH_HOLE, logical, length)
                    released += length
                start = logical + length
                last = last or bool(flags & _FIEMAP_LAST)
            if last:
                return released
    finally:
        os.close(fd)


#: extents whose bytes are not at their physical address as they are (inline, encoded,
#: delayed, unaligned, encrypted, unknown): no proof that two files share them
_FIEMAP_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400


def data_map(path: str | Path, start: int = 0, length: int | None = None) -> list[tuple[int, int, int, bool]]:
    """Where the bytes ``[start, start+length)`` of a file are on its device: (offset in
    the range, physical address, length, unwritten) runs, clipped to the range and merged
    where contiguous; holes are left out. ``OSError`` where the file system has no
    extent map or an extent is not plain data at its address (inline, encoded, delayed)."""
    size = os.path.getsize(path)
    end = size if length is None else min(size, start + length)
    runs: list[tuple[int, int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        pos = start
        while pos < end:
            count = 256
            buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, _FIEMAP_FLAG_SYNC, 0, count, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
            if mapped == 0:
                break
            for i in range(mapped):
                logical, physical, size_, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
                )
                if flags & _FIEMAP_NOT_PLAIN:
                    raise OSError(errno.EOPNOTSUPP, f"{path}: an extent that is not plain data")
                lo, hi = max(logical, start), min(logical + size_, end)
                if lo < hi:
                    run = (lo - start, physical + lo - logical, hi - lo, bool(flags & _FIEMAP_UNWRITTEN))
                    if (
                        runs
                        and runs[-1][0] + runs[-1][2] == run[0]
                        and runs[-1][1] + runs[-1][2] == run[1]
                        and runs[-1][3] == run[3]
                    ):
                        prev = runs.pop()
                        run = (prev[0], prev[1], prev[2] + run[2], run[3])
                    runs.append(run)
                pos = max(pos, logical + size_)
                if flags & _FIEMAP_LAST:
                    pos = end
    finally:
        os.close(fd)
    return runs


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc().fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of data of the file ``fd`` below ``size``, holes left out
    (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append((start, end - start))
        pos = end
    return out


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy only the allocated extents of ``src``; return the bytes copied."""
    copied = 0
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        fd_in, fd_out = fi.fileno(), fo.fileno()
        for start, length in data_extents(fd_in, size):
            off, end = start, start + length
            while off < end:
                n = os.copy_file_range(fd_in, fd_out, min(end - off, 1 << 30), off, off)
                if n == 0:
                    break
                off += n
            copied += length
        os.fsync(fd_out)
    return copied


FICLONE = 0x40049409


def reflink(src: Path, dst: Path) -> bool:
    """Clone ``src`` into a new ``dst`` sharing its blocks (xfs, btrfs); False where the
    file system cannot. The clone is a point-in-time copy of the file."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
            os.fsync(fo.fileno())  # the clone is as durable as a copy before its row commits
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS):
                fo.close()
                os.unlink(dst)
                return False
            raise
    return True


def can_reflink(directory: Path) -> bool:
    """Whether the file system of ``directory`` clones files: one 4 KiB file cloned
    in a scratch dir made there, removed again."""
    work = Path(tempfile.mkdtemp(prefix=".reflink-probe-", dir=directory))
    try:
        (work / "a").write_bytes(b"\0" * 4096)
        return reflink(work / "a", work / "b")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ext4_superblock(image: Path) -> bytes | None:
    """The 1 KiB ext4 superblock of an image (offsets as in the kernel's struct
    ext4_super_block), or None when the image holds no ext4."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    return sb if int.from_bytes(sb[0x38:0x3A], "little") == 0xEF53 else None


def _ext4_block_size(sb: bytes) -> int:
    return 1024 << int.from_bytes(sb[0x18:0x1C], "little")


def fs_used_bytes(image: Path, fstype: str) -> int:
    """Bytes a file system image uses, read from its ext4 superblock (exact for an
    unmounted or frozen image); the allocated bytes for other file systems."""
    sb = ext4_superblock(image) if fstype == "ext4" else None
    if sb is None:
        return allocated_bytes(image)
    is64 = int.from_bytes(sb[0x60:0x64], "little") & 0x80
    blocks = int.from_bytes(sb[0x04:0x08], "little")
    free = int.from_bytes(sb[0x0C:0x10], "little")
    if is64:
        blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
        free |= int.from_bytes(sb[0x158:0x15C], "little") << 32
    return (blocks - free) * _ext4_block_size(sb)


def sector_size_of(image: Path) -> int:
    """The logical block size an image's file system can live on.

    Images made before direct I/O are honoured: an xfs made with 512-byte
    sectors cannot be mounted on a 4 KiB device.
    """
    with open(image, "rb") as f:
        head = f.read(104)
    if head[:4] == b"XFSB":
        return int.from_bytes(head[102:104], "big")
    sb = ext4_superblock(image)
    return min(loopdev.FS_SECTOR, _ext4_block_size(sb)) if sb else loopdev.FS_SECTOR


_STATX_DIOALIGN = 0x2000


def dio_alignment(path: Path) -> int | None:
    """The file offset alignment ``path``'s file system needs for direct I/O
    (statx(2) STATX_DIOALIGN); None where the kernel does not say, 0 where the
    file cannot be opened with O_DIRECT at all."""
    try:
        stx = statx(AT_FDCWD, os.fsencode(path), 0, _STATX_DIOALIGN)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    if not int.from_bytes(stx[0:4], "little") & _STATX_DIOALIGN:
        return None
    return int.from_bytes(stx[156:160], "little")  # stx_dio_offset_align


def tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy (allocated blocks; hard links once)."""
    return tree_usage(root)[0]


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes, entries) of the tree under ``root``: allocated blocks and the
    paths below it (the inodes a copy needs, at most), hard links counted once."""
    total, entries, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(dirpath, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            entries += 1
    return total, entries


def file_id(path: str | Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
