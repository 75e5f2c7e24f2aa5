"""A registry client for layer blobs and manifests, on the ``oras`` package.

``oras`` gives the distribution API's URLs, its token and basic auth flows and
the request plumbing; this module narrows it to what moving layers needs and
what a driver may not do without:

* every answer is untrusted: a manifest is read up to 4 MiB, checked against
  the OCI schema and, when fetched by digest, against that digest; a blob is
  written no further than its declared size and its sha256 is checked before
  anyone may use it;
* bodies stream both ways (a 1 GiB layer never sits in memory);
* a pull that loses its connection resumes with a ``Range`` request (distribution
  serves them), up to ``RESUMES`` times;
* reads are retried briefly (``ATTEMPTS``), writes are not; a failure is one of
  the driver's errors, with a status code and a message for the operator;
* credentials go to the registry only: never to a log, never to ``~/.docker``
  (``oras`` would read it; this client does not); a login goes to the host it was
  given for (``credentials.Credentials``) and its token service only, any other
  registry is asked anonymously, and nothing is sent to a token service on plain
  HTTP unless the registry itself is reached over HTTP and the service's host is
  an ``--insecure-registry`` too;
* every body is read with a bound: an error body or a token answer up to
  ``MAX_SMALL_BODY`` (64 KiB, the rest is never read), a manifest up to 4 MiB, a
  blob up to its declared size. Every request streams, so nothing is read whole
  behind this module's back; oras' token fetch is replaced by one that does too;
* a transfer runs under the deadline of its ``cancel.Cancel`` token: timeouts
  never pass it, and cancelling shuts the transfer's sockets down.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import oras.auth
import oras.auth.utils
import oras.container
import oras.provider
import oras.schemas
import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool

from csi_driver.errors import DriverError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from csi_driver.registry import cancel
from csi_driver.registry.credentials import Credentials, Login
from csi_driver.registry.progress import CHUNK, Meter, MeteredReader, count_blob
from csi_driver.registry.reference import DIGEST_RE, Repository

log = logging.getLogger("csi_driver.registry")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
MAX_MANIFEST = 4 << 20
MAX_SMALL_BODY = 64 << 10  # an error body or a token answer: more is never read
ATTEMPTS = 3  # a read that fails for want of the registry is tried this often
RESUMES = 3  # a blob download that breaks off is resumed this often
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


class Unauthenticated(DriverError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DriverError):
    code = "PERMISSION_DENIED"


class BadContent(DriverError):
    """The registry sent bytes that are not what was asked for (digest, size, schema)."""

    code = "DATA_LOSS"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: dict[str, Any]


class _Oras(oras.provider.Registry):
    """oras' Registry with requests that time out, fail fast and never read ~/.docker."""

    def __init__(
        self,
        host: str,
        insecure: bool,
        login: Login | None,
        scheme: str,
        http_hosts: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(hostname=host, insecure=insecure, auth_backend=scheme)
        self.auth.load_configs = lambda *a, **k: None  # type: ignore[method-assign]
        self._host = host
        self._http_hosts = http_hosts  # hosts that may be reached over plain HTTP (--insecure-registry)
        # oras reads the token service's answer whole (r.json()): ours reads 64 KiB at most
        self.auth.request_token = self._request_token  # type: ignore[method-assign]
        self.auth.request_anonymous_token = self._request_token  # type: ignore[method-assign]
        self._basic = ""
        if login is not None:
            self.auth.set_basic_auth(login.username, login.password)
            if scheme == "basic":
                raw = f"{login.username}:{login.password}".encode()
                self._basic = "Basic " + base64.b64encode(raw).decode()
        for name in ("request_token", "request_anonymous_token"):  # the token flow's two ways out
            ask = getattr(self.auth, name, None)
            if ask is not None:
                setattr(self.auth, name, self._guarded(ask))

    def _guarded(self, ask: Any) -> Any:
        def guarded(h: Any) -> Any:
            self._check_realm(getattr(h, "realm", None))
            return ask(h)

        return guarded

    def _check_realm(self, realm: Any) -> None:
        """A token service the registry's challenge names (untrusted): https, or plain
        HTTP only from a registry reached over HTTP and on an --insecure-registry host."""
        parts = urlsplit(realm if isinstance(realm, str) else "")
        scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
        if scheme not in ("http", "https") or not netloc:
            raise BadContent(
                f"registry {self._host}: its token service {str(realm)[:80]!r} is not an http(s) URL"
            )
        if scheme == "http" and not (self.prefix == "http" and netloc in self._http_hosts):
            raise FailedPrecondition(
                f"registry {self._host}: its token service http://{netloc[:80]} is plain HTTP: "
                "nothing is sent there (a token service over HTTP is used only by a registry "
                "reached over HTTP, and only when its host is an --insecure-registry too)"
            )

    def do_request(  # type: ignore[override]
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict | None = None,
        json: dict | None = None,
        stream: bool = False,
    ) -> requests.Response:
        headers = dict(headers or {})
        if self._basic:  # sent at once: a streamed body cannot be sent twice after a 401
            headers["Authorization"] = self._basic
        plain = oras.provider.Registry.do_request.__wrapped__  # without oras' 131 s of retries
        # always streamed: requests would read a body whole (a 401's, an error's) otherwise;
        # the callers read what they need of it, bounded, and close it
        r = plain(self, url, method, data, headers, json, True)
        token = getattr(self.auth, "token", None)
        if r.status_code == 401 and token is not None and not hasattr(data, "read"):
            # oras answers every later 401 with the token it has; a token for another
            # scope (pull, not push) or one that expired needs a new one, asked for now
            r.close()
            self.auth.token = None
            r = plain(self, url, method, data, dict(headers), json, True)
        return r

    def _request_token(self, h: oras.auth.utils.authHeader) -> str | None:
        """A bearer token from the service the challenge names, its answer read up to
        64 KiB (oras' own reads it whole); None when it refuses."""
        if not h.realm:
            return None
        realm = h.realm if h.realm.startswith("http") else f"{self.prefix}://{h.realm}"
        params = {k: v for k, v in (("service", h.service), ("scope", h.scope)) if v}
        headers = {"Accept": "application/json"}
        basic = getattr(self.auth, "_basic_auth", None)
        if basic:
            headers["Authorization"] = f"Basic {basic}"
        r = self.session.get(realm, headers=headers, params=params, stream=True, verify=self._tls_verify)
        ok = r.status_code == 200
        body = read_capped(r, MAX_SMALL_BODY)
        if not ok:
            return None
        if body is None:
            raise BadContent(f"registry {self.hostname}: the token service's answer exceeds 64 KiB")
        try:
            info = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadContent(f"registry {self.hostname}: the token service's answer is not JSON") from e
        token = info.get("token") or info.get("access_token") if isinstance(info, dict) else None
        return token if isinstance(token, str) and token else None


class _Watched:
    """A connection that the running transfer's token may shut down (``cancel.Cancel``)."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        token = cancel.current()
        if token is not None:
            token.watch(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def _timeout_session(session: requests.Session) -> None:
    """Requests that time out, and never after the running transfer's deadline."""
    session.mount("http://", _WatchedAdapter())
    session.mount("https://", _WatchedAdapter())
    send = session.request

    def request(method: str, url: str, **kwargs: Any) -> requests.Response:
        connect, read = CONNECT_TIMEOUT, READ_TIMEOUT
        token = cancel.current()
        if token is not None:
            token.check()
            left = token.remaining()
            if left is not None:
                connect, read = min(connect, left), min(read, left)
        kwargs.setdefault("timeout", (connect, read))
        return send(method, url, **kwargs)

    session.request = request  # type: ignore[method-assign]


def read_capped(r: requests.Response, cap: int) -> bytes | None:
    """At most ``cap`` bytes of a streamed body, then closed; None when it is longer
    (the rest is never read)."""
    data = bytearray()
    try:
        for chunk in r.iter_content(16 << 10):
            data += chunk
            if len(data) > cap:
                return None
            cancel.check()
    except (requests.exceptions.RequestException, OSError):
        pass  # what came is what there is: an error body is only a hint
    finally:
        r.close()
    return bytes(data)


class RegistryClient:
    """Blobs and manifests of one repository."""

    def __init__(
        self,
        repository: Repository,
        credentials: Credentials | None = None,
        *,
        insecure: bool = False,
        insecure_hosts: frozenset[str] = frozenset(),
    ) -> None:
        """``insecure``: reach this registry over plain HTTP; ``insecure_hosts``: every
        --insecure-registry host (a token service on plain HTTP must be one of them).
        ``credentials`` give this registry the login for its host, if they have one;
        without, it is asked anonymously."""
        self.repository = repository
        self.where = str(repository)
        self._login = credentials.for_host(repository.host) if credentials is not None else None
        self._withheld = credentials.hosts if credentials is not None and self._login is None else []
        self._insecure = insecure
        self._http_hosts = frozenset(h.lower() for h in insecure_hosts) | (
            {repository.host.lower()} if insecure else frozenset()
        )
        self._reg: _Oras | None = None
        self._container = oras.container.Container(f"{repository.path}:latest", registry=repository.host)

    # ---- connection ---------------------------------------------------------
    def _registry(self) -> _Oras:
        """Connect on first use; the registry's challenge picks the auth flow."""
        if self._reg is None:
            probe = requests.Session()
            _timeout_session(probe)
            r = self._call(lambda: probe.get(self._url("/v2/"), stream=True), "reach it")
            challenge = r.headers.get("WWW-Authenticate", "") if r.status_code == 401 else ""
            r.close()
            basic = challenge.lower().startswith("basic")
            if basic and self._login is None:
                raise Unauthenticated(
                    f"registry {self.repository.host} asks for a username and password: "
                    f"give them in the request's secrets{self._hint()}"
                )
            reg = _Oras(
                self.repository.host,
                self._insecure,
                self._login,
                "basic" if basic else "token",
                self._http_hosts,
            )
            _timeout_session(reg.session)
            self._reg = reg
        return self._reg

    def _hint(self) -> str:
        """Why no credentials were sent, when the request's are for other registries."""
        if not self._withheld:
            return ""
        if len(self._withheld) == 1:
            return f" (the request's credentials are for registry {self._withheld[0]} only)"
        return f" (the request's credentials are for registries {', '.join(self._withheld)} only)"

    def _url(self, path: str) -> str:
        return f"{'http' if self._insecure else 'https'}://{self.repository.host}{path}"

    def _call(self, do: Any, what: str, *, retry: bool = True) -> requests.Response:
        """One request: transport failures and 5xx/429 tried again (reads), then mapped."""
        token = cancel.current()
        for attempt in range(ATTEMPTS if retry else 1):
            try:
                r = do()
            except requests.exceptions.SSLError as e:
                if token is not None:
                    token.check()
                raise Unavailable(f"registry {self.repository.host}: TLS failed: {e}") from e
            except (oras.auth.AuthenticationException, ValueError) as e:
                if "authenticat" not in str(e):
                    raise BadContent(f"registry {self.repository.host}: cannot {what}: {str(e)[:200]}") from e
                # oras could not answer the challenge (or the token service refused):
                # retrying with the same credentials would only lock an account
                raise Unauthenticated(
                    f"registry {self.repository.host}: cannot {what}: "
                    f"the credentials were refused{self._hint()}"
                ) from e
            except (requests.exceptions.RequestException, OSError) as e:
                if token is not None:
                    token.check()  # a socket it shut down: say so, not "connection reset"
                problem = f"cannot {what}: {type(e).__name__}: {str(e)[:200]}"
            else:
                if r.status_code < 500 and r.status_code != 429:
                    return r
                problem = f"cannot {what}: the registry answered {r.status_code}{_oci_error(r)}"
                r.close()
            if attempt + 1 < (ATTEMPTS if retry else 1):
                if token is not None:
                    token.wait(0.5 * (attempt + 1))
                else:
                    time.sleep(0.5 * (attempt + 1))
        raise Unavailable(f"registry {self.repository.host}: {problem}")

    def _check(self, r: requests.Response, what: str, ok: tuple[int, ...] = (200,)) -> requests.Response:
        if r.status_code in ok:
            if r.request is not None and r.request.method != "GET":
                read_capped(r, MAX_SMALL_BODY)  # headers are all it says; its connection is free again
            return r
        detail = _oci_error(r)
        r.close()
        where = f"registry {self.repository.host}, repository {self.repository.path}"
        if r.status_code == 401:
            raise Unauthenticated(
                f"{where}: cannot {what}: not authenticated (check the credentials){self._hint()}"
            )
        if r.status_code == 403:
            raise PermissionDenied(f"{where}: cannot {what}: access denied{detail}")
        if r.status_code == 404:
            raise NotFound(f"{where}: cannot {what}: not found{detail}")
        if 400 <= r.status_code < 500:  # the registry refuses what was asked: retrying will not help
            raise FailedPrecondition(f"{where}: cannot {what}: refused ({r.status_code}){detail}")
        raise Unavailable(f"{where}: cannot {what}: unexpected answer {r.status_code}{detail}")

    # ---- blobs --------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        reg = self._registry()
        url = f"{reg.prefix}://{self._container.get_blob_url(digest)}"
        r = self._call(lambda: reg.do_request(url, "HEAD"), f"look up blob {digest[:19]}")
        if r.status_code == 404:
            r.close()
            return False
        self._check(r, f"look up blob {digest[:19]}")
        return True

    def push_blob(self, path: Path, digest: str, size: int) -> bool:
        """Upload ``path`` as blob ``digest`` unless the repository has it; True if uploaded."""
        if self.has_blob(digest):
            count_blob("push", "skipped")
            log.info("blob %s is already in %s", digest[:19], self.where)
            return False
        try:
            self._upload(path, digest, size)
        except DriverError:
            count_blob("push", "failed")
            raise
        return True

    def _upload(self, path: Path, digest: str, size: int) -> None:
        reg = self._registry()
        start = f"{reg.prefix}://{self._container.upload_blob_url()}"
        what = f"upload blob {digest[:19]}"
        r = self._call(lambda: reg.do_request(start, "POST", headers={"Content-Length": "0"}), what)
        self._check(r, what, (202,))
        location = reg._get_location(r, self._container)
        if not location:
            raise BadContent(f"registry {self.repository.host}: an upload answer without a Location")
        if urlsplit(location)[:2] != urlsplit(start)[:2]:  # credentials and data go to the registry only
            raise BadContent(
                f"registry {self.repository.host}: the upload Location points elsewhere "
                f"({urlsplit(location).scheme}://{urlsplit(location).netloc[:80]})"
            )
        sep = "&" if "?" in location else "?"
        meter = Meter("push", digest, size, self.where)
        with open(path, "rb") as f:
            body = MeteredReader(f, meter)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            r = self._call(
                lambda: reg.do_request(f"{location}{sep}digest={digest}", "PUT", data=body, headers=headers),
                what,
                retry=False,
            )
        self._check(r, what, (201,))
        meter.finish()

    def pull_blob(self, digest: str, size: int, dest: Path) -> None:
        """Write blob ``digest`` to ``dest``, checked: exactly ``size`` bytes whose sha256 is ``digest``."""
        if not DIGEST_RE.match(digest):
            raise BadContent(f"registry {self.repository.host}: {digest[:80]!r} is not a sha256 digest")
        reg = self._registry()
        url = f"{reg.prefix}://{self._container.get_blob_url(digest)}"
        what = f"download blob {digest[:19]}"
        meter = Meter("pull", digest, size, self.where)
        hasher = hashlib.sha256()
        done = 0
        try:
            with open(dest, "wb") as out:
                for resume in range(RESUMES + 1):
                    headers = {"Range": f"bytes={done}-"} if done else {}
                    r = self._call(lambda h=headers: reg.do_request(url, "GET", headers=h, stream=True), what)
                    self._check(r, what, (200, 206))
                    if done and r.status_code == 200:  # no ranges here: start again
                        out.seek(0)
                        out.truncate()
                        hasher, done = hashlib.sha256(), 0
                    broke: Exception | None = None
                    with r:
                        chunks = r.iter_content(CHUNK)
                        while True:
                            try:  # the transfer may break off (resumed); a local write error may not
                                chunk = next(chunks, None)
                            except (requests.exceptions.RequestException, OSError) as e:
                                cancel.check()  # cancelled: its socket was shut down
                                broke = e
                                break
                            cancel.check()
                            if chunk is None:
                                break
                            if done + len(chunk) > size:
                                raise BadContent(
                                    f"registry {self.repository.host}: blob {digest[:19]} is longer "
                                    f"than the {size} bytes its manifest declares"
                                )
                            out.write(chunk)
                            hasher.update(chunk)
                            done += len(chunk)
                            meter.add(len(chunk))
                    if broke is not None:
                        if done >= size or resume == RESUMES:
                            raise Unavailable(
                                f"registry {self.repository.host}: {what} broke off after {done} of "
                                f"{size} bytes: {type(broke).__name__}"
                            ) from broke
                        log.warning("%s broke off at %d of %d bytes; resuming", what, done, size)
                        continue
                    if done >= size:
                        break
                    if resume == RESUMES:
                        break
                    log.warning("%s ended at %d of %d bytes; resuming", what, done, size)
        except DriverError:
            count_blob("pull", "failed")
            raise
        except OSError as e:  # writing the download here, not the registry
            count_blob("pull", "failed")
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"no room for blob {digest[:19]} ({size} bytes) in {dest.parent}"
                ) from e
            raise DriverError(f"cannot write blob {digest[:19]} to {dest}: {e}") from e
        if done != size:
            count_blob("pull", "failed")
            raise BadContent(
                f"registry {self.repository.host}: blob {digest[:19]} is truncated: {done} of {size} bytes"
            )
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            count_blob("pull", "failed")
            raise BadContent(
                f"registry {self.repository.host}: blob {digest[:19]} does not match its digest "
                f"(its bytes hash to {got[:19]}); nothing was installed"
            )
        meter.finish()

    # ---- manifests ----------------------------------------------------------
    def push_manifest(self, manifest: dict[str, Any], tag: str) -> str:
        """Store ``manifest`` under ``tag``; return its digest."""
        reg = self._registry()
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        url = f"{reg.prefix}://{self._container.manifest_url(tag)}"
        headers = {"Content-Type": manifest.get("mediaType", OCI_MANIFEST)}
        what = f"store manifest {tag}"
        r = self._call(lambda: reg.do_request(url, "PUT", data=body, headers=headers), what)
        self._check(r, what, (201,))
        answered = r.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise BadContent(f"registry {self.repository.host} stored {tag} as {answered}, not {digest}")
        return digest

    def manifest_digest(self, version: str) -> str:
        """The digest of the manifest a tag names (HEAD), or NotFound."""
        reg = self._registry()
        url = f"{reg.prefix}://{self._container.manifest_url(version)}"
        what = f"look up manifest {version}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        r = self._check(self._call(lambda: reg.do_request(url, "HEAD", headers=headers), what), what)
        digest = r.headers.get("Docker-Content-Digest", "")
        if not DIGEST_RE.match(digest):
            return self.pull_manifest(version).digest
        return digest

    def delete_manifest(self, digest: str) -> None:
        """Delete a manifest (and so its tags); a registry without deletes keeps it."""
        reg = self._registry()
        url = f"{reg.prefix}://{self._container.manifest_url(digest)}"
        what = f"delete manifest {digest[:19]}"
        r = self._call(lambda: reg.do_request(url, "DELETE"), what)
        if r.status_code in (404, 405):
            r.close()
            if r.status_code == 405:
                log.warning("registry %s allows no deletes: %s stays there", self.where, digest[:19])
            return
        self._check(r, what, (200, 202))

    def pull_manifest(self, version: str) -> Manifest:
        """The manifest (or index) a tag or digest names, checked."""
        reg = self._registry()
        url = f"{reg.prefix}://{self._container.manifest_url(version)}"
        what = f"read manifest {version}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        r = self._call(lambda: reg.do_request(url, "GET", headers=headers, stream=True), what)
        self._check(r, what)
        raw = b""
        try:
            with r:
                for chunk in r.iter_content(64 << 10):
                    cancel.check()
                    raw += chunk
                    if len(raw) > MAX_MANIFEST:
                        raise BadContent(f"registry {self.repository.host}: manifest {version} exceeds 4 MiB")
        except (requests.exceptions.RequestException, OSError) as e:
            cancel.check()
            raise Unavailable(f"registry {self.repository.host}: cannot {what}: {type(e).__name__}") from e
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if DIGEST_RE.match(version) and digest != version:
            raise BadContent(f"registry {self.repository.host}: manifest {version[:19]} does not match it")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadContent(f"registry {self.repository.host}: manifest {version} is not JSON") from e
        if not isinstance(body, dict):
            raise BadContent(f"registry {self.repository.host}: manifest {version} is not an object")
        media_type = body.get("mediaType") or r.headers.get("Content-Type", "").split(";")[0]
        if media_type not in MANIFEST_TYPES:
            raise BadContent(f"registry {self.repository.host}: {version} is a {media_type[:80]!r}")
        if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
            try:
                jsonschema.validate(body, schema=oras.schemas.manifest)
            except (jsonschema.ValidationError, RecursionError) as e:
                raise BadContent(f"registry {self.repository.host}: manifest {version}: {e.message}") from e
        return Manifest(digest, media_type, body)


