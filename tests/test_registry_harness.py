"""The registry harness itself: a real docker-registry, and the fault proxy in front of it."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from registry_harness import INJECTED_ERROR, FaultProxy, LocalRegistry

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").exists(),
    reason="needs Debian's registry binary (apt-get install docker-registry)",
)

REPO = "library/harness"
BLOB = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BLOB_PATH = f"/v2/{REPO}/blobs/{DIGEST}"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # no proxies from the environment
        yield s


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def push(session: requests.Session, base: str, data: bytes, repo: str = REPO) -> str:
    """Monolithic upload; returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = session.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    assert location.startswith(f"{base}/v2/{repo}/blobs/uploads/")
    r = session.put(location, params={"digest": digest}, data=data)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    assert r.headers["Location"] == f"{base}/v2/{repo}/blobs/{digest}"
    return digest


def test_push_head_get(registry: LocalRegistry, session: requests.Session) -> None:
    assert registry.host.startswith("127.0.0.1:") and registry.url == f"http://{registry.host}"
    assert registry.blob_count(REPO) == 0 and registry.all_blobs() == 0
    assert push(session, registry.url, BLOB) == DIGEST

    r = session.head(registry.url + BLOB_PATH)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == str(len(BLOB))
    assert r.headers["Docker-Content-Digest"] == DIGEST
    r = session.get(registry.url + BLOB_PATH)
    assert r.status_code == 200 and r.content == BLOB

    assert registry.blob_count(REPO) == 1 and registry.all_blobs() == 1
    assert registry.blob_count("library/other") == 0
    v2 = registry.root / "docker/registry/v2"
    hexdigest = DIGEST.removeprefix("sha256:")
    assert (v2 / f"repositories/{REPO}/_layers/sha256/{hexdigest}/link").read_text() == DIGEST
    assert (v2 / f"blobs/sha256/{hexdigest[:2]}/{hexdigest}/data").read_bytes() == BLOB


def test_delete_unlinks_but_keeps_content(registry: LocalRegistry, session: requests.Session) -> None:
    push(session, registry.url, BLOB)
    push(session, registry.url, BLOB, repo="library/other")
    assert registry.all_blobs() == 1  # content-addressed: stored once
    assert session.delete(registry.url + BLOB_PATH).status_code == 202
    assert registry.blob_count(REPO) == 0 and registry.blob_count("library/other") == 1
    assert registry.all_blobs() == 1  # only garbage-collect removes data
    assert session.head(registry.url + BLOB_PATH).status_code == 404


def test_via_proxy(registry: LocalRegistry, proxy: FaultProxy, session: requests.Session) -> None:
    assert proxy.host != registry.host and proxy.url == f"http://{proxy.host}"
    push(session, proxy.url, BLOB)  # asserts the Locations point at the proxy
    r = session.head(proxy.url + BLOB_PATH)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(BLOB))
    r = session.get(proxy.url + BLOB_PATH)
    assert r.status_code == 200 and r.content == BLOB
    assert registry.blob_count(REPO) == 1
    assert [(m, s) for m, _, s in proxy.requests] == [
        ("POST", 202),
        ("PUT", 201),
        ("HEAD", 200),
        ("GET", 200),
    ]
    assert proxy.requests[0][1] == f"/v2/{REPO}/blobs/uploads/"
    assert proxy.requests[-1][1] == BLOB_PATH


def test_proxy_streams_large_and_chunked_bodies(
    registry: LocalRegistry, proxy: FaultProxy, session: requests.Session
) -> None:
    big = hashlib.sha256(b"seed").digest() * (3 * 32768 + 1)  # 3 MiB + 32 bytes, by Content-Length
    digest = push(session, proxy.url, big)
    assert session.get(f"{proxy.url}/v2/{REPO}/blobs/{digest}").content == big

    data = b"chunked body " * 10000
    r = session.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/")
    parts = iter([data[:7], data[7:70000], data[70000:]])
    r = session.patch(r.headers["Location"], data=parts)  # a generator: Transfer-Encoding: chunked
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = session.put(r.headers["Location"], params={"digest": digest})
    assert r.status_code == 201, r.text
    assert session.get(f"{registry.url}/v2/{REPO}/blobs/{digest}").content == data
    assert registry.blob_count(REPO) == 2


