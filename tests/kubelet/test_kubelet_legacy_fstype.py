"""The legacy StorageClass key ``fsType``, as external-provisioner sends it.

pkg/controller/controller.go prepareProvision takes any key equal to "fstype" ignoring case
(only a deprecation warning) as the volume's file system: it goes to the capability's
mount fs_type, and removePrefixedParameters keeps it in the parameters too. The capacity
controller (pkg/capacity/capacity.go syncCapacity) sends the raw StorageClass parameters
and no capabilities at all.
"""

from __future__ import annotations

import shutil

import grpc
import pytest
from kubelet_sim import PVC, TOPOLOGY_KEY, NodeEnv, Pod, ProvisioningFailed, ProvisioningState, StorageClass

from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20
FS = "xfs" if shutil.which("mkfs.xfs") else "ext4"


def superblock_fs(path) -> str:
    with open(path, "rb") as f:
        head = f.read(2048)
    if head[:4] == b"XFSB":
        return "xfs"
    return "ext4" if head[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef" else "?"


@pytest.mark.parametrize("key", ["fsType", "FSType"])
def test_a_storage_class_with_the_legacy_fs_type_key(node: NodeEnv, key: str):
    """The capacity controller gets a capacity for the StorageClass (the kind its fsType
    names, as for a capability of that fs_type); the provisioner's claim becomes a volume
    of that file system, the key kept in its parameters; a pod mounts it."""
    sc = StorageClass(parameters={key: FS})
    got = node.provisioner.get_capacity(sc, {TOPOLOGY_KEY: "node-1"})
    assert got.available_capacity > 64 * MiB
    cap = mount_capability()
    cap.mount.fs_type = FS
    asked = node.client.controller.GetCapacity(csi.GetCapacityRequest(volume_capabilities=[cap]))
    assert got.available_capacity == asked.available_capacity

    pvc = PVC(name="legacy", request=64 * MiB)
    pv = node.provisioner.provision(pvc, sc, "node-1")
    req = node.provisioner.calls[-1]
    assert req.parameters[key] == FS and req.volume_capabilities[0].mount.fs_type == FS
    vol = node.driver.engine.get_volume(pv.handle)
    assert vol.fs_type == FS and vol.parameters[key] == FS and pv.fs_type == FS
    assert superblock_fs(node.driver.engine.backend.layout.image(vol.upper)) == FS
    pod = Pod("app")
    (node.start_pod(pod, pv) / "f").write_text("ok")
    node.stop_pod(pod, pv)
    node.provisioner.delete(pv)


def test_an_unsupported_legacy_fs_type_is_refused_clearly(node: NodeEnv):
    """fsType: btrfs: GetCapacity and CreateVolume answer INVALID_ARGUMENT naming the
    parameter and what is supported (the provisioner's infeasible, final state)."""
    sc = StorageClass(parameters={"fsType": "btrfs"})
    with pytest.raises(grpc.RpcError) as e:
        node.provisioner.get_capacity(sc, {TOPOLOGY_KEY: "node-1"})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter fsType 'btrfs' is not supported; use one of" in e.value.details()
    with pytest.raises(ProvisioningFailed) as f:
        node.provisioner.provision(PVC(name="btrfs", request=16 * MiB), sc, "node-1")
    assert f.value.err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f.value.state == ProvisioningState.FINISHED
    assert "'btrfs' is not supported; use one of" in f.value.err.details()  # (its capability's)


def test_a_legacy_fs_type_that_contradicts_the_capability(node: NodeEnv):
    """A caller that sends fsType in the parameters and another fs_type in the capability
    (not the provisioner: it uses one value for both) gets INVALID_ARGUMENT; a block
    capability has no file system, so the same StorageClass serves a block claim."""
    if FS != "xfs":
        pytest.skip("mkfs.xfs is not installed: one supported file system only")
    cap = mount_capability()
    cap.mount.fs_type = "ext4"
    params = {"fsType": "xfs"}
    with pytest.raises(grpc.RpcError) as e:
        node.client.create_volume("clash", 16 * MiB, parameters=params, cap=cap)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conflicts with the capability's fs_type" in e.value.details()
    sc = StorageClass(parameters={"fsType": FS})
    pv = node.provisioner.provision(PVC(name="raw", request=16 * MiB, volume_mode="Block"), sc, "node-1")
    assert node.driver.engine.get_volume(pv.handle).access_type == "block"
    node.provisioner.delete(pv)
