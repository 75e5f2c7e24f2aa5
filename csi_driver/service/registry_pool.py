"""Calls that reach an OCI registry run here, never on a gRPC worker of their own.

A registry may be slow, trickle, or never answer, and a big pull or push may
take longer than any caller waits. So a call that needs one (CreateVolume that
pulls, CreateSnapshot that pushes, DeleteSnapshot of an exported snapshot, the
central instance's lookups) is admitted only while fewer than ``size`` such
transfers run: the others are answered ABORTED at once, which the
external-provisioner and the csi-snapshotter take as "in progress" and retry.

An admitted transfer runs on one of the pool's daemon threads under a
``cancel.Cancel`` token with a deadline of its own, ``transfer_timeout``
seconds (``--registry-transfer-timeout``), not its caller's. The gRPC worker
waits for it until the caller's deadline (less ``ANSWER_MARGIN``) or until the
caller goes away, then answers ABORTED ("... is still running in the
background; retry") and the transfer goes on. Only its own deadline and the
driver stopping (``close``) cancel it: its sockets are shut down, it fails by
its ordinary failure path, nothing is installed.

A transfer holds its keys (``name:<volume name>``, ``snapname:<snapshot
name>``, a snapshot id) until its thread has finished. A call with a key that
a running transfer holds is the caller's retry: it attaches, waiting for that
transfer within its own deadline (ABORTED "still running" again if that
passes). When the transfer succeeded, the call then runs its own ``fn`` as a
new transfer; every ``fn`` is idempotent, so it finds what the transfer made
(the volume, the pushed snapshot) and returns it without moving a blob again.
When the transfer failed, the attached call answers with the transfer's error,
once: it is the caller's only way to hear why (a corrupt blob, refused
credentials, the transfer deadline), and re-running it at once would repeat a
long download to the same end. A call that comes after the failed transfer
has finished finds no key held and starts afresh. A call without keys (the
central instance's lookup of a snapshot) is one no retry can find, so its
transfer is cancelled when its caller stops waiting.

Probe, NodeGetCapabilities, the node calls and everything else never wait for
a registry, and no gRPC worker is held past its caller's deadline.
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
REGISTRY_CALLS = 4  # registry transfers at once (of the server's 16 gRPC workers)
TRANSFER_TIMEOUT = 3600.0  # seconds a transfer may take (--registry-transfer-timeout)
ANSWER_MARGIN = 0.25  # the worker answers this long before the caller's deadline, so it hears why
NO_DEADLINE = 1e7  # grpc reports a call without a deadline as one this far away, or more
POLL = 0.05  # seconds between a waiting worker's looks at its caller


class _Job:
    def __init__(self, fn: Callable[[], Any], what: str, keys: list[str], seconds: float, limit: str) -> None:
        self.fn = fn
        self.what = what
        self.keys = keys
        self.started = time.monotonic()
        expired = f"it ran for {seconds:g} s, {limit}"
        self.token = cancel.Cancel(self.started + seconds, what, expired)
        # the deadline cancels it even while a read blocks (a registry that trickles a byte
        # at a time never lets the transfer's own checks run); stopped when it ends
        self.timer = threading.Timer(seconds, self.token.cancel, (expired,))
        self.timer.daemon = True
        self.context = contextvars.copy_context()  # the request id of the call's log lines
        self.done = threading.Event()
        self.waiters = 0  # gRPC workers waiting for it now (under the pool's lock)
        self.result: Any = None
        self.error: BaseException | None = None


class _Caller:
    """What a waiting gRPC worker watches: its caller's deadline, and whether it went away."""

    def __init__(self, context: Any) -> None:
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining >= NO_DEADLINE:
            remaining = None
        self.deadline = None if remaining is None else time.monotonic() + max(0.0, remaining - ANSWER_MARGIN)
        self.gone = threading.Event()
        if context is not None:
            context.add_callback(self.gone.set)

    def waits(self) -> bool:
        return not self.gone.is_set() and (self.deadline is None or time.monotonic() < self.deadline)


