"""Hermetic OCI registry for tests: Debian's real distribution binary, plus a
fault-injecting reverse proxy to put in front of it.

Nothing here needs the network beyond 127.0.0.1, and only the standard library
is used (tests may use ``requests`` on top)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import parse_qs, urlsplit

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
CHUNK = 1 << 20
INJECTED_ERROR = json.dumps({"errors": [{"code": "UNKNOWN", "message": "injected"}]}).encode()


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash (cost 5) of ``password``, as htpasswd files hold it.

    Uses the ``bcrypt`` module if installed, else ``htpasswd -nbB``, else the
    standard library's ``crypt`` (libxcrypt's ``$2b$``; gone in Python 3.13)."""
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    htpasswd = shutil.which("htpasswd")
    if htpasswd is not None:
        out = subprocess.run(
            [htpasswd, "-nbB", "-C", "5", "user", password], check=True, capture_output=True, text=True
        ).stdout
        return out.strip().split(":", 1)[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # type: ignore[import-not-found]
    except ImportError:
        crypt = None
    if crypt is not None and crypt.METHOD_BLOWFISH in crypt.methods:
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
        if hashed and hashed.startswith("$2"):
            return hashed
    raise RuntimeError("no bcrypt implementation: install the bcrypt module or apache2-utils (htpasswd)")


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1, storing under ``root``.

    ``root`` is the filesystem driver's rootdirectory; the config, the log
    (``registry.log``) and the htpasswd file are written beside ``docker/``."""

    def __init__(self, root: Path, *, username: str | None = None, password: str | None = None) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if username is not None and ":" in username:
            raise ValueError("a htpasswd username cannot contain ':'")
        self.root = Path(root)
        self.username = username
        self.password = password
        self.port = 0
        self.host = ""
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "registry.log"
        self._log: IO[bytes] | None = None

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(self.root)}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if self.username is not None and self.password is not None:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text(f"{self.username}:{bcrypt_hash(self.password)}\n")
            config["auth"] = {"htpasswd": {"realm": "overlay-csi-test", "path": str(htpasswd)}}
        return config

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        for attempt in range(3):  # another process may grab the port between probe and bind
            self.port = free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"http://{self.host}"
            config = self.root / "registry-config.yml"
            config.write_text(json.dumps(self._config(), indent=2))  # JSON is YAML
            self._log = open(self.log_path, "ab")  # closed in _stop
            start = self._log.tell()
            self.process = subprocess.Popen(
                [str(REGISTRY_BINARY), "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            try:
                if self._wait_ready(deadline=time.monotonic() + 10):
                    return self
            except BaseException:
                self._stop()
                raise
            self._stop()
            if b"address already in use" not in self.log_path.read_bytes()[start:] or attempt == 2:
                break
        raise RuntimeError(f"docker-registry exited at start:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        """Stop the registry, keeping what it stores: its port refuses connections."""
        self._stop()

    def start(self) -> None:
        """Start a stopped registry again on its port, with what it stored."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the registry is running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log = open(self.log_path, "ab")  # closed in _stop
        self.process = subprocess.Popen(
            [str(REGISTRY_BINARY), "serve", str(self.root / "registry-config.yml")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            ready = self._wait_ready(deadline=time.monotonic() + 10)
        except BaseException:
            self._stop()
            raise
        if not ready:
            self._stop()
            raise RuntimeError(f"docker-registry did not start again on {self.host}")

    def _wait_ready(self, deadline: float) -> bool:
        """True once ``GET /v2/`` answers 200 or 401; False if the process died."""
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/v2/")
                if conn.getresponse().status in (200, 401):
                    return True
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"docker-registry on {self.host} not ready in 10 s")
            time.sleep(0.02)

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    @property
    def _v2(self) -> Path:
        return self.root / "docker" / "registry" / "v2"

    def blob_count(self, repository: str) -> int:
        """Blobs linked into ``repository`` (its ``_layers/sha256/*/link`` files)."""
        return sum(1 for _ in (self._v2 / "repositories" / repository / "_layers" / "sha256").glob("*/link"))

    def blob_bytes(self, repository: str) -> int:
        """The bytes of every blob linked into ``repository``."""
        total = 0
        for link in (self._v2 / "repositories" / repository / "_layers" / "sha256").glob("*/link"):
            hexdigest = link.parent.name
            total += (self._v2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data").stat().st_size
        return total

    def all_blobs(self) -> int:
        """Blobs in the registry's content store (``blobs/sha256/*/*/data``)."""
        return sum(1 for _ in (self._v2 / "blobs" / "sha256").glob("*/*/data"))


@dataclass
class _Fault:
    kind: str  # "fail", "corrupt", "truncate" or "throttle"
    path_re: re.Pattern[str]
    times: int  # requests still to affect; -1 = always
    method: str | None = None
    status: int = 500
    keep: int = 0
    rate: int = 0  # throttle: bytes per second


class _Pace:
    """Moves a body at ``rate`` bytes per second, a tenth of a second's worth at a time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.step = max(1, rate // 10)
        self.start = time.monotonic()
        self.moved = 0

    def _count(self, n: int) -> None:
        self.moved += n
        time.sleep(max(0.0, self.start + self.moved / self.rate - time.monotonic()))

    def write(self, out: IO[bytes], data: bytes) -> None:
        for i in range(0, len(data), self.step):
            piece = data[i : i + self.step]
            out.write(piece)
            out.flush()
            self._count(len(piece))

    def read(self, src: IO[bytes], n: int) -> bytes:
        data = src.read(min(n, self.step))
        self._count(len(data))
        return data


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)


class _TrackingServer(ThreadingHTTPServer):
    """A server on 127.0.0.1 that knows its open connections, so that stopping it can end
    idle keep-alive ones and their threads exit."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), handler)

    def stop(self) -> None:
        self.shutdown()
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()


class _TrackingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TrackingServer
    quiet_finish = False  # a connection the client dropped mid-answer is no error

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            if not self.quiet_finish:
                raise
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)


class _ProxyServer(_TrackingServer):
    daemon_threads = False  # so server_close() joins the handler threads
    block_on_close = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(_ProxyHandler)


class _ProxyHandler(_TrackingHandler):
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # FaultProxy.requests is the log

    def _bearer(self, path: str) -> bool:
        """Token auth as Docker Hub or Harbor do it: answered here (True) or let through."""
        proxy = self.server.proxy
        if path == "/token":
            query = parse_qs(urlsplit(self.path).query)
            expected = "Basic " + base64.b64encode(":".join(proxy.token_auth).encode()).decode()
            proxy.token_requests.append(" ".join(query.get("scope", [])))
            if self.headers.get("Authorization") != expected:
                self._answer(401, b'{"details":"bad credentials"}', path)
                return True
            token = "tok:" + " ".join(query.get("scope", []))
            self._answer(200, json.dumps({"token": token, "access_token": token}).encode(), path)
            return True
        m = re.match(r"^/v2/(.+)/(blobs|manifests|tags)/", path)
        need = "pull" if self.command in ("GET", "HEAD") else "push"
        granted = self.headers.get("Authorization", "").removeprefix("Bearer tok:")
        if m is None or (granted.startswith(f"repository:{m[1]}:") and need in granted.rsplit(":", 1)[1]):
            return False
        self._drain_body()
        scope = f"repository:{m[1]}:{'pull' if need == 'pull' else 'pull,push'}"
        challenge = f'Bearer realm="{proxy.url}/token",service="fake",scope="{scope}"'
        self._answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', path, challenge)
        return True

    def _answer(self, status: int, body: bytes, path: str, challenge: str = "") -> None:
        self.server.proxy._record(self.command, path, status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if challenge:
            self.send_header("WWW-Authenticate", challenge)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        proxy = self.server.proxy
        path = urlsplit(self.path).path
        if proxy.token_auth is not None and self._bearer(path):
            return
        fault = proxy._take(("fail",), self.command, path)
        if fault is not None:
            self._drain_body()
            proxy._record(self.command, path, fault.status)
            self.send_response_only(fault.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(INJECTED_ERROR)))
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(INJECTED_ERROR)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, timeout=60)
        try:
            try:
                response = self._forward_request(upstream)
            except (OSError, http.client.HTTPException):
                self.close_connection = True
                proxy._record(self.command, path, 502)
                self.send_error(502, "upstream unreachable")
                return
            self._relay_response(response, path)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _request_chunks(self) -> tuple[int | None, bool]:
        """(Content-Length or None, whether the body is chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None, True
        length = self.headers.get("Content-Length")
        return (int(length) if length is not None else 0), False

    def _read_chunked(self) -> Iterator[bytes]:
        """Yield the decoded chunks of a chunked request body (trailers dropped)."""
        while True:
            size = int(self.rfile.readline(65537).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return
            remaining = size
            while remaining:
                data = self.rfile.read(min(remaining, CHUNK))
                if not data:
                    raise ConnectionError("client closed mid-chunk")
                remaining -= len(data)
                yield data
            self.rfile.readline(3)  # CRLF after the chunk

    def _drain_body(self) -> None:
        length, chunked = self._request_chunks()
        if chunked:
            for _ in self._read_chunked():
                pass
            return
        while length:
            data = self.rfile.read(min(length, CHUNK))
            if not data:
                break
            length -= len(data)

    def _forward_request(self, upstream: http.client.HTTPConnection) -> http.client.HTTPResponse:
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        upstream.putheader("Host", self.server.proxy.upstream_host)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        length, chunked = self._request_chunks()
        slow = self.server.proxy._take(("throttle",), self.command, urlsplit(self.path).path)
        pace = _Pace(slow.rate) if slow is not None else None
        if chunked:  # a streamed upload (a PATCH): paced chunk by chunk
            upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            for data in self._read_chunked():
                for at in range(0, len(data), pace.step if pace else len(data) or 1):
                    part = data[at : at + pace.step] if pace else data
                    if pace:
                        pace._count(len(part))
                    upstream.send(b"%x\r\n%s\r\n" % (len(part), part))
            upstream.send(b"0\r\n\r\n")
        else:
            if length or self.command in ("POST", "PUT", "PATCH"):
                upstream.putheader("Content-Length", str(length))
            upstream.endheaders()
            while length:
                data = pace.read(self.rfile, length) if pace else self.rfile.read(min(length, CHUNK))
                if not data:
                    raise ConnectionError("client closed mid-body")
                upstream.send(data)
                length -= len(data)
        return upstream.getresponse()

    def _relay_response(self, response: http.client.HTTPResponse, path: str) -> None:
        proxy = self.server.proxy
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        length_header = response.getheader("Content-Length")
        length = int(length_header) if length_header is not None else None
        body: bytes | None = None
        if has_body and length is None:
            body = response.read()  # upstream sent chunked: buffer, then send with a length
            length = len(body)
        fault = (
            proxy._take(("corrupt", "truncate"), self.command, path, length) if has_body and length else None
        )
        proxy._record(self.command, path, response.status)
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in HOP_BY_HOP:
                continue
            if lower == "location" and value.startswith(proxy.upstream_url):
                value = proxy.url + value[len(proxy.upstream_url) :]
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if not has_body:
            return
        slow = proxy._take(("throttle",), self.command, path)
        pace = _Pace(slow.rate) if slow is not None else None
        limit = fault.keep if fault is not None and fault.kind == "truncate" else None
        flip_at = length // 2 if fault is not None and fault.kind == "corrupt" and length else -1
        sent = 0
        while limit is None or sent < limit:
            if body is not None:
                data, body = body[:CHUNK], body[CHUNK:]
            else:
                data = response.read(CHUNK)
            if not data:
                break
            if limit is not None:
                data = data[: limit - sent]
            if sent <= flip_at < sent + len(data):
                i = flip_at - sent
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            if pace is not None:
                pace.write(self.wfile, data)
            else:
                self.wfile.write(data)
            sent += len(data)
        if limit is not None:
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Served:
    """A test server of our own (a ``_TrackingServer``) on 127.0.0.1, served by a daemon
    thread while its ``with`` block runs; on exit it stops and every connection goes."""

    thread_name = "served"

    def __init__(self) -> None:
        self.host = ""
        self.url = ""
        self._server: _TrackingServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> _TrackingServer:
        raise NotImplementedError

    def _before_stop(self) -> None:
        """What a subclass must do before its handlers are stopped."""

    def __enter__(self) -> Self:
        self._server = self._make_server()
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        serve = self._server.serve_forever
        self._thread = threading.Thread(
            target=serve, kwargs={"poll_interval": 0.05}, name=self.thread_name, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._before_stop()
        server.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class FaultProxy(_Served):
    """A threaded HTTP/1.1 reverse proxy in front of ``upstream`` (e.g. a
    LocalRegistry's ``url``) that injects faults on demand.

    Each fault matches ``re.search`` of its regex on the request path (without
    the query) and affects ``times`` requests (-1 = always; a throttle always). ``corrupt`` and
    ``truncate`` are only spent on responses with a body to damage (not HEAD,
    not empty; for ``truncate``, longer than ``keep``). The first matching
    fault, in the order they were set, wins."""

    def __init__(self, upstream: str, *, token_auth: tuple[str, str] | None = None) -> None:
        """``token_auth``: (user, password) the proxy's own ``/token`` service wants; every
        repository call then needs a bearer token of a scope that covers it (push for writes)."""
        self.token_auth = token_auth
        self.token_requests: list[str] = []  # the scopes asked of /token
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.netloc:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host = parts.netloc
        self.upstream_url = f"http://{parts.netloc}"
        super().__init__()
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    thread_name = "fault-proxy"

    def _make_server(self) -> _TrackingServer:
        return _ProxyServer(self)

    def _add(self, fault: _Fault) -> None:
        if fault.times == 0 or fault.times < -1:
            raise ValueError("times must be positive, or -1 for always")
        with self._lock:
            self._faults.append(fault)

    def fail(self, method: str, path_re: str, status: int = 500, times: int = 1) -> None:
        """Answer ``status`` with an OCI error body, without forwarding."""
        self._add(_Fault("fail", re.compile(path_re), times, method=method.upper(), status=status))

    def corrupt(self, path_re: str, times: int = 1) -> None:
        """Forward, but flip the middle byte of the response body."""
        self._add(_Fault("corrupt", re.compile(path_re), times))

    def truncate(self, path_re: str, keep: int, times: int = 1) -> None:
        """Forward status and headers (full Content-Length), send ``keep`` body bytes, then close."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self._add(_Fault("truncate", re.compile(path_re), times, keep=keep))

    def throttle(self, path_re: str, rate: int, method: str | None = None) -> None:
        """Forward, but move the body (a response's, or a request's, chunked or not)
        at ``rate`` bytes per second, for every request that matches (``method``: only it)."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        upper = method.upper() if method else None
        self._add(_Fault("throttle", re.compile(path_re), -1, method=upper, rate=rate))

    def clear(self) -> None:
        """Drop every fault."""
        with self._lock:
            self._faults.clear()

    def _take(self, kinds: tuple[str, ...], method: str, path: str, length: int = 0) -> _Fault | None:
        """Spend one use of the first fault of ``kinds`` that applies to this request."""
        with self._lock:
            for fault in self._faults:
                if fault.kind not in kinds or not fault.path_re.search(path):
                    continue
                if fault.method is not None and fault.method != method:
                    continue
                if fault.kind == "truncate" and fault.keep >= length:
                    continue
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


class _HostileServer(_TrackingServer):
    daemon_threads = True  # a handler that trickles must never hold the test's exit
    block_on_close = False

    def __init__(self, hostile: HostileRegistry) -> None:
        self.hostile = hostile
        super().__init__(_HostileHandler)


class _HostileHandler(_TrackingHandler):
    server: _HostileServer
    quiet_finish = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _head(self, status: int, length: int, extra: dict[str, str] | None = None) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _huge(self, status: int, prefix: bytes, extra: dict[str, str] | None = None) -> None:
        """``status`` with a body of ``size`` bytes: ``prefix``, then spaces, sent as fast as read."""
        hostile = self.server.hostile
        self._head(status, hostile.size, extra)
        block = b" " * CHUNK
        sent = 0
        try:
            while sent < hostile.size and not hostile.stopping.is_set():
                data = (prefix + block)[:CHUNK] if sent == 0 else block
                data = data[: hostile.size - sent]
                self.wfile.write(data)
                sent += len(data)
        except OSError:
            pass  # the client read what it wanted and closed: the point
        self.close_connection = True

    def do_GET(self) -> None:
        hostile = self.server.hostile
        path = urlsplit(self.path).path
        with hostile.lock:
            hostile.requests.append((self.command, path))
        realm = f'Bearer realm="{hostile.url}/token",service="hostile",scope="repository:x:pull"'
        if path == "/token":
            self._huge(200, b'{"token": "')
            return
        if path == "/v2/":
            if hostile.mode == "huge-token":
                self._head(401, 2, {"WWW-Authenticate": realm})
            else:
                self._head(200, 2)
            self.wfile.write(b"{}")
            return
        if hostile.mode == "huge-token":
            self._head(401, 2, {"WWW-Authenticate": realm})
            self.wfile.write(b"{}")
        elif hostile.mode == "huge-error":
            self._huge(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "')
        elif hostile.mode == "silent":
            hostile.stopping.wait()
            self.close_connection = True
        else:  # trickle: a manifest of 1 MiB, one byte at a time
            self._head(200, 1 << 20, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            try:
                while not hostile.stopping.wait(hostile.interval):
                    self.wfile.write(b" ")
                    self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True

    do_HEAD = do_GET


class HostileRegistry(_Served):
    """An HTTP server on 127.0.0.1 that acts as a registry that should not be trusted.

    ``/v2/`` answers 200 (``huge-token``: a bearer challenge). Every other request:
    ``trickle``: 200 with a 1 MiB Content-Length, then one byte every ``interval`` s;
    ``silent``: reads the request, never answers; ``huge-error``: 404 with a ``size``-byte
    body that begins as an OCI error; ``huge-token``: a bearer challenge whose token
    service (``/token``) answers 200 with a ``size``-byte body. On exit every handler
    stops and every connection is shut down."""

    def __init__(self, mode: str, *, interval: float = 20.0, size: int = 300 << 20) -> None:
        if mode not in ("trickle", "silent", "huge-error", "huge-token"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.interval = interval
        self.size = size
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__()

    thread_name = "hostile"

    def _make_server(self) -> _TrackingServer:
        return _HostileServer(self)

    def _before_stop(self) -> None:
        self.stopping.set()  # handlers trickling or holding a request end now

    def count(self, path_part: str) -> int:
        with self.lock:
            return sum(1 for _m, p in self.requests if path_part in p)

    def open_connections(self) -> int:
        """Connections a client holds open now (a transfer waiting on an answer)."""
        server = self._server
        if server is None:
            return 0
        with server.connections_lock:
            return len(server.connections)