def test_fail_once_then_passes(registry: LocalRegistry, proxy: FaultProxy, session: requests.Session) -> None:
    push(session, registry.url, BLOB)
    proxy.fail("GET", r"/blobs/sha256:")
    assert session.head(proxy.url + BLOB_PATH).status_code == 200  # other methods pass
    r = session.get(proxy.url + BLOB_PATH)
    assert r.status_code == 500
    assert r.content == INJECTED_ERROR
    assert r.json() == {"errors": [{"code": "UNKNOWN", "message": "injected"}]}
    assert r.headers["Content-Type"] == "application/json"
    r = session.get(proxy.url + BLOB_PATH)
    assert r.status_code == 200 and r.content == BLOB
    assert proxy.requests == [("HEAD", BLOB_PATH, 200), ("GET", BLOB_PATH, 500), ("GET", BLOB_PATH, 200)]


def test_fail_always_until_clear(
    registry: LocalRegistry, proxy: FaultProxy, session: requests.Session
) -> None:
    proxy.fail("post", r"/blobs/uploads/$", status=503, times=-1)
    for _ in range(3):
        r = session.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/", data=b"ignored body")
        assert r.status_code == 503 and json.loads(r.content)["errors"][0]["message"] == "injected"
    proxy.clear()
    push(session, proxy.url, BLOB)
    assert [s for _, _, s in proxy.requests] == [503, 503, 503, 202, 201]


def test_corrupt(registry: LocalRegistry, proxy: FaultProxy, session: requests.Session) -> None:
    push(session, registry.url, BLOB)
    proxy.corrupt(r"/blobs/sha256:")
    assert session.head(proxy.url + BLOB_PATH).status_code == 200  # no body: fault not spent
    r = session.get(proxy.url + BLOB_PATH)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == DIGEST
    assert len(r.content) == len(BLOB) and r.content != BLOB
    assert [i for i in range(len(BLOB)) if r.content[i] != BLOB[i]] == [len(BLOB) // 2]
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() != DIGEST
    assert session.get(proxy.url + BLOB_PATH).content == BLOB


def test_truncate(registry: LocalRegistry, proxy: FaultProxy, session: requests.Session) -> None:
    push(session, registry.url, BLOB)
    proxy.truncate(r"/blobs/sha256:", keep=100)
    with pytest.raises(requests.exceptions.ChunkedEncodingError) as err:
        session.get(proxy.url + BLOB_PATH)
    assert f"IncompleteRead(100 bytes read, {len(BLOB) - 100} more expected)" in str(err.value)

    proxy.truncate(r"/blobs/sha256:", keep=100)
    conn = http.client.HTTPConnection(proxy.host, timeout=10)
    try:
        conn.request("GET", BLOB_PATH)
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") == str(len(BLOB))
        with pytest.raises(http.client.IncompleteRead) as short:
            response.read()
        assert short.value.partial == BLOB[:100] and short.value.expected == len(BLOB) - 100
    finally:
        conn.close()

    assert session.get(proxy.url + BLOB_PATH).content == BLOB
    assert [s for _, _, s in proxy.requests] == [200, 200, 200]


def test_basic_auth(tmp_path: Path, session: requests.Session) -> None:
    with LocalRegistry(tmp_path, username="alice", password="s3cret") as reg, FaultProxy(reg.url) as proxy:
        assert (tmp_path / "htpasswd").read_text().startswith("alice:$2")
        for base in (reg.url, proxy.url):
            r = session.get(base + "/v2/")
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"].startswith('Basic realm="')
            assert session.get(base + "/v2/", auth=("alice", "wrong")).status_code == 401
            assert session.get(base + "/v2/", auth=("alice", "s3cret")).status_code == 200
        session.auth = ("alice", "s3cret")
        push(session, proxy.url, BLOB)
        assert reg.blob_count(REPO) == 1


def test_leaves_nothing_running(tmp_path: Path, session: requests.Session) -> None:
    with LocalRegistry(tmp_path) as reg, FaultProxy(reg.url) as proxy:
        assert session.get(proxy.url + "/v2/").status_code == 200  # leaves a keep-alive connection open
        process = reg.process
    assert process is not None and process.returncode is not None
    assert not [t for t in threading.enumerate() if t.name == "fault-proxy"]
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(reg.url + "/v2/", timeout=2)
    assert tmp_path.exists() and (tmp_path / "registry.log").exists()
