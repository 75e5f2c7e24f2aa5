"""Volumes' content as committed layers: what snapshots and clones are made of."""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver.engine.builds import LayerBuilds
from csi_driver.engine.capacity import Capacity
from csi_driver.engine.context import BLOCK, CrashHook
from csi_driver.engine.records import Records
from csi_driver.errors import FailedPrecondition, NotFound
from csi_driver.layerstore.backend import Built, LayerBackend
from csi_driver.store import Layer, Store, Volume

log = logging.getLogger(__name__)

#: the most ``serve`` lets a snapshot of a volume in use copy where the state dir cannot
#: clone: the copy stalls the volume's writes for about size / disk speed (1 GiB: 6.3 s
#: measured on a cloud VM's disk, about 1 s on NVMe); a class may ask for less
DEFAULT_MAX_LIVE_COPY = 1 << 30


class Capture:
    def __init__(
        self,
        store: Store,
        backend: LayerBackend,
        records: Records,
        builds: LayerBuilds,
        capacity: Capacity,
        step: CrashHook,
        *,
        max_live_copy: int = 0,
        max_depth: int = 64,
    ) -> None:
        self.store = store
        self.backend = backend
        self.records = records
        self.builds = builds
        self.capacity = capacity
        self.step = step
        self.max_live_copy = max_live_copy  # 0: no limit
        self.max_depth = max_depth

    def volume(self, volume_id: str, scratch: Path, copy_limit: int | None = None) -> Layer:
        """Turn a volume's current content into a committed layer and return it."""
        with self.store.read() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return self.volumes([v], scratch, copy_limit)[0]

    def volumes(self, vols: list[Volume], scratch: Path, copy_limit: int | None = None) -> list[Layer]:
        """Committed layers holding each volume's content at one instant.

        Detached: the upper itself is committed (O(1)) and the volume continues
        on a fresh upper. In use: the backend captures every in-use upper at one
        instant (a group stays crash-consistent across its members); block
        members are copied in the same window.
        """
        uppers = {v.id: self.records.upper_of(v) for v in vols}
        copied = [
            v for v in vols if v.access_type == BLOCK or self.backend.is_active(uppers[v.id])
        ]  # block volumes are always copied: a raw image cannot be committed under a new upper
        self._check_copy([(v, uppers[v.id]) for v in copied], copy_limit)
        builds: dict[str, Path] = {}
        for v in copied:
            builds[uppers[v.id].id] = scratch / f"copy-{v.id}"
            builds[uppers[v.id].id].mkdir()
        captured = self.backend.capture(
            builds, [uppers[v.id] for v in copied], lambda: self.step("snapshot.frozen")
        )
        out: list[Layer] = []
        for v in vols:
            upper = uppers[v.id]
            if v in copied:
                built = captured[upper.id]
                parent = self.records.layer(upper.parent) if upper.parent else None
                out.append(self._add_copy(builds[upper.id], parent, built, upper.fs_type))
            else:
                out.append(self._commit_upper(v, upper, scratch))
        return out

    def _check_copy(self, copied: list[tuple[Volume, Layer]], copy_limit: int | None) -> None:
        """Refuse a capture whose copy would stall the volumes' writes beyond the limit
        (the node's ``max_live_copy``, or a lower one the caller asks for): a copy
        freezes them for about as long as the disk takes to copy what they hold."""
        node = self.max_live_copy  # 0: no limit
        limits = ([node] if node else []) + ([copy_limit] if copy_limit is not None else [])
        if not limits or not copied:
            return
        costs = {v.id: self.backend.live_copy_bytes(upper) for v, upper in copied}
        total, limit = sum(costs.values()), min(limits)
        if total <= limit:
            return
        held = ", ".join(f"{vid} holds {_mib(n)}" for vid, n in costs.items() if n)
        raise FailedPrecondition(
            f"a snapshot of a volume in use here is a copy of its written data ({held}), made while "
            f"its writes wait, and {_mib(total)} is more than the {_mib(limit)} limit "
            "(serve --max-live-snapshot-copy, or the VolumeSnapshotClass parameter liveCopyLimit): "
            "detach the volume first (a snapshot of a detached volume is never a copy), or give the "
            "node a state dir that clones (serve --pool-file or --pool-device; docs/operations.md)"
        )

    def _add_copy(self, build: Path, parent: Layer | None, built: Built, fs_type: str) -> Layer:
        """Record a copy made in ``build`` as a committed layer over ``parent``."""
        layer = self.builds.new_layer(parent, built, active=False, fs_type=fs_type)
        with self.builds.adding([(build, layer)], step="snapshot.copied"):
            pass
        return layer

    def _commit_upper(self, v: Volume, upper: Layer, scratch: Path) -> Layer:
        """Commit a detached volume's upper in place; the volume gets a fresh one.

        A chain at the depth cap is flattened into one layer, and then that
        layer, not the deep chain, is what the snapshot (or clone) refers to, so
        it is referenced (and pinned) from the moment it is installed.
        """
        data = self.backend.commit(upper)
        committed = Layer(**{**upper.__dict__, "active": 0, "depth": upper.depth + 1, "used_bytes": data})
        # the view the fresh upper starts from: the committed chain (a flat layer
        # shows the same, but is not installed yet)
        view = [committed] + (self.records.chain(upper.parent) if upper.parent else [])
        base, flat = committed, None
        if committed.depth >= self.max_depth:
            flat_dir = scratch / f"flat-{v.id}"
            flat_dir.mkdir()
            flat = base = self.builds.flatten(view, flat_dir)  # read-only: the upper is committed now
        fresh_dir = scratch / f"fresh-{v.id}"
        fresh_dir.mkdir()
        size = self.capacity.upper_size(v.capacity_bytes, upper.fs_type)
        built = self.backend.prepare(fresh_dir, view, size, upper.fs_type)
        fresh = self.builds.new_layer(base, built, active=True, fs_type=upper.fs_type)
        layers = ([(flat_dir, flat)] if flat is not None else []) + [(fresh_dir, fresh)]
        with self.builds.adding(layers, step="snapshot.committed") as tx:
            tx.update_layer(upper.id, active=0, depth=committed.depth, used_bytes=data)
            tx.update_volume(v.id, upper=fresh.id)
            gone = tx.collect_garbage() if flat is not None else []  # the deep chain, unless shared
        self.builds.discard(gone)
        return base


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
