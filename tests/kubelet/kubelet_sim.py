"""Callers of a CSI driver, played exactly as Kubernetes plays them.

Each class below is a small, faithful model of one real caller, written from
its source code (read, not copied):

* ``register_plugin``: node-driver-registrar
  (kubernetes-csi/node-driver-registrar cmd/csi-node-driver-registrar/main.go,
  node_register.go) and kubelet's plugin registration
  (kubernetes/kubernetes pkg/volume/csi/csi_plugin.go RegisterPlugin,
  pkg/volume/csi/nodeinfomanager/nodeinfomanager.go InstallCSIDriver).
* ``Provisioner``: kubernetes-csi/external-provisioner v6.3.0 pkg/controller/controller.go
  (prepareProvision incl. the legacy fsType key, Provision, checkError, checkNode,
  makeVolumeName, removePrefixedParameters, getSnapshotSource, getPVCSource), the
  vendored sig-storage-lib-external-provisioner controller.go (rescheduleProvisioning) and
  pkg/controller/topology.go (GenerateAccessibilityRequirements),
  pkg/capacity/capacity.go (GetCapacity), cmd/csi-provisioner/csi-provisioner.go
  (flags and the provisioner identity).
* ``Kubelet``: kubernetes/kubernetes pkg/volume/csi/csi_attacher.go
  (MountDevice/UnmountDevice, makeDeviceMountPath), csi_mounter.go
  (SetUpAt/TearDownAt, removeMountDir, supportsFSGroup, makeVolumeHandle),
  csi_client.go (request shapes, access mode mapping, isFinalError,
  NodeGetVolumeStats), csi_metrics.go, expander.go, csi_block.go,
  csi_plugin.go (NewBlockVolumeMapper's stats path),
  pkg/volume/util/util.go (MapBlockVolume, UnmapBlockVolume) with
  pkg/volume/util/volumepathhandler (MapDevice, UnmapDevice, RemoveMapPath),
  pkg/volume/util/selinux.go (AddSELinuxMountOption),
  pkg/volume/volume_linux.go (SetVolumeOwnership),
  pkg/volume/util/operationexecutor/operation_generator.go (the order of
  stage, publish and NodeExpandVolume), pkg/kubelet/volumemanager/reconciler/
  reconstruct.go (restart reconstruction).
* ``Snapshotter``: kubernetes-csi/external-snapshotter
  pkg/sidecar-controller/csi_handler.go (makeSnapshotName),
  snapshot_controller.go (extra create metadata), pkg/snapshotter/snapshotter.go
  (CreateSnapshot, GetSnapshotStatus), pkg/utils/util.go (RemovePrefixedParameters).
* ``Resizer``: kubernetes-csi/external-resizer pkg/resizer/csi_resizer.go
  (NewResizerFromClient, Resize, GetVolumeCapabilities), pkg/csi/client.go
  (Expand, SupportsNodeResize), pkg/resizer/trivial_resizer.go.

The sidecars that act on API objects (the resizer's modify controller, a
csi-snapshotter checking pre-provisioned contents) are in ``api_sidecars.py``,
against the small API server of ``tests/kube_apiserver.py``.

Where a caller would itself fail (not the driver call), the model raises
``KubeletError`` / ``CallerError`` with the message the caller logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver import host
from csi_driver.proto import csi_pb2 as csi

DRIVER_NAME = "overlay.csi.dev"
TOPOLOGY_KEY = "topology.overlay.csi.dev/node"
CSI_PLUGIN_NAME = "kubernetes.io/csi"
ESCAPED_PLUGIN_NAME = "kubernetes.io~csi"  # utilstrings.EscapeQualifiedName(CSIPluginName)
VOL_DATA_FILE = "vol_data.json"
PROVISIONER_ID_KEY = "storage.kubernetes.io/csiProvisionerIdentity"
CSI_TIMEOUT = 120.0  # csiTimeout in csi_plugin.go: 2 minutes
MAX_INT32 = 2**31 - 1

Mode = csi.VolumeCapability.AccessMode
NodeRPC = csi.NodeServiceCapability.RPC
CtrlRPC = csi.ControllerServiceCapability.RPC
PluginService = csi.PluginCapability.Service


class CallerError(Exception):
    """A failure the caller itself reports (no driver call failed)."""


class KubeletError(CallerError):
    pass


def code_of(err: BaseException) -> grpc.StatusCode | None:
    return err.code() if isinstance(err, grpc.RpcError) else None


# --------------------------------------------------------------------------- objects
@dataclass
class StorageClass:
    name: str = "overlay-csi"
    provisioner: str = DRIVER_NAME
    parameters: dict[str, str] = field(default_factory=dict)
    mount_options: list[str] = field(default_factory=list)
    volume_binding_mode: str = "WaitForFirstConsumer"
    allowed_topologies: list[dict[str, list[str]]] = field(default_factory=list)


@dataclass
class PVC:
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    request: int = 64 << 20
    access_modes: list[str] = field(default_factory=lambda: ["ReadWriteOnce"])
    volume_mode: str = "Filesystem"
    # ("VolumeSnapshot", VolumeSnapshot) or ("PersistentVolumeClaim", PVC)
    data_source: tuple[str, object] | None = None
    volume: PV | None = None  # bound PV
    conditions: list[str] = field(default_factory=list)
    status_capacity: int = 0
    annotations: dict[str, str] = field(default_factory=dict)  # e.g. SELECTED_NODE_KEY


@dataclass
class PV:
    name: str
    handle: str
    capacity: int
    access_modes: list[str]
    fs_type: str = ""
    mount_options: list[str] = field(default_factory=list)
    volume_attributes: dict[str, str] = field(default_factory=dict)
    node_affinity: list[dict[str, str]] = field(default_factory=list)
    volume_mode: str = "Filesystem"
    driver: str = DRIVER_NAME
    claim: PVC | None = None


@dataclass
class Pod:
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"
    fs_group: int | None = None
    fs_group_change_policy: str = "Always"
    # the one SELinux label of all its containers (GetMountSELinuxLabel), "" for none
    se_linux_label: str = ""


@dataclass
class CSIDriverObject:
    """The CSIDriver object the chart installs (charts/overlay-csi/templates/csidriver.yaml)."""

    name: str = DRIVER_NAME
    attach_required: bool = False
    pod_info_on_mount: bool = True
    fs_group_policy: str = "File"
    volume_lifecycle_modes: tuple[str, ...] = ("Persistent", "Ephemeral")
    requires_republish: bool = False
    se_linux_mount: bool = False


@dataclass
class VolumeSnapshot:
    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    source: PVC | None = None
    content: VolumeSnapshotContent | None = None


@dataclass
class VolumeSnapshotContent:
    name: str
    snapshot_handle: str = ""
    ready_to_use: bool = False
    restore_size: int = 0
    creation_time_ns: int = 0


# --------------------------------------------------------------------------- access modes
def to_csi_access_mode(mode: str, single_node_multi_writer: bool) -> int:
    """csi_client.go asCSIAccessModeV1 / asSingleNodeMultiWriterCapableCSIAccessModeV1
    (and csi-lib-utils accessmodes.ToCSIAccessMode for one mode, used by the sidecars)."""
    if single_node_multi_writer:
        table = {
            "ReadWriteOnce": Mode.SINGLE_NODE_MULTI_WRITER,
            "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
            "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
            "ReadWriteOncePod": Mode.SINGLE_NODE_SINGLE_WRITER,
        }
    else:
        table = {
            "ReadWriteOnce": Mode.SINGLE_NODE_WRITER,
            "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
            "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
            "ReadWriteOncePod": Mode.SINGLE_NODE_WRITER,
        }
    return table.get(mode, Mode.UNKNOWN)


def is_final_error(err: BaseException) -> bool:
    """csi_client.go isFinalError: these codes mean the operation may still be running."""
    code = code_of(err)
    if code is None:
        return False
    return code not in {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }


# --------------------------------------------------------------------------- the cluster
@dataclass
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class CSINodeDriver:
    name: str
    node_id: str
    topology_keys: list[str]
    allocatable_count: int | None


class Cluster:
    """Node and CSINode objects, as nodeinfomanager writes them and the sidecars read them."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.csinodes: dict[str, dict[str, CSINodeDriver]] = {}

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            self.nodes[name] = Node(name, labels={"kubernetes.io/hostname": name})
            self.csinodes[name] = {}
        return self.nodes[name]

    def add_registered_node(self, name: str, topology: dict[str, str]) -> None:
        """Another node on which the driver registered (its plugin is not served here)."""
        n = self.node(name)
        n.labels.update(topology)
        self.csinodes[name][DRIVER_NAME] = CSINodeDriver(DRIVER_NAME, name, sorted(topology), None)


