"""The rest of the CSI surface with real mounts: ephemeral inline volumes, mutable
parameters, group snapshots, fsGroup, mount options, expansion, volume health."""

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
from driver_harness import Driver, online_ext4_growth_missing

MiB = 1 << 20
Mode = csi.VolumeCapability.AccessMode
EPHEMERAL = "csi.storage.k8s.io/ephemeral"


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


EXT4_GROWTH_MISSING = online_ext4_growth_missing()


def staged(d: Driver, name: str, size: int = 64 * MiB, cap=None, **kw) -> tuple[str, Path, Path]:
    vid = d.client.create_volume(name, size, cap=cap, **kw).volume_id
    staging, target = d.paths(name)
    d.client.stage(vid, staging, cap=cap)
    d.client.publish(vid, staging, target, cap=cap)
    return vid, staging, target


def teardown(d: Driver, vid: str, staging: Path, target: Path) -> None:
    d.client.unpublish(vid, target)
    d.client.unstage(vid, staging)
    d.client.delete_volume(vid)


def test_ephemeral_inline_volume(driver: Driver):
    node = driver.client.node
    target = driver.kubelet / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "scratch" / "mount"
    target.parent.mkdir(parents=True)
    req = csi.NodePublishVolumeRequest(
        volume_id="csi-0123abcd",
        target_path=str(target),
        volume_capability=mount_capability(),
        volume_context={
            EPHEMERAL: "true",
            "size": "48Mi",
            "csi.storage.k8s.io/pod.name": "p",
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/pod.uid": "uid-1",
            "csi.storage.k8s.io/serviceAccount.name": "default",
        },
    )
    node.NodePublishVolume(req)
    node.NodePublishVolume(req)  # kubelet retries: idempotent
    (target / "f").write_text("scratch")
    st = os.statvfs(target)
    assert 48 * MiB <= st.f_bavail * st.f_frsize < 64 * MiB
    stats = driver.client.stats("csi-0123abcd", target)
    assert not stats.volume_condition.abnormal
    node.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id="csi-0123abcd", target_path=str(target))
    )
    assert not target.exists()
    assert driver.engine.list_volumes(0, 100) == [], "the inline volume is deleted with its pod"
    assert list(driver.engine.backend.layout.layers.iterdir()) == []
    bad = csi.NodePublishVolumeRequest(
        volume_id="csi-x",
        target_path=str(target),
        volume_capability=mount_capability(),
        volume_context={EPHEMERAL: "true", "colour": "blue"},
    )
    assert code_of(node.NodePublishVolume, bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_modify_volume_changes_real_settings(driver: Driver):
    ctl = driver.client.controller
    vid, staging, target = staged(driver, "mod", 128 * MiB)
    before = os.statvfs(target)
    ctl.ControllerModifyVolume(
        csi.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters={"reservedPercent": "20", "readAheadKiB": "1024"}
        )
    )
    after = os.statvfs(target)
    assert after.f_bavail * after.f_frsize < before.f_bavail * before.f_frsize - 20 * MiB
    device = host.device_of(driver.engine.backend.layout.mnt(driver.engine.get_volume(vid).upper))
    ra = subprocess.run(["blockdev", "--getra", device], capture_output=True, text=True, check=True)
    assert int(ra.stdout) == 2048
    ctl.ControllerModifyVolume(
        csi.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"discard": "false"})
    )
    upper_mnt = driver.engine.backend.layout.mnt(driver.engine.get_volume(vid).upper)
    assert "discard" not in host.mount_at(upper_mnt).super_options
    bad = csi.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"XXX": "1", "discard": "true"})
    assert code_of(ctl.ControllerModifyVolume, bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert driver.engine.get_volume(vid).mutable == {
        "reservedPercent": "20",
        "readAheadKiB": "1024",
        "discard": "false",
    }, "a refused call changes nothing"
    teardown(driver, vid, staging, target)
    # kept across unstage/stage: applied again at the next stage
    vid, staging, target = staged(driver, "mod2", 128 * MiB)
    ctl.ControllerModifyVolume(
        csi.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"commitSeconds": "30"})
    )
    driver.client.unpublish(vid, target)
    driver.client.unstage(vid, staging)
    driver.client.stage(vid, staging)
    assert (
        "commit=30"
        in host.mount_at(driver.engine.backend.layout.mnt(driver.engine.get_volume(vid).upper)).super_options
    )
    driver.client.unstage(vid, staging)


