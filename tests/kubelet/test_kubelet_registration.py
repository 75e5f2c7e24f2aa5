"""Plugin registration: node-driver-registrar, then kubelet and its node info manager.

Follows kubernetes-csi/node-driver-registrar cmd/csi-node-driver-registrar/main.go
(GetPluginInfo through csi-lib-utils rpc.GetDriverName; supportedVersions ["1.0.0"]) and
node_register.go; kubernetes/kubernetes pkg/volume/csi/csi_plugin.go (RegisterPlugin:
validateVersions, NodeGetInfo, InstallCSIDriver) and
pkg/volume/csi/nodeinfomanager/nodeinfomanager.go (node id annotation, topology labels,
CSINode driver entry with topology keys and allocatable.count).
"""

from __future__ import annotations

import json

import grpc
import pytest
from kubelet_sim import (
    DRIVER_NAME,
    TOPOLOGY_KEY,
    NodeEnv,
    NodeRPC,
    PluginService,
    Pod,
    is_final_error,
    register_plugin,
)

from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20


def test_registration_writes_what_kubelet_writes(node: NodeEnv):
    """csi_plugin.go RegisterPlugin + nodeinfomanager.go InstallCSIDriver: the CSINode entry
    carries the driver name from GetPluginInfo, the node id and the sorted topology keys from
    NodeGetInfo; the Node gets the topology label and the csi.volume.kubernetes.io/nodeid
    annotation. No max_volumes_per_node: no allocatable count."""
    reg = node.registration
    assert reg.name == DRIVER_NAME
    assert reg.node_id == "node-1"
    assert reg.topology_keys == [TOPOLOGY_KEY]
    assert reg.allocatable_count is None
    n = node.cluster.nodes["node-1"]
    assert n.labels[TOPOLOGY_KEY] == "node-1"
    assert json.loads(n.annotations["csi.volume.kubernetes.io/nodeid"]) == {DRIVER_NAME: "node-1"}
    # livenessprobe sidecar: Probe must answer ready once the socket is up.
    assert node.client.identity.Probe(csi.ProbeRequest()).ready.value is True


def test_capabilities_the_callers_look_for(node: NodeEnv):
    """What each caller checks before using an RPC: the provisioner needs
    VOLUME_ACCESSIBILITY_CONSTRAINTS to send topology (controller.go supportsTopology);
    kubelet needs STAGE_UNSTAGE_VOLUME (csi_attacher.go MountDevice), GET_VOLUME_STATS
    (csi_metrics.go), EXPAND_VOLUME (expander.go), and maps RWO to SINGLE_NODE_MULTI_WRITER
    when SINGLE_NODE_MULTI_WRITER is announced (csi_client.go getNodeV1AccessModeMapper)."""
    services = node.provisioner.services
    assert PluginService.CONTROLLER_SERVICE in services
    assert PluginService.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    caps = node.kubelet.node_caps()
    for rpc in (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME):
        assert rpc in caps
    # the driver announces SINGLE_NODE_MULTI_WRITER on both services, so both callers send
    # the new modes; its answer decides the mapping, not the simulator
    assert NodeRPC.SINGLE_NODE_MULTI_WRITER in caps
    ctrl = node.client.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest())
    ControllerRPC = csi.ControllerServiceCapability.RPC
    assert ControllerRPC.SINGLE_NODE_MULTI_WRITER in {c.rpc.type for c in ctrl.capabilities}
    Mode = csi.VolumeCapability.AccessMode
    assert node.kubelet.access_mode("ReadWriteOnce") == Mode.SINGLE_NODE_MULTI_WRITER
    assert node.kubelet.access_mode("ReadWriteOncePod") == Mode.SINGLE_NODE_SINGLE_WRITER


def test_max_volumes_per_node_is_the_csinode_allocatable_count(make_node):
    """nodeinfomanager.go installDriverToCSINode: allocatable.count = max_volumes_per_node.
    The scheduler counts the driver's volumes used by pods on the node against it, so the
    limit is on volumes in use, not on volumes that exist: provisioning a third volume is
    fine. If a third is staged anyway, the driver's RESOURCE_EXHAUSTED is not final for
    kubelet (csi_client.go isFinalError -> uncertain, retried), and the retry succeeds once
    a pod has left the node."""
    node = make_node(max_volumes_per_node=2)
    assert node.registration.allocatable_count == 2
    pvs = [node.provision(name, 16 * MiB)[1] for name in ("a", "b", "c")]
    pods = [Pod(f"p{i}") for i in range(3)]
    for pod, pv in zip(pods[:2], pvs[:2], strict=True):
        node.start_pod(pod, pv)
    with pytest.raises(grpc.RpcError) as e:
        node.kubelet.mount_device(pvs[2])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not is_final_error(e.value)
    assert node.kubelet.device_mount_path(pvs[2]).is_dir(), "uncertain: kubelet keeps the dir and retries"
    node.stop_pod(pods[0], pvs[0])
    node.start_pod(pods[2], pvs[2])
    for pod, pv in zip(pods[1:], pvs[1:], strict=True):
        node.stop_pod(pod, pv)
    for pv in pvs:
        node.provisioner.delete(pv)


def test_reregistration_after_a_plugin_restart_is_identical(node: NodeEnv):
    """When the node plugin restarts, the registrar re-registers and kubelet calls NodeGetInfo
    again (csi_plugin.go RegisterPlugin); the node id and topology must not change, or
    nodeinfomanager reports a topology label collision and existing PVs' node affinity
    (from the first topology) would no longer match the node."""
    node.restart_driver()
    again = register_plugin(node.client, node.cluster, "node-1")
    assert again == node.registration
