"""The central controller as cluster-wide sidecars call it: the resizer's modify controller
(VolumeAttributesClass) relayed to the volume's node, through a real Kubernetes API client
against tests/kube_apiserver.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_sidecars import ContentSidecar, ModifyClaim, ModifyController, content_object
from kube_apiserver import FakeApiServer, pv_object
from kubelet_sim import (
    PVC,
    CallerError,
    CtrlRPC,
    NodeEnv,
    Pod,
    VolumeSnapshot,
    VolumeSnapshotContent,
    controller_capabilities,
)

from csi_driver.kube.api import ClusterApi
from csi_driver.kube.contents import ContentAdopter
from csi_driver.kube.modify_relay import ModifyWatcher
from csi_driver.proto import csi_pb2 as csi
from driver_harness import Driver
from registry_harness import REGISTRY_BINARY, LocalRegistry

RELAY = "overlay.csi.dev/modify-request"
RESULT = "overlay.csi.dev/modify-result"
PENDING = "overlay.csi.dev/modify-pending"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def central(api: FakeApiServer, tmp_path: Path) -> Iterator[Driver]:
    """The chart's controller pod: `serve --mode=controller-expand` beside csi-resizer."""
    root = tmp_path / "central"
    root.mkdir()
    d = Driver(root, node_id="central", mode="controller-expand", kube_api=ClusterApi(api.configuration()))
    yield d
    d.stop()


def upper_mount_options(node: NodeEnv, volume_id: str) -> str:
    engine = node.driver.engine
    mnt = str(engine.backend.layout.mnt(engine.get_volume(volume_id).upper))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == mnt:
            return fields[-1]
    return ""


def provisioned(node: NodeEnv, api: FakeApiServer, name: str, **kw):
    pvc, pv = node.provision(name, **kw)
    api.put("persistentvolumes", pv_object(pv.name, pv.handle, "node-1"))
    return pvc, pv


def test_the_resizer_reaches_a_modify_capable_instance_only_with_the_api(tmp_path: Path, central: Driver):
    """main.go builds the modify controller only when the driver it talks to has MODIFY_VOLUME:
    the central instance has it when the Kubernetes API can carry the change to the node."""
    assert CtrlRPC.MODIFY_VOLUME in controller_capabilities(central.client)
    root = tmp_path / "alone"
    root.mkdir()
    alone = Driver(root, node_id="central", mode="controller-expand", kubernetes="off")
    try:
        assert CtrlRPC.MODIFY_VOLUME not in controller_capabilities(alone.client)
        with pytest.raises(CallerError, match="Modify not supported"):
            ModifyController(alone.client, FakeApiServer(), {})
    finally:
        alone.stop()


def test_a_volume_attributes_class_change_reaches_the_node_and_applies(make_node, api, central):
    node = make_node(kube_api=ClusterApi(api.configuration()))
    pvc, pv = provisioned(node, api, "db")
    pod = Pod("app")
    node.start_pod(pod, pv)
    vacs = {"fast": {"commitSeconds": "30", "readAheadKiB": "512"}}
    resizer = ModifyController(central.client, api, vacs)
    claim = ModifyClaim(pvc.name, pv.name, spec_vac="fast")
    assert resizer.run(claim) is None, claim.conditions
    assert (claim.current_vac, claim.status) == ("fast", "")
    vol = node.driver.engine.get_volume(pv.handle)
    assert vol.mutable == {"commitSeconds": "30", "readAheadKiB": "512"}
    assert "commit=30" in upper_mount_options(node, pv.handle), "applied at once to the mounted upper"
    stored = api.get("persistentvolumes", pv.name)
    assert stored["spec"]["volumeAttributesClassName"] == "fast"
    assert PENDING not in stored["metadata"].get("labels", {}), "nothing left pending"
    assert json.loads(stored["metadata"]["annotations"][RESULT])["code"] == "OK"
    patches = {(path.split("?")[0], kind) for method, path, kind in api.requests if method == "PATCH"}
    assert patches == {(f"/api/v1/persistentvolumes/{pv.name}", "application/merge-patch+json")}
    # the same class again (a resync): answered from the PV, no new request for the node
    request = stored["metadata"]["annotations"][RELAY]
    claim.status, claim.target = "InProgress", "fast"
    assert resizer.sync(claim) is None
    assert api.get("persistentvolumes", pv.name)["metadata"]["annotations"][RELAY] == request
    node.stop_pod(pod, pv)


