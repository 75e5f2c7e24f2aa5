"""How the operator commands print: a human table (or ``key  value`` fields) by
default, JSON with ``--json``; sizes and times in human units; and a failure as
one line on stderr, ``error: CODE: message``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any


class CliError(Exception):
    """A failure to report as ``error: CODE: message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def print_error(code: str, message: str) -> None:
    print(f"error: {code}: {message}", file=sys.stderr)


def fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"  # unreachable


def fmt_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [[h.ljust(w) for h, w in zip(headers, widths, strict=True)]]
    lines += [[c.ljust(w) for c, w in zip(r, widths, strict=True)] for r in cells]
    return "\n".join("  ".join(line).rstrip() for line in lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> int:
    """Print ``data`` as JSON with ``--json``, else the text ``human()`` makes; exit status 0."""
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        text = human()
        if text:
            print(text)
    return 0
