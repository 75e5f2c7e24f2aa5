"""Pre-provisioned VolumeSnapshotContents of exported snapshots, handed to the registry snapshotter.

With distributed snapshotting every csi-snapshotter runs with --node-deployment and sees
only the contents labelled ``snapshot.storage.kubernetes.io/managed-by=<its node>``
(external-snapshotter v8.6.0 cmd/csi-snapshotter/main.go). The snapshot-controller writes
that label only on the contents it creates itself (common-controller createSnapshotContent),
so a content an operator creates for an existing snapshot handle is seen by no sidecar and
never becomes ready. An exported snapshot needs no node: its handle names its artifact. The
adopter labels such contents with the name the chart gives the registry snapshotter, a
csi-snapshotter whose driver instance answers ListSnapshots and DeleteSnapshot from the
registry (service/central.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from csi_driver.kube.api import KubeApi
from csi_driver.kube.periodic import Periodic

log = logging.getLogger(__name__)

MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"  # utils.VolumeSnapshotContentManagedByLabel


class ContentAdopter(Periodic):
    what = "looking for pre-provisioned snapshot contents"

    def __init__(
        self,
        api: KubeApi,
        driver_name: str,
        snapshotter_node: str,
        is_exported: Callable[[str], bool],
        interval: float = 10.0,
    ) -> None:
        super().__init__(interval, "content-adopter")
        self.api = api
        self.driver_name = driver_name
        self.snapshotter_node = snapshotter_node
        self.is_exported = is_exported

    def once(self) -> list[str]:
        """One pass; returns the names of the contents it labelled."""
        adopted = []
        for content in self.api.list_snapshot_contents():
            meta, spec = content.get("metadata") or {}, content.get("spec") or {}
            handle = (spec.get("source") or {}).get("snapshotHandle")
            if spec.get("driver") != self.driver_name or not isinstance(handle, str):
                continue
            if (meta.get("labels") or {}).get(MANAGED_BY) or not self.is_exported(handle):
                continue  # a node's own, or a local snapshot's: only its node can check it
            name = meta.get("name", "")
            label = {MANAGED_BY: self.snapshotter_node}
            self.api.patch_snapshot_content(name, {"metadata": {"labels": label}})
            log.info("snapshot content %s (%s) handed to %s", name, handle, self.snapshotter_node)
            adopted.append(name)
        return adopted