def test_a_change_the_volume_cannot_take_is_infeasible(make_node, api, central):
    """The node's own INVALID_ARGUMENT reaches the resizer, which marks the claim Infeasible
    (only INVALID_ARGUMENT is); the volume is unchanged."""
    node = make_node(kube_api=ClusterApi(api.configuration()))
    pvc, pv = provisioned(node, api, "raw", volume_mode="Block")
    resizer = ModifyController(central.client, api, {"roomy": {"reservedPercent": "0"}})
    claim = ModifyClaim(pvc.name, pv.name, spec_vac="roomy")
    err = resizer.run(claim)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert claim.status == "Infeasible"
    assert "file system volumes only" in claim.conditions[0][2]
    assert node.driver.engine.get_volume(pv.handle).mutable == {}
    # an unknown key is refused by the central instance itself, before the PV is touched
    resizer.vacs["typo"] = {"comitSeconds": "5"}
    claim2 = ModifyClaim(pvc.name, pv.name, spec_vac="typo")
    before = api.get("persistentvolumes", pv.name)["metadata"]["resourceVersion"]
    assert resizer.run(claim2).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.get("persistentvolumes", pv.name)["metadata"]["resourceVersion"] == before


def test_a_node_that_has_not_answered_keeps_the_claim_in_progress(tmp_path, make_node, api, central):
    """While the volume's node does not answer (its driver restarting), the call ends
    UNAVAILABLE: uncertain for the resizer, which keeps the target and calls again; the retry
    waits for the same request, and the node applies it once it is back."""
    node = make_node(kubernetes="off")  # no watcher: the node plugin cannot see the API now
    pvc, pv = provisioned(node, api, "late")
    resizer = ModifyController(central.client, api, {"slow": {"commitSeconds": "60"}}, timeout=2.0)
    claim = ModifyClaim(pvc.name, pv.name, spec_vac="slow")
    err = resizer.sync(claim)
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    assert claim.status == "InProgress" and claim.name in resizer.uncertain
    assert "node node-1 has not applied" in claim.conditions[0][2]
    request = api.get("persistentvolumes", pv.name)["metadata"]["annotations"][RELAY]
    node.opts["kube_api"] = ClusterApi(api.configuration())
    node.opts.pop("kubernetes")
    node.restart_driver()
    resizer.timeout = 10.0
    assert resizer.run(claim) is None, claim.conditions
    assert api.get("persistentvolumes", pv.name)["metadata"]["annotations"][RELAY] == request
    assert node.driver.engine.get_volume(pv.handle).mutable == {"commitSeconds": "60"}


def test_without_extra_modify_metadata_the_central_instance_says_what_is_missing(make_node, api, central):
    node = make_node(kube_api=ClusterApi(api.configuration()))
    pvc, pv = provisioned(node, api, "meta")
    resizer = ModifyController(central.client, api, {"x": {"discard": "false"}}, extra_modify_metadata=False)
    claim = ModifyClaim(pvc.name, pv.name, spec_vac="x")
    err = resizer.sync(claim)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--extra-modify-metadata" in err.details()
    assert claim.status == "InProgress", "final but not infeasible: retried, and the target may change"


def test_the_node_answers_only_for_its_own_volumes(make_node, api):
    """A request naming another node is left for that node; a request for a volume this node
    does not hold is answered NOT_FOUND."""
    node = make_node(kube_api=ClusterApi(api.configuration()))
    watcher = next(w for w in node.driver.server.background if isinstance(w, ModifyWatcher))
    watcher.stop()  # drive it by hand
    other = pv_object("pv-other", "vol-" + "1" * 32, "node-2")
    other["metadata"].update(labels={PENDING: "true"}, annotations={RELAY: json.dumps(
        {"id": "a", "volumeId": "vol-" + "1" * 32, "node": "node-2", "parameters": {"discard": "true"}})})
    api.put("persistentvolumes", other)
    gone = pv_object("pv-gone", "vol-" + "2" * 32, "node-1")
    gone["metadata"].update(labels={PENDING: "true"}, annotations={RELAY: json.dumps(
        {"id": "b", "volumeId": "vol-" + "2" * 32, "node": "node-1", "parameters": {"discard": "true"}})})
    api.put("persistentvolumes", gone)
    assert watcher.once() == 1
    assert RESULT not in api.get("persistentvolumes", "pv-other")["metadata"]["annotations"]
    answer = json.loads(api.get("persistentvolumes", "pv-gone")["metadata"]["annotations"][RESULT])
    assert answer["id"] == "b" and answer["code"] == "NOT_FOUND"
    assert PENDING not in api.get("persistentvolumes", "pv-gone")["metadata"].get("labels", {})


