"""Creating and deleting volumes: empty, from a snapshot, a volume or a base layer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csi_driver.engine.block import block_aligned
from csi_driver.engine.builds import LayerBuilds
from csi_driver.engine.capacity import Capacity, VolumeSizes
from csi_driver.engine.capture import Capture
from csi_driver.engine.context import BLOCK, VOLUME_PREFIX, CrashHook, VolumeSpec
from csi_driver.engine.node import NodePublisher
from csi_driver.engine.records import Records
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_driver.ids import issued_id
from csi_driver.layerstore.backend import Built, LayerBackend
from csi_driver.store import Layer, ReadTx, Store, Tx, Volume

log = logging.getLogger(__name__)


class Volumes:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        builds: LayerBuilds,
        capacity: Capacity,
        sizes: VolumeSizes,
        capture: Capture,
        node: NodePublisher,
        step: CrashHook,
        *,
        node_id: str,
        fs_type: str,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.builds = builds
        self.capacity = capacity
        self.sizes = sizes
        self.capture = capture
        self.node = node
        self.step = step
        self.node_id = node_id
        self.fs_type = fs_type  # when a request names none

    def _compatible(self, v: Volume, spec: VolumeSpec) -> bool:
        if spec.required_bytes and v.capacity_bytes < spec.required_bytes:
            return False
        if spec.limit_bytes and v.capacity_bytes > spec.limit_bytes:
            return False
        return (
            v.access_type == spec.access_type
            and v.source_kind == spec.source_kind
            and v.source_id == spec.source_id
            and v.parameters == spec.parameters
            and v.ephemeral == spec.ephemeral
            and v.fs_type == (BLOCK if spec.access_type == BLOCK else spec.fs_type or self.fs_type)
            and (not spec.mutable or v.mutable == spec.mutable)
        )

    def create_volume(self, spec: VolumeSpec) -> Volume:
        block = spec.access_type == BLOCK
        fs_type = BLOCK if block else (spec.fs_type or self.fs_type)
        offered = self.backend.capabilities
        if block and not offered.block:
            raise InvalidArgument(
                f"this node keeps layers with the {self.backend.name} backend, "
                "which keeps no raw block volumes"
            )
        if not block and fs_type not in offered.fs_types:
            raise InvalidArgument(
                f"this node keeps layers with the {self.backend.name} backend, which holds "
                f"{sorted(offered.fs_types)} volumes, not {fs_type}"
            )
        with self.store.tx() as tx:
            existing = tx.volume_by_name(spec.name)
            if existing is not None:
                if self._compatible(existing, spec):
                    return existing
                raise AlreadyExists(f"volume {spec.name!r} exists with different arguments")
            parent, default_cap, min_cap = self._source_parent(tx, spec)
            if parent is not None:
                self.store.pin(parent.id)  # no concurrent delete may collect what we build on
        try:
            return self._create_on(spec, parent, default_cap, min_cap, fs_type)
        finally:
            if parent is not None:
                self.store.unpin(parent.id)
                self.builds.collect_if_orphan(parent.id)

    def _create_on(
        self, spec: VolumeSpec, parent: Layer | None, default_cap: int, min_cap: int, fs_type: str
    ) -> Volume:
        block = spec.access_type == BLOCK
        capacity = self.sizes.resolve(spec.required_bytes, spec.limit_bytes, default_cap)
        if block:
            capacity = block_aligned(capacity, spec.limit_bytes)
        if capacity < min_cap:
            raise OutOfRange(f"{capacity} bytes is smaller than the source's {min_cap} bytes")
        need = capacity if block else self.capacity.upper_size(capacity, fs_type)
        if spec.source_kind == "volume" and not block:  # a block clone copies into its own image
            need += self.capacity.allocation(self.records.volume(spec.source_id))
        admitted = self.capacity.admit(need, f"volume {spec.name!r} of {capacity} bytes")
        with admitted, self.builds.scratch() as scratch:
            upper_dir = scratch / "upper"
            upper_dir.mkdir()
            flat = None
            if block:
                built = self._block_build(upper_dir, capacity, parent, spec)
                parent = None
            else:
                if spec.source_kind == "volume":
                    parent = self.capture.volume(spec.source_id, scratch)
                # the view the new upper starts from (a flat layer shows the same, but is
                # not installed yet)
                view = self.records.chain(parent.id) if parent is not None else []
                parent, flat = self.builds.bounded_parent(view, scratch)
                self.step("create.flattened")
                size = self.capacity.upper_size(capacity, fs_type)
                built = self.backend.prepare(upper_dir, view, size, fs_type)
            self.step("create.built")
            upper = self.builds.new_layer(parent, built, active=True, fs_type=fs_type)
            source = parent

            def source_kept(tx: ReadTx) -> None:
                if source is not None and flat is None and tx.layer(source.id) is None:
                    raise NotFound(f"source {spec.source_id} was deleted while restoring")

            layers = ([(scratch / "flat", flat)] if flat is not None else []) + [(upper_dir, upper)]
            with self.builds.adding(layers, check=source_kept, step="create.renamed") as tx:
                if flat is not None:
                    self._repoint(tx, spec, flat)
                vol = tx.add_volume(
                    Volume(
                        seq=0,
                        id=issued_id(VOLUME_PREFIX, self.node_id),
                        name=spec.name,
                        capacity_bytes=capacity,
                        upper=upper.id,
                        access_type=spec.access_type,
                        fs_type=fs_type,
                        source_kind=spec.source_kind,
                        source_id=spec.source_id,
                        parameters=dict(spec.parameters),
                        mutable=dict(spec.mutable),
                        ephemeral=spec.ephemeral,
                        staging_path=None,
                        stage_options={},
                        created_at=time.time(),
                    )
                )
            if flat is not None:  # the snapshot moved onto the flat layer: its old chain may be unused
                with self.store.tx() as tx:
                    gone = tx.collect_garbage()
                self.builds.discard(gone)
        self.step("create.done")
        return vol

    def _block_build(self, build: Path, capacity: int, parent: Layer | None, spec: VolumeSpec) -> Built:
        """A new block layer: empty, a copy of a snapshot's layer, or of a volume's data now."""
        if spec.source_kind == "volume":  # captured straight into the build, then sized
            src = self.records.volume(spec.source_id)
            self.backend.capture({src.upper: build}, [self.records.upper_of(src)])
            return self.backend.prepare_block(build, capacity, None)
        source = self.backend.block_file(parent) if parent is not None else None
        return self.backend.prepare_block(build, capacity, source)

    def _source_parent(self, tx: ReadTx, spec: VolumeSpec) -> tuple[Layer | None, int, int]:
        """The layer a new volume starts from, its default and minimum capacity."""
        default = self.sizes.default
        if spec.source_kind == "snapshot":
            snap = tx.snapshot(spec.source_id)
            if snap is None:
                raise NotFound(f"snapshot {spec.source_id} does not exist")
            if snap.access_type != spec.access_type:
                raise InvalidArgument(
                    f"snapshot {snap.id} is a {snap.access_type} volume's; "
                    f"cannot restore it as {spec.access_type}"
                )
            return tx.layer(snap.layer), snap.source_capacity, snap.size_bytes
        if spec.source_kind == "volume":
            src = tx.volume(spec.source_id)
            if src is None:
                raise NotFound(f"volume {spec.source_id} does not exist")
            if src.access_type != spec.access_type:
                raise InvalidArgument(
                    f"volume {src.id} is a {src.access_type} volume; cannot clone it as {spec.access_type}"
                )
            return None, src.capacity_bytes, src.capacity_bytes
        if spec.base_layer:
            if spec.access_type == BLOCK:
                raise InvalidArgument("a block volume cannot start from a base layer")
            base = tx.layer_by_name(spec.base_layer)
            if base is None:
                raise InvalidArgument(
                    f"base layer {spec.base_layer!r} does not exist on node {self.node_id}; "
                    f"import it with 'overlay-csi layer import {spec.base_layer} PATH'"
                )
            return base, default, 0
        return None, default, 0

    def _repoint(self, tx: Tx, spec: VolumeSpec, flat: Layer) -> None:
        """After flattening a snapshot's deep chain, let the snapshot use the flat layer
        so later restores reuse it."""
        if spec.source_kind == "snapshot":
            tx.repoint_snapshot(spec.source_id, flat.id)

    def delete_volume(self, volume_id: str) -> None:
        with self.store.read() as tx:
            v = tx.volume(volume_id)
        if v is None:
            return
        with self.store.read() as tx:
            published = bool(tx.publications(volume_id))
        if v.staging_path or published:  # the kernel, not the record, says what is mounted
            table = self.node.mounter.table()
            if v.staging_path and self.node.is_staged(v, table):
                raise FailedPrecondition(f"volume {volume_id} is still staged at {v.staging_path}")
            live = self.node.live_publications(volume_id, table)
            if live:
                raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
        with self.store.tx() as tx:
            if tx.volume(volume_id) is None:  # a concurrent delete won
                return
            tx.delete_volume(volume_id)
            gone = tx.collect_garbage()
            self.step("delete.uncommitted")
        self.step("delete.committed")
        self.node.forget(volume_id)
        self.builds.discard(gone)
