"""Calls that reach an OCI registry run here, never on a gRPC worker of their own.

A registry may be slow, trickle, or never answer. So a call that needs one
(CreateVolume that pulls, CreateSnapshot that pushes, DeleteSnapshot of an
exported snapshot, the central instance's lookups) is admitted only while
fewer than ``size`` such calls run: the others are answered ABORTED at once,
which the external-provisioner retries in the background and the
csi-snapshotter retries. An admitted call runs on one of the pool's daemon
threads under a ``cancel.Cancel`` token whose deadline is the caller's gRPC
deadline. The gRPC worker waits for it only until then, or until the caller
goes away or the driver stops: then the token is cancelled (the transfer's
sockets are shut down, it fails by its ordinary failure path, nothing is
installed) and the worker answers at once. Until the transfer thread has
finished its cleanup, its slot and its keys (the volume or snapshot name)
stay taken, so a retry cannot race it. Probe, NodeGetCapabilities, the node
calls and everything else never wait for a registry.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from csi_driver.errors import Aborted, Unavailable
from csi_driver.registry import cancel

log = logging.getLogger(__name__)

T = TypeVar("T")
REGISTRY_CALLS = 4  # registry-bound calls at once (of the server's 16 gRPC workers)
ANSWER_MARGIN = 0.25  # the transfer ends this long before the caller's deadline, so it hears why
NO_DEADLINE = 1e7  # grpc reports a call without a deadline as one this far away, or more


class _Job:
    def __init__(self, fn: Callable[[], Any], token: cancel.Cancel, keys: list[str]) -> None:
        self.fn = fn
        self.token = token
        self.keys = keys
        self.context = contextvars.copy_context()  # the request id of the call's log lines
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class RegistryPool:
    def __init__(self, size: int = REGISTRY_CALLS) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._jobs: set[_Job] = set()  # admitted and not finished (a cancelled one too)
        self._keys: set[str] = set()
        self._idle = threading.Condition(self._lock)
        self._closed = False

    def running(self) -> int:
        with self._lock:
            return len(self._jobs)

    def run(self, fn: Callable[[], T], context: Any, what: str, keys: Iterable[str] = ()) -> T:
        """``fn()`` on a pool thread, within the deadline of the gRPC ``context`` (None: none)."""
        keys = [k for k in keys if k]
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining >= NO_DEADLINE:
            remaining = None
        deadline = None if remaining is None else time.monotonic() + max(0.0, remaining - ANSWER_MARGIN)
        token = cancel.Cancel(deadline, what)
        job = _Job(fn, token, keys)
        with self._lock:
            if self._closed:
                raise Unavailable("the driver is stopping; retry")
            busy = [k for k in keys if k in self._keys]
            if busy:
                raise Aborted(f"an operation on {busy[0]} is still running (a registry transfer); retry")
            if len(self._jobs) >= self.size:
                raise Aborted(
                    f"{self.size} registry transfers are already running on this node; retry later"
                )
            self._jobs.add(job)
            self._keys.update(keys)
            if len(self._threads) < self.size:
                t = threading.Thread(target=self._work, name=f"registry-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put(job)
        if context is not None:
            context.add_callback(lambda: job.done.is_set() or token.cancel("the caller went away"))
        while not job.done.wait(0.05):
            if token.cancelled:
                break
            left = token.remaining()
            if left is not None and left <= 0:
                token.cancel("the caller's deadline passed")
                break
        if not job.done.is_set():
            log.warning("%s: cancelled (%s); it ends in the background", what, token.reason)
            token.check()  # raises Cancelled
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.result = job.context.run(self._run, job)
            except BaseException as e:  # handed to the waiting caller
                job.error = e
            finally:
                with self._lock:
                    job.done.set()
                    self._jobs.discard(job)
                    self._keys.difference_update(job.keys)
                    self._idle.notify_all()

    @staticmethod
    def _run(job: _Job) -> Any:
        with cancel.running(job.token):
            job.token.check()  # it waited in the queue past its deadline
            return job.fn()

    def close(self, wait: float = 5.0) -> None:
        """Refuse new transfers, cancel the running ones, and give them ``wait``
        seconds to clean up (their threads are daemons: the process never waits
        for one that does not)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.token.cancel("the driver is stopping")
        end = time.monotonic() + wait
        with self._lock:
            while self._jobs and time.monotonic() < end:
                self._idle.wait(max(0.0, end - time.monotonic()))
            left = len(self._jobs)
            for _ in self._threads:
                self._queue.put(None)
        if left:
            log.warning("%d registry transfers still cleaning up at stop", left)
