"""DeleteSnapshot of an exported snapshot while its registry is down (a real registry,
stopped and started again on its port): the call answers OK, the snapshot is gone and
listed nowhere, and its manifest's deletion is recorded and retried in the background
until the registry is back, across a driver restart too, on a node and on the central
instance. Refused credentials still fail the call and record nothing."""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2 as csi
from csi_driver.service.pending_deletes import DeleteRetrier
from driver_harness import Driver, serving
from registry_harness import REGISTRY_BINARY, LocalRegistry

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

MiB = 1 << 20
REPO = "backups/db"
WAIT = 60.0  # seconds a background retry may take to show (each look is bounded)
PENDING = "overlay_csi_registry_pending_deletes"
RETRIES = "overlay_csi_registry_delete_retries_total"
LOGIN = ("robot", "s3cret-pass")


def code_of(call: Callable[..., object], *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value.code(), e.value.details()


def wait_until(what: str, cond: Callable[[], bool], seconds: float = WAIT) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        time.sleep(0.05)


def quick(d: Driver) -> None:
    """Retries due 0.2 s after a failure (doubling), looked for every 0.05 s."""
    d.engine.pending_deletes.first = 0.2
    d.engine.pending_deletes.longest = 1.0
    retrier = next(w for w in d.server.background if isinstance(w, DeleteRetrier))
    retrier.interval = 0.05


def manifest_status(reg: LocalRegistry, digest: str) -> int:
    """What the registry answers to GET of the manifest (its own view, not the driver's)."""
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if reg.username is not None:
        token = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=10)
    try:
        conn.request("GET", f"/v2/{REPO}/manifests/{digest}", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def delete(d: Driver, sid: str, secrets: dict[str, str] | None = None) -> None:
    d.client.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=sid, secrets=secrets or {}))


def listed(d: Driver, sid: str) -> tuple[list[str], list[str]]:
    """(ListSnapshots' ids, ListSnapshots by id's ids)."""
    every = d.client.controller.ListSnapshots(csi.ListSnapshotsRequest())
    one = d.client.controller.ListSnapshots(csi.ListSnapshotsRequest(snapshot_id=sid))
    return [e.snapshot.snapshot_id for e in every.entries], [e.snapshot.snapshot_id for e in one.entries]


def metric(d: Driver, name: str, **labels: str) -> float:
    assert d.server.metrics is not None
    return d.server.metrics.registry.get_sample_value(name, labels) or 0.0


def exported(d: Driver, reg: LocalRegistry, secrets: dict[str, str] | None = None) -> tuple[str, str]:
    """A snapshot pushed to ``reg``: (its id, its manifest's digest)."""
    vid = d.client.create_volume("v", 64 * MiB).volume_id
    params = {"repository": f"{reg.host}/{REPO}"}
    sid = d.client.create_snapshot("s", vid, parameters=params, secrets=secrets).snapshot_id
    snap = d.engine.get_snapshot(sid)
    assert snap is not None and snap.exported
    assert manifest_status(reg, snap.exported) == 200
    return sid, snap.exported


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "registry") as reg:
        yield reg


