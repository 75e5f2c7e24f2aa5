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

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from csi_driver.engine import backend_record
from csi_driver.engine.attachments import Attachments
from csi_driver.engine.base_layers import BaseLayers
from csi_driver.engine.block import BlockVolumes
from csi_driver.engine.builds import LayerBuilds
from csi_driver.engine.capacity import Capacity, VolumeSizes
from csi_driver.engine.capture import Capture
from csi_driver.engine.context import (
    SNAPSHOT_PREFIX,
    VOLUME_PREFIX,
    BadConfig,
    CrashHook,
    EngineConfig,
    GiB,
    MiB,
    Steps,
    VolumeSpec,
    VolumeStats,
    crash_hook_from_env,
)
from csi_driver.engine.ephemeral import Ephemeral
from csi_driver.engine.expand import Expander
from csi_driver.engine.modify import Modifier, validate_mutable
from csi_driver.engine.mounter import HostMounter, Mounter
from csi_driver.engine.node import NodePublisher
from csi_driver.engine.node_checks import NodeChecks
from csi_driver.engine.pending_deletes import PendingDeletes
from csi_driver.engine.records import Records
from csi_driver.engine.snapshots import Snapshots
from csi_driver.engine.transfers import Transfers, snapshot_reference
from csi_driver.engine.volumes import Volumes
from csi_driver.errors import Aborted
from csi_driver.layerstore.backend import Capabilities, LayerBackend
from csi_driver.layerstore.backends import open_backend
from csi_driver.registry.credentials import Credentials
from csi_driver.registry.reference import Reference, Repository, looks_like_reference
from csi_driver.statedir import StateDir
from csi_driver.store import Layer, PendingDelete, Snapshot, Store, Volume

__all__ = [
    "GiB",
    "MiB",
    "SNAPSHOT_PREFIX",
    "VOLUME_PREFIX",
    "BadConfig",
    "CrashHook",
    "Engine",
    "EngineConfig",
    "VolumeSpec",
    "VolumeStats",
    "crash_hook_from_env",
    "snapshot_reference",
]


def _with_fs_type(config: EngineConfig, backend: str, offered: Capabilities) -> EngineConfig:
    """``config`` with the backend's default fs type when it names none; one the backend
    does not offer is refused (BadConfig), before any volume is made with it."""
    if not config.fs_type:
        return dataclasses.replace(config, fs_type=offered.default_fs_type)
    if config.fs_type not in offered.fs_types:
        raise BadConfig(
            f"default fs type {config.fs_type!r}: the {backend} backend makes "
            f"{sorted(offered.fs_types)} volumes"
        )
    return config


