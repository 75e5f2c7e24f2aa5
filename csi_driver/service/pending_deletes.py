"""Background retries of exported snapshots' deletions that wait for their registry
(engine/pending_deletes.py), in the process that recorded them: a node plugin, or the
central instance.

Every ``interval`` seconds the due ones (each backs off from 10 s to 10 min) are retried
one after another on the registry pool, never on a gRPC worker: keyed by the snapshot
id (a DeleteSnapshot of it meanwhile waits for the retry, then answers OK), under a
deadline of ``RETRY_TIMEOUT`` seconds, and cancelled at SIGTERM with the pool's other
transfers. A full pool leaves them due for the next look.
"""

from __future__ import annotations

import logging

from csi_driver.engine.engine import Engine
from csi_driver.errors import DriverError
from csi_driver.kube.periodic import Periodic
from csi_driver.service.registry_pool import RegistryPool

log = logging.getLogger(__name__)

RETRY_TIMEOUT = 120.0  # seconds one retry may take (a manifest lookup and a delete)
LOOK_SECONDS = 1.0  # how often due retries are looked for


class DeleteRetrier(Periodic):
    what = "retrying the deletions of exported snapshots' manifests"

    def __init__(self, engine: Engine, registry: RegistryPool, interval: float = LOOK_SECONDS) -> None:
        super().__init__(interval, "pending-deletes")
        self.engine = engine
        self.registry = registry

    def once(self) -> int:
        """Retry every due deletion; return how many are done."""
        done = 0
        for snapshot_id in self.engine.deletions_due():
            if self._stop.is_set() or self.registry.closed:
                break
            try:
                done += self.registry.run(
                    lambda sid=snapshot_id: self.engine.retry_deletion(sid),  # type: ignore[misc]
                    None,
                    f"the retried deletion of snapshot {snapshot_id!r}",
                    keys=[snapshot_id],
                    timeout=RETRY_TIMEOUT,
                )
            except DriverError as e:  # the pool is full or stopping: due again at the next look
                log.debug("retry of the deletion of snapshot %s deferred: %s", snapshot_id, e)
        return done
