"""Mounts as data, and the one place that performs them.

A backend never mounts nor attaches: it answers with ``Mount`` data (what a
volume's tree or device is made of), as containerd's snapshotters do, and the
``MountManager`` here performs it and undoes it. Two kinds of data:

- a mount (``overlay``, ``bind``, a file system type): ``mount`` puts it at a
  target; ``umount`` takes it away;
- a ``loop`` device over a file (a raw block volume): ``attach`` returns the
  device, ``detach`` frees it, ``holds`` says whether a device still is that
  data (after a restart, a reboot, or a crash between the two halves of a call).

Every call is safe to repeat.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_driver.host import loopdev
from csi_driver.host.loops import loop_backing_file, loop_detach
from csi_driver.host.mounting import bind_beneath, mount_beneath, remount_bind_beneath, umount_beneath
from csi_driver.host.mounttable import MountEntry, Mounts, mount_view

#: judges the mount an opened bind source lies on (None: the kernel cannot say)
SourceCheck = Callable[[MountEntry | None], bool]

LOOP = "loop"


@dataclass(frozen=True)
class Mount:
    """One mount, as data: ``mount -t type -o options source target``, run in ``cwd``
    (relative paths in ``options`` are relative to it).

    Type ``loop`` is a device rather than a mount: a loop device over the file
    ``source``, with the options ``ro`` (a read-only device), ``direct-io`` (the
    file read and written with O_DIRECT: one page cache, not two) and
    ``sector-size=N`` (its logical block size)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    cwd: str | None = None


@dataclass(frozen=True)
class LoopParams:
    """A ``loop`` Mount's options, read."""

    readonly: bool
    direct_io: bool
    sector_size: int

    @classmethod
    def of(cls, m: Mount) -> LoopParams:
        if m.type != LOOP:
            raise ValueError(f"not a loop device: a {m.type!r} mount")
        readonly, direct_io, sector_size = False, False, loopdev.BLOCK_SECTOR
        for opt in m.options:
            key, _, value = opt.partition("=")
            if opt in ("ro", "rw"):
                readonly = opt == "ro"
            elif opt == "direct-io":
                direct_io = True
            elif key == "sector-size" and value.isascii() and value.isdigit():
                sector_size = int(value)
            else:  # a backend's data the manager cannot honour: a bug, never silently dropped
                raise ValueError(f"unknown loop option {opt!r}")
        return cls(readonly, direct_io, sector_size)


class MountManager:
    """Performs Mount data on the host. Node paths are opened beneath their root
    (host.beneath) and each call acts on the fd opened, never on the path again."""

    # ---- mounts ---------------------------------------------------------------
    def table(self) -> Mounts:
        return mount_view()

    def mount(self, m: Mount, target: str | Path) -> None:
        if m.type == LOOP:
            raise ValueError("a loop device is attached (MountManager.attach), not mounted")
        if m.type == "bind":
            bind_beneath(m.source, target, trusted_source=True)  # a layer of the driver's
            flags = [o for o in m.options if o not in ("bind", "ro", "rw")]
            if "ro" in m.options or flags:
                remount_bind_beneath(target, ["ro" if "ro" in m.options else "rw", *flags])
        else:
            mount_beneath(m.source, target, m.type, list(m.options), cwd=m.cwd)

    def bind(self, source: str | Path, target: str | Path, source_ok: SourceCheck | None = None) -> None:
        bind_beneath(source, target, source_ok)

    def remount_bind(self, target: str | Path, options: list[str]) -> None:
        remount_bind_beneath(target, options)

    def bind_device(self, device: str, target: str | Path) -> None:
        """Bind an attached device's node over ``target``, an empty file (a published
        block volume; never over a caller's file or dir)."""
        bind_beneath(device, target, target_dir=False, trusted_source=True)

    def umount(self, target: str | Path) -> None:
        umount_beneath(target)

    # ---- loop devices -----------------------------------------------------------
    def attach(self, m: Mount) -> str:
        """A new loop device that is ``m``; it stays until ``detach``."""
        p = LoopParams.of(m)
        return loopdev.attach(
            Path(m.source), readonly=p.readonly, sector_size=p.sector_size, direct_io=p.direct_io
        )

    def detach(self, device: str) -> None:
        """Free a loop device; one already gone is fine."""
        if loop_backing_file(device) is not None:
            loop_detach(device)

    def holds(self, device: str | None, m: Mount) -> bool:
        """Whether ``device`` is a loop device over ``m``'s file, read-only exactly when
        ``m`` is (from sysfs, no tool run): a recorded device may be gone, or since a
        reboot be another file's, or the read-write one where a read-only one was asked."""
        if not device or loop_backing_file(device) != m.source:
            return False
        return _read_only(device) == ("ro" in m.options)


def _read_only(device: str) -> bool | None:
    """The device's read-only flag (sysfs; raw reads: this runs at every block call)."""
    try:
        fd = os.open(f"/sys/block/{os.path.basename(device)}/ro", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 8).strip() == b"1"
    finally:
        os.close(fd)
