"""The layer engine: volumes as stacks of immutable layers plus one writable upper.

Model (after containerd's snapshotter): a volume owns one *active* layer (its
upper); its parent chain is committed, read-only layers. A snapshot of a
detached volume commits the upper in place (metadata only) and gives the
volume a fresh upper on top; restores and clones are fresh uppers over the
same layers. Nothing is copied except when a volume in use must be captured,
or a chain deeper than ``max_depth`` is flattened.

``Engine`` is a thin front: each component owns one concern and gets what it
needs passed in; how layers are kept is the ``LayerBackend``'s business. The
engine knows nothing of gRPC. Callers serialise operations per volume.
"""

from __future__ import annotations

from pathlib import Path

from csi_driver.engine.attachments import Attachments
from csi_driver.engine.base_layers import BaseLayers
from csi_driver.engine.block import BlockVolumes
from csi_driver.engine.capture import Capture
from csi_driver.engine.context import (
    SNAPSHOT_PREFIX,
    VOLUME_PREFIX,
    CrashHook,
    EngineConfig,
    EngineContext,
    GiB,
    MiB,
    VolumeSpec,
    VolumeStats,
    crash_hook_from_env,
)
from csi_driver.engine.ephemeral import Ephemeral
from csi_driver.engine.expand import Expander
from csi_driver.engine.modify import Modifier
from csi_driver.engine.mounter import HostMounter, Mounter
from csi_driver.engine.node import NodePublisher
from csi_driver.engine.pending_deletes import PendingDeletes
from csi_driver.engine.snapshots import Snapshots
from csi_driver.engine.transfers import Transfers, snapshot_reference
from csi_driver.engine.volumes import Volumes
from csi_driver.errors import Aborted
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.layerstore.overlay.backend import OverlayLoopBackend
from csi_driver.registry.credentials import Credentials
from csi_driver.registry.reference import Reference, Repository, looks_like_reference
from csi_driver.store import Layer, PendingDelete, Snapshot, Store, Volume

__all__ = [
    "GiB",
    "MiB",
    "SNAPSHOT_PREFIX",
    "VOLUME_PREFIX",
    "CrashHook",
    "Engine",
    "EngineConfig",
    "VolumeSpec",
    "VolumeStats",
    "crash_hook_from_env",
]


