"""Creating and deleting volumes: empty, from a snapshot, a volume or a base layer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csi_driver.engine.block import block_aligned
from csi_driver.engine.capture import Capture
from csi_driver.engine.context import BLOCK, VOLUME_PREFIX, EngineContext, VolumeSpec
from csi_driver.engine.node import NodePublisher
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_driver.ids import issued_id
from csi_driver.layerstore.backend import Built
from csi_driver.store import Layer, ReadTx, Tx, Volume

log = logging.getLogger(__name__)


class Volumes:
    def __init__(self, ctx: EngineContext, capture: Capture, node: NodePublisher) -> None:
        self.ctx = ctx
        self.capture = capture
        self.node = node

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
            and v.fs_type == (BLOCK if spec.access_type == BLOCK else spec.fs_type or self.ctx.config.fs_type)
            and (not spec.mutable or v.mutable == spec.mutable)
        )

    def create_volume(self, spec: VolumeSpec) -> Volume:
        block = spec.access_type == BLOCK
        fs_type = BLOCK if block else (spec.fs_type or self.ctx.config.fs_type)
        ctx = self.ctx
        offered = ctx.backend.capabilities
        if block and not offered.block:
            raise InvalidArgument(
                f"this node keeps layers with the {ctx.backend.name} backend, "
                "which keeps no raw block volumes"
            )
        if not block and fs_type not in offered.fs_types:
            raise InvalidArgument(
                f"this node keeps layers with the {ctx.backend.name} backend, which holds "
                f"{sorted(offered.fs_types)} volumes, not {fs_type}"
            )
        with ctx.store.tx() as tx:
            existing = tx.volume_by_name(spec.name)
            if existing is not None:
                if self._compatible(existing, spec):
                    return existing
                raise AlreadyExists(f"volume {spec.name!r} exists with different arguments")
            parent, default_cap, min_cap = self._source_parent(tx, spec)
            if parent is not None:
                ctx.store.pin(parent.id)  # no concurrent delete may collect what we build on
        try:
            return self._create_on(spec, parent, default_cap, min_cap, fs_type)
        finally:
            if parent is not None:
                ctx.store.unpin(parent.id)
                ctx.collect_if_orphan(parent.id)

    def _create_on(
        self, spec: VolumeSpec, parent: Layer | None, default_cap: int, min_cap: int, fs_type: str
    ) -> Volume:
        ctx = self.ctx
        block = spec.access_type == BLOCK
        capacity = ctx.resolve_capacity(spec.required_bytes, spec.limit_bytes, default_cap)
        if block:
            capacity = block_aligned(capacity, spec.limit_bytes)
        if capacity < min_cap:
            raise OutOfRange(f"{capacity} bytes is smaller than the source's {min_cap} bytes")
        need = capacity if block else ctx.upper_size(capacity, fs_type)
        if spec.source_kind == "volume" and not block:  # a block clone copies into its own image
            need += ctx.allocation(ctx.get_volume(spec.source_id))
        with ctx.capacity.admit(need, f"volume {spec.name!r} of {capacity} bytes"), ctx.scratch() as scratch:
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
                view = ctx.chain(parent.id) if parent is not None else []
                parent, flat = ctx.bounded_parent(view, scratch)
                ctx.step("create.flattened")
                size = ctx.upper_size(capacity, fs_type)
                built = ctx.backend.prepare(upper_dir, view, size, fs_type)
            ctx.step("create.built")
            upper = ctx.new_layer(parent, built, active=True, fs_type=fs_type)
            with ctx.store.tx() as tx:
                if parent is not None and tx.layer(parent.id) is None and flat is None:
                    raise NotFound(f"source {spec.source_id} was deleted while restoring")
                if flat is not None:
                    tx.add_layer(flat)
                    self._repoint(tx, spec, flat)
                tx.add_layer(upper)
                vol = tx.add_volume(
                    Volume(
                        seq=0,
                        id=issued_id(VOLUME_PREFIX, ctx.config.node_id),
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
                if flat is not None:
                    ctx.install(scratch / "flat", flat)
                ctx.install(upper_dir, upper)
                ctx.step("create.renamed")
            if flat is not None:  # the snapshot moved onto the flat layer: its old chain may be unused
                with ctx.store.tx() as tx:
                    gone = tx.collect_garbage()
                ctx.discard(gone)
            for layer in (flat, upper):
                if layer is not None:
                    ctx.backend.expose(layer)
        ctx.step("create.done")
        return vol

    def _block_build(self, build: Path, capacity: int, parent: Layer | None, spec: VolumeSpec) -> Built:
        """A new block layer: empty, a copy of a snapshot's layer, or of a volume's data now."""
        ctx = self.ctx
        if spec.source_kind == "volume":  # captured straight into the build, then sized
            src = ctx.get_volume(spec.source_id)
            ctx.backend.capture({src.upper: build}, [ctx.upper_of(src)])
            return ctx.backend.prepare_block(build, capacity, None)
        source = ctx.backend.block_file(parent) if parent is not None else None
        return ctx.backend.prepare_block(build, capacity, source)

    def _source_parent(self, tx: ReadTx, spec: VolumeSpec) -> tuple[Layer | None, int, int]:
        """The layer a new volume starts from, its default and minimum capacity."""
        default = self.ctx.config.default_capacity
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
                    f"base layer {spec.base_layer!r} does not exist on node {self.ctx.config.node_id}; "
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
        ctx = self.ctx
        with ctx.store.read() as tx:
            v = tx.volume(volume_id)
        if v is None:
            return
        with ctx.store.read() as tx:
            published = bool(tx.publications(volume_id))
        if v.staging_path or published:  # the kernel, not the record, says what is mounted
            table = self.node.mounter.table()
            if v.staging_path and self.node.is_staged(v, table):
                raise FailedPrecondition(f"volume {volume_id} is still staged at {v.staging_path}")
            live = self.node.live_publications(volume_id, table)
            if live:
                raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
        with ctx.store.tx() as tx:
            if tx.volume(volume_id) is None:  # a concurrent delete won
                return
            tx.delete_volume(volume_id)
            gone = tx.collect_garbage()
            ctx.step("delete.uncommitted")
        ctx.step("delete.committed")
        ctx.staged.discard(volume_id)
        ctx.discard(gone)
