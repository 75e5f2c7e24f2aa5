"""Data acknowledged by fsync inside a volume survives a crash of everything.

Two halves. Each fsync must reach the host: the upper's loop device must pass on
a flush (the loop driver turns a flush into an fsync of the image file) for every
acknowledged record; this is what makes it durable on the host's disk. And what
the volume's own file system has committed must be enough: it is stopped the way
a power cut stops it (the kernel's shutdown ioctl without a log flush, as fstests'
godown does: nothing more reaches the image), the driver is SIGKILLed, every mount
is forced away, and a new driver stages the volume again; every record
acknowledged by fsync must be there and the file system clean. (The host's own
disk cache is not cut here: the flush count stands for that half.) A raw block
volume is held to the same flush count, and its blocks must be there after a
driver crash, detached devices and a restage.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, DriverProcess, cleanup

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

MiB = 1 << 20
FS_IOC_SHUTDOWN = 0x8004587D  # EXT4_IOC_SHUTDOWN == XFS_IOC_GOINGDOWN
SHUTDOWN_NOLOGFLUSH = 2
RECORDS = 200


def _upper_of(staging: Path, state: Path) -> tuple[Path, Path, str]:
    """The upper layer's mount point, image and loop device behind a staged overlay."""
    entry = host.mount_at(staging)
    assert entry is not None and entry.fstype == "overlay"
    upper = next(o for o in entry.super_options.split(",") if o.startswith("upperdir="))
    layer_dir = state / upper.removeprefix("upperdir=").removesuffix("/mnt/upper")
    device = host.device_of(layer_dir / "mnt")
    assert device and device.startswith("/dev/loop"), device
    return layer_dir / "mnt", layer_dir / "image", device


def _flushes(device: str) -> int:
    fields = Path(f"/sys/block/{Path(device).name}/stat").read_text().split()
    return int(fields[15])  # flush requests completed (Documentation/block/stat.rst)


def _fs_check(image: Path, fs_type: str) -> None:
    argv = ["e2fsck", "-fn", str(image)] if fs_type == "ext4" else ["xfs_repair", "-n", "-f", str(image)]
    proc = host.run(argv, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_fsynced_records_survive_a_power_cut_and_driver_crash(tmp_path: Path, fs_type: str):
    drv = DriverProcess(tmp_path)
    drv.start()
    cap = mount_capability(fs_type=fs_type)
    staging, target = tmp_path / "kubelet" / "staging", tmp_path / "kubelet" / "target"
    staging.mkdir(parents=True)
    try:
        with Client(drv.sock) as c:
            vid = c.create_volume("durable", 320 * MiB, cap=cap).volume_id
            c.stage(vid, staging, cap)
            c.publish(vid, staging, target, cap=cap)
        mnt, image, device = _upper_of(staging, tmp_path / "state")
        assert Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1"

        flushes_before = _flushes(device)
        fd = os.open(target / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        acked = 0
        for i in range(RECORDS):
            os.write(fd, b"record %06d\n" % i)
            os.fsync(fd)
            acked = i + 1
        flushes = _flushes(device) - flushes_before
        assert flushes >= acked, f"{acked} fsyncs reached the host as only {flushes} flushes"

        # the power cut: the upper's file system stops where it is, its log unflushed
        dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(dfd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(dfd)
        with pytest.raises(OSError):
            os.write(fd, b"after the cut\n")
            os.fsync(fd)
        os.close(fd)
        drv.kill()
        cleanup(tmp_path)  # every mount forced away, every loop device detached
        assert not host.mounts_under(tmp_path)

        drv.start()
        with Client(drv.sock) as c:
            c.stage(vid, staging, cap)
            c.publish(vid, staging, target, cap=cap)
            lines = (target / "log").read_bytes().splitlines()
            assert lines[:acked] == [b"record %06d" % i for i in range(acked)]
            c.unpublish(vid, target)
            c.unstage(vid, staging)
            _fs_check(image, fs_type)
            c.delete_volume(vid)
    finally:
        drv.kill()
        cleanup(tmp_path)


def test_fsynced_blocks_of_a_block_volume_survive_a_driver_crash(tmp_path: Path):
    """A raw block volume: every fsync of the pod's device reaches the host as a flush of
    the loop device (an fsync of the image file), and the blocks are there after the
    driver is SIGKILLed, its devices detached and the volume staged again."""
    drv = DriverProcess(tmp_path)
    drv.start()
    cap = csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(),
        access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )
    staging, target = tmp_path / "kubelet" / "staging", tmp_path / "kubelet" / "dev"
    staging.mkdir(parents=True)
    blocks = [os.urandom(4096) for _ in range(RECORDS)]
    try:
        with Client(drv.sock) as c:
            vid = c.create_volume("durable-block", 64 * MiB, cap=cap).volume_id
            c.stage(vid, staging, cap)
            c.publish(vid, staging, target, cap=cap)
        rdev = os.stat(target).st_rdev  # the published node is the loop device itself
        device = "/dev/" + Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}").resolve().name
        assert Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1"
        flushes_before = _flushes(device)
        fd = os.open(target, os.O_WRONLY)
        try:
            for i, block in enumerate(blocks):
                os.pwrite(fd, block, i * 4096)
                os.fsync(fd)
        finally:
            os.close(fd)
        flushes = _flushes(device) - flushes_before
        assert flushes >= RECORDS, f"{RECORDS} fsyncs reached the host as only {flushes} flushes"
        drv.kill()
        cleanup(tmp_path)  # the publish bind and every loop device, as a reboot would
        assert not host.mounts_under(tmp_path)

        drv.start()
        with Client(drv.sock) as c:
            c.stage(vid, staging, cap)
            c.publish(vid, staging, target, cap=cap)
            with open(target, "rb") as f:
                assert [f.read(4096) for _ in blocks] == blocks
            c.unpublish(vid, target)
            c.unstage(vid, staging)
            c.delete_volume(vid)
    finally:
        drv.kill()
        cleanup(tmp_path)
