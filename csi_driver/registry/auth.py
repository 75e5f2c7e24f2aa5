"""A registry's authentication challenges and its token service, as docker clients
answer them (the distribution token spec).

A registry answers 401 with ``WWW-Authenticate: Basic realm=...`` (send the login
with every request) or ``Bearer realm=URL,service=S,scope=SCOPE`` (ask the token
service at URL for a token of that scope, with the login if there is one, and send
the token). Everything in a challenge and in the token service's answer is
untrusted: the realm must be an http(s) URL, plain HTTP only from a registry reached
over HTTP and on an ``--insecure-registry`` host; the answer is read up to 64 KiB.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

from csi_driver.errors import DriverError, FailedPrecondition
from csi_driver.registry.credentials import Login
from csi_driver.registry.transport import read_capped

MAX_SMALL_BODY = 64 << 10  # an error body or a token answer: more is never read

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')


class Unauthenticated(DriverError):
    code = "UNAUTHENTICATED"


class BadContent(DriverError):
    """The registry sent bytes that are not what was asked for (digest, size, schema)."""

    code = "DATA_LOSS"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic", "bearer" or another, lowercase
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header, or None when there is none."""
    header = header.strip()[:4096]
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m[2] if m[2] is not None else m[3]
        params.setdefault(m[1].lower(), re.sub(r"\\(.)", r"\1", value))
        pos = m.end()
    return Challenge(scheme.lower(), params)


def basic_header(login: Login) -> str:
    return "Basic " + base64.b64encode(f"{login.username}:{login.password}".encode()).decode()


@dataclass
class TokenService:
    """Fetches bearer tokens for one registry ``host`` reached over ``scheme``."""

    session: requests.Session
    host: str
    scheme: str  # how the registry itself is reached: "http" or "https"
    http_hosts: frozenset[str]  # hosts that may be reached over plain HTTP (--insecure-registry)
    login: Login | None

    def check_realm(self, realm: str) -> str:
        """The realm a challenge names, if a token may be asked of it."""
        parts = urlsplit(realm)
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
        if scheme not in ("http", "https") or not netloc:
            raise BadContent(f"registry {self.host}: its token service {realm[:80]!r} is not an http(s) URL")
        if scheme == "http" and not (self.scheme == "http" and netloc in self.http_hosts):
            raise FailedPrecondition(
                f"registry {self.host}: its token service http://{netloc[:80]} is plain HTTP: "
                "nothing is sent there (a token service over HTTP is used only by a registry "
                "reached over HTTP, and only when its host is an --insecure-registry too)"
            )
        return realm

    def token(self, challenge: Challenge, what: str) -> str:
        """A token for what ``challenge`` asks; Unauthenticated when the service refuses."""
        realm = self.check_realm(challenge.params.get("realm", ""))
        params = {k: challenge.params[k] for k in ("service", "scope") if challenge.params.get(k)}
        headers = {"Accept": "application/json"}
        if self.login is not None:
            headers["Authorization"] = basic_header(self.login)
        r = self.session.get(realm, headers=headers, params=params)
        status = r.status_code
        body = read_capped(r, MAX_SMALL_BODY)
        if status != 200:
            # retrying with the same credentials would only lock an account
            raise Unauthenticated(
                f"registry {self.host}: cannot {what}: the token service refused the credentials ({status})"
            )
        if body is None:
            raise BadContent(f"registry {self.host}: the token service's answer exceeds 64 KiB")
        try:
            info = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadContent(f"registry {self.host}: the token service's answer is not JSON") from e
        token = (info.get("token") or info.get("access_token")) if isinstance(info, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise Unauthenticated(f"registry {self.host}: cannot {what}: the token service gave no token")
        return token
