"""The backend suite's factory (after containerd's ``SnapshotterSuite(t, name, fn)``):
``BACKENDS`` lists how to make every LayerBackend, and the ``backend`` fixture runs
each case against each of them, in its own state dir under ``tmp_path``, with
nothing left mounted or attached. A new backend is one line of ``BACKENDS``; a
case adapts to a backend only through what ``backend.capabilities`` declares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.errors import CommandFailed
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.layerstore.overlay.backend import OverlayLoopBackend
from csi_driver.layerstore.plaindir import PlainDirBackend
from driver_harness import MOUNT_SKIP

ROOT = not MOUNT_SKIP  # root with the capability to mount


@dataclass(frozen=True)
class Factory:
    """How the suite makes one backend."""

    id: str  # the test id (the name ``serve --backend`` knows it by)
    make: Callable[[Path], LayerBackend]  # given its state dir
    needs_root: bool = False  # it mounts or attaches loop devices itself


BACKENDS = [
    Factory("overlay", OverlayLoopBackend, needs_root=True),
    Factory("plaindir", PlainDirBackend),
]


def held_under(base: Path) -> list[str]:
    """Mounts and loop devices under ``base``."""
    if not ROOT:
        return []
    return [f"mount {m.target}" for m in host.MountTable.read().under(base)] + [
        f"loop {d}" for d in host.loops_under(base)
    ]


def release_all(base: Path, state: Path) -> None:
    """Thaw, unmount and detach everything under ``base``, even after a failed
    test: mounts of views (outside ``state``) first, then the layers' own."""
    if not ROOT:
        return
    for _ in range(3):
        entries = host.MountTable.read().under(base)
        if not entries:
            break
        entries.sort(key=lambda m: m.target == str(state) or m.target.startswith(str(state) + "/"))
        for m in entries:
            if m.fstype in ("ext4", "xfs"):
                host.thaw(Path(m.target))
            try:
                host.umount(m.target)
            except CommandFailed:
                host.umount(m.target, lazy=True)
    for device in host.loops_under(base):
        host.loop_detach(device)


@pytest.fixture(
    params=[pytest.param(f, id=f.id, marks=[pytest.mark.mounts] if f.needs_root else []) for f in BACKENDS]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerBackend]:
    factory: Factory = request.param
    if factory.needs_root and not ROOT:
        pytest.skip(f"the {factory.id} backend mounts and attaches loop devices: it needs root (euid 0)")
    state = (tmp_path / "state").resolve()
    made = factory.make(state)
    base = tmp_path.resolve()
    try:
        yield made
    finally:
        leaked = held_under(base)
        release_all(base, state)
        stuck = held_under(base)
        made.close()
    assert not stuck, f"could not release: {stuck}"
    assert not leaked, f"left mounted or attached after the test (now released): {leaked}"
