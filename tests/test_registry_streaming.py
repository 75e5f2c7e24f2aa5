"""Blobs streamed both ways against a real registry. Up: a blob sent as it is made
(``RegistryClient.push_stream``): what arrives is what was written, and a failure
on either side stops both and leaves the registry without a blob. Down: a blob read
ahead of its consumer by a thread (``download.BlobStream``), never more than
``AHEAD`` chunks, and stopped when the consumer gives up."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.errors import Unavailable
from csi_driver.registry import download
from csi_driver.registry.client import RegistryClient
from csi_driver.registry.reference import Repository
from csi_driver.registry.upload import StreamBody
from registry_harness import REGISTRY_BINARY, FaultProxy, LocalRegistry

pytestmark = pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package")

MiB = 1 << 20


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[LocalRegistry, FaultProxy]]:
    with LocalRegistry(tmp_path / "registry") as reg, FaultProxy(reg.url) as proxy:
        yield reg, proxy


def _client(host: str) -> RegistryClient:
    return RegistryClient(Repository(host, "stream/test"), insecure=True)


def _pushers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "registry-push")


def test_a_streamed_blob_arrives_whole_in_one_chunked_patch(proxied) -> None:
    reg, proxy = proxied
    data = os.urandom(5 * MiB + 123)  # not a multiple of the chunk size

    def produce(body: StreamBody) -> str:
        for at in range(0, len(data), 100_000):  # small writes, as a tar's are
            body.write(data[at : at + 100_000])
        return "made"

    client = _client(reg.host)
    digest, size, made = client.push_stream(produce, len(data))
    assert (digest, size, made) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data), "made")
    with client.blob(digest, size) as stream:
        got = b"".join(stream.chunks())
        stream.finish()
    assert got == data

    client = _client(proxy.host)
    digest2, _, _ = client.push_stream(lambda body: body.write(data[:MiB]))
    methods = [m for m, p, _s in proxy.requests if "/blobs/uploads/" in p]
    assert methods == ["POST", "PATCH", "PUT"], "one session, the body in one PATCH, the digest in a PUT"
    assert client.has_blob(digest2)


def test_an_export_that_fails_midway_leaves_no_blob(proxied) -> None:
    reg, _proxy = proxied
    part = os.urandom(3 * MiB)

    def produce(body: StreamBody) -> None:
        body.write(part)
        raise ValueError("the export broke")

    client = _client(reg.host)
    with pytest.raises(ValueError, match="the export broke"):
        client.push_stream(produce)
    assert _pushers() == 0, "the sending thread ended"
    assert not client.has_blob("sha256:" + hashlib.sha256(part).hexdigest())


def test_a_refused_upload_fails_with_the_registrys_error(proxied) -> None:
    _reg, proxy = proxied
    proxy.fail("PATCH", r"/blobs/uploads/", status=500, times=1)
    block = os.urandom(MiB)
    client = _client(proxy.host)
    with pytest.raises(Unavailable, match="500"):
        client.push_stream(lambda body: [body.write(block) for _ in range(16)])
    assert _pushers() == 0
    assert not client.has_blob("sha256:" + hashlib.sha256(block * 16).hexdigest())


def test_a_registry_gone_midway_stops_the_export(tmp_path: Path) -> None:
    with LocalRegistry(tmp_path / "registry") as reg:
        proxy = FaultProxy(reg.url).__enter__()
        written = 0
        block = os.urandom(MiB)

        def produce(body: StreamBody) -> None:
            nonlocal written
            for _ in range(2048):  # 2 GiB if nothing stopped it
                body.write(block)
                written += len(block)
                if written == 16 * MiB:
                    proxy.__exit__(None, None, None)  # every connection goes

        start = time.monotonic()
        with pytest.raises(Unavailable):
            _client(proxy.host).push_stream(produce)
        assert written < 256 * MiB, f"the export went on for {written >> 20} MiB after the upload failed"
        assert time.monotonic() - start < 30
        assert _pushers() == 0


def _pullers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "registry-pull" and t.is_alive())


def _stored(reg: LocalRegistry, mib: int) -> tuple[RegistryClient, bytes, str]:
    """A client of ``reg`` and a blob of ``mib`` MiB of random data it holds: (client, data, digest)."""
    data = os.urandom(mib * MiB)
    client = _client(reg.host)
    digest, _, _ = client.push_stream(lambda body: body.write(data))
    return client, data, digest


def test_a_download_runs_ahead_of_a_slow_consumer_by_a_bounded_amount(proxied) -> None:
    client, data, digest = _stored(proxied[0], 32)
    with client.blob(digest, len(data)) as stream:
        first = stream.read(MiB)
        time.sleep(1.0)  # the consumer is busy; the download may not take the whole blob
        ahead = stream.done - len(first)
        assert 0 < ahead <= (download.AHEAD + 2) * MiB, f"{ahead >> 20} MiB read ahead"
        rest = b"".join(stream.chunks())
        stream.finish()
    assert first + rest == data
    assert _pullers() == 0


def test_a_consumer_that_gives_up_stops_the_download(proxied) -> None:
    reg, proxy = proxied
    _, data, digest = _stored(reg, 64)
    client = _client(proxy.host)  # through the proxy, which counts the GETs
    with client.blob(digest, len(data)) as stream:
        stream.read(MiB)
    deadline = time.monotonic() + 5
    while _pullers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pullers() == 0, "the download thread outlived its consumer"
    assert stream.done < len(data), "it stopped early, not at the end"
    gets = [p for m, p, _s in proxy.requests if m == "GET" and digest in p]
    assert len(gets) == 1, f"a closed stream asked again (a resume): {gets}"
