"""The ``backend`` fixture: every LayerBackend the suite runs against, each in
its own state dir under ``tmp_path``, with nothing left mounted or attached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.errors import CommandFailed
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.layerstore.overlay.backend import OverlayLoopBackend
from csi_driver.layerstore.plaindir import PlainDirBackend
from driver_harness import MOUNT_SKIP

ROOT = not MOUNT_SKIP  # root with the capability to mount


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


@pytest.fixture(params=[pytest.param("overlay-loop", marks=pytest.mark.mounts), "plain-dir"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LayerBackend]:
    state = (tmp_path / "state").resolve()
    if request.param == "overlay-loop":
        if not ROOT:
            pytest.skip("overlay-loop loop-mounts images and mounts overlays: it needs root (euid 0)")
        made: LayerBackend = OverlayLoopBackend(state)
    else:
        made = PlainDirBackend(state)
    base = tmp_path.resolve()
    try:
        yield made
    finally:
        leaked = held_under(base)
        release_all(base, state)
        stuck = held_under(base)
    assert not stuck, f"could not release: {stuck}"
    assert not leaked, f"left mounted or attached after the test (now released): {leaked}"