_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def register_plugin(
    client, cluster: Cluster, node_name: str, supported_versions: tuple[str, ...] = ("1.0.0",)
) -> CSINodeDriver:
    """node-driver-registrar, then kubelet's RegisterPlugin and nodeinfomanager.InstallCSIDriver.

    * registrar main.go: csirpc.GetDriverName (GetPluginInfo; an empty name is an error),
      then it serves GetInfo with that name and versions ["1.0.0"].
    * csi_plugin.go RegisterPlugin: validateVersions, NodeGetInfo, InstallCSIDriver.
    * nodeinfomanager.go: driverNodeID must not be empty; topology labels may not collide
      with existing node labels; CSINode gets the sorted topology keys and
      allocatable.count = max_volumes_per_node when > 0 (capped at MaxInt32).
    * The API server then validates the CSINode and Node (storage validation: driver name is
      a DNS-1123 subdomain of at most 63 characters, node id at most 192 bytes; topology
      keys are label keys, values label values).
    """
    info = client.identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=CSI_TIMEOUT)
    if not info.name:
        raise CallerError("driver name empty")  # csi-lib-utils rpc.GetDriverName
    if not supported_versions:
        raise KubeletError("Plugin returned an empty list for supported versions")
    name = info.name
    if len(name) > 63 or not _DNS1123_SUBDOMAIN.match(name):
        raise CallerError(f"CSIDriver name {name!r} is not a valid DNS-1123 subdomain of <= 63 chars")
    resp = client.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=CSI_TIMEOUT)
    node_id = resp.node_id
    topology = dict(resp.accessible_topology.segments) if resp.HasField("accessible_topology") else {}
    if not node_id:
        raise KubeletError("error adding CSI driver node info: driverNodeID must not be empty")
    if len(node_id.encode()) > 192:
        raise CallerError(f"CSINode driver nodeID {node_id!r} is longer than 192 bytes")
    node = cluster.node(node_name)
    for k, v in topology.items():
        if not _valid_label_key(k) or len(v) > 63 or not _LABEL_VALUE.match(v):
            raise CallerError(f"topology segment {k}={v} is not a valid node label")
        if k in node.labels and node.labels[k] != v:
            raise KubeletError(f"detected topology value collision: driver reported {k!r}:{v!r}")
    node.labels.update(topology)
    ids = json.loads(node.annotations.get("csi.volume.kubernetes.io/nodeid", "{}"))
    ids[name] = node_id
    node.annotations["csi.volume.kubernetes.io/nodeid"] = json.dumps(ids)
    limit = resp.max_volumes_per_node
    count = min(limit, MAX_INT32) if limit > 0 else None
    entry = CSINodeDriver(name, node_id, sorted(topology), count)
    cluster.csinodes[node_name][name] = entry
    return entry


def plugin_capabilities(client) -> tuple[set[int], set[int]]:
    caps = client.identity.GetPluginCapabilities(csi.GetPluginCapabilitiesRequest(), timeout=CSI_TIMEOUT)
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")}
    return services, expansion


def controller_capabilities(client) -> set[int]:
    resp = client.controller.ControllerGetCapabilities(
        csi.ControllerGetCapabilitiesRequest(), timeout=CSI_TIMEOUT
    )
    return {c.rpc.type for c in resp.capabilities}


def node_capabilities(client) -> set[int]:
    resp = client.node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), timeout=CSI_TIMEOUT)
    return {c.rpc.type for c in resp.capabilities}


# --------------------------------------------------------------------------- provisioner
CSI_PREFIX = "csi.storage.k8s.io/"
_PROVISIONER_RESERVED = {
    CSI_PREFIX + k
    for k in (
        "fstype",
        "provisioner-secret-name",
        "provisioner-secret-namespace",
        "controller-publish-secret-name",
        "controller-publish-secret-namespace",
        "node-stage-secret-name",
        "node-stage-secret-namespace",
        "node-publish-secret-name",
        "node-publish-secret-namespace",
        "controller-expand-secret-name",
        "controller-expand-secret-namespace",
        "secret-name",
        "secret-namespace",
        "node-expand-secret-name",
        "node-expand-secret-namespace",
        "controller-modify-secret-name",
        "controller-modify-secret-namespace",
    )
}


def remove_prefixed_parameters(params: dict[str, str], known: set[str]) -> dict[str, str]:
    """controller.go removePrefixedParameters / external-snapshotter utils.RemovePrefixedParameters."""
    out = {}
    for k, v in params.items():
        if k.startswith(CSI_PREFIX):
            if k not in known:
                raise CallerError(f'found unknown parameter key "{k}" with reserved namespace {CSI_PREFIX}')
        else:
            out[k] = v
    return out


SELECTED_NODE_KEY = "volume.kubernetes.io/selected-node"  # the scheduler's pick (WaitForFirstConsumer)


class ProvisioningState:
    FINISHED = "Finished"
    IN_BACKGROUND = "InBackground"
    RESCHEDULE = "Reschedule"
    NO_CHANGE = "NoChange"


def check_error(err: BaseException, may_reschedule: bool) -> str:
    """controller.go checkError."""
    code = code_of(err)
    if code is None:
        return ProvisioningState.IN_BACKGROUND
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ProvisioningState.RESCHEDULE if may_reschedule else ProvisioningState.FINISHED
    if code in {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
    }:
        return ProvisioningState.IN_BACKGROUND
    return ProvisioningState.FINISHED


class ProvisioningFailed(CallerError):
    def __init__(self, state: str, err: BaseException) -> None:
        super().__init__(f"{state}: {err}")
        self.state = state
        self.err = err


