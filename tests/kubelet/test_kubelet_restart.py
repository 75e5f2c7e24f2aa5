"""Kubelet restart, node plugin restart and node reboot, as kubelet reconstructs its state.

Follows kubernetes/kubernetes pkg/kubelet/volumemanager/reconciler/reconstruct.go
(reconstructVolumes: every pods/<uid>/volumes/kubernetes.io~csi/<name>/vol_data.json is
added to the actual state as *uncertain*, its device as uncertain too; the reconciler then
calls MountDevice and SetUp again for pods that still want the volume, and TearDown /
UnmountDevice for the others), pkg/volume/csi/csi_plugin.go (ConstructVolumeSpec from
vol_data.json, RegisterPlugin on plugin restart), csi_attacher.go and csi_mounter.go (the
repeated NodeStage / NodePublish carry the same paths and arguments).
"""

from __future__ import annotations

import os

from kubelet_sim import Kubelet, NodeEnv, Pod, mount_count, register_plugin

from csi_driver import host
from driver_harness import cleanup

MiB = 1 << 20


def test_kubelet_restart_republishes_existing_targets(node: NodeEnv):
    """After a kubelet restart, NodeStage on a staged globalmount and NodePublish on a
    published target (same arguments) must succeed without stacking a second mount; a pod
    deleted while kubelet was down is torn down from its vol_data.json alone."""
    pvc, pv = node.provision("kept", 32 * MiB)
    keep, gone = Pod("keep"), Pod("gone")
    tk = node.start_pod(keep, pv)
    tg = node.start_pod(gone, pv)
    (tk / "before").write_text("restart")

    kubelet = Kubelet(node.client, node.kubelet.root)  # fresh memory, same disk
    found = {(v["podUID"], v["specVolID"]): v for v in kubelet.reconstruct()}
    assert set(found) == {(keep.uid, pv.name), (gone.uid, pv.name)}
    assert all(v["volumeHandle"] == pv.handle and v["volumeLifecycleMode"] == "Persistent"
               for v in found.values())

    # desired state: `keep` still runs -> MountDevice + SetUp again
    staging = kubelet.mount_device(pv)
    assert mount_count(staging) == 1
    assert kubelet.set_up(keep, pv) == tk
    assert mount_count(tk) == 1
    assert (tk / "before").read_text() == "restart"
    # `gone` was deleted while kubelet was down -> TearDown from vol_data.json
    kubelet.tear_down(gone.uid, pv.name)
    assert not tg.exists()
    (tk / "after").write_text("still writable")

    kubelet.tear_down(keep.uid, pv.name)
    kubelet.unmount_device(staging)
    node.provisioner.delete(pv)


def test_node_plugin_restart_while_pods_run(node: NodeEnv):
    """The node plugin container restarts (DaemonSet rollout) while a pod uses the volume:
    the registrar re-registers (same node id and topology), kubelet keeps polling stats on
    the running pod's target, may call NodeStage/NodePublish again (uncertain after an
    error), and tears down normally later. Mounts survive in the kubelet's namespace."""
    pvc, pv = node.provision("survivor", 32 * MiB)
    pod = Pod("db")
    target = node.start_pod(pod, pv)
    (target / "row").write_text("1")

    node.restart_driver()
    assert register_plugin(node.client, node.cluster, "node-1") == node.registration
    m = node.kubelet.get_metrics(pv.handle, target)
    assert m.abnormal is False and m.capacity >= pv.capacity
    node.kubelet.mount_device(pv)
    node.kubelet.set_up(pod, pv)
    assert mount_count(target) == 1 and mount_count(node.kubelet.device_mount_path(pv)) == 1
    (target / "row").write_text("2")
    assert (node.kubelet.device_mount_path(pv) / "row").read_text() == "2"

    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_node_reboot(node: NodeEnv):
    """A reboot loses every mount and loop device but keeps the kubelet dir (pod dirs,
    vol_data.json, empty globalmount and target dirs) and the driver's state dir. Kubelet
    reconstructs, then NodeStage onto the existing, unmounted globalmount and NodePublish
    onto the existing, unmounted target must mount again, with the data."""
    pvc, pv = node.provision("rebooted", 32 * MiB)
    pod = Pod("app", fs_group=2000)
    target = node.start_pod(pod, pv)
    (target / "persisted").write_text("across a reboot")
    os.sync()

    node.driver.stop()
    cleanup(node.root)  # every mount under the node's root gone, loop devices detached
    assert not host.mounts_under(node.root)
    assert target.is_dir() and node.kubelet.device_mount_path(pv).is_dir()
    node.restart_driver()

    kubelet = Kubelet(node.client, node.kubelet.root)
    assert [(v["podUID"], v["volumeHandle"]) for v in kubelet.reconstruct()] == [(pod.uid, pv.handle)]
    staging = kubelet.mount_device(pv, pod.fs_group)
    assert mount_count(staging) == 1
    kubelet.set_up(pod, pv)
    assert mount_count(target) == 1
    assert (target / "persisted").read_text() == "across a reboot"
    assert target.stat().st_gid == 2000

    kubelet.tear_down(pod.uid, pv.name)
    kubelet.unmount_device(staging)
    node.provisioner.delete(pv)
