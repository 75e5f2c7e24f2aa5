"""Node-side calls as kubelet makes them in the cases the happy path does not show.

* Block stats: csi_plugin.go NewBlockVolumeMapper asks NodeGetVolumeStats at
  volumeDevices/<pv>/dev/<podUID>, util.go MapBlockVolume's bind mount of the publish path.
* Unstage after a reboot of a volume deleted meanwhile: reconstruct.go, then
  csi_attacher.go UnmountDevice / csi_block.go TearDownDevice, retried forever on error.
* seLinuxMount: pkg/volume/util/selinux.go AddSELinuxMountOption at NodeStage and
  NodePublish (csi_attacher.go MountDevice, csi_mounter.go SetUpAt).
* Online block expansion: operation_generator.go GenerateExpandInUseVolumeFunc and
  expander.go (volume_path = the device path the ASW recorded at map time).
* ReadWriteOncePod after a reboot: a new pod's NodePublish may come before the old pod's
  TearDown (reconciler order; the old one may be in backoff).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import grpc
import pytest
from kubelet_sim import VOL_DATA_FILE, CSIDriverObject, Kubelet, NodeEnv, Pod, Resizer

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi
from driver_harness import cleanup

MiB = 1 << 20
LABEL = "system_u:object_r:container_file_t:s0:c1,c2"


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def _reboot(node: NodeEnv) -> None:
    """A reboot: every mount and loop device under the node's root gone, the kubelet dir
    and the driver's state dir kept; the driver starts again."""
    os.sync()
    node.driver.stop()
    cleanup(node.root)
    assert not host.mounts_under(node.root)
    node.restart_driver()


# --------------------------------------------------------------------------- block stats
def test_block_volume_stats_at_kubelets_map_path(node: NodeEnv):
    """Stats of a block volume are answered at kubelet's map file (a device node of the
    volume's own loop device, read-write or read-only), and refused (NOT_FOUND) at the
    pod's symlink to it, at another block volume's map file and at a plain file."""
    k = node.kubelet
    _, pv = node.provision("rawstats", 32 * MiB, volume_mode="Block")
    _, other = node.provision("rawother", 32 * MiB, volume_mode="Block")
    k.set_up_device_block(pv)
    k.set_up_device_block(other)
    a, r, c = Pod("a"), Pod("r"), Pod("c")
    publish = k.map_pod_device(a, pv)
    k.map_pod_device(r, pv, read_only=True)
    k.map_pod_device(c, other)
    map_a = k.block_map_file(pv, a)
    assert host.is_mounted(map_a) and stat.S_ISBLK(os.lstat(map_a).st_mode)
    link = k.pod_device_map_path(a.uid, pv)
    assert link.is_symlink() and os.readlink(link) == str(publish)

    for path in (map_a, k.block_map_file(pv, r)):
        m = k.get_metrics(pv.handle, path)
        assert m.capacity >= pv.capacity and m.abnormal is False, path
    plain = k.root / "plain"
    plain.write_bytes(b"")
    for path in (link, k.block_map_file(other, c), plain, k.root / "missing"):
        assert _code(lambda p=path: k.get_metrics(pv.handle, p)) == grpc.StatusCode.NOT_FOUND, path

    for pod, vol in ((a, pv), (r, pv), (c, other)):
        k.unmap_pod_device(pod, vol)
    assert not link.exists() and not map_a.exists()
    for vol in (pv, other):
        k.tear_down_device_block(vol)
        assert not k.block_global_map_path(vol).parent.exists()
        node.provisioner.delete(vol)


# --------------------------------------------------------------------------- reboot + deleted
def test_unstage_after_reboot_of_a_deleted_volume(node: NodeEnv):
    """Stage + publish, reboot, the claim deleted meanwhile (DeleteVolume succeeds: nothing
    is mounted); kubelet reconstructs, tears down and unmounts the device: NodeUnpublish
    and NodeUnstage of the unknown volume must succeed, or kubelet retries forever."""
    _, pv = node.provision("deleted", 32 * MiB)
    pod = Pod("app")
    target = node.start_pod(pod, pv)
    (target / "f").write_text("x")
    _reboot(node)
    node.provisioner.delete(pv)

    kubelet = Kubelet(node.client, node.kubelet.root)
    assert [(v["podUID"], v["volumeHandle"]) for v in kubelet.reconstruct()] == [(pod.uid, pv.handle)]
    kubelet.tear_down(pod.uid, pv.name)
    staging = kubelet.device_mount_path(pv)
    assert staging.is_dir()
    kubelet.unmount_device(staging)
    assert not staging.exists() and not (staging.parent / VOL_DATA_FILE).exists()
    assert not target.parent.exists()


def test_block_unstage_after_reboot_of_a_deleted_volume(node: NodeEnv):
    """The same for a block volume: UnmapBlockVolume (its bind mount is gone), NodeUnpublish,
    then TearDownDevice's NodeUnstage of the unknown volume succeed."""
    k = node.kubelet
    _, pv = node.provision("rawdeleted", 32 * MiB, volume_mode="Block")
    staging = k.set_up_device_block(pv)
    pod = Pod("app")
    k.map_pod_device(pod, pv)
    _reboot(node)
    node.provisioner.delete(pv)
    k.unmap_pod_device(pod, pv)
    k.tear_down_device_block(pv)
    assert not staging.exists() and not k.block_global_map_path(pv).parent.exists()


