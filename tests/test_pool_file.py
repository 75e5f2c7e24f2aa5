"""``serve --pool-file``: a sparse file on the host made the pool (xfs, reflink) and
mounted as the state dir: created on first start, found again after a restart and
after a reboot, a foreign file refused, today's plain state dir kept working; and
the host's free space bounds what volumes are given. Also the limit on what a
snapshot of a volume in use may copy where the state dir cannot clone.

The "host" file system is a small ext4 image of the test's own, so the host's
free space is known and nothing outside the test fills."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from test_block import block_cap, publish_block, unpublish_block

from csi_driver import host
from csi_driver.doctor.check import FAIL, OK, WARN
from csi_driver.doctor.setup import check_setup
from csi_driver.engine.capacity import CapacityPolicy
from csi_driver.host import loopdev
from csi_driver.pool import LABEL, PoolError
from csi_driver.pool_file import HostBoundSpace, prepare
from csi_driver.proto import csi_pb2 as csi
from driver_harness import REPO, Driver, available, cleanup, digest, needs_mounts, staged

MiB = 1 << 20
GiB = 1 << 30
pytestmark = needs_mounts


@pytest.fixture
def host_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Makes a "host" ext4 file system of the given size (on a disk of the given
    sector size: 4 KiB, or 512 bytes as most disks), mounted; everything under
    the test's dir is unmounted and detached after."""

    def make(size: int, sector: int = loopdev.FS_SECTOR) -> Path:
        image, mnt = tmp_path / "host.img", tmp_path / "host"
        image.touch()
        os.truncate(image, size)
        host.run(["mkfs.ext4", "-q", "-m", "0", str(image)])
        mnt.mkdir()
        with loopdev.attached(image, sector_size=sector, autoclear=True) as device:
            host.mount(device, mnt, "ext4")
        return mnt

    try:
        yield make
    finally:
        cleanup(tmp_path)