def _oci_error(r: requests.Response) -> str:
    """The registry's own error message, bounded (``: message``) or nothing. At most
    64 KiB of the body is read; the response is closed."""
    if r.request is not None and r.request.method == "HEAD":
        r.close()
        return ""
    body = read_capped(r, MAX_SMALL_BODY)
    try:
        errors = json.loads(body or b"").get("errors") or []
        message = errors[0].get("message") or errors[0].get("code")
    except Exception:
        return ""
    return f": {str(message)[:200]}" if message else ""


def descriptors(items: Any, what: str) -> list[Descriptor]:
    """A manifest's ``layers`` (untrusted) as descriptors, or BadContent."""
    if not isinstance(items, list):
        raise BadContent(f"{what}: layers is not a list")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadContent(f"{what}: a layer is not an object")
        digest, size, media = item.get("digest"), item.get("size"), item.get("mediaType")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise BadContent(f"{what}: a layer's digest is not sha256")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 44:
            raise BadContent(f"{what}: layer {digest[:19]} has no valid size")
        if not isinstance(media, str):
            raise BadContent(f"{what}: layer {digest[:19]} has no media type")
        notes = item.get("annotations") or {}
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise BadContent(f"{what}: layer {digest[:19]} has bad annotations")
        out.append(Descriptor(media, digest, size, notes))
    return out
