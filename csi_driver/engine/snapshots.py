"""Snapshots: commit a detached upper in place, or freeze and copy one in use."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.core import SNAPSHOT_PREFIX, EngineCore
from csi_driver.engine.layers import (
    build_image,
    make_clean,
)
from csi_driver.engine.layout import new_id
from csi_driver.errors import (
    AlreadyExists,
    NotFound,
)
from csi_driver.store import Layer, Snapshot, Volume

log = logging.getLogger(__name__)


class SnapshotOps(EngineCore):
    def _upper_in_use(self, v: Volume) -> bool:
        return host.is_mounted(self.layout.mnt(v.upper))

    def _share_volume(self, volume_id: str, scratch: Path) -> Layer:
        """Turn a volume's current content into a committed layer and return it.

        Detached: the upper itself is committed (O(1)) and the volume continues
        on a fresh upper. In use: the upper's file system is frozen and its
        image copied (only allocated extents), so the copy is crash-consistent.
        """
        with self.store.tx() as tx:
            v = tx.volume(volume_id)
            if v is None:
                raise NotFound(f"volume {volume_id} does not exist")
            upper = tx.layer(v.upper)
            assert upper is not None
            parent = tx.layer(upper.parent) if upper.parent else None
        if self._upper_in_use(v):
            copy_dir = scratch / "copy"
            copy_dir.mkdir()
            mnt = self.layout.mnt(upper.id)
            host.freeze(mnt)
            try:
                self._step("snapshot.frozen")
                host.copy_sparse(self.layout.image(upper.id), copy_dir / "image")
            finally:
                host.thaw(mnt)
            layer = self._new_layer(
                parent,
                active=False,
                fs_type=upper.fs_type,
                image_bytes=upper.image_bytes,
                used_bytes=host.allocated_bytes(copy_dir / "image"),
            )
            with self.store.tx() as tx:
                tx.add_layer(layer)
                self._install(copy_dir, layer.id)
                self._step("snapshot.copied")
            self._link(layer)
            return layer
        make_clean(self.layout.image(upper.id), upper.fs_type)
        fresh_dir = scratch / "fresh"
        fresh_dir.mkdir()
        build_image(fresh_dir / "image", upper.image_bytes, upper.fs_type)
        committed = Layer(
            **{
                **upper.__dict__,
                "active": 0,
                "depth": upper.depth + 1,
                "used_bytes": host.allocated_bytes(self.layout.image(upper.id)),
            }
        )
        fresh = self._new_layer(committed, active=True, fs_type=upper.fs_type, image_bytes=upper.image_bytes)
        with self.store.tx() as tx:
            tx.update_layer(upper.id, active=0, depth=committed.depth, used_bytes=committed.used_bytes)
            tx.add_layer(fresh)
            tx.update_volume(volume_id, upper=fresh.id)
            self._install(fresh_dir, fresh.id)
            self._step("snapshot.committed")
        self._link(fresh)
        return committed

    def create_snapshot(self, name: str, source_volume_id: str, group_id: str = "") -> Snapshot:
        with self.store.tx() as tx:
            existing = tx.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id == source_volume_id:
                    return existing
                raise AlreadyExists(f"snapshot {name!r} exists for another volume")
            v = tx.volume(source_volume_id)
            if v is None:
                raise NotFound(f"volume {source_volume_id} does not exist")
        with self._scratch() as scratch:
            layer = self._share_volume(source_volume_id, scratch)
            with self.store.tx() as tx:
                size = min(v.capacity_bytes, sum(x.used_bytes for x in tx.chain(layer.id)))
                snap = tx.add_snapshot(
                    Snapshot(
                        seq=0,
                        id=SNAPSHOT_PREFIX + new_id(),
                        name=name,
                        source_volume_id=v.id,
                        layer=layer.id,
                        access_type=v.access_type,
                        fs_type=v.fs_type,
                        source_capacity=v.capacity_bytes,
                        size_bytes=size,
                        group_id=group_id,
                        created_at=time.time(),
                    )
                )
                self._step("snapshot.recorded")
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self.store.tx() as tx:
            if tx.snapshot(snapshot_id) is None:
                return
            tx.delete_snapshot(snapshot_id)
            gone = tx.collect_garbage()
        self._step("delete_snapshot.committed")
        self._discard_layers(gone)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        with self.store.tx() as tx:
            return tx.snapshot(snapshot_id)

    def list_snapshots(
        self, after_seq: int, limit: int, source_volume_id: str | None = None
    ) -> list[Snapshot]:
        with self.store.tx() as tx:
            return tx.snapshots(after_seq, limit, source_volume_id)
