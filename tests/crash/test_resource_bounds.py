"""One caller cannot exhaust the node: message size, concurrent calls, map sizes."""

from __future__ import annotations

import threading
import time

import grpc

from csi_driver import server
from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import Driver, assert_invariants, teardown_all

MiB = 1 << 20


def _code(call, request) -> str:
    try:
        call(request, timeout=60)
    except grpc.RpcError as e:
        return e.code().name
    return "OK"


def test_oversized_message_is_refused(driver: Driver):
    c = driver.client
    req = csi.CreateVolumeRequest(name="big", volume_capabilities=[mount_capability()],
                                  parameters={"csi.storage.k8s.io/pad": "x" * (server.MAX_MESSAGE + 1)})
    assert _code(c.controller.CreateVolume, req) == "RESOURCE_EXHAUSTED"
    secrets = {f"k{i}": "x" * 4096 for i in range(server.MAX_MESSAGE // 4096 + 1)}
    assert _code(c.node.NodeStageVolume, csi.NodeStageVolumeRequest(secrets=secrets)) == "RESOURCE_EXHAUSTED"
    assert c.identity.Probe(csi.ProbeRequest()).ready.value, "the driver survives it"


def test_calls_over_the_concurrency_cap_are_refused_not_queued(driver: Driver):
    c = driver.client
    parked = threading.Semaphore(0)
    release = threading.Event()

    def gate(step: str) -> None:
        if step == "create.built":
            parked.release()
            assert release.wait(120)

    driver.engine.steps.hook = gate
    n = server.MAX_CONCURRENT_RPCS + 24
    futures = [
        c.controller.CreateVolume.future(
            csi.CreateVolumeRequest(name=f"v{i}", volume_capabilities=[mount_capability()],
                                    capacity_range=csi.CapacityRange(required_bytes=MiB)),
            timeout=120,
        )
        for i in range(n)
    ]
    for _ in range(server.WORKERS):  # every worker is busy and parked
        assert parked.acquire(timeout=60)
    deadline = time.monotonic() + 30
    refused = []
    while time.monotonic() < deadline and len(refused) < n - server.MAX_CONCURRENT_RPCS:
        refused = [f for f in futures if f.done()]
        time.sleep(0.05)
    codes = {f.code().name for f in refused}
    assert len(refused) >= n - server.MAX_CONCURRENT_RPCS and codes == {"RESOURCE_EXHAUSTED"}, (
        f"{len(refused)} of {n} calls answered while {server.WORKERS} were parked: {codes}"
    )
    assert not any(f.done() for f in futures if f not in refused)
    release.set()
    driver.engine.steps.hook = lambda step: None
    done = [f.code().name for f in futures]
    assert done.count("OK") == n - len(refused), done
    assert_invariants(driver.state, c, root=driver.root)
    teardown_all(c, driver.state)


HUGE = {f"csi.storage.k8s.io/k{i}": "v" for i in range(10_000)}


def test_huge_maps_are_invalid_argument(driver: Driver):
    c = driver.client
    vol = c.create_volume("v", 16 * MiB).volume_id
    staging, target = driver.paths("v")
    cap = mount_capability()
    cases = {
        "CreateVolume.parameters": (c.controller.CreateVolume, csi.CreateVolumeRequest(
            name="x", volume_capabilities=[cap], parameters=HUGE)),
        "CreateVolume.mutable_parameters": (c.controller.CreateVolume, csi.CreateVolumeRequest(
            name="x", volume_capabilities=[cap], mutable_parameters=HUGE)),
        "GetCapacity.parameters": (c.controller.GetCapacity, csi.GetCapacityRequest(parameters=HUGE)),
        "CreateSnapshot.parameters": (c.controller.CreateSnapshot, csi.CreateSnapshotRequest(
            name="s", source_volume_id=vol, parameters=HUGE)),
        "ControllerModifyVolume.mutable_parameters": (
            c.controller.ControllerModifyVolume,
            csi.ControllerModifyVolumeRequest(volume_id=vol, mutable_parameters=HUGE)),
        "NodeStageVolume.volume_context": (c.node.NodeStageVolume, csi.NodeStageVolumeRequest(
            volume_id=vol, staging_target_path=str(staging), volume_capability=cap, volume_context=HUGE)),
        "NodeStageVolume.publish_context": (c.node.NodeStageVolume, csi.NodeStageVolumeRequest(
            volume_id=vol, staging_target_path=str(staging), volume_capability=cap, publish_context=HUGE)),
        "NodePublishVolume.volume_context": (c.node.NodePublishVolume, csi.NodePublishVolumeRequest(
            volume_id=vol, staging_target_path=str(staging), target_path=str(target), volume_capability=cap,
            volume_context=HUGE)),
        "NodePublishVolume.ephemeral": (c.node.NodePublishVolume, csi.NodePublishVolumeRequest(
            volume_id="inline-1", target_path=str(target), volume_capability=cap,
            volume_context={**HUGE, "csi.storage.k8s.io/ephemeral": "true"})),
    }
    codes = {what: _code(call, req) for what, (call, req) in cases.items()}
    # the spec's answer to parameters the driver does not accept: OK, not confirmed, with a message
    resp = c.controller.ValidateVolumeCapabilities(
        csi.ValidateVolumeCapabilitiesRequest(volume_id=vol, volume_capabilities=[cap], parameters=HUGE))
    assert not resp.HasField("confirmed") and resp.message
    assert {k: v for k, v in codes.items() if v != "INVALID_ARGUMENT"} == {}, codes
    # secrets are opaque to this driver: bounded by the message size, answered with a spec code
    req = csi.DeleteVolumeRequest(volume_id="vol-" + "0" * 32, secrets=HUGE)
    secrets = _code(c.controller.DeleteVolume, req)
    assert secrets in ("OK", "INVALID_ARGUMENT")
    assert_invariants(driver.state, c, root=driver.root)
    teardown_all(c, driver.state)


def test_listing_is_bounded_per_request(driver: Driver):
    c = driver.client
    for i in range(3):
        c.create_volume(f"v{i}", 16 * MiB)
    page = c.controller.ListVolumes(csi.ListVolumesRequest(max_entries=2**31 - 1))
    assert len(page.entries) == 3
    assert _code(c.controller.ListVolumes, csi.ListVolumesRequest(max_entries=-1)) == "INVALID_ARGUMENT"
    assert _code(c.controller.ListVolumes, csi.ListVolumesRequest(starting_token="9" * 40)) == "ABORTED"
