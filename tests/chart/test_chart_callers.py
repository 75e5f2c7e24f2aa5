"""The chart's cluster-wide sidecars reach a driver instance that serves what they call.

Each test renders the chart, finds the sidecar and the driver container that shares its
socket, starts the real driver with the rendered arguments, and asks it what the sidecar's
startup asks (external-resizer main.go: NewResizerFromClient, NewModifierFromClient;
external-snapshotter main.go: supportsControllerCreateSnapshot)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_chart import _missing, arg_value, container, has_flag, mounts, pod_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "kubelet"))

from driver_harness import MOUNT_SKIP  # noqa: E402


def driver_beside(workload: dict[str, Any], sidecar: str) -> dict[str, Any]:
    """The container serving the CSI socket the sidecar dials: same volume, same path."""
    side = container(workload, sidecar)
    address = arg_value(side, "--csi-address")
    socket_volume = next(name for name, m in mounts(side).items() if address.startswith(m["mountPath"] + "/"))
    for c in pod_spec(workload)["containers"]:
        m = mounts(c).get(socket_volume)
        if c is not side and m and f"--endpoint=unix://{address}" in c.get("args", []):
            assert address.startswith(m["mountPath"] + "/")
            return c
    raise AssertionError(f"no container in {workload['metadata']['name']} serves {address}")


@contextmanager
def started(driver: dict[str, Any], root: Path, **extra: Any) -> Iterator[Any]:
    """The driver container's own arguments, parsed by the real CLI, served in this process
    (socket and state dir under ``root``)."""
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    from csi_driver.cli import build_parser
    from csi_driver.client import Client
    from csi_driver.server import ServeOptions, Server

    args = [a.replace("$(NODE_NAME)", "node-1") for a in driver["args"]]
    ns, unknown = build_parser().parse_known_args(args)
    assert unknown == []
    assert ns.kubernetes == "auto", "the instance must be allowed to use the API"
    server = Server(ServeOptions(
        endpoint=f"unix://{root / 'csi.sock'}", state_dir=root / "state", node_id=ns.node_id,
        driver_name=ns.driver_name, mode=ns.mode, max_volume_size=ns.max_volume_size,
        registry_snapshotter_node=ns.registry_snapshotter_node, **extra))
    server.start()
    client = Client(root / "csi.sock")
    try:
        client.wait_ready()
        yield client
    finally:
        client.close()
        server.stop(grace=5)


def test_the_resizer_reaches_an_instance_that_advertises_modify_volume(render, tmp_path):
    from kube_apiserver import FakeApiServer
    from kubelet_sim import CtrlRPC, Resizer, controller_capabilities

    from csi_driver.kube.api import ClusterApi

    r = render("default")
    resizer = container(r.controller, "csi-resizer")
    assert has_flag(resizer, "--extra-modify-metadata"), "the driver needs the PV name to reach the node"
    assert not any("VolumeAttributesClass=false" in a for a in resizer["args"])
    with FakeApiServer() as api, started(driver_beside(r.controller, "csi-resizer"), tmp_path,
                                         kube_api=ClusterApi(api.configuration())) as client:
        Resizer(client)  # NewResizerFromClient: the CONTROLLER_SERVICE plugin capability, or exit
        caps = controller_capabilities(client)
        assert CtrlRPC.MODIFY_VOLUME in caps, "NewModifierFromClient: no MODIFY_VOLUME, no modify controller"
        assert CtrlRPC.EXPAND_VOLUME in caps


def test_the_registry_snapshotter_reaches_an_instance_that_checks_exported_snapshots(render, tmp_path):
    from kube_apiserver import FakeApiServer
    from kubelet_sim import CtrlRPC, controller_capabilities

    from csi_driver.kube.api import ClusterApi

    r = render("default")
    dep = next(d for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-registry-snapshotter"))
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    snap = container(dep, "csi-snapshotter")
    assert has_flag(snap, "--node-deployment") and not has_flag(snap, "--leader-election")
    node_name = next(e["value"] for e in snap["env"] if e["name"] == "NODE_NAME")
    driver = driver_beside(dep, "csi-snapshotter")
    assert arg_value(driver, "--registry-snapshotter-node") == node_name, "it labels contents for its sidecar"
    assert len(node_name) <= 63, "a label value"
    sa = pod_spec(dep)["serviceAccountName"]
    assert not _missing(r, sa, [
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("list", "watch", "patch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("patch",), "cluster"),
    ])
    with FakeApiServer() as api, started(driver, tmp_path, kube_api=ClusterApi(api.configuration())) as c:
        client = c
        caps = controller_capabilities(client)
        assert CtrlRPC.CREATE_DELETE_SNAPSHOT in caps, "csi-snapshotter exits without it"
        assert CtrlRPC.LIST_SNAPSHOTS in caps, "without it the sidecar marks every content ready unchecked"


def test_no_registry_snapshotter_without_snapshots(render):
    r = render("minimal")
    assert not [d for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-registry-snapshotter")]


def test_both_ends_of_the_modify_relay_may_use_the_pv(render, value_set):
    """The central instance reads and patches the PV (request), the node plugin lists and
    patches it (answer): the service accounts their pods run under must allow that."""
    r = render(value_set)
    if not r.values["rbac"]["create"]:
        pytest.skip("rbac.create=false renders no RBAC")
    central = pod_spec(r.controller)["serviceAccountName"]
    node = pod_spec(r.daemonset)["serviceAccountName"]
    assert not _missing(r, central, [("", "persistentvolumes", ("get", "patch"), "cluster")])
    assert not _missing(r, node, [("", "persistentvolumes", ("list", "patch"), "cluster")])
