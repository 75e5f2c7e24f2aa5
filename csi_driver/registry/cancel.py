"""How long a registry transfer may take, and how it is stopped.

A transfer runs under a ``Cancel`` token (``running(token)`` sets it for the
thread). The registry client asks it before every request and between the
chunks of a body: a request's timeouts never pass the token's deadline, and
``cancel()`` shuts down every socket the transfer has open, so a read that a
trickling or silent server holds returns at once. What was half done goes by
the ordinary failure paths (a pull installs nothing, its scratch is removed; a
push takes its snapshot back). Without a token (the CLI on a state dir) there
is no deadline, only the per-read timeouts.
"""

from __future__ import annotations

import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from csi_driver.errors import Aborted

_current: contextvars.ContextVar[Cancel | None] = contextvars.ContextVar("registry_cancel", default=None)


class Cancelled(Aborted):
    """The transfer was stopped (its deadline passed, or the driver stops)."""


class Cancel:
    def __init__(
        self,
        deadline: float | None = None,
        what: str = "the registry transfer",
        expired: str = "its deadline passed",
    ) -> None:
        self.deadline = deadline  # time.monotonic() by which the transfer must end, or None
        self.what = what
        self.expired = expired  # the reason given when the deadline passes
        self.reason = ""
        self.moved = 0  # bytes of blobs the transfer has sent or received (registry.progress)
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[Any] = []  # urllib3 connections this transfer sent a request on

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cancel(self, reason: str) -> None:
        """Stop the transfer: later checks raise, and open sockets are shut down."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            connections, self._connections = self._connections, []
        for conn in connections:
            _shutdown(conn)

    def check(self) -> None:
        """Raise ``Cancelled`` if the transfer was cancelled or its deadline passed."""
        if not self._event.is_set():
            left = self.remaining()
            if left is None or left > 0:
                return
            self.cancel(self.expired)
        raise Cancelled(f"{self.what} was cancelled ({self.reason}); retry")

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (a retry's pause), then ``check()``."""
        left = self.remaining()
        self._event.wait(seconds if left is None else max(0.0, min(seconds, left)))
        self.check()

    def watch(self, conn: Any) -> None:
        """Shut ``conn``'s socket down when the transfer is cancelled (now, if it was)."""
        with self._lock:
            if not self._event.is_set():
                self._connections.append(conn)
                return
        _shutdown(conn)


def _shutdown(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def current() -> Cancel | None:
    """The token of the transfer running on this thread, if any."""
    return _current.get()


def check() -> None:
    token = _current.get()
    if token is not None:
        token.check()


@contextmanager
def running(token: Cancel | None) -> Iterator[None]:
    """Run the block as the transfer ``token`` governs."""
    reset = _current.set(token)
    try:
        yield
    finally:
        _current.reset(reset)


def wait_for(lock: threading.Lock, what: str, limit: float) -> None:
    """Take ``lock`` within the current transfer's deadline and ``limit`` seconds, or
    ABORTED: a transfer of the same thing that hangs must not hold this one for ever."""
    token = _current.get()
    end = time.monotonic() + limit
    while True:
        if token is not None:
            token.check()
        left = end - time.monotonic()
        if token is not None and token.remaining() is not None:
            left = min(left, token.remaining() or 0.0)
        if lock.acquire(timeout=max(0.0, min(left, 0.2))):
            return
        if time.monotonic() >= end:
            raise Aborted(f"another transfer of {what} is still running on this node; retry later")