def test_group_snapshot_is_consistent_across_members(driver: Driver):
    c = driver.client
    from csi_driver.proto import csi_pb2_grpc

    group = csi_pb2_grpc.GroupControllerStub(c.channel)
    caps = group.GroupControllerGetCapabilities(csi.GroupControllerGetCapabilitiesRequest())
    assert (
        caps.capabilities[0].rpc.type
        == csi.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    )
    a, sa, ta = staged(driver, "db-data")
    b = c.create_volume("db-log", 64 * MiB).volume_id  # detached member
    (ta / "row").write_text("committed")
    req = csi.CreateVolumeGroupSnapshotRequest(name="g1", source_volume_ids=[a, b])
    g = group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert g.ready_to_use and len(g.snapshots) == 2
    assert group.CreateVolumeGroupSnapshot(req).group_snapshot.group_snapshot_id == g.group_snapshot_id
    other = csi.CreateVolumeGroupSnapshotRequest(name="g1", source_volume_ids=[a])
    assert code_of(group.CreateVolumeGroupSnapshot, other) == grpc.StatusCode.ALREADY_EXISTS
    got = group.GetVolumeGroupSnapshot(
        csi.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id)
    )
    assert {s.source_volume_id for s in got.group_snapshot.snapshots} == {a, b}
    snap_a = next(s for s in g.snapshots if s.source_volume_id == a)
    assert snap_a.group_snapshot_id == g.group_snapshot_id
    r = c.create_volume("r", 64 * MiB, snapshot=snap_a.snapshot_id).volume_id
    staging, _ = driver.paths("r")
    c.stage(r, staging)
    assert (staging / "row").read_text() == "committed"
    c.unstage(r, staging)
    group.DeleteVolumeGroupSnapshot(
        csi.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=g.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in g.snapshots]
        )
    )
    assert (
        code_of(
            group.GetVolumeGroupSnapshot,
            csi.GetVolumeGroupSnapshotRequest(group_snapshot_id=g.group_snapshot_id),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    c.unpublish(a, ta)
    c.unstage(a, sa)


def test_volume_mount_group_without_recursive_chown(driver: Driver):
    cap = csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(volume_mount_group="4321"),
        access_mode=csi.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
    )
    vid, staging, target = staged(driver, "fsgroup", cap=cap)
    st = os.stat(target)
    assert st.st_gid == 4321 and st.st_mode & 0o2070 == 0o2070
    pid = os.fork()
    if pid == 0:  # a pod process: uid 1000, supplementary group 4321 only
        try:
            os.chdir(target)  # the pod's view starts at its mount; the temp dirs above are root's
            os.setgroups([4321])
            os.setgid(4321)
            os.setuid(1000)
            Path("by-pod").write_text("ok")
            os._exit(0 if os.stat("by-pod").st_gid == 4321 else 2)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    teardown(driver, vid, staging, target)


def test_mount_options_are_honoured_or_refused(driver: Driver):
    cap = mount_capability(flags=["noexec", "nosuid", "noatime"])
    vid, staging, target = staged(driver, "opts", cap=cap)
    for path in (staging, target):  # the stage's new mount (fsmount) and the publish's bind
        opts = host.mount_at(path).options.split(",")
        assert "noexec" in opts and "nosuid" in opts and "noatime" in opts, (path, opts)
    teardown(driver, vid, staging, target)
    bad = mount_capability(flags=["data=journal"])
    assert code_of(driver.client.create_volume, "bad", MiB, cap=bad) == grpc.StatusCode.INVALID_ARGUMENT
    vcap = csi.ValidateVolumeCapabilitiesRequest(
        volume_id=driver.client.create_volume("v", MiB).volume_id,
        volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)],
    )
    resp = driver.client.controller.ValidateVolumeCapabilities(vcap)
    assert not resp.HasField("confirmed") and "not supported" in resp.message


@pytest.mark.skipif(not shutil.which("mkfs.xfs"), reason="xfsprogs is not installed")
def test_online_expansion_xfs(driver: Driver):
    cap = mount_capability(fs_type="xfs")
    vid, staging, target = staged(driver, "grow", 320 * MiB, cap=cap)
    (target / "keep").write_bytes(b"x" * MiB)
    resp = driver.client.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=640 * MiB)
        )
    )
    assert resp.capacity_bytes == 640 * MiB and resp.node_expansion_required
    driver.client.node.NodeExpandVolume(
        csi.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=str(target),
            staging_target_path=str(staging),
            capacity_range=csi.CapacityRange(required_bytes=640 * MiB),
        )
    )
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize >= 600 * MiB, "the pod sees the new size online"
    assert (target / "keep").read_bytes() == b"x" * MiB
    shrink = csi.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=100 * MiB, limit_bytes=100 * MiB)
    )
    assert code_of(driver.client.controller.ControllerExpandVolume, shrink) == grpc.StatusCode.OUT_OF_RANGE
    teardown(driver, vid, staging, target)


