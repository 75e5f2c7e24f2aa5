"""Raw block volumes with real loop devices."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi
from csi_driver.store import Publication
from driver_harness import MOUNT_SKIP, Driver, cleanup, make_driver

MiB = 1 << 20
Mode = csi.VolumeCapability.AccessMode


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(), access_mode=csi.VolumeCapability.AccessMode(mode=mode)
    )


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


def device_size(path: Path) -> int:
    return int(
        subprocess.run(
            ["blockdev", "--getsize64", str(path)], capture_output=True, text=True, check=True
        ).stdout
    )


def pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def pread(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def reflink_works(directory: Path) -> bool:
    a, b = directory / ".reflink-probe", directory / ".reflink-probe2"
    a.write_bytes(b"x")
    try:
        return host.reflink(a, b)
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


def publish_block(
    d: Driver, vid: str, name: str, readonly: bool = False, mode: int = Mode.SINGLE_NODE_WRITER
) -> tuple[Path, Path]:
    staging, _ = d.paths(name)
    target = d.kubelet / "volumeDevices" / "publish" / name / "pod-uid"
    target.parent.mkdir(parents=True, exist_ok=True)
    d.client.stage(vid, staging, cap=block_cap(mode))
    d.client.publish(vid, staging, target, readonly=readonly, cap=block_cap(mode))
    return staging, target


def unpublish_block(d: Driver, vid: str, staging: Path, target: Path) -> None:
    d.client.unpublish(vid, target)
    d.client.unstage(vid, staging)


def test_block_lifecycle_snapshot_clone_expand(driver: Driver):
    c = driver.client
    vol = c.create_volume("blk", 64 * MiB, cap=block_cap())
    assert vol.capacity_bytes == 64 * MiB
    assert driver.engine.disk_usage() < MiB, "a block volume is sparse"
    staging, target = publish_block(driver, vol.volume_id, "blk")
    assert target.is_block_device(), "the publish path is a block device node"
    image = driver.engine.backend.layout.image(driver.engine.get_volume(vol.volume_id).upper)
    backing = {os.stat(dev).st_rdev: f for dev, f in host.loop_devices().items()}
    assert backing.get(os.stat(target).st_rdev) == str(image), "a loop device of the volume's image"
    assert device_size(target) == 64 * MiB
    pwrite(target, 10 * MiB, b"block-data")
    assert pread(target, 10 * MiB, 10) == b"block-data"
    if not reflink_works(driver.state):  # an in-use block volume is never copied torn
        assert code_of(c.create_snapshot, "blk-live", vol.volume_id) == grpc.StatusCode.FAILED_PRECONDITION
    unpublish_block(driver, vol.volume_id, staging, target)
    snap = c.create_snapshot("blk-snap", vol.volume_id)
    assert snap.size_bytes == 64 * MiB, "a block snapshot restores the whole device"
    staging, target = publish_block(driver, vol.volume_id, "blk")
    pwrite(target, 10 * MiB, b"after-snap")
    c.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi.CapacityRange(required_bytes=96 * MiB)
        )
    )
    assert device_size(target) == 96 * MiB, "the pod sees the new size online"
    assert pread(target, 10 * MiB, 10) == b"after-snap"
    unpublish_block(driver, vol.volume_id, staging, target)
    assert not target.exists()
    assert not [d for d, f in host.loop_devices().items() if f.startswith(str(driver.state))]

    restored = c.create_volume("blk-restore", 128 * MiB, snapshot=snap.snapshot_id, cap=block_cap())
    clone = c.create_volume("blk-clone", 96 * MiB, volume=vol.volume_id, cap=block_cap())
    for vid, name, want, size in (
        (restored.volume_id, "r", b"block-data", 128 * MiB),
        (clone.volume_id, "c", b"after-snap", 96 * MiB),
    ):
        staging, target = publish_block(driver, vid, name)
        assert pread(target, 10 * MiB, 10) == want
        assert device_size(target) == size
        unpublish_block(driver, vid, staging, target)
    assert (
        code_of(c.create_volume, "as-fs", 64 * MiB, snapshot=snap.snapshot_id)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(c.create_volume, "as-blk", 64 * MiB, volume=vol.volume_id) == grpc.StatusCode.INVALID_ARGUMENT
    )
    fs_vol = c.create_volume("fs", 16 * MiB)
    fs_snap = c.create_snapshot("fs-snap", fs_vol.volume_id)
    assert (
        code_of(c.create_volume, "fs-as-blk", 16 * MiB, snapshot=fs_snap.snapshot_id, cap=block_cap())
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    for vid in (vol.volume_id, restored.volume_id, clone.volume_id, fs_vol.volume_id):
        c.delete_volume(vid)
    c.delete_snapshot(snap.snapshot_id)
    c.delete_snapshot(fs_snap.snapshot_id)
    assert list(driver.engine.backend.layout.layers.iterdir()) == []


def test_block_readonly_publish(driver: Driver):
    c = driver.client
    vid = c.create_volume("ro", 16 * MiB, cap=block_cap()).volume_id
    staging, _ = driver.paths("ro")
    c.stage(vid, staging, cap=block_cap())
    rw = driver.kubelet / "rw-target"
    ro = driver.kubelet / "ro-target"
    c.publish(vid, staging, rw, cap=block_cap())
    c.publish(vid, staging, ro, readonly=True, cap=block_cap())
    pwrite(rw, 0, b"hello")
    with pytest.raises(OSError):
        pwrite(ro, 0, b"nope!")
    assert pread(ro, 0, 5) == b"hello"
    c.unpublish(vid, ro)
    c.unpublish(vid, rw)
    c.unstage(vid, staging)


def test_a_read_only_publish_never_takes_the_read_write_device(driver: Driver):
    """A read-only publication whose record names the volume's read-write device (a
    publish cut short, then a reboot whose restage got that device number) gets a
    read-only device of its own; its unpublish leaves the staging's device attached."""
    c = driver.client
    vid = c.create_volume("ro-rec", 16 * MiB, cap=block_cap()).volume_id
    staging, _ = driver.paths("ro-rec")
    c.stage(vid, staging, cap=block_cap())
    rw_device = driver.engine.get_volume(vid).stage_options["device"]
    ro = driver.kubelet / "ro-target"
    with driver.engine.store.tx() as tx:
        tx.add_publication(Publication(vid, str(ro), True, {"device": rw_device, "single_writer": False}))
    c.publish(vid, staging, ro, readonly=True, cap=block_cap())
    assert os.stat(ro).st_rdev != os.stat(rw_device).st_rdev, "a device of its own"
    with pytest.raises(OSError):
        pwrite(ro, 0, b"nope!")
    c.unpublish(vid, ro)
    assert host.loop_backing_file(rw_device) is not None, "the staging's device stays attached"
    assert driver.engine.block.is_staged(driver.engine.get_volume(vid))
    c.unstage(vid, staging)


