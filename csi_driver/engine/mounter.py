"""Mounting what a backend describes: the only place the engine's node side
changes the mount table. A test without root passes its own Mounter."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from csi_driver import host
from csi_driver.layerstore.backend import Mount


class Mounter(Protocol):
    def table(self) -> host.Mounts:
        """The mounts, for the operation at hand: asked path by path of the kernel,
        or one reading of the table where the kernel cannot answer that way."""

    def mount(self, m: Mount, target: str | Path) -> None: ...

    def bind(self, source: str | Path, target: str | Path) -> None: ...

    def remount_bind(self, target: str | Path, options: list[str]) -> None: ...

    def umount(self, target: str | Path) -> None: ...


class HostMounter:
    """The kernel's mounts, through the host tools."""

    def table(self) -> host.Mounts:
        return host.mount_view()

    def mount(self, m: Mount, target: str | Path) -> None:
        if m.type == "bind":
            host.bind_mount(m.source, target)
            flags = [o for o in m.options if o not in ("bind", "ro", "rw")]
            if "ro" in m.options or flags:
                host.remount_bind(target, ["ro" if "ro" in m.options else "rw", *flags])
        else:
            host.mount(m.source, target, m.type, list(m.options), cwd=m.cwd)

    def bind(self, source: str | Path, target: str | Path) -> None:
        host.bind_mount(source, target)

    def remount_bind(self, target: str | Path, options: list[str]) -> None:
        host.remount_bind(target, options)

    def umount(self, target: str | Path) -> None:
        host.umount(target)