def test_offline_expansion_ext4(driver: Driver):
    c = driver.client
    vid = c.create_volume("grow4", 64 * MiB).volume_id
    staging, _ = driver.paths("grow4")
    c.stage(vid, staging)
    (staging / "keep").write_text("data")
    c.unstage(vid, staging)
    resp = c.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=256 * MiB)
        )
    )
    assert resp.capacity_bytes == 256 * MiB and not resp.node_expansion_required
    c.stage(vid, staging)
    st = os.statvfs(staging)
    assert st.f_bavail * st.f_frsize >= 256 * MiB
    assert (staging / "keep").read_text() == "data"
    c.unstage(vid, staging)


@pytest.mark.skipif(bool(EXT4_GROWTH_MISSING), reason=EXT4_GROWTH_MISSING or "ok")
def test_online_expansion_ext4(driver: Driver):
    """Runs where online_ext4_growth_missing() is '' (a privileged node plugin): the mounted
    ext4 grows while the pod keeps its data, and the driver reports the new size."""
    vid, staging, target = staged(driver, "grow-online", 64 * MiB)
    (target / "keep").write_bytes(b"k" * MiB)
    driver.client.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=256 * MiB)
        )
    )
    resp = driver.client.node.NodeExpandVolume(
        csi.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(target), capacity_range=csi.CapacityRange(required_bytes=256 * MiB)
        )
    )
    assert resp.capacity_bytes >= 256 * MiB
    st = os.statvfs(target)
    assert st.f_bavail * st.f_frsize >= 256 * MiB
    assert (target / "keep").read_bytes() == b"k" * MiB
    got = driver.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid))
    assert got.volume.capacity_bytes == resp.capacity_bytes
    teardown(driver, vid, staging, target)


def test_online_ext4_without_capability_is_a_clear_precondition(driver: Driver):
    if not EXT4_GROWTH_MISSING:
        pytest.skip("this machine can grow ext4 online (test_online_expansion_ext4 runs instead)")
    vid, staging, target = staged(driver, "no-cap", 64 * MiB)
    driver.client.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=128 * MiB)
        )
    )
    with pytest.raises(grpc.RpcError) as e:
        driver.client.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=str(target),
                capacity_range=csi.CapacityRange(required_bytes=128 * MiB),
            )
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CAP_SYS_RESOURCE" in e.value.details()
    teardown(driver, vid, staging, target)


def test_refused_online_ext4_growth_changes_nothing(driver: Driver):
    if not EXT4_GROWTH_MISSING:
        pytest.skip("this machine can grow ext4 online (test_online_expansion_ext4 runs instead)")
    vid, staging, target = staged(driver, "no-cap-node", 64 * MiB)
    image = driver.engine.backend.layout.image(driver.engine.get_volume(vid).upper)
    size = image.stat().st_size

    def node_expand(required: int) -> csi.NodeExpandVolumeResponse:
        return driver.client.node.NodeExpandVolume(
            csi.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=str(target),
                capacity_range=csi.CapacityRange(required_bytes=required),
            )
        )

    with pytest.raises(grpc.RpcError) as e:
        node_expand(128 * MiB)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert image.stat().st_size == size, "the image stays at the size its file system has"
    assert driver.engine.get_volume(vid).capacity_bytes == 64 * MiB
    assert node_expand(64 * MiB).capacity_bytes == 64 * MiB  # nothing left half-grown to trip over
    teardown(driver, vid, staging, target)


def test_condition_reports_read_only_remount(driver: Driver):
    vid, staging, target = staged(driver, "sick")
    assert not driver.client.stats(vid, target).volume_condition.abnormal
    mnt = driver.engine.backend.layout.mnt(driver.engine.get_volume(vid).upper)
    host.run(["mount", "-o", "remount,ro", str(mnt)])  # what ext4 errors=remount-ro does
    got = driver.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid))
    assert got.status.volume_condition.abnormal and "read-only" in got.status.volume_condition.message
    host.run(["mount", "-o", "remount,rw", str(mnt)])
    teardown(driver, vid, staging, target)


@pytest.mark.parametrize("how", ["remount-ro", "shutdown"])
def test_a_volume_whose_file_system_stopped_writing_is_reported_abnormal(driver, how):
    """ext4 stops writing after an I/O error (remounted read-only, or "emergency_ro"
    while its options still say rw) or a shutdown: the volume's condition says so."""
    import fcntl
    import struct

    c = driver.client
    vid = c.create_volume("broken", 64 * MiB).volume_id
    staging, target = driver.paths("broken")
    c.stage(vid, staging)
    c.publish(vid, staging, target)
    assert not c.stats(vid, target).volume_condition.abnormal
    upper_mnt = driver.engine.backend.layout.mnt(driver.engine.get_volume(vid).upper)
    if how == "remount-ro":
        host.remount(upper_mnt, ["ro"])
    else:
        fd = os.open(upper_mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))  # FS_IOC_SHUTDOWN, NOLOGFLUSH
        finally:
            os.close(fd)
    condition = c.stats(vid, target).volume_condition
    assert condition.abnormal and "no longer writes" in condition.message
    c.unpublish(vid, target)
    c.unstage(vid, staging)
