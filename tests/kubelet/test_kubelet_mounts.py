"""Staging and publishing exactly as kubelet does them, with a kubelet dir under a temp path.

Follows kubernetes/kubernetes pkg/volume/csi/csi_attacher.go (MountDevice: the
globalmount path <kubelet>/plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount,
created 0750 by kubelet, vol_data.json beside it; UnmountDevice: NodeUnstage then
removeMountDir), csi_mounter.go (SetUpAt: only the parent of the target is created,
vol_data.json, podInfoOnMount volume_context, fsGroup; TearDownAt: NodeUnpublish then
removeMountDir), csi_client.go (request shapes, access mode mapping, NodeGetVolumeStats
and "usage is nil"), csi_metrics.go, pkg/volume/volume_linux.go (SetVolumeOwnership) and
pkg/volume/util/operationexecutor/operation_generator.go (MountDevice once per volume,
SetUp per pod, UnmountDevice after the last pod).
"""

from __future__ import annotations

import errno
import os
import stat

import grpc
import pytest
from kubelet_sim import (
    DRIVER_NAME,
    PVC,
    VOL_DATA_FILE,
    CSIDriverObject,
    NodeEnv,
    NodeRPC,
    Pod,
    StorageClass,
    VolumeSnapshot,
    mount_count,
    run_as,
)

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi
from driver_harness import store_dump

MiB = 1 << 20
Mode = csi.VolumeCapability.AccessMode


def last(node: NodeEnv, name: str):
    return [req for n, req in node.kubelet.calls if n == name][-1]


def test_paths_directories_and_requests(node: NodeEnv):
    """Before NodeStage kubelet has created globalmount (0750) and written vol_data.json
    {volumeHandle, driverName} in its parent; before NodePublish it has created only the
    parent of the target and vol_data.json there; the driver must create the target itself.
    NodeStage gets the PV's volume attributes (csiProvisionerIdentity); NodePublish gets them
    plus the podInfoOnMount keys with csi.storage.k8s.io/ephemeral "false"."""
    kubelet = node.kubelet
    pvc, pv = node.provision("paths", 32 * MiB)
    staging = kubelet.device_mount_path(pv)
    sha = staging.parent.name
    assert staging == kubelet.root / "plugins/kubernetes.io/csi" / DRIVER_NAME / sha / "globalmount"
    assert len(sha) == 64

    kubelet.mount_device(pv)
    # what the driver did: its overlay of this volume at globalmount, over the volume's own
    # upper (loop-mounted read-write), recorded as staged and reported as published
    vol = node.driver.engine.get_volume(pv.handle)
    assert vol.staging_path == str(staging)
    staged = host.mount_at(staging)
    assert staged.fstype == "overlay"
    assert f"upperdir=layers/{vol.upper}/mnt/upper" in staged.super_options.split(",")
    upper = host.mount_at(node.driver.engine.backend.layout.mnt(vol.upper))
    assert upper.fstype == "ext4" and "rw" in upper.options.split(",")
    got = node.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=pv.handle))
    assert list(got.status.published_node_ids) == ["node-1"]

    pod = Pod("web", namespace="shop", service_account="web-sa")
    target = kubelet.target_path(pod.uid, pv.name)
    assert target == kubelet.root / "pods" / pod.uid / "volumes/kubernetes.io~csi" / pv.name / "mount"
    assert not target.exists()
    kubelet.set_up(pod, pv)
    # the driver created the target and mounted the staged overlay there (one file system)
    published = host.mount_at(target)
    assert published.fstype == "overlay" and published.super_options == staged.super_options
    assert os.stat(target).st_dev == os.stat(staging).st_dev
    assert (target.stat().st_mode & 0o777) == (staging.stat().st_mode & 0o777)
    pubs = store_dump(node.driver.state)["publications"]
    assert [(p["volume_id"], p["target_path"]) for p in pubs] == [(pv.handle, str(target))]
    usage = node.client.node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(
        volume_id=pv.handle, volume_path=str(target))).usage
    assert 28 * MiB <= usage[0].total <= 40 * MiB, "the volume's own size, not the host's"
    (target / "index.html").write_text("hi")
    assert (staging / "index.html").read_text() == "hi"

    # TearDownAt: the driver removes the target it created (csi_mounter.go comment:
    # "Removal of target_path provided in the NodePublish RPC call ... MUST be done by the
    # CSI plugin"); kubelet only removes vol_data.json and the parent.
    kubelet._call("NodeUnpublishVolume", csi.NodeUnpublishVolumeRequest(
        volume_id=pv.handle, target_path=str(target)))
    assert not target.exists(), "NodeUnpublish must remove the target path it created"
    kubelet.remove_mount_dir(target)
    assert list((kubelet.root / "pods" / pod.uid / "volumes/kubernetes.io~csi").iterdir()) == []

    kubelet.unmount_device(staging)
    assert not staging.parent.exists(), "kubelet's removeMountDir must be able to remove <sha>/globalmount"
    assert list((kubelet.root / "plugins/kubernetes.io/csi" / DRIVER_NAME).iterdir()) == []
    node.provisioner.delete(pv)


