"""What every doctor check returns: a named ``Check`` with a status (``OK``,
``WARN`` or ``FAIL``), what was found and, when it is not OK, how to fix it."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""


def fmt_gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
