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


def check_propagation(kubelet_dir: Path, pod: bool) -> Check:
    if not pod:
        return Check(
            "mount_propagation",
            OK,
            "not running in a pod: the driver's mounts are the host's, no propagation needed",
        )
    if not kubelet_dir.exists():
        return Check(
            "mount_propagation",
            FAIL,
            f"{kubelet_dir} is not visible in this pod",
            f"mount the host's {kubelet_dir} into the node plugin (hostPath) "
            "with mountPropagation: Bidirectional",
        )
    m = mount_of(str(kubelet_dir))
    tags = m.optional if m else []
    shared = any(t.startswith("shared:") for t in tags)
    slave = any(t.startswith("master:") for t in tags)
    where = f"{kubelet_dir} (mount at {m.target if m else '?'}: {' '.join(tags) or 'private'})"
    if shared:
        return Check("mount_propagation", OK, f"{where} is shared: kubelet sees the driver's mounts")
    fix = (
        f"set mountPropagation: Bidirectional on the {kubelet_dir} volume mount of the node plugin "
        "container (needs privileged: true), and make sure the host's mount is shared "
        f"(mount --make-rshared {kubelet_dir}, which systemd hosts already are)"
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
