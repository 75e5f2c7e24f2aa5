"""Loop devices set up with one LOOP_CONFIGURE ioctl, in direct-I/O mode.

Why not ``mount -o loop`` or ``losetup``: both attach in buffered mode, so every
page a volume caches lives twice in memory (once in the volume's file system,
once as a page of the image file) and a write is copied through the host's page
cache. In direct-I/O mode the loop driver reads and writes the image file with
O_DIRECT: one cache, and the disk's own speed. ``mount -o loop`` cannot ask for
it, and ``losetup`` cannot set autoclear, which frees a mount's device when the
mount goes (what ``mount -o loop`` does). One ioctl does all of it atomically.

Direct I/O needs a backing file system that can do O_DIRECT at the loop's
logical block size; where it cannot, the kernel sets the device up buffered
instead, which is correct, only slower: the driver logs it and ``doctor``
reports the mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from csi_driver.errors import DriverError, ResourceExhausted
from csi_driver.host import xfshandle

log = logging.getLogger(__name__)

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16

#: The logical block size of file-system images: ext4 images use 4 KiB blocks
#: and xfs images 4 KiB sectors, so the device never splits a block.
FS_SECTOR = 4096
#: Raw block volumes keep the classic 512-byte sectors a pod's tools expect.
BLOCK_SECTOR = 512


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def _configure(device_fd: int, image_fd: int, name: bytes, sector_size: int, flags: int) -> None:
    config = _LoopConfig(fd=image_fd, block_size=sector_size)
    config.info.lo_flags = flags
    config.info.lo_file_name = name[:63]
    fcntl.ioctl(device_fd, LOOP_CONFIGURE, config)


@contextlib.contextmanager
def attached(
    image: Path,
    *,
    readonly: bool = False,
    sector_size: int = FS_SECTOR,
    autoclear: bool = False,
    direct_io: bool = True,
) -> Iterator[str]:
    """Attach ``image`` to a free loop device and yield the device's path.

    The device stays open until the block ends. With ``autoclear`` the kernel
    detaches it as soon as nobody holds it: after the block if nothing mounted it,
    else when that mount goes. Without, it stays until ``detach``.
    """
    flags = (LO_FLAGS_DIRECT_IO if direct_io else 0) | (LO_FLAGS_READ_ONLY if readonly else 0)
    flags |= LO_FLAGS_AUTOCLEAR if autoclear else 0
    if readonly:
        image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    else:  # on xfs without mtime updates: an fsync in the volume is then one flush (xfshandle)
        image_fd = xfshandle.open_image(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        device, device_fd = _claim(image_fd, os.fsencode(image), sector_size, flags)
    finally:
        os.close(image_fd)
    _attachments.add(image, device)
    try:
        yield device
    finally:
        os.close(device_fd)


def _claim(image_fd: int, name: bytes, sector_size: int, flags: int) -> tuple[str, int]:
    """Configure a free device; another process may take the one we were offered."""
    for _ in range(64):
        try:
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ResourceExhausted(f"no loop devices: /dev/loop-control cannot be opened ({e})") from e
        try:
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
        except OSError as e:
            raise ResourceExhausted(f"no free loop device ({e})") from e
        finally:
            os.close(control)
        device = f"/dev/loop{number}"
        device_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            _configure(device_fd, image_fd, name, sector_size, flags)
        except OSError as e:
            os.close(device_fd)
            if e.errno == errno.EBUSY:
                continue
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                raise DriverError(
                    f"the kernel refused LOOP_CONFIGURE for {name.decode(errors='replace')} ({e}); "
                    "loop devices need Linux 5.8 or newer"
                ) from e
            raise
        if flags & LO_FLAGS_DIRECT_IO and direct_io(device) is False:
            # the kernel falls back to buffered I/O quietly where the backing file cannot do O_DIRECT
            log.warning("direct I/O refused for %s; %s runs buffered", name.decode(errors="replace"), device)
        return device, device_fd
    raise ResourceExhausted("no free loop device could be claimed (64 tries)")


def attach(
    image: Path, *, readonly: bool = False, sector_size: int = BLOCK_SECTOR, direct_io: bool = True
) -> str:
    """A loop device that stays until ``detach`` (a published block volume)."""
    with attached(image, readonly=readonly, sector_size=sector_size, direct_io=direct_io) as device:
        return device


class _Attachments:
    """Which loop devices hold which files read-write: what libmount checks before
    ``mount -o loop``. Sysfs is scanned once per process (O(loop devices)); after
    that this process knows every attachment it makes, and each cached one is
    checked against its device in O(1). Only this driver attaches its images, and
    what an earlier run left attached is in the first scan."""

    def __init__(self) -> None:
        self._by_file: dict[bytes, set[str]] = {}
        self._scanned = False
        self._guard = threading.Lock()

    def _scan(self) -> None:
        for name in os.listdir("/sys/block"):
            if name.startswith("loop"):
                try:
                    backing = _read_sys(f"/sys/block/{name}/loop/backing_file")
                except OSError:
                    continue  # not attached
                self._by_file.setdefault(backing, set()).add(name)
        self._scanned = True

    def add(self, image: Path, device: str) -> None:
        with self._guard:
            key = os.fsencode(os.path.realpath(image)) + b"\n"
            self._by_file.setdefault(key, set()).add(os.path.basename(device))

    def read_write(self, image: Path) -> str | None:
        target = os.fsencode(os.path.realpath(image)) + b"\n"
        with self._guard:
            if not self._scanned:
                self._scan()
            for name in sorted(self._by_file.get(target, ())):
                try:
                    still = _read_sys(f"/sys/block/{name}/loop/backing_file") == target
                    if still and _read_sys(f"/sys/block/{name}/ro").strip() == b"0":
                        return f"/dev/{name}"
                except OSError:
                    still = False  # detached (autoclear) since
                if not still:
                    self._by_file[target].discard(name)
        return None


_attachments = _Attachments()


def attached_read_write(image: Path) -> str | None:
    """A loop device that already has ``image`` attached read-write, if any."""
    return _attachments.read_write(image)


def _read_sys(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def direct_io(device: str) -> bool | None:
    """Whether ``device`` runs in direct-I/O mode (None: not a loop device)."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return None