class Provisioner:
    """external-provisioner as the chart runs it (node-deployment, --feature-gates=Topology=true,
    --strict-topology, --immediate-topology=false, --extra-create-metadata)."""

    def __init__(
        self,
        client,
        cluster: Cluster,
        *,
        node_name: str | None = "node-1",
        strict_topology: bool = True,
        immediate_topology: bool = False,
        extra_create_metadata: bool = True,
        default_fstype: str = "",
        timeout: float = 120.0,
        volume_name_prefix: str = "pvc",
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.node_name = node_name
        self.strict_topology = strict_topology
        self.immediate_topology = immediate_topology
        self.extra_create_metadata = extra_create_metadata
        self.default_fstype = default_fstype
        self.timeout = timeout
        self.prefix = volume_name_prefix
        info = client.identity.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=CSI_TIMEOUT)
        self.driver_name = info.name
        # cmd/csi-provisioner: identity = <unix ms>-<rand 0..9999>-<driver>[-<node>] (node-deployment)
        self.identity = f"{int(time.time() * 1000)}-{random.randrange(10000)}-{self.driver_name}"
        if node_name:
            self.identity += "-" + node_name
        self.services, _ = plugin_capabilities(client)
        self.ctrl_caps = controller_capabilities(client)
        self.calls: list[csi.CreateVolumeRequest] = []
        self.errors: list[grpc.StatusCode] = []
        self.retry_delay = 0.05

    def supports_topology(self) -> bool:
        return PluginService.VOLUME_ACCESSIBILITY_CONSTRAINTS in self.services

    # -------- topology.go
    def accessibility_requirements(self, pvc: PVC, sc: StorageClass, selected_node: str | None):
        topo_keys: list[str] = []
        selected_term: dict[str, str] = {}
        requisite: list[dict[str, str]] = []
        if selected_node:
            drv = self.cluster.csinodes.get(selected_node, {}).get(self.driver_name)
            topo_keys = drv.topology_keys if drv else []
            if not topo_keys:
                raise CallerError(f"no topology key found for node {selected_node}")
            labels = self.cluster.nodes[selected_node].labels
            if any(k not in labels for k in topo_keys):
                raise CallerError("topology labels from selected node do not match the CSINode topology keys")
            selected_term = {k: labels[k] for k in topo_keys}
            if self.strict_topology:
                requisite = [selected_term]
        if not requisite:
            if sc.allowed_topologies:
                requisite = [dict(zip(t.keys(), vals, strict=True)) for t in sc.allowed_topologies
                             for vals in _product(list(t.values()))]
            else:
                if not selected_node and not self.immediate_topology:
                    return None
                if not topo_keys:
                    for drivers in self.cluster.csinodes.values():
                        d = drivers.get(self.driver_name)
                        if d and d.topology_keys:
                            topo_keys = d.topology_keys
                            break
                if not topo_keys:
                    return None  # "No topology keys found on any node"
                for node in self.cluster.nodes.values():
                    if all(k in node.labels for k in topo_keys):
                        requisite.append({k: node.labels[k] for k in topo_keys})
                if not requisite:
                    raise CallerError("no available topology found")
        requisite = sorted({tuple(sorted(t.items())) for t in requisite})
        requisite = [dict(t) for t in requisite]
        if not selected_node:
            preferred = requisite  # statefulset spreading hash; one rotation is as good as another
        elif self.strict_topology:
            preferred = requisite
        else:
            idx = next(
                (i for i, t in enumerate(requisite) if all(selected_term.get(k) == v for k, v in t.items())),
                None,
            )
            if idx is None:
                raise CallerError(f"topology {selected_term} from selected node is not in requisite")
            preferred = requisite[idx:] + requisite[:idx]
        return csi.TopologyRequirement(
            requisite=[csi.Topology(segments=t) for t in requisite],
            preferred=[csi.Topology(segments=t) for t in preferred],
        )

    # -------- controller.go
    def volume_name(self, pvc: PVC) -> str:
        return f"{self.prefix}-{pvc.uid}"  # makeVolumeName, --volume-name-uuid-length=-1

    def build_request(self, pvc: PVC, sc: StorageClass, selected_node: str | None) -> csi.CreateVolumeRequest:
        pv_name = self.volume_name(pvc)
        fs_type = ""
        found = 0
        for k, v in sc.parameters.items():
            if k.lower() == "fstype" or k == CSI_PREFIX + "fstype":
                fs_type, found = v, found + 1
        if found > 1:
            raise CallerError("fstype specified in parameters with both keys")
        if not fs_type and self.default_fstype:
            fs_type = self.default_fstype
        snmw = CtrlRPC.SINGLE_NODE_MULTI_WRITER in self.ctrl_caps
        caps = []
        for mode in pvc.access_modes:  # getVolumeCapability: fs_type from either key
            cap = csi.VolumeCapability(access_mode=Mode(mode=to_csi_access_mode(mode, snmw)))
            if pvc.volume_mode == "Block":
                cap.block.SetInParent()
            else:
                cap.mount.fs_type = fs_type
                cap.mount.mount_flags.extend(sc.mount_options)
            caps.append(cap)
        req = csi.CreateVolumeRequest(
            name=pv_name,
            volume_capabilities=caps,
            capacity_range=csi.CapacityRange(required_bytes=pvc.request),
        )
        if pvc.data_source is not None:
            req.volume_content_source.CopyFrom(self._content_source(pvc))
        if self.supports_topology():
            requirement = self.accessibility_requirements(pvc, sc, selected_node)
            if requirement is not None:
                req.accessibility_requirements.CopyFrom(requirement)
        # only csi.storage.k8s.io/* keys go: a legacy "fsType" (any case) stays in the
        # parameters besides the capability's fs_type ("not stripped to preserve backwards
        # compatibility")
        params = remove_prefixed_parameters(sc.parameters, _PROVISIONER_RESERVED)
        if self.extra_create_metadata:
            params[CSI_PREFIX + "pvc/name"] = pvc.name
            params[CSI_PREFIX + "pvc/namespace"] = pvc.namespace
            params[CSI_PREFIX + "pv/name"] = pv_name
        req.parameters.update(params)
        return req

    def _content_source(self, pvc: PVC) -> csi.VolumeContentSource:
        kind, obj = pvc.data_source  # type: ignore[misc]
        if kind == "VolumeSnapshot":
            snap: VolumeSnapshot = obj  # type: ignore[assignment]
            content = snap.content
            if content is None or not content.ready_to_use or not content.snapshot_handle:
                raise CallerError(f"snapshot {snap.name} is not Ready")
            if pvc.request < content.restore_size:
                raise CallerError(
                    f"requested volume size {pvc.request} is less than the size "
                    f"{content.restore_size} for the source snapshot {snap.name}"
                )
            return csi.VolumeContentSource(
                snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=content.snapshot_handle)
            )
        src: PVC = obj  # type: ignore[assignment]
        if src.volume is None:
            raise CallerError(f"source PVC {src.name} is not bound")
        if pvc.request < src.request:
            raise CallerError(
                "error, new PVC request must be greater than or equal in size to the specified PVC "
                f"data source, requested {pvc.request} but source is {src.request}"
            )
        source = csi.VolumeContentSource.VolumeSource(volume_id=src.volume.handle)
        return csi.VolumeContentSource(volume=source)

    def create_once(self, req: csi.CreateVolumeRequest, timeout: float | None = None) -> csi.Volume:
        self.calls.append(req)
        return self.client.controller.CreateVolume(req, timeout=timeout or self.timeout).volume

    def provision(
        self,
        pvc: PVC,
        sc: StorageClass,
        selected_node: str | None = "node-1",
        *,
        timeout: float | None = None,
        max_attempts: int = 50,
    ) -> PV:
        """Provision and, like the controller's work queue, retry an in-background state with
        the very same request (same name) until it settles."""
        req = self.build_request(pvc, sc, selected_node)
        may_reschedule = self.supports_topology() and bool(selected_node)
        attempt = 0
        while True:
            attempt += 1
            try:
                vol = self.create_once(req, timeout)
                break
            except grpc.RpcError as e:
                self.errors.append(e.code())
                state = check_error(e, may_reschedule)
                if state == ProvisioningState.RESCHEDULE:
                    self.reschedule_provisioning(pvc)
                if state != ProvisioningState.IN_BACKGROUND or attempt >= max_attempts:
                    raise ProvisioningFailed(state, e) from e
                time.sleep(self.retry_delay)
        return self._make_pv(pvc, sc, req, vol)

    def reschedule_provisioning(self, pvc: PVC) -> None:
        """sig-storage-lib-external-provisioner provisionVolumeErrorHandling ->
        rescheduleProvisioning: ProvisioningReschedule on a claim with a selected node
        removes that annotation, so the scheduler picks a node again."""
        pvc.annotations.pop(SELECTED_NODE_KEY, None)

    def sync_claim(self, pvc: PVC, sc: StorageClass) -> PV | None:
        """One sync of a claim by this node's provisioner (--node-deployment): checkNode
        provisions only a claim whose selected node is this node; another node's claim is
        ignored (IgnoredError, NoChange) and so is an unscheduled WaitForFirstConsumer one
        (becomeOwner for Immediate binding is not modelled). None when nothing was done."""
        selected = pvc.annotations.get(SELECTED_NODE_KEY, "")
        if not selected or selected != self.node_name:
            return None
        return self.provision(pvc, sc, selected)

    def _make_pv(self, pvc: PVC, sc: StorageClass, req: csi.CreateVolumeRequest, vol: csi.Volume) -> PV:
        attrs = {PROVISIONER_ID_KEY: self.identity}
        attrs.update(vol.volume_context)
        cap = vol.capacity_bytes or req.capacity_range.required_bytes
        if cap < req.capacity_range.required_bytes:
            self.client.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
            raise CallerError(
                f"created volume capacity {cap} less than requested capacity "
                f"{req.capacity_range.required_bytes}"
            )
        if pvc.data_source is not None and not vol.HasField("content_source"):
            self.client.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
            raise CallerError("volume content source missing")
        first = req.volume_capabilities[0]
        fs_type = first.mount.fs_type if first.HasField("mount") else ""
        pv = PV(
            name=req.name,
            handle=vol.volume_id,
            capacity=cap,
            access_modes=list(pvc.access_modes),
            fs_type=fs_type,
            mount_options=list(sc.mount_options),
            volume_attributes=attrs,
            node_affinity=[dict(t.segments) for t in vol.accessible_topology],
            volume_mode=pvc.volume_mode,
            claim=pvc,
        )
        pvc.volume = pv
        pvc.status_capacity = cap
        return pv

    def delete(self, pv: PV) -> None:
        req = csi.DeleteVolumeRequest(volume_id=pv.handle)
        self.client.controller.DeleteVolume(req, timeout=self.timeout)

    def get_capacity(self, sc: StorageClass, segment: dict[str, str] | None) -> csi.GetCapacityResponse:
        """pkg/capacity/capacity.go (*Controller).syncCapacity: the raw StorageClass parameters
        (a legacy fsType and the csi.storage.k8s.io/ keys included), no capabilities ("the
        capacity is independent of the capabilities"), one topology segment."""
        req = csi.GetCapacityRequest(parameters=sc.parameters)
        if segment is not None:
            req.accessible_topology.segments.update(segment)
        return self.client.controller.GetCapacity(req, timeout=self.timeout)


