"""Where the overlay backend keeps layers under the state dir. Only engine-made
ids and backend-made link names become path parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csi_driver.ids import ID_RE, LINK_RE


@dataclass(frozen=True)
class Layout:
    """Paths of the overlay backend.

    ``layers/<id>/image`` is a sparse ext4/xfs image holding ``upper/`` (the
    layer's files) and ``work/`` (overlayfs scratch); it is loop-mounted at
    ``layers/<id>/mnt``. ``l/<link>`` is a short symlink to ``mnt/upper`` so a
    deep ``lowerdir=`` stays under one page, as in moby's overlay2.
    """

    root: Path

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def links(self) -> Path:
        return self.root / "l"

    @property
    def empty(self) -> Path:
        """An empty directory: the lowest lower of every overlay."""
        return self.root / "empty"

    @property
    def spares(self) -> Path:
        """Empty upper images built ahead of CreateVolume (spares.py)."""
        return self.root / "spare"

    def layer_dir(self, layer_id: str) -> Path:
        if not ID_RE.match(layer_id):
            raise ValueError(f"bad layer id {layer_id!r}")
        return self.layers / layer_id

    def image(self, layer_id: str) -> Path:
        return self.layer_dir(layer_id) / "image"

    def mnt(self, layer_id: str) -> Path:
        return self.layer_dir(layer_id) / "mnt"

    def upper(self, layer_id: str) -> Path:
        """A layer's files: what its link points to and what an overlay stacks."""
        return self.mnt(layer_id) / "upper"

    def link(self, link: str) -> Path:
        if not LINK_RE.match(link):
            raise ValueError(f"bad link name {link!r}")
        return self.links / link

    def ensure(self) -> None:
        for d in (self.layers, self.links, self.empty, self.spares):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