def test_two_pods_on_one_node_share_a_volume(node: NodeEnv):
    """operation_generator.go: MountDevice (NodeStage) runs once per volume and node, SetUp
    (NodePublish) once per pod; UnmountDevice (NodeUnstage) only when no pod uses it."""
    pvc, pv = node.provision("shared", 32 * MiB)
    a, b = Pod("a"), Pod("b")
    ta = node.start_pod(a, pv)
    tb = node.start_pod(b, pv)
    assert [n for n, _ in node.kubelet.calls].count("NodeStageVolume") == 1
    (ta / "from-a").write_text("a")
    (tb / "from-b").write_text("b")
    assert (tb / "from-a").read_text() == "a" and (ta / "from-b").read_text() == "b"
    node.stop_pod(a, pv, last_user=False)
    assert not ta.exists()
    assert (tb / "from-a").read_text() == "a", "the other pod keeps its mount"
    (tb / "later").write_text("still writable")
    node.stop_pod(b, pv)
    node.provisioner.delete(pv)


def test_read_only_pod_and_read_only_many(node: NodeEnv):
    """A pod's persistentVolumeClaim.readOnly makes spec.ReadOnly, sent as
    NodePublishVolumeRequest.readonly (csi_mounter.go SetUpAt); other pods on the node stay
    writable. A ReadOnlyMany PV is staged and published with MULTI_NODE_READER_ONLY."""
    pvc, pv = node.provision("ro", 32 * MiB)
    writer, reader = Pod("writer"), Pod("reader")
    tw = node.start_pod(writer, pv)
    tr = node.start_pod(reader, pv, read_only=True)
    assert last(node, "NodePublishVolume").readonly is True
    (tw / "f").write_text("data")
    assert (tr / "f").read_text() == "data"
    with pytest.raises(OSError) as e:
        (tr / "g").write_text("nope")
    assert e.value.errno == errno.EROFS
    node.stop_pod(reader, pv, last_user=False)
    node.stop_pod(writer, pv)

    rox_pvc, rox = node.provision("rox", 32 * MiB, access_modes=["ReadOnlyMany"])
    p = Pod("rox-reader")
    t = node.start_pod(p, rox)
    assert last(node, "NodeStageVolume").volume_capability.access_mode.mode == Mode.MULTI_NODE_READER_ONLY
    assert last(node, "NodePublishVolume").volume_capability.access_mode.mode == Mode.MULTI_NODE_READER_ONLY
    with pytest.raises(OSError) as e:
        (t / "g").write_text("nope")
    assert e.value.errno == errno.EROFS
    node.stop_pod(p, rox)
    node.provisioner.delete(pv)
    node.provisioner.delete(rox)


def _restored(node: NodeEnv, name: str, **kw) -> tuple:
    """A claim restored from a snapshot of a volume a pod without fsGroup filled: its
    files (root:root, 0644, a directory 0755) come from a lower layer of the overlay."""
    src_pvc, src = node.provision(f"{name}-src", 32 * MiB)
    writer = Pod("writer")
    t = node.start_pod(writer, src)
    (t / "old").write_text("from the snapshot")
    (t / "dir").mkdir(mode=0o755)
    (t / "dir" / "nested").write_text("deeper")
    os.sync()
    vs = VolumeSnapshot(f"{name}-snap", source=src_pvc)
    content = node.snapshotter.create(vs)
    node.stop_pod(writer, src)
    claim = PVC(name=name, request=src_pvc.request, data_source=("VolumeSnapshot", vs), **kw)
    pv = node.provisioner.provision(claim, node.sc, "node-1")
    return pv, src, content


