"""Provisioning as external-provisioner sends it.

Follows kubernetes-csi/external-provisioner pkg/controller/controller.go (prepareProvision:
makeVolumeName "pvc-<uid>", fstype, getVolumeCapabilities, removePrefixedParameters,
--extra-create-metadata keys; Provision: the timeout, checkError, the PV built from the
reply and the csiProvisionerIdentity attribute; getSnapshotSource / getPVCSource size rules),
pkg/controller/topology.go (GenerateAccessibilityRequirements for WaitForFirstConsumer,
strict and non-strict), pkg/capacity/capacity.go (GetCapacity) and
cmd/csi-provisioner/csi-provisioner.go (flags as the chart sets them:
charts/overlay-csi/templates/node-daemonset.yaml).
"""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
from kubelet_sim import (
    PROVISIONER_ID_KEY,
    PVC,
    TOPOLOGY_KEY,
    NodeEnv,
    Pod,
    Provisioner,
    ProvisioningFailed,
    ProvisioningState,
    StorageClass,
    VolumeSnapshot,
)

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi

MiB = 1 << 20
Mode = csi.VolumeCapability.AccessMode


def volumes_named(node: NodeEnv, name: str) -> list[csi.Volume]:
    entries = node.client.controller.ListVolumes(csi.ListVolumesRequest()).entries
    return [e.volume for e in entries if node.driver.engine.get_volume(e.volume.volume_id).name == name]


def test_wait_for_first_consumer_with_strict_topology(node: NodeEnv):
    """The chart's provisioner (--strict-topology, --extra-create-metadata, node deployment):
    requisite == preferred == the selected node's segment from its CSINode topology keys;
    parameters are the StorageClass's minus reserved keys plus pvc/name, pvc/namespace,
    pv/name; the name is pvc-<claim uid>; RWO maps to SINGLE_NODE_MULTI_WRITER because the
    controller announces it; StorageClass mountOptions become mount_flags."""
    node.sc = StorageClass(parameters={"csi.storage.k8s.io/fstype": "ext4"}, mount_options=["noatime"])
    pvc = PVC(name="data", namespace="team-a", request=48 * MiB)
    pv = node.provisioner.provision(pvc, node.sc, "node-1")
    # what the driver made of the request: a volume of the claim's name, with the file system
    # asked for really made on its upper's image, the sidecar's metadata kept as parameters
    vol = node.driver.engine.get_volume(pv.handle)
    assert vol.name == f"pvc-{pvc.uid}" == pv.name
    assert vol.access_type == "mount" and vol.fs_type == "ext4"
    assert vol.parameters == {
        "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "team-a",
        "csi.storage.k8s.io/pv/name": pv.name,
    }
    with open(node.driver.engine.backend.layout.image(vol.upper), "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef", "the upper's image holds an ext4 superblock"
    got = node.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=pv.handle))
    assert got.volume.capacity_bytes == vol.capacity_bytes == pv.capacity
    assert [dict(t.segments) for t in got.volume.accessible_topology] == [{TOPOLOGY_KEY: "node-1"}]
    # the PV the provisioner writes
    # the handle names the node that made (and holds) the volume: csi_driver.ids
    assert re.fullmatch(r"vol-[0-9a-f]{32}@node-1", pv.handle), pv.handle
    assert pv.capacity >= pvc.request, "a reply below the request makes the provisioner delete the volume"
    assert pv.node_affinity == [{TOPOLOGY_KEY: "node-1"}]
    assert pv.volume_attributes[PROVISIONER_ID_KEY] == node.provisioner.identity
    assert pv.fs_type == "ext4" and pv.mount_options == ["noatime"]


def test_wait_for_first_consumer_without_strict_topology(node: NodeEnv):
    """topology.go without --strict-topology: requisite is every node's segment (sorted),
    preferred is the same list rotated so the selected node comes first. A node-local driver
    must create the volume on itself and report that segment."""
    prov = Provisioner(node.client, node.cluster, strict_topology=False)
    pvc = PVC(name="loose", request=16 * MiB)
    pv = prov.provision(pvc, node.sc, "node-1")
    assert len(prov.calls[-1].accessibility_requirements.requisite) == 3, "three nodes were offered"
    # the driver chose itself among them: its answer (the PV's affinity) and its own record
    assert pv.node_affinity == [{TOPOLOGY_KEY: "node-1"}]
    got = node.client.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=pv.handle))
    assert [dict(t.segments) for t in got.volume.accessible_topology] == [{TOPOLOGY_KEY: "node-1"}]
    assert node.driver.engine.get_volume(pv.handle).name == pv.name


