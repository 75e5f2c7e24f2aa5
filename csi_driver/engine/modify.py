"""Mutable volume parameters (ControllerModifyVolume, VolumeAttributesClass).

Which parameters there are, and what each does, is the layer backend's business:
it names them (``capabilities.modifiable``), checks their values (``check_tune``)
and applies them (``tune``). Applied at once when the volume is in use, and at
every later stage.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver.engine.records import Records
from csi_driver.errors import InvalidArgument
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.store import Store, Volume


def validate_mutable(params: Mapping[str, str], backend: LayerBackend, fs_type: str) -> dict[str, str]:
    """Check every key and value for a volume of ``fs_type`` ('' when the volume is not
    known here); raise InvalidArgument naming the first bad one."""
    offered = backend.capabilities.modifiable
    unknown = sorted(set(params) - offered)
    if unknown and not offered:
        raise InvalidArgument(
            f"mutable parameters {unknown}: the {backend.name} backend has no parameters to modify"
        )
    if unknown:
        raise InvalidArgument(f"unknown mutable parameters {unknown}; supported: {sorted(offered)}")
    backend.check_tune(params, fs_type)
    return dict(params)


class Modifier:
    def __init__(self, store: Store, backend: LayerBackend, records: Records) -> None:
        self.store = store
        self.backend = backend
        self.records = records

    def modify_volume(self, volume_id: str, params: dict[str, str]) -> Volume:
        v = self.records.volume(volume_id)
        validate_mutable(params, self.backend, v.fs_type)
        with self.store.tx() as tx:
            tx.update_volume(volume_id, mutable={**v.mutable, **params})
        v = self.records.volume(volume_id)
        self.apply(v)
        return v

    def apply(self, v: Volume) -> None:
        """Apply the volume's mutable parameters: at once to what is mounted or
        attached, and what the file system keeps to its image."""
        if v.mutable:
            self.backend.tune(self.records.upper_of(v), v.mutable)