class RegistryPool:
    def __init__(self, size: int = REGISTRY_CALLS, transfer_timeout: float = TRANSFER_TIMEOUT) -> None:
        if transfer_timeout <= 0:
            raise ValueError("a registry transfer needs a timeout of more than 0 seconds")
        self.size = size
        self.transfer_timeout = transfer_timeout
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._jobs: set[_Job] = set()  # admitted and not finished (a cancelled one too)
        self._keys: dict[str, _Job] = {}
        self._idle = threading.Condition(self._lock)
        self._closed = False

    def running(self) -> int:
        """Transfers admitted and not finished, those no caller waits for too."""
        with self._lock:
            return len(self._jobs)

    def busy(self, key: str) -> bool:
        """Whether a running transfer holds ``key`` (a retry of it must come through ``run``)."""
        with self._lock:
            return key in self._keys

    @property
    def closed(self) -> bool:
        """Whether the driver is stopping (``close``): transfers are refused and cancelled."""
        return self._closed

    def run(
        self,
        fn: Callable[[], T],
        context: Any,
        what: str,
        keys: Iterable[str] = (),
        timeout: float | None = None,
    ) -> T:
        """``fn()`` as a transfer on a pool thread; its answer if it ends before the
        deadline of the gRPC ``context`` (None: no deadline), else ABORTED while it goes on.
        ``timeout``: a deadline of its own shorter than ``transfer_timeout``."""
        keys = [k for k in keys if k]
        caller = _Caller(context)
        seconds = self.transfer_timeout if timeout is None else min(timeout, self.transfer_timeout)
        job, new = self._enter(fn, what, keys, seconds, attach=True)
        if not new:  # the caller's retry
            log.info("%s: waiting for the transfer of it already running", what)
            self._wait(job, caller)  # its error, once; its success: fn finds what it made
            job, _ = self._enter(fn, what, keys, seconds, attach=False)  # no waiting in a loop
        return self._wait(job, caller)  # type: ignore[no-any-return]

    def _enter(
        self, fn: Callable[[], Any], what: str, keys: list[str], seconds: float, attach: bool
    ) -> tuple[_Job, bool]:
        """(a new transfer of ``fn``, True), or (the running one that holds one of ``keys``,
        False) if ``attach``, else ABORTED."""
        with self._lock:
            if self._closed:
                raise Unavailable("the driver is stopping; retry")
            running = next((self._keys[k] for k in keys if k in self._keys), None)
            if running is None:
                return self._admit(fn, what, keys, seconds), True
            if not attach:
                raise Aborted(f"{running.what} is still running in the background; retry")
            running.waiters += 1
            return running, False

    def _admit(self, fn: Callable[[], Any], what: str, keys: list[str], seconds: float) -> _Job:
        """A new transfer (the pool's lock held), with one waiter: its caller; ABORTED
        when ``size`` run."""
        if len(self._jobs) >= self.size:
            raise Aborted(f"{self.size} registry transfers are already running on this node; retry later")
        limit = "its --registry-transfer-timeout" if seconds >= self.transfer_timeout else "its time limit"
        job = _Job(fn, what, keys, seconds, limit)
        job.waiters = 1
        self._jobs.add(job)
        self._keys.update((k, job) for k in keys)
        job.timer.start()
        if len(self._threads) < self.size:
            t = threading.Thread(target=self._work, name=f"registry-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._queue.put(job)
        return job

    def _wait(self, job: _Job, caller: _Caller) -> Any:
        """``job``'s result or error; ABORTED if the caller stops waiting first."""
        while not job.done.wait(POLL) and caller.waits():
            pass
        with self._lock:
            job.waiters -= 1
        if not job.done.is_set() and not job.keys:  # no retry could find it: its result would be lost
            job.token.cancel("its caller stopped waiting")
            raise Aborted(f"{job.what} was cancelled (its caller stopped waiting); retry")
        if not job.done.is_set():
            moved = job.token.moved
            so_far = f" ({moved / (1 << 20):.1f} MiB moved so far)" if moved else ""
            log.info(
                "%s: still running in the background%s; the caller's retry waits for it", job.what, so_far
            )
            raise Aborted(f"{job.what} is still running in the background{so_far}; retry")
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.result = job.context.run(self._run, job)
            except BaseException as e:  # handed to the waiting caller, or its retry
                job.error = e
            finally:
                job.timer.cancel()
                with self._lock:
                    job.done.set()
                    self._jobs.discard(job)
                    for key in job.keys:
                        if self._keys.get(key) is job:
                            del self._keys[key]
                    unheard = job.waiters == 0
                    self._idle.notify_all()
                if unheard:
                    self._log_background_end(job)

    @staticmethod
    def _run(job: _Job) -> Any:
        with cancel.running(job.token):
            job.token.check()  # it waited in the queue past its deadline
            return job.fn()

    @staticmethod
    def _log_background_end(job: _Job) -> None:
        took = time.monotonic() - job.started
        if job.error is None:
            log.info("%s finished in the background in %.1f s; the caller's retry finds it", job.what, took)
        else:
            log.warning("%s failed in the background after %.1f s: %s", job.what, took, job.error)

    def close(self, wait: float = 5.0) -> None:
        """Refuse new transfers, cancel the running ones (those in the background too),
        and give them ``wait`` seconds to clean up (their threads are daemons: the
        process never waits for one that does not)."""
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
