"""Clones and restores across nodes, as the node-deployed external-provisioner meets them.

Volumes are node-local. With WaitForFirstConsumer the scheduler ignores a claim's
dataSource, so it may pick a node that does not hold the source. Each node runs its own
provisioner (--node-deployment; cmd/csi-provisioner/csi-provisioner.go), which takes only
claims selected for its node (pkg/controller/controller.go checkNode). CreateVolume's
error goes through checkError: RESOURCE_EXHAUSTED with a selected node is
ProvisioningReschedule, and sig-storage-lib-external-provisioner's provisionVolumeErrorHandling
-> rescheduleProvisioning removes the selected-node annotation, so the scheduler picks again.
Any other final code (NOT_FOUND) is ProvisioningFinished: retried on the same node for ever.
The driver's ids name the node that made them (csi_driver.ids), so a node can tell a source
that lives elsewhere (RESOURCE_EXHAUSTED) from one that no node made (NOT_FOUND).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kubelet_sim import (
    PVC,
    SELECTED_NODE_KEY,
    NodeEnv,
    Pod,
    Provisioner,
    ProvisioningFailed,
    ProvisioningState,
    VolumeSnapshot,
    VolumeSnapshotContent,
)

from csi_driver import ids
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from csi_driver.server import ServeOptions, Server
from csi_driver.service import validate as v
from driver_harness import cleanup

MiB = 1 << 20
HEX = "0123456789abcdef" * 2


@dataclass
class OtherNode:
    """A second node's driver (its own state dir and socket) and its provisioner."""

    server: Server
    client: Client
    provisioner: Provisioner | None = None


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start drivers with a given node id (driver_harness.Driver always is node-1)."""
    started: list[tuple[Server, Client, Path]] = []

    def start(node_id: str, name: str) -> tuple[Server, Client]:
        root = tmp_path / name
        root.mkdir()
        server = Server(ServeOptions(endpoint=f"unix://{root / 'csi.sock'}", state_dir=root / "state",
                                     node_id=node_id))
        server.start()
        client = Client(root / "csi.sock")
        client.wait_ready()
        started.append((server, client, root))
        return server, client

    try:
        yield start
    finally:
        for server, client, root in started:
            client.close()
            server.stop(grace=5)
            cleanup(root)


@pytest.fixture
def node2(node: NodeEnv, serve) -> OtherNode:
    """node-2 of the NodeEnv's cluster (registered there already), with its provisioner."""
    server, client = serve("node-2", "node-2")
    other = OtherNode(server, client)
    other.provisioner = Provisioner(client, node.cluster, node_name="node-2")
    return other


def source_on_node_1(node: NodeEnv, kind: str) -> tuple[tuple[str, object], str]:
    """A claim's dataSource held by node-1, holding a file: (dataSource, its CSI id)."""
    src_pvc, src_pv = node.provision("source", 32 * MiB)
    pod = Pod("writer")
    (node.start_pod(pod, src_pv) / "hello").write_text("from node-1")
    node.stop_pod(pod, src_pv)
    if kind == "PersistentVolumeClaim":
        return (kind, src_pvc), src_pv.handle
    vs = VolumeSnapshot("snap", source=src_pvc)
    content = node.snapshotter.create(vs)
    return (kind, vs), content.snapshot_handle


def volumes_of(client: Client) -> list[str]:
    return [e.volume.volume_id for e in client.controller.ListVolumes(csi.ListVolumesRequest()).entries]


@pytest.mark.parametrize("kind", ["VolumeSnapshot", "PersistentVolumeClaim"])
def test_a_restore_or_clone_scheduled_on_another_node_is_rescheduled(
    node: NodeEnv, node2: OtherNode, kind: str
):
    """The scheduler picks node-2 for a claim whose source lives on node-1: node-2's
    provisioner gets RESOURCE_EXHAUSTED naming node-1 (ProvisioningReschedule), the
    selected-node annotation goes, and once node-1 is picked its provisioner makes the
    volume, with the source's data."""
    source, source_id = source_on_node_1(node, kind)
    claim = PVC(name="copy", request=32 * MiB, data_source=source,
                annotations={SELECTED_NODE_KEY: "node-2"})
    assert node.provisioner.sync_claim(claim, node.sc) is None, "node-1 leaves node-2's claim alone"

    with pytest.raises(ProvisioningFailed) as e:
        node2.provisioner.sync_claim(claim, node.sc)
    assert e.value.state == ProvisioningState.RESCHEDULE
    assert e.value.err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = e.value.err.details()
    assert f"{source_id} was made on node node-1 and lives there; this node is node-2" in details, details
    assert SELECTED_NODE_KEY not in claim.annotations, "rescheduleProvisioning removed the annotation"
    assert ids.node_of(source_id) == "node-1"
    assert volumes_of(node2.client) == [], "node-2 made nothing"
    assert node2.provisioner.sync_claim(claim, node.sc) is None, "an unscheduled claim waits"

    claim.annotations[SELECTED_NODE_KEY] = "node-1"  # the scheduler picks again
    pv = node.provisioner.sync_claim(claim, node.sc)
    assert pv is not None and ids.node_of(pv.handle) == "node-1"
    reader = Pod("reader")
    assert (node.start_pod(reader, pv) / "hello").read_text() == "from node-1"
    node.stop_pod(reader, pv)
    node.provisioner.delete(pv)


