"""Thin wrappers around the host tools and kernel interfaces the engine needs:
mount tables, mount/umount, loop devices, mkfs, resize, freeze.

Nothing here knows about volumes or layers; every function is safe to repeat.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from csi_driver import loopdev
from csi_driver.errors import CommandFailed, FailedPrecondition

log = logging.getLogger(__name__)

_libc: ctypes.CDLL | None = None  # loaded at first use


def run(
    argv: list[str], *, cwd: str | Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a host tool; raise CommandFailed with its stderr when it fails."""
    log.debug("exec %s", " ".join(argv))
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc


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


def _escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


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
        if not is_mount_point(given):  # statx follows no symlink in the last component
            real = os.path.realpath(given)
            if real == given or not is_mount_point(real):
                return None
            given = real
        entry = _statmount_at(given)
        if entry is not None and entry.target != given:  # reached through a symlink
            real = os.path.realpath(given)
            return entry if entry.target == real else None
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


def _statmount_at(path: str) -> MountEntry | None:
    """The mount that ``path`` lies on, described by statmount(2); None where the
    kernel cannot (older than 6.11)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    stx = ctypes.create_string_buffer(256)
    if _libc.statx(-100, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _STATX_MNT_ID_UNIQUE, stx) != 0:
        return None
    if not int.from_bytes(stx.raw[0:4], "little") & _STATX_MNT_ID_UNIQUE:
        return None
    mnt_id = int.from_bytes(stx.raw[144:152], "little")
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
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _libc.statx(-100, os.fsencode(str(path)), _AT_SYMLINK_NOFOLLOW, _STATX_TYPE, buf) != 0:
        return False  # gone, or not reachable: nothing we mounted is there
    attributes = int.from_bytes(buf.raw[8:16], "little")
    known = int.from_bytes(buf.raw[56:64], "little")
    if known & _STATX_ATTR_MOUNT_ROOT:
        return bool(attributes & _STATX_ATTR_MOUNT_ROOT)
    try:  # an older kernel: a mount of another file system changes the device
        return os.lstat(path).st_dev != os.lstat(os.path.join(path, "..")).st_dev
    except OSError:
        return False


def mount(
    source: str,
    target: str | Path,
    fstype: str | None = None,
    options: list[str] | tuple[str, ...] | None = None,
    cwd: str | Path | None = None,
) -> None:
    """mount(2) a file system; relative paths in ``options`` (an overlay's layers)
    are resolved against ``cwd``. ``loop`` (a file as the source) is mount(8)'s."""
    if options and "loop" in options:
        run(["mount", "-t", fstype or "auto", "-o", ",".join(options), source, str(target)], cwd=cwd)
        return
    if cwd is None:
        mount_device(source, target, fstype or "", list(options or []))
        return
    _in_dir_mounter().submit(_chdir_and_mount, str(cwd), source, target, fstype, options).result()


_CLONE_FS = 0x200
_dir_mounter: ThreadPoolExecutor | None = None
_dir_mounter_guard = threading.Lock()


def _own_cwd() -> None:
    """In the mount thread: a working directory of its own, so that changing it
    never moves another thread's (unshare(2) of CLONE_FS)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.unshare(_CLONE_FS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_FS) failed")


def _in_dir_mounter() -> ThreadPoolExecutor:
    global _dir_mounter
    with _dir_mounter_guard:
        if _dir_mounter is None:
            _dir_mounter = ThreadPoolExecutor(1, thread_name_prefix="mount-in-dir", initializer=_own_cwd)
        return _dir_mounter


def _chdir_and_mount(
    cwd: str, source: str, target: str | Path, fstype: str | None, options: list[str] | tuple[str, ...] | None
) -> None:
    os.chdir(cwd)
    try:
        mount_device(source, target, fstype or "", list(options or []))
    finally:
        os.chdir("/")  # a working directory inside a file system keeps it busy


_MS_FLAGS = {
    "ro": 0x1,
    "nosuid": 0x2,
    "nodev": 0x4,
    "noexec": 0x8,
    "sync": 0x10,
    "dirsync": 0x80,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
    "strictatime": 0x1000000,
    "lazytime": 0x2000000,
}
_MS_BIND = 0x1000


def _mount2(source: str, target: str | Path, fstype: str | None, flags: int, data: str) -> None:
    """mount(2) itself: a few microseconds where running mount(8) takes milliseconds."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    enc = os.fsencode
    ok = _libc.mount(
        enc(source), enc(str(target)), enc(fstype) if fstype else None, ctypes.c_ulong(flags),
        enc(data) if data else None,
    )  # fmt: skip
    if ok != 0:
        err = ctypes.get_errno()
        argv = ["mount"] + (["-t", fstype] if fstype else ["--bind"]) + [source, str(target)]
        raise CommandFailed(argv, 32, f"mount {target}: {os.strerror(err)}")


def mount_device(device: str, target: str | Path, fstype: str, options: list[str]) -> None:
    """Mount a block device's file system with options such as ``ro`` or ``discard``
    (the ones mount(2) takes as flags become flags, the rest go to the file system)."""
    flags = 0
    data = []
    for opt in options:
        if opt in _MS_FLAGS:
            flags |= _MS_FLAGS[opt]
        elif opt != "rw":
            data.append(opt)
    _mount2(device, target, fstype, flags, ",".join(data))


def bind_mount(source: str | Path, target: str | Path, readonly: bool = False) -> None:
    _mount2(str(source), target, None, _MS_BIND, "")
    if readonly:
        remount_bind(target, ["ro"])


def remount(target: str | Path, options: list[str]) -> None:
    """Change a mounted file system's options (``mount -o remount,...``)."""
    run(["mount", "-o", "remount," + ",".join(options), str(target)])


def remount_bind(target: str | Path, options: list[str]) -> None:
    """Change one bind mount's per-mount flags (ro, noexec, ...)."""
    run(["mount", "-o", "remount,bind," + ",".join(options), str(target)])


_MNT_DETACH = 2


def umount(target: str | Path, lazy: bool = False) -> None:
    """Unmount every mount stacked at ``target``; no error if none is there.

    umount2(2) itself says when nothing is mounted (EINVAL) or the path is gone
    (ENOENT), so this never reads the mount table.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    path = os.fsencode(str(target))
    unmounted, busy = 0, 0
    while unmounted <= 64:  # 64 stacked mounts, then the call that finds none
        if _libc.umount2(path, _MNT_DETACH if lazy else 0) == 0:
            unmounted += 1
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            return
        if err == errno.EBUSY and busy < UMOUNT_BUSY_RETRIES:
            # a child forked by another thread holds our open files until it execs
            busy += 1
            time.sleep(0.05)
            continue
        argv = ["umount"] + (["-l"] if lazy else []) + [str(target)]
        raise CommandFailed(argv, 32, f"umount {target}: {os.strerror(err)}")
    raise CommandFailed(["umount", str(target)], 32, f"{target}: more than 64 mounts stacked")


#: EBUSY retries of an unmount, 50 ms apart: a fork in another thread (a tool run
#: for another call) keeps the files open at that instant busy until it execs
UMOUNT_BUSY_RETRIES = 10


def mounts_under(root: str | Path) -> list[MountEntry]:
    """Mounts at or below ``root``, deepest first (the order to unmount them).
    The common answer, none, comes from a text search without parsing the table."""
    base = os.path.realpath(root)
    if f" {_escape(base)}" not in _mountinfo():
        return []
    return MountTable.read().under(root)


def remove_tree(path: Path) -> None:
    """Remove a directory after unmounting whatever is mounted below it (found by
    statx on its directories, never by descending into a mount, so never by
    deleting what a mount shows)."""
    if not path.is_dir() or path.is_symlink():
        if path.exists() or path.is_symlink():
            path.unlink()
        return
    mounted = []
    for dirpath, dirnames, _ in os.walk(path):
        for name in list(dirnames):
            sub = os.path.join(dirpath, name)
            if is_mount_point(sub):
                mounted.append(sub)
                dirnames.remove(name)
    for target in sorted(mounted, key=lambda p: p.count("/"), reverse=True):
        umount(target)
    if is_mount_point(path):
        umount(path)
    shutil.rmtree(path)


# ---- sparse image files ----------------------------------------------------


def create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def allocated_bytes(path: Path) -> int:
    """Bytes the host really spends on ``path`` (a sparse file's blocks)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy only the allocated extents of ``src``; return the bytes copied."""
    copied = 0
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        fd_in, fd_out = fi.fileno(), fo.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd_in, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = os.copy_file_range(fd_in, fd_out, min(end - off, 1 << 30), off, off)
                if n == 0:
                    break
                off += n
            copied += end - start
            pos = end
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


def tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy (allocated blocks; hard links once)."""
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(dirpath, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def mkfs(image: Path, fstype: str, populate: Path | None = None, journal_mib: int = 0) -> None:
    """Make a file system in a sparse image without writing its empty tables;
    ``populate`` is a tree to copy in (ext4) or a protofile (xfs)."""
    if fstype == "ext4":
        argv = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-b",
            "4096",
            "-i",
            "16384",
            "-I",
            "256",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ]
        if populate is not None:
            argv += ["-d", str(populate)]
        if journal_mib:
            argv += ["-J", f"size={journal_mib}"]
        run(argv + [str(image)])
    elif fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-f", "-K", "-s", f"size={loopdev.FS_SECTOR}"]
        if populate is not None:  # a protofile: the directories to make, no mount needed
            argv += ["-p", str(populate)]
        run(argv + [str(image)])
    else:
        raise ValueError(f"unsupported fs type {fstype}")


def loop_devices() -> dict[str, str]:
    """Attached loop devices: device -> backing file."""
    proc = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], check=False)
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].strip()
    return out


def loop_backing_file(device: str) -> str | None:
    """The file behind one loop device, from sysfs (no losetup run); None when the
    device is not attached or is not a loop device."""
    name = os.path.basename(device)
    if not name.startswith("loop") or not name[4:].isdigit():
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def loops_under(root: str | Path) -> list[str]:
    """Loop devices whose backing file lies below ``root``."""
    base = str(root).rstrip("/") + "/"
    return [device for device, backing in loop_devices().items() if backing.startswith(base)]


def loop_backing_ids() -> dict[str, tuple[int, int, int]]:
    """Attached loop devices: device -> (major, minor, inode) of the backing file.

    Paths alone are not enough: on kind, node containers share one kernel and
    the same path strings, so only the inode proves a backing file is ours.
    """
    proc = run(
        ["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"], check=False
    )
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.replace("\\x20", "").split()
        if len(parts) == 3 and parts[1].isdigit() and ":" in parts[2]:
            major, minor = parts[2].split(":")
            out[parts[0]] = (int(major), int(minor), int(parts[1]))
    return out


def file_id(path: str | Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


def loop_attach(image: Path, readonly: bool = False) -> str:
    """A direct-I/O loop device for a raw block volume; it stays until detached."""
    return loopdev.attach(image, readonly=readonly)


def mount_image(image: Path, target: str | Path, fstype: str, options: list[str], readonly: bool) -> str:
    """Mount a file-system image through a direct-I/O loop device that goes away
    with the mount (as ``mount -o loop`` would, but without a second page cache);
    return the device."""
    if not readonly and (other := loopdev.attached_read_write(image)):
        # two writers of one file system would corrupt it (libmount refuses this too)
        raise FailedPrecondition(f"{image} is already attached read-write to {other}")
    with loopdev.attached(
        image, readonly=readonly, sector_size=sector_size_of(image), autoclear=True
    ) as device:
        mount_device(device, target, fstype, options)
    return device


def loop_detach(device: str) -> None:
    run(["losetup", "--detach", device], check=False)


def loop_refresh(device: str) -> None:
    """Tell the loop driver its backing file grew."""
    run(["losetup", "--set-capacity", device])


def device_of(target: str | Path) -> str | None:
    entry = mount_at(target)
    return entry.source if entry else None


def grow_fs(fstype: str, device: str, mountpoint: Path) -> None:
    if fstype == "xfs":
        run(["xfs_growfs", str(mountpoint)])
    else:
        run(["resize2fs", device])


FIFREEZE = 0xC0045877  # _IOWR('X', 119, int), as fsfreeze(8) uses
FITHAW = 0xC0045878


def _freeze_ioctl(mountpoint: Path, request: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze(mountpoint: Path) -> None:
    """Flush a mounted file system and block its writers until ``thaw``."""
    try:
        _freeze_ioctl(mountpoint, FIFREEZE)
    except OSError as e:
        raise CommandFailed(["fsfreeze", "--freeze", str(mountpoint)], 1, e.strerror or str(e)) from e


def thaw(mountpoint: Path) -> None:
    """Let writers go on; nothing to do (and no error) when it is not frozen.
    An ioctl, not fsfreeze(8): start-up thaws every layer mount, hundreds on a busy node."""
    try:
        _freeze_ioctl(mountpoint, FITHAW)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not frozen
            log.warning("could not thaw %s: %s", mountpoint, e)


def tune2fs_reserved(target: str | Path, percent: int) -> None:
    """Blocks of an ext4 (image or device) reserved for root, in percent."""
    run(["tune2fs", "-m", str(percent), str(target)])


def set_read_ahead(device: str, kib: int) -> None:
    run(["blockdev", "--setra", str(kib * 2), device])


def flush_buffers(device: str) -> None:
    run(["blockdev", "--flushbufs", device], check=False)


def e2fsck(image: Path, *, journal_only: bool = False) -> None:
    """Replay the journal only, or check and repair what is safe (-p), forced."""
    argv = ["e2fsck", "-p", "-E", "journal_only"] if journal_only else ["e2fsck", "-f", "-p"]
    run(argv + [str(image)], check=False)


def resize2fs(target: str | Path) -> None:
    run(["resize2fs", str(target)])


def probe_signature(device: str) -> dict[str, str]:
    """What ``blkid -p`` (low-level probing, no cache) finds on a device: TYPE,
    LABEL, PTTYPE ...; empty when it finds no signature at all."""
    proc = run(["blkid", "-p", "-o", "export", device], check=False)
    if proc.returncode == 2:  # nothing found
        return {}
    if proc.returncode != 0:
        raise CommandFailed(["blkid", "-p", device], proc.returncode, proc.stderr or proc.stdout)
    pairs = (line.partition("=") for line in proc.stdout.splitlines() if "=" in line)
    return {key: value for key, _, value in pairs}


def mkfs_pool(device: str, label: str) -> None:
    """An xfs with reflink (clones of image files) over a whole device."""
    run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-L", label, device])