def test_single_node_single_writer(driver: Driver):
    c = driver.client
    cap = mount_capability(Mode.SINGLE_NODE_SINGLE_WRITER)
    vid = c.create_volume("snsw", 16 * MiB, cap=cap).volume_id
    staging, target = driver.paths("snsw")
    c.stage(vid, staging, cap=cap)
    c.publish(vid, staging, target, cap=cap)
    c.publish(vid, staging, target, cap=cap)  # the same target again: idempotent
    other = driver.kubelet / "pods" / "other" / "mount"
    assert code_of(c.publish, vid, staging, other, cap=cap) == grpc.StatusCode.FAILED_PRECONDITION
    c.unpublish(vid, target)
    c.publish(vid, staging, other, cap=cap)
    c.unpublish(vid, other)
    c.unstage(vid, staging)


@pytest.mark.skipif(not shutil.which("mkfs.xfs"), reason="xfsprogs is not installed")
def test_in_use_block_snapshot_on_a_reflink_state_dir(tmp_path: Path):
    """On xfs (reflink), an in-use block volume is snapshotted and cloned at one instant."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    image, root = tmp_path / "xfs.img", tmp_path / "xfs"
    host.create_sparse(image, 2 << 30)
    host.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)])
    root.mkdir()
    host.run(["mount", "-t", "xfs", "-o", "loop", str(image), str(root)])
    try:
        d = make_driver(root)
        try:
            c = d.client
            vid = c.create_volume("live", 64 * MiB, cap=block_cap()).volume_id
            staging, target = publish_block(d, vid, "live")
            pwrite(target, 5 * MiB, b"in-use")
            snap = c.create_snapshot("live-snap", vid).snapshot_id
            clone = c.create_volume("live-clone", 64 * MiB, volume=vid, cap=block_cap()).volume_id
            pwrite(target, 5 * MiB, b"later!")
            for src, name in (
                (c.create_volume("r", 64 * MiB, snapshot=snap, cap=block_cap()).volume_id, "r"),
                (clone, "c"),
            ):
                s2, t2 = publish_block(d, src, name)
                assert pread(t2, 5 * MiB, 6) == b"in-use"
                unpublish_block(d, src, s2, t2)
            unpublish_block(d, vid, staging, target)
        finally:
            d.stop()
            cleanup(root)
    finally:
        host.umount(root)
    assert not cleanup(tmp_path)[1]


def test_block_loop_reattached_after_restart(tmp_path: Path):
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = make_driver(tmp_path)
    vid = d.client.create_volume("keep", 16 * MiB, cap=block_cap()).volume_id
    staging, target = publish_block(d, vid, "keep")
    pwrite(target, 0, b"persist")
    d.stop()
    try:
        d = make_driver(tmp_path)  # restart: the staged device is adopted, not detached
        assert pread(target, 0, 7) == b"persist"
        d.client.unpublish(vid, target)
        loops = [x for x, f in host.loop_devices().items() if f.startswith(str(tmp_path))]
        for dev in loops:  # the node reboots: devices vanish behind the driver's back
            host.loop_detach(dev)
        st = d.client.stats(vid, staging)
        assert st.volume_condition.abnormal
        d.client.stage(vid, staging, cap=block_cap())  # staged again: re-attached
        d.client.publish(vid, staging, target, cap=block_cap())
        assert pread(target, 0, 7) == b"persist"
        unpublish_block(d, vid, staging, target)
    finally:
        d.stop()
        mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops
