"""The operator CLI against a real driver: a kubelet-like session by hand, JSON
for scripts, one-line errors with the gRPC code and exit status 1, and layer
import with progress on stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from csi_driver import host
from csi_driver.cli import main
from driver_harness import REPO, Driver

MiB = 1 << 20
GiB = 1 << 30


class Cli:
    def __init__(self, driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
        self.driver = driver
        self.capsys = capsys
        self.endpoint = f"unix://{driver.sock}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        args = list(argv)
        if args[0] == "layer":
            args += ["--state-dir", str(self.driver.state)]
        else:
            args += ["--endpoint", self.endpoint]
        rc = main(args)
        out, err = self.capsys.readouterr()
        return rc, out, err

    def json(self, *argv: str):
        rc, out, err = self(*argv, "--json")
        assert rc == 0, err
        return json.loads(out)

    def ok(self, *argv: str) -> str:
        rc, out, err = self(*argv)
        assert rc == 0, err
        return out


@pytest.fixture
def cli(driver: Driver, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(driver, capsys)


def test_info(cli: Cli):
    out = cli.ok("info")
    assert re.search(r"^driver\s+overlay\.csi\.dev \d", out, re.M)
    assert re.search(r"^ready\s+yes$", out, re.M)
    assert re.search(r"^node\s+node-1 \(max volumes: no limit\)$", out, re.M)
    assert "CREATE_DELETE_SNAPSHOT" in out and "STAGE_UNSTAGE_VOLUME" in out
    info = cli.json("info")
    assert info["name"] == "overlay.csi.dev" and info["ready"] is True
    assert info["node"]["topology"] == {"topology.overlay.csi.dev/node": "node-1"}
    promisable = cli.driver.engine.capacity.largest_volume("ext4")  # what admission would take
    assert abs(info["capacity"]["available_capacity"] - promisable) < 64 * MiB
    assert promisable < cli.driver.engine.free_bytes()


def test_operator_session(cli: Cli, tmp_path: Path):
    """What an operator does by hand on a node, as kubelet would, through the CLI."""
    vol = cli.json("volume", "create", "pv-cli", "--size", "64Mi")
    vid = vol["volume_id"]
    assert vol["capacity_bytes"] == 64 * MiB and vol["content_source"] is None
    listing = cli.ok("volume", "list")
    header, row = listing.splitlines()
    assert header.split() == ["VOLUME", "ID", "CAPACITY", "SOURCE", "PUBLISHED", "ON", "CONDITION"]
    assert row.split() == [vid, "64", "MiB", "-", "-", "healthy"]

    staging, target = tmp_path / "staging", tmp_path / "pod" / "mount"
    assert cli.ok("node", "stage", vid, str(staging)) == f"staged {vid} at {staging}\n"
    cli.ok("node", "publish", vid, str(staging), str(target))
    assert host.mount_at(target).fstype == "overlay"
    (target / "data").write_bytes(os.urandom(8 * MiB))
    os.sync()
    stats = cli.json("node", "stats", vid, str(target))
    assert stats["usage"]["bytes"]["used"] >= 8 * MiB
    assert stats["usage"]["bytes"]["total"] < 72 * MiB, "the volume's own size, not the host's"
    assert stats["condition"] == {"abnormal": False, "message": "volume is healthy"}
    assert "BYTES" in cli.ok("node", "stats", vid, str(target))

    got = cli.json("volume", "get", vid)
    assert got["published_node_ids"] == ["node-1"]
    snap = cli.json("snapshot", "create", "snap-cli", vid)
    sid = snap["snapshot_id"]
    assert snap["source_volume_id"] == vid and snap["ready_to_use"] and snap["size_bytes"] >= 8 * MiB
    assert [s["snapshot_id"] for s in cli.json("snapshot", "list", "--volume", vid)] == [sid]
    assert cli.json("snapshot", "get", sid)["snapshot_id"] == sid
    assert sid in cli.ok("snapshot", "list")

    restored = cli.json("volume", "create", "pv-restored", "--from-snapshot", sid, "--size", "128Mi")
    assert restored["content_source"] == {"snapshot_id": sid}
    assert restored["capacity_bytes"] == 128 * MiB
    grown = cli.json("volume", "expand", restored["volume_id"], "256Mi")
    assert grown["capacity_bytes"] == 256 * MiB and grown["node_expansion_required"] is False
    assert cli.json("volume", "get", restored["volume_id"])["capacity_bytes"] == 256 * MiB

    cli.ok("node", "unpublish", vid, str(target))
    assert not host.is_mounted(target)
    cli.ok("node", "unstage", vid, str(staging))
    assert not host.is_mounted(staging)
    assert cli.ok("snapshot", "delete", sid) == f"deleted {sid}\n"
    cli.ok("volume", "delete", vid, restored["volume_id"])
    assert cli.json("volume", "list") == []
    assert cli.json("snapshot", "list") == []


def test_errors_are_one_line_with_the_code(cli: Cli, tmp_path: Path):
    missing = "vol-" + "0" * 32
    rc, out, err = cli("volume", "get", missing)
    assert (rc, out) == (1, "")
    assert err == f"error: NOT_FOUND: volume {missing!r} does not exist\n" or re.fullmatch(
        r"error: NOT_FOUND: volume .*does not exist\n", err
    )
    cli.ok("volume", "create", "pv-1", "--size", "32Mi")
    rc, _, err = cli("volume", "create", "pv-1", "--size", "1Gi")
    assert rc == 1 and err.startswith("error: ALREADY_EXISTS: ") and err.count("\n") == 1
    rc, _, err = cli("volume", "create", "pv-2", "--param", "baseLayer=nope")
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: ") and "nope" in err
    rc, _, err = cli("volume", "create", "pv-3", "--param", "novalue")
    assert rc == 1 and err == "error: INVALID_ARGUMENT: parameter 'novalue' is not KEY=VALUE\n"
    rc, _, err = cli("node", "stage", missing, str(tmp_path / "s"))
    assert rc == 1 and err.startswith("error: NOT_FOUND: ")
    rc, _, err = main_err(cli, "info", "--endpoint", f"unix://{tmp_path}/nothing.sock")
    assert rc == 1
    assert err.startswith("error: UNAVAILABLE: no driver socket at ") and err.count("\n") == 1
    for v in cli.json("volume", "list"):
        cli.ok("volume", "delete", v["volume_id"])


def main_err(cli: Cli, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = cli.capsys.readouterr()
    return rc, out, err


def test_exit_status_of_the_console_command(driver: Driver):
    """The real entry point, as a shell script would run it."""
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "volume", "get", "vol-" + "1" * 32,
         "--endpoint", f"unix://{driver.sock}"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert re.fullmatch(r"error: NOT_FOUND: [^\n]+\n", proc.stderr), proc.stderr
    env = {**os.environ, "CSI_ENDPOINT": f"unix://{driver.sock}"}
    proc = subprocess.run(
        [sys.executable, "-m", "csi_driver", "volume", "list", "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def make_archive(path: Path, files: int, size: int) -> None:
    src = path.parent / "src"
    src.mkdir()
    for i in range(files):
        (src / f"blob-{i}").write_bytes(os.urandom(size))
    (src / "etc").mkdir()
    (src / "etc" / "motd").write_text("golden\n")
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname=".")


def test_layer_import_with_progress_inspect_and_delete(cli: Cli, tmp_path: Path):
    archive = tmp_path / "base.tar"
    make_archive(archive, files=12, size=16 * MiB)  # 192 MiB of incompressible data
    rc, out, err = cli("layer", "import", "golden", str(archive), "--progress-interval", "0.02")
    assert rc == 0, err
    assert re.fullmatch(r"imported golden: layer [0-9a-f]{32}, [\d.]+ MiB on disk in [\d.]+s\n", out)
    lines = err.splitlines()
    extracting = [
        float(m.group(1)) for x in lines if (m := re.match(r"extracting base\.tar:\s+([\d.]+)%", x))
    ]
    writing = [x for x in lines if x.startswith("writing layer image:")]
    assert len(extracting) >= 2, err
    assert extracting == sorted(extracting) and 0 < extracting[-1] <= 100
    assert writing, err
    assert all(x.endswith("s]") for x in lines), "each line ends with the elapsed time"

    layers = cli.json("layer", "list")
    base = next(x for x in layers if x["name"] == "golden")
    assert base["state"] == "base" and base["allocated_bytes"] >= 192 * MiB
    table = cli.ok("layer", "list")
    assert re.search(rf"^golden\s+{base['id']}\s+-\s+1\s+base\s+ext4", table, re.M)

    vol = cli.json("volume", "create", "pv-golden", "--param", "baseLayer=golden", "--size", "64Mi")
    info = cli.json("layer", "inspect", "golden")
    assert info["id"] == base["id"] and info["volumes"] == [vol["volume_id"]]
    assert info["chain"] == [base["id"]] and info["mounted"] is None and len(info["children"]) == 1
    staging = tmp_path / "staging"
    cli.ok("node", "stage", vol["volume_id"], str(staging))
    assert (staging / "etc" / "motd").read_text() == "golden\n"
    mounted = cli.json("layer", "inspect", base["id"])  # by id too
    assert mounted["mounted"]["device"].startswith("/dev/loop")
    upper = cli.json("layer", "inspect", info["children"][0])
    assert upper["state"] == "active" and upper["volume"] == vol["volume_id"]
    assert upper["chain"] == [info["children"][0], base["id"]]
    human = cli.ok("layer", "inspect", "golden")
    assert re.search(r"^mounted\s+/dev/loop\d+ at ", human, re.M)
    assert re.search(rf"^volumes\s+1: {vol['volume_id']}$", human, re.M)
    cli.ok("node", "unstage", vol["volume_id"], str(staging))

    assert cli.ok("layer", "delete", "golden").startswith("deleted golden")
    rc, _, err = cli("layer", "inspect", "golden")
    assert rc == 1 and err == "error: NOT_FOUND: layer 'golden' does not exist (by name or id)\n"
    assert cli.json("layer", "inspect", base["id"])["volumes"] == [vol["volume_id"]], "kept while used"
    cli.ok("volume", "delete", vol["volume_id"])
    assert cli.json("layer", "list") == [], "reclaimed once unused"
    rc, _, err = cli("layer", "delete", "golden")
    assert rc == 1 and err.startswith("error: NOT_FOUND: ")


def test_layer_import_of_a_directory_quietly(cli: Cli, tmp_path: Path):
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/bin/sh\n")
    rc, out, err = cli("layer", "import", "tree", str(src), "--no-progress", "--json")
    assert rc == 0 and err == ""
    layer = json.loads(out)
    assert layer["name"] == "tree" and layer["state"] == "base"
    rc, _, err = cli("layer", "import", "tree", str(src), "--no-progress")
    assert rc == 1 and err.startswith("error: ALREADY_EXISTS: ")
    rc, _, err = cli("layer", "import", "bad/name", str(src))
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: layer names")
    cli.ok("layer", "delete", "tree")


def test_layer_commands_refuse_a_wrong_state_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    rc = main(["layer", "list", "--state-dir", str(tmp_path / "nothing")])
    _, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: NOT_FOUND: no overlay-csi state in ")
    assert not (tmp_path / "nothing").exists(), "listing creates nothing"


def test_info_on_a_controller_expand_instance(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The central instance serves no node service: info says so, no error. Outside a pod it
    has no Kubernetes API, so no MODIFY_VOLUME either."""
    from driver_harness import MOUNT_SKIP, cleanup

    if MOUNT_SKIP:
        pytest.skip(MOUNT_SKIP)
    d = Driver(tmp_path, mode="controller-expand")
    try:
        rc = main(["info", "--endpoint", f"unix://{d.sock}"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert re.search(r"^controller\s+EXPAND_VOLUME, CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS$", out, re.M)
        assert re.search(r"^node service\s+\(not served\)$", out, re.M)
        assert "capacity" not in out
        rc = main(["info", "--endpoint", f"unix://{d.sock}", "--json"])
        info = json.loads(capsys.readouterr()[0])
        assert info["node"] is None and info["node_capabilities"] is None
    finally:
        d.stop()
        cleanup(tmp_path)


def test_layer_delete_while_serving_leaves_reclaim_to_the_driver(cli: Cli, driver: Driver, tmp_path: Path):
    """The CLI cannot see the serving driver's in-flight pins, so it only forgets the
    name; the driver reclaims the layer at its next delete."""
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_text("x")
    layer = cli.json("layer", "import", "unused", str(src), "--no-progress")
    cli.ok("layer", "delete", "unused")
    layers = driver.engine.backend.layout.layers
    assert (layers / layer["id"]).exists(), "not collected behind the driver's back"
    vol = driver.client.create_volume("other", 16 << 20).volume_id
    driver.client.delete_volume(vol)
    assert not (driver.engine.backend.layout.layers / layer["id"]).exists(), "the driver reclaims it"
