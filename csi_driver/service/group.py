"""CSI GroupController service: crash-consistent snapshots of several volumes."""

from __future__ import annotations

from csi_driver.engine.engine import snapshot_reference
from csi_driver.errors import InvalidArgument, NotFound
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.registry.credentials import Credentials
from csi_driver.service import validate as v
from csi_driver.service.context import DriverContext
from csi_driver.service.controller import snapshot_msg, timestamp
from csi_driver.service.rpc import rpc

GroupRPC = csi.GroupControllerServiceCapability.RPC
MAX_MEMBERS = 64


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.locks = ctx.locks

    def _msg(self, group: dict, snaps) -> csi.VolumeGroupSnapshot:
        return csi.VolumeGroupSnapshot(
            group_snapshot_id=group["id"],
            snapshots=[snapshot_msg(s) for s in snaps],
            creation_time=timestamp(group["created_at"]),
            ready_to_use=all(s.exported or snapshot_reference(s.id) is None for s in snaps),
        )

    @rpc(guard=lambda r: ["group:" + r.name, *r.source_volume_ids])
    def CreateVolumeGroupSnapshot(self, request, context):
        name = v.name(request.name)
        ids = list(request.source_volume_ids)
        if not ids:
            raise InvalidArgument("source_volume_ids are required")
        if len(ids) > MAX_MEMBERS:
            raise InvalidArgument(f"at most {MAX_MEMBERS} volumes per group snapshot")
        params = v.string_map(dict(request.parameters), "parameters")
        unknown = sorted(k for k in params if k != "repository" and not k.startswith(v.PARAM_PREFIX))
        if unknown:
            raise InvalidArgument(f"unknown group snapshot parameters {unknown}; supported: ['repository']")
        repository = v.snapshot_parameters(params).repository
        for vid in ids:
            if not v.VOLUME_ID_RE.match(vid):
                raise NotFound(f"volume {vid[:80]!r} does not exist")
        group, snaps = self.engine.create_group_snapshot(name, ids, repository)
        if repository is not None and not all(s.exported for s in snaps):
            credentials = Credentials.from_secrets(dict(request.secrets))
            group, snaps = self.ctx.registry.run(
                lambda: self.engine.export_group(group["id"], credentials),
                context,
                f"the push of group snapshot {name!r}",
                keys=["groupname:" + name],
            )
        return csi.CreateVolumeGroupSnapshotResponse(group_snapshot=self._msg(group, snaps))

    @rpc(guard=lambda r: [r.group_snapshot_id])
    def DeleteVolumeGroupSnapshot(self, request, context):
        if v.known_id(request.group_snapshot_id, v.GROUP_ID_RE, "group_snapshot_id"):
            found = self.engine.get_group_snapshot(request.group_snapshot_id)
            exported = found is not None and any(snapshot_reference(s.id) for s in found[1])
            credentials = Credentials.from_secrets(dict(request.secrets)) if exported else None
            if exported:  # its members' manifests go from their registry first
                self.ctx.registry.run(
                    lambda: self.engine.delete_group_snapshot(request.group_snapshot_id, credentials),
                    context,
                    f"the deletion of group snapshot {request.group_snapshot_id!r}",
                    keys=[request.group_snapshot_id],
                )
            else:
                self.engine.delete_group_snapshot(request.group_snapshot_id)
        return csi.DeleteVolumeGroupSnapshotResponse()

    @rpc()
    def GetVolumeGroupSnapshot(self, request, context):
        found = None
        if v.known_id(request.group_snapshot_id, v.GROUP_ID_RE, "group_snapshot_id"):
            found = self.engine.get_group_snapshot(request.group_snapshot_id)
        if found is None:
            raise NotFound(f"group snapshot {request.group_snapshot_id[:80]!r} does not exist")
        return csi.GetVolumeGroupSnapshotResponse(group_snapshot=self._msg(*found))

    @rpc()
    def GroupControllerGetCapabilities(self, request, context):
        return csi.GroupControllerGetCapabilitiesResponse(
            capabilities=[
                csi.GroupControllerServiceCapability(
                    rpc=GroupRPC(type=GroupRPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
                )
            ]
        )
