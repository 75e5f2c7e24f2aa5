"""The registry client's HTTP: credentials come from the caller only. A ``~/.netrc``
entry for the registry's host is never sent, and a redirect to another origin (a
blob served from elsewhere) carries no Authorization header."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csi_driver.registry.client import RegistryClient
from csi_driver.registry.credentials import Credentials, Login
from csi_driver.registry.reference import Repository

DIGEST = "sha256:" + "0" * 64
Answer = tuple[int, dict[str, str]]


@contextmanager
def recording(answer: Callable[[str, str], Answer]) -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """A server on 127.0.0.1 answering ``answer(method, path)`` with an empty body:
    its host:port and the (path, headers) of every request it received."""
    seen: list[tuple[str, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            seen.append((self.path, dict(self.headers.items())))
            status, headers = answer(self.command, self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_netrc_entry_for_the_registry_is_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc))
    with recording(lambda method, path: (200 if path == "/v2/" else 404, {})) as (host, seen):
        client = RegistryClient(Repository(host, "x/db"), insecure=True)
        assert client.has_blob(DIGEST) is False
    assert [path for path, _h in seen] == ["/v2/", f"/v2/x/db/blobs/{DIGEST}"]
    assert [h for _p, h in seen if "Authorization" in h] == [], "no credentials but the caller's"


def test_a_redirect_to_another_origin_carries_no_authorization() -> None:
    """A registry that wants a login and serves a blob from another port: the login goes
    to the registry only."""
    with recording(lambda method, path: (200, {})) as (elsewhere, other):

        def registry(method: str, path: str) -> Answer:
            if path == "/v2/":
                return 401, {"WWW-Authenticate": 'Basic realm="r"'}
            return 307, {"Location": f"http://{elsewhere}/bucket/blob"}

        with recording(registry) as (host, seen):
            creds = Credentials({host: Login("ci", "pa55")})
            client = RegistryClient(Repository(host, "x/db"), creds, insecure=True)
            assert client.has_blob(DIGEST) is True
    assert any(h.get("Authorization", "").startswith("Basic ") for _p, h in seen), "the registry got it"
    assert [p for p, _h in other] == ["/bucket/blob"]
    assert [h for _p, h in other if "Authorization" in h] == [], "the other origin did not"
