"""Ephemeral inline volumes: created at NodePublishVolume, deleted at unpublish.

Kubelet names them with its own handle (``csi-<hash>``); we keep that handle
as the volume's name and stage it privately under ``ephemeral/<volume id>``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from csi_driver.engine.context import EngineContext, VolumeSpec
from csi_driver.engine.node import NodePublisher
from csi_driver.engine.volumes import Volumes
from csi_driver.store import Volume

log = logging.getLogger(__name__)

EPHEMERAL_PREFIX = "ephemeral/"


class Ephemeral:
    def __init__(self, ctx: EngineContext, volumes: Volumes, node: NodePublisher) -> None:
        self.ctx = ctx
        self.volumes = volumes
        self.node = node

    def ephemeral_volume(self, handle: str) -> Volume | None:
        with self.ctx.store.read() as tx:
            return tx.volume_by_name(EPHEMERAL_PREFIX + handle)

    def _ephemeral_staging(self, v: Volume) -> str:
        return str(self.ctx.state.ephemeral / v.id)

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
        created = self.ephemeral_volume(handle) is None
        v = self.volumes.create_volume(
            VolumeSpec(**{**spec.__dict__, "name": EPHEMERAL_PREFIX + handle, "ephemeral": True})
        )
        staging = self._ephemeral_staging(v)
        try:
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
        with self.ctx.store.read() as tx:
            if tx.publications(v.id):
                return  # published after all (a retry raced in): kept
        self.node.unstage(v.id, staging)
        self.volumes.delete_volume(v.id)
        with contextlib.suppress(OSError):
            Path(staging).rmdir()

    def unpublish_ephemeral(self, v: Volume, target_path: str) -> None:
        self.node.unpublish(v.id, target_path)
        with self.ctx.store.read() as tx:
            others = [p for p in tx.publications(v.id) if p.target_path != target_path]
        if others:
            return
        staging = self._ephemeral_staging(v)
        self.node.unstage(v.id, staging)
        self.volumes.delete_volume(v.id)
        with contextlib.suppress(OSError):
            (self.ctx.state.ephemeral / v.id).rmdir()