def _drop_restored(node: NodeEnv, pv, src, content) -> None:
    node.provisioner.delete(pv)
    node.snapshotter.delete(content)
    node.provisioner.delete(src)


def test_fs_group_is_never_delegated_to_the_driver(node: NodeEnv):
    """The driver does not announce VOLUME_MOUNT_GROUP, so kubelet (csi_attacher.go
    MountDevice, csi_mounter.go SetUpAt) never sends volume_mount_group and applies fsGroup
    itself, per fsGroupPolicy and fsGroupChangePolicy, as for other drivers."""
    assert NodeRPC.VOLUME_MOUNT_GROUP not in node.kubelet.node_caps()
    pvc, pv = node.provision("nodelegation", 32 * MiB)
    pod = Pod("app", fs_group=2000)
    node.start_pod(pod, pv)
    assert last(node, "NodeStageVolume").volume_capability.mount.volume_mount_group == ""
    assert last(node, "NodePublishVolume").volume_capability.mount.volume_mount_group == ""
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_fs_group_policy_none_changes_nothing(node: NodeEnv):
    """fsGroupPolicy None: supportsFSGroup is false, nothing is chowned, not the root nor
    the files a snapshot restore brought; the pod's non-root user cannot write the root."""
    node.kubelet.csidriver = CSIDriverObject(fs_group_policy="None")
    pv, src, content = _restored(node, "none")
    pod = Pod("app", fs_group=2000)
    target = node.start_pod(pod, pv)
    for p in (target, target / "old", target / "dir", target / "dir" / "nested"):
        assert p.stat().st_gid == 0, p
    assert not target.stat().st_mode & stat.S_ISGID
    rc, _ = run_as(1000, 1000, [2000], target, "echo hi > f")
    assert rc != 0, "without fsGroup the pod's user cannot write the volume's root"
    node.stop_pod(pod, pv)
    _drop_restored(node, pv, src, content)


def test_fs_group_policy_file_changes_every_file(node: NodeEnv):
    """fsGroupPolicy File: SetVolumeOwnership walks the pod's target after NodePublish:
    every entry, those restored from a snapshot included, gets the group and g+rw,
    directories also g+x and setgid; a pod user in the group can write them all."""
    node.kubelet.csidriver = CSIDriverObject(fs_group_policy="File")
    pv, src, content = _restored(node, "file")
    pod = Pod("app", fs_group=2000)
    target = node.start_pod(pod, pv)
    for p in (target, target / "old", target / "dir", target / "dir" / "nested"):
        st = p.stat()
        assert st.st_gid == 2000 and st.st_mode & 0o060 == 0o060, p
        assert st.st_uid == 0, "only the group changes"
    for d in (target, target / "dir"):
        assert d.stat().st_mode & (stat.S_ISGID | 0o010)
    script = "echo more >> old && echo more >> dir/nested && echo hi > dir/new && stat -c %g dir/new"
    rc, out = run_as(1000, 1000, [2000], target, script)
    assert rc == 0, out
    assert out == "2000", "new files belong to the fsGroup (setgid directory)"
    assert (target / "old").read_text() == "from the snapshotmore\n"
    # the change is on the volume, not on one mount: the staging path shows the same
    staged = node.kubelet.device_mount_path(pv) / "old"
    assert staged.stat().st_gid == 2000
    node.stop_pod(pod, pv)
    _drop_restored(node, pv, src, content)


@pytest.mark.parametrize(
    ("fstype", "modes", "applied"),
    [
        ("ext4", ["ReadWriteOnce"], True),
        ("", ["ReadWriteOnce"], False),  # no fsType: "skipping fsGroup, fsType not provided"
        ("ext4", ["ReadWriteOncePod"], False),  # hasReadWriteOnce: only ReadWriteOnce counts
    ],
)
def test_fs_group_policy_read_write_once_with_fs_type(node: NodeEnv, fstype: str, modes: list[str],
                                                      applied: bool):
    """fsGroupPolicy ReadWriteOnceWithFSType: kubelet applies fsGroup only to a PV with an
    fsType whose access modes include ReadWriteOnce."""
    node.kubelet.csidriver = CSIDriverObject(fs_group_policy="ReadWriteOnceWithFSType")
    node.sc = StorageClass(parameters={"csi.storage.k8s.io/fstype": fstype} if fstype else {})
    pvc, pv = node.provision("rwofs", 32 * MiB, access_modes=modes)
    assert pv.fs_type == fstype
    earlier = Pod("earlier")
    (node.start_pod(earlier, pv) / "old").write_text("x")
    node.stop_pod(earlier, pv)
    pod = Pod("app", fs_group=2000)
    target = node.start_pod(pod, pv)
    want = 2000 if applied else 0
    assert (target.stat().st_gid, (target / "old").stat().st_gid) == (want, want)
    assert bool(target.stat().st_mode & stat.S_ISGID) == applied
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