@pytest.mark.parametrize(
    ("kind", "handle"),
    [
        ("VolumeSnapshot", "snap-" + HEX),  # the untagged form no node made
        ("VolumeSnapshot", "snap-" + HEX + "@node-2"),  # this node's form, but unknown here
        ("VolumeSnapshot", "no-such-snapshot"),
        ("PersistentVolumeClaim", "vol-" + HEX),
        ("PersistentVolumeClaim", "vol-" + HEX + "@node-2"),
    ],
)
def test_a_source_no_node_made_stays_not_found(node: NodeEnv, node2: OtherNode, kind: str, handle: str):
    """An id no node made is NOT_FOUND (csi-sanity), ProvisioningFinished: no reschedule,
    the claim keeps its selected node."""
    if kind == "VolumeSnapshot":
        content = VolumeSnapshotContent("c", snapshot_handle=handle, ready_to_use=True, restore_size=MiB)
        source: tuple[str, object] = (kind, VolumeSnapshot("gone", content=content))
    else:
        from kubelet_sim import PV

        src = PVC(name="gone", request=MiB)
        src.volume = PV(name="pv-gone", handle=handle, capacity=MiB, access_modes=["ReadWriteOnce"])
        source = (kind, src)
    claim = PVC(name="orphan", request=16 * MiB, data_source=source,
                annotations={SELECTED_NODE_KEY: "node-2"})
    with pytest.raises(ProvisioningFailed) as e:
        node2.provisioner.sync_claim(claim, node.sc)
    assert e.value.err.code() == grpc.StatusCode.NOT_FOUND, e.value.err.details()
    assert e.value.state == ProvisioningState.FINISHED
    assert claim.annotations[SELECTED_NODE_KEY] == "node-2"


def test_other_calls_naming_another_nodes_ids_keep_their_answers(node: NodeEnv, node2: OtherNode):
    """Only CreateVolume's content source says where an id lives; every other call naming
    another node's volume or snapshot answers as for any unknown id (NOT_FOUND; OK for
    deletes), and leaves node-1's objects alone."""
    _, pv = node.provision("mine", 16 * MiB)
    snap = node.client.create_snapshot("mine-snap", pv.handle)
    c2 = node2.client
    nf = grpc.StatusCode.NOT_FOUND
    calls = {
        "ControllerGetVolume": lambda: c2.controller.ControllerGetVolume(
            csi.ControllerGetVolumeRequest(volume_id=pv.handle)),
        "CreateSnapshot": lambda: c2.create_snapshot("theirs", pv.handle),
        "GetSnapshot": lambda: c2.controller.GetSnapshot(
            csi.GetSnapshotRequest(snapshot_id=snap.snapshot_id)),
        "NodeGetVolumeStats": lambda: c2.stats(pv.handle, "/tmp"),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == nf, (what, e.value.code(), e.value.details())
    listed = c2.controller.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert list(listed.entries) == []
    c2.delete_volume(pv.handle)
    c2.delete_snapshot(snap.snapshot_id)
    assert volumes_of(node.client) == [pv.handle], "node-1 still holds its volume"
    node.client.delete_snapshot(snap.snapshot_id)
    node.provisioner.delete(pv)


def test_ids_name_the_node_that_made_them():
    """The format and its parse (csi_driver.ids): a path-safe node id within 128 bytes
    tags the id; anything else gives the plain form, which names no node."""
    vol = ids.issued_id("vol-", "node-1.example_2")
    assert re.fullmatch(r"vol-[0-9a-f]{32}@node-1\.example_2", vol)
    assert ids.node_of(vol) == "node-1.example_2" and ids.untagged(vol) == vol.partition("@")[0]
    assert v.VOLUME_ID_RE.match(vol) and not v.SNAPSHOT_ID_RE.match(vol)
    snap = ids.issued_id("snap-", "n")
    assert v.SNAPSHOT_ID_RE.match(snap) and ids.node_of(snap) == "n"
    longest = "n" * (ids.MAX_ISSUED_ID - len("snap-") - 33)
    assert len(ids.issued_id("snap-", longest)) == ids.MAX_ISSUED_ID
    for unsafe in ("", "a/b", "..", ".hidden", "-x", "node 1", "n\x00", "ü", longest + "nn"):
        plain = ids.issued_id("vol-", unsafe)
        assert re.fullmatch(r"vol-[0-9a-f]{32}", plain), (unsafe, plain)
        assert ids.node_of(plain) == ""
    for not_ours in ("vol-" + HEX + "@", "vol-" + HEX + "@../x", "vol-" + HEX + "@a/b", "r.io/x:snap-" + HEX):
        assert ids.node_of(not_ours) == ""
    assert not v.VOLUME_ID_RE.match("vol-" + HEX + "@../x")
    assert not v.SNAPSHOT_ID_RE.match("reg.io/x:snap-" + HEX + "@n"), "an exported id names no node"


@pytest.mark.parametrize("node_id", ["n" * 100, "node/with/slash"])
def test_a_node_id_unfit_for_a_tag_gives_plain_ids_that_work(serve, node_id: str):
    """A node id too long for a 128-byte id, or not path-safe: volumes and snapshots get
    the plain ids (as every id was before the tag), and clones and restores of them work."""
    _, c = serve(node_id, "plain")
    vol = c.create_volume("v", 16 * MiB).volume_id
    snap = c.create_snapshot("s", vol).snapshot_id
    assert re.fullmatch(r"vol-[0-9a-f]{32}", vol) and re.fullmatch(r"snap-[0-9a-f]{32}", snap)
    restored = c.create_volume("r", 16 * MiB, snapshot=snap).volume_id
    clone = c.create_volume("c", 16 * MiB, volume=vol).volume_id
    for x in (restored, clone, vol):
        c.delete_volume(x)
    c.delete_snapshot(snap)
    assert volumes_of(c) == []
