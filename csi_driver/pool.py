"""A disk handed to the driver (``serve --pool-device``): formatted xfs with
reflink when it is empty, and mounted as the state dir.

Why: a snapshot of a volume in use is a clone of its image only where the state
dir's file system can reflink. On a node whose root file system is ext4, a
dedicated disk (or partition) formatted this way gives every snapshot, clone
and restore that O(1) path; see docs/operations.md.

Safety first: a device that holds anything but our own file system (another
file system, a partition table, RAID or LVM signatures) is refused unless the
operator says ``--pool-device-wipe``; the check reads signatures with
``blkid -p`` (low-level probing, no cache), as mkfs tools do.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from csi_driver import host

log = logging.getLogger(__name__)

LABEL = "overlay-csi"
#: the pool's file system, for a device and a pool file alike (csi_driver.pool_file)
MKFS_OPTIONS = ["-m", "reflink=1"]
MOUNT_OPTIONS = ["noatime"]
#: a pool file also discards what its file system frees, so the loop device punches
#: it out of the file and the host gets the space back
FILE_MOUNT_OPTIONS = [*MOUNT_OPTIONS, "discard"]


class PoolError(Exception):
    """The pool device cannot be used; the message says why and what to do."""


def assess(device: str, state_dir: Path) -> tuple[str, dict[str, str]]:
    """What ``device`` is to the driver: "mounted" (it is the state dir already),
    "empty", "ours" (an overlay-csi pool) or "foreign", with the signatures found.
    Raise PoolError for what can never be used (not a block device, mounted elsewhere)."""
    try:
        mode = os.stat(device).st_mode
    except OSError as e:
        raise PoolError(f"pool device {device}: {e.strerror}") from e
    if not stat.S_ISBLK(mode):
        raise PoolError(f"pool device {device} is not a block device")
    real = os.path.realpath(device)
    table = host.MountTable.read()
    here = table.at(state_dir)
    if here is not None:
        if _same_device(here.source, real):
            return "mounted", {}
        raise PoolError(f"state dir {state_dir} already has {here.source} mounted; unmount it first")
    elsewhere = [m.target for m in table.entries if _same_device(m.source, real)]
    if elsewhere:
        raise PoolError(f"pool device {device} is mounted at {elsewhere[0]}; refusing to use it twice")
    found = host.probe_signature(real)
    if not found:
        return "empty", found
    if found.get("TYPE") == "xfs" and found.get("LABEL") == LABEL:
        return "ours", found
    return "foreign", found


def prepare(device: str, state_dir: Path, wipe: bool = False) -> str:
    """Make ``device`` the file system of ``state_dir``; return what was done:
    "formatted", "mounted" or "already mounted"."""
    kind, found = assess(device, state_dir)
    if kind == "mounted":
        return "already mounted"
    if kind == "foreign" and not wipe:
        raise PoolError(
            f"pool device {device} holds {describe(found)}, not an overlay-csi pool; refusing to format "
            "it. Give an empty device, or pass --pool-device-wipe to destroy what it holds"
        )
    real = os.path.realpath(device)
    done = "mounted"
    if kind == "empty" or (kind == "foreign" and wipe):
        if found:
            log.warning("wiping %s (held %s) as --pool-device-wipe asks", device, describe(found))
        host.mkfs_pool(real, LABEL, MKFS_OPTIONS)
        done = "formatted"
    state_dir.mkdir(parents=True, exist_ok=True)
    host.mount(real, state_dir, "xfs", MOUNT_OPTIONS)
    log.info("pool device %s %s at %s", device, done, state_dir)
    return done


def _same_device(source: str, real: str) -> bool:
    return source == real or os.path.realpath(source) == real


def describe(found: dict[str, str]) -> str:
    kind = found.get("TYPE") or found.get("PTTYPE") or "a signature"
    label = found.get("LABEL")
    return f"{kind}" + (f" (label {label!r})" if label else "")
