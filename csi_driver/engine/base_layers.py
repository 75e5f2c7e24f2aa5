"""Named, read-only base layers imported by operators (golden volumes)."""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver.engine.builds import LayerBuilds
from csi_driver.errors import AlreadyExists, InvalidArgument, NotFound
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.store import Layer, Store

log = logging.getLogger(__name__)


class BaseLayers:
    def __init__(self, store: Store, backend: LayerBackend, builds: LayerBuilds) -> None:
        self.store = store
        self.backend = backend
        self.builds = builds

    def import_layer(self, name: str, source: Path) -> Layer:
        """Import a directory or tar archive as a named, read-only base layer."""
        with self.store.read() as tx:
            if tx.layer_by_name(name) is not None:
                raise AlreadyExists(f"layer {name!r} already exists")
        if not source.exists():
            raise InvalidArgument(f"{source} does not exist")
        with self.builds.scratch() as scratch:
            build = scratch / "layer"
            build.mkdir()
            built = self.backend.import_tree(build, source)
            layer = self.builds.new_layer(None, built, active=False, fs_type=built.fs_type, name=name)
            with self.builds.adding([(build, layer)]):
                pass
        return layer

    def delete_named_layer(self, name: str, collect: bool = True) -> None:
        """Forget a layer's name; its blocks go once nothing uses it. ``collect``
        False leaves the reclaim to the serving driver (its next delete or restart),
        whose in-flight operations this process cannot see."""
        with self.store.tx() as tx:
            layer = tx.layer_by_name(name)
            if layer is None:
                raise NotFound(f"layer {name!r} does not exist")
            # still a shared base for the volumes on it (never their own data), but
            # nameless to users and reclaimed once unused; ':' is not valid in a name
            tx.update_layer(layer.id, name=f"retired:{layer.id}")
            gone = tx.collect_garbage() if collect else []
        self.builds.discard(gone)
