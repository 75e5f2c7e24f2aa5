"""Ids the driver makes: only these ever become parts of a path."""

from __future__ import annotations

import re
import secrets

ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return secrets.token_hex(16)


LINK_RE = re.compile(r"^[A-Z0-9]{10}$")
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_link() -> str:
    """A layer's short link name (``l/<link>`` keeps deep overlay options under a page)."""
    return "".join(secrets.choice(_LINK_ALPHABET) for _ in range(10))
