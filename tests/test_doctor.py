"""``overlay-csi doctor`` on this host: what works is OK, what is missing FAILs
with a fix and exit status 1, mount propagation is judged as a pod needs it,
and a running driver's store is read without disturbing it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi_driver.cli import main
from csi_driver.doctor.procfs import CAP_SYS_RESOURCE, has_cap
from driver_harness import MOUNT_SKIP, REPO, Driver, needs_mounts

MiB = 1 << 20


def run_doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    rc = main(["doctor", "--json", *argv])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@needs_mounts
def test_this_host_passes_with_a_real_probe(capsys, tmp_path: Path):
    state = tmp_path / "state"
    rc, report = run_doctor(capsys, "--state-dir", str(state), "--in-pod", "no")
    checks = by_name(report)
    assert rc == 0 and report["ok"] is True, [c for c in report["checks"] if c["status"] == "FAIL"]
    for name in (
        "privileges",
        "overlayfs",
        "loop_devices",
        "mkfs.ext4",
        "resize2fs",
        "fsfreeze",
        "losetup",
        "sparse_files",
        "probe_loop_mount",
        "probe_overlay",
        "state_dir",
        "store",
    ):
        assert checks[name]["status"] == "OK", checks[name]  # fmt: skip
    # the probe really froze and thawed its loop-mounted file system (not just found the tool)
    assert checks["fsfreeze"]["message"].startswith("freeze and thaw work"), checks["fsfreeze"]
    assert checks["reflink"]["status"] in ("OK", "WARN")
    expected = "OK" if has_cap(CAP_SYS_RESOURCE) else "WARN"
    assert checks["cap_sys_resource"]["status"] == expected
    assert report["summary"]["FAIL"] == 0
    assert not state.exists(), "doctor creates nothing where the state dir will be"
    assert not [p for p in tmp_path.iterdir()], "the probe cleans up after itself"


@needs_mounts
def test_human_output(capsys, tmp_path: Path):
    rc = main(["doctor", "--state-dir", str(tmp_path), "--no-probe", "--in-pod", "no"])
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert rc == 0
    assert any(x.startswith("OK    overlayfs ") for x in lines)
    assert lines[-1].endswith("0 FAIL")
    if any(x.startswith("WARN") for x in lines):
        assert any(x.strip().startswith("fix: ") for x in lines), "every WARN says how to fix it"


@needs_mounts
def test_missing_tools_fail_with_a_fix(tmp_path: Path):
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "doctor", "--state-dir", str(tmp_path), "--in-pod", "no"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.splitlines()
    fail = next(i for i, x in enumerate(lines) if x.startswith("FAIL  mkfs.ext4"))
    assert "exists but is not on PATH" in lines[fail] or "not found on PATH" in lines[fail]
    assert "fix: apt-get install e2fsprogs" in lines[fail + 1]
    assert any(x.startswith("WARN  mkfs.xfs") for x in lines), "xfs is optional"
    assert any(x.startswith("WARN  probe ") and "skipped" in x for x in lines)


def _kubelet_mount(root: Path, propagation: str) -> tuple[Path, list[Path]]:
    """A mount at root/kubelet with the given propagation; returns it and what to unmount.
    A slave needs a master: a shared mount of which it was a peer."""
    kubelet = root / "kubelet"
    kubelet.mkdir()
    for sub in ("pods", "plugins"):  # where the driver mounts (the chart mounts only these)
        (kubelet / sub).mkdir()
    if propagation == "slave":
        host_side = root / "host-kubelet"
        host_side.mkdir()
        for sub in ("pods", "plugins"):
            (host_side / sub).mkdir()
        subprocess.run(["mount", "--bind", str(host_side), str(host_side)], check=True)
        subprocess.run(["mount", "--make-shared", str(host_side)], check=True)
        subprocess.run(["mount", "--bind", str(host_side), str(kubelet)], check=True)
        subprocess.run(["mount", "--make-slave", str(kubelet)], check=True)
        return kubelet, [kubelet, host_side]
    subprocess.run(["mount", "--bind", str(kubelet), str(kubelet)], check=True)
    subprocess.run(["mount", f"--make-{propagation}", str(kubelet)], check=True)
    return kubelet, [kubelet]


@needs_mounts
@pytest.mark.parametrize(
    "propagation, status, words",
    [("shared", "OK", "is shared"), ("private", "FAIL", "is private"), ("slave", "FAIL", "HostToContainer")],
)
def test_kubelet_dir_propagation_in_a_pod(capsys, tmp_path: Path, propagation, status, words):
    kubelet, mounts = _kubelet_mount(tmp_path, propagation)
    try:
        rc, report = run_doctor(
            capsys, "--state-dir", str(tmp_path / "state"), "--kubelet-dir", str(kubelet),
            "--in-pod", "yes", "--no-probe",
        )  # fmt: skip
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], check=True)
    check = by_name(report)["mount_propagation"]
    assert check["status"] == status and words in check["message"], check
    assert rc == (1 if status == "FAIL" else 0)
    if status == "FAIL":
        assert "mountPropagation: Bidirectional" in check["fix"]


def test_kubelet_dir_missing_in_a_pod(capsys, tmp_path: Path):
    rc, report = run_doctor(
        capsys, "--state-dir", str(tmp_path), "--kubelet-dir", str(tmp_path / "no-kubelet"),
        "--in-pod", "yes", "--no-probe",
    )  # fmt: skip
    check = by_name(report)["mount_propagation"]
    assert rc == 1 and check["status"] == "FAIL" and "not visible" in check["message"]


@needs_mounts
def test_propagation_is_checked_where_the_driver_mounts(capsys, tmp_path: Path):
    """The chart mounts kubelet's pods/ and plugins/, not the kubelet dir: those are checked."""
    kubelet = tmp_path / "kubelet"
    (kubelet / "plugins").mkdir(parents=True)
    pods = kubelet / "pods"
    pods.mkdir()
    subprocess.run(["mount", "--bind", str(pods), str(pods)], check=True)
    subprocess.run(["mount", "--make-shared", str(pods)], check=True)
    try:
        rc, report = run_doctor(
            capsys, "--state-dir", str(tmp_path / "state"), "--kubelet-dir", str(kubelet),
            "--in-pod", "yes", "--no-probe",
        )  # fmt: skip
    finally:
        subprocess.run(["umount", str(pods)], check=True)
    check = by_name(report)["mount_propagation"]
    assert rc == 1 and check["status"] == "FAIL" and f"{kubelet}/plugins" in check["message"], check


