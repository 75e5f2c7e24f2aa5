"""An ext4's reserved clusters, through sysfs (``/sys/fs/ext4/<dev>/reserved_clusters``).

ext4 keeps that many clusters free for its own allocations that must not fail (the
extent blocks of an unwritten-extent conversion): every other allocation, root's
too, fails with ENOSPC when it would leave fewer free. The value is set at mount
(2% of the clusters, at most 4096) and may be changed while mounted.
"""

from __future__ import annotations

import os

SYSFS_EXT4 = "/sys/fs/ext4"


def _path(device: str) -> str:
    return f"{SYSFS_EXT4}/{os.path.basename(device)}/reserved_clusters"


def reserved_clusters(device: str) -> int:
    """The reserved clusters of the ext4 mounted from ``device`` (e.g. /dev/loop3)."""
    with open(_path(device)) as f:
        return int(f.read().strip())


def set_reserved_clusters(device: str, clusters: int) -> None:
    """Reserve ``clusters`` of the ext4 mounted from ``device`` (fewer than it has)."""
    with open(_path(device), "w") as f:
        f.write(str(int(clusters)))


def default_reserved_clusters(clusters: int) -> int:
    """What ext4 reserves at mount for a file system of ``clusters`` clusters
    (ext4_calculate_resv_clusters: 2%, at most 4096)."""
    return min(clusters // 50, 4096)