def test_a_claim_for_another_node_is_rescheduled(node: NodeEnv):
    """If the selected node's segment is not this node's (e.g. CSINode of node-2 handed to
    this plugin), the driver cannot satisfy the requisite: RESOURCE_EXHAUSTED, which
    checkError turns into ProvisioningReschedule (the scheduler picks again), not a retry
    loop and not a final failure."""
    pvc = PVC(name="elsewhere", request=16 * MiB)
    with pytest.raises(ProvisioningFailed) as e:
        node.provisioner.provision(pvc, node.sc, "node-2")
    assert e.value.err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.state == ProvisioningState.RESCHEDULE
    assert volumes_named(node, f"pvc-{pvc.uid}") == []


def test_immediate_binding_sends_no_topology(node: NodeEnv):
    """Immediate binding with --immediate-topology=false and no allowedTopologies:
    GenerateAccessibilityRequirements returns nil, so CreateVolume has no
    accessibility_requirements; the volume is created where the call lands."""
    node.sc = StorageClass(volume_binding_mode="Immediate")
    pvc = PVC(name="now", request=16 * MiB)
    pv = node.provisioner.provision(pvc, node.sc, None)
    assert not node.provisioner.calls[-1].HasField("accessibility_requirements")
    assert pv.node_affinity == [{TOPOLOGY_KEY: "node-1"}]


def test_retry_after_a_timeout_reuses_the_name(node: NodeEnv):
    """Provision: CreateVolume runs under --timeout; DEADLINE_EXCEEDED and ABORTED are
    ProvisioningInBackground (checkError), so the claim is requeued and the identical request
    (same name pvc-<uid>) is sent again until it succeeds. The driver refuses (ABORTED) a retry
    that arrives while the first call still runs, and answers every later one with the volume
    the first call made: exactly one volume results, of the size asked."""
    from driver_harness import list_pages, store_dump  # here: only this test reads the driver's store

    engine = node.driver.engine
    create = engine.create_volume
    first: dict = {}  # the first CreateVolume to reach the engine: its volume id, when it ended
    first_done = threading.Event()

    def slow_create(spec, *args, **kwargs):  # the first CreateVolume takes longer than --timeout
        if first:
            return create(spec, *args, **kwargs)
        first["start"] = time.monotonic()
        try:
            vol = create(spec, *args, **kwargs)
            first["id"] = vol.id
            time.sleep(1.5)
            return vol
        finally:
            first["end"] = time.monotonic()
            first_done.set()

    engine.create_volume = slow_create
    prov = Provisioner(node.client, node.cluster, timeout=0.5)
    prov.retry_delay = 0.2
    answers: list[tuple[float, str, str]] = []  # (when, code, volume id) of each driver answer
    send = prov.create_once

    def create_once(req, timeout=None):
        try:
            vol = send(req, timeout)
        except grpc.RpcError as e:
            answers.append((time.monotonic(), e.code().name, ""))
            raise
        answers.append((time.monotonic(), "OK", vol.volume_id))
        return vol

    prov.create_once = create_once
    before = {v["id"] for v in store_dump(node.driver.state)["volumes"]}
    pvc = PVC(name="slow", request=32 * MiB)
    pv = prov.provision(pvc, node.sc, "node-1")
    assert first_done.wait(30), "the first CreateVolume never finished in the driver"
    assert "id" in first, "the first CreateVolume made no volume"
    codes = [code for _, code, _ in answers]
    assert codes[0] == "DEADLINE_EXCEEDED", f"the first call must have timed out: {codes}"
    assert codes[-1] == "OK" and set(codes[1:-1]) <= {"ABORTED"}, f"only the first call may time out: {codes}"
    busy = [when for when, code, _ in answers[1:] if code == "ABORTED" and when < first["end"]]
    assert busy, f"no retry was answered ABORTED while the first call ran (to {first['end']}): {answers}"
    made = first["id"]
    assert {vid for _, code, vid in answers if code == "OK"} == {made}, f"another volume answered: {answers}"
    assert pv.handle == made
    # the driver holds exactly one new volume, the one the first call made, named for the claim
    listed = list_pages(node.client.controller.ListVolumes, csi.ListVolumesRequest(), len(before) + 1)
    new = [e.volume for e in listed if e.volume.volume_id not in before]
    assert [v.volume_id for v in new] == [made], f"new volumes listed: {[v.volume_id for v in new]}"
    stored = [v for v in store_dump(node.driver.state)["volumes"] if v["id"] not in before]
    assert [(v["id"], v["name"]) for v in stored] == [(made, f"pvc-{pvc.uid}")], stored
    assert new[0].capacity_bytes == stored[0]["capacity_bytes"] == pv.capacity == pvc.request


