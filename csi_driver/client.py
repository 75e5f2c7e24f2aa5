"""A small CSI client over the driver's unix socket (demo, bench, tests, CLI)."""

from __future__ import annotations

from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc

GiB = 1 << 30


def mount_capability(
    mode: int = csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
    fs_type: str = "",
    flags: list[str] | None = None,
) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=flags or []),
        access_mode=csi.VolumeCapability.AccessMode(mode=mode),
    )


class Client:
    def __init__(self, socket: str | Path, timeout: float = 120) -> None:
        target = str(socket)
        self.channel = grpc.insecure_channel(target if target.startswith("unix:") else f"unix://{target}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.timeout = timeout

    def wait_ready(self, seconds: float = 30) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=seconds)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- conveniences used by the demo, bench and tests -------------------
    def create_volume(
        self,
        name: str,
        size: int = GiB,
        *,
        snapshot: str = "",
        volume: str = "",
        parameters: dict[str, str] | None = None,
        cap: csi.VolumeCapability | None = None,
        secrets: dict[str, str] | None = None,
    ) -> csi.Volume:
        req = csi.CreateVolumeRequest(
            name=name,
            capacity_range=csi.CapacityRange(required_bytes=size),
            volume_capabilities=[cap or mount_capability()],
            parameters=parameters or {},
            secrets=secrets or {},
        )
        if snapshot:
            req.volume_content_source.snapshot.snapshot_id = snapshot
        if volume:
            req.volume_content_source.volume.volume_id = volume
        return self.controller.CreateVolume(req, timeout=self.timeout).volume

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume_id), timeout=self.timeout)

    def create_snapshot(
        self,
        name: str,
        volume_id: str,
        *,
        parameters: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
    ) -> csi.Snapshot:
        req = csi.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id, parameters=parameters or {}, secrets=secrets or {}
        )
        return self.controller.CreateSnapshot(req, timeout=self.timeout).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=self.timeout
        )

    def stage(self, volume_id: str, staging: str | Path, cap: csi.VolumeCapability | None = None) -> None:
        self.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=str(staging),
                volume_capability=cap or mount_capability(),
            ),
            timeout=self.timeout,
        )

    def unstage(self, volume_id: str, staging: str | Path) -> None:
        self.node.NodeUnstageVolume(
            csi.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)),
            timeout=self.timeout,
        )

    def publish(
        self,
        volume_id: str,
        staging: str | Path,
        target: str | Path,
        readonly: bool = False,
        cap: csi.VolumeCapability | None = None,
    ) -> None:
        self.node.NodePublishVolume(
            csi.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                readonly=readonly,
                volume_capability=cap or mount_capability(),
            ),
            timeout=self.timeout,
        )

    def unpublish(self, volume_id: str, target: str | Path) -> None:
        self.node.NodeUnpublishVolume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)), timeout=self.timeout
        )

    def stats(self, volume_id: str, path: str | Path) -> csi.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path)), timeout=self.timeout
        )
