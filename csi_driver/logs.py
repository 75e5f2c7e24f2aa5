"""Logging setup: text or one JSON object per line, with the RPC fields as keys."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

RPC_FIELDS = ("rpc", "subject", "code", "duration_ms", "request_id", "error")
# The id of the RPC this thread is serving, set by service.rpc for each call.
request_id: ContextVar[str] = ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    """Tag every line logged while serving a call (exec, debug dumps) with its id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = request_id.get()
            if rid:
                record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in RPC_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={getattr(record, k)}"
            for k in RPC_FIELDS
            if hasattr(record, k) and getattr(record, k) not in ("", None)
        ]
        return line + (" " + " ".join(extras) if extras else "")


def level_from(name: str, verbosity: int = 0) -> int:
    """``--log-level`` names, or klog-style ``-v`` (>=4 means debug)."""
    if verbosity >= 4:
        return logging.DEBUG
    return getattr(logging, name.upper(), logging.INFO)


def setup(level: int, fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
