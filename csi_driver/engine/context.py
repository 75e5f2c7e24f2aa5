"""What every engine component shares: the config, the store, the layer backend,
scratch builds and their pins, and the rules for layer records and capacity."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver import host
from csi_driver.engine.capacity import Capacity, CapacityPolicy, Space
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from csi_driver.ids import new_id
from csi_driver.layerstore.backend import Built, FsUsage, LayerBackend
from csi_driver.statedir import StateDir
from csi_driver.store import Layer, Publication, Store, Volume

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
GROUP_PREFIX = "group-"
BLOCK = "block"

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


class BadConfig(ValueError):
    """An engine configuration the chosen layer backend cannot serve."""


@dataclass
class EngineConfig:
    state_dir: Path
    node_id: str
    max_volumes: int = 0  # 0: no limit
    max_volume_size: int = 0  # 0: no limit
    max_ephemeral_size: int = GiB  # all inline volumes together; 0: none allowed
    max_snapshots_per_volume: int = 0  # 0: no limit
    max_depth: int = 64
    default_capacity: int = GiB
    min_capacity: int = MiB
    fs_type: str = ""  # a mount volume's when its request names none; "": the backend's default
    backend: str = ""  # how layers are kept (layerstore.backends); "": the state dir's, else the default
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)
    insecure_registries: frozenset[str] = frozenset()  # hosts reached over plain HTTP
    space: Space | None = None  # where layers are kept (free, size); None: the backend's file system
    max_live_copy: int = 0  # the most a capture of a volume in use may copy (no clone); 0: no limit


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
class VolumeStats(FsUsage):
    """What NodeGetVolumeStats answers: the figures and the volume's condition."""

    abnormal: bool
    message: str


