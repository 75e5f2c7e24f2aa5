"""The overlay backend's mutable volume parameters (ControllerModifyVolume,
VolumeAttributesClass): each changes something real about a volume's upper image.

| key | values | effect |
|---|---|---|
| ``reservedPercent`` | 0..50 | ext4 blocks reserved for root (``tune2fs -m``): what the pod can fill |
| ``discard`` | true/false | freed blocks go back to the host at once (thin stays thin) or not |
| ``commitSeconds`` | 1..300 | ext4 journal commit interval: durability window vs write throughput |
| ``readAheadKiB`` | 0..16384 | read-ahead of the volume's loop device (file system and block volumes) |

Applied by ``OverlayLoopBackend.tune``: at once to what is mounted or attached, to
the image where the file system keeps it, and again at every later stage.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver.errors import InvalidArgument

BLOCK = "block"
MODIFIABLE = frozenset({"reservedPercent", "discard", "commitSeconds", "readAheadKiB"})
FS_ONLY = frozenset({"reservedPercent", "discard", "commitSeconds"})
EXT4_ONLY = frozenset({"reservedPercent", "commitSeconds"})
RANGES = {"reservedPercent": (0, 50), "commitSeconds": (1, 300), "readAheadKiB": (0, 16384)}


def check(params: Mapping[str, str], fs_type: str) -> None:
    """Raise InvalidArgument naming the first value a layer of ``fs_type`` cannot take
    ('' when the kind is not known: only the values are checked)."""
    for key, value in params.items():
        if key not in MODIFIABLE:
            raise InvalidArgument(f"unknown mutable parameters {[key]}; supported: {sorted(MODIFIABLE)}")
        if key in FS_ONLY and fs_type == BLOCK:
            raise InvalidArgument(f"{key} applies to file system volumes only")
        if key == "discard" and value not in ("true", "false"):
            raise InvalidArgument("discard must be 'true' or 'false'")
        if key in RANGES:
            lo, hi = RANGES[key]
            if not (value.isascii() and value.isdigit()) or not lo <= int(value) <= hi:
                raise InvalidArgument(f"{key} must be an integer from {lo} to {hi}")
        if key in EXT4_ONLY and fs_type not in ("ext4", ""):
            raise InvalidArgument(f"{key} applies to ext4 volumes only")
