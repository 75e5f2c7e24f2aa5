"""A Mounter for tests without root: a "mount" makes the target a symlink to the
source directory and is remembered in a table of its own.

Only the plain-directory backend's bind mounts can be shown this way; the
engine cannot tell, which is the point: its logic runs unprivileged.
"""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver import host
from csi_driver.layerstore.backend import Mount


class FakeTable(host.MountTable):
    """Looks paths up as given (a symlink "mount" must not resolve to its source)."""

    def at(self, path: str | Path) -> host.MountEntry | None:
        return self._by_target.get(os.path.normpath(path))


class FakeMounter:
    def __init__(self) -> None:
        self.entries: dict[str, host.MountEntry] = {}
        self.reads = 0

    def table(self) -> FakeTable:
        self.reads += 1
        return FakeTable(list(self.entries.values()))

    def _attach(self, source: str, target: str | Path, options: tuple[str, ...]) -> None:
        path = os.path.normpath(target)
        if path in self.entries:
            raise RuntimeError(f"{path} is already mounted (the engine should have checked)")
        os.rmdir(path)  # a mount point is an empty directory; anything else is a caller's bug
        os.symlink(source, path)
        root = os.path.realpath(source)
        self.entries[path] = host.MountEntry(
            len(self.entries) + 100, 1, root, path, ",".join(options) or "rw", "fakebind", root, "rw"
        )

    def mount(self, m: Mount, target: str | Path) -> None:
        assert m.type == "bind", f"only bind mounts can be faked, not {m.type}"
        self._attach(m.source, target, tuple(o for o in m.options if o != "bind"))

    def bind(self, source: str | Path, target: str | Path, source_ok=None) -> None:
        entry = self.entries[os.path.normpath(source)]
        assert source_ok is None or source_ok(entry)
        self._attach(entry.source, target, ("rw",))

    def remount_bind(self, target: str | Path, options: list[str]) -> None:
        path = os.path.normpath(target)
        self.entries[path] = self.entries[path]._replace(options=",".join(options))

    def umount(self, target: str | Path) -> None:
        path = os.path.normpath(target)
        if self.entries.pop(path, None) is not None:
            os.unlink(path)
            os.mkdir(path)
