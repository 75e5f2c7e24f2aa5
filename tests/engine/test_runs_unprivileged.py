"""The engine's own tests and the plain-directory half of the backend suite pass
with no privilege at all: run again here with every capability dropped (uid 0
without capabilities cannot mount, attach loop devices or bypass file modes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from driver_harness import REPO, effective_caps

INSIDE = os.environ.get("OVERLAY_CSI_EXPECT_NO_CAPS") == "1"


@pytest.mark.skipif(
    INSIDE or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="drops root's capabilities with setpriv: needs root and util-linux's setpriv",
)
def test_engine_and_plain_backend_need_no_privilege(tmp_path):
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--no-new-privs",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'run'}",
            "tests/engine/test_engine_unprivileged.py",
            "tests/engine/test_runs_unprivileged.py",
            "tests/layerstore",
            "-k",
            "plaindir or not backend",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OVERLAY_CSI_EXPECT_NO_CAPS": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out.strip().splitlines()[-1]
    assert " failed" not in summary and "error" not in summary, out[-4000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 20, summary  # the engine's and the suite's


def test_this_run_has_no_capabilities_when_asked():
    """Inside the run above: proof that it really had none."""
    if not INSIDE:
        pytest.skip("only meaningful inside the capability-free run")
    assert effective_caps() == 0