@pytest.mark.parametrize(("change_policy", "fixed"), [("OnRootMismatch", False), ("Always", True)])
def test_fs_group_change_policy(node: NodeEnv, change_policy: str, fixed: bool):
    """fsGroupChangePolicy (volume_linux.go skipPermissionChange / requiresPermissionChange):
    with OnRootMismatch a root that already has the group, g+rwx and setgid skips the walk,
    so a file whose group was changed back since stays so; Always walks again and fixes it."""
    node.kubelet.csidriver = CSIDriverObject(fs_group_policy="File")
    pvc, pv = node.provision("changepolicy", 32 * MiB)
    first = Pod("first", fs_group=2000)
    t1 = node.start_pod(first, pv)
    (t1 / "f").write_text("x")
    os.chown(t1 / "f", -1, 0)
    node.stop_pod(first, pv, last_user=False)
    second = Pod("second", fs_group=2000, fs_group_change_policy=change_policy)
    t2 = node.start_pod(second, pv)
    assert t2.stat().st_gid == 2000
    assert (t2 / "f").stat().st_gid == (2000 if fixed else 0)
    node.stop_pod(second, pv)
    node.provisioner.delete(pv)


def test_fs_group_is_not_applied_to_a_read_only_mount(node: NodeEnv):
    """supportsFSGroup returns false for a read-only mount: kubelet does not walk it. The
    read-only pod reads; the writer's files keep their group."""
    pvc, pv = node.provision("grp-ro", 32 * MiB)
    writer = Pod("w")
    tw = node.start_pod(writer, pv)
    (tw / "f").write_text("x")
    reader = Pod("r", fs_group=3000)
    tr = node.start_pod(reader, pv, read_only=True)
    assert (tr / "f").read_text() == "x"
    assert (tr / "f").stat().st_gid == 0 and tr.stat().st_gid == 0
    node.stop_pod(reader, pv, last_user=False)
    node.stop_pod(writer, pv)
    node.provisioner.delete(pv)


def test_volume_stats_polling(node: NodeEnv):
    """csi_metrics.go GetMetrics -> NodeGetVolumeStats(volume_id, volume_path = the pod's
    target), polled periodically by the stats provider. Usage must describe this volume,
    follow writes, and carry a healthy condition (VOLUME_CONDITION announced)."""
    pvc, pv = node.provision("stats", 64 * MiB)
    pod = Pod("p")
    target = node.start_pod(pod, pv)
    first = node.kubelet.get_metrics(pv.handle, target)
    assert pv.capacity <= first.capacity < pv.capacity * 1.3
    assert first.abnormal is False
    assert first.inodes > 0 and first.inodes_free > 0
    for _ in range(3):
        again = node.kubelet.get_metrics(pv.handle, target)
        assert abs(again.used - first.used) < MiB
    with open(target / "blob", "wb") as f:
        f.write(os.urandom(8 * MiB))
        os.fsync(f.fileno())
    after = node.kubelet.get_metrics(pv.handle, target)
    assert after.used - first.used >= 8 * MiB
    assert after.inodes_used == first.inodes_used + 1
    assert after.available <= first.available - 8 * MiB
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_volume_stats_report_a_lost_mount_to_kubelet(node: NodeEnv):
    """VOLUME_CONDITION: when the pod's mount is gone behind everyone's back, kubelet should
    learn "abnormal" from NodeGetVolumeStats (CSIVolumeHealth)."""
    pvc, pv = node.provision("lost", 32 * MiB)
    pod = Pod("p")
    target = node.start_pod(pod, pv)
    host.umount(target)
    try:
        m = node.kubelet.get_metrics(pv.handle, target)
        assert m.abnormal is True and m.message
    finally:
        node.stop_pod(pod, pv)
        node.provisioner.delete(pv)


