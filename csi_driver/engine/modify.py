"""Mutable volume parameters (ControllerModifyVolume, VolumeAttributesClass).

Each parameter changes something real about the volume's upper file system:

| key | values | effect |
|---|---|---|
| ``reservedPercent`` | 0..50 | ext4 blocks reserved for root (``tune2fs -m``): what the pod can fill |
| ``discard`` | true/false | freed blocks go back to the host at once (thin stays thin) or not |
| ``commitSeconds`` | 1..300 | ext4 journal commit interval: durability window vs write throughput |
| ``readAheadKiB`` | 0..16384 | read-ahead of the volume's loop device (file system and block volumes) |

Applied at once when the volume is in use, and at every later stage.
"""

from __future__ import annotations

from csi_driver.engine.records import Records
from csi_driver.errors import InvalidArgument
from csi_driver.layerstore.backend import LayerBackend
from csi_driver.store import Store, Volume

MUTABLE_KEYS = ("reservedPercent", "discard", "commitSeconds", "readAheadKiB")
FS_ONLY = {"reservedPercent", "discard", "commitSeconds"}
RANGES = {"reservedPercent": (0, 50), "commitSeconds": (1, 300), "readAheadKiB": (0, 16384)}


def validate_mutable(params: dict[str, str], fs_type: str = "ext4") -> dict[str, str]:
    """Check every key and value; raise InvalidArgument naming the first bad one."""
    unknown = sorted(set(params) - set(MUTABLE_KEYS))
    if unknown:
        raise InvalidArgument(f"unknown mutable parameters {unknown}; supported: {list(MUTABLE_KEYS)}")
    for key, value in params.items():
        if key in FS_ONLY and fs_type == "block":
            raise InvalidArgument(f"{key} applies to file system volumes only")
        if key == "discard" and value not in ("true", "false"):
            raise InvalidArgument("discard must be 'true' or 'false'")
        if key in RANGES:
            lo, hi = RANGES[key]
            if not (value.isascii() and value.isdigit()) or not lo <= int(value) <= hi:
                raise InvalidArgument(f"{key} must be an integer from {lo} to {hi}")
        if key in ("reservedPercent", "commitSeconds") and fs_type not in ("ext4", ""):
            raise InvalidArgument(f"{key} applies to ext4 volumes only")
    return dict(params)


class Modifier:
    def __init__(self, store: Store, backend: LayerBackend, records: Records) -> None:
        self.store = store
        self.backend = backend
        self.records = records

    def modify_volume(self, volume_id: str, params: dict[str, str]) -> Volume:
        v = self.records.volume(volume_id)
        validate_mutable(params, v.fs_type)
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
