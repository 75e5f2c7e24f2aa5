"""Exported snapshots deleted while their registry could not be reached.

DeleteSnapshot of an exported snapshot deletes its manifest from its registry. A
registry that cannot be reached (refused, timed out, 5xx) must not fail the call:
the csi-snapshotter would retry it for ever and the VolumeSnapshot could not be
deleted until the registry is back. So the deletion is recorded in the store
(``pending_deletes``: the snapshot's reference, its manifest's digest when known,
when, retries so far, the last error; never a credential) in the transaction that
deletes the local snapshot, and the call answers OK. ``retry`` deletes the manifest
once the registry is back; done, or the manifest already gone, removes the record.
A snapshot with a deletion pending is listed nowhere and restores nowhere here.

The request's credentials are kept in memory only, by snapshot id. After a restart a
retry asks the registry anonymously; one that wants a login stays pending with
``credentials are needed`` in its last error (logged once), until a DeleteSnapshot of
the same id gives credentials again.

When retries run, and on which thread, is the caller's business (service/pending_deletes.py):
``due`` says which are due, ``retry`` does one and never raises for a registry failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from csi_driver.engine.transfers import Transfers
from csi_driver.errors import DriverError
from csi_driver.registry.client import PermissionDenied, Unauthenticated
from csi_driver.registry.credentials import Credentials
from csi_driver.store import PendingDelete, Store

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 10.0  # the first retry waits this long; each failure doubles it
MAX_RETRY_SECONDS = 600.0  # up to this


class PendingDeletes:
    def __init__(self, store: Store, transfers: Transfers) -> None:
        self.store = store
        self.transfers = transfers
        self.first = FIRST_RETRY_SECONDS
        self.longest = MAX_RETRY_SECONDS
        self._lock = threading.Lock()
        self._credentials: dict[str, Credentials | None] = {}  # in memory only: never written
        self._next: dict[str, float] = {}  # monotonic time a retry is due; absent: due now
        self._told: set[str] = set()  # snapshots whose want of credentials was logged
        self.retries: Counter[str] = Counter()  # "completed" / "failed", since the process started

    def get(self, snapshot_id: str) -> PendingDelete | None:
        with self.store.read() as tx:
            return tx.pending_delete(snapshot_id)

    def all(self) -> list[PendingDelete]:
        with self.store.read() as tx:
            return tx.pending_deletes()

    def recorded(self, pending: PendingDelete, credentials: Credentials | None) -> None:
        """``pending`` was recorded (or was already): its first retry comes after ``first``
        seconds, with ``credentials`` (kept in memory only)."""
        with self._lock:
            self._credentials[pending.snapshot_id] = credentials
            self._next[pending.snapshot_id] = time.monotonic() + self.first
        log.warning(
            "snapshot %s deleted; its registry cannot be reached, so its manifest is deleted once "
            "it is back (retried in the background): %s",
            pending.snapshot_id,
            pending.last_error,
        )

    def asked_again(self, snapshot_id: str, credentials: Credentials | None) -> None:
        """A DeleteSnapshot of a snapshot whose deletion is pending: its credentials, if it
        gives any, replace those kept, and the retry is due now."""
        with self._lock:
            if credentials is not None or snapshot_id not in self._credentials:
                self._credentials[snapshot_id] = credentials
                self._told.discard(snapshot_id)
            self._next.pop(snapshot_id, None)

    def due(self) -> list[str]:
        """The snapshots whose retry is due now (after a restart: all of them)."""
        pending = self.all()
        now = time.monotonic()
        with self._lock:
            return [p.snapshot_id for p in pending if self._next.get(p.snapshot_id, 0.0) <= now]

    def retry(self, snapshot_id: str) -> bool:
        """Try to delete the manifest once; True when the deletion is done (the record
        goes). A failure is recorded as the last error, and the next retry waits twice
        as long as the one before (``first`` to ``longest`` seconds)."""
        pending = self.get(snapshot_id)
        if pending is None:
            return True
        with self._lock:
            known = snapshot_id in self._credentials
            credentials = self._credentials.get(snapshot_id)
        try:
            self.transfers.delete_manifest(snapshot_id, pending.digest, credentials)
        except Exception as e:  # whatever it was, the deletion stays pending and backs off
            self._failed(pending, e, known)
            return False
        with self.store.tx() as tx:
            tx.delete_pending_delete(snapshot_id)
        with self._lock:
            self._credentials.pop(snapshot_id, None)
            self._next.pop(snapshot_id, None)
            self._told.discard(snapshot_id)
            self.retries["completed"] += 1
        log.info(
            "snapshot %s: its manifest is deleted from its registry (after %d failed retries)",
            snapshot_id,
            pending.attempts,
        )
        return True

    def _failed(self, pending: PendingDelete, error: Exception, had_credentials: bool) -> None:
        sid = pending.snapshot_id
        message = str(error) if isinstance(error, DriverError) else f"{type(error).__name__}: {error}"
        login = isinstance(error, (Unauthenticated, PermissionDenied)) and not had_credentials
        if login:
            message = (
                f"credentials are needed: the driver restarted since the DeleteSnapshot, and "
                f"credentials are kept in memory only; a DeleteSnapshot of {sid} with them "
                f"retries it ({message})"
            )
        with self.store.tx() as tx:
            tx.retried_delete(sid, message)
        wait = min(self.longest, self.first * 2 ** min(pending.attempts + 1, 30))
        with self._lock:
            self._next[sid] = time.monotonic() + wait
            self.retries["failed"] += 1
            tell = login and sid not in self._told
            if login:
                self._told.add(sid)
        if tell:
            log.warning("snapshot %s: its manifest stays in its registry: %s", sid, message)
        elif not login:
            log.info(
                "snapshot %s: its manifest could not be deleted yet (retry %d, next in %.0f s): %s",
                sid,
                pending.attempts + 1,
                wait,
                message[:300],
            )
