"""CSI Controller service: translate requests into engine calls, nothing more."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from csi_driver.engine.engine import VolumeSpec, snapshot_reference
from csi_driver.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted
from csi_driver.ids import node_of
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.registry.credentials import Credentials
from csi_driver.registry.reference import looks_like_reference
from csi_driver.service import validate as v
from csi_driver.service.context import TOPOLOGY_KEY, DriverContext
from csi_driver.service.rpc import rpc
from csi_driver.store import Snapshot, Volume

RPC = csi.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = [
    RPC.CREATE_DELETE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.GET_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.GET_SNAPSHOT,
    RPC.CLONE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.MODIFY_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.PUBLISH_READONLY,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
]


def _token(token: str) -> int:
    if not token:
        return 0
    if not (token.isascii() and token.isdigit()) or len(token) > 18:
        raise Aborted(f"starting_token {token[:40]!r} is not valid")
    return int(token)


def _max_entries(n: int) -> int:
    if n < 0:
        raise InvalidArgument("max_entries must not be negative")
    return min(n, 10_000) if n else 10_000


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def snapshot_msg(s: Snapshot) -> csi.Snapshot:
    return csi.Snapshot(
        snapshot_id=s.id,
        source_volume_id=s.source_volume_id,
        size_bytes=s.size_bytes,
        creation_time=timestamp(s.created_at),
        ready_to_use=s.exported != "" or snapshot_reference(s.id) is None,
        group_snapshot_id=s.group_id,
    )


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.locks = ctx.locks

    # ---------------------------------------------------------------- helpers
    def _volume_msg(self, vol: Volume) -> csi.Volume:
        msg = csi.Volume(
            volume_id=vol.id,
            capacity_bytes=vol.capacity_bytes,
            accessible_topology=[csi.Topology(segments=self.ctx.topology)],
        )
        if vol.source_kind == "snapshot":
            msg.content_source.snapshot.snapshot_id = vol.source_id
        elif vol.source_kind == "volume":
            msg.content_source.volume.volume_id = vol.source_id
        return msg

    def _check_topology(self, req: csi.TopologyRequirement) -> None:
        terms = list(req.requisite) or list(req.preferred)
        if not terms:
            return
        for t in terms:
            if t.segments.get(TOPOLOGY_KEY, self.ctx.node_id) == self.ctx.node_id:
                return
        raise ResourceExhausted(
            f"volumes of this driver live on node {self.ctx.node_id}, which the "
            f"accessibility requirements exclude"
        )

    def _status(self, vol: Volume) -> csi.ControllerGetVolumeResponse.VolumeStatus:
        problem = self.engine.condition(vol)
        status = csi.ControllerGetVolumeResponse.VolumeStatus(
            volume_condition=csi.VolumeCondition(
                abnormal=bool(problem), message=problem or "volume is healthy"
            )
        )
        if vol.staging_path or self._attached(vol.id):
            status.published_node_ids.append(self.ctx.node_id)
        return status

    def _attached(self, volume_id: str) -> bool:
        return self.engine.attached(volume_id)

    # ---------------------------------------------------------------- volumes
    def _check_source_node(self, request: csi.CreateVolumeRequest) -> None:
        """A clone or restore whose source another node made and holds: RESOURCE_EXHAUSTED,
        which external-provisioner's checkError turns into a reschedule (the scheduler ignores
        a claim's dataSource), where NOT_FOUND would retry on this node for ever. An id no
        node made stays NOT_FOUND (see CreateVolume)."""
        if not request.HasField("volume_content_source"):
            return
        src = request.volume_content_source
        kind = src.WhichOneof("type")
        if kind == "snapshot":
            source_id, pattern = src.snapshot.snapshot_id, v.SNAPSHOT_ID_RE
        elif kind == "volume":
            source_id, pattern = src.volume.volume_id, v.VOLUME_ID_RE
        else:
            return
        owner = node_of(source_id) if pattern.match(source_id) else ""
        if not owner or owner == self.ctx.node_id or self._holds(kind, source_id):
            return  # (held here though tagged for another node: the node was renamed)
        raise ResourceExhausted(
            f"{kind} {source_id} was made on node {owner} and lives there; this node is "
            f"{self.ctx.node_id}: a volume from it can only be created on {owner} "
            "(the claim is scheduled again)"
        )

    def _holds(self, kind: str, source_id: str) -> bool:
        if kind == "snapshot":
            return self.engine.get_snapshot(source_id) is not None
        try:
            self.engine.get_volume(source_id)
        except NotFound:
            return False
        return True

    @rpc(guard=lambda r: ["name:" + r.name])
    def CreateVolume(self, request, context):
        self._check_source_node(request)
        name = v.name(request.name)
        offered = self.engine.capabilities
        caps = v.capabilities(list(request.volume_capabilities), offered)
        params = v.volume_parameters(dict(request.parameters), offered, caps)
        block = caps[0].access_type == "block"
        fs_type = "" if block else caps[0].fs_type or v.fs_type_parameter(params, offered)
        kind = "block" if block else fs_type or self.engine.default_fs_type
        mutable = self.engine.validate_mutable(
            v.string_map(dict(request.mutable_parameters), "mutable_parameters"), kind
        )
        if request.HasField("accessibility_requirements"):
            self._check_topology(request.accessibility_requirements)
        source_kind = source_id = ""
        if request.HasField("volume_content_source"):
            src = request.volume_content_source
            source_kind = src.WhichOneof("type") or ""
            if source_kind == "snapshot":
                source_id = v.required(src.snapshot.snapshot_id, "snapshot_id")
                if not v.SNAPSHOT_ID_RE.match(source_id):
                    raise NotFound(f"snapshot {source_id[:80]!r} does not exist")
            elif source_kind == "volume":
                source_id = v.required(src.volume.volume_id, "volume_id")
                if not v.VOLUME_ID_RE.match(source_id):
                    raise NotFound(f"volume {source_id[:80]!r} does not exist")
            else:
                raise InvalidArgument("volume_content_source needs a snapshot or a volume")
        spec = VolumeSpec(
            name=name,
            required_bytes=request.capacity_range.required_bytes,
            limit_bytes=request.capacity_range.limit_bytes,
            access_type=caps[0].access_type,
            fs_type=fs_type,
            parameters=params,
            source_kind=source_kind,
            source_id=source_id,
            base_layer=params.get("baseLayer", ""),
            mutable=mutable,
        )
        if source_kind == "volume":
            with self.locks.try_hold(source_id) as owned:
                if not owned:
                    raise Aborted(f"an operation on {source_id} is already in progress")
                vol = self._create(spec, request, context)
        else:
            vol = self._create(spec, request, context)
        return csi.CreateVolumeResponse(volume=self._volume_msg(vol))

    def _create(self, spec: VolumeSpec, request: csi.CreateVolumeRequest, context: Any) -> Volume:
        remote = snapshot_reference(spec.source_id) is not None or looks_like_reference(spec.base_layer)
        credentials = Credentials.from_secrets(dict(request.secrets)) if remote else None
        key = "name:" + spec.name
        # on the registry pool; a retry while this name's pull runs in the background waits for
        # it there (checked first: that pull's own volume creation must not race this one)
        if remote and (self.ctx.registry.busy(key) or self.engine.needs_registry(spec)):
            return self.ctx.registry.run(
                lambda: self.engine.create_volume(spec, credentials),
                context,
                f"the pull for volume {spec.name!r}",
                keys=[key],
            )
        return self.engine.create_volume(spec, credentials)

    @rpc(guard=lambda r: [r.volume_id])
    def DeleteVolume(self, request, context):
        if v.known_id(request.volume_id, v.VOLUME_ID_RE, "volume_id"):
            self.engine.delete_volume(request.volume_id)
        return csi.DeleteVolumeResponse()

    def _existing(self, volume_id: str) -> Volume:
        if not v.known_id(volume_id, v.VOLUME_ID_RE, "volume_id"):
            raise NotFound(f"volume {volume_id[:80]!r} does not exist")
        return self.engine.get_volume(volume_id)

    @rpc()
    def ValidateVolumeCapabilities(self, request, context):
        v.required(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        vol = self._existing(request.volume_id)
        offered = self.engine.capabilities
        try:
            caps = v.capabilities(list(request.volume_capabilities), offered)
            v.volume_parameters(dict(request.parameters), offered, caps)
        except InvalidArgument as e:
            return csi.ValidateVolumeCapabilitiesResponse(message=str(e))
        if any(c.access_type != vol.access_type for c in caps):
            return csi.ValidateVolumeCapabilitiesResponse(
                message=f"volume {vol.id} is a {vol.access_type} volume"
            )
        return csi.ValidateVolumeCapabilitiesResponse(
            confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    @rpc()
    def ListVolumes(self, request, context):
        after = _token(request.starting_token)
        limit = _max_entries(request.max_entries)
        vols = self.engine.list_volumes(after, limit + 1)
        page = vols[:limit]
        problems = self.engine.conditions(page)  # one mount table and one store read for the page
        attached = self.engine.attached_volumes()
        entries = [
            csi.ListVolumesResponse.Entry(
                volume=self._volume_msg(x),
                status=csi.ListVolumesResponse.VolumeStatus(
                    published_node_ids=[self.ctx.node_id] if x.staging_path or x.id in attached else [],
                    volume_condition=csi.VolumeCondition(
                        abnormal=bool(problems[x.id]), message=problems[x.id] or "volume is healthy"
                    ),
                ),
            )
            for x in page
        ]
        next_token = str(vols[limit - 1].seq) if len(vols) > limit else ""
        return csi.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc()
    def ControllerGetVolume(self, request, context):
        vol = self._existing(request.volume_id)
        return csi.ControllerGetVolumeResponse(volume=self._volume_msg(vol), status=self._status(vol))

    @rpc()
    def GetCapacity(self, request, context):
        offered = self.engine.capabilities
        caps = [v.capability(cap, offered) for cap in request.volume_capabilities]
        params = v.volume_parameters(dict(request.parameters), offered, caps)
        if (
            request.HasField("accessible_topology")
            and request.accessible_topology.segments.get(TOPOLOGY_KEY, self.ctx.node_id) != self.ctx.node_id
        ):
            return csi.GetCapacityResponse(available_capacity=0)
        # what the node can still promise, as the capacity of one volume of the kind asked for
        # (external-provisioner's capacity controller sends no capabilities, only the
        # StorageClass's parameters: a legacy fsType there names the kind)
        default = v.fs_type_parameter(params, offered) or self.engine.default_fs_type
        asked = {c.access_type if c.access_type == "block" else c.fs_type or default for c in caps}
        available = min(self.engine.largest_volume(t) for t in asked or {default})
        largest = available
        if self.engine.max_volume_size:
            largest = min(largest, self.engine.max_volume_size)
        resp = csi.GetCapacityResponse(available_capacity=available)
        resp.maximum_volume_size.value = largest
        resp.minimum_volume_size.value = self.engine.min_volume_size
        return resp

    @rpc()
    def ControllerGetCapabilities(self, request, context):
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi.ControllerServiceCapability(rpc=RPC(type=t))
                for t in CONTROLLER_CAPABILITIES
                if RPC.Type.Name(t) not in self.ctx.hidden_capabilities
                # a backend with nothing to modify (plain directories) offers no ModifyVolume
                and (t != RPC.MODIFY_VOLUME or self.engine.modifiable)
            ]
        )

    @rpc(guard=lambda r: [r.volume_id])
    def ControllerExpandVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            v.capability(request.volume_capability, self.engine.capabilities)
        vol = self._existing(request.volume_id)
        cap, node_needed = self.engine.expand(
            vol.id, request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        )
        return csi.ControllerExpandVolumeResponse(capacity_bytes=cap, node_expansion_required=node_needed)

    @rpc(guard=lambda r: [r.volume_id])
    def ControllerModifyVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        vol = self._existing(request.volume_id)
        self.engine.modify_volume(
            vol.id, v.string_map(dict(request.mutable_parameters), "mutable_parameters")
        )
        return csi.ControllerModifyVolumeResponse()

    # ---------------------------------------------------------------- attach
    # Volumes are node-local: "attaching" one validates that the node is this
    # one and records it, so the CO's bookkeeping and ours agree.
    @rpc(guard=lambda r: [r.volume_id])
    def ControllerPublishVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        v.required(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = v.capability(request.volume_capability, self.engine.capabilities)
        vol = self._existing(request.volume_id)
        if request.node_id != self.ctx.node_id:
            raise NotFound(
                f"node {request.node_id[:80]!r} is not {self.ctx.node_id}, where this volume lives"
            )
        if cap.access_type != vol.access_type:
            raise InvalidArgument(f"volume {vol.id} is a {vol.access_type} volume")
        readonly = request.readonly or cap.mode in v.READONLY_MODES
        self.engine.attach(vol.id, request.node_id, readonly, self.ctx.max_volumes_per_node)
        return csi.ControllerPublishVolumeResponse(publish_context={})

    @rpc(guard=lambda r: [r.volume_id])
    def ControllerUnpublishVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        self.engine.detach(request.volume_id, request.node_id)
        return csi.ControllerUnpublishVolumeResponse()

    # ---------------------------------------------------------------- snapshots
    @rpc(guard=lambda r: ["snapname:" + r.name])
    def CreateSnapshot(self, request, context):
        source = request.source_volume_id
        # the source volume is owned while the snapshot is taken, not while it uploads
        with self.locks.try_hold(*([source] if source else [])) as owned:
            if not owned:
                raise Aborted(f"an operation on {source} is already in progress")
            name = v.name(request.name)
            v.required(source, "source_volume_id")
            params = v.snapshot_parameters(dict(request.parameters))
            repository = params.repository
            if not v.VOLUME_ID_RE.match(source):
                raise NotFound(f"volume {source[:80]!r} does not exist")
            credentials = Credentials.from_secrets(dict(request.secrets)) if repository else None
            snap = self.engine.take_snapshot(
                name, source, repository=repository, copy_limit=params.live_copy_limit
            )
        if snapshot_reference(snap.id) is not None and not snap.exported:
            snap = self.ctx.registry.run(
                lambda: self.engine.export_snapshot(snap, credentials, params.compression),
                context,
                f"the push of snapshot {name!r}",
                keys=["snapname:" + name],
            )
        else:
            snap = self.engine.export_snapshot(snap, credentials)  # nothing to push
        return csi.CreateSnapshotResponse(snapshot=snapshot_msg(snap))

    @rpc(guard=lambda r: [r.snapshot_id])
    def DeleteSnapshot(self, request, context):
        if v.known_id(request.snapshot_id, v.SNAPSHOT_ID_RE, "snapshot_id"):
            remote = snapshot_reference(request.snapshot_id) is not None
            credentials = Credentials.from_secrets(dict(request.secrets)) if remote else None
            # an exported snapshot whose registry cannot be reached is deleted here all the
            # same, its manifest's deletion recorded and retried (engine/pending_deletes.py)
            if remote and self.engine.pending_delete(request.snapshot_id) is None:
                self.ctx.registry.run(
                    lambda: self.engine.delete_snapshot(request.snapshot_id, credentials),
                    context,
                    f"the deletion of snapshot {request.snapshot_id!r}",
                    keys=[request.snapshot_id],
                )
            else:
                self.engine.delete_snapshot(request.snapshot_id, credentials)
        return csi.DeleteSnapshotResponse()

    @rpc()
    def ListSnapshots(self, request, context):
        after = _token(request.starting_token)
        limit = _max_entries(request.max_entries)
        if request.snapshot_id:
            s = (
                self.engine.get_snapshot(request.snapshot_id)
                if v.SNAPSHOT_ID_RE.match(request.snapshot_id)
                else None
            )
            ok = s is not None and (
                not request.source_volume_id or s.source_volume_id == request.source_volume_id
            )
            return csi.ListSnapshotsResponse(
                entries=[csi.ListSnapshotsResponse.Entry(snapshot=snapshot_msg(s))] if ok else []
            )
        snaps = self.engine.list_snapshots(after, limit + 1, request.source_volume_id or None)
        next_token = str(snaps[limit - 1].seq) if len(snaps) > limit else ""
        return csi.ListSnapshotsResponse(
            entries=[csi.ListSnapshotsResponse.Entry(snapshot=snapshot_msg(s)) for s in snaps[:limit]],
            next_token=next_token,
        )

    @rpc()
    def GetSnapshot(self, request, context):
        v.required(request.snapshot_id, "snapshot_id")
        s = (
            self.engine.get_snapshot(request.snapshot_id)
            if v.SNAPSHOT_ID_RE.match(request.snapshot_id)
            else None
        )
        if s is None:
            raise NotFound(f"snapshot {request.snapshot_id[:80]!r} does not exist")
        return csi.GetSnapshotResponse(snapshot=snapshot_msg(s))
