"""Registry transfers that take longer than their caller waits: a restore or a push
of ~6 s (a throttling proxy in front of a real registry) for callers with 2 s
deadlines. The transfer goes on in the background, the callers' retries (as the
external-provisioner and the csi-snapshotter retry an ABORTED call) attach to it,
and one of them gets the result: one download or upload, one volume or manifest.
A transfer past --registry-transfer-timeout is cancelled and leaves nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from csi_driver.client import Client
from driver_harness import Driver, serving, staged
from registry_harness import REGISTRY_BINARY, FaultProxy, LocalRegistry

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

T = TypeVar("T")
MiB = 1 << 20
REPO = "backups/db"
DATA = 6 * MiB  # the snapshot's one layer: ~6 s through the throttle
RATE = MiB  # bytes per second the proxy moves a throttled body
CALLER_DEADLINE = 2.0  # what the sidecar's --timeout is here
ATTEMPTS = 25  # a bounded retry loop: 25 * (2 + 0.1) s at most
PAUSE = 0.1  # short: most transfers end while a retry waits for them
IN_PROGRESS = (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)


def retried(call: Callable[[], T]) -> tuple[T, list[str]]:
    """``call()`` until it succeeds, as the sidecars retry a call in progress (ABORTED or
    DEADLINE_EXCEEDED: external-provisioner checkError, csi-snapshotter isCSIFinalError):
    its result, and the messages of the ABORTED answers before it."""
    answers: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            return call(), answers
        except grpc.RpcError as e:
            assert e.code() in IN_PROGRESS, (e.code(), e.details(), answers)
            if e.code() == grpc.StatusCode.ABORTED:
                answers.append(e.details() or "")
        time.sleep(PAUSE)
    raise AssertionError(f"no success in {ATTEMPTS} attempts: {answers[-3:]}")


def background(answers: list[str]) -> list[str]:
    """The answers that said the transfer goes on; every ABORTED answer must be one of those or
    the per-name guard's (the previous attempt's worker had not quite let go)."""
    going_on = [m for m in answers if "still running in the background" in m]
    assert len(going_on) + sum("is already in progress" in m for m in answers) == len(answers), answers
    return going_on


def fill(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("port = 5432\n")
    (root / "data").mkdir()
    (root / "data" / "table").write_bytes(os.urandom(DATA))


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


def nothing_left(d: Driver) -> None:
    assert d.engine.list_volumes(0, 10) == []
    assert d.engine.layers() == []
    assert d.engine.list_snapshots(0, 10) == []
    assert list((d.state / "tmp").iterdir()) == []


def blob_requests(proxy: FaultProxy, method: str, part: str) -> list[tuple[str, str, int]]:
    return [r for r in proxy.requests if r[0] == method and part in r[1]]


def layer_downloads(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    """GETs of a snapshot's layer blob (a restore fetches no config blob)."""
    return blob_requests(proxy, "GET", "/blobs/sha256:")


def impatient(d: Driver) -> Client:
    """A client of ``d`` whose calls have the sidecar's deadline (close it)."""
    return Client(d.sock, timeout=CALLER_DEADLINE)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[LocalRegistry, FaultProxy, Driver, Path]]:
    """A registry, a proxy in front of it, and node A (which pushes through the proxy);
    node B is started by each test, under the path returned."""
    with ExitStack() as stack:
        reg = stack.enter_context(LocalRegistry(tmp_path / "registry"))
        proxy = stack.enter_context(FaultProxy(reg.url))
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = stack.enter_context(serving(tmp_path / "a", insecure_registries=frozenset({proxy.host})))
        yield reg, proxy, a, tmp_path / "b"


def exported(a: Driver, proxy: FaultProxy) -> tuple[str, dict[str, bytes]]:
    """A volume on A, filled, and its snapshot pushed through the proxy (unthrottled)."""
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:
        fill(root)
        expected = tree(root)
    snap = a.client.create_snapshot("s", vid, parameters={"repository": f"{proxy.host}/{REPO}"})
    assert snap.ready_to_use
    return snap.snapshot_id, expected


