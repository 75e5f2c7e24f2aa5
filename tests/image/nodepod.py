"""The chart's node pod, as rendered by ``helm template``, run from the built image.

``podman run`` cannot start containers in this sandbox (the OCI runtime may not set
rlimits), so the container is run the way a runtime would set it up, by hand: a
private mount namespace, a writable overlay over the image's root file system,
the pod's hostPath volumes bound at their mountPaths (Bidirectional ones stay in
the host dir's shared peer group, so what the driver mounts under the kubelet dir
is seen by the host, as kubelet needs), /proc and /sys, then chroot and exec of the image's entrypoint
with the container's args and env. Nothing is retyped: args, env, securityContext
and volume mounts come from the rendered DaemonSet.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".ci" / "bin" / "helm"


@dataclass(frozen=True)
class Bind:
    host: Path
    container: str
    shared: bool  # mountPropagation: Bidirectional


@dataclass(frozen=True)
class NodePod:
    args: list[str]
    env: dict[str, str]
    binds: list[Bind]
    privileged: bool
    image_env: dict[str, str] = field(default_factory=dict)  # the image's own (PATH, ...)


def render(values: dict[str, str], node_name: str, image_env: dict[str, str]) -> NodePod:
    """The driver container of the chart's node DaemonSet, downward API values substituted."""
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    if helm is None:
        raise RuntimeError("no helm (bash .ci/install-helm.sh)")
    sets = [x for k, v in values.items() for x in ("--set", f"{k}={v}")]
    out = subprocess.run([helm, "template", "t", str(REPO / "charts" / "overlay-csi"), *sets],
                         check=True, capture_output=True, text=True).stdout
    ds = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    c = next(x for x in spec["containers"] if x["name"] == "overlay-csi")
    field_values = {"spec.nodeName": node_name, "metadata.namespace": "default"}
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in c.get("args", [])]
    volumes = {v["name"]: v for v in spec["volumes"]}
    binds = []
    for m in c.get("volumeMounts", []):
        source = volumes[m["name"]]["hostPath"]["path"]
        binds.append(Bind(Path(source), m["mountPath"], m.get("mountPropagation") == "Bidirectional"))
    return NodePod(args, env, binds, bool(c.get("securityContext", {}).get("privileged")), image_env)


def _script(pod: NodePod, image_root: Path, work: Path, argv: list[str]) -> str:
    root = work / "root"
    lines = [
        "set -e",
        f"mount -t overlay overlay -o lowerdir={image_root},upperdir={work}/upper,workdir={work}/work {root}",
    ]
    for b in pod.binds:
        dest = shlex.quote(f"{root}{b.container}")
        lines += [f"mkdir -p {dest}", f"mount --rbind {shlex.quote(str(b.host))} {dest}"]
        if not b.shared:  # a shared host dir stays in its peer group: mounts propagate both ways
            lines.append(f"mount --make-rprivate {dest}")
    lines += [f"mount -t proc proc {root}/proc", f"mount --rbind /sys {root}/sys"]
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in {**pod.image_env, **pod.env}.items())
    lines.append(f"exec chroot {root} /usr/bin/env -i {env} " + " ".join(map(shlex.quote, argv)))
    return "\n".join(lines)


def share(path: Path) -> None:
    """Make ``path`` a shared mount point on the host side, as kubelet's dir is on a node
    (the test process's namespace is otherwise private)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)


class RunningPod:
    """The driver container as a process tree in its own mount namespace."""

    def __init__(self, pod: NodePod, image_root: Path, work: Path, argv: list[str]) -> None:
        for d in ("upper", "work", "root"):
            (work / d).mkdir(parents=True, exist_ok=True)
        for b in pod.binds:  # hostPath types Directory(OrCreate)
            b.host.mkdir(parents=True, exist_ok=True)
        self.log = work / "container.log"
        script = _script(pod, image_root, work, argv)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "unchanged", "--fork", "sh", "-c", script],
                stdout=log, stderr=log, start_new_session=True)

    def wait_for(self, path: Path, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        return self.proc.wait()


def run_once(pod: NodePod, image_root: Path, work: Path, argv: list[str], timeout: float = 300) -> str:
    """Run another command in a container set up like the pod's (doctor, for one)."""
    p = RunningPod(pod, image_root, work, argv)
    try:
        p.proc.wait(timeout=timeout)
    finally:
        p.stop()
    return p.log.read_text()
