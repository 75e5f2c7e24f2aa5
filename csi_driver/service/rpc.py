"""The one wrapper every RPC goes through: guard, timing, logging, status mapping.

As in ember-csi, validation errors, the per-volume "operation in flight" guard
(ABORTED) and the mapping of domain errors to gRPC codes live here, not in
each RPC body. Nothing a caller sends is logged except ids, and the spec's
secret fields are redacted everywhere.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from csi_driver.errors import DriverError
from csi_driver.locks import KeyedLocks
from csi_driver.logs import request_id
from csi_driver.proto import csi_pb2

log = logging.getLogger("csi_driver.rpc")

F = TypeVar("F", bound=Callable[..., Any])
Observer = Callable[[str, str, float], None]

_observers: list[Observer] = []
MAX_ERROR_MESSAGE = 2048


def add_observer(fn: Observer) -> None:
    """Called with (method, status code name, seconds) after every RPC (metrics)."""
    _observers.append(fn)


def redact(msg: Message) -> dict[str, Any]:
    """A dict of ``msg`` with every field marked ``csi_secret`` replaced."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if fd.GetOptions().Extensions[csi_pb2.csi_secret]:
            out[fd.name] = "***stripped***"
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = dict(value)
        elif fd.message_type is not None and fd.is_repeated:
            out[fd.name] = [redact(v) for v in value]
        elif fd.message_type is not None:
            out[fd.name] = redact(value)
        else:
            out[fd.name] = value
    return out


def _subject(request: Message) -> str:
    for field in ("volume_id", "source_volume_id", "snapshot_id", "group_snapshot_id", "name"):
        if field in request.DESCRIPTOR.fields_by_name:
            value = getattr(request, field)
            if value:
                return f"{field}={value[:80]!r}"
    return ""


def _disk_full(e: OSError) -> str:
    """RESOURCE_EXHAUSTED's message for a write the disk had no room for."""
    where = os.path.dirname(str(e.filename or "")) or "/"
    try:
        st = os.statvfs(where)
        figures = f": {st.f_bavail * st.f_frsize >> 20} MiB free of {st.f_blocks * st.f_frsize >> 20} MiB"
    except OSError:
        figures = ""
    return f"the node's disk is full{figures} ({os.strerror(e.errno or 0)}); free space on the node"


def rpc(guard: Callable[[Any], Iterable[str]] | None = None) -> Callable[[F], F]:
    """Decorate a servicer method ``(self, request, context)``.

    ``guard`` names the keys (volume ids, names) the call must own; if another
    call owns one of them, this one fails with ABORTED at once, as the spec asks.
    """

    def wrap(fn: F) -> F:
        method = fn.__name__

        @functools.wraps(fn)
        def handler(self: Any, request: Message, context: grpc.ServicerContext) -> Any:
            rid = uuid.uuid4().hex[:12]
            token = request_id.set(rid)
            start = time.monotonic()
            code, message, response = grpc.StatusCode.OK, "", None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request %s", method, redact(request))
            locks: KeyedLocks = self.locks
            try:
                keys = [k for k in (guard(request) if guard else ()) if k]
                with locks.try_hold(*keys) as owned:
                    if not owned:
                        code = grpc.StatusCode.ABORTED
                        message = f"an operation on {', '.join(keys)} is already in progress"
                    else:
                        response = fn(self, request, context)
            except DriverError as e:
                # bounded: a message echoing a huge request must not exceed gRPC's trailer limit
                code, message = getattr(grpc.StatusCode, e.code), str(e)[:MAX_ERROR_MESSAGE]
                if e.code == "INTERNAL":
                    log.error("%s failed: %s", method, e)
            except Exception as e:  # never a traceback to the caller
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    # a full disk is named, with the figures, so the caller can act on it
                    code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, _disk_full(e)
                else:
                    log.exception("%s crashed", method)
                    code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"
            elapsed = time.monotonic() - start
            log.info(
                "rpc",
                extra={
                    "rpc": method,
                    "subject": _subject(request),
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 2),
                    "request_id": rid,
                    "error": message,
                },
            )
            for observe in _observers:
                observe(method, code.name, elapsed)
            request_id.reset(token)
            if code is not grpc.StatusCode.OK:
                context.abort(code, message)
            return response

        return handler  # type: ignore[return-value]

    return wrap