def _product(lists: list[list[str]]) -> Iterator[tuple[str, ...]]:
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _product(lists[1:]):
            yield (head, *rest)


# --------------------------------------------------------------------------- snapshotter
_SNAPSHOTTER_RESERVED = {
    CSI_PREFIX + k
    for k in (
        "snapshotter-secret-name",
        "snapshotter-secret-namespace",
        "snapshotter-list-secret-name",
        "snapshotter-list-secret-namespace",
        "group-snapshotter-get-secret-name",
        "group-snapshotter-get-secret-namespace",
        "group-snapshotter-secret-name",
        "group-snapshotter-secret-namespace",
    )
}


class Snapshotter:
    """csi-snapshotter sidecar (--extra-create-metadata) behind the snapshot-controller."""

    def __init__(self, client, *, extra_create_metadata: bool = True, prefix: str = "snapshot",
                 timeout: float = 120.0) -> None:
        self.client = client
        self.extra_create_metadata = extra_create_metadata
        self.prefix = prefix
        self.timeout = timeout
        self.calls: list[object] = []
        self.errors: list[grpc.StatusCode] = []

    def snapshot_name(self, vs: VolumeSnapshot) -> str:
        return f"{self.prefix}-{vs.uid}"  # csi_handler.go makeSnapshotName, uuid length -1

    def create(self, vs: VolumeSnapshot, class_parameters: dict[str, str] | None = None,
               poll_interval: float = 0.05, max_polls: int = 200) -> VolumeSnapshotContent:
        assert vs.source is not None and vs.source.volume is not None
        content = VolumeSnapshotContent(name=f"snapcontent-{vs.uid}")  # snapshot-controller naming
        vs.content = content
        params = remove_prefixed_parameters(dict(class_parameters or {}), _SNAPSHOTTER_RESERVED)
        if self.extra_create_metadata:
            params[CSI_PREFIX + "volumesnapshot/name"] = vs.name
            params[CSI_PREFIX + "volumesnapshot/namespace"] = vs.namespace
            params[CSI_PREFIX + "volumesnapshotcontent/name"] = content.name
        req = csi.CreateSnapshotRequest(
            source_volume_id=vs.source.volume.handle, name=self.snapshot_name(vs), parameters=params
        )
        for _ in range(max_polls):
            self.calls.append(req)
            try:
                snap = self.client.controller.CreateSnapshot(req, timeout=self.timeout).snapshot
                break
            except grpc.RpcError as e:
                self.errors.append(e.code())
                if is_final_error(e):
                    raise
                time.sleep(poll_interval)  # the content keeps its "being created" annotation: retry
        else:
            raise CallerError("CreateSnapshot never settled")
        content.snapshot_handle = snap.snapshot_id
        content.ready_to_use = snap.ready_to_use
        content.restore_size = snap.size_bytes
        content.creation_time_ns = snap.creation_time.ToNanoseconds()
        polls = 0
        while not content.ready_to_use:
            polls += 1
            if polls > max_polls:
                raise CallerError("snapshot never became ready to use")
            time.sleep(poll_interval)
            self.status(content)
        return content

    def status(self, content: VolumeSnapshotContent) -> VolumeSnapshotContent:
        """snapshotter.go GetSnapshotStatus: ListSnapshots by id when LIST_SNAPSHOTS is supported."""
        if CtrlRPC.LIST_SNAPSHOTS not in controller_capabilities(self.client):
            content.ready_to_use = True
            return content
        resp = self.client.controller.ListSnapshots(
            csi.ListSnapshotsRequest(snapshot_id=content.snapshot_handle), timeout=self.timeout
        )
        self.calls.append("ListSnapshots")
        if not resp.entries:
            raise CallerError(f"can not find snapshot for snapshotID {content.snapshot_handle}")
        s = resp.entries[0].snapshot
        content.ready_to_use = s.ready_to_use
        content.restore_size = s.size_bytes
        return content

    def delete(self, content: VolumeSnapshotContent) -> None:
        self.client.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=content.snapshot_handle), timeout=self.timeout
        )


