"""What is mounted where: one reading of /proc/self/mountinfo (MountTable), or
the kernel asked path by path (LiveMounts: statx and statmount), and whether a
path is a mount point at all."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path
from typing import NamedTuple

from csi_driver.host.libc import AT_FDCWD, libc, statx

log = logging.getLogger(__name__)


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo (a tuple: hundreds are made per reading)."""

    mount_id: int
    parent_id: int
    root: str
    target: str
    options: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


class MountTable:
    """One reading of the calling process's mount table (/proc/self/mountinfo).

    Read it once per operation and ask it many questions: parsing the table is
    what made every check cost O(mounts) on a busy node. ``reads`` counts the
    readings this process made (tests hold operations to one).
    """

    reads = 0

    def __init__(self, entries: list[MountEntry]) -> None:
        self.entries = entries
        self._by_target: dict[str, MountEntry] = {}
        for entry in entries:  # the last one at a target is on top
            self._by_target[entry.target] = entry

    @classmethod
    def read(cls) -> MountTable:
        cls.reads += 1
        return cls([_entry(line) for line in _mountinfo().split("\n") if line])

    def at(self, path: str | Path) -> MountEntry | None:
        """The topmost mount whose target is exactly ``path``."""
        return self._by_target.get(os.path.realpath(path))

    def is_mounted(self, path: str | Path) -> bool:
        return self.at(path) is not None

    def under(self, root: str | Path) -> list[MountEntry]:
        """Mounts at or below ``root``, deepest first (the order to unmount them)."""
        base = os.path.realpath(root)
        found = [m for m in self.entries if m.target == base or m.target.startswith(base + "/")]
        return sorted(found, key=lambda m: m.target.count("/"), reverse=True)

    def sources(self) -> set[str]:
        return {m.source for m in self.entries}


def _mountinfo() -> str:
    # split on "\n" only: a mount path may hold a carriage return, which must not split its line
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _entry(line: str) -> MountEntry:
    left, _, right = line.partition(" - ")
    a = left.split(" ", 6)
    b = right.split(" ", 2)
    return MountEntry(
        int(a[0]),
        int(a[1]),
        _unescape(a[3]),
        _unescape(a[4]),
        a[5],
        b[0],
        _unescape(b[1]),
        b[2] if len(b) > 2 else "",
    )


_NR_STATMOUNT = 457  # x86_64, arm64 and most others (Linux 6.8)
_STATX_MNT_ID_UNIQUE = 0x4000
_STATMOUNT_SB_BASIC = 0x1
_STATMOUNT_MNT_BASIC = 0x2
_STATMOUNT_MNT_ROOT = 0x8
_STATMOUNT_MNT_POINT = 0x10
_STATMOUNT_FS_TYPE = 0x20
_STATMOUNT_MNT_OPTS = 0x80  # Linux 6.11
_STATMOUNT_SB_SOURCE = 0x200
_STATMOUNT_STR = 512  # strings follow the fixed part of struct statmount
_MOUNT_ATTRS = ((0x1, "ro"), (0x2, "nosuid"), (0x4, "nodev"), (0x8, "noexec"))


class LiveMounts:
    """The mount table asked one path at a time, each answer from the kernel in
    O(1): statx(2) names the mount at a path, statmount(2) describes it (Linux
    6.11). A busy node's table has thousands of lines, and reading it costs
    milliseconds; this costs microseconds. ``entries`` and ``under`` read the
    whole table (once) when asked."""

    def __init__(self) -> None:
        self._table: MountTable | None = None

    @staticmethod
    def supported() -> bool:
        return _statmount_at("/") is not None

    def at(self, path: str | Path) -> MountEntry | None:
        """The topmost mount whose target is exactly ``path``."""
        given = os.path.normpath(path)
        try:
            if not is_mount_point(given):  # statx follows no symlink in the last component
                real = os.path.realpath(given)
                if real == given or not is_mount_point(real):
                    return None
                given = real
            entry = _statmount_at(given)
            if entry is not None and entry.target != given:  # reached through a symlink
                real = os.path.realpath(given)
                return entry if entry.target == real else None
        except OSError:  # a symlink changing while realpath read it (EINVAL): nothing we mounted
            return None
        return entry

    def is_mounted(self, path: str | Path) -> bool:
        return self.at(path) is not None

    @property
    def entries(self) -> list[MountEntry]:
        if self._table is None:
            self._table = MountTable.read()
        return self._table.entries

    def under(self, root: str | Path) -> list[MountEntry]:
        if self._table is None:
            self._table = MountTable.read()
        return self._table.under(root)

    def sources(self) -> set[str]:
        return {m.source for m in self.entries}


def mount_of_fd(fd: int) -> MountEntry | None:
    """The mount that the file ``fd`` holds lies on (statmount(2)); None where the
    kernel cannot say."""
    return _statmount_at("", fd, _AT_EMPTY_PATH)


_AT_EMPTY_PATH = 0x1000


