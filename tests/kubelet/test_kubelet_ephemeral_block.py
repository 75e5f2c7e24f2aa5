"""CSI inline ephemeral volumes and raw block volumes, as kubelet calls them.

Ephemeral: kubernetes/kubernetes pkg/volume/csi/csi_mounter.go SetUpAt for a
CSIVolumeSource (volume handle csi-<sha256(pod UID + volume name)> from makeVolumeHandle in
csi_plugin.go NewMounter; no NodeStage and no staging_target_path; volume_context = the
pod's volumeAttributes plus the podInfoOnMount keys with csi.storage.k8s.io/ephemeral
"true"; RWO; fsType from the inline source, usually empty) and TearDownAt
(NodeUnpublishVolume, then removeMountDir); csi_client.go NodePublishVolume;
the CSIDriver's volumeLifecycleModes must list Ephemeral (supportsVolumeLifecycleMode).
deploy/test-driver.yaml and tests/e2e use the attribute {"size": "64Mi"}.

Block: pkg/volume/csi/csi_block.go (SetUpDevice: kubelet creates
plugins/kubernetes.io/csi/volumeDevices/staging/<pv name> and calls NodeStageVolume with a
block capability and no mount options; MapPodDevice: kubelet creates only
volumeDevices/publish/<pv name>, the driver creates the publish path file
<pv name>/<pod uid>; then util.go MapBlockVolume bind-mounts it onto
volumeDevices/<pv name>/dev/<pod uid> and links the pod's volumeDevices entry to it;
UnmapPodDevice: NodeUnpublishVolume even if the path is gone, after UnmapBlockVolume;
TearDownDevice: NodeUnstageVolume, then the staging dir is removed).
"""

from __future__ import annotations

import os

from kubelet_sim import NodeEnv, Pod

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20


def _ephemeral_volumes(node: NodeEnv) -> list:
    entries = node.client.controller.ListVolumes(csi.ListVolumesRequest()).entries
    return [e.volume for e in entries if node.driver.engine.get_volume(e.volume.volume_id).ephemeral]


def test_inline_ephemeral_volume(node: NodeEnv):
    """Kubelet publishes an inline volume straight away and unpublishes it when the pod goes;
    nothing of it may remain, and a new pod with the same inline volume starts empty."""
    kubelet = node.kubelet
    pod = Pod("inline", namespace="apps")
    handle, target = kubelet.set_up_inline(pod, "scratch", {"size": "64Mi"})
    req = [r for n, r in kubelet.calls if n == "NodePublishVolume"][-1]
    assert handle.startswith("csi-") and len(handle) == 4 + 64
    assert req.volume_id == handle and req.staging_target_path == ""
    assert req.target_path == str(kubelet.target_path(pod.uid, "scratch"))
    assert req.volume_context["csi.storage.k8s.io/ephemeral"] == "true"
    assert req.volume_context["size"] == "64Mi"
    assert "NodeStageVolume" not in [n for n, _ in kubelet.calls]

    assert host.is_mounted(target)
    (target / "f").write_text("ephemeral")
    st = os.statvfs(target)
    assert 60 * MiB <= st.f_blocks * st.f_frsize <= 80 * MiB, "the size attribute is honoured"
    assert node.kubelet.get_metrics(handle, target).capacity >= 64 * MiB
    # kubelet restart: the same NodePublish again must succeed on the existing target
    kubelet.set_up_inline(pod, "scratch", {"size": "64Mi"})
    kubelet.tear_down(pod.uid, "scratch")
    assert not target.parent.exists()
    assert _ephemeral_volumes(node) == [], "an inline volume is deleted on unpublish"
    # a retried TearDown (kubelet did not record the first) must still succeed
    node.client.node.NodeUnpublishVolume(
        csi.NodeUnpublishVolumeRequest(volume_id=handle, target_path=str(target)))

    again = Pod("inline2", namespace="apps")
    handle2, target2 = kubelet.set_up_inline(again, "scratch", {"size": "64Mi"})
    assert handle2 != handle
    assert not (target2 / "f").exists(), "a new pod's inline volume starts empty"
    kubelet.tear_down(again.uid, "scratch")


def test_block_volume_as_kubelet_maps_it(node: NodeEnv):
    """volumeMode: Block end to end: the provisioner's block capability, kubelet's staging
    dir and publish path (the driver creates the file), I/O through the published device,
    two pods, teardown with the staging dir left removable."""
    pvc, pv = node.provision("raw", 32 * MiB, volume_mode="Block")
    assert node.provisioner.calls[-1].volume_capabilities[0].HasField("block")
    vol = node.driver.engine.get_volume(pv.handle)
    assert vol.access_type == "block" and vol.capacity_bytes == pv.capacity >= 32 * MiB
    kubelet = node.kubelet
    staging = kubelet.set_up_device_block(pv)
    assert staging == kubelet.root / "plugins/kubernetes.io/csi/volumeDevices/staging" / pv.name
    a, b = Pod("a"), Pod("b")
    pa = kubelet.map_pod_device(a, pv)
    pb = kubelet.map_pod_device(b, pv)
    assert pa == kubelet.root / "plugins/kubernetes.io/csi/volumeDevices/publish" / pv.name / a.uid
    assert host.is_mounted(kubelet.root / "plugins/kubernetes.io/csi/volumeDevices" / pv.name / "dev" / a.uid)
    assert os.readlink(kubelet.root / "pods" / a.uid / "volumeDevices/kubernetes.io~csi" / pv.name) == str(pa)
    fd = os.open(pa, os.O_RDWR)
    try:
        os.pwrite(fd, b"raw-bytes", 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(pb, os.O_RDONLY)
    try:
        assert os.pread(fd, 9, 4 * MiB) == b"raw-bytes"
    finally:
        os.close(fd)
    kubelet.unmap_pod_device(a, pv)
    assert not pa.exists(), "the driver removes the publish path it created"
    kubelet.unmap_pod_device(a, pv)  # UnmapPodDevice calls NodeUnpublish even when it is gone
    kubelet.unmap_pod_device(b, pv)
    kubelet.tear_down_device_block(pv)
    assert not staging.exists()
    node.provisioner.delete(pv)
