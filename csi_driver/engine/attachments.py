"""ControllerPublishVolume's records: which node a volume is attached to."""

from __future__ import annotations

from csi_driver.errors import AlreadyExists, ResourceExhausted
from csi_driver.store import Store


class Attachments:
    def __init__(self, store: Store) -> None:
        self.store = store

    def attached(self, volume_id: str) -> bool:
        with self.store.read() as tx:
            return bool(tx.attached_nodes(volume_id))

    def attached_volumes(self) -> set[str]:
        """Every volume with an attachment (one query, for ListVolumes)."""
        with self.store.read() as tx:
            return set(tx.attached_volume_ids())

    def attach(self, volume_id: str, node_id: str, readonly: bool, limit: int) -> None:
        """Record an attachment; the same one again is fine, another readonly flag is not."""
        with self.store.tx() as tx:
            current = tx.attachment(volume_id, node_id)
            if current is not None and current != readonly:
                raise AlreadyExists(
                    f"volume {volume_id} is already published to {node_id} with readonly={current}"
                )
            if current is None and limit and tx.count_attached(node_id, volume_id) >= limit:
                raise ResourceExhausted(f"node {node_id} already has its maximum of {limit} volumes")
            tx.attach(volume_id, node_id, readonly)

    def detach(self, volume_id: str, node_id: str = "") -> None:
        """Forget the attachment to ``node_id``, or to every node."""
        with self.store.tx() as tx:
            for node in [node_id] if node_id else tx.attached_nodes(volume_id):
                tx.detach(volume_id, node)