def test_unstage_of_an_unknown_volume_refuses_a_mounted_path(node: NodeEnv):
    """Something is mounted at the staging path of a volume the driver does not know:
    FAILED_PRECONDITION, and the mount and its dir stay."""
    staging = node.kubelet.plugin_dir / "x" / "globalmount"
    staging.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)], check=True)
    try:
        req = csi.NodeUnstageVolumeRequest(volume_id="vol-" + "0" * 32, staging_target_path=str(staging))
        assert _code(lambda: node.client.node.NodeUnstageVolume(req)) == grpc.StatusCode.FAILED_PRECONDITION
        assert host.is_mounted(staging)
    finally:
        host.umount(staging)
    node.client.node.NodeUnstageVolume(req)
    assert staging.is_dir(), "the driver deletes nothing of a volume it does not know"


# --------------------------------------------------------------------------- SELinux
def test_selinux_context_mount_option(node: NodeEnv):
    """CSIDriver seLinuxMount: true, a RWOP claim and a pod with one SELinux label: kubelet
    appends context="<label>" (literal quotes) to the mount flags of NodeStage and
    NodePublish. Both succeed; on a host without SELinux the driver ignores it, and it
    never reaches the pod's bind mount."""
    k = node.kubelet
    k.csidriver = CSIDriverObject(se_linux_mount=True)
    k.selinux_host = True  # kubelet's view; the driver checks its own host
    _, pv = node.provision("labelled", 32 * MiB, access_modes=["ReadWriteOncePod"])
    pod = Pod("app", se_linux_label=LABEL)
    target = node.start_pod(pod, pv)
    flag = f'context="{LABEL}"'
    for name in ("NodeStageVolume", "NodePublishVolume"):
        req = [r for n, r in k.calls if n == name][-1]
        assert list(req.volume_capability.mount.mount_flags) == [flag], name
    data = json.loads((k.device_mount_path(pv).parent / VOL_DATA_FILE).read_text())
    assert data["seLinuxMountContext"] == LABEL
    (target / "f").write_text("labelled")
    entry = host.mount_at(target)
    assert entry is not None and "context=" not in entry.options
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


@pytest.mark.parametrize(
    "flag",
    [
        f"context={LABEL}",  # no quotes: the comma would end the option
        "context=x,suid",
        'context="a:b:c",suid',
        'context="a:b"',
        'context="a:b:c;d"',
        'context="' + "a:b:c:" + "s" * 300 + '"',
    ],
)
def test_malformed_selinux_context_is_invalid(node: NodeEnv, flag: str):
    _, pv = node.provision("badlabel", 32 * MiB)
    pv.mount_options = [flag]
    assert _code(lambda: node.kubelet.mount_device(pv)) == grpc.StatusCode.INVALID_ARGUMENT
    assert not node.kubelet.device_mount_path(pv).exists()
    node.provisioner.delete(pv)


# --------------------------------------------------------------------------- block expansion
def test_online_block_expansion_after_the_first_pod_left(node: NodeEnv):
    """Online expansion of a block volume: kubelet sends the device path the ASW recorded
    when the first pod mapped it, although that pod has gone and another still uses the
    volume, and the staging dir. The device grows. A path of no shape kubelet makes, or of
    another PV, stays NOT_FOUND."""
    k = node.kubelet
    pvc, pv = node.provision("rawgrow", 32 * MiB, volume_mode="Block")
    k.set_up_device_block(pv)
    first, second = Pod("first"), Pod("second")
    recorded = k.map_pod_device(first, pv)
    publish = k.map_pod_device(second, pv)
    k.unmap_pod_device(first, pv)
    assert k.block_device_paths[pv.name] == str(recorded) and not recorded.exists()

    Resizer(node.client).resize(pvc, 64 * MiB)
    assert pv.capacity >= 64 * MiB
    assert k.node_expand(second, pv) >= 64 * MiB
    fd = os.open(publish, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) >= 64 * MiB
    finally:
        os.close(fd)

    publish_root = k.plugin_dir / "volumeDevices" / "publish"
    for path in (k.root / "elsewhere", publish_root / "other-pv" / first.uid, publish_root / pv.name):
        req = csi.NodeExpandVolumeRequest(volume_id=pv.handle, volume_path=str(path),
                                          capacity_range=csi.CapacityRange(required_bytes=pv.capacity))
        assert _code(lambda r=req: node.client.node.NodeExpandVolume(r)) == grpc.StatusCode.NOT_FOUND, path
    k.unmap_pod_device(second, pv)
    k.tear_down_device_block(pv)
    node.provisioner.delete(pv)


# --------------------------------------------------------------------------- single writer
def test_stale_single_writer_record_does_not_block_a_new_pod(node: NodeEnv):
    """ReadWriteOncePod: the old pod's publication record outlives its mount (a reboot).
    A new pod's NodePublish before the old pod's TearDown must succeed; a live single
    writer still refuses a third pod."""
    _, pv = node.provision("rwop", 32 * MiB, access_modes=["ReadWriteOncePod"])
    old = Pod("old")
    node.start_pod(old, pv)
    _reboot(node)

    kubelet = Kubelet(node.client, node.kubelet.root)
    staging = kubelet.mount_device(pv)
    new = Pod("new")
    target = kubelet.set_up(new, pv)
    (target / "f").write_text("new writer")
    kubelet.tear_down(old.uid, pv.name)
    third = Pod("third")
    assert _code(lambda: kubelet.set_up(third, pv)) == grpc.StatusCode.FAILED_PRECONDITION
    assert not kubelet.pod_volume_dir(third.uid, pv.name).exists()
    kubelet.tear_down(new.uid, pv.name)
    kubelet.unmount_device(staging)
    node.provisioner.delete(pv)
