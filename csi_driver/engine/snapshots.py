"""Snapshots and group snapshots: records over layers that Capture makes."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from csi_driver.engine.builds import LayerBuilds
from csi_driver.engine.capacity import Capacity
from csi_driver.engine.capture import Capture
from csi_driver.engine.context import BLOCK, GROUP_PREFIX, SNAPSHOT_PREFIX, CrashHook
from csi_driver.engine.transfers import exported_id, snapshot_reference
from csi_driver.errors import AlreadyExists, FailedPrecondition, NotFound
from csi_driver.ids import issued_id, new_id
from csi_driver.locks import KeyedLocks
from csi_driver.registry.reference import Repository
from csi_driver.store import Layer, PendingDelete, ReadTx, Snapshot, Store, Tx, Volume

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(
        self,
        store: Store,
        builds: LayerBuilds,
        capacity: Capacity,
        capture: Capture,
        step: CrashHook,
        *,
        node_id: str,
        max_per_volume: int = 0,
    ) -> None:
        self.store = store
        self.builds = builds
        self.capacity = capacity
        self.capture = capture
        self.step = step
        self.node_id = node_id
        self.max_per_volume = max_per_volume  # 0: no limit
        self._per_volume = KeyedLocks()  # --max-snapshots-per-volume: count and take, one at a time

    def _check_limit(self, tx: ReadTx, v: Volume) -> None:
        limit = self.max_per_volume
        if limit and len(tx.snapshots(source_volume_id=v.id)) >= limit:
            # FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: external-snapshotter takes the latter
            # as not final and keeps the content "being created", which blocks its deletion
            raise FailedPrecondition(
                f"volume {v.id} already has {limit} snapshots, the node's --max-snapshots-per-volume; "
                "delete some of its snapshots first"
            )

    def create_group_snapshot(
        self, name: str, volume_ids: list[str], repository: Repository | None = None
    ) -> tuple[dict, list[Snapshot]]:
        """Snapshots of several volumes taken at one instant (all frozen together).
        ``repository``: the members are for export there, each id its artifact's
        reference (``Engine.export_group`` pushes them)."""
        members = sorted(set(volume_ids))
        with self.store.tx() as tx:
            existing = tx.group_by_name(name)
            if existing is not None:
                snaps = self._group_snapshots(tx, existing["id"])
                if sorted(existing["members"]) != members:
                    raise AlreadyExists(f"group snapshot {name!r} exists with other volumes")
                refs = {(ref.repository if (ref := snapshot_reference(s.id)) else None) for s in snaps}
                if refs != {repository}:
                    raise AlreadyExists(f"group snapshot {name!r} exists with another repository parameter")
                return existing, snaps
            vols = []
            for vid in members:
                v = tx.volume(vid)
                if v is None:
                    raise NotFound(f"volume {vid} does not exist")
                self._check_limit(tx, v)
                vols.append(v)
        group_id = GROUP_PREFIX + new_id()
        need = sum(self.capacity.allocation(v) for v in vols)
        with self.capacity.admit(need, f"group snapshot {name!r}"), self.builds.scratch() as scratch:
            layers = self.capture.volumes(vols, scratch)
            with self.store.tx() as tx:
                tx.add_group(group_id, name, members)
                for v, layer in zip(vols, layers, strict=True):
                    member_id = (
                        exported_id(repository, SNAPSHOT_PREFIX + new_id())
                        if repository is not None
                        else issued_id(SNAPSHOT_PREFIX, self.node_id)
                    )
                    self._record_snapshot(tx, f"{group_id}/{v.id}", v, layer, group_id, member_id)
                group = tx.group(group_id)
                snaps = self._group_snapshots(tx, group_id)
        assert group is not None
        return group, snaps

    @staticmethod
    def _group_snapshots(tx: ReadTx, group_id: str) -> list[Snapshot]:
        return [s for s in tx.snapshots() if s.group_id == group_id]

    def get_group_snapshot(self, group_id: str) -> tuple[dict, list[Snapshot]] | None:
        with self.store.read() as tx:
            group = tx.group(group_id)
            return (group, self._group_snapshots(tx, group_id)) if group else None

    def delete_group_snapshot(self, group_id: str, pending: Sequence[PendingDelete] = ()) -> None:
        """Delete a group and its members; ``pending`` (members' manifest deletions that
        wait for their registry) is recorded in the same transaction."""
        with self.store.tx() as tx:
            for p in pending:
                tx.add_pending_delete(p)
            if tx.group(group_id) is None:
                return
            for s in self._group_snapshots(tx, group_id):
                tx.delete_snapshot(s.id)
            tx.delete_group(group_id)
            gone = tx.collect_garbage()
        self.builds.discard(gone)

    def _record_snapshot(
        self, tx: Tx, name: str, v: Volume, layer: Layer, group_id: str = "", snapshot_id: str = ""
    ) -> Snapshot:
        # a block snapshot restores the whole device; a file system one what it holds
        size = (
            v.capacity_bytes
            if v.access_type == BLOCK
            else min(v.capacity_bytes, sum(x.used_bytes for x in tx.chain(layer.id)))
        )
        return tx.add_snapshot(
            Snapshot(
                seq=0,
                id=snapshot_id or issued_id(SNAPSHOT_PREFIX, self.node_id),
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

    def create_snapshot(
        self,
        name: str,
        source_volume_id: str,
        group_id: str = "",
        repository: Repository | None = None,
        copy_limit: int | None = None,
    ) -> Snapshot:
        """``repository``: the snapshot is for export there, and its id is its
        artifact's reference (``Transfers.push_snapshot`` pushes it). ``copy_limit``:
        the most a capture of the volume in use may copy (lowers the node's limit)."""
        if repository is None:
            snapshot_id = issued_id(SNAPSHOT_PREFIX, self.node_id)
        else:  # any node can restore it: its id (and its artifact's tag) names no node
            snapshot_id = exported_id(repository, SNAPSHOT_PREFIX + new_id())
        with self._per_volume.hold(source_volume_id):
            return self._create_snapshot(
                name, source_volume_id, group_id, repository, snapshot_id, copy_limit
            )

    def _create_snapshot(
        self,
        name: str,
        source_volume_id: str,
        group_id: str,
        repository: Repository | None,
        snapshot_id: str,
        copy_limit: int | None,
    ) -> Snapshot:
        with self.store.tx() as tx:
            existing = tx.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise AlreadyExists(f"snapshot {name!r} exists for another volume")
                ref = snapshot_reference(existing.id)
                if (ref.repository if ref else None) != repository:
                    raise AlreadyExists(f"snapshot {name!r} exists with another repository parameter")
                return existing
            v = tx.volume(source_volume_id)
            if v is None:
                raise NotFound(f"volume {source_volume_id} does not exist")
            self._check_limit(tx, v)
        admitted = self.capacity.admit(self.capacity.allocation(v), f"snapshot {name!r}")
        with admitted, self.builds.scratch() as scratch:
            layer = self.capture.volume(source_volume_id, scratch, copy_limit)
            with self.store.tx() as tx:
                snap = self._record_snapshot(tx, name, v, layer, group_id, snapshot_id)
                self.step("snapshot.recorded")
        return snap

    def delete_snapshot(self, snapshot_id: str, pending: PendingDelete | None = None) -> None:
        """Delete a snapshot held here; ``pending`` (its manifest's deletion, which waits
        for its registry) is recorded in the same transaction."""
        with self.store.tx() as tx:
            if pending is not None:
                tx.add_pending_delete(pending)
            if tx.snapshot(snapshot_id) is None:
                return
            tx.delete_snapshot(snapshot_id)
            gone = tx.collect_garbage()
        self.step("delete_snapshot.committed")
        self.builds.discard(gone)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        with self.store.read() as tx:
            return tx.snapshot(snapshot_id)

    def list_snapshots(
        self, after_seq: int, limit: int, source_volume_id: str | None = None
    ) -> list[Snapshot]:
        with self.store.read() as tx:
            return tx.snapshots(after_seq, limit, source_volume_id)