# --------------------------------------------------------------------------- resizer
class Resizer:
    """external-resizer: NewResizerFromClient chooses the CSI resizer (controller
    EXPAND_VOLUME advertised) or the trivial one (node EXPAND_VOLUME only)."""

    def __init__(self, client, timeout: float = 60.0) -> None:
        self.client = client
        self.timeout = timeout
        services, _ = plugin_capabilities(client)
        if PluginService.CONTROLLER_SERVICE not in services:
            raise CallerError("CSI driver does not support controller service")
        caps = controller_capabilities(client)
        self.trivial = False
        if CtrlRPC.EXPAND_VOLUME not in caps:
            try:
                node_caps = node_capabilities(client)
            except grpc.RpcError as e:
                raise CallerError(f"failed to check if plugin supports node resize: {e}") from e
            if NodeRPC.EXPAND_VOLUME not in node_caps:
                raise CallerError("CSI driver neither supports controller resize nor node resize")
            self.trivial = True
        self.single_node_multi_writer = CtrlRPC.SINGLE_NODE_MULTI_WRITER in caps
        self.calls: list[csi.ControllerExpandVolumeRequest] = []

    def capability(self, pv: PV) -> csi.VolumeCapability:
        """csi_resizer.go GetVolumeCapabilities (from the PV, not the PVC)."""
        cap = csi.VolumeCapability()
        if pv.volume_mode == "Block":
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = pv.fs_type
            cap.mount.mount_flags.extend(pv.mount_options)
        cap.access_mode.mode = to_csi_access_mode(pv.access_modes[0], self.single_node_multi_writer)
        return cap

    def resize(self, pvc: PVC, new_size: int) -> tuple[int, bool]:
        """Returns (new PV size, node expansion required) and updates PV and PVC as the
        resizer does: PV capacity = returned size; PVC gets FileSystemResizePending when
        the node must finish, else its status capacity."""
        pv = pvc.volume
        assert pv is not None
        pvc.request = new_size
        if self.trivial:
            size, node_needed = new_size, True
        else:
            req = csi.ControllerExpandVolumeRequest(
                volume_id=pv.handle,
                capacity_range=csi.CapacityRange(required_bytes=new_size),
                volume_capability=self.capability(pv),
            )
            self.calls.append(req)
            try:
                resp = self.client.controller.ControllerExpandVolume(req, timeout=self.timeout)
            except grpc.RpcError as e:
                self.mark_failed(pvc, e)
                raise
            size, node_needed = resp.capacity_bytes, resp.node_expansion_required
        pv.capacity = size
        if node_needed:
            pvc.conditions.append("FileSystemResizePending")
        else:
            pvc.status_capacity = size
        return size, node_needed

    @staticmethod
    def mark_failed(pvc: PVC, err: grpc.RpcError) -> None:
        """controller.go callResizeOnPlugin (RecoverVolumeExpansionFailure): a final error that
        IsInfeasibleError (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND) marks the claim
        ControllerResizeInfeasible (slow retry), another final one ControllerResizeFailed; a
        non-final one changes no status. The PV keeps its size either way."""
        if not is_final_error(err):
            return
        infeasible = code_of(err) in {
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND
        }
        pvc.conditions.append("ControllerResizeInfeasible" if infeasible else "ControllerResizeFailed")


# --------------------------------------------------------------------------- kubelet
@dataclass
class Metrics:
    used: int
    capacity: int
    available: int
    inodes_used: int
    inodes: int
    inodes_free: int
    abnormal: bool | None = None
    message: str | None = None


RW_MASK, RO_MASK, EXEC_MASK = 0o660, 0o440, 0o110  # volume_linux.go rwMask, roMask, execMask


def requires_permission_change(root: Path, fs_group: int, read_only: bool) -> bool:
    """volume_linux.go requiresPermissionChange: the root (os.Stat, symlink followed) is a
    directory with the group, g+rwx (g+rx read-only) and setgid; anything else: change."""
    try:
        st = os.stat(root)
    except OSError:
        return True
    if st.st_gid != fs_group or not stat.S_ISDIR(st.st_mode):
        return True
    want = (RO_MASK if read_only else RW_MASK) | EXEC_MASK
    return st.st_mode & 0o777 & want != want or not st.st_mode & stat.S_ISGID


def change_file_permission(name: str, st: os.stat_result, fs_group: int, read_only: bool) -> None:
    """volume_linux.go changeFilePermission: Lchown(-1, fsGroup), no chmod of a symlink,
    Chmod(mode | g+rw (g+r read-only), directories also g+x and setgid); errors are only
    logged by kubelet."""
    try:
        os.lchown(name, -1, fs_group)
    except OSError:
        pass
    if stat.S_ISLNK(st.st_mode):
        return
    mask = RO_MASK if read_only else RW_MASK
    if stat.S_ISDIR(st.st_mode):
        mask |= stat.S_ISGID | EXEC_MASK
    try:
        os.chmod(name, stat.S_IMODE(st.st_mode) | mask)
    except OSError:
        pass


def walk_deep(path: str, st: os.stat_result, fn: Callable[[str, os.stat_result], None]) -> None:
    """volume_linux.go walkDeep/walk: Lstat every entry, never follow a symlink, children
    before their directory."""
    if stat.S_ISDIR(st.st_mode):
        for name in os.listdir(path):
            child = os.path.join(path, name)
            walk_deep(child, os.lstat(child), fn)
    fn(path, st)


def set_volume_ownership(path: Path, fs_group: int | None, read_only: bool, policy: str = "Always") -> None:
    """volume_linux.go SetVolumeOwnership: nothing without an fsGroup; skipPermissionChange
    (OnRootMismatch and the root needs no change); else every entry gets the group and
    the group permissions. The uid never changes."""
    if fs_group is None:
        return
    if policy == "OnRootMismatch" and not requires_permission_change(path, fs_group, read_only):
        return
    def change(name: str, st: os.stat_result) -> None:
        change_file_permission(name, st, fs_group, read_only)

    walk_deep(str(path), os.lstat(path), change)


