"""Engine state and shared helpers: config, scratch builds, layer records, capacity rules."""

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
from csi_driver.engine.layers import (
    LayerMounts,
    build_image,
    flatten_into,
    image_size_for,
    remove_tree,
)
from csi_driver.engine.layout import Layout, new_id, new_link
from csi_driver.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_driver.store import Layer, Store, Volume

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
GROUP_PREFIX = "group-"

# Test-only hook: called with a step name at each crash-relevant boundary.
CrashHook = Callable[[str], None]


def crash_hook_from_env() -> CrashHook:
    """Test-only hooks at step boundaries, from the environment.

    ``OVERLAY_CSI_CRASH_AT=step[:n]`` SIGKILLs the process the n-th (default
    first) time it reaches that step; ``OVERLAY_CSI_SLOW_AT=step:seconds``
    sleeps there (to test draining and concurrency).
    """
    crash = os.environ.get("OVERLAY_CSI_CRASH_AT", "")
    slow = os.environ.get("OVERLAY_CSI_SLOW_AT", "")
    if not crash and not slow:
        return lambda step: None
    crash_name, _, nth = crash.partition(":")
    slow_name, _, seconds = slow.partition(":")
    seen = {"n": 0}

    def hook(step: str) -> None:
        if slow and step == slow_name:
            time.sleep(float(seconds or 1))
        if crash and step == crash_name:
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


class EngineCore:
    def __init__(self, config: EngineConfig, crash_hook: CrashHook | None = None) -> None:
        self.config = config
        self.layout = Layout(Path(config.state_dir))
        self.layout.ensure()
        self.store = Store(self.layout.db)
        self.mounts = LayerMounts(self.layout)
        self._crash = crash_hook or crash_hook_from_env()
        self._staged: set[str] = set()  # volumes whose layers this process holds mounted
        self._pins: dict[Path, list[str]] = {}  # scratch dir -> layers its operation installed

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
            self._unpin(path)
            remove_tree(path)

    def _install(self, scratch: Path, layer_id: str) -> None:
        """Move a built layer dir into place (inside the transaction that adds its row).

        The layer stays pinned (no garbage collection) until the operation that
        built it in ``scratch`` ends: a snapshot's copy is referenced only by the
        snapshot row a later transaction adds, and a concurrent delete must not
        collect it in between."""
        root = self.layout.tmp / scratch.relative_to(self.layout.tmp).parts[0]
        self.store.pin(layer_id)
        self._pins.setdefault(root, []).append(layer_id)
        os.rename(scratch, self.layout.layer_dir(layer_id))

    def _unpin(self, scratch: Path) -> None:
        """Release the pins of an operation; collect what it left unreferenced (it failed)."""
        ids = self._pins.pop(scratch, [])
        if not ids:
            return
        for layer_id in ids:
            self.store.unpin(layer_id)
        with self.store.tx() as tx:
            orphans = [x for x in ids if tx.layer(x) is not None and tx.layer_users(x) == 0]
            gone = tx.collect_garbage() if orphans else []
        self._discard_layers(gone)

    def _collect_if_orphan(self, layer_id: str) -> None:
        """A source deleted while we built on it is reclaimed once we let go of it."""
        with self.store.tx() as tx:
            layer = tx.layer(layer_id)
            collectable = layer is not None and (layer.name is None or layer.name.startswith("retired:"))
            orphan = collectable and tx.layer_users(layer_id) == 0
            gone = tx.collect_garbage() if orphan else []
        self._discard_layers(gone)

    def _add_copied_layer(
        self, copy_dir: Path, parent: Layer | None, fs_type: str, image_bytes: int, base_bytes: int = 0
    ) -> Layer:
        """Record the image copied into ``copy_dir`` as a committed layer over ``parent``;
        ``base_bytes`` is what the copied file system used when empty."""
        image = copy_dir / "image"
        data = host.allocated_bytes(image) if fs_type == "block" else host.fs_used_bytes(image, fs_type)
        layer = self._new_layer(
            parent,
            active=False,
            fs_type=fs_type,
            image_bytes=image_bytes,
            used_bytes=max(0, data - base_bytes),
        )
        with self.store.tx() as tx:
            tx.add_layer(layer)
            self._install(copy_dir, layer.id)
            self._step("snapshot.copied")
        self._link(layer)
        return layer

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
        base_bytes: int = 0,
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
            base_bytes=base_bytes,
        )

    def _chain_data(self, top: Layer | None) -> int:
        """The data a volume on this committed chain has written into it.

        Named base layers are shared images, like a container's image layers:
        they do not count against a volume's capacity; its own layers do.
        """
        if top is None:
            return 0
        chain = [top]  # top may be a flattened layer not stored yet
        if top.parent:
            with self.store.tx() as tx:
                chain += tx.chain(top.parent)
        return sum(x.used_bytes for x in chain if not x.active and x.name is None)

    def _parent_of_upper(self, v: Volume) -> Layer | None:
        with self.store.tx() as tx:
            upper = tx.layer(v.upper)
            return tx.layer(upper.parent) if upper and upper.parent else None

    def _loop_devices_of(self, v: Volume) -> list[str]:
        """Loop devices attached to the volume's upper image."""
        image = str(self.layout.image(v.upper))
        return [d for d, f in host.loop_devices().items() if f == image]

    @staticmethod
    def _upper_size(capacity: int, fs_type: str) -> int:
        """The image of a volume's upper: the volume's full capacity.

        Not less: overlayfs copies a whole file up before the first write to it,
        so a volume must be able to hold any file of its layers again in its
        upper. What the layers already hold is reported in the volume's stats.
        """
        return image_size_for(capacity, fs_type)

    def _flatten(self, top: Layer, scratch: Path) -> Layer:
        """Build in ``scratch`` one committed layer holding the merged view of ``top``'s chain."""
        with self.store.tx() as tx:
            chain = tx.chain(top.id)
        root = scratch / "root"
        for layer in chain:
            self.mounts.acquire(layer.id, layer.fs_type, readonly=True)
        try:
            flatten_into(self.layout, [x.link for x in chain], root)
            try:
                (root / "work").mkdir(exist_ok=True)
                tree = host.tree_bytes(root / "upper")
                size = image_size_for(tree + tree // 4 + 64 * MiB)  # from the tree: no compounding
                build_image(scratch / "image", size, "ext4", populate=root)
                # base layers' data is shared, not the volume's own
                data = max(0, tree - sum(x.used_bytes for x in chain if x.name is not None))
            finally:
                host.umount(root / "upper")
        finally:
            for layer in chain:
                self.mounts.release(layer.id)
        return self._new_layer(None, active=False, fs_type="ext4", image_bytes=size, used_bytes=data)

    def _bounded_parent(self, parent: Layer | None, scratch: Path) -> tuple[Layer | None, Layer | None]:
        """Return (parent to use, new flattened layer to insert or None)."""
        if parent is None or parent.depth < self.config.max_depth:
            return parent, None
        flat_dir = scratch / "flat"
        flat_dir.mkdir()
        flat = self._flatten(parent, flat_dir)
        return flat, flat

    def get_volume(self, volume_id: str) -> Volume:
        with self.store.tx() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def list_volumes(self, after_seq: int, limit: int) -> list[Volume]:
        with self.store.tx() as tx:
            return tx.volumes(after_seq, limit)

    def layers(self) -> list[Layer]:
        with self.store.tx() as tx:
            return tx.layers()

    def disk_usage(self) -> int:
        """Bytes the host really spends on all layer images."""
        return sum(host.allocated_bytes(self.layout.image(x.id)) for x in self.layers())

    def close(self) -> None:
        self.store.close()
