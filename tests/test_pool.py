"""``serve --pool-device``: a disk (a loop device stands in for one) formatted xfs
with reflink when empty, refused when it holds anything else, mounted as the
state dir; snapshots of volumes in use on it are clones, not copies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.pool import LABEL, PoolError, prepare
from driver_harness import REPO, Driver, available, cleanup, digest, needs_mounts, staged

MiB = 1 << 20
pytestmark = needs_mounts


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[str]:
    """An empty 4 GiB "disk": a loop device over a sparse file, detached after."""
    image = tmp_path / "disk.img"
    image.touch()
    os.truncate(image, 4 << 30)
    device = host.run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    try:
        yield device
    finally:
        cleanup(tmp_path / "node")
        host.umount(tmp_path / "elsewhere")
        host.loop_detach(device)


def test_an_empty_disk_is_formatted_and_in_use_snapshots_are_clones(tmp_path, disk):
    root = tmp_path / "node"
    root.mkdir()
    d = Driver(root, pool_device=disk)
    try:
        found = host.probe_signature(disk)
        assert found.get("TYPE") == "xfs" and found.get("LABEL") == LABEL
        assert host.mount_at(d.state).source == disk
        c = d.client
        vid, staging, target = d.published("pvc", 256 * MiB)
        (target / "data.bin").write_bytes(os.urandom(96 * MiB))
        os.sync()
        want = digest(target / "data.bin")
        before = available(d.state)
        snap = c.create_snapshot("snap", vid).snapshot_id  # in use: captured, not committed
        cost = before - available(d.state)
        assert cost < 16 * MiB, f"a clone of the image, not a copy of its 96 MiB ({cost / MiB:.1f} MiB)"
        (target / "data.bin").write_bytes(b"changed")

        restored = c.create_volume("restored", 256 * MiB, snapshot=snap).volume_id
        with staged(d, restored) as files:
            assert digest(files / "data.bin") == want
        c.unpublish(vid, target)
        c.unstage(vid, staging)
    finally:
        d.stop()

    # a restart finds the pool mounted; after a reboot (unmounted) it mounts it again, never formats
    d = Driver(root, pool_device=disk)
    d.stop()
    host.umount(root / "state")
    d = Driver(root, pool_device=disk)
    try:
        names = {v.name for v in d.engine.list_volumes(0, 0)}
        assert names == {"pvc", "restored"}, "the pool kept its volumes"
        with staged(d, restored) as files:
            assert digest(files / "data.bin") == want
    finally:
        d.stop()


def test_a_disk_with_another_file_system_is_refused_untouched(tmp_path, disk):
    host.run(["mkfs.ext4", "-q", "-L", "precious", disk])
    state = tmp_path / "node" / "state"
    with pytest.raises(PoolError, match="holds ext4 \\(label 'precious'\\).*--pool-device-wipe"):
        prepare(disk, state)
    assert host.probe_signature(disk).get("TYPE") == "ext4", "nothing was written to it"
    assert not host.is_mounted(state)

    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "serve", "--state-dir", str(state), "--pool-device", disk,
         "--endpoint", f"unix://{tmp_path}/csi.sock"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "not an overlay-csi pool" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    assert prepare(disk, state, wipe=True) == "formatted"
    assert host.probe_signature(disk).get("LABEL") == LABEL
    assert prepare(disk, state) == "already mounted"


def test_a_disk_mounted_elsewhere_or_not_a_disk_is_refused(tmp_path, disk):
    assert prepare(disk, tmp_path / "node" / "state") == "formatted"
    host.umount(tmp_path / "node" / "state")
    (tmp_path / "elsewhere").mkdir()
    host.mount(disk, tmp_path / "elsewhere", "xfs")
    with pytest.raises(PoolError, match="is mounted at"):
        prepare(disk, tmp_path / "node" / "state")
    with pytest.raises(PoolError, match="not a block device"):
        prepare(str(tmp_path / "disk.img"), tmp_path / "node" / "state")
    with pytest.raises(PoolError, match="No such file"):
        prepare("/dev/does-not-exist", tmp_path / "node" / "state")


def test_the_pool_device_of_this_node_comes_from_the_charts_map(tmp_path):
    from csi_driver.cli.serve import _pool_device_of

    devices = tmp_path / "devices.json"
    devices.write_text('{"node-a": "/dev/sdb", "node-b": "/dev/nvme1n1"}')
    assert _pool_device_of(str(devices), "node-b") == "/dev/nvme1n1"
    assert _pool_device_of(str(devices), "node-c") == "", "a node without a device keeps its state dir"
    devices.write_text('["/dev/sdb"]')
    with pytest.raises(ValueError):
        _pool_device_of(str(devices), "node-a")
