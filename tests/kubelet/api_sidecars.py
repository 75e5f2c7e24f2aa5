"""Sidecar controllers that act on API objects, played as their source plays them.

* ``ModifyController``: external-resizer v2.2.1, its VolumeAttributesClass path:
  cmd/csi-resizer/main.go (NewModifierFromClient -> SupportsControllerModify; no
  MODIFY_VOLUME: "Modify not supported", no modify controller), pkg/modifycontroller/
  modify_volume.go (modify, validateVACAndModifyVolumeWithTarget,
  controllerModifyVolumeWithTarget, markControllerModifyVolumeCompleted) and
  pkg/modifier/csi_modifier.go (Modify: volume handle from the PV, --extra-modify-metadata).
* ``ContentSidecar``: external-snapshotter v8.6.0 csi-snapshotter for pre-provisioned
  contents: cmd/csi-snapshotter/main.go (--node-deployment: the content informer's label
  selector snapshot.storage.kubernetes.io/managed-by=<NODE_NAME>; the driver must have
  CREATE_DELETE_SNAPSHOT), pkg/sidecar-controller/snapshot_controller.go (syncContent,
  isDriverMatch, checkandUpdateContentStatusOperation, updateContentErrorStatusWithEvent)
  and pkg/snapshotter/snapshotter.go (GetSnapshotStatus: ListSnapshots by id).

The API server is tests/kube_apiserver.py; these models change its objects directly, as
their own API calls would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
from kube_apiserver import FakeApiServer
from kubelet_sim import CallerError, CtrlRPC, controller_capabilities, is_final_error

from csi_driver.proto import csi_pb2 as csi

MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
EXTRA_MODIFY_KEYS = tuple("csi.storage.k8s.io/" + k for k in ("pvc/name", "pvc/namespace", "pv/name"))


@dataclass
class ModifyClaim:
    """The parts of a bound PVC the modify controller reads and writes."""

    name: str
    pv_name: str
    namespace: str = "default"
    spec_vac: str = ""
    current_vac: str = ""
    status: str = ""  # ModifyVolumeStatus.status: "", Pending, InProgress, Infeasible
    target: str = ""
    conditions: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, message


class ModifyController:
    def __init__(self, client, api: FakeApiServer, vacs: dict[str, dict[str, str]], *,
                 extra_modify_metadata: bool = True, timeout: float = 10.0) -> None:
        if CtrlRPC.MODIFY_VOLUME not in controller_capabilities(client):
            raise CallerError("Modify not supported")  # main.go: no modify controller is built
        self.client = client
        self.api = api
        self.vacs = vacs
        self.extra_modify_metadata = extra_modify_metadata
        self.timeout = timeout  # --timeout: the per-call deadline
        self.uncertain: set[str] = set()
        self.calls: list[csi.ControllerModifyVolumeRequest] = []

    def sync(self, claim: ModifyClaim) -> grpc.RpcError | None:
        """modify(): one pass; returns the driver's error, which requeues the claim."""
        if not claim.status and claim.spec_vac == claim.current_vac:
            return None
        if claim.status == "InProgress" and claim.name in self.uncertain:
            target = claim.target  # uncertain: the target is locked until the driver answers
        else:
            target = claim.spec_vac
            if target not in self.vacs:  # "VAC %q does not exist."
                claim.status = "Pending"
                return None
            claim.status, claim.target = "InProgress", target
        pv = self.api.get("persistentvolumes", claim.pv_name)
        assert pv is not None
        params = dict(self.vacs[target])
        if self.extra_modify_metadata:  # callModifyVolumeOnPlugin
            params.update(zip(EXTRA_MODIFY_KEYS, (claim.name, claim.namespace, claim.pv_name), strict=True))
        req = csi.ControllerModifyVolumeRequest(volume_id=pv["spec"]["csi"]["volumeHandle"],
                                                mutable_parameters=params)
        self.calls.append(req)
        try:
            self.client.controller.ControllerModifyVolume(req, timeout=self.timeout)
        except grpc.RpcError as e:
            return self._failed(claim, e)
        # markControllerModifyVolumeCompleted: the PV first, then the claim
        self.api.patch("persistentvolumes", claim.pv_name, {"spec": {"volumeAttributesClassName": target}})
        claim.current_vac, claim.status, claim.target, claim.conditions = target, "", "", []
        self.uncertain.discard(claim.name)
        return None

    def _failed(self, claim: ModifyClaim, e: grpc.RpcError) -> grpc.RpcError:
        """controllerModifyVolumeWithTarget: only INVALID_ARGUMENT is Infeasible."""
        if is_final_error(e):
            self.uncertain.discard(claim.name)
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                claim.status = "Infeasible"
        else:
            self.uncertain.add(claim.name)
        reason = "".join(w.capitalize() for w in e.code().name.split("_"))
        claim.conditions = [("ModifyVolumeError", reason, e.details() or "")]
        return e

    def run(self, claim: ModifyClaim, attempts: int = 10, delay: float = 0.1) -> grpc.RpcError | None:
        """The work queue: requeue with rate limiting while the driver answers an error."""
        err = None
        for _ in range(attempts):
            err = self.sync(claim)
            if err is None or claim.status == "Infeasible":
                return err
            time.sleep(delay)
        return err


