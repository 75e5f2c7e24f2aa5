"""Fields the CSI spec marks secret never reach the logs, at any verbosity."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, DriverProcess, cleanup

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

MiB = 1 << 20


def fill_secrets(msg: Message, secret: dict[str, str]) -> int:
    """Set every csi_secret field in ``msg`` (at any depth); return how many."""
    n = 0
    for fd in msg.DESCRIPTOR.fields:
        if fd.GetOptions().Extensions[csi.csi_secret]:
            getattr(msg, fd.name).update(secret)
            n += 1
        elif fd.message_type is not None and not fd.is_repeated and msg.HasField(fd.name):
            n += fill_secrets(getattr(msg, fd.name), secret)
    return n


def secret_fields() -> set[tuple[str, str]]:
    out = set()
    for name, desc in csi.DESCRIPTOR.message_types_by_name.items():
        for fd in desc.fields:
            if fd.GetOptions().Extensions[csi.csi_secret]:
                out.add((name, fd.name))
    return out


def _phases(vol: str, staging: Path, target: str, snaps) -> list[list[tuple[str, str, Message]]]:
    """The happy path of every call that carries secrets, in an order where each succeeds."""
    cap = mount_capability()
    cr = csi.CapacityRange(required_bytes=32 * MiB)
    if snaps is None:
        return [[
            ("Controller", "CreateVolume", csi.CreateVolumeRequest(
                name="w", capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[cap])),
            ("Controller", "ValidateVolumeCapabilities", csi.ValidateVolumeCapabilitiesRequest(
                volume_id=vol, volume_capabilities=[cap])),
            ("Controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
                volume_id=vol, node_id="node-1", volume_capability=cap)),
            ("Node", "NodeStageVolume", csi.NodeStageVolumeRequest(
                volume_id=vol, staging_target_path=str(staging), volume_capability=cap)),
            ("Node", "NodePublishVolume", csi.NodePublishVolumeRequest(
                volume_id=vol, staging_target_path=str(staging), target_path=target, volume_capability=cap)),
            ("Controller", "CreateSnapshot", csi.CreateSnapshotRequest(name="s", source_volume_id=vol)),
            ("Controller", "ListSnapshots", csi.ListSnapshotsRequest()),
            ("GroupController", "CreateVolumeGroupSnapshot", csi.CreateVolumeGroupSnapshotRequest(
                name="g", source_volume_ids=[vol])),
            ("Controller", "ControllerExpandVolume", csi.ControllerExpandVolumeRequest(
                volume_id=vol, capacity_range=cr)),
            ("Node", "NodeExpandVolume", csi.NodeExpandVolumeRequest(
                volume_id=vol, volume_path=target, capacity_range=cr)),
            ("Controller", "ControllerModifyVolume", csi.ControllerModifyVolumeRequest(volume_id=vol)),
        ]]
    sid = next((e.snapshot.snapshot_id for e in snaps if not e.snapshot.group_snapshot_id), "")
    gid = next((e.snapshot.group_snapshot_id for e in snaps if e.snapshot.group_snapshot_id), "")
    return [[
        ("Controller", "GetSnapshot", csi.GetSnapshotRequest(snapshot_id=sid)),
        ("Controller", "DeleteSnapshot", csi.DeleteSnapshotRequest(snapshot_id=sid)),
        ("GroupController", "GetVolumeGroupSnapshot",
         csi.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid)),
        ("GroupController", "DeleteVolumeGroupSnapshot",
         csi.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid)),
        ("Node", "NodeUnpublishVolume", csi.NodeUnpublishVolumeRequest(volume_id=vol, target_path=target)),
        ("Node", "NodeUnstageVolume", csi.NodeUnstageVolumeRequest(
            volume_id=vol, staging_target_path=str(staging))),
        ("Controller", "ControllerUnpublishVolume", csi.ControllerUnpublishVolumeRequest(
            volume_id=vol, node_id="node-1")),
        ("Controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id=vol)),
    ]]


def test_secrets_never_reach_the_logs(tmp_path: Path):
    marker = "S3CRET" + uuid.uuid4().hex
    secret = {"password": marker, f"key-{marker}": "value", "token": marker[::-1] + marker}
    proc = DriverProcess(tmp_path, None, "-v", "5", "--log-format", "json")
    proc.start()
    sent: set[tuple[str, str]] = set()
    codes: dict[str, str] = {}
    try:
        with Client(proc.sock) as c:

            def send(service: str, method: str, request: Message, streaming: bool = False) -> str:
                fill_secrets(request, secret)
                for fd in request.DESCRIPTOR.fields:
                    if fd.GetOptions().Extensions[csi.csi_secret]:
                        sent.add((type(request).__name__, fd.name))
                kind = c.channel.unary_stream if streaming else c.channel.unary_unary
                call = kind(f"/csi.v1.{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=lambda b: b)
                try:
                    answer = call(request, timeout=60)
                    if streaming:
                        list(answer)
                except grpc.RpcError as e:
                    return e.code().name
                return "OK"

            staging = tmp_path / "kubelet" / "staging"
            target = tmp_path / "kubelet" / "pods" / "p" / "mount"
            staging.mkdir(parents=True)
            target.parent.mkdir(parents=True)
            vol = c.create_volume("v", 16 * MiB).volume_id
            for phase in (None, True):
                snaps = c.controller.ListSnapshots(csi.ListSnapshotsRequest()).entries if phase else None
                for calls in _phases(vol, staging, str(target), snaps):
                    for service, method, request in calls:
                        codes[method] = send(service, method, request)
            # ... and the error paths: every request type carrying only its secrets
            for svc in csi.DESCRIPTOR.services_by_name.values():
                for m in svc.methods:
                    req = getattr(csi, m.input_type.name)()
                    if not m.client_streaming and fill_secrets(req, secret):
                        codes[f"{m.name} (bare)"] = send(svc.name, m.name, req, m.server_streaming)
        assert codes["CreateVolume"] == "OK" and codes["NodePublishVolume"] == "OK", codes
        assert not {k: v for k, v in codes.items() if v in ("UNKNOWN", "INTERNAL")}, codes
    finally:
        proc.terminate()
        cleanup(tmp_path)
    assert sent == secret_fields(), f"secret fields not exercised: {secret_fields() - sent}"
    log = proc.log.read_text()
    assert '"level": "debug"' in log and "***stripped***" in log, "the run did not log requests at debug"
    assert marker not in log and marker[::-1] not in log, "a secret reached the log"
