"""Layers from scratch builds to installed: one way for every component.

A new layer is built in a private scratch dir, then recorded and moved into
place in one transaction (with whatever refers to it), then exposed (after
containerd's snapshotter: build in a temp dir, write the record, rename, all in
one transaction). ``adding`` is that sequence; nothing else installs a layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from csi_driver import host
from csi_driver.ids import new_id
from csi_driver.layerstore.backend import Built, LayerBackend
from csi_driver.store import Layer, Store, Tx


class LayerBuilds:
    def __init__(
        self, store: Store, backend: LayerBackend, tmp: Path, max_depth: int, step: Callable[[str], None]
    ) -> None:
        self.store = store
        self.backend = backend
        self.tmp = tmp
        self.max_depth = max_depth
        self.step = step
        self._pins: dict[Path, list[str]] = {}  # scratch dir -> layers its operation installed
        self._pins_guard = threading.Lock()

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
        """The record of a layer built over ``parent`` (not stored yet); its link is the backend's."""
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

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private build dir under tmp/, removed unless renamed away."""
        path = self.tmp / new_id()
        path.mkdir()
        try:
            yield path
        finally:
            self._unpin(path)
            host.remove_tree(path)

    @contextmanager
    def adding(
        self,
        built: Sequence[tuple[Path, Layer]],
        *,
        check: Callable[[Tx], None] | None = None,
        step: str = "",
    ) -> Iterator[Tx]:
        """Record the layers built in scratch (``(build dir, layer)``, parents first)
        and yield the transaction, for the rows that refer to them; then move each
        into place, commit, and expose them. ``check`` may refuse (raise) before
        anything is written; ``step`` is the crash hook's step once all is in place.
        Layers moved into place whose transaction then fails are removed again."""
        installed: list[Layer] = []
        try:
            with self.store.tx() as tx:
                if check is not None:
                    check(tx)
                for _build, layer in built:
                    tx.add_layer(layer)
                yield tx
                for build, layer in built:
                    self._install(build, layer)
                    installed.append(layer)
                if step:
                    self.step(step)
        except BaseException:
            self.discard(installed)  # moved into place, but their rows were rolled back
            raise
        for _build, layer in built:
            self.backend.expose(layer)

    def _install(self, build: Path, layer: Layer) -> None:
        """Move a built layer into place (inside the transaction that adds its row).

        The layer stays pinned (no garbage collection) until the operation that
        built it in ``build`` ends: a snapshot's copy is referenced only by the
        snapshot row a later transaction adds, and a concurrent delete must not
        collect it in between."""
        root = self.tmp / build.relative_to(self.tmp).parts[0]
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
        flattened into one layer first (built in ``scratch/flat``)."""
        parent = view[0] if view else None
        if parent is None or parent.depth < self.max_depth:
            return parent, None
        flat_dir = scratch / "flat"
        flat_dir.mkdir()
        flat = self.flatten(view, flat_dir)
        return flat, flat
