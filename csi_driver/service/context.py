"""What every servicer shares: the engine, the node's identity and the guard."""

from __future__ import annotations

from dataclasses import dataclass, field

from csi_driver.engine.engine import Engine
from csi_driver.locks import KeyedLocks
from csi_driver.service.registry_pool import RegistryPool

TOPOLOGY_KEY = "topology.overlay.csi.dev/node"


@dataclass
class DriverContext:
    engine: Engine
    driver_name: str
    node_id: str
    version: str
    max_volumes_per_node: int = 0
    hidden_capabilities: frozenset[str] = frozenset()
    kubelet_dir: str = ""  # when set, node paths must resolve under it
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    registry: RegistryPool = field(default_factory=RegistryPool)  # calls that reach a registry
    ready: bool = True

    @property
    def topology(self) -> dict[str, str]:
        return {TOPOLOGY_KEY: self.node_id}
