"""What the engine's node side asks of the mount manager: the mounts and loop
devices the backend describes as data (``Mount``), performed by
``host.mount_manager.MountManager`` and never by the engine itself. A test
without root passes its own Mounter."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from csi_driver import host
from csi_driver.host.mount_manager import MountManager, SourceCheck
from csi_driver.layerstore.backend import Mount

__all__ = ["HostMounter", "Mounter", "SourceCheck"]

#: the host's mount manager: the kernel's mounts and loop devices
HostMounter = MountManager


class Mounter(Protocol):
    def table(self) -> host.Mounts:
        """The mounts, for the operation at hand: asked path by path of the kernel,
        or one reading of the table where the kernel cannot answer that way."""

    def mount(self, m: Mount, target: str | Path) -> None: ...

    def bind(self, source: str | Path, target: str | Path, source_ok: SourceCheck | None = None) -> None: ...

    def remount_bind(self, target: str | Path, options: list[str]) -> None: ...

    def bind_device(self, device: str, target: str | Path) -> None: ...

    def umount(self, target: str | Path) -> None: ...

    def attach(self, m: Mount) -> str:
        """A new device that is the ``loop`` Mount ``m``; it stays until ``detach``."""

    def detach(self, device: str) -> None: ...

    def holds(self, device: str | None, m: Mount) -> bool:
        """Whether ``device`` is (still) the ``loop`` Mount ``m``."""
