"""Registries that attack the driver: one that trickles a byte at a time, and one
whose error bodies and token answers are 300 MB. Registry work must never starve
the node (Probe, NodeGetCapabilities, stage and publish answer at once), a caller
is answered by its deadline while its transfer goes on until its own
(--registry-transfer-timeout), SIGTERM ends the driver within seconds, transfers
in the background or not, and no body is read whole."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, DriverProcess, cleanup, serving
from registry_harness import HostileRegistry

pytestmark = pytest.mark.mounts

MiB = 1 << 20
CALLS = 20  # more than the server's 16 gRPC workers
CALLER_DEADLINE = 3.0
TRANSFER_TIMEOUT = 4.0  # the driver's --registry-transfer-timeout where a test sets it
PROMPT = 2.0  # what "at once" means for a node call while transfers hang


def snapshot_id(host: str, n: int) -> str:
    return f"{host}/demo/db:snap-{n:032x}"


def restore(client: Client, name: str, source: str, timeout: float) -> tuple[str, float]:
    """CreateVolume from an exported snapshot (or, for ``image:REF``, on a base-layer image):
    the status code's name and how long the answer took."""
    req = restore_request(name, source)
    start = time.monotonic()
    try:
        client.controller.CreateVolume(req, timeout=timeout)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return code, time.monotonic() - start


def restore_request(name: str, source: str) -> csi.CreateVolumeRequest:
    req = csi.CreateVolumeRequest(
        name=name,
        capacity_range=csi.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[
            csi.VolumeCapability(
                mount=csi.VolumeCapability.MountVolume(),
                access_mode=csi.VolumeCapability.AccessMode(mode=1),
            )
        ],
    )
    if source.startswith("image:"):
        req.parameters["baseLayer"] = source.removeprefix("image:")
    else:
        req.volume_content_source.snapshot.snapshot_id = source
    return req


def prompt(what: str, call: Callable[[], object]) -> None:
    start = time.monotonic()
    call()
    took = time.monotonic() - start
    assert took < PROMPT, f"{what} took {took:.2f} s while registry transfers hang"


def wait_until(cond: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, f"{what}: not within {seconds} s"
        time.sleep(0.05)


@contextmanager
def driver_against(tmp_path: Path, reg: HostileRegistry) -> Iterator[DriverProcess]:
    """A driver process in ``tmp_path`` that reaches ``reg`` over plain HTTP; killed, and
    its mounts and loop devices cleaned up, after."""
    driver = DriverProcess(tmp_path, None, "--insecure-registry", reg.host)
    driver.start()
    try:
        yield driver
    finally:
        driver.kill()
        cleanup(tmp_path)


def sigterm(driver: DriverProcess) -> tuple[int | None, float]:
    """SIGTERM the driver: its exit code (None while it still runs 10 s on) and the seconds it took."""
    assert driver.proc is not None
    start = time.monotonic()
    driver.proc.terminate()
    try:
        rc = driver.proc.wait(timeout=10)
    except Exception:
        rc = None
    return rc, time.monotonic() - start


def test_a_trickling_registry_starves_nothing(tmp_path: Path) -> None:
    """20 restores and image pulls from a registry that sends a byte every half
    second, with 3 s deadlines: the node answers everything else at once, every
    caller is answered by its deadline, the transfers end with their own deadline
    (4 s), and nothing is left of them."""
    with HostileRegistry("trickle", interval=0.5) as reg:
        with serving(
            tmp_path, insecure_registries=frozenset({reg.host}), registry_transfer_timeout=TRANSFER_TIMEOUT
        ) as d:
            sources = [snapshot_id(reg.host, n % 3) for n in range(CALLS - 4)]
            sources += [f"image:{reg.host}/base/debian:v{n}" for n in range(4)]
            with ThreadPoolExecutor(CALLS) as pool:
                calls = [
                    pool.submit(restore, d.client, f"pvc-{n}", src, CALLER_DEADLINE)
                    for n, src in enumerate(sources)
                ]
                wait_until(lambda: reg.count("/manifests/") >= 2, 2, "transfers did not start")
                ident, node = d.client.identity, d.client.node
                prompt("Probe", lambda: ident.Probe(csi.ProbeRequest(), timeout=PROMPT))
                prompt(
                    "NodeGetCapabilities",
                    lambda: node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), timeout=PROMPT),
                )
                local = d.client
                local.timeout = PROMPT
                vol: list[csi.Volume] = []
                prompt("CreateVolume (local)", lambda: vol.append(local.create_volume("local", 64 * MiB)))
                staging, target = d.paths("local")
                vid = vol[0].volume_id
                prompt("NodeStageVolume", lambda: local.stage(vid, staging))
                prompt("NodePublishVolume", lambda: local.publish(vid, staging, target))
                prompt("NodeUnpublishVolume", lambda: local.unpublish(vid, target))
                prompt("NodeUnstageVolume", lambda: local.unstage(vid, staging))
                prompt("DeleteVolume", lambda: local.delete_volume(vid))
                results = [c.result(timeout=CALLER_DEADLINE + 5) for c in calls]
            codes = {code for code, _took in results}
            assert codes <= {"ABORTED", "DEADLINE_EXCEEDED"}, results
            # the calls beyond the pool's slots are turned away at once, not queued
            assert any(code == "ABORTED" and took < 1 for code, took in results), results
            assert max(took for _code, took in results) < CALLER_DEADLINE + 1, results
            # the transfers end with their own deadline: threads free, sockets closed, nothing kept
            wait_until(lambda: d.server.ctx.registry.running() == 0, 3, "transfers outlived their deadline")
            wait_until(lambda: reg.open_connections() == 0, 3, "transfers left their sockets open")
            assert d.engine.layers() == [] and d.engine.list_snapshots(0, 10) == []
            assert list((d.state / "tmp").iterdir()) == []
            prompt("Probe", lambda: ident.Probe(csi.ProbeRequest(), timeout=PROMPT))


