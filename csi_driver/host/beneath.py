"""Node paths opened beneath a root, and acted on by the file descriptor that was
checked, never by the path string again (kubelet's subPath hardening does the same).

A node path is checked as a string (``service.validate``); whoever can write in a
parent dir (a pod's own volume dir, a hostPath) can swap a component for a symlink or
another dir, or rename the dir itself elsewhere, between that check and the mount,
the bind, the chown or the delete. So each of those here:

- resolves the path with openat2(2) RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS from a root fd: the kubelet dir's ``pods/`` or ``plugins/``
  when ``--kubelet-dir`` is set (``confine``), else ``/`` (symlinks refused still);
- mounts a new file system with the new mount API (``host.fsmount``: fsopen(2),
  fsconfig(2), fsmount(2) make it detached) and a bind with open_tree(2), then
  move_mount(2) onto the O_PATH fd it opened: the very inode, wherever it was
  renamed since; then opens the path beneath its root again, and unless it shows
  that very mount (statx(2) mount ids) detaches the mount and refuses (``attach``).
  So a dir renamed into another pod's dir meanwhile keeps no mount;
- unmounts, removes and creates by name in the parent fd it opened, never following
  the last component;
- changes a mount's flags with mount_setattr(2) on the fd, and a dir's owner and mode
  with fchown/fchmod on the fd.

A swap refused here is ELOOP (a symlink), EXDEV (out of the root) or ENOTDIR/ENOENT;
the caller sees ``PathRaced``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import threading
from collections.abc import Iterator

from csi_driver.errors import FailedPrecondition
from csi_driver.host import fsmount, mountopts
from csi_driver.host.libc import libc, statx, syscall

# syscall numbers: the same on x86_64 and aarch64 (the unified table from 424 on)
_SYSCALLS = {"openat2": 437, "mount_setattr": 442}
if platform.machine() not in ("x86_64", "aarch64", "arm64"):  # pragma: no cover
    raise ImportError(f"csi_driver.host.beneath: syscall numbers unknown for {platform.machine()}")

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
AT_EMPTY_PATH = 0x1000
UMOUNT_NOFOLLOW = 0x8
MNT_DETACH = 0x2


class PathRaced(FailedPrecondition):
    """A node path changed under the driver (a symlink, a way out of its root, or a
    dir renamed away)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall(name: str, *args) -> int:
    return syscall(_SYSCALLS[name], *args)


