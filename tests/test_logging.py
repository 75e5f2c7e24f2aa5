"""Logs of a real ``overlay-csi serve`` process: one line per RPC with method,
subject, status code, duration and a request id; ``--log-format json`` gives one
JSON object per line; klog-style ``-v``; secrets never reach the log."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import grpc
import pytest

from csi_driver import logs
from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import MOUNT_SKIP, DriverProcess, cleanup

MiB = 1 << 20
SECRET = "hunter2-do-not-log"
needs_root = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")


def run_workload(proc: DriverProcess, root: Path) -> str:
    """Calls with secrets, a failure of each kind, a stage; returns the volume id."""
    with Client(proc.sock) as c:
        vol = c.controller.CreateVolume(
            csi.CreateVolumeRequest(
                name="pv-log",
                capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                volume_capabilities=[mount_capability()],
                secrets={"password": SECRET},
            )
        ).volume
        with pytest.raises(grpc.RpcError) as e:
            c.controller.CreateVolume(
                csi.CreateVolumeRequest(
                    name="pv-bad",
                    volume_capabilities=[mount_capability()],
                    parameters={"noSuchParameter": "x"},
                    secrets={"token": SECRET},
                )
            )
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            c.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id="vol-" + "0" * 32))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        staging = root / "staging"
        staging.mkdir()
        c.node.NodeStageVolume(
            csi.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(staging),
                volume_capability=mount_capability(),
                secrets={"key": SECRET},
            )
        )
        c.unstage(vol.volume_id, staging)
        c.delete_volume(vol.volume_id)
        return vol.volume_id


@pytest.fixture
def process(tmp_path: Path):
    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    procs: list[DriverProcess] = []

    def start(*args: str) -> DriverProcess:
        p = DriverProcess(tmp_path, None, *args)
        p.start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
    mounts, loops = cleanup(tmp_path)
    assert not mounts and not loops


@needs_root
def test_json_log_lines(process, tmp_path: Path):
    proc = process("--log-format", "json", "-v", "4")
    vid = run_workload(proc, tmp_path)
    assert proc.terminate() == 0
    text = proc.log.read_text()
    assert SECRET not in text, "a secret reached the log"

    records = []
    for n, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"blank line {n}"
        rec = json.loads(line)  # every line is one JSON object
        assert isinstance(rec, dict)
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
        assert rec["level"] in {"debug", "info", "warning", "error", "critical"}
        records.append(rec)

    rpcs = [r for r in records if r.get("rpc")]
    seen = Counter((r["rpc"], r["code"]) for r in rpcs)
    assert seen == Counter(
        {
            ("CreateVolume", "OK"): 1,
            ("CreateVolume", "INVALID_ARGUMENT"): 1,
            ("ControllerGetVolume", "NOT_FOUND"): 1,
            ("NodeStageVolume", "OK"): 1,
            ("NodeUnstageVolume", "OK"): 1,
            ("DeleteVolume", "OK"): 1,
        }
    ), "exactly one line per RPC"
    for r in rpcs:
        assert r["level"] == "info" and r["logger"] == "csi_driver.rpc"
        assert isinstance(r["duration_ms"], int | float) and r["duration_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{12}", r["request_id"])
        assert (r["error"] == "") == (r["code"] == "OK")
    assert len({r["request_id"] for r in rpcs}) == len(rpcs), "request ids are unique"
    by = {(r["rpc"], r["code"]): r for r in rpcs}
    assert by[("CreateVolume", "OK")]["subject"] == "name='pv-log'"
    assert by[("NodeStageVolume", "OK")]["subject"] == f"volume_id={vid!r}"
    assert "does not exist" in by[("ControllerGetVolume", "NOT_FOUND")]["error"]
    assert "noSuchParameter" in by[("CreateVolume", "INVALID_ARGUMENT")]["error"]
    assert by[("NodeStageVolume", "OK")]["duration_ms"] > 0.5, "staging mounts: not a no-op"

    # -v 4 is debug: each request is logged (redacted) before it runs
    requests = [r for r in records if r["level"] == "debug" and r["msg"].endswith("}")
                and " request {" in r["msg"]]  # fmt: skip
    assert len(requests) == len(rpcs)
    stage = next(r for r in requests if r["msg"].startswith("NodeStageVolume request"))
    assert "'secrets': '***stripped***'" in stage["msg"]
    assert any(r["msg"].startswith("signal SIGTERM") for r in records)
    assert records[-1]["msg"] == "stopped"


@needs_root
def test_text_logs_and_default_level(process, tmp_path: Path):
    proc = process("-v", "2")  # klog: 0-3 are info, 4 and up debug
    run_workload(proc, tmp_path)
    assert proc.terminate() == 0
    text = proc.log.read_text()
    assert SECRET not in text
    lines = text.splitlines()
    assert not [x for x in lines if " D " in x], "no debug lines below -v 4"
    rpc = [x for x in lines if " csi_driver.rpc: rpc " in x]
    assert len(rpc) == 6
    line = next(x for x in rpc if "rpc=CreateVolume" in x and "code=OK" in x)
    assert re.search(
        r" I csi_driver\.rpc: rpc rpc=CreateVolume subject=name='pv-log' code=OK "
        r"duration_ms=[\d.]+ request_id=[0-9a-f]{12}$",
        line,
    ), line
    bad = next(x for x in rpc if "code=NOT_FOUND" in x)
    assert bad.rstrip().endswith("does not exist"), "the error message ends the line"


@needs_root
def test_log_level_warning_drops_rpc_lines(process, tmp_path: Path):
    proc = process("--log-level", "warning", "--log-format", "json")
    run_workload(proc, tmp_path)
    assert proc.terminate() == 0
    records = [json.loads(x) for x in proc.log.read_text().splitlines()]
    assert all(r["level"] in ("warning", "error", "critical") for r in records)
    assert not [r for r in records if r.get("rpc")]


@pytest.mark.parametrize(
    "name, v, level",
    [
        ("info", 0, logging.INFO),
        ("info", 2, logging.INFO),
        ("info", 4, logging.DEBUG),
        ("info", 10, logging.DEBUG),
        ("warning", 0, logging.WARNING),
        ("error", 5, logging.DEBUG),
        ("debug", 0, logging.DEBUG),
    ],
)
def test_klog_verbosity(name: str, v: int, level: int):
    assert logs.level_from(name, v) == level
