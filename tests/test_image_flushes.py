"""An fsync in a volume whose image lies on xfs (a pool) costs one cache flush
of the pool's device, not two: the image is attached through a descriptor
whose writes leave its mtime alone, so overwrites never dirty its inode and
its fsync needs no log force (a log force is a write with a flush before and
after it)."""

from __future__ import annotations

import mmap
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.host import loopdev, xfshandle
from csi_driver.pool import MKFS_OPTIONS
from driver_harness import needs_mounts

pytestmark = needs_mounts

MiB = 1 << 20


def flushes(device: str) -> int:
    """Flush requests the device completed (the 16th field of its stat)."""
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[15])


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A pool as the driver makes one from a file: xfs (reflink) on a direct-I/O
    loop device with 4 KiB sectors over a sparse file; unmounted and detached after."""
    backing = tmp_path / "pool.img"
    host.create_sparse(backing, 2 << 30)
    device = loopdev.attach(backing, sector_size=loopdev.FS_SECTOR)
    mnt = tmp_path / "pool"
    try:
        host.mkfs_pool(device, "test-pool", MKFS_OPTIONS)
        mnt.mkdir()
        host.mount(device, mnt, "xfs", ["noatime"])
        yield mnt, device
    finally:
        host.umount(mnt)
        host.loop_detach(device)


def written_image(path: Path, size: int) -> None:
    """An image whose every block is written: overwrites allocate nothing."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        os.fsync(f.fileno())


def test_an_fsync_in_a_volume_on_a_pool_is_one_flush_of_the_pool(pool):
    mnt, pool_device = pool
    image = mnt / "volume.img"
    written_image(image, 64 * MiB)
    mtime = image.stat().st_mtime_ns
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096))
    fsyncs = 32
    rng = random.Random(26)
    with loopdev.attached(image, sector_size=loopdev.FS_SECTOR) as device:
        # opened by handle, the device still names its file: what restarts and the
        # second-writer check go by
        assert host.loop_backing_file(device) == str(image)
        assert host.loops_under(mnt) == [device]
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [buf], 0)
            os.fsync(fd)  # anything still pending from the first write lands here
            before = flushes(pool_device)
            for _ in range(fsyncs):
                time.sleep(0.011)  # the clock ticks (HZ >= 100): before, every write moved the mtime
                os.pwritev(fd, [buf], rng.randrange(64 * MiB // 4096) * 4096)
                os.fsync(fd)
            spent = flushes(pool_device) - before
        finally:
            os.close(fd)
            host.loop_detach(device)
    # one flush each (a few spare for the log's own background work); two each before
    print(f"{spent} flushes of the pool for {fsyncs} fsyncs")
    assert spent <= fsyncs + fsyncs // 4, f"{spent} flushes of the pool for {fsyncs} fsyncs in the volume"
    assert image.stat().st_mtime_ns == mtime, "writes through the loop device left the image's mtime"
    with open(image, "rb") as f:
        f.seek(0)
        assert f.read(4096) == bytes(buf[:4096]), "the data went to the image"


def test_an_image_elsewhere_is_opened_the_usual_way(tmp_path):
    image = tmp_path / "image"  # tmp_path: not xfs on this host (the root is ext4)
    host.create_sparse(image, MiB)
    if xfshandle.on_xfs(tmp_path):
        pytest.skip("tmp_path is on xfs here")
    fd = xfshandle.open_image(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert image.read_bytes()[:4096] == b"x" * 4096
