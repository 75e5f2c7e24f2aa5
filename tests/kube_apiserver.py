"""A small Kubernetes API server on 127.0.0.1: the part of the API the driver uses.

PersistentVolumes (get, list with an equality label selector, JSON merge patch) and
VolumeSnapshotContents (the same, as a custom resource), with the status codes and list
shapes of the real API server, so the driver's ``kubernetes`` client code runs unchanged.
The simulated sidecars act on ``objects`` directly, as their own API calls would.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client

PV_PATH = "/api/v1/persistentvolumes"
CONTENT_PATH = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
KINDS = {
    PV_PATH: ("persistentvolumes", "PersistentVolume", "v1"),
    CONTENT_PATH: ("volumesnapshotcontents", "VolumeSnapshotContent", "snapshot.storage.k8s.io/v1"),
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def matches(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind[0]: {} for kind in KINDS.values()}
        self.requests: list[tuple[str, str, str]] = []  # method, path, content type
        self.lock = threading.Lock()
        self._version = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def configuration(self) -> client.Configuration:
        return client.Configuration(host=self.url)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    # ---- what the API server keeps
    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._version += 1
            obj = copy.deepcopy(obj)
            obj.setdefault("metadata", {})["resourceVersion"] = str(self._version)
            self.objects[resource][obj["metadata"]["name"]] = obj
            return copy.deepcopy(obj)

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects[resource].get(name)
            return copy.deepcopy(obj) if obj is not None else None

    def patch(self, resource: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects[resource].get(name)
            if obj is None:
                return None
            self._version += 1
            obj = merge_patch(obj, patch)
            obj["metadata"]["resourceVersion"] = str(self._version)
            self.objects[resource][name] = obj
            return copy.deepcopy(obj)

    def list(self, resource: str, selector: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for o in self.objects[resource].values() if matches(o, selector)]


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str) -> None:
            self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": reason, "code": code, "message": reason})

        def _route(self) -> tuple[str, str, str, dict[str, list[str]]] | None:
            url = urlsplit(self.path)
            for prefix, (resource, _, _) in KINDS.items():
                if url.path == prefix:
                    return prefix, resource, "", parse_qs(url.query)
                if url.path.startswith(prefix + "/") and "/" not in url.path[len(prefix) + 1:]:
                    return prefix, resource, url.path[len(prefix) + 1:], parse_qs(url.query)
            return None

        def do_GET(self) -> None:
            api.requests.append(("GET", self.path, ""))
            route = self._route()
            if route is None:
                return self._status(404, "NotFound")
            prefix, resource, name, query = route
            if name:
                obj = api.get(resource, name)
                return self._send(200, obj) if obj else self._status(404, "NotFound")
            _, kind, version = KINDS[prefix]
            items = api.list(resource, (query.get("labelSelector") or [""])[0])
            self._send(200, {"kind": kind + "List", "apiVersion": version,
                             "metadata": {"resourceVersion": "1"}, "items": items})

        def do_PATCH(self) -> None:
            kind = self.headers.get("Content-Type", "")
            api.requests.append(("PATCH", self.path, kind))
            route = self._route()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if route is None or not route[2]:
                return self._status(404, "NotFound")
            if kind.split(";")[0] != "application/merge-patch+json":
                return self._status(415, "UnsupportedMediaType")
            obj = api.patch(route[1], route[2], body)
            return self._send(200, obj) if obj else self._status(404, "NotFound")

    return Handler


def pv_object(name: str, handle: str, node: str, driver: str = "overlay.csi.dev",
              capacity: int = 64 << 20) -> dict[str, Any]:
    """The PV external-provisioner makes (controller.go Provision: spec.csi from CreateVolume's
    answer, node affinity from accessible_topology by GenerateVolumeNodeAffinity)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": driver}},
        "spec": {
            "capacity": {"storage": str(capacity)},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "csi": {"driver": driver, "volumeHandle": handle, "fsType": "ext4"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.overlay.csi.dev/node", "operator": "In", "values": [node]}
            ]}]}},
        },
        "status": {"phase": "Bound"},
    }
