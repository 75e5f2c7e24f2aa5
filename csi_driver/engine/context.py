"""What the engine's components share: its configuration, the shapes of a volume
request and of its stats, and the crash hook each calls at its step boundaries.

The components themselves take what they use explicitly (engine.py wires them):
the store, the backend, ``Records`` (reads), ``LayerBuilds`` (scratch to
installed layer), ``Capacity`` and ``VolumeSizes`` (capacity.py), ``NodeChecks``
(node_checks.py)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.engine.capacity import CapacityPolicy, Space
from csi_driver.layerstore.backend import FsUsage

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
GROUP_PREFIX = "group-"
BLOCK = "block"

# Test-only hook: called with a step name at each crash-relevant boundary.
CrashHook = Callable[[str], None]


def crash_hook_from_env() -> CrashHook:
    """Test-only hooks at step boundaries, from the environment.

    ``OVERLAY_CSI_CRASH_AT=step[:n]`` SIGKILLs the process the n-th (default
    first) time it reaches that step; ``OVERLAY_CSI_SLOW_AT=step:seconds``
    sleeps there (to test draining and concurrency).
    """
    crash = os.environ.get("OVERLAY_CSI_CRASH_AT", "")
    slow = os.environ.get("OVERLAY_CSI_SLOW_AT", "")
    if not crash and not slow:
        return lambda step: None
    crash_name, _, nth = crash.partition(":")
    slow_name, _, seconds = slow.partition(":")
    seen = {"n": 0}

    def hook(step: str) -> None:
        if slow and step == slow_name:
            time.sleep(float(seconds or 1))
        if crash and step == crash_name:
            seen["n"] += 1
            if seen["n"] >= int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


class BadConfig(ValueError):
    """An engine configuration the chosen layer backend cannot serve."""


class Steps:
    """The crash hook, called by every component at its step boundaries; one object
    the components share, so a test may swap the hook of a running engine."""

    def __init__(self, hook: CrashHook | None = None) -> None:
        self.hook = hook or crash_hook_from_env()

    def __call__(self, name: str) -> None:
        self.hook(name)


@dataclass
class EngineConfig:
    state_dir: Path
    node_id: str
    max_volumes: int = 0  # 0: no limit
    max_volume_size: int = 0  # 0: no limit
    max_ephemeral_size: int = GiB  # all inline volumes together; 0: none allowed
    max_snapshots_per_volume: int = 0  # 0: no limit
    max_depth: int = 64
    default_capacity: int = GiB
    min_capacity: int = MiB
    fs_type: str = ""  # a mount volume's when its request names none; "": the backend's default
    backend: str = ""  # how layers are kept (layerstore.backends); "": the state dir's, else the default
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)
    insecure_registries: frozenset[str] = frozenset()  # hosts reached over plain HTTP
    space: Space | None = None  # where layers are kept (free, size); None: the backend's file system
    max_live_copy: int = 0  # the most a capture of a volume in use may copy (no clone); 0: no limit


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    required_bytes: int = 0
    limit_bytes: int = 0
    access_type: str = "mount"
    fs_type: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    mutable: dict[str, str] = field(default_factory=dict)
    source_kind: str = ""  # "", "snapshot" or "volume"
    source_id: str = ""
    base_layer: str = ""
    ephemeral: bool = False


@dataclass(frozen=True)
class VolumeStats(FsUsage):
    """What NodeGetVolumeStats answers: the figures and the volume's condition."""

    abnormal: bool
    message: str
