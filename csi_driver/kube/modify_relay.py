"""VolumeAttributesClass changes, from the central resizer to the node that holds the volume.

external-resizer has no per-node mode (v2.2.1 cmd/csi-resizer/main.go): one leader calls
ControllerModifyVolume on the central instance, which cannot touch a node-local volume.
The central instance therefore writes the request onto the volume's PersistentVolume and
waits for the node's answer there:

* ``<driver>/modify-request`` (annotation): ``{"id", "volumeId", "node", "parameters"}``;
* ``<driver>/modify-pending: "true"`` (label), so each node lists only what is pending;
* ``<driver>/modify-result`` (annotation), written by the node: ``{"id", "code", "message"}``,
  the status its own ControllerModifyVolume gave; the label goes in the same patch.

The central call returns that status, so the resizer's own rules apply unchanged
(modify_volume.go controllerModifyVolumeWithTarget: INVALID_ARGUMENT is Infeasible, the
uncertain codes keep the target). A node that has not answered before the call's deadline
gives UNAVAILABLE: the resizer retries with the same parameters, and the retry waits for the
same request instead of making a new one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from csi_driver import errors
from csi_driver.errors import DriverError, FailedPrecondition, NotFound, Unavailable
from csi_driver.kube.api import KubeApi, Obj
from csi_driver.kube.periodic import Periodic

log = logging.getLogger(__name__)

TOPOLOGY_KEY = "topology.overlay.csi.dev/node"
PV_NAME_KEY = "csi.storage.k8s.io/pv/name"  # resizer --extra-modify-metadata (callModifyVolumeOnPlugin)
POLL_SECONDS = 0.25
MAX_WAIT_SECONDS = 60.0
_CODES: dict[str, type[DriverError]] = {
    cls.code: cls
    for cls in (errors.InvalidArgument, NotFound, errors.OutOfRange, errors.ResourceExhausted,
                FailedPrecondition, errors.Aborted, Unavailable, errors.AlreadyExists)
}


class Keys:
    def __init__(self, driver_name: str) -> None:
        self.request = f"{driver_name}/modify-request"
        self.result = f"{driver_name}/modify-result"
        self.pending = f"{driver_name}/modify-pending"


def _json(annotations: dict[str, str], key: str) -> dict[str, Any]:
    """An annotation's JSON object, or {} when absent or not an object (anyone may edit a PV)."""
    try:
        value = json.loads(annotations.get(key, "") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def node_of(pv: Obj) -> str:
    """The node a volume of this driver lives on: its PV's required node affinity, as the
    provisioner wrote it from CreateVolume's accessible_topology."""
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get(
        "nodeSelectorTerms"
    ) or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == TOPOLOGY_KEY and expr.get("operator") == "In" and expr.get("values"):
                return str(expr["values"][0])
    return ""


def split_parameters(params: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The PV name the resizer adds with --extra-modify-metadata, and the VAC's own parameters."""
    pv_name = params.get(PV_NAME_KEY, "")
    own = {k: v for k, v in params.items() if not k.startswith("csi.storage.k8s.io/")}
    return pv_name, own


class ModifyRelay:
    """The central side: hand a modification to the volume's node and wait for its answer."""

    def __init__(self, api: KubeApi, driver_name: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self.api = api
        self.keys = Keys(driver_name)
        self.sleep = sleep

    def modify(self, volume_id: str, pv_name: str, parameters: dict[str, str], seconds: float) -> None:
        pv = self._pv(volume_id, pv_name)
        node = node_of(pv)
        if not node:
            raise FailedPrecondition(f"PersistentVolume {pv_name} names no node of this driver")
        annotations = (pv.get("metadata") or {}).get("annotations") or {}
        request, result = _json(annotations, self.keys.request), _json(annotations, self.keys.result)
        same = request.get("volumeId") == volume_id and request.get("parameters") == parameters
        if same and result.get("id") == request.get("id"):
            return self._answer(result, node)  # a retry of a change the node has already answered
        if not same:
            request = {"id": uuid.uuid4().hex, "volumeId": volume_id, "node": node, "parameters": parameters}
            self.api.patch_pv(pv_name, {"metadata": {
                "labels": {self.keys.pending: "true"},
                "annotations": {self.keys.request: json.dumps(request, sort_keys=True)},
            }})
            log.info("modification of %s handed to node %s: %s", volume_id, node, parameters)
        deadline = time.monotonic() + max(0.0, min(seconds, MAX_WAIT_SECONDS))
        while time.monotonic() < deadline:
            self.sleep(POLL_SECONDS)
            pv = self.api.get_pv(pv_name) or {}
            result = _json((pv.get("metadata") or {}).get("annotations") or {}, self.keys.result)
            if result.get("id") == request["id"]:
                return self._answer(result, node)
        raise Unavailable(f"node {node} has not applied the modification of {volume_id} yet; "
                          "the resizer's retry waits for it")

    def _pv(self, volume_id: str, pv_name: str) -> Obj:
        if not pv_name:
            raise FailedPrecondition(
                f"no {PV_NAME_KEY} in mutable_parameters: run csi-resizer with --extra-modify-metadata")
        pv = self.api.get_pv(pv_name)
        if pv is None:
            raise NotFound(f"PersistentVolume {pv_name} does not exist")
        handle = ((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle")
        if handle != volume_id:
            raise NotFound(f"PersistentVolume {pv_name} is not volume {volume_id}")
        return pv

    @staticmethod
    def _answer(result: dict[str, Any], node: str) -> None:
        code, message = str(result.get("code", "")), str(result.get("message", ""))[:1000]
        if code == "OK":
            return
        raise _CODES.get(code, Unavailable)(f"node {node}: {message or code}")


class ModifyWatcher(Periodic):
    """The node side: apply the pending modifications of this node's volumes and answer."""

    what = "checking for volume modifications"

    def __init__(
        self,
        api: KubeApi,
        driver_name: str,
        node_id: str,
        apply: Callable[[str, dict[str, str]], None],
        interval: float = 1.0,
    ) -> None:
        super().__init__(interval, "modify-watch")
        self.api = api
        self.keys = Keys(driver_name)
        self.node_id = node_id
        self.apply = apply  # the node's own ControllerModifyVolume, guard included

    def once(self) -> int:
        """One pass; returns how many requests it answered."""
        answered = 0
        for pv in self.api.list_pvs(f"{self.keys.pending}=true"):
            meta = pv.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            request = _json(annotations, self.keys.request)
            if request.get("node") != self.node_id or node_of(pv) != self.node_id:
                continue
            if _json(annotations, self.keys.result).get("id") == request.get("id"):
                continue  # answered; only the label's removal was lost
            result = self._apply(request)
            if result["code"] == "ABORTED":
                continue  # the volume is busy: next pass
            self.api.patch_pv(meta.get("name", ""), {"metadata": {
                "labels": {self.keys.pending: None},
                "annotations": {self.keys.result: json.dumps(result, sort_keys=True)},
            }})
            answered += 1
        return answered

    def _apply(self, request: dict[str, Any]) -> dict[str, str]:
        volume_id, params = request.get("volumeId"), request.get("parameters")
        answer = {"id": str(request.get("id", ""))}
        if not isinstance(volume_id, str) or not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            return {**answer, "code": "INVALID_ARGUMENT", "message": "malformed modification request"}
        try:
            self.apply(volume_id, params)
        except DriverError as e:
            log.info("modification of %s refused: %s", volume_id, e)
            return {**answer, "code": e.code, "message": str(e)}
        except Exception as e:  # answered all the same, so the central call does not wait it out
            log.exception("modification of %s failed", volume_id)
            return {**answer, "code": "INTERNAL", "message": f"{type(e).__name__}: {str(e)[:300]}"}
        log.info("volume %s modified: %s", volume_id, params)
        return {**answer, "code": "OK", "message": ""}
