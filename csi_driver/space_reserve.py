"""A few MiB the driver keeps allocated beside its store, and gives back when the
disk is full, so that its own writes (the store's commits: a delete, an unpublish)
still find room and Kubernetes can always free space (as btrfs keeps a global
reserve and ZFS its slop for deletes on a full pool)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from csi_driver import host

log = logging.getLogger(__name__)

MiB = 1 << 20
STORE_RESERVE = 16 * MiB


class SpaceReserve:
    def __init__(self, path: Path, size: int = STORE_RESERVE) -> None:
        self.path = path
        self.size = size

    def free(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def held(self) -> bool:
        return self.path.exists()

    def before_write(self) -> None:
        """Give the reserve back when the disk has less than it free (a write is next)."""
        if self.held() and self.free() < self.size:
            self.release()

    def release(self) -> bool:
        """Give the reserve back; whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning(
            "the node's disk is full: the driver's %d MiB reserve is given back so its own "
            "writes (deletes, unpublishes) go on; free space on the node",
            self.size // MiB,
        )
        return True

    def restore(self) -> None:
        """Take the reserve again once the disk has room for it several times over."""
        if self.held() or self.free() < 4 * self.size:
            return
        part = self.path.with_name(self.path.name + ".part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
            host.allocate(part, [(0, self.size)])
            if host.allocated_bytes(part) < self.size:
                raise OSError(errno.ENOSPC, "the reserve did not get its blocks")
            os.rename(part, self.path)
        except OSError as e:  # the disk filled meanwhile: the next look tries again
            part.unlink(missing_ok=True)
            log.info("could not take the store's reserve: %s", e)
