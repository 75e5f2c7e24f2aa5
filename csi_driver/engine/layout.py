"""Where things live under the state dir. Only engine-made ids become path parts."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ID_RE = re.compile(r"^[0-9a-f]{32}$")
LINK_RE = re.compile(r"^[A-Z0-9]{10}$")
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_id() -> str:
    return secrets.token_hex(16)


def new_link() -> str:
    return "".join(secrets.choice(_LINK_ALPHABET) for _ in range(10))


@dataclass(frozen=True)
class Layout:
    """Paths of the state dir.

    ``layers/<id>/image`` is a sparse ext4/xfs image holding ``upper/`` (the
    layer's files) and ``work/`` (overlayfs scratch); it is loop-mounted at
    ``layers/<id>/mnt``. ``l/<link>`` is a short symlink to ``mnt/upper`` so a
    deep ``lowerdir=`` stays under one page, as in moby's overlay2.
    """

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def lockfile(self) -> Path:
        return self.root / "lock"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def links(self) -> Path:
        return self.root / "l"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def ephemeral(self) -> Path:
        """Private staging dirs of ephemeral inline volumes."""
        return self.root / "ephemeral"

    @property
    def empty(self) -> Path:
        """An empty directory: the lowest lower of every overlay."""
        return self.root / "empty"

    def layer_dir(self, layer_id: str) -> Path:
        if not ID_RE.match(layer_id):
            raise ValueError(f"bad layer id {layer_id!r}")
        return self.layers / layer_id

    def image(self, layer_id: str) -> Path:
        return self.layer_dir(layer_id) / "image"

    def mnt(self, layer_id: str) -> Path:
        return self.layer_dir(layer_id) / "mnt"

    def link(self, link: str) -> Path:
        if not LINK_RE.match(link):
            raise ValueError(f"bad link name {link!r}")
        return self.links / link

    def ensure(self) -> None:
        for d in (self.root, self.layers, self.links, self.tmp, self.empty, self.ephemeral):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
