"""``overlay-csi info``: the driver's identity, capabilities, node and capacity,
from the Identity service and whichever of Controller and Node it serves."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import grpc

from csi_driver.cli.args import add_command, client_options
from csi_driver.cli.output import emit, fields, fmt_bytes
from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi


def _optional(call: Callable[[], Any]) -> Any:
    """None when the driver does not serve that service (e.g. controller-expand mode)."""
    try:
        return call()
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


def cmd_info(args: argparse.Namespace, c: Client) -> int:
    t = args.timeout
    plugin = c.identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=t)
    caps = c.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest(), timeout=t)
    probe = c.identity.Probe(csi.ProbeRequest(), timeout=t)
    plugin_caps = []
    for cap in caps.capabilities:
        if cap.HasField("service"):
            plugin_caps.append(csi.PluginCapability.Service.Type.Name(cap.service.type))
        elif cap.HasField("volume_expansion"):
            name = csi.PluginCapability.VolumeExpansion.Type.Name(cap.volume_expansion.type)
            plugin_caps.append(f"{name}_EXPANSION")
    ctrl = _optional(
        lambda: c.controller.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest(), timeout=t)
    )
    node_caps = _optional(lambda: c.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), timeout=t))
    node = _optional(lambda: c.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=t))
    capacity = None
    if ctrl is not None and any(
        x.rpc.type == csi.ControllerServiceCapability.RPC.GET_CAPACITY for x in ctrl.capabilities
    ):
        capacity = c.controller.GetCapacity(csi.GetCapacityRequest(), timeout=t)
    data: dict[str, Any] = {
        "name": plugin.name,
        "vendor_version": plugin.vendor_version,
        "ready": probe.ready.value if probe.HasField("ready") else True,
        "plugin_capabilities": plugin_caps,
        "controller_capabilities": (
            [csi.ControllerServiceCapability.RPC.Type.Name(x.rpc.type) for x in ctrl.capabilities]
            if ctrl is not None
            else None
        ),
        "node_capabilities": (
            [csi.NodeServiceCapability.RPC.Type.Name(x.rpc.type) for x in node_caps.capabilities]
            if node_caps is not None
            else None
        ),
        "node": (
            {
                "node_id": node.node_id,
                "max_volumes_per_node": node.max_volumes_per_node,
                "topology": dict(node.accessible_topology.segments),
            }
            if node is not None
            else None
        ),
        "capacity": (
            {
                "available_capacity": capacity.available_capacity,
                "maximum_volume_size": capacity.maximum_volume_size.value,
                "minimum_volume_size": capacity.minimum_volume_size.value,
            }
            if capacity is not None
            else None
        ),
    }

    def human() -> str:
        rows: list[tuple[str, Any]] = [
            ("driver", f"{data['name']} {data['vendor_version']}"),
            ("ready", "yes" if data["ready"] else "NO"),
        ]
        if node is not None:
            limit = node.max_volumes_per_node or "no limit"
            topo = ", ".join(f"{k}={v}" for k, v in data["node"]["topology"].items())
            rows += [("node", f"{node.node_id} (max volumes: {limit})"), ("topology", topo or "-")]
        if capacity is not None:
            cap = data["capacity"]
            rows.append(
                (
                    "capacity",
                    f"{fmt_bytes(cap['available_capacity'])} available, volumes "
                    f"{fmt_bytes(cap['minimum_volume_size'])} to {fmt_bytes(cap['maximum_volume_size'])}",
                )
            )
        rows.append(("plugin", ", ".join(plugin_caps)))
        ctrl_list = data["controller_capabilities"]
        node_list = data["node_capabilities"]
        rows.append(("controller", ", ".join(ctrl_list) if ctrl_list is not None else "(not served)"))
        rows.append(("node service", ", ".join(node_list) if node_list is not None else "(not served)"))
        return fields(rows)

    return emit(args, data, human)


def add_parser(sub: Any) -> None:
    add_command(
        sub, "info", cmd_info, "the driver's identity, capabilities, node and capacity", client_options()
    )
