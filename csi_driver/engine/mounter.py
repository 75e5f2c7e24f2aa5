"""Mounting what a backend describes: the only place the engine's node side
changes the mount table. A test without root passes its own Mounter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from csi_driver import host
from csi_driver.layerstore.backend import Mount

#: judges the mount an opened bind source lies on (None: the kernel cannot say)
SourceCheck = Callable[[host.MountEntry | None], bool]


class Mounter(Protocol):
    def table(self) -> host.Mounts:
        """The mounts, for the operation at hand: asked path by path of the kernel,
        or one reading of the table where the kernel cannot answer that way."""

    def mount(self, m: Mount, target: str | Path) -> None: ...

    def bind(self, source: str | Path, target: str | Path, source_ok: SourceCheck | None = None) -> None: ...

    def remount_bind(self, target: str | Path, options: list[str]) -> None: ...

    def umount(self, target: str | Path) -> None: ...


class HostMounter:
    """The kernel's mounts, through system calls on node paths opened beneath their
    root (host.beneath): each acts on the fd that was opened, never on the path again."""

    def table(self) -> host.Mounts:
        return host.mount_view()

    def mount(self, m: Mount, target: str | Path) -> None:
        if m.type == "bind":
            host.bind_beneath(m.source, target, trusted_source=True)  # a layer of the driver's
            flags = [o for o in m.options if o not in ("bind", "ro", "rw")]
            if "ro" in m.options or flags:
                host.remount_bind_beneath(target, ["ro" if "ro" in m.options else "rw", *flags])
        else:
            host.mount_beneath(m.source, target, m.type, list(m.options), cwd=m.cwd)

    def bind(self, source: str | Path, target: str | Path, source_ok: SourceCheck | None = None) -> None:
        host.bind_beneath(source, target, source_ok)

    def remount_bind(self, target: str | Path, options: list[str]) -> None:
        host.remount_bind_beneath(target, options)

    def umount(self, target: str | Path) -> None:
        host.umount_beneath(target)