def test_a_restore_longer_than_its_callers_deadline_completes(world) -> None:
    _reg, proxy, a, b_root = world
    snapshot_id, expected = exported(a, proxy)
    with serving(b_root, insecure_registries=frozenset({proxy.host})) as b:
        proxy.throttle(r"/blobs/sha256:", RATE, method="GET")
        start = time.monotonic()
        with impatient(b) as client:
            vol, answers = retried(lambda: client.create_volume("restored", 64 * MiB, snapshot=snapshot_id))
        took = time.monotonic() - start
        going_on = background(answers)
        assert len(going_on) >= 2, f"the restore took {took:.1f} s, longer than one caller waits: {answers}"
        assert "MiB moved so far" in going_on[-1], answers
        downloads = layer_downloads(proxy)
        assert [status for _m, _p, status in downloads] == [200], f"one download, never resumed: {downloads}"
        vols = b.engine.list_volumes(0, 10)
        assert [v.id for v in vols] == [vol.volume_id], "one volume"
        assert vol.content_source.snapshot.snapshot_id == snapshot_id
        with staged(b, vol.volume_id) as root:
            assert tree(root) == expected
        b.client.delete_volume(vol.volume_id)
        nothing_left(b)


def test_a_push_longer_than_its_callers_deadline_completes(world) -> None:
    reg, proxy, a, b_root = world
    vid = a.client.create_volume("db", 64 * MiB).volume_id
    with staged(a, vid) as root:
        fill(root)
        expected = tree(root)
    proxy.throttle(r"/blobs/uploads/", RATE, method="PATCH")  # the layer streams in one PATCH
    params = {"repository": f"{proxy.host}/{REPO}"}
    with impatient(a) as client:
        snap, answers = retried(lambda: client.create_snapshot("s", vid, parameters=params))
        again = client.create_snapshot("s", vid, parameters=params)
    assert len(background(answers)) >= 2, answers
    assert snap.ready_to_use and snap.snapshot_id.startswith(f"{proxy.host}/{REPO}:snap-")
    assert [s.id for s in a.engine.list_snapshots(0, 10)] == [snap.snapshot_id], "one snapshot"
    assert len(blob_requests(proxy, "PUT", "/manifests/")) == 1, "the manifest was pushed once"
    assert len(blob_requests(proxy, "POST", "/blobs/uploads/")) == 2, "the layer and the config, once"
    with urllib.request.urlopen(f"{reg.url}/v2/{REPO}/tags/list", timeout=10) as r:
        assert json.load(r)["tags"] == [snap.snapshot_id.rsplit(":", 1)[1]]
    assert again.snapshot_id == snap.snapshot_id and again.ready_to_use
    # what a retry that read the snapshot before the push ended hands the pool: not pushed again
    stale = dataclasses.replace(a.engine.get_snapshot(snap.snapshot_id), exported="")
    assert a.engine.export_snapshot(stale, None).exported
    assert len(blob_requests(proxy, "PUT", "/manifests/")) == 1

    proxy.clear()
    with serving(b_root, insecure_registries=frozenset({proxy.host})) as b:
        restored = b.client.create_volume("copy", 64 * MiB, snapshot=snap.snapshot_id)
        with staged(b, restored.volume_id) as root:
            assert tree(root) == expected, "what was pushed in the background is the whole snapshot"
        b.client.delete_volume(restored.volume_id)


def test_a_transfer_past_its_timeout_is_cancelled_and_leaves_nothing(world) -> None:
    _reg, proxy, a, b_root = world
    snapshot_id, expected = exported(a, proxy)
    with serving(b_root, insecure_registries=frozenset({proxy.host}), registry_transfer_timeout=1.5) as b:
        proxy.throttle(r"/blobs/sha256:", RATE, method="GET")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            b.client.create_volume("restored", 64 * MiB, snapshot=snapshot_id)
        took = time.monotonic() - start
        assert e.value.code() == grpc.StatusCode.ABORTED and took < 6, (e.value, took)
        assert "was cancelled (it ran for 1.5 s, its --registry-transfer-timeout)" in (
            e.value.details() or ""
        )
        assert b.server.ctx.registry.running() == 0
        nothing_left(b)

        proxy.clear()
        vol = b.client.create_volume("restored", 64 * MiB, snapshot=snapshot_id)
        assert len(layer_downloads(proxy)) == 2, "the retry started afresh: a second download"
        with staged(b, vol.volume_id) as root:
            assert tree(root) == expected
        b.client.delete_volume(vol.volume_id)
        nothing_left(b)