# ---------------------------------------------------------------- pre-provisioned contents
REGISTRY_NODE = "overlay-csi-registry"  # the chart's registrySnapshotter node name


@pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package")
def test_a_pre_provisioned_content_of_an_exported_snapshot_becomes_ready_and_restores(
    tmp_path, make_node, api
):
    """Moving a backup to another cluster: an operator creates a VolumeSnapshotContent naming an
    exported snapshot. No node's snapshotter sees it (the managed-by label filter); the central
    instance labels it for the registry snapshotter, which makes it ready from the artifact's
    manifest, and any node restores it."""
    with LocalRegistry(tmp_path / "registry") as reg:
        insecure = frozenset({reg.host})
        a = make_node("a", insecure_registries=insecure)
        src_pvc, src_pv = a.provision("source")
        pod = Pod("writer")
        (a.start_pod(pod, src_pv) / "hello").write_text("from the first cluster")
        a.stop_pod(pod, src_pv)
        vs = VolumeSnapshot("backup", source=src_pvc)
        made = a.snapshotter.create(vs, {"repository": f"{reg.host}/backups"})
        exported = made.snapshot_handle
        local = a.snapshotter.create(VolumeSnapshot("local", source=src_pvc)).snapshot_handle

        # the other cluster: its API, its nodes, its central instance
        root = tmp_path / "central"
        root.mkdir()
        central = Driver(root, node_id="central", mode="controller-expand", insecure_registries=insecure,
                         kube_api=ClusterApi(api.configuration()), registry_snapshotter_node=REGISTRY_NODE)
        try:
            b = make_node("b", node_id="node-2", insecure_registries=insecure, kubernetes="off")
            api.put("volumesnapshotcontents", content_object("moved", exported))
            api.put("volumesnapshotcontents", content_object("local-one", local))
            never_pushed = exported.replace("snap-", "snap-0")[:-1]
            api.put("volumesnapshotcontents", content_object("missing", never_pushed))

            node_sidecar = ContentSidecar(b.client, api, "overlay.csi.dev", "node-2")
            assert node_sidecar.visible() == [], "node-deployed snapshotters see no unlabelled content"
            adopter = next(w for w in central.server.background if isinstance(w, ContentAdopter))
            assert sorted(adopter.once()) == ["missing", "moved"], "only exported snapshots are adopted"
            assert "labels" not in api.get("volumesnapshotcontents", "local-one")["metadata"]

            registry_sidecar = ContentSidecar(central.client, api, "overlay.csi.dev", REGISTRY_NODE)
            registry_sidecar.sync()
            moved = api.get("volumesnapshotcontents", "moved")["status"]
            assert moved["readyToUse"] is True and moved["snapshotHandle"] == exported
            assert moved["restoreSize"] == made.restore_size, "what the first cluster's snapshot said"
            missing = api.get("volumesnapshotcontents", "missing")["status"]
            assert missing["readyToUse"] is False and "can not find snapshot" in missing["error"]["message"]

            content = VolumeSnapshotContent("moved", exported, True, moved["restoreSize"])
            source = VolumeSnapshot("moved", content=content)
            pvc = PVC(name="restored", data_source=("VolumeSnapshot", source))
            pv = b.provisioner.provision(pvc, b.sc)
            reader = Pod("reader")
            assert (b.start_pod(reader, pv) / "hello").read_text() == "from the first cluster"
            b.stop_pod(reader, pv)

            # deletionPolicy Delete: the registry snapshotter's DeleteSnapshot removes the artifact
            central.client.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=exported))
            after = central.client.controller.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=exported))
            assert list(after.entries) == []
        finally:
            central.stop()
