"""Which storage setup the node has (pool file, pool device, a plain state dir on a
file system that clones, or one that does not) and what a snapshot of a volume in
use costs there: an O(1) clone, or a copy of its written data up to the limit."""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver import host
from csi_driver.doctor.check import FAIL, OK, WARN, Check, MiB, fmt_gib
from csi_driver.doctor.procfs import mount_of
from csi_driver.doctor.state_dir import existing_ancestor
from csi_driver.errors import CommandFailed
from csi_driver.host.loopdev import BLOCK_SECTOR
from csi_driver.pool import LABEL, PoolError
from csi_driver.pool_file import assess, served_as_it_is

CLONE = "a snapshot of a volume in use is a clone of its image (O(1): milliseconds, a few MiB)"
POOL_FIX = (
    "give the node a pool: serve --pool-file PATH (chart: node.poolFile.path, on by default) or "
    "--pool-device DEV (chart: node.poolDevices)"
)


def check_setup(state_dir: Path, pool_file: str = "", max_live_copy: int = 1 << 30) -> Check:
    here = host.mount_at(state_dir)
    if here is not None and here.fstype == "xfs":
        backing = host.loop_backing_file(here.source)
        if backing:
            return _pool_file_check(Path(backing), here.source, state_dir)
        if host.probe_signature(here.source).get("LABEL") == LABEL:
            return Check("setup", OK, f"pool device {here.source} at {state_dir}: {CLONE}")
    if pool_file and here is None:
        planned = _pool_file_plan(Path(pool_file), state_dir)
        if planned is not None:
            return planned
    base = existing_ancestor(state_dir)
    fstype = here.fstype if here else _fstype(base)
    if host.can_reflink(base):
        return Check("setup", OK, f"plain state dir on {fstype}, which clones: {CLONE}")
    limit = (
        f"up to {max_live_copy // MiB} MiB (--max-live-snapshot-copy)" if max_live_copy else "with no limit"
    )
    return Check(
        "setup",
        WARN,
        f"plain state dir on {fstype}, which cannot clone: a snapshot of a volume in use copies its "
        f"written data while its writes wait (seconds per GiB), {limit}; beyond, it is refused",
        POOL_FIX,
    )


def _pool_file_check(backing: Path, device: str, state_dir: Path) -> Check:
    """A mounted pool file, and whether raw block volumes run direct I/O on it: only
    where its xfs has 512-byte sectors (pool_file.new_pool_sector)."""
    said = f"pool file {backing} ({device}) at {state_dir}: {CLONE}"
    try:
        pool_sector, host_sector = host.sector_size_of(backing), host.dio_alignment(backing)
    except OSError:  # the host's path is not seen from here
        return Check("setup", OK, said)
    if pool_sector <= BLOCK_SECTOR:
        return Check("setup", OK, said)
    buffered = (
        f"raw block volumes on it run buffered, their pages cached twice: its xfs has "
        f"{pool_sector}-byte sectors, a block volume 512-byte ones"
    )
    if host_sector and host_sector < pool_sector:
        return Check(
            "setup",
            WARN,
            f"{said}; but {buffered} (a pool made before pools took the host's smallest sectors)",
            "mount volumes are not affected. For block volumes: move the node's volumes off, stop the "
            "driver, remove the pool file and the state dir's content, and start again: the new pool "
            "takes the host's 512-byte sectors (docs/operations.md, a pool file)",
        )
    host_only = f"as the host's disk takes direct I/O in {pool_sector}-byte blocks only"
    return Check("setup", OK, f"{said}; {buffered}, {host_only}")


def _pool_file_plan(path: Path, state_dir: Path) -> Check | None:
    """What ``serve --pool-file`` would do; None when it would serve the state dir as it is."""
    try:
        kind, detail = assess(path, state_dir)
    except (PoolError, CommandFailed) as e:
        return Check("setup", FAIL, str(e), "name a pool file that nothing else uses")
    if kind == "foreign":
        return Check(
            "setup",
            FAIL,
            f"pool file {path} holds {detail}, not an overlay-csi pool: serve refuses it",
            "name another path, or remove the file if it is meant to be a new pool",
        )
    why = served_as_it_is(state_dir)  # the very rule serve follows
    if why:
        return Check("setup", WARN, f"pool file {path} would not be used: {why}", POOL_FIX)
    parent = existing_ancestor(path.parent)
    st = os.statvfs(parent)
    host_fs = f"{fmt_gib(st.f_bavail * st.f_frsize)} free of {fmt_gib(st.f_blocks * st.f_frsize)}"
    todo = {
        "new": "serve creates it (sparse), formats it xfs with reflink and mounts it",
        "ours": "serve attaches it and mounts it",
        "attached": "serve mounts it",
        "mounted": "it is mounted",
    }[kind]
    return Check("setup", OK, f"pool file {path} ({host_fs} on its host file system): {todo}; then {CLONE}")


def _fstype(path: Path) -> str:
    m = mount_of(str(path))
    return m.fstype if m else "an unknown file system"
