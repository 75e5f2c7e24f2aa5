"""Registry credentials from a CSI request's secrets, each bound to the registry host
it was given for, as a docker config's ``auths`` map binds them.

A snapshot id, a ``baseLayer`` or a pre-provisioned VolumeSnapshotContent names the
registry a call reaches, and whoever writes those may name any host; so a login is
sent only to the host it names, and a login that names none is refused before
anything is sent. The secrets take one of two forms:

* ``username``, ``password`` and ``registry`` (or ``server``): one login, for the
  host ``registry`` names;
* ``.dockerconfigjson`` (a ``kubernetes.io/dockerconfigjson`` Secret, as the sidecars
  pass its data) or the legacy ``.dockercfg``: one login per host of its ``auths``.

Everything here is untrusted input: a docker config is read up to 64 KiB and its
shape is checked; no message ever repeats a secret value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from csi_driver.errors import FailedPrecondition
from csi_driver.registry.reference import HOST_PATTERN

DOCKER_CONFIG_JSON = ".dockerconfigjson"  # kubernetes.io/dockerconfigjson: {"auths": {HOST: ENTRY}}
DOCKER_CFG = ".dockercfg"  # kubernetes.io/dockercfg (legacy): {HOST: ENTRY}
MAX_DOCKER_CONFIG = 64 << 10
LOGIN_KEYS = ("username", "password", "registry", "server")

_HOST_RE = re.compile(rf"^{HOST_PATTERN}$", re.ASCII)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Login:
    username: str
    password: str = field(repr=False)


def registry_host(value: str) -> str | None:
    """The registry host (HOST[:PORT], lowercased) a secret's ``registry``/``server`` value
    or a docker config key names; ``https://host[:port]/path`` is read as ``host[:port]``,
    as docker reads it. None when it names no host."""
    host = _SCHEME_RE.sub("", value.strip()).split("/", 1)[0].lower()
    return host if _HOST_RE.match(host) else None


@dataclass(frozen=True)
class Credentials:
    """Logins by the registry host (HOST[:PORT], lowercase) each was given for."""

    logins: Mapping[str, Login]

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, str]) -> Credentials | None:
        """The logins a CSI request's secrets give (none: anonymous, None), or
        FAILED_PRECONDITION when they are malformed or name no registry host."""
        configs = [key for key in (DOCKER_CONFIG_JSON, DOCKER_CFG) if key in secrets]
        if configs:
            if len(configs) > 1 or any(secrets.get(key, "").strip() for key in LOGIN_KEYS):
                raise FailedPrecondition(
                    "registry secrets: give one of '.dockerconfigjson', '.dockercfg' or "
                    "'username', 'password' and 'registry', not several"
                )
            return cls(_docker_config(configs[0], secrets[configs[0]]))
        host = _bound_registry(secrets)
        user, password = secrets.get("username", ""), secrets.get("password", "")
        if not user and not password:
            return None
        if not user or not password:
            raise FailedPrecondition("registry secrets need both 'username' and 'password'")
        if not host:
            raise FailedPrecondition(
                "registry secrets: 'username' and 'password' name no registry: add a 'registry' key "
                "(HOST[:PORT], e.g. registry.example.com:5000) naming the registry they are for; "
                "credentials are never sent to a host they were not given for"
            )
        return cls({host: Login(user, password)})

    def for_host(self, host: str) -> Login | None:
        """The login for registry ``host`` (HOST[:PORT]); None: ask it anonymously."""
        return self.logins.get(host.lower())

    @property
    def hosts(self) -> list[str]:
        return sorted(self.logins)


def _bound_registry(secrets: Mapping[str, str]) -> str:
    """The host the secret's ``registry`` (or docker's ``server``) key names; '' for none."""
    named = set()
    for key in ("registry", "server"):
        value = secrets.get(key, "").strip()
        if not value:
            continue
        host = registry_host(value)
        if host is None:
            raise FailedPrecondition(
                f"registry secrets: {key!r} must name a registry host (HOST[:PORT], e.g. "
                f"registry.example.com:5000), not {value[:80]!r}"
            )
        named.add(host)
    if len(named) > 1:
        raise FailedPrecondition("registry secrets: 'registry' and 'server' name different hosts")
    return named.pop() if named else ""


def _docker_config(key: str, text: str) -> dict[str, Login]:
    """The logins of a docker config (``.dockerconfigjson`` or the legacy ``.dockercfg``)."""
    what = f"registry secrets: {key!r}"
    if len(text.encode()) > MAX_DOCKER_CONFIG:
        raise FailedPrecondition(f"{what} exceeds 64 KiB")  # MAX_DOCKER_CONFIG
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        config = None  # the parser's message may quote the text: never repeated
    if not isinstance(config, dict):
        raise FailedPrecondition(f"{what} is not a docker config (a JSON object)")
    entries = config if key == DOCKER_CFG else config.get("auths")
    if not isinstance(entries, dict) or not entries:
        raise FailedPrecondition(f"{what} names no registry: its 'auths' map is missing or empty")
    logins: dict[str, Login] = {}
    for name, entry in entries.items():
        host = registry_host(name)
        if host is None:
            raise FailedPrecondition(
                f"{what}: {name[:80]!r} is not a registry host (HOST[:PORT] or https://HOST[:PORT]/...)"
            )
        login = _entry_login(entry, f"{what}: the entry for {host}")
        if logins.setdefault(host, login) != login:
            raise FailedPrecondition(f"{what} has two different entries for {host}")
    return logins


def _entry_login(entry: Any, what: str) -> Login:
    """An ``auths`` entry's login: its ``auth`` (base64 of USER:PASSWORD) when it has one,
    as docker reads it, else its ``username`` and ``password``."""
    if not isinstance(entry, dict):
        raise FailedPrecondition(f"{what} is not an object")
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise FailedPrecondition(f"{what}: its 'auth' is not a string")
        try:
            decoded = base64.b64decode(auth.strip(), validate=True).decode()
        except (binascii.Error, ValueError):
            decoded = ""
        user, _, password = decoded.partition(":")
        if not user or not password:
            raise FailedPrecondition(f"{what}: its 'auth' is not base64 of USER:PASSWORD")
        return Login(user, password)
    user, password = entry.get("username"), entry.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        raise FailedPrecondition(
            f"{what} has neither 'username' and 'password' nor 'auth' (base64 of USER:PASSWORD)"
        )
    return Login(user, password)
