"""The store's rows as the components read them, one read transaction each: a
volume a caller names (NOT_FOUND when it is gone), a layer, a layer's chain."""

from __future__ import annotations

from csi_driver.errors import NotFound
from csi_driver.store import Layer, Store, Volume


class Records:
    def __init__(self, store: Store) -> None:
        self.store = store

    def volume(self, volume_id: str) -> Volume:
        with self.store.read() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def layer(self, layer_id: str) -> Layer | None:
        with self.store.read() as tx:
            return tx.layer(layer_id)

    def chain(self, top: str) -> list[Layer]:
        """The layer stack under ``top``, nearest first."""
        with self.store.read() as tx:
            return tx.chain(top)

    def upper_of(self, v: Volume) -> Layer:
        upper = self.layer(v.upper)
        if upper is None:
            raise LookupError(f"layer {v.upper} of volume {v.id} missing from store")
        return upper
