"""Kubernetes: whether we run in a pod, and if so whether the kubelet dir's
mount propagation lets kubelet see the driver's mounts."""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver.doctor.check import FAIL, OK, Check
from csi_driver.doctor.procfs import mount_of


def in_pod() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        or Path("/var/run/secrets/kubernetes.io/serviceaccount").exists()
    )


# where the driver mounts: kubelet's pods/ (targets) and plugins/ (staging and block paths);
# the chart mounts only these two into the node plugin, never the whole kubelet dir
KUBELET_SUBDIRS = ("pods", "plugins")


def check_propagation(kubelet_dir: Path, pod: bool) -> Check:
    if not pod:
        return Check(
            "mount_propagation",
            OK,
            "not running in a pod: the driver's mounts are the host's, no propagation needed",
        )
    checks = [_propagation(kubelet_dir / sub) for sub in KUBELET_SUBDIRS]
    bad = [c for c in checks if c.status != OK]
    if bad:
        return bad[0]
    return Check("mount_propagation", OK, "; ".join(c.message for c in checks))


def _propagation(path: Path) -> Check:
    if not path.exists():
        return Check(
            "mount_propagation",
            FAIL,
            f"{path} is not visible in this pod",
            f"mount the host's {path} into the node plugin (hostPath) "
            "with mountPropagation: Bidirectional",
        )
    m = mount_of(str(path))
    tags = m.optional if m else []
    shared = any(t.startswith("shared:") for t in tags)
    slave = any(t.startswith("master:") for t in tags)
    where = f"{path} (mount at {m.target if m else '?'}: {' '.join(tags) or 'private'})"
    if shared:
        return Check("mount_propagation", OK, f"{where} is shared: kubelet sees the driver's mounts")
    fix = (
        f"set mountPropagation: Bidirectional on the {path} volume mount of the node plugin "
        "container (needs privileged: true), and make sure the host's mount is shared "
        f"(mount --make-rshared {path}, which systemd hosts already are)"
    )
    if slave:
        return Check(
            "mount_propagation",
            FAIL,
            f"{where} only receives mounts (HostToContainer): pods would see empty volumes",
            fix,
        )
    return Check(
        "mount_propagation", FAIL, f"{where} is private: kubelet never sees the driver's mounts", fix
    )
