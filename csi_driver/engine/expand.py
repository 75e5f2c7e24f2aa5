"""Expansion: the controller grows the backing image, the node the mounted file system."""

from __future__ import annotations

import logging
import os

from csi_driver.engine import host
from csi_driver.engine.block import BLOCK, BlockOps
from csi_driver.errors import (
    CommandFailed,
    FailedPrecondition,
    OutOfRange,
)
from csi_driver.store import Layer

log = logging.getLogger(__name__)


class ExpandOps(BlockOps):
    def expand(self, volume_id: str, required: int, limit: int = 0) -> tuple[int, bool]:
        """Grow the volume's backing image (controller side).

        A detached volume's file system is grown at once, offline; for one in
        use, returns True: the node must grow the mounted file system.
        """
        v = self.get_volume(volume_id)
        if limit and limit < v.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} has {v.capacity_bytes} bytes, more than limit_bytes {limit}; "
                "shrinking is not supported"
            )
        if required <= v.capacity_bytes:
            required = v.capacity_bytes  # already that large: done (the spec's idempotent answer)
        capacity = self.resolve_capacity(required, limit, v.capacity_bytes)
        if capacity < v.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} has {v.capacity_bytes} bytes; shrinking to {capacity} is not supported"
            )
        if v.access_type == BLOCK:
            capacity = self._block_aligned(capacity, limit)
            self._block_grow(v, capacity)
            with self.store.tx() as tx:
                tx.update_layer(v.upper, image_bytes=capacity)
                tx.update_volume(volume_id, capacity_bytes=capacity)
            return capacity, False
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            assert upper is not None
        size = self._upper_size(capacity, upper.fs_type)
        image = self.layout.image(upper.id)
        if size > os.path.getsize(image):
            os.truncate(image, size)
            self._step("expand.truncated")
        with self.store.tx() as tx:
            tx.update_layer(upper.id, image_bytes=max(size, upper.image_bytes))
            tx.update_volume(volume_id, capacity_bytes=capacity)
        if self._upper_in_use(v):
            return capacity, True
        self._grow_offline(upper)
        return capacity, False

    def _grow_offline(self, upper: Layer) -> None:
        image = self.layout.image(upper.id)
        before = host.fs_used_bytes(image, upper.fs_type)
        if upper.fs_type == "ext4":
            host.run(["e2fsck", "-f", "-p", str(image)], check=False)
            host.run(["resize2fs", str(image)])
        else:
            self.mounts.acquire(upper.id, upper.fs_type, readonly=False)
            try:
                host.grow_fs(upper.fs_type, "", self.layout.mnt(upper.id))
            finally:
                self.mounts.release(upper.id)
        # nothing is written offline but the new groups' metadata (inode tables, bitmaps)
        self._count_as_empty(upper, host.fs_used_bytes(image, upper.fs_type) - before)

    def _count_as_empty(self, upper: Layer, metadata: int) -> None:
        """A grown file system's new metadata is part of its empty baseline, never
        data, or the volume's next snapshot would count it as written."""
        if metadata > 0:
            with self.store.tx() as tx:
                current = tx.layer(upper.id)
                if current is not None:
                    tx.update_layer(upper.id, base_bytes=current.base_bytes + metadata)

    def _undo_growth(
        self, upper: Layer, before: Layer, volume_id: str, capacity: int, image_size: int, device: str
    ) -> None:
        """A refused online growth changes nothing: the record and the image go back to the
        size the file system still has (only when it did not grow at all: a resize that
        failed part-way may have reached past the old end)."""
        with self.store.tx() as tx:
            tx.update_layer(upper.id, image_bytes=before.image_bytes)
            tx.update_volume(volume_id, capacity_bytes=capacity)
        try:
            os.truncate(self.layout.image(upper.id), image_size)
            host.loop_refresh(device)
        except (OSError, CommandFailed) as e:  # the refusal stays the answer
            log.warning("could not shrink volume %s's image back after a refused growth: %s", volume_id, e)

    def expand_node(self, volume_id: str, required: int, limit: int = 0) -> int:
        """Grow the file system the pod sees (node side), online when mounted."""
        v = self.get_volume(volume_id)
        if v.access_type == BLOCK:
            if required > v.capacity_bytes:
                return self.expand(volume_id, required, limit)[0]
            self._block_grow(v, v.capacity_bytes)
            return v.capacity_bytes
        with self.store.tx() as tx:
            before = tx.layer(v.upper)  # to undo the record if the file system cannot grow
            assert before is not None
        grown_from = None
        image_before = os.path.getsize(self.layout.image(v.upper))
        if required > v.capacity_bytes or image_before < self._upper_size(v.capacity_bytes, v.fs_type):
            grown_from = v.capacity_bytes
            self.expand(volume_id, required, limit)
            v = self.get_volume(volume_id)
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            assert upper is not None
        mnt = self.layout.mnt(upper.id)
        device = host.device_of(mnt)
        if device is None:
            self._grow_offline(upper)
            return v.capacity_bytes
        host.loop_refresh(device)
        fs_before = os.statvfs(mnt)
        try:
            host.grow_fs(upper.fs_type, device, mnt)
        except CommandFailed as e:
            if grown_from is not None and os.statvfs(mnt).f_blocks == fs_before.f_blocks:
                self._undo_growth(upper, before, volume_id, grown_from, image_before, device)
            if "Permission denied" in e.stderr or "Operation not permitted" in e.stderr:
                raise FailedPrecondition(
                    "growing a mounted ext4 file system needs CAP_SYS_RESOURCE: run the node plugin "
                    "privileged (the Helm chart does), or use fsType xfs, which grows online without it"
                ) from e
            raise
        # mounted, the superblock on disk lags: estimate the new groups' metadata from
        # how many blocks the file system grew by (256-byte inodes per 16 KiB, as made)
        fs_after = os.statvfs(mnt)
        grown = (fs_after.f_blocks - fs_before.f_blocks) * fs_after.f_frsize
        self._count_as_empty(upper, grown // 64 if upper.fs_type == "ext4" else 0)
        return v.capacity_bytes
