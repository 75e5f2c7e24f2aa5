"""Creating and deleting volumes: empty, from a snapshot, a volume or a base layer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.block import BLOCK, BlockOps
from csi_driver.engine.core import VOLUME_PREFIX, VolumeSpec
from csi_driver.engine.layers import (
    build_image,
)
from csi_driver.engine.layout import new_id
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from csi_driver.store import Layer, Tx, Volume

log = logging.getLogger(__name__)


class VolumeOps(BlockOps):
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
            and v.fs_type == (BLOCK if spec.access_type == BLOCK else spec.fs_type or self.config.fs_type)
            and (not spec.mutable or v.mutable == spec.mutable)
        )

    def create_volume(self, spec: VolumeSpec) -> Volume:
        block = spec.access_type == BLOCK
        fs_type = BLOCK if block else (spec.fs_type or self.config.fs_type)
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
                self._collect_if_orphan(parent.id)

    def _create_on(
        self, spec: VolumeSpec, parent: Layer | None, default_cap: int, min_cap: int, fs_type: str
    ) -> Volume:
        block = spec.access_type == BLOCK
        capacity = self.resolve_capacity(spec.required_bytes, spec.limit_bytes, default_cap)
        if block:
            capacity = self._block_aligned(capacity, spec.limit_bytes)
        if capacity < min_cap:
            raise OutOfRange(f"{capacity} bytes is smaller than the source's {min_cap} bytes")
        if capacity > self.free_bytes():
            raise ResourceExhausted(
                f"{capacity} bytes do not fit in the {self.free_bytes()} free bytes of the node's storage"
            )
        with self._scratch() as scratch:
            upper_dir = scratch / "upper"
            upper_dir.mkdir()
            flat, empty = None, 0
            if block:
                size = capacity
                self._block_build(upper_dir / "image", capacity, self._block_source(parent, spec))
                parent = None
            else:
                if spec.source_kind == "volume":
                    parent = self._share_volume(spec.source_id, scratch)
                parent, flat = self._bounded_parent(parent, scratch)
                self._step("create.flattened")
                size = self._upper_size(capacity, fs_type)
                empty = build_image(upper_dir / "image", size, fs_type)
            self._step("create.built")
            upper = self._new_layer(parent, active=True, fs_type=fs_type, image_bytes=size, base_bytes=empty)
            with self.store.tx() as tx:
                if parent is not None and tx.layer(parent.id) is None and flat is None:
                    raise NotFound(f"source {spec.source_id} was deleted while restoring")
                if flat is not None:
                    tx.add_layer(flat)
                    self._repoint(tx, spec, flat)
                tx.add_layer(upper)
                vol = tx.add_volume(
                    Volume(
                        seq=0,
                        id=VOLUME_PREFIX + new_id(),
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
                    self._install(scratch / "flat", flat.id)
                self._install(upper_dir, upper.id)
                self._step("create.renamed")
            if flat is not None:  # the snapshot moved onto the flat layer: its old chain may be unused
                with self.store.tx() as tx:
                    gone = tx.collect_garbage()
                self._discard_layers(gone)
            for layer in (flat, upper):
                if layer is not None:
                    self._link(layer)
        self._step("create.done")
        return vol

    def _block_source(self, parent: Layer | None, spec: VolumeSpec) -> Volume | Path | None:
        """What a new block volume copies: a snapshot layer's image or a volume."""
        if spec.source_kind == "volume":
            return self.get_volume(spec.source_id)
        return self.layout.image(parent.id) if parent is not None else None

    def _source_parent(self, tx: Tx, spec: VolumeSpec) -> tuple[Layer | None, int, int]:
        """The layer a new volume starts from, its default and minimum capacity."""
        default = self.config.default_capacity
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
                    f"base layer {spec.base_layer!r} does not exist on node {self.config.node_id}; "
                    f"import it with 'overlay-csi layer import {spec.base_layer} PATH'"
                )
            return base, default, 0
        return None, default, 0

    def _repoint(self, tx: Tx, spec: VolumeSpec, flat: Layer) -> None:
        """After flattening a snapshot's deep chain, let the snapshot use the flat layer
        so later restores reuse it."""
        if spec.source_kind == "snapshot":
            tx.c.execute("UPDATE snapshots SET layer=? WHERE id=?", (flat.id, spec.source_id))

    def delete_volume(self, volume_id: str) -> None:
        with self.store.tx() as tx:
            v = tx.volume(volume_id)
            if v is None:
                return
            if v.staging_path and self._is_staged(v):
                raise FailedPrecondition(f"volume {volume_id} is still staged at {v.staging_path}")
            live = [p.target_path for p in tx.publications(volume_id) if host.is_mounted(p.target_path)]
            if live:
                raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
            tx.delete_volume(volume_id)
            gone = tx.collect_garbage()
            self._step("delete.uncommitted")
        self._step("delete.committed")
        self._staged.discard(volume_id)
        self._discard_layers(gone)
