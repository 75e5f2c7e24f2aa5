"""CSI Identity service."""

from __future__ import annotations

import os

from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.service.context import DriverContext
from csi_driver.service.rpc import rpc

Service = csi.PluginCapability.Service
Expansion = csi.PluginCapability.VolumeExpansion


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.locks = ctx.locks

    @rpc()
    def GetPluginInfo(self, request, context):
        return csi.GetPluginInfoResponse(name=self.ctx.driver_name, vendor_version=self.ctx.version)

    @rpc()
    def GetPluginCapabilities(self, request, context):
        caps = [
            csi.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
            csi.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            csi.PluginCapability(service=Service(type=Service.GROUP_CONTROLLER_SERVICE)),
            csi.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
            csi.PluginCapability(volume_expansion=Expansion(type=Expansion.OFFLINE)),
        ]
        return csi.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc()
    def Probe(self, request, context):
        root = self.ctx.engine.state_root
        usable = os.access(root, os.W_OK | os.X_OK) and (root / "layers").is_dir()
        ready = self.ctx.ready and usable and self.ctx.engine.healthy()
        return csi.ProbeResponse(ready={"value": ready})
