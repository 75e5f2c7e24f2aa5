"""The layer engine: volumes as stacks of immutable layers plus one writable upper.

Model (after containerd's overlay snapshotter): every layer lives in
``layers/<id>/image``. A volume owns one *active* layer (its upper); its parent
chain is committed, read-only layers. A snapshot of a detached volume commits
the upper in place (metadata only) and gives the volume a fresh upper on top;
restores and clones are fresh uppers over the same layers. Nothing is copied
except when a staged volume must be frozen and its upper copied, or a chain
deeper than ``max_depth`` is flattened.

The engine knows nothing of gRPC. Callers serialise operations per volume.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.compose import overlay_options
from csi_driver.engine.layers import (
    LayerMounts,
    build_image,
    flatten_into,
    image_size_for,
    make_clean,
    populate_from_tar,
    remove_tree,
)
from csi_driver.engine.layout import Layout, new_id, new_link
from csi_driver.errors import (
    AlreadyExists,
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from csi_driver.store import Layer, Publication, Snapshot, Store, Tx, Volume

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"

# Test-only hook: called with a step name at each crash-relevant boundary.
CrashHook = Callable[[str], None]


def crash_hook_from_env() -> CrashHook:
    """Test-only: ``OVERLAY_CSI_CRASH_AT=step[:n]`` SIGKILLs the process at the
    n-th (default first) time it reaches that step boundary."""
    spec = os.environ.get("OVERLAY_CSI_CRASH_AT", "")
    if not spec:
        return lambda step: None
    name, _, nth = spec.partition(":")
    seen = {"n": 0}

    def hook(step: str) -> None:
        if step == name:
            seen["n"] += 1
            if seen["n"] >= int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


@dataclass
class EngineConfig:
    state_dir: Path
    node_id: str
    max_volumes: int = 0  # 0: no limit
    max_volume_size: int = 0  # 0: no limit
    max_depth: int = 64
    default_capacity: int = GiB
    min_capacity: int = MiB
    fs_type: str = "ext4"


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    required_bytes: int = 0
    limit_bytes: int = 0
    access_type: str = "mount"
    fs_type: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    mutable: dict[str, str] = field(default_factory=dict)
    source_kind: str = ""  # "", "snapshot" or "volume"
    source_id: str = ""
    base_layer: str = ""
    ephemeral: bool = False


@dataclass(frozen=True)
class VolumeStats:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int
    abnormal: bool
    message: str


class Engine:
    def __init__(self, config: EngineConfig, crash_hook: CrashHook | None = None) -> None:
        self.config = config
        self.layout = Layout(Path(config.state_dir))
        self.layout.ensure()
        self.store = Store(self.layout.db)
        self.mounts = LayerMounts(self.layout)
        self._crash = crash_hook or crash_hook_from_env()
        self._staged: set[str] = set()  # volumes whose layers this process holds mounted

    # ------------------------------------------------------------------ helpers
    def _step(self, name: str) -> None:
        self._crash(name)

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A private build dir under tmp/, removed unless renamed away."""
        path = self.layout.tmp / new_id()
        path.mkdir()
        try:
            yield path
        finally:
            remove_tree(path)

    def _install(self, scratch: Path, layer_id: str) -> None:
        """Move a built layer dir into place and give it its short link."""
        os.rename(scratch, self.layout.layer_dir(layer_id))

    def _link(self, layer: Layer) -> None:
        link = self.layout.link(layer.link)
        if not link.is_symlink():
            tmp = link.with_name(link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f"../layers/{layer.id}/mnt/upper")
            os.rename(tmp, link)

    def _discard_layers(self, layers: list[Layer]) -> None:
        """Remove the files of layers the store no longer knows."""
        for layer in layers:
            self.layout.link(layer.link).unlink(missing_ok=True)
            remove_tree(self.layout.layer_dir(layer.id))

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def resolve_capacity(self, required: int, limit: int, default: int) -> int:
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range bytes must not be negative")
        if limit and required > limit:
            raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
        if required == 0:
            cap = default if not limit else min(default, limit)
        else:
            cap = (required + MiB - 1) // MiB * MiB
            if limit and cap > limit:
                cap = required
        cap = max(cap, self.config.min_capacity)
        if limit and cap > limit:
            raise OutOfRange(
                f"limit_bytes {limit} is below the minimum volume size {self.config.min_capacity}"
            )
        if self.config.max_volume_size and cap > self.config.max_volume_size:
            raise OutOfRange(
                f"{cap} bytes exceeds the node's --max-volume-size {self.config.max_volume_size}"
            )
        return cap

    def _new_layer(
        self,
        parent: Layer | None,
        *,
        active: bool,
        fs_type: str,
        image_bytes: int,
        used_bytes: int = 0,
        name: str | None = None,
        layer_id: str | None = None,
    ) -> Layer:
        return Layer(
            id=layer_id or new_id(),
            parent=parent.id if parent else None,
            link=new_link(),
            name=name,
            active=int(active),
            fs_type=fs_type,
            depth=(parent.depth if parent else 0) + (0 if active else 1),
            image_bytes=image_bytes,
            used_bytes=used_bytes,
            created_at=time.time(),
        )

    def _flatten(self, top: Layer, scratch: Path) -> Layer:
        """Build in ``scratch`` one committed layer holding the merged view of ``top``'s chain."""
        with self.store.tx() as tx:
            chain = tx.chain(top.id)
        used = sum(layer.used_bytes for layer in chain)
        size = image_size_for(max(max(x.image_bytes for x in chain), used + used // 8 + 64 * MiB))
        root = scratch / "root"
        for layer in chain:
            self.mounts.acquire(layer.id, layer.fs_type, readonly=True)
        try:
            flatten_into(self.layout, [x.link for x in chain], root)
            try:
                (root / "work").mkdir(exist_ok=True)
                build_image(scratch / "image", size, "ext4", populate=root)
            finally:
                host.umount(root / "upper")
        finally:
            for layer in chain:
                self.mounts.release(layer.id)
        flat = self._new_layer(None, active=False, fs_type="ext4", image_bytes=size)
        return Layer(**{**flat.__dict__, "used_bytes": host.allocated_bytes(scratch / "image")})

    def _bounded_parent(self, parent: Layer | None, scratch: Path) -> tuple[Layer | None, Layer | None]:
        """Return (parent to use, new flattened layer to insert or None)."""
        if parent is None or parent.depth < self.config.max_depth:
            return parent, None
        flat_dir = scratch / "flat"
        flat_dir.mkdir()
        flat = self._flatten(parent, flat_dir)
        return flat, flat

    # ------------------------------------------------------------------ volumes
    def get_volume(self, volume_id: str) -> Volume:
        with self.store.tx() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def find_volume(self, volume_id: str) -> Volume | None:
        with self.store.tx() as tx:
            return tx.volume(volume_id)

    def list_volumes(self, after_seq: int, limit: int) -> list[Volume]:
        with self.store.tx() as tx:
            return tx.volumes(after_seq, limit)

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
        )

    def create_volume(self, spec: VolumeSpec) -> Volume:
        fs_type = spec.fs_type or self.config.fs_type
        with self.store.tx() as tx:
            existing = tx.volume_by_name(spec.name)
            if existing is not None:
                if self._compatible(existing, spec):
                    return existing
                raise AlreadyExists(f"volume {spec.name!r} exists with different arguments")
            if self.config.max_volumes and tx.count_volumes() >= self.config.max_volumes:
                raise ResourceExhausted(
                    f"node {self.config.node_id} holds its maximum of {self.config.max_volumes} volumes"
                )
            parent, default_cap, min_cap = self._source_parent(tx, spec)
        capacity = self.resolve_capacity(spec.required_bytes, spec.limit_bytes, default_cap)
        if capacity < min_cap:
            raise OutOfRange(f"{capacity} bytes is smaller than the source's {min_cap} bytes")
        if capacity > self.free_bytes():
            raise ResourceExhausted(
                f"{capacity} bytes do not fit in the {self.free_bytes()} free bytes of the node's storage"
            )
        with self._scratch() as scratch:
            if spec.source_kind == "volume":
                parent = self._share_volume(spec.source_id, scratch)
            parent, flat = self._bounded_parent(parent, scratch)
            self._step("create.flattened")
            size = image_size_for(capacity, fs_type)
            upper_dir = scratch / "upper"
            upper_dir.mkdir()
            build_image(upper_dir / "image", size, fs_type)
            self._step("create.built")
            upper = self._new_layer(parent, active=True, fs_type=fs_type, image_bytes=size)
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
            for layer in (flat, upper):
                if layer is not None:
                    self._link(layer)
        self._step("create.done")
        return vol

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
            if v.staging_path and host.is_mounted(v.staging_path):
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

    # ------------------------------------------------------------------ snapshots
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

    # ------------------------------------------------------------------ node side
    def _overlay_is(self, path: str, v: Volume) -> bool:
        entry = host.mount_at(path)
        return (
            entry is not None
            and entry.fstype == "overlay"
            and f"upperdir=layers/{v.upper}/mnt/upper" in entry.super_options
        )

    def _hold_layers(self, v: Volume) -> None:
        """Mount (count) the volume's lowers read-only and its upper read-write."""
        with self.store.tx() as tx:
            chain = tx.chain(v.upper)
        done: list[str] = []
        try:
            for layer in chain:
                self.mounts.acquire(layer.id, layer.fs_type, readonly=not layer.active)
                done.append(layer.id)
        except Exception:
            for layer_id in done:
                self.mounts.release(layer_id)
            raise
        self._staged.add(v.id)

    def _drop_layers(self, v: Volume) -> None:
        if v.id not in self._staged:
            return
        self._staged.discard(v.id)
        with self.store.tx() as tx:
            chain = tx.chain(v.upper)
        for layer in chain:
            self.mounts.release(layer.id)

    def stage(self, volume_id: str, staging_path: str, mount_flags: list[str] | None = None) -> None:
        v = self.get_volume(volume_id)
        if v.staging_path and v.staging_path != staging_path and self._overlay_is(v.staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is already staged at {v.staging_path}")
        if self._overlay_is(staging_path, v):
            if v.id not in self._staged:
                self._hold_layers(v)
            return
        if host.is_mounted(staging_path):
            raise FailedPrecondition(f"{staging_path} already has another mount")
        with self.store.tx() as tx:
            tx.update_volume(
                volume_id, staging_path=staging_path, stage_options={"mount_flags": mount_flags or []}
            )
        self._step("stage.recorded")
        Path(staging_path).mkdir(parents=True, exist_ok=True)
        if v.id not in self._staged:
            self._hold_layers(v)
        try:
            with self.store.tx() as tx:
                links = [x.link for x in tx.chain(v.upper)[1:]]
            opts = overlay_options(links, v.upper) + list(mount_flags or [])
            host.mount("overlay", staging_path, "overlay", opts, cwd=self.layout.root)
        except Exception:
            self._drop_layers(v)
            raise
        self._step("stage.mounted")

    def unstage(self, volume_id: str, staging_path: str) -> None:
        v = self.get_volume(volume_id)
        with self.store.tx() as tx:
            live = [p.target_path for p in tx.publications(volume_id) if host.is_mounted(p.target_path)]
        if live:
            raise FailedPrecondition(f"volume {volume_id} is still published at {live[0]}")
        if self._overlay_is(staging_path, v):
            host.umount(staging_path)
        self._step("unstage.unmounted")
        self._drop_layers(v)
        if v.staging_path == staging_path or v.staging_path is None:
            with self.store.tx() as tx:
                tx.update_volume(volume_id, staging_path=None, stage_options={})
        self._step("unstage.done")

    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        readonly: bool,
        mount_flags: list[str] | None = None,
    ) -> None:
        v = self.get_volume(volume_id)
        if v.staging_path != staging_path or not self._overlay_is(staging_path, v):
            raise FailedPrecondition(f"volume {volume_id} is not staged at {staging_path}")
        if host.is_mounted(target_path):
            with self.store.tx() as tx:
                pub = tx.publication_at(target_path)
            if (
                pub
                and pub.volume_id == volume_id
                and pub.readonly == readonly
                and self._overlay_is(target_path, v)
            ):
                return
            raise AlreadyExists(f"{target_path} is already published with other arguments")
        with self.store.tx() as tx:
            tx.add_publication(
                Publication(volume_id, target_path, readonly, {"mount_flags": mount_flags or []})
            )
        self._step("publish.recorded")
        Path(target_path).mkdir(parents=True, exist_ok=True)
        host.bind_mount(staging_path, target_path, readonly=readonly)
        if mount_flags:
            host.run(["mount", "-o", "remount,bind," + ",".join(mount_flags), target_path])
        self._step("publish.mounted")

    def unpublish(self, volume_id: str, target_path: str) -> None:
        v = self.get_volume(volume_id)
        if host.is_mounted(target_path):
            if not self._overlay_is(target_path, v):
                raise FailedPrecondition(f"{target_path} holds a mount that is not volume {volume_id}")
            host.umount(target_path)
        self._step("unpublish.unmounted")
        target = Path(target_path)
        if target.is_dir() and not target.is_symlink():
            try:
                target.rmdir()
            except OSError as e:
                log.warning("could not remove target %s: %s", target_path, e)
        with self.store.tx() as tx:
            tx.delete_publication(volume_id, target_path)

    def volume_paths(self, v: Volume) -> set[str]:
        with self.store.tx() as tx:
            paths = {p.target_path for p in tx.publications(v.id)}
        if v.staging_path:
            paths.add(v.staging_path)
        return paths

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        v = self.get_volume(volume_id)
        if os.path.normpath(path) not in self.volume_paths(v):
            raise NotFound(f"{path} is not a path of volume {volume_id}")
        condition = self.condition(v, path)
        if condition:
            return VolumeStats(0, 0, 0, 0, 0, 0, True, condition)
        st = os.statvfs(path)
        total = st.f_blocks * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        return VolumeStats(
            total,
            total - st.f_bfree * st.f_frsize,
            avail,
            st.f_files,
            st.f_files - st.f_ffree,
            st.f_favail,
            False,
            "volume is healthy",
        )

    def condition(self, v: Volume, path: str | None = None) -> str:
        """An empty string when healthy, else what is wrong."""
        if not self.layout.image(v.upper).exists():
            return f"the upper image of volume {v.id} is missing"
        for p in [path] if path else ([v.staging_path] if v.staging_path else []):
            if not self._overlay_is(p, v):
                return f"{p} is not mounted (node restarted?); stage and publish again"
        return ""

    # ------------------------------------------------------------------ expansion
    def expand(self, volume_id: str, required: int, limit: int = 0) -> tuple[int, bool]:
        """Grow the volume's backing image (controller side).

        A detached volume's file system is grown at once, offline; for one in
        use, returns True: the node must grow the mounted file system.
        """
        v = self.get_volume(volume_id)
        capacity = self.resolve_capacity(required, limit, v.capacity_bytes)
        if capacity < v.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} has {v.capacity_bytes} bytes; shrinking to {capacity} is not supported"
            )
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            assert upper is not None
        size = image_size_for(capacity, upper.fs_type)
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
        if upper.fs_type == "ext4":
            host.run(["e2fsck", "-f", "-p", str(image)], check=False)
            host.run(["resize2fs", str(image)])
            return
        self.mounts.acquire(upper.id, upper.fs_type, readonly=False)
        try:
            host.grow_fs(upper.fs_type, "", self.layout.mnt(upper.id))
        finally:
            self.mounts.release(upper.id)

    def expand_node(self, volume_id: str, required: int, limit: int = 0) -> int:
        """Grow the file system the pod sees (node side), online when mounted."""
        v = self.get_volume(volume_id)
        if required > v.capacity_bytes or os.path.getsize(self.layout.image(v.upper)) < image_size_for(
            v.capacity_bytes, v.fs_type
        ):
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
        try:
            host.grow_fs(upper.fs_type, device, mnt)
        except CommandFailed as e:
            if "Permission denied" in e.stderr or "Operation not permitted" in e.stderr:
                raise FailedPrecondition(
                    "growing a mounted ext4 file system needs CAP_SYS_RESOURCE: run the node plugin "
                    "privileged, or unpublish and unstage the volume so it grows offline"
                ) from e
            raise
        return v.capacity_bytes

    # ------------------------------------------------------------------ base layers
    def import_layer(self, name: str, source: Path) -> Layer:
        """Import a directory or tar archive as a named, read-only base layer."""
        with self.store.tx() as tx:
            if tx.layer_by_name(name) is not None:
                raise AlreadyExists(f"layer {name!r} already exists")
        if not source.exists():
            raise InvalidArgument(f"{source} does not exist")
        with self._scratch() as scratch:
            root = scratch / "root"
            (root / "work").mkdir(parents=True)
            if source.is_dir():
                (root / "upper").mkdir()
                host.bind_mount(source, root / "upper", readonly=True)
            else:
                populate_from_tar(source, root / "upper")
            try:
                used = sum(f.stat().st_size for f in (root / "upper").rglob("*") if f.is_file())
                size = image_size_for(used + used // 4 + 64 * MiB)
                layer_dir = scratch / "layer"
                layer_dir.mkdir()
                build_image(layer_dir / "image", size, "ext4", populate=root)
            finally:
                host.umount(root / "upper")
            layer = self._new_layer(
                None,
                active=False,
                fs_type="ext4",
                image_bytes=size,
                used_bytes=host.allocated_bytes(layer_dir / "image"),
                name=name,
            )
            with self.store.tx() as tx:
                tx.add_layer(layer)
                self._install(layer_dir, layer.id)
            self._link(layer)
        return layer

    def delete_named_layer(self, name: str) -> None:
        with self.store.tx() as tx:
            layer = tx.layer_by_name(name)
            if layer is None:
                raise NotFound(f"layer {name!r} does not exist")
            tx.update_layer(layer.id, name=None)
            gone = tx.collect_garbage()
        self._discard_layers(gone)

    def layers(self) -> list[Layer]:
        with self.store.tx() as tx:
            return tx.layers()

    def disk_usage(self) -> int:
        """Bytes the host really spends on all layer images."""
        return sum(host.allocated_bytes(self.layout.image(x.id)) for x in self.layers())

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.store.close()