def openat2(dirfd: int, path: str, flags: int, resolve: int = RESOLVE, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _syscall(
        "openat2",
        ctypes.c_int(dirfd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )


# ---- roots -------------------------------------------------------------------

_roots: list[str] = []
_roots_guard = threading.Lock()
KUBELET_SUBDIRS = ("pods", "plugins")


def confine(kubelet_dir: str) -> None:
    """Node paths under ``kubelet_dir`` resolve beneath its pods/ or plugins/ from now
    on (the two dirs kubelet names node paths in; the driver's chart mounts only them)."""
    if not kubelet_dir:
        return
    base = os.path.realpath(kubelet_dir)
    with _roots_guard:
        for sub in KUBELET_SUBDIRS:
            root = os.path.join(base, sub)
            if root not in _roots:
                _roots.append(root)
        _roots.sort(key=len, reverse=True)


def add_root(path: str) -> None:
    """A dir of the driver's own (its state dir: an inline volume's private staging
    path) as a root: paths under it resolve beneath it, whatever symlinks lead to it."""
    with _roots_guard:
        for root in {os.path.realpath(path), os.path.normpath(os.path.abspath(path))}:
            if root not in _roots:
                _roots.append(root)
        _roots.sort(key=len, reverse=True)


def root_of(path: str) -> tuple[str, str]:
    """The root ``path`` resolves beneath and the path relative to it."""
    norm = os.path.normpath(path)
    with _roots_guard:
        roots = list(_roots)
    for root in roots:
        if norm.startswith(root + "/"):
            return root, norm[len(root) + 1 :]
    return "/", norm.lstrip("/")


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _raced(path: str, e: OSError, vanished_is_race: bool = False) -> OSError | PathRaced:
    if e.errno in (errno.ELOOP, errno.EXDEV, errno.EAGAIN, errno.ENOTDIR):
        return PathRaced(
            f"{path} is not a path of plain dirs beneath {root_of(path)[0]} "
            "(a symlink, a file, or a way out of it); refused"
        )
    if vanished_is_race and e.errno == errno.ENOENT:
        return _vanished(path)
    return e


def _vanished(path: str) -> PathRaced:
    return PathRaced(f"{path} was renamed or removed while the driver used it; refused")


def open_beneath(root_fd: int, relpath: str, flags: int) -> int:
    """openat2 ``relpath`` beneath ``root_fd``, no symlink nor magic link followed."""
    return openat2(root_fd, relpath or ".", flags, RESOLVE)


@contextlib.contextmanager
def opened(path: str, flags: int = os.O_PATH, vanished_is_race: bool = False) -> Iterator[int]:
    """``path`` opened beneath its root (``root_of``); with ``vanished_is_race`` (a
    path the caller checked or made just before) a path gone is PathRaced too."""
    root, rel = root_of(path)
    try:
        with _fd(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as rfd:
            fd = open_beneath(rfd, rel, flags)
    except OSError as e:
        raise _raced(path, e, vanished_is_race) from e
    with _fd(fd):
        yield fd


@contextlib.contextmanager
def parent_of(path: str) -> Iterator[tuple[int, str]]:
    """The parent dir of ``path`` opened beneath its root, and the last component."""
    parent, name = os.path.split(os.path.normpath(path))
    if not name or name in (".", ".."):
        raise PathRaced(f"{path} has no last component")
    with opened(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
        yield pfd, name


def fd_path(fd: int) -> str:
    """The path (a magic link) to the very inode ``fd`` holds."""
    return f"/proc/self/fd/{fd}"


def mkdir_beneath(path: str, mode: int = 0o755) -> None:
    """``mkdir -p`` beneath the root: each component made with mkdirat in its parent's
    fd and re-opened as a dir, none followed if a symlink; one renamed away between the
    two is PathRaced."""
    root, rel = root_of(path)
    parts = [p for p in rel.split("/") if p]
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, mode, dir_fd=fd)
                    nxt = open_beneath(fd, part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                except FileNotFoundError as e:
                    raise _vanished(path) from e
                os.close(fd)
                fd = nxt
            if not stat.S_ISDIR(os.fstat(fd).st_mode):  # pragma: no cover (O_DIRECTORY says so)
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        finally:
            os.close(fd)
    except OSError as e:
        raise _raced(path, e) from e


def _not_mounted(pfd: int, name: str, path: str) -> None:
    """EBUSY if ``name`` in the dir ``pfd`` is a mount point: still mounted, so a
    check of the path before said otherwise (it changed under it)."""
    try:
        stx = statx(pfd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW, _STATX_TYPE)
    except OSError:
        return
    if int.from_bytes(stx[8:16], "little") & _STATX_ATTR_MOUNT_ROOT:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)


def rmdir_beneath(path: str) -> bool:
    """Remove the empty dir ``path`` by name in its parent's fd, if it is a dir (not a
    symlink); whether it was removed."""
    with parent_of(path) as (pfd, name):
        _not_mounted(pfd, name, path)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            return False
        os.rmdir(name, dir_fd=pfd)
        return True


def unlink_empty_file_beneath(path: str) -> bool:
    """Remove ``path`` by name in its parent's fd if it is an empty regular file."""
    with parent_of(path) as (pfd, name):
        _not_mounted(pfd, name, path)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            return False
        os.unlink(name, dir_fd=pfd)
        return True


def create_empty_file_beneath(path: str, mode: int = 0o600) -> None:
    """Create ``path`` as an empty file, by name in its parent's fd, unless it exists."""
    with parent_of(path) as (pfd, name):
        try:
            os.close(
                os.open(
                    name,
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=pfd,
                )
            )
        except FileExistsError:
            pass


def umount_beneath(path: str, lazy: bool = False) -> bool:
    """umount2(2) of the mount at ``path``, named through its parent's fd, the last
    component not followed; False when nothing is mounted there."""
    try:
        with parent_of(path) as (pfd, name):
            target = os.fsencode(f"{fd_path(pfd)}/{name}")
            if libc().umount2(target, UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)) == 0:
                return True
            err = ctypes.get_errno()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PathRaced as e:
        if isinstance(e.__cause__, NotADirectoryError):  # a file where a dir was: nothing mounted
            return False
        raise
    if err in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
        return False
    raise OSError(err, os.strerror(err), path)


def set_mount_attrs(fd: int, options: list[str]) -> None:
    """Change one mount's per-mount flags (ro or rw, nosuid, nodev, noexec, atime) on
    the fd of its root with mount_setattr(2); the rest of ``options`` (sync, dirsync,
    lazytime: the file system's, not the mount's) are left as they are."""
    opts = mountopts.parse(options)
    attr = _MountAttr(opts.attr_set, opts.attr_clr, 0, 0)
    _syscall(
        "mount_setattr",
        ctypes.c_int(fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )


_STATX_TYPE = 0x1
_STATX_ATTR_MOUNT_ROOT = 0x2000
_AT_SYMLINK_NOFOLLOW = 0x100


def is_mount_root(fd: int) -> bool:
    """Whether the file ``fd`` holds is the root of a mount (statx(2))."""
    try:
        stx = statx(fd, b"", AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, _STATX_TYPE)
    except OSError:
        return False
    return bool(int.from_bytes(stx[8:16], "little") & _STATX_ATTR_MOUNT_ROOT)


_SYSCALLS.update(open_tree=428, move_mount=429)
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
_STATX_MNT_ID = 0x1000


def mount_id(fd: int) -> int:
    """The id of the mount the file ``fd`` holds lies on (statx(2) STATX_MNT_ID)."""
    stx = statx(fd, b"", AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, _STATX_MNT_ID)
    return int.from_bytes(stx[144:152], "little")


def bind_fd(source_fd: int, target_fd: int, target: str) -> None:
    """Bind what ``source_fd`` holds onto what ``target_fd`` holds (open_tree(2)
    OPEN_TREE_CLONE, then ``attach``)."""
    tree = _syscall(
        "open_tree",
        ctypes.c_int(source_fd),
        b"",
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH),
    )
    try:
        attach(tree, target_fd, target, "bind")
    finally:
        os.close(tree)


def mount_fd(fstype: str, source: str, options: list[str], target_fd: int, target: str) -> None:
    """Mount a new ``fstype`` file system onto what ``target_fd`` holds: made detached
    (``host.fsmount``: fsopen, fsconfig, fsmount), then ``attach``. Relative paths in
    ``options`` resolve against the calling thread's working directory."""
    mnt = fsmount.new_mount(fstype, source, options)
    try:
        attach(mnt, target_fd, target, "mount")
    finally:
        os.close(mnt)


def attach(mnt: int, target_fd: int, target: str, kind: str = "mount") -> None:
    """move_mount(2) the detached mount ``mnt`` onto what ``target_fd`` holds (the
    very dir or file opened, wherever it was renamed since), then check that
    ``target``, opened beneath its root again, shows that very mount: one renamed
    away meanwhile (into another pod's dir, say) is detached again and PathRaced
    raised, so a mount stays only where it was asked for."""
    _syscall(
        "move_mount",
        ctypes.c_int(mnt),
        b"",
        ctypes.c_int(target_fd),
        b"",
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    try:
        with opened(target, os.O_PATH | os.O_NOFOLLOW) as now:
            there = mount_id(now) == mount_id(mnt)
    except (PathRaced, OSError):  # a symlink, a file, or nothing at all there now
        there = False
    if not there:
        if libc().umount2(os.fsencode(fd_path(mnt)), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{os.strerror(err)}: undoing a mount on {target}, renamed meanwhile")
        done = {"bind": "bound", "mount": "mounted"}[kind]
        raise PathRaced(f"{target} changed while it was {done}; the {kind} is undone")
