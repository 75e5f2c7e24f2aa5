"""Expansion: the controller grows the volume's upper, the node the mounted file system."""

from __future__ import annotations

import logging

from csi_driver.engine.block import BlockVolumes, block_aligned
from csi_driver.engine.capacity import Capacity, VolumeSizes
from csi_driver.engine.context import BLOCK, CrashHook
from csi_driver.engine.records import Records
from csi_driver.errors import CommandFailed, OutOfRange
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.store import Layer, Store

log = logging.getLogger(__name__)


class Expander:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        capacity: Capacity,
        sizes: VolumeSizes,
        block: BlockVolumes,
        step: CrashHook,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.capacity = capacity
        self.sizes = sizes
        self.block = block
        self.step = step

    def expand(self, volume_id: str, required: int, limit: int = 0) -> tuple[int, bool]:
        """Grow the volume's upper (controller side).

        A detached volume's file system is grown at once, offline; for one in
        use, returns True: the node must grow the mounted file system.
        """
        v = self.records.volume(volume_id)
        if limit and limit < v.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} has {v.capacity_bytes} bytes, more than limit_bytes {limit}; "
                "shrinking is not supported"
            )
        if required <= v.capacity_bytes:
            required = v.capacity_bytes  # already that large: done (the spec's idempotent answer)
        capacity = self.sizes.resolve(required, limit, v.capacity_bytes)
        if capacity < v.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} has {v.capacity_bytes} bytes; shrinking to {capacity} is not supported"
            )
        upper = self.records.upper_of(v)
        growth = f"growth of volume {volume_id}"
        if v.access_type == BLOCK:
            capacity = block_aligned(capacity, limit)
            with self.capacity.admit(max(0, capacity - upper.image_bytes), growth, OutOfRange):
                self.block.grow(v, capacity)
                with self.store.tx() as tx:
                    tx.update_layer(v.upper, image_bytes=capacity)
                    tx.update_volume(volume_id, capacity_bytes=capacity)
            return capacity, False
        size = self.capacity.upper_size(capacity, upper.fs_type)
        with self.capacity.admit(max(0, size - upper.image_bytes), growth, OutOfRange):
            if size > self.backend.size(upper):
                self.backend.resize(upper, size)
                self.step("expand.truncated")
            with self.store.tx() as tx:
                tx.update_layer(upper.id, image_bytes=max(size, upper.image_bytes))
                tx.update_volume(volume_id, capacity_bytes=capacity)
        if self.backend.is_active(upper):
            return capacity, True
        self._count_as_empty(upper, self.backend.grow_fs(upper))
        return capacity, False

    def _count_as_empty(self, upper: Layer, metadata: int) -> None:
        """A grown file system's new metadata is part of its empty baseline, never
        data, or the volume's next snapshot would count it as written."""
        if metadata > 0:
            with self.store.tx() as tx:
                current = tx.layer(upper.id)
                if current is not None:
                    tx.update_layer(upper.id, base_bytes=current.base_bytes + metadata)

    def _undo_growth(self, upper: Layer, before: Layer, volume_id: str, capacity: int, size: int) -> None:
        """A refused online growth changes nothing: the record and the image go back to the
        size the file system still has (only when it did not grow at all: a resize that
        failed part-way may have reached past the old end)."""
        with self.store.tx() as tx:
            tx.update_layer(upper.id, image_bytes=before.image_bytes)
            tx.update_volume(volume_id, capacity_bytes=capacity)
        try:
            self.backend.resize(upper, size)
        except (OSError, CommandFailed) as e:  # the refusal stays the answer
            log.warning("could not shrink volume %s's image back after a refused growth: %s", volume_id, e)

    def expand_node(self, volume_id: str, required: int, limit: int = 0) -> int:
        """Grow the file system the pod sees (node side), online when mounted."""
        v = self.records.volume(volume_id)
        if v.access_type == BLOCK:
            if required > v.capacity_bytes:
                return self.expand(volume_id, required, limit)[0]
            self.block.grow(v, v.capacity_bytes)
            return v.capacity_bytes
        before = self.records.upper_of(v)  # to undo the record if the file system cannot grow
        grown_from = None
        size_before = self.backend.size(before)
        if required > v.capacity_bytes or size_before < self.capacity.upper_size(v.capacity_bytes, v.fs_type):
            grown_from = v.capacity_bytes
            self.expand(volume_id, required, limit)
            v = self.records.volume(volume_id)
        upper = self.records.upper_of(v)
        fs_before = self.backend.fs_usage(upper)
        try:
            metadata = self.backend.grow_fs(upper)
        except Exception:
            # undo only a refused online growth that left the mounted file system as it
            # was; offline, expand() has grown it already and the image must stay
            try:
                fs_after = self.backend.fs_usage(upper)
            except OSError:
                fs_after = None
            unchanged = (
                fs_before is not None
                and fs_after is not None
                and fs_after.total_bytes == fs_before.total_bytes
            )
            if grown_from is not None and unchanged:
                self._undo_growth(upper, before, volume_id, grown_from, size_before)
            raise
        self._count_as_empty(upper, metadata)
        return v.capacity_bytes