def test_a_delete_while_the_registry_is_down_answers_ok_and_deletes_the_manifest_once_it_is_back(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    reg = registry
    root = tmp_path / "node"
    root.mkdir()
    with serving(root, insecure_registries=frozenset({reg.host}), metrics_address="127.0.0.1:0") as a:
        quick(a)
        sid, digest = exported(a, reg)
        reg.stop()

        delete(a, sid)  # the registry refuses connections: OK all the same
        assert a.engine.get_snapshot(sid) is None, "the local snapshot is gone as on success"
        assert listed(a, sid) == ([], []), "listed nowhere: the snapshotter sees it deleted"
        [pending] = a.engine.pending_deletes.all()
        assert (pending.snapshot_id, pending.digest) == (sid, digest)
        assert "127.0.0.1" in pending.last_error, pending.last_error
        assert metric(a, PENDING) == 1
        delete(a, sid)  # the snapshotter's retry, or a second delete: OK, one record
        assert [p.snapshot_id for p in a.engine.pending_deletes.all()] == [sid]
        code, message = code_of(lambda: a.client.create_volume("restore", 64 * MiB, snapshot=sid))
        assert code == grpc.StatusCode.NOT_FOUND and "was deleted" in message, message

        wait_until(
            "a retry failed while the registry is down", lambda: metric(a, RETRIES, result="failed") >= 1
        )
        [pending] = a.engine.pending_deletes.all()
        assert pending.attempts >= 1 and pending.last_error, pending

        reg.start()
        wait_until("the pending deletion is done", lambda: a.engine.pending_deletes.all() == [])
        assert manifest_status(reg, digest) == 404, "no orphaned manifest once the registry is back"
        assert metric(a, PENDING) == 0
        assert metric(a, RETRIES, result="completed") == 1
        delete(a, sid)  # and a late retry of the call finds nothing to do
        assert a.engine.pending_deletes.all() == []


def test_refused_credentials_still_fail_and_record_nothing(tmp_path: Path) -> None:
    """An auth failure is the operator's to fix: UNAUTHENTICATED, the snapshot kept."""
    with ExitStack() as stack:
        reg = stack.enter_context(LocalRegistry(tmp_path / "registry", username=LOGIN[0], password=LOGIN[1]))
        root = tmp_path / "node"
        root.mkdir()
        a = stack.enter_context(serving(root, insecure_registries=frozenset({reg.host})))
        good = {"username": LOGIN[0], "password": LOGIN[1], "registry": reg.host}
        sid, digest = exported(a, reg, good)

        code, message = code_of(delete, a, sid, {**good, "password": "wrong"})
        assert code == grpc.StatusCode.UNAUTHENTICATED, message
        code, message = code_of(delete, a, sid)  # no credentials for a registry that wants them
        assert code == grpc.StatusCode.UNAUTHENTICATED, message
        assert a.engine.pending_deletes.all() == [], "nothing recorded"
        assert a.engine.get_snapshot(sid) is not None and manifest_status(reg, digest) == 200

        delete(a, sid, good)
        assert a.engine.get_snapshot(sid) is None and manifest_status(reg, digest) == 404


def test_pending_deletes_survive_a_restart_and_are_retried(tmp_path: Path, registry: LocalRegistry) -> None:
    """An anonymous registry: the next driver retries the recorded deletion at once."""
    reg = registry
    root = tmp_path / "node"
    root.mkdir()
    insecure = frozenset({reg.host})
    with serving(root, insecure_registries=insecure) as a:
        sid, digest = exported(a, reg)
        reg.stop()
        delete(a, sid)
        assert [p.snapshot_id for p in a.engine.pending_deletes.all()] == [sid]
    reg.start()
    with serving(root, insecure_registries=insecure) as b:
        wait_until("the next driver's retry", lambda: b.engine.pending_deletes.all() == [])
        assert manifest_status(reg, digest) == 404
        assert listed(b, sid) == ([], [])


def test_after_a_restart_a_registry_that_wants_a_login_keeps_the_delete_pending_until_asked_again(
    tmp_path: Path,
) -> None:
    """Credentials live in memory only: the next driver asks anonymously, is refused, says
    that credentials are needed; a DeleteSnapshot with them finishes the deletion."""
    with ExitStack() as stack:
        reg = stack.enter_context(LocalRegistry(tmp_path / "registry", username=LOGIN[0], password=LOGIN[1]))
        good = {"username": LOGIN[0], "password": LOGIN[1], "registry": reg.host}
        root = tmp_path / "node"
        root.mkdir()
        insecure = frozenset({reg.host})
        with serving(root, insecure_registries=insecure) as a:
            sid, digest = exported(a, reg, good)
            reg.stop()
            delete(a, sid, good)
        assert LOGIN[1] not in (root / "state" / "state.db").read_bytes().decode(errors="replace")
        reg.start()
        b = stack.enter_context(serving(root, insecure_registries=insecure))
        quick(b)

        def refused() -> bool:
            return any("credentials are needed" in p.last_error for p in b.engine.pending_deletes.all())

        wait_until("an anonymous retry refused", refused)
        assert manifest_status(reg, digest) == 200, "the manifest stays while no login is known"
        delete(b, sid, good)  # OK at once; the retry, due now, has the login
        wait_until("the retry with the login", lambda: b.engine.pending_deletes.all() == [])
        assert manifest_status(reg, digest) == 404


def test_the_central_instance_records_and_retries_a_delete_too(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    """The registry snapshotter's DeleteSnapshot of a pre-provisioned content (no node holds
    it): OK while the registry is down, not listed, the manifest deleted once it is back."""
    reg = registry
    insecure = frozenset({reg.host})
    node_root, central_root = tmp_path / "node", tmp_path / "central"
    node_root.mkdir()
    central_root.mkdir()
    with serving(node_root, insecure_registries=insecure) as a:
        sid, digest = exported(a, reg)
    central = Driver(
        central_root,
        node_id="central",
        mode="controller-expand",
        kubernetes="off",
        insecure_registries=insecure,
        metrics_address="127.0.0.1:0",
    )
    try:
        quick(central)
        one = csi.ListSnapshotsRequest(snapshot_id=sid)
        assert len(central.client.controller.ListSnapshots(one).entries) == 1
        reg.stop()
        delete(central, sid)
        delete(central, sid)
        assert [p.snapshot_id for p in central.engine.pending_deletes.all()] == [sid]
        assert list(central.client.controller.ListSnapshots(one).entries) == [], "deleted: not listed"
        assert metric(central, PENDING) == 1
        reg.start()
        wait_until("the central instance's retry", lambda: central.engine.pending_deletes.all() == [])
        assert manifest_status(reg, digest) == 404
        assert metric(central, PENDING) == 0
    finally:
        central.stop()
