"""Mounting and unmounting by system call (mount(2), umount2(2), the freeze
ioctls), never by running mount(8) on the hot path. The driver's own dirs are
mounted on with mount(2); node paths, opened beneath their root, with the new mount
API onto the fd opened (``host.beneath``)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from csi_driver.errors import CommandFailed, FailedPrecondition
from csi_driver.host import beneath, loopdev, mountopts
from csi_driver.host.files import sector_size_of
from csi_driver.host.libc import libc
from csi_driver.host.mounttable import MountEntry, is_mount_point, mount_of_fd
from csi_driver.host.tools import run

log = logging.getLogger(__name__)


def mount(
    source: str,
    target: str | Path,
    fstype: str | None = None,
    options: list[str] | tuple[str, ...] | None = None,
    cwd: str | Path | None = None,
) -> None:
    """mount(2) a file system; relative paths in ``options`` (an overlay's layers)
    are resolved against ``cwd``."""
    _in_dir(cwd, mount_device, source, target, fstype or "", list(options or []))


def _in_dir(cwd: str | Path | None, fn: Callable[..., None], *args) -> None:
    """``fn(*args)`` with ``cwd`` as the working directory (in the one thread whose
    working directory is its own), or here when ``cwd`` is None."""
    if cwd is None:
        fn(*args)
        return
    _in_dir_mounter().submit(_chdir_and_call, str(cwd), fn, *args).result()


_CLONE_FS = 0x200
_dir_mounter: ThreadPoolExecutor | None = None
_dir_mounter_guard = threading.Lock()


def _own_cwd() -> None:
    """In the mount thread: a working directory of its own, so that changing it
    never moves another thread's (unshare(2) of CLONE_FS)."""
    _libc = libc()
    if _libc.unshare(_CLONE_FS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_FS) failed")


def _in_dir_mounter() -> ThreadPoolExecutor:
    global _dir_mounter
    with _dir_mounter_guard:
        if _dir_mounter is None:
            _dir_mounter = ThreadPoolExecutor(1, thread_name_prefix="mount-in-dir", initializer=_own_cwd)
        return _dir_mounter


def _chdir_and_call(cwd: str, fn: Callable[..., None], *args) -> None:
    os.chdir(cwd)
    try:
        fn(*args)
    finally:
        os.chdir("/")  # a working directory inside a file system keeps it busy


_MS_BIND = 0x1000


def _mount2(source: str, target: str | Path, fstype: str | None, flags: int, data: str) -> None:
    """mount(2) itself: a few microseconds where running mount(8) takes milliseconds."""
    _libc = libc()
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
    opts = mountopts.parse(options)
    _mount2(device, target, fstype, opts.ms_flags, opts.data)


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
    _libc = libc()
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


# ---- node paths: by the fd that was checked (host.beneath) ---------------------


def mount_beneath(
    source: str,
    target: str | Path,
    fstype: str | None = None,
    options: list[str] | tuple[str, ...] | None = None,
    cwd: str | Path | None = None,
) -> None:
    """``mount`` onto the dir ``target`` opened beneath its root, with the new mount
    API: made detached, moved onto the fd opened, and undone (PathRaced) unless
    ``target`` opened again shows it (``beneath.mount_fd``)."""
    with beneath.opened(str(target), os.O_PATH | os.O_DIRECTORY, vanished_is_race=True) as fd:
        try:
            _in_dir(cwd, beneath.mount_fd, fstype or "", source, list(options or []), fd, str(target))
        except OSError as e:
            argv = ["mount", "-t", fstype or "", source, str(target)]
            raise CommandFailed(argv, 32, f"mount {target}: {e.strerror}") from e


def bind_beneath(
    source: str | Path,
    target: str | Path,
    source_ok: Callable[[MountEntry | None], bool] | None = None,
    target_dir: bool = True,
    trusted_source: bool = False,
) -> None:
    """Bind ``source`` onto ``target``, each opened beneath its root (a device, or a
    ``trusted_source`` of the driver's own, is taken as named); ``source_ok`` judges the
    mount the opened source lies on, so a staging path swapped after the check binds
    nothing."""
    src = str(source)
    with contextlib.ExitStack() as stack:
        if trusted_source:
            sfd = stack.enter_context(_closing(os.open(src, os.O_PATH | os.O_CLOEXEC)))
        else:
            sfd = stack.enter_context(beneath.opened(src, os.O_PATH | os.O_DIRECTORY, vanished_is_race=True))
            if source_ok is not None and not source_ok(mount_of_fd(sfd)):
                raise beneath.PathRaced(f"{src} is not the mount it was checked to be; refused")
        tflags = os.O_PATH | (os.O_DIRECTORY if target_dir else os.O_NOFOLLOW)
        tfd = stack.enter_context(beneath.opened(str(target), tflags, vanished_is_race=True))
        if not target_dir:
            st = os.fstat(tfd)
            if not stat.S_ISREG(st.st_mode) or st.st_size:
                raise beneath.PathRaced(f"{target} is not an empty file; refused")
        try:
            beneath.bind_fd(sfd, tfd, str(target))
        except beneath.PathRaced:
            raise
        except OSError as e:
            argv = ["mount", "--bind", src, str(target)]
            raise CommandFailed(argv, 32, f"mount {target}: {e.strerror}") from e


@contextlib.contextmanager
def _closing(fd: int):
    try:
        yield fd
    finally:
        os.close(fd)


def remount_bind_beneath(target: str | Path, options: list[str]) -> None:
    """Change the per-mount flags of the mount at ``target`` (its root opened beneath
    its root) with mount_setattr(2)."""
    with beneath.opened(str(target), os.O_PATH) as fd:
        try:
            beneath.set_mount_attrs(fd, options)
        except OSError as e:
            raise CommandFailed(["mount_setattr", str(target)], 32, f"{target}: {e.strerror}") from e


def umount_beneath(target: str | Path) -> None:
    """``umount`` of every mount stacked at ``target``, named through its parent's fd
    opened beneath its root, the last component never followed."""
    unmounted, busy = 0, 0
    while unmounted <= 64:
        try:
            if not beneath.umount_beneath(str(target)):
                return
            unmounted += 1
        except beneath.PathRaced:
            raise
        except OSError as e:
            if e.errno == errno.EBUSY and busy < UMOUNT_BUSY_RETRIES:
                busy += 1
                time.sleep(0.05)
                continue
            raise CommandFailed(["umount", str(target)], 32, f"umount {target}: {e.strerror}") from e
    raise CommandFailed(["umount", str(target)], 32, f"{target}: more than 64 mounts stacked")