class Kubelet:
    """The kubelet's CSI volume plugin on one node, with its kubelet dir under a temp path."""

    def __init__(self, client, root: Path, node_name: str = "node-1",
                 csidriver: CSIDriverObject | None = None) -> None:
        self.client = client
        self.root = Path(root)
        self.node_name = node_name
        self.csidriver = csidriver or CSIDriverObject()
        self.calls: list[tuple[str, object]] = []
        # selinux.GetSELinuxSupport of the host: the label is only computed when SELinux
        # is enabled (a test may pretend it is; the driver checks its own host)
        self.selinux_host = os.path.exists("/sys/fs/selinux/enforce")
        self.feature_selinux_mount = False  # SELinuxMount gate: any PV, not only RWOP ones
        # ASW devicePath of a mapped block device (operation_generator.go GenerateMapVolumeFunc)
        self.block_device_paths: dict[str, str] = {}

    # -------- paths
    @property
    def plugin_dir(self) -> Path:
        return self.root / "plugins" / CSI_PLUGIN_NAME  # host.GetPluginDir("kubernetes.io/csi")

    def device_mount_path(self, pv: PV) -> Path:
        """csi_attacher.go makeDeviceMountPath:
        <plugins>/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount."""
        sha = hashlib.sha256(pv.handle.encode()).hexdigest()
        return self.plugin_dir / pv.driver / sha / "globalmount"

    def pod_volume_dir(self, pod_uid: str, spec_name: str) -> Path:
        return self.root / "pods" / pod_uid / "volumes" / ESCAPED_PLUGIN_NAME / spec_name.replace("/", "~")

    def target_path(self, pod_uid: str, spec_name: str) -> Path:
        """csi_mounter.go GetPath: <pods>/<uid>/volumes/kubernetes.io~csi/<spec name>/mount."""
        return self.pod_volume_dir(pod_uid, spec_name) / "mount"

    def block_staging_path(self, pv: PV) -> Path:
        return self.plugin_dir / "volumeDevices" / "staging" / pv.name  # csi_block.go getStagingPath

    def block_publish_path(self, pv: PV, pod: Pod) -> Path:
        return self.plugin_dir / "volumeDevices" / "publish" / pv.name / pod.uid  # getPublishPath

    def block_global_map_path(self, pv: PV) -> Path:
        return self.plugin_dir / "volumeDevices" / pv.name / "dev"  # csi_block.go GetGlobalMapPath

    def block_map_file(self, pv: PV, pod: Pod) -> Path:
        """<global map path>/<podUID>: MapBlockVolume's bind mount of the device, and the
        volume_path of NodeGetVolumeStats (csi_plugin.go NewBlockVolumeMapper)."""
        return self.block_global_map_path(pv) / pod.uid

    def pod_device_map_path(self, pod_uid: str, pv: PV) -> Path:
        """GetPodDeviceMapPath: pods/<uid>/volumeDevices/kubernetes.io~csi, then <pv name>."""
        return self.root / "pods" / pod_uid / "volumeDevices" / ESCAPED_PLUGIN_NAME / pv.name

    # -------- fsGroup and SELinux decisions
    def fs_group_policy(self) -> str:
        """csi_mounter.go getFSGroupPolicy: an unset policy on the CSIDriver is an error
        (SetUpAt fails transiently). Without a CSIDriver it would be
        ReadWriteOnceWithFSType; this model always has one (the chart installs it)."""
        policy = self.csidriver.fs_group_policy
        if not policy:
            raise KubeletError("expected valid fsGroupPolicy, received nil value or empty string")
        return policy

    def selinux_mount_option(self, pod: Pod, pv: PV | None) -> list[str]:
        """AddSELinuxMountOption when the label applies: GetMountSELinuxLabel (host SELinux
        on, a label), SupportsSELinuxContextMount (CSIDriver seLinuxMount: true) and
        VolumeSupportsSELinuxMount (a PV; only RWOP without the SELinuxMount gate).
        Go formats it with %q: literal double quotes."""
        if not (pod.se_linux_label and self.selinux_host and self.csidriver.se_linux_mount):
            return []
        if pv is None or not (self.feature_selinux_mount or pv.access_modes == ["ReadWriteOncePod"]):
            return []
        return [f'context="{pod.se_linux_label}"']

    # -------- capabilities (kubelet asks every time)
    def node_caps(self) -> set[int]:
        return node_capabilities(self.client)

    def access_mode(self, k8s_mode: str) -> int:
        return to_csi_access_mode(k8s_mode, NodeRPC.SINGLE_NODE_MULTI_WRITER in self.node_caps())

    def _capability(self, fs_type: str, mount_options: list[str] | None, k8s_mode: str,
                    fs_group: int | None = None, block: bool = False) -> csi.VolumeCapability:
        cap = csi.VolumeCapability(access_mode=Mode(mode=self.access_mode(k8s_mode)))
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = fs_type
            cap.mount.mount_flags.extend(mount_options or [])
            if fs_group is not None:
                cap.mount.volume_mount_group = str(fs_group)
        return cap

    def _call(self, name: str, req) -> object:
        self.calls.append((name, req))
        return getattr(self.client.node, name)(req, timeout=CSI_TIMEOUT)

    # -------- removeMountDir (csi_mounter.go)
    def remove_mount_dir(self, mount_path: Path) -> None:
        if host.is_mounted(mount_path):
            return
        try:
            os.rmdir(mount_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise KubeletError(f"failed to remove dir [{mount_path}]: {e}") from e
        vol_dir = mount_path.parent
        (vol_dir / VOL_DATA_FILE).unlink(missing_ok=True)
        try:
            os.rmdir(vol_dir)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise KubeletError(f"failed to delete volume path [{vol_dir}]: {e}") from e

    # -------- MountDevice / UnmountDevice (csi_attacher.go)
    def mount_device(self, pv: PV, fs_group: int | None = None,
                     selinux_option: list[str] | None = None) -> Path:
        """csi_attacher.go MountDevice: the fsGroup goes to the driver only with
        VOLUME_MOUNT_GROUP (whatever the fsGroupPolicy); the SELinux context option
        (``selinux_mount_option``) follows the PV's mountOptions."""
        caps = self.node_caps()
        path = self.device_mount_path(pv)
        path.mkdir(mode=0o750, parents=True, exist_ok=True)  # MkdirAllWithPathCheck(deviceMountPath, 0750)
        data = {"volumeHandle": pv.handle, "driverName": pv.driver}
        if selinux_option:
            data["seLinuxMountContext"] = selinux_option[0][len('context="'):-1]
        _save_volume_data(path.parent, data)
        if NodeRPC.STAGE_UNSTAGE_VOLUME not in caps:
            return path
        group = fs_group if NodeRPC.VOLUME_MOUNT_GROUP in caps else None
        options = [*pv.mount_options, *(selinux_option or [])]
        req = csi.NodeStageVolumeRequest(
            volume_id=pv.handle,
            publish_context={},  # attachRequired: false, no VolumeAttachment
            staging_target_path=str(path),
            volume_capability=self._capability(pv.fs_type, options, pv.access_modes[0], group),
            volume_context=pv.volume_attributes,
        )
        try:
            self._call("NodeStageVolume", req)
        except grpc.RpcError as e:
            if is_final_error(e):
                self.remove_mount_dir(path)
            raise
        return path

    def unmount_device(self, device_mount_path: Path) -> None:
        data_file = device_mount_path.parent / VOL_DATA_FILE
        if not data_file.exists():
            return  # "UnmountDevice skipped because volume data file does not exist"
        data = json.loads(data_file.read_text())
        if NodeRPC.STAGE_UNSTAGE_VOLUME in self.node_caps():
            self._call(
                "NodeUnstageVolume",
                csi.NodeUnstageVolumeRequest(volume_id=data["volumeHandle"],
                                             staging_target_path=str(device_mount_path)),
            )
        self.remove_mount_dir(device_mount_path)

    # -------- SetUp / TearDown (csi_mounter.go)
    def pod_info(self, pod: Pod, ephemeral: bool) -> dict[str, str]:
        return {
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true" if ephemeral else "false",
        }

    def supports_fs_group(self, fs_type: str, fs_group: int | None, read_only: bool,
                          access_modes: list[str] | None) -> bool:
        """csi_mounter.go supportsFSGroup: never without an fsGroup, with policy None or
        read-only; always with File; else (ReadWriteOnceWithFSType) only with an fsType and a
        PV whose access modes include ReadWriteOnce (hasReadWriteOnce: RWOP does not count),
        or an inline volume (mounted RWO)."""
        policy = self.fs_group_policy()
        if fs_group is None or policy == "None" or read_only:
            return False
        if policy == "File":
            return True
        if not fs_type:
            return False
        if access_modes is not None:
            return "ReadWriteOnce" in access_modes
        return True  # inline volumes are mounted RWO

    def set_up(self, pod: Pod, pv: PV, read_only: bool = False) -> Path:
        """Mounter.SetUpAt for a PV (the spec name of a PV volume is the PV name)."""
        caps = self.node_caps()
        target = self.target_path(pod.uid, pv.name)
        staging = str(self.device_mount_path(pv)) if NodeRPC.STAGE_UNSTAGE_VOLUME in caps else ""
        attrs = dict(pv.volume_attributes)
        options = [*pv.mount_options, *self.selinux_mount_option(pod, pv)]
        return self._set_up(pod, target, pv.handle, pv.name, "Persistent", attrs, staging,
                            pv.fs_type, options, pv.access_modes, read_only)

    def set_up_inline(self, pod: Pod, spec_name: str, attributes: dict[str, str],
                      read_only: bool = False, fs_type: str = "") -> tuple[str, Path]:
        """Mounter.SetUpAt for a CSI inline (ephemeral) volume: the handle is
        csi-<sha256(podUID + specName)>, no staging path, RWO."""
        if "Ephemeral" not in self.csidriver.volume_lifecycle_modes:
            raise KubeletError(f'volume mode "Ephemeral" not supported by driver {self.csidriver.name}')
        handle = "csi-" + hashlib.sha256(f"{pod.uid}{spec_name}".encode()).hexdigest()
        target = self.target_path(pod.uid, spec_name)
        self._set_up(pod, target, handle, spec_name, "Ephemeral", dict(attributes), "", fs_type, [],
                     None, read_only)
        return handle, target

    def _set_up(self, pod: Pod, target: Path, handle: str, spec_name: str, lifecycle: str,
                attrs: dict[str, str], staging: str, fs_type: str, mount_options: list[str],
                access_modes: list[str] | None, read_only: bool) -> Path:
        caps = self.node_caps()
        parent = target.parent
        # "create target_dir before call to NodePublish": only the parent
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if self.csidriver.pod_info_on_mount:
            attrs.update(self.pod_info(pod, lifecycle == "Ephemeral"))
        self.fs_group_policy()  # getFSGroupPolicy fails SetUpAt before any call
        # NodeSupportsVolumeMountGroup: the driver gets the fsGroup, whatever the policy
        group_by_driver = NodeRPC.VOLUME_MOUNT_GROUP in caps
        _save_volume_data(parent, {
            "specVolID": spec_name,
            "volumeHandle": handle,
            "driverName": self.csidriver.name,
            "nodeName": self.node_name,
            "volumeLifecycleMode": lifecycle,
            "attachmentID": "csi-" + hashlib.sha256(
                f"{handle}{self.csidriver.name}{self.node_name}".encode()).hexdigest(),
        })
        req = csi.NodePublishVolumeRequest(
            volume_id=handle,
            readonly=read_only,
            target_path=str(target),
            publish_context={},
            volume_context=attrs,
            volume_capability=self._capability(
                fs_type, mount_options, (access_modes or ["ReadWriteOnce"])[0],
                pod.fs_group if group_by_driver else None,
            ),
        )
        if staging:
            req.staging_target_path = staging
        try:
            self._call("NodePublishVolume", req)
        except grpc.RpcError as e:
            if is_final_error(e):
                self.remove_mount_dir(target)
            raise
        if not group_by_driver and self.supports_fs_group(fs_type, pod.fs_group, read_only, access_modes):
            set_volume_ownership(target, pod.fs_group, read_only, pod.fs_group_change_policy)
        return target

    def tear_down(self, pod_uid: str, spec_name: str) -> None:
        """NewUnmounter (loads vol_data.json) + TearDownAt: NodeUnpublishVolume, then removeMountDir."""
        target = self.target_path(pod_uid, spec_name)
        data_file = target.parent / VOL_DATA_FILE
        try:
            data = json.loads(data_file.read_text())
        except FileNotFoundError as e:
            raise KubeletError(f"unmounter failed to load volume data file [{target}]: {e}") from e
        self._call("NodeUnpublishVolume",
                   csi.NodeUnpublishVolumeRequest(volume_id=data["volumeHandle"], target_path=str(target)))
        self.remove_mount_dir(target)

    # -------- block (csi_block.go)
    def set_up_device_block(self, pv: PV) -> Path:
        path = self.block_staging_path(pv)
        if NodeRPC.STAGE_UNSTAGE_VOLUME in self.node_caps():
            path.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._call("NodeStageVolume", csi.NodeStageVolumeRequest(
                volume_id=pv.handle, publish_context={}, staging_target_path=str(path),
                volume_capability=self._capability("", None, pv.access_modes[0], block=True),
                volume_context=pv.volume_attributes))
        return path

    def map_pod_device(self, pod: Pod, pv: PV, read_only: bool = False) -> Path:
        """GenerateMapVolumeFunc after SetUpDevice: MapPodDevice (NodePublish), the device
        path recorded in the ASW (EvalHostSymlinks of the publish path), MapBlockVolume."""
        publish = self._publish_for_block(pod, pv, read_only)
        device = os.path.realpath(publish)  # hu.EvalHostSymlinks(devicePath)
        self.block_device_paths.setdefault(pv.name, device)
        self.map_block_volume(Path(device), pv, pod)
        return publish

    def map_block_volume(self, device: Path, pv: PV, pod: Pod) -> None:
        """util.go MapBlockVolume: MapDevice(bindMount=true) creates <global map path>/<podUID>
        and bind-mounts the device onto it; MapDevice(bindMount=false) makes the pod's
        symlink. (The loop device it then attaches as an fd lock is not modelled.)"""
        global_map = self.block_global_map_path(pv)
        global_map.mkdir(mode=0o750, parents=True, exist_ok=True)
        link = self.block_map_file(pv, pod)
        if not link.exists():
            link.touch(mode=0o750)
        if not host.is_mounted(link):
            host.bind_mount(device, link)
        pod_map = self.pod_device_map_path(pod.uid, pv)
        pod_map.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if pod_map.is_symlink():
            pod_map.unlink()
        pod_map.symlink_to(device)

    def unmap_block_volume(self, pv: PV, pod_uid: str) -> None:
        """util.go UnmapBlockVolume: remove the pod's symlink (UnmapDevice) and its map dir
        (RemoveMapPath; modelled as removing it once empty), then unmount and remove
        <global map path>/<podUID> (UnmapDevice with bindMount)."""
        pod_map = self.pod_device_map_path(pod_uid, pv)
        if pod_map.is_symlink():
            pod_map.unlink()
        with contextlib.suppress(OSError):
            pod_map.parent.rmdir()
        link = self.block_global_map_path(pv) / pod_uid
        if host.is_mounted(link):
            host.umount(link)
        link.unlink(missing_ok=True)

    def _publish_for_block(self, pod: Pod, pv: PV, read_only: bool) -> Path:
        """csi_block.go publishVolumeForBlock."""
        publish = self.block_publish_path(pv, pod)
        publish.parent.mkdir(mode=0o750, parents=True, exist_ok=True)  # the driver creates publish itself
        attrs = dict(pv.volume_attributes)
        if self.csidriver.pod_info_on_mount:
            attrs.update(self.pod_info(pod, False))
        self._call("NodePublishVolume", csi.NodePublishVolumeRequest(
            volume_id=pv.handle, readonly=read_only, staging_target_path=str(self.block_staging_path(pv)),
            target_path=str(publish), publish_context={}, volume_context=attrs,
            volume_capability=self._capability("", [], pv.access_modes[0], block=True)))
        return publish

    def unmap_pod_device(self, pod: Pod, pv: PV) -> None:
        """GenerateUnmapVolumeFunc: UnmapBlockVolume, then UnmapPodDevice (NodeUnpublish)."""
        self.unmap_block_volume(pv, pod.uid)
        self._call("NodeUnpublishVolume", csi.NodeUnpublishVolumeRequest(
            volume_id=pv.handle, target_path=str(self.block_publish_path(pv, pod))))

    def tear_down_device_block(self, pv: PV) -> None:
        path = self.block_staging_path(pv)
        if path.exists():
            if NodeRPC.STAGE_UNSTAGE_VOLUME in self.node_caps():
                self._call("NodeUnstageVolume", csi.NodeUnstageVolumeRequest(
                    volume_id=pv.handle, staging_target_path=str(path)))
            if path.is_dir() and not host.is_mounted(path):
                for child in path.iterdir():
                    raise KubeletError(f"staging path {path} still holds {child.name}")
            path.rmdir()
        self.remove_map_path(self.block_global_map_path(pv))
        self.block_device_paths.pop(pv.name, None)
        publish_dir = self.block_publish_path(pv, Pod("x")).parent
        try:
            publish_dir.rmdir()
        except FileNotFoundError:
            pass

    def remove_map_path(self, global_map: Path) -> None:
        """GenerateUnmapDeviceFunc: GetDeviceBindMountRefs refuses while a pod's bind mount
        remains; then RemoveMapPath(globalMapPath) and (cleanupOrphanDeviceFiles) the
        volumeDevices/<pv name> dir."""
        if global_map.is_dir():
            refs = [c.name for c in global_map.iterdir() if host.is_mounted(c)]
            if refs:
                raise KubeletError(f"the device {global_map} is still referenced by pods {refs}")
            shutil.rmtree(global_map)
        try:
            global_map.parent.rmdir()
        except (FileNotFoundError, OSError):
            pass

    # -------- metrics (csi_metrics.go + csi_client.go NodeGetVolumeStats)
    def get_metrics(self, handle: str, target: Path) -> Metrics:
        caps = self.node_caps()
        if NodeRPC.GET_VOLUME_STATS not in caps:
            raise KubeletError("metrics are not supported for this driver")
        resp = self._call("NodeGetVolumeStats",
                          csi.NodeGetVolumeStatsRequest(volume_id=handle, volume_path=str(target)))
        if not resp.usage:  # Go: GetUsage() == nil for an empty repeated field
            raise KubeletError("failed to get usage from response. usage is nil")
        m = Metrics(0, 0, 0, 0, 0, 0)
        if NodeRPC.VOLUME_CONDITION in caps:  # CSIVolumeHealth feature gate
            m.abnormal, m.message = resp.volume_condition.abnormal, resp.volume_condition.message
        for u in resp.usage:
            if u.unit == csi.VolumeUsage.BYTES:
                m.available, m.capacity, m.used = u.available, u.total, u.used
            elif u.unit == csi.VolumeUsage.INODES:
                m.inodes_free, m.inodes, m.inodes_used = u.available, u.total, u.used
        return m

    # -------- NodeExpand (expander.go, operation_generator.go GenerateExpandInUseVolumeFunc)
    def node_expand(self, pod: Pod, pv: PV) -> int:
        """Online expansion of a mounted volume: volume_path is the pod's target
        (volumeMounter.GetPath()), staging_target_path the device mount path, new size
        the PV's capacity."""
        caps = self.node_caps()
        if NodeRPC.EXPAND_VOLUME not in caps:
            raise KubeletError(f"NodeExpand is not supported by the CSI driver {pv.driver}")
        block = pv.volume_mode == "Block"
        if block:
            # expander.go: volumePath = DevicePath, the device path the ASW recorded when the
            # device was first mapped (that pod may be gone); DeviceStagePath = GetStagingPath
            volume_path = self.block_device_paths[pv.name]
            staging = str(self.block_staging_path(pv))
        else:
            volume_path = str(self.target_path(pod.uid, pv.name))
            staging = str(self.device_mount_path(pv))
        req = csi.NodeExpandVolumeRequest(
            volume_id=pv.handle,
            volume_path=volume_path,
            capacity_range=csi.CapacityRange(required_bytes=pv.capacity),
            volume_capability=self._capability(pv.fs_type, pv.mount_options, pv.access_modes[0], block=block),
        )
        if NodeRPC.STAGE_UNSTAGE_VOLUME in caps:
            req.staging_target_path = staging
        resp = self._call("NodeExpandVolume", req)
        claim = pv.claim
        if claim is not None:
            claim.status_capacity = pv.capacity
            if "FileSystemResizePending" in claim.conditions:
                claim.conditions.remove("FileSystemResizePending")
        return resp.capacity_bytes

    # -------- restart (reconstruct.go)
    def reconstruct(self) -> list[dict[str, str]]:
        """getVolumesFromPodDir + csi_plugin.go ConstructVolumeSpec: every
        pods/<uid>/volumes/kubernetes.io~csi/<name>/vol_data.json is a volume in uncertain state."""
        found = []
        pods = self.root / "pods"
        if not pods.is_dir():
            return found
        for pod_dir in sorted(pods.iterdir()):
            plugin_dir = pod_dir / "volumes" / ESCAPED_PLUGIN_NAME
            if not plugin_dir.is_dir():
                continue
            for vol_dir in sorted(plugin_dir.iterdir()):
                data_file = vol_dir / VOL_DATA_FILE
                if data_file.exists():
                    data = json.loads(data_file.read_text())
                    data["podUID"] = pod_dir.name
                    data["mountPath"] = str(vol_dir / "mount")
                    found.append(data)
        return found


def _save_volume_data(directory: Path, data: dict[str, str]) -> None:
    """csi_util.go saveVolumeData: vol_data.json next to the mount dir."""
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    (directory / VOL_DATA_FILE).write_text(json.dumps(data))


def run_as(uid: int, gid: int, groups: list[int], cwd: Path, script: str) -> tuple[int, str]:
    """Run ``sh -c script`` in ``cwd`` as a pod's non-root process would (runAsUser,
    runAsGroup, supplemental groups incl. fsGroup). The child enters cwd as root and
    setpriv(1) drops privileges, so the 0700 pytest temp dirs above it do not matter (and
    Python never forks with user=/group=, which gRPC's fork handlers do not survive)."""
    import subprocess

    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            "--groups=" + ",".join(str(g) for g in groups), "sh", "-c", script]
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def mount_count(path: Path) -> int:
    return sum(1 for m in host.mounts() if m.target == str(path))


