"""The mount manager performs a backend's loop Mount data and undoes it, on real
loop devices (each detached again, whatever the test's outcome)."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.host import loopdev
from csi_driver.host.mount_manager import LoopParams, Mount, MountManager
from driver_harness import needs_mounts

MiB = 1 << 20


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[MountManager]:
    yield MountManager()
    for device in host.loops_under(tmp_path):
        host.loop_detach(device)
    assert not host.loops_under(tmp_path), "a loop device outlived its test"


def image(path: Path, size: int = 8 * MiB) -> Path:
    host.create_sparse(path, size)
    return path


def logical_block_size(device: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(device)}/queue/logical_block_size").read_text())


def can_odirect(path: Path) -> bool:
    """Whether ``path``'s file system reads with O_DIRECT (where it cannot, the kernel
    runs a direct-I/O loop device buffered)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, 4096) as buf:
            os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@needs_mounts
def test_a_loop_mount_is_attached_as_its_data_says_and_detached(tmp_path: Path, manager: MountManager):
    file = image(tmp_path / "image")
    m = Mount("loop", str(file), ("rw", "direct-io", "sector-size=4096"))
    device = manager.attach(m)
    assert host.loop_backing_file(device) == str(file)
    assert logical_block_size(device) == 4096, "the sector size the data names"
    if can_odirect(file):
        assert loopdev.direct_io(device) is True, "direct I/O, as the data says"
    assert manager.holds(device, m)
    assert not manager.holds(device, Mount("loop", str(file), ("ro",))), "not a read-only device"
    other = image(tmp_path / "other")
    assert not manager.holds(device, Mount("loop", str(other), ("rw",))), "not another file's"
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"through the device", 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(file, "rb") as f:
        f.seek(4096)
        assert f.read(18) == b"through the device"

    manager.detach(device)
    assert host.loop_backing_file(device) is None, "detached"
    assert not manager.holds(device, m), "a detached device is no longer the data"
    manager.detach(device)  # repeated: nothing left to undo, no error
    assert not manager.holds(None, m), "no device recorded is none held"


@needs_mounts
def test_a_read_only_loop_mount_refuses_writes(tmp_path: Path, manager: MountManager):
    file = image(tmp_path / "image")
    ro = Mount("loop", str(file), ("ro",))
    device = manager.attach(ro)
    assert manager.holds(device, ro)
    assert not manager.holds(device, Mount("loop", str(file), ("rw",))), "never taken for the writable one"
    with pytest.raises(OSError) as e:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
        finally:
            os.close(fd)
    assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert logical_block_size(device) == loopdev.BLOCK_SECTOR, "512-byte sectors unless the data says"
    assert loopdev.direct_io(device) is False, "buffered unless the data asks for direct I/O"
    manager.detach(device)
    assert host.loop_backing_file(device) is None


@needs_mounts
def test_only_the_devices_that_still_are_the_data_are_held(tmp_path: Path, manager: MountManager):
    """After a restart or a reboot the recorded devices are checked, not trusted: one
    detached since, or now another file's, is not the volume's."""
    file, other = image(tmp_path / "image"), image(tmp_path / "other")
    m = Mount("loop", str(file), ("rw",))
    gone, live = manager.attach(m), manager.attach(m)
    elsewhere = manager.attach(Mount("loop", str(other), ("rw",)))
    manager.detach(gone)
    assert [d for d in (gone, elsewhere, live) if manager.holds(d, m)] == [live]


def test_loop_options_the_manager_cannot_honour_are_refused():
    """A backend's data the manager would have to drop is a bug, said at once."""
    assert LoopParams.of(Mount("loop", "/x", ("ro", "direct-io", "sector-size=4096"))) == LoopParams(
        True, True, 4096
    )
    assert LoopParams.of(Mount("loop", "/x")) == LoopParams(False, False, loopdev.BLOCK_SECTOR)
    for bad in (("discard",), ("sector-size=big",)):
        with pytest.raises(ValueError, match="unknown loop option"):
            LoopParams.of(Mount("loop", "/x", bad))
    with pytest.raises(ValueError, match="not a loop device"):
        MountManager().attach(Mount("bind", "/x", ("bind",)))
    with pytest.raises(ValueError, match="attached"):
        MountManager().mount(Mount("loop", "/x"), "/nowhere")