class Engine:
    """The components wired together, and the calls the servicers and the CLI make."""

    def __init__(
        self,
        config: EngineConfig,
        crash_hook: CrashHook | None = None,
        *,
        backend: LayerBackend | None = None,
        mounter: Mounter | None = None,
    ) -> None:
        root = Path(config.state_dir)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = Store(root / "state.db")
        # an overprovisioned node's disk may fill: each volume then holds its fixed metadata
        backend = backend or OverlayLoopBackend(root, hold_metadata=config.capacity.ratio > 1)
        self.ctx = EngineContext(config, store, backend, crash_hook)
        self.ctx.state.ensure()
        self.config = config
        self.store = store
        self.backend = self.ctx.backend
        self.state = self.ctx.state
        self.capacity = self.ctx.capacity
        modifier = Modifier(self.ctx)
        mounter = mounter or HostMounter()  # the one that performs the backend's Mount data
        self.block = BlockVolumes(self.ctx, modifier, mounter)
        self.node = NodePublisher(self.ctx, mounter, self.block, modifier)
        capture = Capture(self.ctx)
        self.volumes = Volumes(self.ctx, capture, self.node)
        self.snapshots = Snapshots(self.ctx, capture)
        self.expander = Expander(self.ctx, self.block)
        self.ephemeral = Ephemeral(self.ctx, self.volumes, self.node)
        self.base_layers = BaseLayers(self.ctx)
        self.transfers = Transfers(self.ctx, config.insecure_registries)
        self.pending_deletes = PendingDeletes(self.ctx, self.transfers)
        self.attachments = Attachments(self.ctx)
        self.modifier = modifier

        # the calls, by concern
        self.delete_volume = self.volumes.delete_volume
        self.get_snapshot = self.snapshots.get_snapshot
        self.list_snapshots = self.snapshots.list_snapshots
        self.create_group_snapshot = self.snapshots.create_group_snapshot
        self.get_group_snapshot = self.snapshots.get_group_snapshot
        self.stage = self.node.stage
        self.unstage = self.node.unstage
        self.publish = self.node.publish
        self.unpublish = self.node.unpublish
        self.set_mount_group = self.node.set_mount_group
        self.release_orphan_target = self.node.release_orphan_target
        self.release_orphan_staging = self.node.release_orphan_staging
        self.volume_paths = self.node.volume_paths
        self.block_expand_path_ok = self.node.block_expand_path_ok
        self.stats = self.node.stats
        self.condition = self.node.condition
        self.conditions = self.node.conditions
        self.expand = self.expander.expand
        self.expand_node = self.expander.expand_node
        self.modify_volume = modifier.modify_volume
        self.ephemeral_volume = self.ephemeral.ephemeral_volume
        self.publish_ephemeral = self.ephemeral.publish_ephemeral
        self.unpublish_ephemeral = self.ephemeral.unpublish_ephemeral
        self.import_layer = self.base_layers.import_layer
        self.delete_named_layer = self.base_layers.delete_named_layer
        self.get_volume = self.ctx.get_volume
        self.resolve_capacity = self.ctx.resolve_capacity
        self.free_bytes = self.capacity.space.free_bytes

    def create_volume(self, spec: VolumeSpec, credentials: Credentials | None = None) -> Volume:
        """A volume; an exported snapshot or an image it starts from is pulled first
        when this node does not hold it (``credentials`` for its registry)."""
        exported = spec.source_kind == "snapshot" and snapshot_reference(spec.source_id) is not None
        if exported and self.get_snapshot(spec.source_id) is None and not self._exists(spec.name):
            with self.transfers.restoring(spec.source_id, credentials):
                return self.volumes.create_volume(spec)
        if spec.base_layer and looks_like_reference(spec.base_layer) and not self._exists(spec.name):
            self.transfers.pull_image(Reference.parse(spec.base_layer), credentials)
        return self.volumes.create_volume(spec)

    def needs_registry(self, spec: VolumeSpec) -> bool:
        """Whether ``create_volume(spec)`` would reach a registry: an exported snapshot or
        an image this node does not hold, for a volume it has not made yet."""
        exported = spec.source_kind == "snapshot" and snapshot_reference(spec.source_id) is not None
        image = bool(spec.base_layer) and looks_like_reference(spec.base_layer)
        if not exported and not image or self._exists(spec.name):
            return False
        if exported:
            return self.get_snapshot(spec.source_id) is None
        with self.store.read() as tx:
            return tx.layer_by_name(str(Reference.parse(spec.base_layer))) is None

    def _exists(self, volume_name: str) -> bool:
        with self.store.read() as tx:
            return tx.volume_by_name(volume_name) is not None

    def create_snapshot(
        self,
        name: str,
        source_volume_id: str,
        repository: Repository | None = None,
        credentials: Credentials | None = None,
        compression: str = "none",
    ) -> Snapshot:
        """A snapshot; with ``repository``, pushed there (its layers compressed with
        ``compression``) before it is reported ready."""
        snap = self.snapshots.create_snapshot(name, source_volume_id, repository=repository)
        return self.export_snapshot(snap, credentials, compression)

    def export_snapshot(
        self, snap: Snapshot, credentials: Credentials | None, compression: str = "none"
    ) -> Snapshot:
        """Push a snapshot taken for export, unless it is pushed already (as the store says
        now: a push that ended in the background is not repeated). A push that fails takes
        the snapshot back (nobody was given its id), so nothing is left that only a
        DeleteSnapshot could reclaim; the caller's retry takes it anew."""
        if snapshot_reference(snap.id) is None or snap.exported:
            return snap
        now = self.get_snapshot(snap.id)
        if now is None:
            raise Aborted(f"snapshot {snap.name!r} was taken back: its push failed meanwhile; retry")
        if now.exported:
            return now
        try:
            self.transfers.push_snapshot(snap, credentials, compression=compression)
        except BaseException:
            self.snapshots.delete_snapshot(snap.id)
            raise
        return self.get_snapshot(snap.id) or snap

    def delete_snapshot(self, snapshot_id: str, credentials: Credentials | None = None) -> None:
        """Delete a snapshot; an exported one's artifact goes from its registry first
        (so a retry after a refusal still finds what to delete), whether this node holds
        the snapshot or not (the central instance holds none). While its registry cannot
        be reached, the artifact's deletion is recorded in the transaction that deletes
        the snapshot, and retried in the background (``PendingDeletes``)."""
        pending = self._delete_exported(snapshot_id, credentials)
        self.snapshots.delete_snapshot(snapshot_id, pending)
        if pending is not None:
            self.pending_deletes.recorded(pending, credentials)

    def _delete_exported(self, snapshot_id: str, credentials: Credentials | None) -> PendingDelete | None:
        """The deletion to record, if the registry could not be reached; None when done
        (or when one is pending already: its retry will do it)."""
        if snapshot_reference(snapshot_id) is None:
            return None
        if self.pending_deletes.get(snapshot_id) is not None:
            self.pending_deletes.asked_again(snapshot_id, credentials)
            return None
        return self.transfers.delete_exported(snapshot_id, credentials)

    def export_group(self, group_id: str, credentials: Credentials | None) -> tuple[dict, list[Snapshot]]:
        """Push a group snapshot's members taken for export, those not pushed yet. A push
        that fails takes the whole group back (its manifests pushed so far too): nobody
        was given its id, and the caller's retry takes it anew."""
        found = self.get_group_snapshot(group_id)
        if found is None:
            raise Aborted(f"group snapshot {group_id} was taken back: its push failed meanwhile; retry")
        try:
            for snap in found[1]:
                if snapshot_reference(snap.id) is not None and not snap.exported:
                    self.transfers.push_snapshot(snap, credentials)
        except BaseException:
            self.delete_group_snapshot(group_id, credentials)
            raise
        return self.get_group_snapshot(group_id) or found

    def delete_group_snapshot(self, group_id: str, credentials: Credentials | None = None) -> None:
        """Delete a group snapshot and its members; exported members' artifacts go from
        their registry first, or their deletion is recorded while it cannot be reached
        (as ``delete_snapshot`` does for one)."""
        found = self.get_group_snapshot(group_id)
        if found is None:
            return
        pending = [p for s in found[1] if (p := self._delete_exported(s.id, credentials)) is not None]
        self.snapshots.delete_group_snapshot(group_id, pending)
        for p in pending:
            self.pending_deletes.recorded(p, credentials)

    def list_volumes(self, after_seq: int, limit: int) -> list[Volume]:
        with self.store.read() as tx:
            return tx.volumes(after_seq, limit)

    def layers(self) -> list[Layer]:
        with self.store.read() as tx:
            return tx.layers()

    def chain(self, layer_id: str) -> list[Layer]:
        return self.ctx.chain(layer_id)

    def disk_usage(self) -> int:
        """Bytes the host really spends on all layers."""
        return sum(self.backend.usage(x) for x in self.layers())

    def healthy(self) -> bool:
        return self.store.healthy()

    def close(self) -> None:
        self.capacity.close()
        self.backend.close()
        self.store.close()