def test_sigterm_ends_the_driver_with_transfers_hung(tmp_path: Path) -> None:
    """A driver whose registry calls hang on a registry that never answers exits
    within seconds of SIGTERM."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    with HostileRegistry("silent") as reg, driver_against(tmp_path, reg) as driver:
        with Client(driver.sock) as client, ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(restore, client, f"pvc-{n}", snapshot_id(reg.host, n), 60) for n in range(6)]
            wait_until(lambda: reg.count("/manifests/") >= 4, 5, "transfers did not start")
            rc, took = sigterm(driver)
            for c in calls:
                c.result(timeout=10)
        assert rc == 0 and took < 5, f"exit code {rc} after {took:.1f} s"


def test_sigterm_ends_the_driver_with_transfers_in_the_background(tmp_path: Path) -> None:
    """Restores whose callers were answered (2 s deadlines) go on hanging on a silent
    registry; SIGTERM still ends the driver within seconds."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    with HostileRegistry("silent") as reg, driver_against(tmp_path, reg) as driver:
        with Client(driver.sock) as client:
            for n in range(4):
                req = restore_request(f"pvc-{n}", snapshot_id(reg.host, n))
                with pytest.raises(grpc.RpcError) as e:
                    client.controller.CreateVolume(req, timeout=2)
                assert e.value.code() == grpc.StatusCode.ABORTED, e.value
                assert "still running in the background" in (e.value.details() or ""), e.value
        # the transfers were not cancelled with their callers: each still waits on the registry
        wait_until(lambda: reg.open_connections() >= 4, 5, "transfers did not go on")
        rc, took = sigterm(driver)
        assert rc == 0 and took < 5, f"exit code {rc} after {took:.1f} s"


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("huge-error", "NOT_FOUND", "cannot read manifest"),
        ("huge-token", "DATA_LOSS", "the token service's answer exceeds 64 KiB"),
    ],
)
def test_huge_bodies_are_not_read(tmp_path: Path, mode: str, code: str, message: str) -> None:
    """A 300 MB error body or token answer: the driver reads 64 KiB of it, its memory
    stays where it was, and the call fails with a clear code."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    with HostileRegistry(mode, size=300 * MiB) as reg, driver_against(tmp_path, reg) as driver:
        assert driver.proc is not None
        before, _ = peak_rss(driver.proc.pid)
        with Client(driver.sock) as client:
            req = csi.CreateVolumeRequest(
                name="pvc",
                capacity_range=csi.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[
                    csi.VolumeCapability(
                        mount=csi.VolumeCapability.MountVolume(),
                        access_mode=csi.VolumeCapability.AccessMode(mode=1),
                    )
                ],
            )
            req.volume_content_source.snapshot.snapshot_id = snapshot_id(reg.host, 1)
            with pytest.raises(grpc.RpcError) as e:
                client.controller.CreateVolume(req, timeout=20)
        _, peak = peak_rss(driver.proc.pid)
        assert e.value.code().name == code and message in (e.value.details() or ""), e.value
        assert peak - before < 32 * MiB, f"RSS went from {before >> 20} to {peak >> 20} MiB"
        assert driver.terminate() == 0
