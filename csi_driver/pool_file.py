"""A pool file (``serve --pool-file PATH``): the pool of ``--pool-device`` on a
node with no spare disk.

A sparse file on the host's file system, attached to a direct-I/O loop device,
formatted xfs with reflink and mounted as the state dir, so a snapshot of a
volume in use is a clone of its image, not a copy (docs/operations.md).

Its sectors are the smallest the host's file system takes direct I/O at, 512
bytes on most: a raw block volume has 512-byte sectors, and its loop device can
run direct I/O on the pool only where the pool's xfs has sectors that small
(else the kernel runs it buffered, its pages cached twice). A pool keeps the
sector size it was made with (the xfs superblock says which).

Life cycle, each start: a file that does not exist is created (sparse, of the
host file system's size unless told), attached, formatted and mounted; one that
holds our pool is attached (after a reboot) and mounted, or found mounted (a
restart of the driver); anything else is refused and never written. Nothing is
detached at stop: the mount stays while the driver is down, as for a pool device,
and the loop device goes with the mount (autoclear).

A state dir that is already a file system of its own, or that holds today's
plain layout (a store on the host's file system), is served as it is: moving
volumes into a pool is the operator's step (the log says how).

The file is thin and grows inside the host's file system, so what volumes may
be given is also bounded by the host's free space less a margin (``HostBoundSpace``):
the pool can never take the node below kubelet's eviction threshold.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from csi_driver import host, pool
from csi_driver.engine.capacity import Share
from csi_driver.host import loopdev
from csi_driver.pool import LABEL, PoolError
from csi_driver.statedir import StateDir

log = logging.getLogger(__name__)

#: xfs refuses file systems smaller than 300 MiB
MIN_SIZE = 300 << 20
#: the host's free space never given to volumes: kubelet's default hard eviction
#: threshold, nodefs.available<10%
DEFAULT_HOST_RESERVE = Share(percent=10.0)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` found and did."""

    done: str  # "created", "mounted", "already mounted", or "not used"
    pooled: bool  # whether the state dir is the pool file's file system now
    why: str = ""  # "not used": why the state dir is served as it is


