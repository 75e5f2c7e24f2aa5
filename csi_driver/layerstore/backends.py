"""The layer backends by name: what ``serve --backend NAME`` chooses from.

A new backend is a package under layerstore/ and one row here; the engine and
the servicers learn what it offers from its ``capabilities``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_driver.layerstore import plaindir
from csi_driver.layerstore.backend import Capabilities, LayerBackend
from csi_driver.layerstore.overlay import backend as overlay

DEFAULT = "overlay"


@dataclass(frozen=True)
class Kind:
    """One backend: how to open it, and what it offers before one is opened (doctor)."""

    open: Callable[[Path, bool], LayerBackend]  # (state dir, whether the node overprovisions)
    capabilities: Callable[[], Capabilities]
    about: str


def _overlay(root: Path, overprovisioned: bool) -> LayerBackend:
    # an overprovisioned node's disk may fill: each volume then holds its fixed metadata
    return overlay.OverlayLoopBackend(root, hold_metadata=overprovisioned)


def _plaindir(root: Path, overprovisioned: bool) -> LayerBackend:
    return plaindir.PlainDirBackend(root)


BACKENDS: dict[str, Kind] = {
    "overlay": Kind(_overlay, overlay.capabilities, "ext4/xfs images on loop devices, stacked by overlayfs"),
    "plaindir": Kind(
        _plaindir,
        lambda: plaindir.CAPABILITIES,
        "plain directory trees shown by bind mounts, for development clusters",
    ),
}


def kind(name: str) -> Kind:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown layer backend {name!r}; choose one of {sorted(BACKENDS)}") from None


def open_backend(name: str, root: Path, *, overprovisioned: bool = False) -> LayerBackend:
    """The backend called ``name``, keeping its layers under ``root``."""
    return kind(name).open(root, overprovisioned)
