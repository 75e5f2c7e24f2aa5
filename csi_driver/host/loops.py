"""Loop devices as the host sees them (sysfs and losetup): which file each holds,
attach, detach, refresh."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from csi_driver.host import loopdev
from csi_driver.host.tools import run

log = logging.getLogger(__name__)


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
    if not name.startswith("loop") or not (name[4:].isascii() and name[4:].isdigit()):
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


def count_loops_under(root: str | Path) -> int:
    """How many loop devices have a backing file below ``root`` (reads sysfs, no losetup:
    cheap enough for every metrics scrape)."""
    base = os.path.realpath(root) + "/"
    n = 0
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                if f.read().strip().startswith(base):
                    n += 1
        except OSError:  # detached while we looked
            continue
    return n


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


def loop_attach(image: Path, readonly: bool = False) -> str:
    """A direct-I/O loop device for a raw block volume; it stays until detached."""
    return loopdev.attach(image, readonly=readonly)


def loop_detach(device: str) -> None:
    run(["losetup", "--detach", device], check=False)


def loop_refresh(device: str) -> None:
    """Tell the loop driver its backing file grew."""
    run(["losetup", "--set-capacity", device])