def assess(path: Path, state_dir: Path) -> tuple[str, str]:
    """What the pool file is to the driver, and the loop device holding it:
    "mounted" (it is the state dir), "attached" (a loop device holds it, nothing
    mounts it), "ours" (our pool, not attached), "new" (absent or never written),
    or "foreign". Raise PoolError for what can never be used."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "new", ""
    except OSError as e:
        raise PoolError(f"pool file {path}: {e.strerror}") from e
    if not os.path.isfile(path):
        raise PoolError(f"pool file {path} is not a regular file")
    device = _attached(st)
    table = host.MountTable.read()
    here = table.at(state_dir)
    if device:
        if here is not None and _same(here.source, device):
            return "mounted", device
        elsewhere = [m.target for m in table.entries if _same(m.source, device)]
        if elsewhere:
            raise PoolError(
                f"pool file {path} ({device}) is mounted at {elsewhere[0]}; refusing to use it twice"
            )
        found = host.probe_signature(device)
    else:
        found = host.probe_signature(str(path))
    if _ours(found):
        return ("attached" if device else "ours"), device
    if not found and host.allocated_bytes(path) == 0:
        return "new", device  # made by a start that stopped before mkfs
    return "foreign", pool.describe(found) if found else "data"


def prepare(path: Path, state_dir: Path, size: int = 0) -> Prepared:
    """Make the pool file at ``path`` the file system of ``state_dir`` (``size``:
    of a new file; 0: the host file system's size)."""
    path = Path(os.path.abspath(path))
    state_dir = Path(os.path.abspath(state_dir))
    if path.is_relative_to(state_dir):
        raise PoolError(f"pool file {path} lies under the state dir {state_dir}, which it is mounted on")
    kind, device = assess(path, state_dir)
    if kind == "mounted":
        return Prepared("already mounted", True)
    if kind == "foreign":
        raise PoolError(
            f"pool file {path} holds {device}, not an overlay-csi pool; refusing to use it. "
            "Name another path, or remove the file if it is meant to be a new pool"
        )
    why = served_as_it_is(state_dir)
    if why:
        log.warning("pool file %s not used: %s", path, why)
        return Prepared("not used", False, why)
    state_dir.mkdir(parents=True, exist_ok=True)
    if kind == "attached":
        _mount(device, state_dir)
        return Prepared("mounted", True)
    if kind == "new":
        size = size or _host_size(path.parent)
        _create(path, size)
    sector = new_pool_sector(path) if kind == "new" else host.sector_size_of(path)
    with loopdev.attached(path, sector_size=sector, autoclear=True) as device:
        if kind == "new":
            host.mkfs_pool(device, LABEL, [*pool.MKFS_OPTIONS, "-s", f"size={sector}"])
        _mount(device, state_dir)
    done = "created" if kind == "new" else "mounted"
    log.info("pool file %s %s at %s", path, done, state_dir)
    return Prepared(done, True)


def new_pool_sector(path: Path) -> int:
    """The sector size for a new pool in the file ``path``: the host file system's
    direct-I/O alignment, at least 512 bytes; 4 KiB where it says none or more
    than a loop device may have (the device then runs buffered)."""
    try:
        align = host.dio_alignment(path)
    except OSError as e:
        raise PoolError(f"pool file {path}: {e.strerror}") from e
    if not align or align > loopdev.FS_SECTOR:
        return loopdev.FS_SECTOR
    return max(loopdev.BLOCK_SECTOR, align)


class HostBoundSpace:
    """The pool's space as admission and rationing must see it: the lesser of the
    pool file system's free space and the host's free space under the file, less
    the host's ``reserve`` (a thin pool grows into the host's file system)."""

    def __init__(self, state_dir: Path, pool_file: Path, reserve: Share = DEFAULT_HOST_RESERVE) -> None:
        self.state_dir = state_dir
        self.host_dir = Path(os.path.abspath(pool_file)).parent
        self.reserve = reserve

    def free_bytes(self) -> int:
        pool_free = _statvfs(self.state_dir)[1]
        host_size, host_free = _statvfs(self.host_dir)
        return max(0, min(pool_free, host_free - self.reserve.of(host_size)))

    def fs_size(self) -> int:
        return min(_statvfs(self.state_dir)[0], _statvfs(self.host_dir)[0])


def _statvfs(path: Path) -> tuple[int, int]:
    """(size, free to unprivileged writers) of the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def served_as_it_is(state_dir: Path) -> str:
    """Why ``state_dir`` keeps its own file system ("" when the pool may go there)."""
    here = host.mount_at(state_dir)
    if here is not None:
        return f"the state dir {state_dir} is a file system of its own ({here.fstype} on {here.source})"
    if StateDir(state_dir).db.exists():
        return (
            f"the state dir {state_dir} holds volumes on the host's file system (the layout without a "
            "pool); it is served as it is, and a snapshot of a volume in use there is a copy. To move to "
            "a pool: delete or export its volumes and snapshots, stop the driver, remove the state dir's "
            "content, and start again (docs/operations.md, pool file)"
        )
    if state_dir.is_dir() and any(state_dir.iterdir()):
        return f"the state dir {state_dir} is not empty; the pool is mounted on an empty one only"
    return ""


def _create(path: Path, size: int) -> None:
    if size < MIN_SIZE:
        raise PoolError(f"pool file {path}: {size >> 20} MiB is too small; xfs needs at least 300 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # an earlier start's, never written
    try:
        os.ftruncate(fd, size // loopdev.FS_SECTOR * loopdev.FS_SECTOR)
        os.fsync(fd)
    except OSError as e:
        raise PoolError(f"pool file {path}: {os.strerror(e.errno or errno.EIO)}") from e
    finally:
        os.close(fd)


def _mount(device: str, state_dir: Path) -> None:
    host.mount(device, state_dir, "xfs", pool.FILE_MOUNT_OPTIONS)


def _host_size(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return _statvfs(directory)[0]


def attached_loop(path: Path) -> str:
    """The loop device holding the file at ``path`` ("" when none)."""
    return _attached(os.stat(path))


def _attached(st: os.stat_result) -> str:
    """The loop device holding the file ``st`` describes, by device and inode (a path
    in a container is not the host's)."""
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    return next((dev for dev, ids in sorted(host.loop_backing_ids().items()) if ids == want), "")


def _same(source: str, device: str) -> bool:
    return source == device or os.path.realpath(source) == os.path.realpath(device)


def _ours(found: dict[str, str]) -> bool:
    return found.get("TYPE") == "xfs" and found.get("LABEL") == LABEL
