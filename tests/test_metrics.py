"""Prometheus metrics, scraped over HTTP from a real server while a workload runs:
counters move by exactly the calls made, state gauges follow the volumes,
snapshots, layers, mounts and loop devices, and in-flight returns to 0."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, Driver, DriverProcess, serving

MiB = 1 << 20
Labels = tuple[tuple[str, str], ...]


@pytest.fixture
def mdriver(tmp_path: Path) -> Iterator[Driver]:
    with serving(tmp_path, metrics_address="127.0.0.1:0") as d:
        yield d


def scrape(port: int) -> dict[tuple[str, Labels], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(m: dict, method: str, code: str = "OK") -> float:
    return val(m, "overlay_csi_rpc_requests_total", method=method, code=code)


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value.code()


def test_metrics_follow_a_workload(mdriver: Driver):
    c, port = mdriver.client, mdriver.server.metrics.port
    assert port > 0
    m0 = scrape(port)
    assert val(m0, "overlay_csi_collector_up") == 1
    assert (
        val(
            m0,
            "overlay_csi_build_info",
            driver_name="overlay.csi.dev",
            node_id="node-1",
            version=__import__("csi_driver").__version__,
        )
        == 1
    )
    for state in ("detached", "staged", "published"):
        assert val(m0, "overlay_csi_volumes", state=state) == 0
    assert val(m0, "overlay_csi_provisioned_bytes") == 0
    assert val(m0, "overlay_csi_backing_free_bytes") > 0

    # two volumes: counters +2, provisioned is the sum of capacities, allocation stays thin
    a = c.create_volume("pv-a", 64 * MiB)
    b = c.create_volume("pv-b", 128 * MiB)
    c.create_volume("pv-a", 64 * MiB)  # idempotent repeat: a third OK call, no new volume
    m1 = scrape(port)
    assert calls(m1, "CreateVolume") - calls(m0, "CreateVolume") == 3
    assert (
        val(m1, "overlay_csi_rpc_duration_seconds_count", method="CreateVolume")
        - val(m0, "overlay_csi_rpc_duration_seconds_count", method="CreateVolume")
        == 3
    )
    assert val(m1, "overlay_csi_provisioned_bytes") == 192 * MiB
    assert val(m1, "overlay_csi_volumes", state="detached") == 2
    assert val(m1, "overlay_csi_layers", state="active") == 2
    allocated = val(m1, "overlay_csi_allocated_bytes")
    assert allocated == mdriver.engine.disk_usage(), "the same figure as the engine's"
    assert 0 < allocated < 32 * MiB, "fresh volumes cost a few MiB, not their capacity"
    assert val(m1, "overlay_csi_thin_provisioning_ratio") == pytest.approx(192 * MiB / allocated)
    # what the node promised: both volumes' whole images; what it can still promise
    images = sum(x.image_bytes for x in mdriver.engine.layers() if x.active)
    assert images > 192 * MiB and val(m1, "overlay_csi_promised_bytes") == images
    assert val(m1, "overlay_csi_storage_low") == 0
    assert val(m1, "overlay_csi_storage_rationed") == 0, "one small volume on a roomy disk"
    assert val(m1, "overlay_csi_store_reserve_held") == 1
    promisable = val(m1, "overlay_csi_promisable_bytes")
    assert 0 < promisable < val(m1, "overlay_csi_backing_free_bytes") - images + 64 * MiB

    # failures are counted by their status code
    missing = "vol-" + "0" * 32
    assert (
        code_of(c.controller.ControllerGetVolume, csi.ControllerGetVolumeRequest(volume_id=missing))
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(c.create_volume, "pv-a", 256 * MiB) == grpc.StatusCode.ALREADY_EXISTS
    m2 = scrape(port)
    assert calls(m2, "ControllerGetVolume", "NOT_FOUND") - calls(m1, "ControllerGetVolume", "NOT_FOUND") == 1
    assert calls(m2, "CreateVolume", "ALREADY_EXISTS") - calls(m1, "CreateVolume", "ALREADY_EXISTS") == 1
    assert calls(m2, "CreateVolume") == calls(m1, "CreateVolume"), "errors are not counted as OK"

    # stage + publish one, write 16 MiB: mounts, loop devices and allocation follow
    staging, target = mdriver.paths("pv-a")
    c.stage(a.volume_id, staging)
    c.publish(a.volume_id, staging, target)
    with open(target / "data", "wb") as f:
        f.write(os.urandom(16 * MiB))
        os.fsync(f.fileno())
    m3 = scrape(port)
    assert val(m3, "overlay_csi_volumes", state="published") == 1
    assert val(m3, "overlay_csi_volumes", state="detached") == 1
    assert val(m3, "overlay_csi_mounts", kind="stage") == 1
    assert val(m3, "overlay_csi_mounts", kind="publish") == 1
    assert val(m3, "overlay_csi_mounts", kind="layer") == 1
    assert val(m3, "overlay_csi_loop_devices") == 1
    assert val(m3, "overlay_csi_allocated_bytes") - allocated >= 16 * MiB

    # snapshot it in use (a copy): one committed layer, one snapshot
    snap = c.create_snapshot("snap-a", a.volume_id)
    m4 = scrape(port)
    assert val(m4, "overlay_csi_snapshots", state="source_present") == 1
    assert val(m4, "overlay_csi_layers", state="committed") == 1
    assert val(m4, "overlay_csi_snapshot_bytes") == snap.size_bytes >= 16 * MiB
    assert val(m4, "overlay_csi_layer_depth_max") == 1

    # undo it all: gauges return to zero, counters only grow
    c.unpublish(a.volume_id, target)
    m5 = scrape(port)
    assert val(m5, "overlay_csi_volumes", state="staged") == 1
    assert val(m5, "overlay_csi_mounts", kind="publish") == 0
    c.unstage(a.volume_id, staging)
    c.delete_volume(a.volume_id)
    m6 = scrape(port)
    assert val(m6, "overlay_csi_mounts", kind="stage") == val(m6, "overlay_csi_mounts", kind="layer") == 0
    assert val(m6, "overlay_csi_loop_devices") == 0
    assert val(m6, "overlay_csi_snapshots", state="source_deleted") == 1
    assert val(m6, "overlay_csi_provisioned_bytes") == 128 * MiB
    c.delete_snapshot(snap.snapshot_id)
    c.delete_volume(b.volume_id)
    m7 = scrape(port)
    assert val(m7, "overlay_csi_provisioned_bytes") == 0
    assert val(m7, "overlay_csi_allocated_bytes") == 0
    assert sum(val(m7, "overlay_csi_layers", state=s) for s in ("active", "committed", "base")) == 0
    assert sum(val(m7, "overlay_csi_snapshots", state=s) for s in ("source_present", "source_deleted")) == 0
    for method in ("CreateVolume", "DeleteVolume", "NodeStageVolume", "NodePublishVolume", "CreateSnapshot"):
        assert val(m7, "overlay_csi_rpc_in_flight", method=method) == 0
    assert calls(m7, "DeleteVolume") - calls(m0, "DeleteVolume") == 2
    assert calls(m7, "DeleteSnapshot") - calls(m0, "DeleteSnapshot") == 1


def test_in_flight_and_latency_of_a_slow_call(mdriver: Driver):
    """A CreateVolume held inside the engine shows as in flight, then leaves the
    gauge at 0 and lands in the latency histogram above the time it was held."""
    port = mdriver.server.metrics.port
    engine = mdriver.engine
    entered, release = threading.Event(), threading.Event()
    real = engine.create_volume

    def held(spec, *rest):
        entered.set()
        assert release.wait(30)
        return real(spec, *rest)

    engine.create_volume = held
    before = scrape(port)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(vol=mdriver.client.create_volume("slow", 16 * MiB)))
    t.start()
    try:
        assert entered.wait(30)
        during = scrape(port)
        assert val(during, "overlay_csi_rpc_in_flight", method="CreateVolume") == 1
        time.sleep(0.3)
    finally:
        release.set()
        t.join(30)
        del engine.create_volume
    after = scrape(port)
    assert val(after, "overlay_csi_rpc_in_flight", method="CreateVolume") == 0
    assert calls(after, "CreateVolume") - calls(before, "CreateVolume") == 1
    hist = "overlay_csi_rpc_duration_seconds"
    assert (
        val(after, f"{hist}_sum", method="CreateVolume") - val(before, f"{hist}_sum", method="CreateVolume")
        >= 0.3
    )
    fast = val(after, f"{hist}_bucket", method="CreateVolume", le="0.25")
    assert fast == val(before, f"{hist}_bucket", method="CreateVolume", le="0.25"), "not a fast call"
    mdriver.client.delete_volume(result["vol"].volume_id)


def test_no_metrics_unless_asked(driver: Driver):
    assert driver.server.metrics is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_flag_exposes_metrics(tmp_path: Path):
    """``overlay-csi serve --metrics-address`` as a process: scrapeable, and SIGTERM still exits 0."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    port = free_port()
    proc = DriverProcess(tmp_path, None, "--metrics-address", f"127.0.0.1:{port}")
    proc.start()
    try:
        from csi_driver.client import Client

        with Client(proc.sock) as c:
            c.identity.Probe(csi.ProbeRequest())
            vol = c.create_volume("pv-1", 32 * MiB)
        m = scrape(port)
        assert calls(m, "Probe") >= 1 and calls(m, "CreateVolume") == 1
        assert val(m, "overlay_csi_provisioned_bytes") == 32 * MiB
        assert val(m, "process_resident_memory_bytes") > 0
        with Client(proc.sock) as c:
            c.delete_volume(vol.volume_id)
        assert "serving metrics on http://127.0.0.1:" in proc.log.read_text()
    finally:
        rc = proc.terminate() if proc.proc and proc.proc.poll() is None else proc.proc.returncode
    assert rc == 0
    with pytest.raises(OSError):
        scrape(port)
