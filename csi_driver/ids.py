"""Ids the driver makes: only these ever become parts of a path."""

from __future__ import annotations

import re
import secrets

ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return secrets.token_hex(16)


# Volume and local snapshot ids name the node that made them (``vol-<32hex>@<node>``):
# volumes are node-local, so a clone or restore sent to another node can say where the
# source lives. The tag is only a node id that is safe in a path component.
NODE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
NODE_RE = re.compile(rf"^{NODE_PATTERN}$")
MAX_ISSUED_ID = 128  # CSI: an id of at most 128 bytes
_TAGGED_RE = re.compile(rf"^([a-z]+-[0-9a-f]{{32}})@({NODE_PATTERN})$")


def issued_id(prefix: str, node_id: str) -> str:
    """A new id ``<prefix><32hex>@<node_id>``; the plain ``<prefix><32hex>`` when the
    node id is not path-safe or the tagged id would exceed 128 bytes."""
    plain = prefix + new_id()
    tagged = f"{plain}@{node_id}"
    if NODE_RE.match(node_id) and len(tagged.encode()) <= MAX_ISSUED_ID:
        return tagged
    return plain


def node_of(issued: str) -> str:
    """The node an id was made on ('' for an untagged id or one not of this form)."""
    m = _TAGGED_RE.match(issued)
    return m.group(2) if m else ""


def untagged(issued: str) -> str:
    """The id without its node tag (``snap-<32hex>``: an OCI tag cannot hold '@')."""
    m = _TAGGED_RE.match(issued)
    return m.group(1) if m else issued


LINK_RE = re.compile(r"^[A-Z0-9]{10}$")
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_link() -> str:
    """A layer's short link name (``l/<link>`` keeps deep overlay options under a page)."""
    return "".join(secrets.choice(_LINK_ALPHABET) for _ in range(10))