# --------------------------------------------------------------------------- one node
class NodeEnv:
    """One node: the real driver (in process, temp socket and state dir), the kubelet dir
    under the same temp root, the node registered as node-driver-registrar and kubelet do,
    and the sidecars of the chart's DaemonSet talking to the same socket. Two more nodes
    (node-0, node-2) exist in the cluster with the driver registered, as in a real
    three-node cluster."""

    def __init__(self, root: Path, **driver_opts) -> None:
        from driver_harness import Driver

        self.root = root
        self.opts = driver_opts
        self.driver = Driver(root, **driver_opts)
        self.cluster = Cluster()
        for other in ("node-0", "node-2"):
            self.cluster.add_registered_node(other, {TOPOLOGY_KEY: other})
        self.registration = register_plugin(self.client, self.cluster, "node-1")
        self.kubelet = Kubelet(self.client, self.driver.kubelet)
        self.provisioner = Provisioner(self.client, self.cluster)
        self.snapshotter = Snapshotter(self.client)
        self.sc = StorageClass()

    @property
    def client(self):
        return self.driver.client

    def restart_driver(self) -> None:
        """The node plugin container restarts (same state dir, same socket path)."""
        from driver_harness import Driver

        self.driver.stop()
        self.driver = Driver(self.root, **self.opts)
        for caller in (self.kubelet, self.provisioner, self.snapshotter):
            caller.client = self.client

    def stop(self) -> None:
        self.driver.stop()

    # -------- conveniences: one PVC -> PV, a pod using it
    def claim(self, name: str, size: int = 64 << 20, **kw) -> PVC:
        return PVC(name=name, request=size, **kw)

    def provision(self, name: str, size: int = 64 << 20, **kw) -> tuple[PVC, PV]:
        pvc = self.claim(name, size, **kw)
        pv = self.provisioner.provision(pvc, self.sc)
        return pvc, pv

    def start_pod(self, pod: Pod, pv: PV, read_only: bool = False) -> Path:
        """MountDevice once per volume (kubelet skips it when the device is already
        mounted), then SetUp for the pod."""
        if not host.is_mounted(self.kubelet.device_mount_path(pv)):
            self.kubelet.mount_device(pv, pod.fs_group, self.kubelet.selinux_mount_option(pod, pv))
        return self.kubelet.set_up(pod, pv, read_only)

    def stop_pod(self, pod: Pod, pv: PV, last_user: bool = True) -> None:
        self.kubelet.tear_down(pod.uid, pv.name)
        if last_user:
            self.kubelet.unmount_device(self.kubelet.device_mount_path(pv))