class ContentSidecar:
    def __init__(self, client, api: FakeApiServer, driver_name: str, node_name: str | None) -> None:
        if CtrlRPC.CREATE_DELETE_SNAPSHOT not in controller_capabilities(client):
            raise CallerError("CSI driver does not support CREATE_DELETE_SNAPSHOT")  # main.go exits
        self.client = client
        self.api = api
        self.driver_name = driver_name
        self.node_name = node_name  # --node-deployment with NODE_NAME, or None
        self.list_secrets: dict[str, str] = {}

    def visible(self) -> list[dict]:
        """The content informer: with --node-deployment, only contents labelled managed-by=NODE_NAME."""
        selector = f"{MANAGED_BY}={self.node_name}" if self.node_name else ""
        return self.api.list("volumesnapshotcontents", selector)

    def sync(self) -> None:
        for content in self.visible():
            spec = content.get("spec") or {}
            handle = (spec.get("source") or {}).get("snapshotHandle")
            if spec.get("driver") != self.driver_name or not handle:  # isDriverMatch
                continue
            if (content.get("status") or {}).get("readyToUse"):
                continue
            self._check(content["metadata"]["name"], handle)

    def _check(self, name: str, handle: str) -> None:
        """checkandUpdateContentStatusOperation -> GetSnapshotStatus."""
        if CtrlRPC.LIST_SNAPSHOTS not in controller_capabilities(self.client):
            self.api.patch("volumesnapshotcontents", name,
                           {"status": {"snapshotHandle": handle, "readyToUse": True}})
            return
        try:
            resp = self.client.controller.ListSnapshots(
                csi.ListSnapshotsRequest(snapshot_id=handle, secrets=self.list_secrets))
            if not resp.entries:
                raise CallerError(f"can not find snapshot for snapshotID {handle}")
        except (grpc.RpcError, CallerError) as e:  # updateContentErrorStatusWithEvent
            message = e.details() if isinstance(e, grpc.RpcError) else str(e)
            error = {"message": f"Failed to check and update snapshot content: {message}"}
            self.api.patch("volumesnapshotcontents", name, {"status": {"readyToUse": False, "error": error}})
            return
        snap = resp.entries[0].snapshot
        status = {"snapshotHandle": handle, "readyToUse": snap.ready_to_use,
                  "creationTime": snap.creation_time.ToNanoseconds(), "error": None}
        if snap.size_bytes > 0:
            status["restoreSize"] = snap.size_bytes
        self.api.patch("volumesnapshotcontents", name, {"status": status})


def content_object(name: str, handle: str, driver: str = "overlay.csi.dev",
                   deletion_policy: str = "Retain", labels: dict[str, str] | None = None) -> dict:
    """A pre-provisioned VolumeSnapshotContent as an operator writes it."""
    meta: dict = {"name": name}
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": meta,
        "spec": {
            "driver": driver,
            "deletionPolicy": deletion_policy,
            "source": {"snapshotHandle": handle},
            "volumeSnapshotRef": {"name": name, "namespace": "default"},
        },
    }
