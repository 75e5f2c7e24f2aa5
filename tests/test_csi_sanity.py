"""csi-sanity (kubernetes-csi/csi-test v5.4.0) against the real driver.

Runs when a csi-sanity binary is found (``CSI_SANITY`` or PATH); skips otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from driver_harness import MOUNT_SKIP, DriverProcess, cleanup

SANITY = os.environ.get("CSI_SANITY") or shutil.which("csi-sanity")
MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not SANITY, reason="no csi-sanity binary (set CSI_SANITY or put it on PATH)"),
    pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok"),
]


def run_sanity(tmp_path: Path, *extra: str, driver_args: tuple[str, ...] = (),
               mutable: str = 'readAheadKiB: "512"\n') -> tuple[dict, str]:
    """``mutable``: the YAML of the mutable parameters sanity creates and modifies volumes
    with ('' for none: a backend with nothing to modify advertises no MODIFY_VOLUME)."""
    # csi-sanity v5.4.0 predates GET_SNAPSHOT (CSI 1.10) and fails any capability it
    # does not know, so that one is hidden from it; GetSnapshot itself is tested elsewhere.
    d = DriverProcess(tmp_path, None, "--hide-capability", "GET_SNAPSHOT", "--max-volumes-per-node", "8",
                      *driver_args)
    mutable_args: list[str] = []
    if mutable:
        (tmp_path / "mutable.yaml").write_text(mutable)
        mutable_args = ["--csi.testvolumemutableparameters", str(tmp_path / "mutable.yaml")]
    d.start()
    try:
        proc = subprocess.run(
            [SANITY, "--csi.endpoint", str(d.sock), "--csi.mountdir", str(tmp_path / "mnt"),
             "--csi.stagingdir", str(tmp_path / "staging"),
             "--csi.testvolumesize", str(64 * MiB), "--csi.testvolumeexpandsize", str(128 * MiB),
             *mutable_args, "--csi.testnodevolumeattachlimit",
             "--ginkgo.no-color", *extra],
            capture_output=True, text=True, timeout=900)
    finally:
        assert d.terminate() == 0
        mounts, loops = cleanup(tmp_path)
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped", out)
    assert m, out[-3000:]
    counts = dict(zip(("passed", "failed", "pending", "skipped"), map(int, m.groups()), strict=True))
    assert not mounts and not loops, f"sanity run leaked {mounts} {loops}"
    return counts, out


@pytest.mark.parametrize(
    "access_type,driver_args",
    [("mount", ()), ("block", ()), ("mount", ("--backend", "plaindir"))],
    ids=["mount", "block", "plaindir-mount"],  # plain directories keep no raw block volumes
)
def test_csi_sanity(tmp_path: Path, access_type: str, driver_args: tuple[str, ...]):
    """Every capability advertised: 0 failed and no spec skipped for a capability we lack
    (the plaindir backend has nothing to modify: it advertises no MODIFY_VOLUME, so sanity
    skips ModifyVolume's specs, and only those)."""
    plaindir = "plaindir" in driver_args
    verbose = ("--ginkgo.v",) if plaindir else ()  # a skipped spec's reason is printed only then
    counts, out = run_sanity(tmp_path, "--csi.testvolumeaccesstype", access_type, *verbose,
                             driver_args=driver_args, mutable="" if plaindir else 'readAheadKiB: "512"\n')
    failed = re.findall(r"\[FAIL\] (.*)", out)
    assert counts["failed"] == 0, failed
    if plaindir:
        reasons = re.findall(r"^\s*\[SKIPPED\] (?!in \[)(.*)$", out, re.MULTILINE)
        assert len(reasons) == counts["skipped"], reasons
        assert all(re.search(r"modify ?volume not supported", x, re.IGNORECASE) for x in reasons), reasons
    else:
        assert counts["skipped"] == 0, re.findall(r"\[SKIPPED\] (.*)", out)
    assert counts["passed"] >= (80 if plaindir else 90)
