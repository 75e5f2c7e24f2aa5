"""OCI references (``registry/repository:tag`` or ``@sha256:...``), parsed strictly.

The grammar is distribution's (github.com/distribution/reference), narrowed:
the registry host is always explicit (no implied docker.io), and the whole
reference is at most 255 characters. Everything that names a registry comes
from outside (StorageClass and VolumeSnapshotClass parameters, snapshot ids,
the CLI), so nothing else in the driver parses one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REFERENCE = 255
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
HOST_PATTERN = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
PATH_PATTERN = rf"{_COMPONENT}(?:/{_COMPONENT})*"
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_REPOSITORY_RE = re.compile(rf"^(?P<host>{HOST_PATTERN})/(?P<path>{PATH_PATTERN})$")
_REFERENCE_RE = re.compile(
    rf"^(?P<host>{HOST_PATTERN})/(?P<path>{PATH_PATTERN})(?::(?P<tag>[\w][\w.-]{{0,127}}))?(?:@(?P<digest>sha256:[a-f0-9]{{64}}))?$",
    re.ASCII,
)


_REPOSITORY_FORM = "HOST[:PORT]/PATH with a lowercase path, e.g. registry.example.com:5000/backups/db"
_REFERENCE_FORM = (
    "HOST[:PORT]/PATH:TAG or HOST[:PORT]/PATH@sha256:DIGEST, e.g. registry.example.com/base/debian:bookworm"
)


class BadReference(ValueError):
    """Not a reference this driver accepts; the message says why."""


def _match(pattern: re.Pattern[str], text: str, what: str, expected: str) -> re.Match[str]:
    """``text`` matched whole, with an explicit registry host, or BadReference."""
    if len(text) > MAX_REFERENCE:
        raise BadReference(f"{what} is at most {MAX_REFERENCE} characters")
    m = pattern.match(text)
    # a first component without '.', ':' or 'localhost' is a path, not a host (docker's rule)
    if not m or not ("." in m["host"] or ":" in m["host"] or m["host"] == "localhost"):
        raise BadReference(f"{text[:80]!r} is not {what}: expected {expected}")
    return m


@dataclass(frozen=True)
class Repository:
    """Where artifacts live: ``host[:port]/path``."""

    host: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        m = _match(_REPOSITORY_RE, text, "a repository", _REPOSITORY_FORM)
        return cls(m["host"], m["path"])

    def __str__(self) -> str:
        return f"{self.host}/{self.path}"

    def at(self, tag: str) -> Reference:
        if not TAG_RE.match(tag):
            raise BadReference(f"{tag[:80]!r} is not a tag")
        return Reference(self, tag, None)


@dataclass(frozen=True)
class Reference:
    """One artifact: a repository and a tag, a digest, or both (the digest wins)."""

    repository: Repository
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        m = _match(_REFERENCE_RE, text, "an image reference", _REFERENCE_FORM)
        if not m["tag"] and not m["digest"]:
            raise BadReference(f"{text[:80]!r} names no tag or digest")
        return cls(Repository(m["host"], m["path"]), m["tag"], m["digest"])

    @property
    def version(self) -> str:
        """What the manifest URL names: the digest when there is one, else the tag."""
        return self.digest or self.tag or ""

    def __str__(self) -> str:
        out = str(self.repository)
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def looks_like_reference(text: str) -> bool:
    """Whether ``text`` is meant as a reference rather than a local name (it has a '/')."""
    return "/" in text
