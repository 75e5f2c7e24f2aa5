"""The central controller (``--mode controller-expand``): what cluster-wide sidecars ask of a
driver whose volumes are node-local.

* csi-resizer (no per-node mode): expansion as in ``ExpandOnlyControllerServicer``, and
  ControllerModifyVolume relayed to the volume's node through its PersistentVolume
  (kube/modify_relay.py). MODIFY_VOLUME is advertised only when the Kubernetes API is
  there to carry it.
* the registry snapshotter (a csi-snapshotter with --node-deployment under the name the
  chart gives it): pre-provisioned contents that name an exported snapshot are checked
  (ListSnapshots, from the artifact's manifest) and deleted (DeleteSnapshot, its manifest)
  here, since no node holds them; a manifest whose registry cannot be reached is deleted
  later, by a retry in this process (engine/pending_deletes.py), and no longer listed. It
  never takes a snapshot.
"""

from __future__ import annotations

from csi_driver.engine.engine import snapshot_reference
from csi_driver.errors import FailedPrecondition, NotFound
from csi_driver.kube.modify_relay import ModifyRelay, split_parameters
from csi_driver.proto import csi_pb2 as csi
from csi_driver.registry.credentials import Credentials
from csi_driver.service import validate as v
from csi_driver.service.context import DriverContext
from csi_driver.service.controller import snapshot_msg
from csi_driver.service.expand_only import RPC, ExpandOnlyControllerServicer
from csi_driver.service.rpc import rpc

DEFAULT_WAIT_SECONDS = 30.0  # a modification without a gRPC deadline waits this long for its node


class CentralControllerServicer(ExpandOnlyControllerServicer):
    def __init__(self, ctx: DriverContext, relay: ModifyRelay | None = None) -> None:
        super().__init__(ctx)
        self.relay = relay

    @rpc()
    def ControllerGetCapabilities(self, request, context):
        kinds = [RPC.EXPAND_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS]
        if self.relay is not None and self.ctx.engine.modifiable:
            kinds.append(RPC.MODIFY_VOLUME)
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[csi.ControllerServiceCapability(rpc=RPC(type=t)) for t in kinds]
        )

    @rpc(guard=lambda r: [r.volume_id])
    def ControllerModifyVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        if self.relay is None:
            raise FailedPrecondition("no Kubernetes API here to reach the volume's node")
        given = v.string_map(dict(request.mutable_parameters), "mutable_parameters")
        pv_name, params = split_parameters(given)
        # keys and values; what fits the volume's kind its node checks
        self.ctx.engine.validate_mutable(params, "")
        remaining = context.time_remaining() if context is not None else None
        seconds = DEFAULT_WAIT_SECONDS if remaining is None else remaining - 1.0
        self.relay.modify(request.volume_id, pv_name, params, seconds)
        return csi.ControllerModifyVolumeResponse()

    @rpc()
    def CreateSnapshot(self, request, context):
        raise FailedPrecondition(
            "the central controller takes no snapshots: the node plugin that holds "
            f"{request.source_volume_id[:80]!r} does (distributed snapshotting)"
        )

    @rpc(guard=lambda r: [r.snapshot_id])
    def DeleteSnapshot(self, request, context):
        v.known_id(request.snapshot_id, v.SNAPSHOT_ID_RE, "snapshot_id")
        if snapshot_reference(request.snapshot_id) is not None:  # a local id: its node deletes it
            credentials = Credentials.from_secrets(dict(request.secrets))
            engine = self.ctx.engine
            if engine.pending_delete(request.snapshot_id) is not None:  # retried in the background
                engine.delete_snapshot(request.snapshot_id, credentials)
                return csi.DeleteSnapshotResponse()
            self.ctx.registry.run(
                lambda: engine.delete_snapshot(request.snapshot_id, credentials),
                context,
                f"the deletion of snapshot {request.snapshot_id!r}",
                keys=[request.snapshot_id],
            )
        return csi.DeleteSnapshotResponse()

    @rpc()
    def ListSnapshots(self, request, context):
        """Only by id (the snapshotter's GetSnapshotStatus): an exported snapshot, from its
        manifest; anything else is held by no one here, so the list is empty."""
        if not request.snapshot_id or snapshot_reference(request.snapshot_id) is None:
            return csi.ListSnapshotsResponse()
        if self.ctx.engine.pending_delete(request.snapshot_id) is not None:
            return csi.ListSnapshotsResponse()  # deleted: its manifest goes once its registry is back
        credentials = Credentials.from_secrets(dict(request.secrets))
        try:
            snap = self.ctx.registry.run(
                lambda: self.ctx.engine.describe_exported(request.snapshot_id, credentials),
                context,
                f"the lookup of snapshot {request.snapshot_id!r}",
            )
        except NotFound:
            return csi.ListSnapshotsResponse()
        if request.source_volume_id and snap.source_volume_id != request.source_volume_id:
            return csi.ListSnapshotsResponse()
        entry = csi.ListSnapshotsResponse.Entry(snapshot=snapshot_msg(snap))
        return csi.ListSnapshotsResponse(entries=[entry])
