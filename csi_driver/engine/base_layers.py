"""Named, read-only base layers imported by operators (golden volumes)."""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver.engine import host
from csi_driver.engine.core import EngineCore, MiB
from csi_driver.engine.layers import (
    build_image,
    image_size_for,
    populate_from_tar,
)
from csi_driver.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
)
from csi_driver.store import Layer

log = logging.getLogger(__name__)


class BaseLayerOps(EngineCore):
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
                used = host.tree_bytes(root / "upper")
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
                used_bytes=used,
                name=name,
            )
            with self.store.tx() as tx:
                tx.add_layer(layer)
                self._install(layer_dir, layer.id)
            self._link(layer)
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
        self._discard_layers(gone)