def _statmount_at(path: str, dirfd: int = AT_FDCWD, flags: int = 0) -> MountEntry | None:
    """The mount that ``path`` lies on, described by statmount(2); None where the
    kernel cannot (older than 6.11)."""
    _libc = libc()
    try:
        stx = statx(dirfd, os.fsencode(path), _AT_SYMLINK_NOFOLLOW | flags, _STATX_MNT_ID_UNIQUE)
    except OSError:
        return None
    if not int.from_bytes(stx[0:4], "little") & _STATX_MNT_ID_UNIQUE:
        return None
    mnt_id = int.from_bytes(stx[144:152], "little")
    mask = (
        _STATMOUNT_SB_BASIC | _STATMOUNT_MNT_BASIC | _STATMOUNT_MNT_ROOT | _STATMOUNT_MNT_POINT
        | _STATMOUNT_FS_TYPE | _STATMOUNT_MNT_OPTS | _STATMOUNT_SB_SOURCE
    )  # fmt: skip
    req = ctypes.create_string_buffer(
        (24).to_bytes(4, "little") + bytes(4) + mnt_id.to_bytes(8, "little") + mask.to_bytes(8, "little"), 24
    )
    size = 16384
    while True:
        buf = ctypes.create_string_buffer(size)
        if _libc.syscall(_NR_STATMOUNT, req, buf, ctypes.c_size_t(size), 0) == 0:
            break
        if ctypes.get_errno() != errno.EOVERFLOW or size > 1 << 22:
            return None
        size *= 4
    raw = buf.raw
    got = int.from_bytes(raw[8:16], "little")
    need = _STATMOUNT_MNT_POINT | _STATMOUNT_FS_TYPE | _STATMOUNT_MNT_OPTS | _STATMOUNT_MNT_BASIC
    if got & need != need:
        return None

    def text(offset_at: int, flag: int) -> str:
        if not got & flag:
            return ""
        start = _STATMOUNT_STR + int.from_bytes(raw[offset_at : offset_at + 4], "little")
        return raw[start : raw.index(b"\0", start)].decode("utf-8", "surrogateescape")

    attr = int.from_bytes(raw[64:72], "little")
    atime = {0x0: "relatime", 0x10: "noatime", 0x20: "strictatime"}.get(attr & 0x70, "")
    flags = [name for bit, name in _MOUNT_ATTRS[1:4] if attr & bit]
    options = ",".join(["ro" if attr & 0x1 else "rw", *flags, *([atime] if atime else [])])
    sb_ro = int.from_bytes(raw[32:36], "little") & 0x1
    opts = text(4, _STATMOUNT_MNT_OPTS)
    return MountEntry(
        int.from_bytes(raw[56:60], "little"),
        int.from_bytes(raw[60:64], "little"),
        text(104, _STATMOUNT_MNT_ROOT),
        text(108, _STATMOUNT_MNT_POINT),
        options,
        text(36, _STATMOUNT_FS_TYPE),
        text(124, _STATMOUNT_SB_SOURCE),
        ("ro" if sb_ro else "rw") + ("," + opts if opts else ""),
    )


def mount_view() -> MountTable | LiveMounts:
    """What a node call asks about mounts: the live kernel where it can answer path
    by path, else one reading of the table."""
    global _live
    if _live is None:
        _live = LiveMounts.supported()
    return LiveMounts() if _live else MountTable.read()


_live: bool | None = None

#: what node calls ask about mounts: at(path), is_mounted(path), entries, under(root)
Mounts = MountTable | LiveMounts


def mounts() -> list[MountEntry]:
    """The calling process's mount table, read now."""
    return MountTable.read().entries


def mount_at(path: str | Path) -> MountEntry | None:
    """The topmost mount whose target is exactly ``path`` (reads the whole table:
    prefer one ``MountTable`` per operation)."""
    return MountTable.read().at(path)


def is_mounted(path: str | Path) -> bool:
    return mount_at(path) is not None


_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_TYPE = 0x1
_STATX_ATTR_MOUNT_ROOT = 0x2000


def is_mount_point(path: str | Path) -> bool:
    """Whether something is mounted at ``path`` (binds too), without reading the
    mount table: statx(2) says whether a path is the root of a mount (Linux 5.8)."""
    try:
        stx = statx(AT_FDCWD, os.fsencode(str(path)), _AT_SYMLINK_NOFOLLOW, _STATX_TYPE)
    except OSError:
        return False  # gone, or not reachable: nothing we mounted is there
    attributes = int.from_bytes(stx[8:16], "little")
    known = int.from_bytes(stx[56:64], "little")
    if known & _STATX_ATTR_MOUNT_ROOT:
        return bool(attributes & _STATX_ATTR_MOUNT_ROOT)
    try:  # an older kernel: a mount of another file system changes the device
        return os.lstat(path).st_dev != os.lstat(os.path.join(path, "..")).st_dev
    except OSError:
        return False


def mounts_under(root: str | Path) -> list[MountEntry]:
    """Mounts at or below ``root``, deepest first (the order to unmount them)."""
    return MountTable.read().under(root)


def device_of(target: str | Path) -> str | None:
    entry = mount_at(target)
    return entry.source if entry else None
