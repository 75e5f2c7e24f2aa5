"""Snapshots: commit a detached upper in place, or freeze and copy one in use."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.block import BLOCK, BlockOps
from csi_driver.engine.core import GROUP_PREFIX, SNAPSHOT_PREFIX
from csi_driver.engine.layers import (
    build_image,
    make_clean,
)
from csi_driver.engine.layout import new_id
from csi_driver.errors import (
    AlreadyExists,
    NotFound,
)
from csi_driver.store import Layer, Snapshot, Tx, Volume

log = logging.getLogger(__name__)


class SnapshotOps(BlockOps):
    def _upper_in_use(self, v: Volume) -> bool:
        return host.is_mounted(self.layout.mnt(v.upper))

    def _share_volume(self, volume_id: str, scratch: Path) -> Layer:
        """Turn a volume's current content into a committed layer and return it."""
        with self.store.tx() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return self._capture([v], scratch)[0]

    def _capture(self, vols: list[Volume], scratch: Path) -> list[Layer]:
        """Committed layers holding each volume's content at one instant.

        Detached: the upper itself is committed (O(1)) and the volume continues
        on a fresh upper. In use: every in-use upper's file system is frozen at
        once, the images are copied (only allocated extents), then all thawed,
        so a group is crash-consistent across its members. Block members are
        captured inside the same frozen window.
        """
        live = [v for v in vols if v.access_type != BLOCK and self._upper_in_use(v)]
        blocks = [v for v in vols if v.access_type == BLOCK]
        copies: dict[str, Path] = {}
        frozen: list[Path] = []
        try:
            for v in live:
                mnt = self.layout.mnt(v.upper)
                frozen.append(mnt)  # before freezing: a timed-out fsfreeze may have frozen it
                host.freeze(mnt)
            self._step("snapshot.frozen")
            for v in live:
                copies[v.id] = scratch / f"copy-{v.id}"
                copies[v.id].mkdir()
                host.copy_sparse(self.layout.image(v.upper), copies[v.id] / "image")
            for v in blocks:
                copies[v.id] = scratch / f"copy-{v.id}"
                copies[v.id].mkdir()
                self._block_capture(v, copies[v.id] / "image")
        finally:
            for mnt in frozen:
                host.thaw(mnt)
        out: list[Layer] = []
        for v in vols:
            if v.access_type == BLOCK:
                size = os.path.getsize(copies[v.id] / "image")
                out.append(self._add_copied_layer(copies[v.id], None, BLOCK, size))
            elif v.id in copies:
                out.append(self._install_copy(v, copies[v.id]))
            else:
                out.append(self._commit_upper(v, scratch))
        return out

    def _install_copy(self, v: Volume, copy_dir: Path) -> Layer:
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            assert upper is not None
            parent = tx.layer(upper.parent) if upper.parent else None
        return self._add_copied_layer(copy_dir, parent, upper.fs_type, upper.image_bytes, upper.base_bytes)

    def _commit_upper(self, v: Volume, scratch: Path) -> Layer:
        """Commit a detached volume's upper in place; the volume gets a fresh one.

        A chain at the depth cap is flattened into one layer, and then that
        layer, not the deep chain, is what the snapshot (or clone) refers to, so
        it is referenced (and pinned) from the moment it is installed.
        """
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            assert upper is not None
        image = self.layout.image(upper.id)
        make_clean(image, upper.fs_type)
        data = max(0, host.fs_used_bytes(image, upper.fs_type) - upper.base_bytes)
        committed = Layer(**{**upper.__dict__, "active": 0, "depth": upper.depth + 1, "used_bytes": data})
        base, flat = committed, None
        if committed.depth >= self.config.max_depth:
            flat_dir = scratch / f"flat-{v.id}"
            flat_dir.mkdir()
            flat = base = self._flatten(upper, flat_dir)
        fresh_dir = scratch / f"fresh-{v.id}"
        fresh_dir.mkdir()
        size = self._upper_size(v.capacity_bytes, upper.fs_type)
        empty = build_image(fresh_dir / "image", size, upper.fs_type)
        fresh = self._new_layer(base, active=True, fs_type=upper.fs_type, image_bytes=size, base_bytes=empty)
        with self.store.tx() as tx:
            tx.update_layer(upper.id, active=0, depth=committed.depth, used_bytes=data)
            if flat is not None:
                tx.add_layer(flat)
                self._install(flat_dir, flat.id)
            tx.add_layer(fresh)
            tx.update_volume(v.id, upper=fresh.id)
            self._install(fresh_dir, fresh.id)
            gone = tx.collect_garbage() if flat is not None else []  # the deep chain, unless shared
            self._step("snapshot.committed")
        self._discard_layers(gone)
        for layer in (flat, fresh):
            if layer is not None:
                self._link(layer)
        return base

    def create_group_snapshot(self, name: str, volume_ids: list[str]) -> tuple[dict, list[Snapshot]]:
        """Snapshots of several volumes taken at one instant (all frozen together)."""
        members = sorted(set(volume_ids))
        with self.store.tx() as tx:
            existing = tx.group_by_name(name)
            if existing is not None:
                if sorted(existing["members"]) == members:
                    return existing, self._group_snapshots(tx, existing["id"])
                raise AlreadyExists(f"group snapshot {name!r} exists with other volumes")
            vols = []
            for vid in members:
                v = tx.volume(vid)
                if v is None:
                    raise NotFound(f"volume {vid} does not exist")
                vols.append(v)
        group_id = GROUP_PREFIX + new_id()
        with self._scratch() as scratch:
            layers = self._capture(vols, scratch)
            with self.store.tx() as tx:
                tx.add_group(group_id, name, members)
                for v, layer in zip(vols, layers, strict=True):
                    self._record_snapshot(tx, f"{group_id}/{v.id}", v, layer, group_id)
                group = tx.group(group_id)
                snaps = self._group_snapshots(tx, group_id)
        assert group is not None
        return group, snaps

    @staticmethod
    def _group_snapshots(tx: Tx, group_id: str) -> list[Snapshot]:
        return [s for s in tx.snapshots() if s.group_id == group_id]

    def get_group_snapshot(self, group_id: str) -> tuple[dict, list[Snapshot]] | None:
        with self.store.tx() as tx:
            group = tx.group(group_id)
            return (group, self._group_snapshots(tx, group_id)) if group else None

    def delete_group_snapshot(self, group_id: str) -> None:
        with self.store.tx() as tx:
            if tx.group(group_id) is None:
                return
            for s in self._group_snapshots(tx, group_id):
                tx.delete_snapshot(s.id)
            tx.delete_group(group_id)
            gone = tx.collect_garbage()
        self._discard_layers(gone)

    def _record_snapshot(self, tx: Tx, name: str, v: Volume, layer: Layer, group_id: str = "") -> Snapshot:
        # a block snapshot restores the whole device; a file system one what it holds
        size = (
            v.capacity_bytes
            if v.access_type == BLOCK
            else min(v.capacity_bytes, sum(x.used_bytes for x in tx.chain(layer.id)))
        )
        return tx.add_snapshot(
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
                snap = self._record_snapshot(tx, name, v, layer, group_id)
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