def test_teardown_order(node: NodeEnv):
    """Pod deletion: TearDown (NodeUnpublish) for each pod, UnmountDevice (NodeUnstage) after
    the last, then the PVC's deletion makes the provisioner call DeleteVolume. Out of order,
    the driver refuses with FAILED_PRECONDITION (the provisioner and kubelet retry), and every
    step repeated after success is a success (kubelet and the provisioner retry)."""
    pvc, pv = node.provision("order", 32 * MiB)
    pod = Pod("p")
    target = node.start_pod(pod, pv)
    staging = node.kubelet.device_mount_path(pv)
    with pytest.raises(grpc.RpcError) as e:
        node.provisioner.delete(pv)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        node.client.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
            volume_id=pv.handle, staging_target_path=str(staging)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert host.is_mounted(target)

    node.kubelet.tear_down(pod.uid, pv.name)
    node.client.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=pv.handle, target_path=str(target)))
    node.kubelet.unmount_device(staging)
    node.client.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=pv.handle, staging_target_path=str(staging)))
    node.provisioner.delete(pv)
    node.provisioner.delete(pv)


def test_unpublish_while_the_pod_dir_is_being_removed(node: NodeEnv):
    """Kubelet retries TearDown from its actual state of world; by then the pod directory may
    be half gone: (1) the target and its pod dir were already removed (an earlier unpublish
    succeeded but was not recorded), (2) the target exists but is no longer a mount point
    (lost behind kubelet's back). NodeUnpublish must succeed in both, and leave nothing for
    kubelet's removeMountDir / orphaned pod cleanup to trip over."""
    pvc, pv = node.provision("orphan", 32 * MiB)
    a, b = Pod("a"), Pod("b")
    ta = node.start_pod(a, pv)
    tb = node.start_pod(b, pv)

    node.client.node.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id=pv.handle, target_path=str(ta)))
    # kubelet's orphaned-pod cleanup removes the (now unmounted, empty) pod dir
    (ta.parent / VOL_DATA_FILE).unlink()
    for d in (ta.parent, ta.parent.parent, ta.parent.parent.parent):
        d.rmdir()
    node.client.node.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id=pv.handle, target_path=str(ta)))

    host.umount(tb)  # the mount is lost, the directory stays
    assert tb.is_dir() and not host.is_mounted(tb)
    node.kubelet.tear_down(b.uid, pv.name)
    assert not tb.parent.exists()
    assert mount_count(tb) == 0
    node.kubelet.unmount_device(node.kubelet.device_mount_path(pv))
    node.provisioner.delete(pv)


def test_storage_class_mount_options_reach_the_mounts(node: NodeEnv):
    """StorageClass mountOptions are copied to the PV (controller.go Provision) and sent by
    kubelet as mount_flags in NodeStage (csi_attacher.go MountDevice: PV mountOptions) and
    NodePublish (csi_mounter.go SetUpAt); the pod's mount must carry them."""
    node.sc = StorageClass(mount_options=["noatime", "nodev"])
    pvc, pv = node.provision("opts", 32 * MiB)
    pod = Pod("p")
    target = node.start_pod(pod, pv)
    for path in (node.kubelet.device_mount_path(pv), target):  # NodeStage's mount and NodePublish's
        opts = host.mount_at(path).options.split(",")
        assert "noatime" in opts and "nodev" in opts, (path, opts)
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_read_write_once_pod(node: NodeEnv):
    """ReadWriteOncePod: kubelet maps it to SINGLE_NODE_SINGLE_WRITER because the node
    announces SINGLE_NODE_MULTI_WRITER (csi_client.go asSingleNodeMultiWriterCapableCSIAccessModeV1).
    One pod works normally; a second publication at another target is refused with
    FAILED_PRECONDITION (the scheduler would not place a second pod anyway)."""
    pvc, pv = node.provision("rwop", 32 * MiB, access_modes=["ReadWriteOncePod"])
    first = Pod("first")
    t = node.start_pod(first, pv)
    mode = last(node, "NodePublishVolume").volume_capability.access_mode.mode
    assert mode == Mode.SINGLE_NODE_SINGLE_WRITER
    (t / "f").write_text("only me")
    second = Pod("second")
    with pytest.raises(grpc.RpcError) as e:
        node.kubelet.set_up(second, pv)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not node.kubelet.pod_volume_dir(second.uid, pv.name).exists(), \
        "after a final error kubelet's removeMountDir must leave nothing behind"
    node.stop_pod(first, pv)
    node.provisioner.delete(pv)
