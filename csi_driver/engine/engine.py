"""The layer engine: volumes as stacks of immutable layers plus one writable upper.

Model (after containerd's overlay snapshotter): every layer lives in
``layers/<id>/image``. A volume owns one *active* layer (its upper); its parent
chain is committed, read-only layers. A snapshot of a detached volume commits
the upper in place (metadata only) and gives the volume a fresh upper on top;
restores and clones are fresh uppers over the same layers. Nothing is copied
except when a staged volume must be frozen and its upper copied, or a chain
deeper than ``max_depth`` is flattened.

The engine knows nothing of gRPC. Callers serialise operations per volume.
"""

from __future__ import annotations

from csi_driver.engine.base_layers import BaseLayerOps
from csi_driver.engine.block import BlockOps
from csi_driver.engine.core import (
    SNAPSHOT_PREFIX,
    VOLUME_PREFIX,
    CrashHook,
    EngineConfig,
    EngineCore,
    GiB,
    MiB,
    VolumeSpec,
    VolumeStats,
    crash_hook_from_env,
)
from csi_driver.engine.ephemeral import EphemeralOps
from csi_driver.engine.expand import ExpandOps
from csi_driver.engine.modify import ModifyOps
from csi_driver.engine.node import NodeOps
from csi_driver.engine.snapshots import SnapshotOps
from csi_driver.engine.volumes import VolumeOps

__all__ = [
    "GiB",
    "MiB",
    "SNAPSHOT_PREFIX",
    "VOLUME_PREFIX",
    "CrashHook",
    "Engine",
    "EngineConfig",
    "VolumeSpec",
    "VolumeStats",
    "crash_hook_from_env",
]


class Engine(
    EphemeralOps, VolumeOps, SnapshotOps, NodeOps, ExpandOps, BlockOps, ModifyOps, BaseLayerOps, EngineCore
):
    """The whole engine: each mixin owns one concern; EngineCore holds the state."""