def test_restore_and_clone_as_the_provisioner_sends_them(node: NodeEnv):
    """dataSource VolumeSnapshot -> volume_content_source.snapshot (snapshot handle),
    dataSource PersistentVolumeClaim -> volume_content_source.volume (source PV handle).
    The provisioner refuses requests below the snapshot's restoreSize or the source claim's
    request before calling, and deletes a new volume whose reply lacks content_source."""
    src_pvc, src_pv = node.provision("source", 32 * MiB)
    pod = Pod("writer")
    target = node.start_pod(pod, src_pv)
    (target / "hello").write_text("from the source")
    node.stop_pod(pod, src_pv)

    vs = VolumeSnapshot("snap", source=src_pvc)
    content = node.snapshotter.create(vs)
    assert content.ready_to_use and content.restore_size <= src_pv.capacity

    restored = PVC(name="restored", request=64 * MiB, data_source=("VolumeSnapshot", vs))
    r_pv = node.provisioner.provision(restored, node.sc, "node-1")
    req = node.provisioner.calls[-1]
    assert req.volume_content_source.snapshot.snapshot_id == content.snapshot_handle
    assert r_pv.capacity >= 64 * MiB

    clone = PVC(name="clone", request=32 * MiB, data_source=("PersistentVolumeClaim", src_pvc))
    c_pv = node.provisioner.provision(clone, node.sc, "node-1")
    assert node.provisioner.calls[-1].volume_content_source.volume.volume_id == src_pv.handle

    for i, pv in enumerate((r_pv, c_pv)):
        p = Pod(f"reader-{i}")
        t = node.start_pod(p, pv)
        assert (t / "hello").read_text() == "from the source"
        node.stop_pod(p, pv)
    for pv in (r_pv, c_pv, src_pv):
        node.provisioner.delete(pv)
    node.snapshotter.delete(content)


def test_final_errors_stop_the_provisioner(node: NodeEnv):
    """checkError: anything but RESOURCE_EXHAUSTED/ABORTED/DEADLINE_EXCEEDED/UNAVAILABLE/
    CANCELLED is final (ProvisioningFinished; the claim gets an event, no retry storm).
    ReadWriteMany (MULTI_NODE_MULTI_WRITER) and an unknown StorageClass parameter are such."""
    with pytest.raises(ProvisioningFailed) as e:
        node.provisioner.provision(PVC(name="rwx", request=16 * MiB, access_modes=["ReadWriteMany"]),
                                   node.sc, "node-1")
    assert e.value.err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.state == ProvisioningState.FINISHED
    with pytest.raises(ProvisioningFailed) as e:
        node.provisioner.provision(PVC(name="odd", request=16 * MiB),
                                   StorageClass(parameters={"replicas": "3"}), "node-1")
    assert e.value.state == ProvisioningState.FINISHED


def test_read_write_once_pod_and_read_only_many(node: NodeEnv):
    """ReadWriteOncePod maps to SINGLE_NODE_SINGLE_WRITER, ReadOnlyMany to
    MULTI_NODE_READER_ONLY (csi-lib-utils accessmodes via getVolumeCapability); the driver
    then publishes the first to one pod only and mounts the second read-only."""
    pvc, pv = node.provision("rwop", 16 * MiB, access_modes=["ReadWriteOncePod"])
    # what the driver does with it: one pod, and a second publication is refused
    first, second = Pod("first"), Pod("second")
    node.start_pod(first, pv)
    with pytest.raises(grpc.RpcError) as e:
        node.kubelet.set_up(second, pv)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not host.is_mounted(node.kubelet.target_path(second.uid, pv.name))
    node.stop_pod(first, pv)
    rox_pvc, rox = node.provision("rox", 16 * MiB, access_modes=["ReadOnlyMany"])
    reader = Pod("reader")
    target = node.start_pod(reader, rox)
    assert "ro" in host.mount_at(target).options.split(","), "a ReadOnlyMany volume is mounted read-only"
    node.stop_pod(reader, rox)
    for v in (pv, rox):
        node.provisioner.delete(v)


def test_capacity_tracking_queries(node: NodeEnv):
    """pkg/capacity/capacity.go: GetCapacity with the raw StorageClass parameters (reserved
    keys not stripped), no capabilities, and one topology segment per node. This node has
    room; another node's segment has none here."""
    sc = StorageClass(parameters={"csi.storage.k8s.io/fstype": "ext4"})
    mine = node.provisioner.get_capacity(sc, {TOPOLOGY_KEY: "node-1"})
    assert mine.available_capacity > 64 * MiB
    other = node.provisioner.get_capacity(sc, {TOPOLOGY_KEY: "node-0"})
    assert other.available_capacity == 0


def test_delete_after_the_claim_is_gone(node: NodeEnv):
    """Deletion: DeleteVolume with the PV's handle, retried on any error until it succeeds
    (so a repeated call must succeed too)."""
    pvc, pv = node.provision("gone", 16 * MiB)
    node.provisioner.delete(pv)
    node.provisioner.delete(pv)
    assert volumes_named(node, pv.name) == []
