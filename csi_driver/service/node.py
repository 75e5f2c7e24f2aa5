"""CSI Node service: stage = mount the volume's overlay, publish = bind it to the pod."""

from __future__ import annotations

from csi_driver.engine.engine import VolumeSpec
from csi_driver.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.service import validate as v
from csi_driver.service.context import DriverContext
from csi_driver.service.rpc import rpc

NodeRPC = csi.NodeServiceCapability.RPC
# No VOLUME_MOUNT_GROUP: with it kubelet hands every fsGroup to the driver whatever the
# CSIDriver's fsGroupPolicy, and never applies fsGroupChangePolicy (csi_mounter.go SetUpAt).
# Without it kubelet applies fsGroup itself, per policy, as for any other driver. A
# volume_mount_group another caller sends is still honoured (set_mount_group).
NODE_CAPABILITIES = [
    NodeRPC.STAGE_UNSTAGE_VOLUME,
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.EXPAND_VOLUME,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
]


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.locks = ctx.locks

    def _path(self, value: str, what: str, shapes: tuple[str, ...]) -> tuple[str, str]:
        """The checked path and, with --kubelet-dir, which of kubelet's ``shapes`` it has."""
        try:
            checked = v.outside_state(v.path(value, what), self.engine.state_root, what)
            checked = v.inside(checked, self.ctx.kubelet_dir, what)
            return checked, v.kubelet_shape(checked, self.ctx.kubelet_dir, self.ctx.driver_name, shapes, what)
        except OSError as e:  # a component changed while it was resolved (realpath's readlink)
            raise InvalidArgument(f"{what} {value[:200]} changed while it was checked: {e.strerror}") from e

    @staticmethod
    def _shapes(cap: v.Capability, mount: str, block: str) -> tuple[str, ...]:
        return (block,) if cap.access_type == "block" else (mount,)

    def _capability(self, request) -> v.Capability:
        """The bounded contexts and the one capability of a stage or publish request."""
        v.string_map(dict(request.volume_context), "volume_context")
        v.string_map(dict(request.publish_context), "publish_context")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        return v.capability(request.volume_capability, self.engine.capabilities)

    def _volume(self, volume_id: str):
        if not v.known_id(volume_id, v.VOLUME_ID_RE, "volume_id"):
            ephemeral = self.engine.ephemeral_volume(volume_id)
            if ephemeral is None:
                raise NotFound(f"volume {volume_id[:80]!r} does not exist")
            return ephemeral
        return self.engine.get_volume(volume_id)

    @rpc(guard=lambda r: [r.volume_id])
    def NodeStageVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        v.path(request.staging_target_path, "staging_target_path")
        cap = self._capability(request)
        staging, _ = self._path(
            request.staging_target_path, "staging_target_path", self._shapes(cap, "staging", "block-staging")
        )
        vol = self._volume(request.volume_id)
        if cap.access_type != vol.access_type:
            raise InvalidArgument(f"volume {vol.id} is a {vol.access_type} volume")
        self.engine.stage(vol.id, staging, list(cap.mount_flags))
        return csi.NodeStageVolumeResponse()

    @rpc(guard=lambda r: [r.volume_id])
    def NodeUnstageVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        staging, _ = self._path(request.staging_target_path, "staging_target_path", v.STAGING_SHAPES)
        try:
            vol = self._volume(request.volume_id)
        except NotFound:
            # Deleted while the node was down (nothing was mounted, so DeleteVolume
            # succeeded); kubelet reconstructs and unstages it, retrying forever on an
            # error (csi_attacher.go UnmountDevice): done, if nothing is mounted there.
            if not self.engine.release_orphan_staging(staging):
                raise FailedPrecondition(
                    f"volume {request.volume_id[:80]!r} does not exist, yet {staging} is mounted"
                ) from None
            return csi.NodeUnstageVolumeResponse()
        self.engine.unstage(vol.id, staging)
        return csi.NodeUnstageVolumeResponse()

    @rpc(guard=lambda r: [r.volume_id])
    def NodePublishVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        v.path(request.target_path, "target_path")
        cap = self._capability(request)
        shapes = self._shapes(cap, "target", "block-target")
        target, _ = self._path(request.target_path, "target_path", shapes)
        readonly = request.readonly or cap.mode in v.READONLY_MODES or "ro" in cap.mount_flags
        flags = [f for f in cap.mount_flags if f not in ("ro", "rw")]
        if request.volume_context.get(v.EPHEMERAL_KEY) == "true":
            self._publish_ephemeral(request, target, cap, readonly, flags)
            return csi.NodePublishVolumeResponse()
        staging, _ = self._path(
            request.staging_target_path, "staging_target_path", self._shapes(cap, "staging", "block-staging")
        )
        vol = self._volume(request.volume_id)
        single = cap.mode == v.AccessMode.SINGLE_NODE_SINGLE_WRITER
        self.engine.publish(vol.id, staging, target, readonly, flags, single_writer=single)
        if cap.volume_mount_group:
            self.engine.set_mount_group(vol.id, cap.volume_mount_group, readonly)
        return csi.NodePublishVolumeResponse()

    def _publish_ephemeral(
        self, request, target: str, cap: v.Capability, readonly: bool, flags: list[str]
    ) -> None:
        """Kubelet's inline volume: created here, deleted at NodeUnpublishVolume."""
        if cap.access_type != "mount":
            raise InvalidArgument("ephemeral inline volumes are file system volumes")
        attrs = v.ephemeral_attributes(dict(request.volume_context))
        spec = VolumeSpec(
            name="",
            required_bytes=attrs["size"],
            fs_type=cap.fs_type,
            parameters={"baseLayer": attrs["baseLayer"]} if attrs["baseLayer"] else {},
            base_layer=attrs["baseLayer"],
        )
        self.engine.publish_ephemeral(
            request.volume_id, target, readonly, spec, flags, cap.volume_mount_group
        )

    @rpc(guard=lambda r: [r.volume_id])
    def NodeUnpublishVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        target, shape = self._path(request.target_path, "target_path", v.TARGET_SHAPES)
        try:
            vol = self._volume(request.volume_id)
        except NotFound:
            # Already gone (an inline volume deleted by an earlier call whose reply
            # was lost, or a retry after kubelet reconstruction): done, if nothing
            # is mounted there; kubelet retries a failed teardown forever. What is left
            # there is removed only when it is what the driver makes at a path of
            # kubelet's shape (an empty mount dir, an empty block publish file).
            shape = shape or v.shape_of(target, self.ctx.driver_name, v.TARGET_SHAPES)
            remove = {"target": "dir", "block-target": "file"}.get(shape, "")
            if not self.engine.release_orphan_target(target, remove):
                raise
            return csi.NodeUnpublishVolumeResponse()
        if vol.ephemeral:
            self.engine.unpublish_ephemeral(vol, target)
        else:
            self.engine.unpublish(vol.id, target)
        return csi.NodeUnpublishVolumeResponse()

    @rpc()
    def NodeGetVolumeStats(self, request, context):
        v.required(request.volume_id, "volume_id")
        v.required(request.volume_path, "volume_path")
        if self.ctx.kubelet_dir:
            self._path(request.volume_path, "volume_path", v.STATS_SHAPES)
        vol = self._volume(request.volume_id)
        st = self.engine.stats(vol.id, request.volume_path)
        Usage = csi.VolumeUsage
        usage = [
            Usage(unit=Usage.BYTES, total=st.total_bytes, used=st.used_bytes, available=st.available_bytes)
        ]
        if vol.access_type != "block":
            usage.append(
                Usage(
                    unit=Usage.INODES,
                    total=st.total_inodes,
                    used=st.used_inodes,
                    available=st.available_inodes,
                )
            )
        return csi.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=csi.VolumeCondition(abnormal=st.abnormal, message=st.message)
        )

    def _expand_path_ok(self, vol, volume_path: str, staging_path: str) -> bool:
        """A path the volume is staged or published at or, for a staged block volume,
        kubelet's recorded device path of a pod that may be gone (engine.block_expand_path_ok)."""
        if volume_path in self.engine.volume_paths(vol):
            return True
        return self.engine.block_expand_path_ok(vol, volume_path, staging_path)

    @rpc(guard=lambda r: [r.volume_id])
    def NodeExpandVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        v.required(request.volume_path, "volume_path")
        vol = self._volume(request.volume_id)
        if not self._expand_path_ok(vol, request.volume_path, request.staging_target_path):
            raise NotFound(f"{request.volume_path[:200]} is not a path of volume {vol.id}")
        if request.HasField("volume_capability"):
            v.capability(request.volume_capability, self.engine.capabilities)
        cap = self.engine.expand_node(
            vol.id,
            request.capacity_range.required_bytes or vol.capacity_bytes,
            request.capacity_range.limit_bytes,
        )
        return csi.NodeExpandVolumeResponse(capacity_bytes=cap)

    @rpc()
    def NodeGetCapabilities(self, request, context):
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[csi.NodeServiceCapability(rpc=NodeRPC(type=t)) for t in NODE_CAPABILITIES]
        )

    @rpc()
    def NodeGetInfo(self, request, context):
        return csi.NodeGetInfoResponse(
            node_id=self.ctx.node_id,
            max_volumes_per_node=self.ctx.max_volumes_per_node,
            accessible_topology=csi.Topology(segments=self.ctx.topology),
        )