class Engine:
    """The components wired together, and the one way in for the servicers and the CLI."""

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
        if backend is None:
            try:
                name = backend_record.choose(root, config.backend, store)
            except BadConfig:
                store.close()
                raise
            backend = open_backend(name, root, overprovisioned=config.capacity.ratio > 1)
        try:
            config = _with_fs_type(config, backend.name, backend.capabilities)
        except BadConfig:
            backend.close()
            store.close()
            raise
        self.config = config
        self.store = store
        self.backend = backend
        self.state = StateDir(root)
        self.state.ensure()
        self.steps = Steps(crash_hook)  # tests swap ``steps.hook`` of a running engine
        self.capacity = Capacity(store, backend, config.capacity, space=config.space)
        self.sizes = VolumeSizes(config.default_capacity, config.min_capacity, config.max_volume_size)
        self.records = records = Records(store)
        steps = self.steps
        self.builds = builds = LayerBuilds(store, backend, self.state.tmp, config.max_depth, steps)
        checks = NodeChecks(store, config.node_id, config.max_volumes)
        self.modifier = Modifier(store, backend, records)
        mounter = mounter or HostMounter()  # the one that performs the backend's Mount data
        self.block = BlockVolumes(store, backend, records, checks, self.modifier, mounter, steps)
        self.node = NodePublisher(
            store,
            backend,
            records,
            checks,
            self.capacity,
            mounter,
            self.block,
            self.modifier,
            steps,
        )
        self.capture = Capture(
            store,
            backend,
            records,
            builds,
            self.capacity,
            steps,
            max_live_copy=config.max_live_copy,
            max_depth=config.max_depth,
        )
        self.volumes = Volumes(
            store,
            backend,
            records,
            builds,
            self.capacity,
            self.sizes,
            self.capture,
            self.node,
            steps,
            node_id=config.node_id,
            fs_type=config.fs_type,
        )
        self.snapshots = Snapshots(
            store,
            builds,
            self.capacity,
            self.capture,
            steps,
            node_id=config.node_id,
            max_per_volume=config.max_snapshots_per_volume,
        )
        self.expander = Expander(store, backend, records, self.capacity, self.sizes, self.block, steps)
        self.ephemeral = Ephemeral(
            store,
            self.sizes,
            self.volumes,
            self.node,
            staging_root=self.state.ephemeral,
            max_size=config.max_ephemeral_size,
        )
        self.base_layers = BaseLayers(store, backend, builds)
        self.transfers = Transfers(store, backend, records, builds, self.capacity, config.insecure_registries)
        self.pending_deletes = PendingDeletes(store, self.transfers)
        self.attachments = Attachments(store)

    # ---- volumes ------------------------------------------------------------
    def get_volume(self, volume_id: str) -> Volume:
        """The volume; NotFound when it does not exist."""
        return self.records.volume(volume_id)

    def delete_volume(self, volume_id: str) -> None:
        self.volumes.delete_volume(volume_id)

    def resolve_capacity(self, required: int, limit: int, default: int | None = None) -> int:
        """The capacity a CSI capacity range gives on this node."""
        return self.sizes.resolve(required, limit, default)

    def expand(self, volume_id: str, required: int, limit: int = 0) -> tuple[int, bool]:
        return self.expander.expand(volume_id, required, limit)

    def expand_node(self, volume_id: str, required: int, limit: int = 0) -> int:
        return self.expander.expand_node(volume_id, required, limit)

    def modify_volume(self, volume_id: str, params: dict[str, str]) -> Volume:
        return self.modifier.modify_volume(volume_id, params)

    # ---- controller attachments ---------------------------------------------
    def attach(self, volume_id: str, node_id: str, readonly: bool, limit: int) -> None:
        self.attachments.attach(volume_id, node_id, readonly, limit)

    def detach(self, volume_id: str, node_id: str = "") -> None:
        self.attachments.detach(volume_id, node_id)

    def attached(self, volume_id: str) -> bool:
        return self.attachments.attached(volume_id)

    def attached_volumes(self) -> set[str]:
        return self.attachments.attached_volumes()

    # ---- what the backend offers ----------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What the node's layer backend offers: fs types, block, artifacts, parameters."""
        return self.backend.capabilities

    @property
    def modifiable(self) -> frozenset[str]:
        """The mutable parameters the backend takes (none: ModifyVolume is not offered)."""
        return self.backend.capabilities.modifiable

    def validate_mutable(self, params: Mapping[str, str], fs_type: str) -> dict[str, str]:
        """``params`` checked as mutable parameters of a volume of ``fs_type`` ('' when
        the volume is not known here): InvalidArgument naming the first bad one."""
        return validate_mutable(params, self.backend, fs_type)

    # ---- capacity -----------------------------------------------------------
    @property
    def default_fs_type(self) -> str:
        """The fs type of a volume whose request names none."""
        return self.config.fs_type

    @property
    def min_volume_size(self) -> int:
        return self.sizes.minimum

    @property
    def max_volume_size(self) -> int:
        """--max-volume-size; 0: no limit."""
        return self.sizes.maximum

    def largest_volume(self, fs_type: str) -> int:
        """The capacity of the largest volume of ``fs_type`` the node can still promise."""
        return self.capacity.largest_volume(fs_type)

    def free_bytes(self) -> int:
        return self.capacity.space.free_bytes()

    # ---- the node side ------------------------------------------------------
    @property
    def state_root(self) -> Path:
        """The state dir: no node path may lie in it."""
        return self.state.root

    def stage(self, volume_id: str, staging_path: str, mount_flags: list[str] | None = None) -> None:
        self.node.stage(volume_id, staging_path, mount_flags)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        self.node.unstage(volume_id, staging_path)

    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        readonly: bool,
        mount_flags: list[str] | None = None,
        single_writer: bool = False,
    ) -> None:
        self.node.publish(volume_id, staging_path, target_path, readonly, mount_flags, single_writer)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        self.node.unpublish(volume_id, target_path)

    def set_mount_group(self, volume_id: str, group: str, readonly: bool = False) -> None:
        self.node.set_mount_group(volume_id, group, readonly)

    def release_orphan_target(self, target_path: str, remove: str = "") -> bool:
        return self.node.release_orphan_target(target_path, remove)

    def release_orphan_staging(self, staging_path: str) -> bool:
        return self.node.release_orphan_staging(staging_path)

    def volume_paths(self, v: Volume) -> set[str]:
        return self.node.volume_paths(v)

    def block_expand_path_ok(self, v: Volume, volume_path: str, staging_path: str) -> bool:
        return self.node.block_expand_path_ok(v, volume_path, staging_path)

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        return self.node.stats(volume_id, path)

    def condition(self, v: Volume, path: str | None = None) -> str:
        """An empty string when the volume is healthy, else what is wrong."""
        return self.node.condition(v, path)

    def conditions(self, vols: list[Volume]) -> dict[str, str]:
        return self.node.conditions(vols)

    # ---- inline ephemeral volumes -------------------------------------------
    def ephemeral_volume(self, handle: str) -> Volume | None:
        return self.ephemeral.ephemeral_volume(handle)

    def publish_ephemeral(
        self,
        handle: str,
        target_path: str,
        readonly: bool,
        spec: VolumeSpec,
        mount_flags: list[str],
        group: str = "",
    ) -> Volume:
        return self.ephemeral.publish_ephemeral(handle, target_path, readonly, spec, mount_flags, group)

    def unpublish_ephemeral(self, v: Volume, target_path: str) -> None:
        self.ephemeral.unpublish_ephemeral(v, target_path)

    # ---- base layers --------------------------------------------------------
    def import_layer(self, name: str, source: Path) -> Layer:
        return self.base_layers.import_layer(name, source)

    def delete_named_layer(self, name: str, collect: bool = True) -> None:
        self.base_layers.delete_named_layer(name, collect)

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

    # ---- snapshots ----------------------------------------------------------
    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.snapshots.get_snapshot(snapshot_id)

    def list_snapshots(
        self, after_seq: int, limit: int, source_volume_id: str | None = None
    ) -> list[Snapshot]:
        return self.snapshots.list_snapshots(after_seq, limit, source_volume_id)

    def take_snapshot(
        self,
        name: str,
        source_volume_id: str,
        repository: Repository | None = None,
        copy_limit: int | None = None,
    ) -> Snapshot:
        """A snapshot, not pushed yet when it is for export (``export_snapshot`` pushes it).
        ``copy_limit``: the most a capture of the volume in use may copy."""
        return self.snapshots.create_snapshot(
            name, source_volume_id, repository=repository, copy_limit=copy_limit
        )

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
        snap = self.take_snapshot(name, source_volume_id, repository)
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

    def create_group_snapshot(
        self, name: str, volume_ids: list[str], repository: Repository | None = None
    ) -> tuple[dict, list[Snapshot]]:
        return self.snapshots.create_group_snapshot(name, volume_ids, repository)

    def get_group_snapshot(self, group_id: str) -> tuple[dict, list[Snapshot]] | None:
        return self.snapshots.get_group_snapshot(group_id)

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

    # ---- exported snapshots' deletions that wait for their registry ----------
    def pending_delete(self, snapshot_id: str) -> PendingDelete | None:
        """The deletion of an exported snapshot's manifest that waits for its registry."""
        return self.pending_deletes.get(snapshot_id)

    def deletions_due(self) -> list[str]:
        return self.pending_deletes.due()

    def retry_deletion(self, snapshot_id: str) -> bool:
        """Retry one waiting deletion; True when done (``PendingDeletes.retry``)."""
        return self.pending_deletes.retry(snapshot_id)

    def describe_exported(self, snapshot_id: str, credentials: Credentials | None) -> Snapshot:
        """What an exported snapshot's manifest says of it (no layer is pulled)."""
        return self.transfers.describe_exported(snapshot_id, credentials)

    # ---- listings -----------------------------------------------------------
    def list_volumes(self, after_seq: int, limit: int) -> list[Volume]:
        with self.store.read() as tx:
            return tx.volumes(after_seq, limit)

    def layers(self) -> list[Layer]:
        with self.store.read() as tx:
            return tx.layers()

    def chain(self, layer_id: str) -> list[Layer]:
        return self.records.chain(layer_id)

    def disk_usage(self) -> int:
        """Bytes the host really spends on all layers."""
        return sum(self.backend.usage(x) for x in self.layers())

    def healthy(self) -> bool:
        return self.store.healthy()

    def close(self) -> None:
        self.capacity.close()
        self.backend.close()
        self.store.close()
