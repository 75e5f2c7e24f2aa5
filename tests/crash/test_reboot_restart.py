"""Node reboot (every mount and loop device gone behind the driver's back) and
driver restarts (SIGTERM, SIGKILL) while pods use their volumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import (
    MOUNT_SKIP,
    Driver,
    DriverProcess,
    assert_invariants,
    cleanup,
    read_files,
    teardown_all,
)

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

MiB = 1 << 20


def _paths(root: Path, name: str) -> tuple[Path, Path]:
    staging = root / "kubelet" / "staging" / name
    target = root / "kubelet" / "pods" / name / "mount"
    staging.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging, target


def _volumes_in_use(c: Client, root: Path) -> dict[str, tuple[str, Path, Path, bytes]]:
    """Two published volumes: a plain one and a restore (so it has a lower layer)."""
    out = {}
    plain = c.create_volume("plain", 64 * MiB).volume_id
    staging, target = _paths(root, "plain")
    c.stage(plain, staging)
    c.publish(plain, staging, target)
    (target / "f").write_bytes(b"plain" * 1000)
    snap = c.create_snapshot("s", plain).snapshot_id
    restored = c.create_volume("restored", 64 * MiB, snapshot=snap).volume_id
    out["plain"] = (plain, staging, target, b"plain" * 1000)
    staging, target = _paths(root, "restored")
    c.stage(restored, staging)
    c.publish(restored, staging, target)
    assert (target / "f").read_bytes() == b"plain" * 1000
    (target / "f").write_bytes(b"restored" * 1000)
    out["restored"] = (restored, staging, target, b"restored" * 1000)
    return out


def _reboot(root: Path) -> None:
    """Everything a reboot takes away: every mount below root, every loop device."""
    for m in host.mounts_under(root):
        host.umount(m.target)
    for dev in host.loops_under(root):
        host.loop_detach(dev)
    assert not host.mounts_under(root)


def _condition(c: Client, vid: str, path: Path) -> tuple[bool, list]:
    resp = c.node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path)))
    return resp.volume_condition.abnormal, list(resp.usage)


@pytest.mark.parametrize("driver_restarts", [False, True], ids=["driver-kept-running", "driver-restarted"])
def test_node_reboot(tmp_path: Path, driver_restarts: bool):
    d = Driver(tmp_path)
    try:
        vols = _volumes_in_use(d.client, tmp_path)
        _reboot(tmp_path)
        if driver_restarts:
            d.stop()
            d = Driver(tmp_path)
        c = d.client
        for vid, staging, target, _ in vols.values():
            for path in (staging, target):
                abnormal, _ = _condition(c, vid, path)
                assert abnormal, f"{path} is gone but reported healthy"
            status = c.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid)).status
            assert status.volume_condition.abnormal
        assert_invariants(tmp_path / "state", c, root=tmp_path)
        for vid, staging, target, data in vols.values():
            c.stage(vid, staging)
            c.publish(vid, staging, target)
            assert (target / "f").read_bytes() == data
            for path in (staging, target):
                abnormal, usage = _condition(c, vid, path)
                assert not abnormal and usage and usage[0].total > 0
        assert_invariants(tmp_path / "state", c, root=tmp_path)
        teardown_all(c, tmp_path / "state")
    finally:
        d.stop()
        cleanup(tmp_path)


WRITER = r"""
import os, signal, sys
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
print("open", flush=True)
i = 0
while not stop:
    os.write(fd, b"%d\n" % i)
    os.fsync(fd)
    i += 1
os.close(fd)
"""


def _lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_while_serving(tmp_path: Path, how: signal.Signals):
    proc = DriverProcess(tmp_path)
    writer = None
    d = None
    try:
        proc.start()
        with Client(proc.sock) as c:
            vols = _volumes_in_use(c, tmp_path)
        log = vols["plain"][2] / "log"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log)], stdout=subprocess.PIPE)
        assert writer.stdout is not None and writer.stdout.readline() == b"open\n"
        time.sleep(0.3)
        assert proc.proc is not None
        proc.proc.send_signal(how)
        assert proc.proc.wait(timeout=60) == (0 if how == signal.SIGTERM else -how)
        before = len(_lines(log))
        time.sleep(0.3)
        assert len(_lines(log)) > before, "the pod's writes stopped with the driver"
        d = Driver(tmp_path)  # the new driver adopts the staged volumes
        c = d.client
        assert_invariants(tmp_path / "state", c, root=tmp_path)
        before = len(_lines(log))
        time.sleep(0.3)
        assert len(_lines(log)) > before, "the pod's writes stopped after the restart"
        writer.terminate()
        assert writer.wait(timeout=30) == 0
        lines = _lines(log)
        assert lines == list(range(len(lines))), "the pod's file lost or reordered writes"
        for vid, _staging, target, data in vols.values():
            assert (target / "f").read_bytes() == data
            abnormal, usage = _condition(c, vid, target)
            assert not abnormal and usage and usage[0].total > 0
        files = read_files(c, tmp_path / "state", vols["plain"][0], tmp_path / "check")
        assert files["log"] == log.read_bytes()
        teardown_all(c, tmp_path / "state")
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        proc.kill()
        if d is not None:
            d.stop()
        cleanup(tmp_path)
        os.sync()


BLOCK = csi.VolumeCapability(
    block=csi.VolumeCapability.BlockVolume(),
    access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)


@pytest.mark.parametrize("driver_restarts", [False, True], ids=["driver-kept-running", "driver-restarted"])
def test_node_reboot_block_volume(tmp_path: Path, driver_restarts: bool):
    d = Driver(tmp_path)
    try:
        c = d.client
        vid = c.create_volume("blk", 16 * MiB, cap=BLOCK).volume_id
        staging, target = _paths(tmp_path, "blk")
        c.stage(vid, staging, BLOCK)
        c.publish(vid, staging, target, cap=BLOCK)
        data = os.urandom(65536)
        fd = os.open(target, os.O_WRONLY)
        os.pwrite(fd, data, 4096)
        os.fsync(fd)
        os.close(fd)
        _reboot(tmp_path)
        assert not [dev for dev, f in host.loop_devices().items() if f.startswith(str(tmp_path))]
        if driver_restarts:
            d.stop()
            d = Driver(tmp_path)
            c = d.client
        for path in (staging, target):
            abnormal, _ = _condition(c, vid, path)
            assert abnormal, f"{path} is gone but reported healthy"
        c.stage(vid, staging, BLOCK)
        c.publish(vid, staging, target, cap=BLOCK)
        with open(target, "rb") as f:
            f.seek(4096)
            assert f.read(65536) == data
        assert not _condition(c, vid, target)[0]
        assert_invariants(tmp_path / "state", c, root=tmp_path)
        teardown_all(c, tmp_path / "state")
    finally:
        d.stop()
        cleanup(tmp_path)