def size_of(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def logical_block_size(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/queue/logical_block_size").read_text())


def pool_loop(pool: Path) -> str:
    """The loop device holding the pool file ("" when none)."""
    st = os.stat(pool)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    return next((d for d, ids in host.loop_backing_ids().items() if ids == want), "")


def test_the_pool_file_is_created_then_found_after_a_restart_and_a_reboot(tmp_path, host_fs):
    hostdir = host_fs(1 * GiB)
    pool, root = hostdir / "pool" / "pool.img", tmp_path / "node"
    root.mkdir()
    planned = check_setup(root / "state", str(pool))
    assert planned.status == OK and "serve creates it" in planned.message, planned
    d = Driver(root, pool_file=str(pool))
    try:
        assert d.server.pool_file.done == "created"
        doctor = check_setup(d.state, str(pool))
        assert doctor.status == OK and doctor.message.startswith(f"pool file {pool}"), doctor
        assert "clone of its image (O(1)" in doctor.message
        assert os.path.getsize(pool) == size_of(hostdir) // 4096 * 4096, "the host fs's size by default"
        assert host.allocated_bytes(pool) < os.path.getsize(pool) // 4, "sparse"
        device = pool_loop(pool)
        assert host.mount_at(d.state).source == device and host.mount_at(d.state).fstype == "xfs"
        assert loopdev.direct_io(device), "a direct-I/O loop device"
        assert logical_block_size(device) == 4096, "a 4 KiB disk takes direct I/O in 4 KiB blocks only"
        found = host.probe_signature(device)
        assert found.get("TYPE") == "xfs" and found.get("LABEL") == LABEL

        c = d.client
        vid, staging, target = d.published("pvc", 128 * MiB)
        (target / "data.bin").write_bytes(os.urandom(48 * MiB))
        os.sync()
        want = digest(target / "data.bin")
        before = available(hostdir)
        snap = c.create_snapshot("snap", vid).snapshot_id  # in use: a clone in the pool
        assert before - available(hostdir) < 8 * MiB, "a clone, not a copy of 48 MiB"
        c.unpublish(vid, target)
        c.unstage(vid, staging)
    finally:
        d.stop()
    assert host.mount_at(root / "state").source == device, "stopping leaves the pool mounted"

    d = Driver(root, pool_file=str(pool))  # a restart
    try:
        assert d.server.pool_file.done == "already mounted"
        assert {v.name for v in d.engine.list_volumes(0, 0)} == {"pvc"}
    finally:
        d.stop()

    host.umount(root / "state")  # a reboot: no mount, no loop device
    assert pool_loop(pool) == "", "the loop device went with the mount"
    d = Driver(root, pool_file=str(pool))
    try:
        assert d.server.pool_file.done == "mounted", "attached and mounted again, never formatted"
        restored = d.client.create_volume("restored", 128 * MiB, snapshot=snap).volume_id
        with staged(d, restored) as files:
            assert digest(files / "data.bin") == want
    finally:
        d.stop()

    host.umount(root / "state")  # attached (by someone) but not mounted: mounted
    manual = host.run(["losetup", "--find", "--show", str(pool)]).stdout.strip()
    try:
        d = Driver(root, pool_file=str(pool))
        try:
            assert d.server.pool_file.done == "mounted"
            assert host.mount_at(d.state).source == manual
            assert {v.name for v in d.engine.list_volumes(0, 0)} == {"pvc", "restored"}
        finally:
            d.stop()
    finally:
        host.umount(root / "state")
        host.loop_detach(manual)


@pytest.mark.parametrize("host_sector", [512, 4096])
def test_a_new_pool_has_the_hosts_smallest_direct_io_sectors_so_block_volumes_run_direct_io(
    tmp_path, host_fs, host_sector
):
    """A raw block volume has 512-byte sectors; its loop device runs direct I/O on
    the pool only where the pool's xfs has sectors that small, else the kernel
    runs it buffered and caches its pages twice (pool_file.new_pool_sector)."""
    hostdir = host_fs(1 * GiB, sector=host_sector)
    pool, root = hostdir / "pool.img", tmp_path / "node"
    root.mkdir()
    d = Driver(root, pool_file=str(pool))
    try:
        device = pool_loop(pool)
        assert loopdev.direct_io(device), "the pool's own device runs direct I/O on either disk"
        assert logical_block_size(device) == host_sector
        assert host.sector_size_of(pool) == host_sector, "the pool's xfs has the device's sectors"
        vid = d.client.create_volume("raw", 64 * MiB, cap=block_cap()).volume_id
        staging, target = publish_block(d, vid, "raw")
        raw = next(dev for dev in host.loop_devices() if os.stat(dev).st_rdev == os.stat(target).st_rdev)
        assert loopdev.direct_io(raw) is (host_sector == 512), "direct I/O wherever the host allows it"
        unpublish_block(d, vid, staging, target)
        doctor = check_setup(d.state, str(pool))
        assert doctor.status == OK, doctor
        assert ("raw block volumes on it run buffered" in doctor.message) is (host_sector == 4096), doctor
    finally:
        d.stop()


def test_a_pool_made_with_4k_sectors_keeps_them(tmp_path, host_fs):
    """Pools made before pools took the host's smallest sectors are attached as they
    were made: an xfs cannot live on a device with larger sectors than its own, and
    one with 4 KiB sectors gains nothing from a 512-byte device."""
    hostdir = host_fs(1 * GiB, sector=512)
    pool, state = hostdir / "pool.img", tmp_path / "state"
    pool.touch()
    os.truncate(pool, 512 * MiB)
    with loopdev.attached(pool, sector_size=loopdev.FS_SECTOR) as device:
        host.mkfs_pool(device, LABEL, ["-m", "reflink=1", "-s", "size=4096"])
    assert prepare(pool, state).done == "mounted"
    try:
        assert logical_block_size(host.mount_at(state).source) == 4096
        doctor = check_setup(state, str(pool))
        assert doctor.status == WARN and "a pool made before" in doctor.message, doctor
        assert "remove the pool file" in doctor.fix
    finally:
        host.umount(state)


def test_a_foreign_pool_file_is_refused_untouched(tmp_path, host_fs):
    hostdir = host_fs(512 * MiB)
    state = tmp_path / "node" / "state"
    foreign = hostdir / "ext4.img"
    foreign.touch()
    os.truncate(foreign, 320 * MiB)
    host.run(["mkfs.ext4", "-q", "-L", "precious", str(foreign)])
    was = digest(foreign)
    with pytest.raises(PoolError, match="holds ext4 \\(label 'precious'\\), not an overlay-csi pool"):
        prepare(foreign, state)
    data = hostdir / "data.bin"
    data.write_bytes(b"x" * MiB)
    with pytest.raises(PoolError, match="holds data, not an overlay-csi pool"):
        prepare(data, state)
    with pytest.raises(PoolError, match="lies under the state dir"):
        prepare(state / "pool.img", state)
    assert digest(foreign) == was and data.read_bytes() == b"x" * MiB, "nothing was written"
    assert not host.is_mounted(state) and pool_loop(foreign) == ""
    assert check_setup(state, str(foreign)).status == FAIL

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "csi_driver",
            "serve",
            "--state-dir",
            str(state),
            "--pool-file",
            str(foreign),
            "--endpoint",
            f"unix://{tmp_path}/csi.sock",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not an overlay-csi pool" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_plain_state_dir_with_volumes_is_served_as_it_is(tmp_path, host_fs):
    hostdir = host_fs(512 * MiB)
    root, pool = hostdir / "node", hostdir / "pool.img"
    root.mkdir()
    d = Driver(root)  # today's layout: the store on the host's file system
    try:
        vid = d.client.create_volume("old", 64 * MiB).volume_id
        with_data, _ = d.paths("old")
        d.client.stage(vid, with_data)
        (with_data / "kept").write_text("yes")
        d.client.unstage(vid, with_data)
    finally:
        d.stop()
    d = Driver(root, pool_file=str(pool))
    try:
        assert d.server.pool_file.done == "not used"
        assert "docs/operations.md" in d.server.pool_file.why
        assert not pool.exists() and not host.is_mount_point(d.state)
        doctor = check_setup(d.state, str(pool))
        assert doctor.status == WARN and "would not be used" in doctor.message, doctor
        staging, _ = d.paths("old")
        d.client.stage(vid, staging)
        assert (staging / "kept").read_text() == "yes"
        d.client.unstage(vid, staging)
    finally:
        d.stop()


def test_admission_and_the_volumes_writes_are_bounded_by_the_hosts_free_space(tmp_path, host_fs):
    hostdir = host_fs(640 * MiB)
    pool, root = hostdir / "pool.img", tmp_path / "node"
    root.mkdir()
    host_size = size_of(hostdir)
    margin = host_size // 10  # --host-reserve 10%
    d = Driver(root, pool_file=str(pool), pool_file_size=2 * GiB)
    try:
        assert os.path.getsize(pool) == 2 * GiB, "a pool larger than its host"
        pool_free, host_free = available(d.state), available(hostdir)
        assert pool_free > host_free + 512 * MiB
        room = d.client.controller.GetCapacity(csi.GetCapacityRequest()).available_capacity
        assert 0 < room <= host_free - margin, "what may be promised is bounded by the host"
        with pytest.raises(grpc.RpcError) as e:
            d.client.create_volume("too-big", host_free)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        space = HostBoundSpace(d.state, pool)
        assert space.free_bytes() <= host_free - margin
    finally:
        d.stop()

    # overprovisioned, a volume larger than the host may be made; its writes stop in it
    d = Driver(root, pool_file=str(pool), capacity=CapacityPolicy(ratio=4.0))
    try:
        assert d.server.pool_file.done == "already mounted"
        c = d.client
        vid, staging, target = d.published("big", 1 * GiB)
        written, failed = 0, None
        chunk = os.urandom(MiB)
        with open(target / "fill.bin", "wb") as f:
            try:
                while written < 1 * GiB:  # bounded: the volume's size
                    f.write(chunk)
                    written += MiB
                    if written % (16 * MiB) == 0:
                        os.fsync(f.fileno())
                os.fsync(f.fileno())
            except OSError as err:
                failed = err.errno
        assert failed == errno.ENOSPC, f"wrote {written >> 20} MiB without ENOSPC"
        assert written < host_free, "stopped inside the volume, before the host ran out"
        os.sync()
        assert available(hostdir) >= margin, "the host kept its margin"
        entry = host.mount_at(d.state)
        assert entry.options.split(",")[0] == "rw" and "shutdown" not in entry.super_options
        (d.state / "tmp" / "probe").write_bytes(b"the pool still takes writes")
        os.sync()
        (d.state / "tmp" / "probe").unlink()
        (target / "fill.bin").unlink()
        c.unpublish(vid, target)
        c.unstage(vid, staging)
        c.delete_volume(vid)
    finally:
        d.stop()
    host.umount(root / "state")
    check = host.run(["xfs_repair", "-n", "-f", str(pool)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