class EngineContext:
    """The engine's shared state and the helpers every component needs."""

    def __init__(
        self, config: EngineConfig, store: Store, backend: LayerBackend, crash_hook: CrashHook | None = None
    ) -> None:
        self.config = config
        self.state = StateDir(Path(config.state_dir))
        self.store = store
        self.backend = backend
        self.capacity = Capacity(store, backend, config.capacity, space=config.space)
        self.crash = crash_hook or crash_hook_from_env()
        self.staged: set[str] = set()  # volumes whose layers this process holds activated
        self._pins: dict[Path, list[str]] = {}  # scratch dir -> layers its operation installed
        self._pins_guard = threading.Lock()

    def step(self, name: str) -> None:
        self.crash(name)

    # ---- scratch builds -----------------------------------------------------
    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private build dir under tmp/, removed unless renamed away."""
        path = self.state.tmp / new_id()
        path.mkdir()
        try:
            yield path
        finally:
            self._unpin(path)
            host.remove_tree(path)

    def install(self, build: Path, layer: Layer) -> None:
        """Move a built layer into place (inside the transaction that adds its row).

        The layer stays pinned (no garbage collection) until the operation that
        built it in ``build`` ends: a snapshot's copy is referenced only by the
        snapshot row a later transaction adds, and a concurrent delete must not
        collect it in between."""
        root = self.state.tmp / build.relative_to(self.state.tmp).parts[0]
        self.store.pin(layer.id)
        with self._pins_guard:
            self._pins.setdefault(root, []).append(layer.id)
        self.backend.install(build, layer)

    def _unpin(self, scratch: Path) -> None:
        """Release the pins of an operation; collect what it left unreferenced (it failed)."""
        with self._pins_guard:
            ids = self._pins.pop(scratch, [])
        if not ids:
            return
        for layer_id in ids:
            self.store.unpin(layer_id)
        with self.store.tx() as tx:
            orphans = [x for x in ids if tx.layer(x) is not None and tx.layer_users(x) == 0]
            gone = tx.collect_garbage() if orphans else []
        self.discard(gone)

    def collect_if_orphan(self, layer_id: str) -> None:
        """A source deleted while we built on it is reclaimed once we let go of it."""
        with self.store.tx() as tx:
            layer = tx.layer(layer_id)
            collectable = layer is not None and (layer.name is None or layer.name.startswith("retired:"))
            orphan = collectable and tx.layer_users(layer_id) == 0
            gone = tx.collect_garbage() if orphan else []
        self.discard(gone)

    def discard(self, layers: list[Layer]) -> None:
        """Remove the storage of layers the store no longer knows."""
        for layer in layers:
            self.backend.remove(layer)

    # ---- layer records ------------------------------------------------------
    def new_layer(
        self,
        parent: Layer | None,
        built: Built,
        *,
        active: bool,
        fs_type: str,
        used_bytes: int | None = None,
        name: str | None = None,
    ) -> Layer:
        return Layer(
            id=new_id(),
            parent=parent.id if parent else None,
            link=self.backend.new_link(),
            name=name,
            active=int(active),
            fs_type=fs_type,
            depth=(parent.depth if parent else 0) + (0 if active else 1),
            image_bytes=built.image_bytes,
            used_bytes=built.used_bytes if used_bytes is None else used_bytes,
            created_at=time.time(),
            base_bytes=built.base_bytes,
        )

    def chain(self, top: str) -> list[Layer]:
        with self.store.read() as tx:
            return tx.chain(top)

    def layer(self, layer_id: str) -> Layer | None:
        with self.store.read() as tx:
            return tx.layer(layer_id)

    def chain_data(self, top: Layer | None) -> int:
        """The data a volume on this committed chain has written into it.

        Named base layers are shared images, like a container's image layers:
        they do not count against a volume's capacity; its own layers do.
        """
        if top is None:
            return 0
        chain = [top]  # top may be a flattened layer not stored yet
        if top.parent:
            chain += self.chain(top.parent)
        data = 0
        for layer in chain:
            if layer.name is not None:  # a base layer: it and all below it are the base's
                break
            data += 0 if layer.active else layer.used_bytes
        return data

    def flatten(self, chain: list[Layer], build: Path) -> Layer:
        """Build one committed layer holding the merged view of a committed chain
        (nearest first)."""
        built = self.backend.squash(build, chain)
        # base layers' data is shared, not the volume's own
        data = max(0, built.used_bytes - sum(x.used_bytes for x in chain if x.name is not None))
        return self.new_layer(None, built, active=False, fs_type=built.fs_type, used_bytes=data)

    def bounded_parent(self, view: list[Layer], scratch: Path) -> tuple[Layer | None, Layer | None]:
        """Return (parent to use, new flattened layer to insert or None) for a new
        layer over ``view`` (the parent's chain): a chain at the depth cap is
        flattened into one layer first."""
        parent = view[0] if view else None
        if parent is None or parent.depth < self.config.max_depth:
            return parent, None
        flat_dir = scratch / "flat"
        flat_dir.mkdir()
        flat = self.flatten(view, flat_dir)
        return flat, flat

    # ---- volumes and capacity -----------------------------------------------
    def get_volume(self, volume_id: str) -> Volume:
        with self.store.read() as tx:
            v = tx.volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def upper_of(self, v: Volume) -> Layer:
        upper = self.layer(v.upper)
        if upper is None:
            raise LookupError(f"layer {v.upper} of volume {v.id} missing from store")
        return upper

    def allocation(self, v: Volume) -> int:
        """What a volume's upper occupies now: a snapshot or a clone of the volume
        turns it into a committed layer (or copies it), so the node promises it again."""
        return self.backend.usages([v.upper])[v.upper]

    def upper_size(self, capacity: int, fs_type: str) -> int:
        """The size of a volume's upper: the volume's full capacity.

        Not less: overlayfs copies a whole file up before the first write to it,
        so a volume must be able to hold any file of its layers again in its
        upper. What the layers already hold is reported in the volume's stats.
        """
        return self.backend.size_for(capacity, fs_type)

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

    # ---- node-side rules shared by file system and block volumes ------------
    def check_stage_limit(self, v: Volume) -> None:
        """--max-volumes-per-node: how many volumes may be in use on this node."""
        limit = self.config.max_volumes
        if not limit or v.staging_path:
            return
        with self.store.read() as tx:
            if tx.count_staged(except_id=v.id) >= limit:
                raise ResourceExhausted(
                    f"node {self.config.node_id} already has its maximum of {limit} volumes in use"
                )

    def check_hides_nothing(self, path: str) -> None:
        """A mount at ``path`` must not cover another volume's staging path or target
        (a bind over kubelet's staging dir would hide every volume staged there)."""
        with self.store.read() as tx:
            below = tx.paths_below(os.path.normpath(path))
        if below:
            volume_id, other = below[0]
            raise FailedPrecondition(
                f"{path} contains {other}, a path of volume {volume_id}; a mount there would hide it"
            )

    def check_single_writer(
        self,
        v: Volume,
        target_path: str,
        readonly: bool,
        single_writer: bool,
        *,
        live: Callable[[Publication], bool],
    ) -> None:
        """SINGLE_NODE_SINGLE_WRITER: while published read-write, nowhere else. Only
        publications whose target still shows the volume (``live``) count: a record whose
        mount is gone (a reboot, a manual umount) must not lock the volume out forever."""
        with self.store.read() as tx:
            others = [p for p in tx.publications(v.id) if p.target_path != target_path]
        others = [p for p in others if live(p)]
        if single_writer and others:
            raise FailedPrecondition(
                f"volume {v.id} is single-writer and already published at {others[0].target_path}"
            )
        writer = next((p for p in others if p.options.get("single_writer") and not p.readonly), None)
        if writer is not None:
            raise FailedPrecondition(f"volume {v.id} has a single writer at {writer.target_path}")
