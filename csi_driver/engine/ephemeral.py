"""Ephemeral inline volumes: created at NodePublishVolume, deleted at unpublish.

Kubelet names them with its own handle (``csi-<hash>``); we keep that handle
as the volume's name and stage it privately under ``ephemeral/<volume id>``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from csi_driver.engine.capacity import VolumeSizes
from csi_driver.engine.context import VolumeSpec
from csi_driver.engine.node import NodePublisher
from csi_driver.engine.volumes import Volumes
from csi_driver.errors import InvalidArgument, ResourceExhausted
from csi_driver.store import Store, Volume

log = logging.getLogger(__name__)

EPHEMERAL_PREFIX = "ephemeral/"


class Ephemeral:
    def __init__(
        self,
        store: Store,
        sizes: VolumeSizes,
        volumes: Volumes,
        node: NodePublisher,
        *,
        staging_root: Path,
        max_size: int,
    ) -> None:
        self.store = store
        self.sizes = sizes
        self.volumes = volumes
        self.staging_root = staging_root  # the private staging dirs, one per volume
        self.max_size = max_size  # --max-ephemeral-size: all inline volumes together
        self.node = node
        self._cap_guard = threading.Lock()  # the cap's check and the creation, one at a time

    def _inline_bytes(self, but: str = "") -> int:
        with self.store.read() as tx:
            return sum(v.capacity_bytes for v in tx.volumes() if v.ephemeral and v.id != but)

    def _check_cap(self, handle: str, size: int, but: str = "") -> None:
        """--max-ephemeral-size: what all inline volumes of the node hold together."""
        cap = self.max_size
        if cap <= 0:
            raise InvalidArgument(
                "inline ephemeral volumes are disabled on this node (--max-ephemeral-size 0; "
                "chart: csiDriver.ephemeral.enabled); use a PersistentVolumeClaim"
            )
        total = self._inline_bytes(but) + size
        if total > cap:
            raise ResourceExhausted(
                f"inline volume {handle[:80]!r} of {size} bytes would bring this node's inline volumes "
                f"to {total} bytes, above its --max-ephemeral-size of {cap} bytes; delete pods with "
                "inline volumes, use a PersistentVolumeClaim, or raise csiDriver.ephemeral.maxSize"
            )

    def ephemeral_volume(self, handle: str) -> Volume | None:
        with self.store.read() as tx:
            return tx.volume_by_name(EPHEMERAL_PREFIX + handle)

    def _ephemeral_staging(self, v: Volume) -> str:
        return str(self.staging_root / v.id)

    def publish_ephemeral(
        self,
        handle: str,
        target_path: str,
        readonly: bool,
        spec: VolumeSpec,
        mount_flags: list[str],
        group: str = "",
    ) -> Volume:
        """Create (idempotently, by handle), stage privately and publish.

        A refused publish changes nothing: a volume this call created is deleted again."""
        with self._cap_guard:
            created = self.ephemeral_volume(handle) is None
            if created:  # the size it will have (a base layer may make it larger: checked again)
                size = self.sizes.resolve(spec.required_bytes, 0)
                self._check_cap(handle, size)
            v = self.volumes.create_volume(
                VolumeSpec(**{**spec.__dict__, "name": EPHEMERAL_PREFIX + handle, "ephemeral": True})
            )
        staging = self._ephemeral_staging(v)
        try:
            if created:
                self._check_cap(handle, v.capacity_bytes, but=v.id)
            self.node.stage(v.id, staging, mount_flags)
            self.node.publish(v.id, staging, target_path, readonly, mount_flags)
            if group:
                self.node.set_mount_group(v.id, group, readonly)
        except Exception:
            if created:
                try:
                    self._forget_ephemeral(v, staging)
                except Exception:  # the refusal is the answer; a later unpublish or restart cleans up
                    log.exception("could not delete inline volume %s after a refused publish", v.id)
            raise
        return v

    def _forget_ephemeral(self, v: Volume, staging: str) -> None:
        with self.store.read() as tx:
            if tx.publications(v.id):
                return  # published after all (a retry raced in): kept
        self.node.unstage(v.id, staging)
        self.volumes.delete_volume(v.id)
        with contextlib.suppress(OSError):
            Path(staging).rmdir()

    def unpublish_ephemeral(self, v: Volume, target_path: str) -> None:
        self.node.unpublish(v.id, target_path)
        with self.store.read() as tx:
            others = [p for p in tx.publications(v.id) if p.target_path != target_path]
        if others:
            return
        staging = self._ephemeral_staging(v)
        self.node.unstage(v.id, staging)
        self.volumes.delete_volume(v.id)
        with contextlib.suppress(OSError):
            (self.staging_root / v.id).rmdir()
