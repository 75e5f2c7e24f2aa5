"""``--mode controller-expand``: the controller half of expansion for a central
external-resizer.

Volumes are node-local, so a central controller cannot touch their images.
It accepts the new size and asks for node expansion; the node plugin that owns
the volume grows the image and the file system in NodeExpandVolume.
"""

from __future__ import annotations

from csi_driver.errors import InvalidArgument, OutOfRange
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.service import validate as v
from csi_driver.service.context import DriverContext
from csi_driver.service.rpc import rpc

RPC = csi.ControllerServiceCapability.RPC


class ExpandOnlyControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.locks = ctx.locks

    @rpc()
    def ControllerGetCapabilities(self, request, context):
        return csi.ControllerGetCapabilitiesResponse(
            capabilities=[csi.ControllerServiceCapability(rpc=RPC(type=RPC.EXPAND_VOLUME))]
        )

    @rpc(guard=lambda r: [r.volume_id])
    def ControllerExpandVolume(self, request, context):
        v.required(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        if limit and required > limit:
            raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
        size, largest = required or limit, self.ctx.engine.max_volume_size
        if largest and size > largest:
            # refused here, where the resizer marks the claim ControllerResizeInfeasible
            # (IsInfeasibleError), not on the node after the PV already says the new size
            raise OutOfRange(f"{size} bytes exceeds the driver's --max-volume-size {largest}")
        return csi.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=True)
