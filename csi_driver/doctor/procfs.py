"""What ``/proc`` says about this process: its capabilities and its mounts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24


def capabilities() -> int:
    """The effective capability mask of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_cap(cap: int) -> bool:
    return bool(capabilities() >> cap & 1)


@dataclass
class MountInfo:
    target: str
    fstype: str
    source: str
    optional: list[str]  # e.g. ["shared:1"], ["master:3"], []


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    out = []
    for line in Path(path).read_text(errors="surrogateescape").splitlines():
        left, _, right = line.partition(" - ")
        a, b = left.split(" "), right.split(" ")
        target = (
            a[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        )
        out.append(MountInfo(target, b[0], b[1] if len(b) > 1 else "", a[6:]))
    return out


def mount_of(path: str) -> MountInfo | None:
    """The mount holding ``path``: the longest matching target, the last mounted on a tie."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for m in mountinfo():
        t = m.target
        if t == "/" or real == t or real.startswith(t + "/"):
            if best is None or len(t) >= len(best.target):
                best = m
    return best