def test_not_in_a_pod_needs_no_propagation(capsys, tmp_path: Path):
    _, report = run_doctor(capsys, "--state-dir", str(tmp_path), "--in-pod", "no", "--no-probe")
    assert by_name(report)["mount_propagation"]["status"] == "OK"


def test_reads_a_running_drivers_store(capsys, driver: Driver):
    vol = driver.client.create_volume("pv-1", 256 * MiB)
    driver.client.create_snapshot("snap-1", vol.volume_id)
    rc, report = run_doctor(capsys, "--state-dir", str(driver.state), "--in-pod", "no")
    checks = by_name(report)
    assert rc == 0, [c for c in report["checks"] if c["status"] == "FAIL"]
    assert checks["store"]["status"] == "OK"
    assert ": 1 volumes, 1 snapshots, 2 layers" in checks["store"]["message"]
    assert checks["driver"]["message"] == f"a driver (pid {os.getpid()}) is serving this state dir"
    assert checks["thin_provisioning"]["status"] == "OK"
    assert checks["thin_provisioning"]["message"].startswith("0.2 GiB provisioned")
    assert not list((driver.state / "tmp").iterdir()), "doctor's scratch is gone"
    # the driver is undisturbed
    driver.client.delete_volume(vol.volume_id)
    assert driver.client.create_volume("pv-2", 32 * MiB).capacity_bytes == 32 * MiB


def test_a_stopped_driver_and_a_broken_store(capsys, tmp_path: Path):
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = Driver(tmp_path)
    d.stop()
    _, report = run_doctor(capsys, "--state-dir", str(d.state), "--in-pod", "no", "--no-probe")
    assert by_name(report)["driver"]["message"] == "no driver is serving this state dir now"
    (d.state / "state.db").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (d.state / f"state.db{suffix}").unlink(missing_ok=True)
    rc, report = run_doctor(capsys, "--state-dir", str(d.state), "--in-pod", "no", "--no-probe")
    store = by_name(report)["store"]
    assert rc == 1 and store["status"] == "FAIL" and "restore the state dir" in store["fix"]


# ---- docs/troubleshooting.md names every error the driver can return ----

ERROR_CLASSES = {
    "InvalidArgument", "NotFound", "AlreadyExists", "OutOfRange", "ResourceExhausted",
    "FailedPrecondition", "Aborted", "Unavailable", "Unauthenticated", "PermissionDenied", "BadContent",
    "Cancelled",
}  # fmt: skip


def error_templates() -> list[tuple[str, list[str]]]:
    """(where, literal parts) of every message passed to a domain error in csi_driver."""
    out = []
    for path in sorted((REPO / "csi_driver").rglob("*.py")):
        if "proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ERROR_CLASSES or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                parts = [arg.value]
            elif isinstance(arg, ast.JoinedStr):
                parts = [v.value for v in arg.values if isinstance(v, ast.Constant)]
            else:
                continue
            out.append((f"{path.relative_to(REPO)}:{node.lineno}", parts))
    return out


def test_troubleshooting_covers_every_error_message():
    doc = (REPO / "docs" / "troubleshooting.md").read_text().replace("`", "")
    templates = error_templates()
    assert len(templates) > 50
    missing = []
    for where, parts in templates:
        key = max((p.strip() for p in parts), key=len, default="")  # f"{e}{hint}": no words of its own
        if len(key) >= 6 and key not in doc:
            missing.append(f"{where}: {' … '.join(parts)!r}")
    assert not missing, "add these messages to docs/troubleshooting.md:\n" + "\n".join(missing)
