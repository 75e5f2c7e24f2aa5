"""The driver's view of the Kubernetes API: five calls, on the official client.

Objects come back as the API server's own JSON (camelCase dicts), so the relay and the
adopter read them the way ``kubectl get -o json`` shows them. Patches are JSON merge
patches (RFC 7386): a ``None`` value removes a key.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Protocol

from csi_driver.errors import Unavailable

log = logging.getLogger(__name__)

SNAPSHOT_GROUP, SNAPSHOT_VERSION, CONTENTS = "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 10.0  # seconds per API call: a slow API server never holds a gRPC worker longer

Obj = dict[str, Any]


class KubeApi(Protocol):
    def get_pv(self, name: str) -> Obj | None: ...

    def patch_pv(self, name: str, patch: Obj) -> None: ...

    def list_pvs(self, label_selector: str) -> list[Obj]: ...

    def list_snapshot_contents(self) -> list[Obj]: ...

    def patch_snapshot_content(self, name: str, patch: Obj) -> None: ...


class ClusterApi:
    """``KubeApi`` on the ``kubernetes`` client: in-cluster credentials (the pod's
    ServiceAccount), or a given ``kubernetes.client.Configuration``."""

    def __init__(self, configuration: Any = None) -> None:
        from kubernetes import client, config

        if configuration is None:
            config.load_incluster_config()
            configuration = client.Configuration.get_default_copy()
        self._client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._client)
        self._custom = client.CustomObjectsApi(self._client)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise Unavailable(f"the Kubernetes API refused to {what}: {e.status} {e.reason}") from e
        except Exception as e:  # connection refused, timeout, TLS: the API server is not there now
            raise Unavailable(f"could not {what}: {type(e).__name__}: {str(e)[:200]}") from e

    def _plain(self, obj: Any) -> Obj:
        return json.loads(json.dumps(self._client.sanitize_for_serialization(obj)))

    def get_pv(self, name: str) -> Obj | None:
        pv = self._call(f"read PersistentVolume {name}", self._core.read_persistent_volume, name)
        return None if pv is None else self._plain(pv)

    def patch_pv(self, name: str, patch: Obj) -> None:
        self._call(f"patch PersistentVolume {name}", self._core.patch_persistent_volume, name, patch,
                   _content_type=MERGE_PATCH)

    def list_pvs(self, label_selector: str) -> list[Obj]:
        found = self._call("list PersistentVolumes", self._core.list_persistent_volume,
                           label_selector=label_selector)
        return [] if found is None else [self._plain(x) for x in found.items]

    def list_snapshot_contents(self) -> list[Obj]:
        found = self._call("list VolumeSnapshotContents", self._custom.list_cluster_custom_object,
                           SNAPSHOT_GROUP, SNAPSHOT_VERSION, CONTENTS)
        return [] if found is None else list(found.get("items", []))

    def patch_snapshot_content(self, name: str, patch: Obj) -> None:
        self._call(f"patch VolumeSnapshotContent {name}", self._custom.patch_cluster_custom_object,
                   SNAPSHOT_GROUP, SNAPSHOT_VERSION, CONTENTS, name, patch, _content_type=MERGE_PATCH)


def connect(setting: str) -> KubeApi | None:
    """``--kubernetes``: ``auto`` uses the in-cluster API when the pod has one, ``off`` never."""
    if setting == "off":
        return None
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):  # what in-cluster configuration reads first
        log.info("not in a Kubernetes pod: running without the Kubernetes API")
        return None
    try:
        return ClusterApi()
    except ImportError:
        log.warning("the kubernetes client is not installed: VolumeAttributesClass changes and "
                    "pre-provisioned snapshot contents are not handled")
    except Exception as e:  # not in a pod: no service account, no KUBERNETES_SERVICE_HOST
        log.info("no Kubernetes API (%s): running without it", str(e)[:200])
    return None
