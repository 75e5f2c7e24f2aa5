"""Node-side rules that file system and block volumes share: how many volumes may
be in use, that a mount hides no other volume's path, and a single writer."""

from __future__ import annotations

import os
from collections.abc import Callable

from csi_driver.errors import FailedPrecondition, ResourceExhausted
from csi_driver.store import Publication, Store, Volume


class NodeChecks:
    def __init__(self, store: Store, node_id: str, max_volumes: int) -> None:
        self.store = store
        self.node_id = node_id
        self.max_volumes = max_volumes  # 0: no limit

    def stage_limit(self, v: Volume) -> None:
        """--max-volumes-per-node: how many volumes may be in use on this node."""
        limit = self.max_volumes
        if not limit or v.staging_path:
            return
        with self.store.read() as tx:
            if tx.count_staged(except_id=v.id) >= limit:
                raise ResourceExhausted(
                    f"node {self.node_id} already has its maximum of {limit} volumes in use"
                )

    def hides_nothing(self, path: str) -> None:
        """A mount at ``path`` must not cover another volume's staging path or target
        (a bind over kubelet's staging dir would hide every volume staged there)."""
        with self.store.read() as tx:
            below = tx.paths_below(os.path.normpath(path))
        if below:
            volume_id, other = below[0]
            raise FailedPrecondition(
                f"{path} contains {other}, a path of volume {volume_id}; a mount there would hide it"
            )

    def single_writer(
        self,
        v: Volume,
        target_path: str,
        readonly: bool,
        single_writer: bool,
        *,
        live: Callable[[Publication], bool],
    ) -> None:
        """SINGLE_NODE_SINGLE_WRITER: while published read-write, nowhere else. Only
        publications whose target still shows the volume (``live``) count: a record whose
        mount is gone (a reboot, a manual umount) must not lock the volume out forever."""
        with self.store.read() as tx:
            others = [p for p in tx.publications(v.id) if p.target_path != target_path]
        others = [p for p in others if live(p)]
        if single_writer and others:
            raise FailedPrecondition(
                f"volume {v.id} is single-writer and already published at {others[0].target_path}"
            )
        writer = next((p for p in others if p.options.get("single_writer") and not p.readonly), None)
        if writer is not None:
            raise FailedPrecondition(f"volume {v.id} has a single writer at {writer.target_path}")
