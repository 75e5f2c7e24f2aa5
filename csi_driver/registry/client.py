"""A registry client for layer blobs and manifests: the distribution API's calls a
driver needs, on ``requests`` (``transport``), with docker's challenge handling
(``auth``). What it may not do without:

* every answer is untrusted: a manifest is read up to 4 MiB, checked against
  the OCI schema (``schema``) and, when fetched by digest, against that digest; a
  blob is read no further than its declared size and its sha256 is checked before
  anyone may use it (``download.BlobStream``);
* bodies stream both ways (a 1 GiB layer never sits in memory), and a blob can be
  read as it arrives: a restore builds its layer from the stream and installs it
  only once the stream's digest checks;
* a pull that loses its connection resumes with a ``Range`` request (distribution
  serves them), up to ``RESUMES`` times;
* reads are retried briefly (``ATTEMPTS``), writes are not; a failure is one of
  the driver's errors, with a status code and a message for the operator;
* credentials go to the registry only: never to a log, never read from
  ``~/.docker`` or ``~/.netrc``; a login goes to the host it was given for
  (``credentials.Credentials``) and its token service only, any other registry is
  asked anonymously, nothing is sent to a token service on plain HTTP unless the
  registry itself is reached over HTTP and the service's host is an
  ``--insecure-registry`` too, a redirect elsewhere carries no Authorization, and
  an upload whose Location names another scheme or host is refused;
* every body is read with a bound: an error body or a token answer up to
  ``MAX_SMALL_BODY`` (64 KiB, the rest is never read), a manifest up to 4 MiB, a
  blob up to its declared size. Every request streams, so nothing is read whole
  behind this module's back;
* a transfer runs under the deadline of its ``cancel.Cancel`` token: timeouts
  never pass it, and cancelling shuts the transfer's sockets down.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import jsonschema
import requests

from csi_driver.errors import DriverError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from csi_driver.registry import cancel
from csi_driver.registry.auth import (
    MAX_SMALL_BODY,
    BadContent,
    Challenge,
    TokenService,
    Unauthenticated,
    basic_header,
    parse_challenge,
)
from csi_driver.registry.credentials import Credentials
from csi_driver.registry.download import RESUMES, BlobStream
from csi_driver.registry.progress import Meter, MeteredReader, count_blob
from csi_driver.registry.reference import DIGEST_RE, Repository
from csi_driver.registry.schema import MANIFEST
from csi_driver.registry.transport import CONNECT_TIMEOUT, READ_TIMEOUT, Session, read_capped, same_origin
from csi_driver.registry.upload import StreamBody, UploadStopped

__all__ = [
    "ATTEMPTS",
    "BadContent",
    "BlobStream",
    "CONNECT_TIMEOUT",
    "Descriptor",
    "MAX_SMALL_BODY",
    "Manifest",
    "PermissionDenied",
    "READ_TIMEOUT",
    "RESUMES",
    "RegistryClient",
    "Unauthenticated",
    "descriptors",
    "read_capped",
]

log = logging.getLogger("csi_driver.registry")
T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
MAX_MANIFEST = 4 << 20
ATTEMPTS = 3  # a read that fails for want of the registry is tried this often
_READS = ("GET", "HEAD")


class PermissionDenied(DriverError):
    code = "PERMISSION_DENIED"


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
        self._scheme = "http" if insecure else "https"
        http_hosts = frozenset(h.lower() for h in insecure_hosts) | (
            {repository.host.lower()} if insecure else frozenset()
        )
        self._session = Session()
        self._tokens = TokenService(self._session, repository.host, self._scheme, http_hosts, self._login)
        self._connected = False
        self._basic = ""  # the Authorization header of a registry that asks for a login
        self._bearer: dict[str, str] = {}  # "pull" or "push" -> the Authorization header of a token

    # ---- connection ---------------------------------------------------------
    def _connect(self) -> None:
        """Ask ``/v2/`` on first use: a registry that wants a login says so there."""
        if self._connected:
            return
        r = self._call(lambda: self._session.get(self._url("/v2/")), "reach it")
        challenge = parse_challenge(r.headers.get("WWW-Authenticate", "")) if r.status_code == 401 else None
        r.close()
        if challenge is not None and challenge.scheme == "basic":
            self._use_basic()
        self._connected = True

    def _use_basic(self) -> None:
        if self._login is None:
            raise Unauthenticated(
                f"registry {self.repository.host} asks for a username and password: "
                f"give them in the request's secrets{self._hint()}"
            )
        self._basic = basic_header(self._login)

    def _hint(self) -> str:
        """Why no credentials were sent, when the request's are for other registries."""
        if not self._withheld:
            return ""
        if len(self._withheld) == 1:
            return f" (the request's credentials are for registry {self._withheld[0]} only)"
        return f" (the request's credentials are for registries {', '.join(self._withheld)} only)"

    def _url(self, path: str) -> str:
        return f"{self._scheme}://{self.repository.host}{path}"

    def _api(self, kind: str, ref: str) -> str:
        """The URL of ``/v2/<repository>/<kind>/<ref>``."""
        return self._url(f"/v2/{self.repository.path}/{kind}/{quote(ref, safe=':')}")

    def _authorization(self, access: str) -> str:
        if self._basic:
            return self._basic
        return self._bearer.get(access) or (self._bearer.get("push", "") if access == "pull" else "")

    def _request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, data: Any = None
    ) -> requests.Response:
        """One request with the credentials the registry asked for. A 401 whose challenge
        can be answered (a token of the scope it names, or the login it asks for) is
        answered, and the request sent again unless its body was a stream."""
        access = "pull" if method in _READS else "push"
        sent = dict(headers or {})
        auth = self._authorization(access)
        if auth:
            sent["Authorization"] = auth
        r = self._session.request(method, url, headers=sent, data=data)
        if r.status_code != 401 or hasattr(data, "read") or hasattr(data, "__next__"):
            return r
        challenge = parse_challenge(r.headers.get("WWW-Authenticate", ""))
        if challenge is None or not self._answer(challenge, access, auth):
            return r
        r.close()
        sent["Authorization"] = self._authorization(access)
        return self._session.request(method, url, headers=sent, data=data)

    def _answer(self, challenge: Challenge, access: str, tried: str) -> bool:
        """Get what ``challenge`` asks for; False when there is nothing new to send."""
        if challenge.scheme == "basic":
            if self._basic:
                return False  # the login was sent and refused
            self._use_basic()
            return True
        if challenge.scheme != "bearer":
            return False
        what = f"{'read from' if access == 'pull' else 'write to'} {self.repository.path}"
        try:
            token = self._tokens.token(challenge, what)
        except Unauthenticated as e:
            raise Unauthenticated(f"{e}{self._hint()}") from e
        header = f"Bearer {token}"
        if header == tried:
            return False
        self._bearer[access] = header
        return True

    def _call(
        self, do: Callable[[], requests.Response], what: str, *, retry: bool = True
    ) -> requests.Response:
        """One request: transport failures and 5xx/429 tried again (reads), then mapped."""
        token = cancel.current()
        tries = ATTEMPTS if retry else 1
        problem = ""
        for attempt in range(tries):
            try:
                r = do()
            except requests.exceptions.SSLError as e:
                if token is not None:
                    token.check()
                raise Unavailable(f"registry {self.repository.host}: TLS failed: {e}") from e
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader) as e:
                raise BadContent(f"registry {self.repository.host}: cannot {what}: {str(e)[:200]}") from e
            except (requests.exceptions.RequestException, OSError) as e:
                if token is not None:
                    token.check()  # a socket it shut down: say so, not "connection reset"
                problem = f"cannot {what}: {type(e).__name__}: {str(e)[:200]}"
            else:
                if r.status_code < 500 and r.status_code != 429:
                    return r
                problem = f"cannot {what}: the registry answered {r.status_code}{_oci_error(r)}"
                r.close()
            if attempt + 1 < tries:
                if token is not None:
                    token.wait(0.5 * (attempt + 1))
                else:
                    time.sleep(0.5 * (attempt + 1))
        raise Unavailable(f"registry {self.repository.host}: {problem}")

    def _send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
    ) -> requests.Response:
        """``_request`` under ``_call``, then ``_check``."""
        self._connect()
        r = self._call(lambda: self._request(method, url, headers=headers, data=data), what, retry=retry)
        return self._check(r, what, ok)

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
        what = f"look up blob {digest[:19]}"
        r = self._send("HEAD", self._api("blobs", digest), what, ok=(200, 404))
        return r.status_code == 200

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
        """A monolithic upload: POST for a session, then one PUT of the whole blob."""
        what = f"upload blob {digest[:19]}"
        location = self._start_upload(what)
        meter = Meter("push", digest, size, self.where)
        with open(path, "rb") as f:
            body = MeteredReader(f, meter)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            self._send(
                "PUT",
                _with_digest(location, digest),
                what,
                headers=headers,
                data=body,
                ok=(201,),
                retry=False,
            )
        meter.finish()

    def _start_upload(self, what: str) -> str:
        """POST for an upload session; its Location, checked to be this registry's."""
        start = self._url(f"/v2/{self.repository.path}/blobs/uploads/")
        r = self._send("POST", start, what, headers={"Content-Length": "0"}, ok=(202,))
        return self._location(r, start)

    def _location(self, r: requests.Response, base: str) -> str:
        given = r.headers.get("Location", "")
        if not given:
            raise BadContent(f"registry {self.repository.host}: an upload answer without a Location")
        location = urljoin(base, given)  # distribution may answer with a path
        if not same_origin(location, base):  # credentials and data go to the registry only
            raise BadContent(
                f"registry {self.repository.host}: the upload Location points elsewhere "
                f"({urlsplit(location).scheme}://{urlsplit(location).netloc[:80]})"
            )
        return location

    def push_stream(self, produce: Callable[[StreamBody], T], expected: int = 0) -> tuple[str, int, T]:
        """Upload a blob as ``produce`` writes it (into the ``StreamBody`` it is given):
        POST for a session, one PATCH whose chunked body is the stream, sent by a
        thread as it is written, then PUT with the digest hashed on the way. Nothing
        is spooled; the registry checks the digest before it keeps the blob. Return
        (digest, size, what ``produce`` returned). ``expected``: a size for progress
        lines. Not retried: a failed push is pushed again whole."""
        what = "upload a streamed blob"
        location = self._start_upload(what)
        meter = Meter("push", "sha256:(streaming)", expected, self.where)
        body = StreamBody(meter.add)
        answer: dict[str, Any] = {}

        def send() -> None:
            try:
                headers = {"Content-Type": "application/octet-stream"}
                answer["r"] = self._send(
                    "PATCH", location, what, headers=headers, data=body.chunks(), ok=(202,), retry=False
                )
            except BaseException as e:  # noqa: BLE001 - handed to the writer's thread
                answer["error"] = e
            finally:
                body.stop()

        sender = threading.Thread(target=contextvars.copy_context().run, args=(send,), name="registry-push")
        sender.start()
        try:
            made = produce(body)
            body.close()
        except BaseException as e:
            body.abort(e)
            sender.join()
            if isinstance(e, UploadStopped) and "error" in answer:
                raise answer["error"] from None
            raise
        sender.join()
        if "error" in answer:
            raise answer["error"]
        digest = body.digest()
        meter.digest = digest
        url = _with_digest(self._location(answer["r"], location), digest)
        self._send(
            "PUT", url, f"upload blob {digest[:19]}", headers={"Content-Length": "0"}, ok=(201,), retry=False
        )
        meter.finish()
        return digest, body.size, made

    @contextmanager
    def blob(self, digest: str, size: int) -> Iterator[BlobStream]:
        """Blob ``digest`` as a stream read as it arrives; nothing of it is checked until
        its ``finish()`` (call it before using what was read)."""
        if not DIGEST_RE.match(digest):
            raise BadContent(f"registry {self.repository.host}: {digest[:80]!r} is not a sha256 digest")
        url = self._api("blobs", digest)
        what = f"download blob {digest[:19]}"

        def open_at(offset: int) -> requests.Response:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            return self._send("GET", url, what, headers=headers, ok=(200, 206))

        meter = Meter("pull", digest, size, self.where)
        stream = BlobStream(open_at, digest, size, self.repository.host, meter)
        try:
            yield stream
        except BaseException:
            count_blob("pull", "failed")
            raise
        finally:
            stream.close()

    def pull_blob(self, digest: str, size: int, dest: Path) -> None:
        """Write blob ``digest`` to ``dest``, checked: exactly ``size`` bytes whose sha256 is ``digest``."""
        with self.blob(digest, size) as stream:
            try:
                with open(dest, "wb") as out:
                    for chunk in stream.chunks():
                        out.write(chunk)
            except OSError as e:  # writing the download here, not the registry
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(
                        f"no room for blob {digest[:19]} ({size} bytes) in {dest.parent}"
                    ) from e
                raise DriverError(f"cannot write blob {digest[:19]} to {dest}: {e}") from e
            stream.finish()

    # ---- manifests ----------------------------------------------------------
    def push_manifest(self, manifest: dict[str, Any], tag: str) -> str:
        """Store ``manifest`` under ``tag``; return its digest."""
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = {"Content-Type": manifest.get("mediaType", OCI_MANIFEST)}
        what = f"store manifest {tag}"
        r = self._send("PUT", self._api("manifests", tag), what, headers=headers, data=body, ok=(201,))
        answered = r.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise BadContent(f"registry {self.repository.host} stored {tag} as {answered}, not {digest}")
        return digest

    def manifest_digest(self, version: str) -> str:
        """The digest of the manifest a tag names (HEAD), or NotFound."""
        what = f"look up manifest {version}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        r = self._send("HEAD", self._api("manifests", version), what, headers=headers)
        digest = r.headers.get("Docker-Content-Digest", "")
        if not DIGEST_RE.match(digest):
            return self.pull_manifest(version).digest
        return digest

    def delete_manifest(self, digest: str) -> None:
        """Delete a manifest (and so its tags); a registry without deletes keeps it."""
        what = f"delete manifest {digest[:19]}"
        r = self._send("DELETE", self._api("manifests", digest), what, ok=(200, 202, 404, 405))
        if r.status_code == 405:
            log.warning("registry %s allows no deletes: %s stays there", self.where, digest[:19])

    def pull_manifest(self, version: str) -> Manifest:
        """The manifest (or index) a tag or digest names, checked."""
        what = f"read manifest {version}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        r = self._send("GET", self._api("manifests", version), what, headers=headers)
        raw = bytearray()
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
            raise BadContent(f"registry {self.repository.host}: {str(version)} is a {str(media_type)[:80]!r}")
        if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
            try:
                jsonschema.validate(body, schema=MANIFEST)
            except (jsonschema.ValidationError, RecursionError) as e:
                message = e.message if isinstance(e, jsonschema.ValidationError) else "nested too deeply"
                where = f"registry {self.repository.host}: manifest {version}"
                raise BadContent(f"{where}: {message[:200]}") from e
        return Manifest(digest, media_type, body)


def _with_digest(location: str, digest: str) -> str:
    """An upload's Location with the ``digest`` query that completes it."""
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={quote(digest, safe=':')}"


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
