"""Reference-counted loop mounts of layer images at ``layers/<id>/mnt``."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

from csi_driver import host
from csi_driver.layerstore.overlay.images import mount_options, repair_if_damaged
from csi_driver.layerstore.overlay.layout import Layout
from csi_driver.locks import KeyedLocks


class LayerMounts:
    """A layer is mounted while any staged volume (or a running copy) uses it,
    and unmounted when the last user releases it. Locks are per layer.

    Whether a layer is mounted is asked of the kernel without reading the mount
    table (``host.is_mount_point``), so holding d layers costs no table scans.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._locks = KeyedLocks()
        self._counts: dict[str, int] = {}
        self._devices: dict[str, str] = {}
        self._writable: dict[str, str] = {}  # layer -> its fs type
        self._guard = threading.Lock()

    def acquire(self, layer_id: str, fs_type: str, readonly: bool) -> None:
        mnt = self.layout.mnt(layer_id)
        with self._locks.hold(layer_id):
            if not host.is_mount_point(mnt):
                mnt.mkdir(exist_ok=True)
                image = self.layout.image(layer_id)
                if fs_type == "ext4" and not readonly:
                    repair_if_damaged(image)
                device = host.mount_image(image, mnt, fs_type, mount_options(fs_type, readonly), readonly)
                with self._guard:
                    self._devices[layer_id] = device
            with self._guard:
                self._counts[layer_id] = self._counts.get(layer_id, 0) + 1
                if not readonly:  # a mount adopted at start-up too
                    self._writable[layer_id] = fs_type

    def try_hold(self, layer_id: str) -> AbstractContextManager[bool]:
        """The layer's lock if it is free (True): no mount or unmount of it meanwhile."""
        return self._locks.try_hold(layer_id)

    def release(self, layer_id: str) -> None:
        with self._locks.hold(layer_id):
            with self._guard:
                n = self._counts.get(layer_id, 0) - 1
                if n > 0:
                    self._counts[layer_id] = n
                    return
                self._counts.pop(layer_id, None)
                self._devices.pop(layer_id, None)
                self._writable.pop(layer_id, None)
            host.umount(self.layout.mnt(layer_id))

    def forget(self, layer_id: str) -> None:
        """A removed layer is held by no one (its mount goes with its directory)."""
        with self._guard:
            self._counts.pop(layer_id, None)
            self._devices.pop(layer_id, None)
            self._writable.pop(layer_id, None)

    def device(self, layer_id: str) -> str | None:
        """The loop device under a mounted layer (from the mount table only for a
        mount an earlier process made, and only once while this process holds it:
        the share-out looks at every writable layer several times a second)."""
        with self._guard:
            known = self._devices.get(layer_id)
        if known:
            return known
        device = host.device_of(self.layout.mnt(layer_id))
        with self._guard:
            if device and layer_id in self._counts:  # held: release or forget drops it
                self._devices[layer_id] = device
        return device

    def count(self, layer_id: str) -> int:
        with self._guard:
            return self._counts.get(layer_id, 0)

    def writable(self) -> dict[str, str]:
        """Layers this process holds mounted read-write, with their fs types."""
        with self._guard:
            return dict(self._writable)

    def in_use(self) -> set[str]:
        with self._guard:
            return set(self._counts)
