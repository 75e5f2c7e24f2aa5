"""Kill the driver (SIGKILL) at every step boundary of every mutating call, restart
it, retry the same call: it must succeed, lose nothing and leak nothing.

``OVERLAY_CSI_CRASH_AT=step`` makes the engine SIGKILL its own process the first
time it reaches ``ctx.step("step")``. The world is built by an in-process
driver, the crashing call goes to a child process started with that variable,
and recovery is a fresh driver on the same state dir.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver import host
from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi
from driver_harness import (
    MOUNT_SKIP,
    REPO,
    Driver,
    DriverProcess,
    assert_invariants,
    cleanup,
    read_files,
    store_dump,
    teardown_all,
    unfrozen_problems,
)

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

MiB = 1 << 20
STEP_RE = re.compile(r"""\bstep(?:\(\s*|=)["']([^"']+)["']""")  # step("x"), or adding(..., step="x")


def steps_in_source() -> set[tuple[str, str]]:
    """Every crash point: (module, step)."""
    found: set[tuple[str, str]] = set()
    for f in (REPO / "csi_driver").rglob("*.py"):
        found |= {(f.name, step) for step in STEP_RE.findall(f.read_text())}
    return found


@dataclass
class World:
    root: Path
    ids: dict[str, str] = field(default_factory=dict)  # volume and snapshot names -> ids
    volumes: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> its files
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> files it holds
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    def staging(self, name: str) -> Path:
        return self.root / "kubelet" / "staging" / name

    def target(self, name: str) -> Path:
        return self.root / "kubelet" / "pods" / name / "mount"

    def write(self, where: Path, volume: str, fname: str, size: int) -> None:
        data = self.rng.randbytes(size)
        with open(where / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.volumes[volume][fname] = data


def new_volume(c: Client, w: World, name: str, size: int = 64 * MiB, **kw) -> str:
    vid = c.create_volume(name, size, **kw).volume_id
    w.ids[name] = vid
    w.volumes[name] = {"block": bytes(65536)} if kw.get("cap") is BLOCK_CAP else {}
    return vid


def stage(c: Client, w: World, name: str, **kw) -> Path:
    path = w.staging(name)
    path.mkdir(parents=True, exist_ok=True)
    c.stage(w.ids[name], path, **kw)
    return path


def publish(c: Client, w: World, name: str) -> Path:
    path = w.target(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    c.publish(w.ids[name], w.staging(name), path)
    return path


def snapshot(c: Client, w: World, name: str, volume: str) -> None:
    w.ids[name] = c.create_snapshot(name, w.ids[volume]).snapshot_id
    w.snapshots[name] = dict(w.volumes[volume])


BLOCK_CAP = csi.VolumeCapability(
    block=csi.VolumeCapability.BlockVolume(),
    access_mode=csi.VolumeCapability.AccessMode(mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true", "size": "16Mi"}


def write_block(w: World, name: str, device: Path) -> None:
    data = w.rng.randbytes(65536)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    w.volumes[name] = {"block": data}


def publish_ephemeral(c: Client, w: World) -> Path:
    target = w.target("inline")
    target.parent.mkdir(parents=True, exist_ok=True)
    c.node.NodePublishVolume(
        csi.NodePublishVolumeRequest(
            volume_id="csi-inline", target_path=str(target), volume_capability=mount_capability(),
            volume_context=EPHEMERAL,
        ),
        timeout=60,
    )
    w.volumes.setdefault("ephemeral/csi-inline", {})
    return target


def build_world(c: Client, w: World, op: str) -> None:
    """The state every crash happens in: a detached volume with a snapshot and data
    on both sides of it, and a volume staged, published and written by a pod."""
    new_volume(c, w, "base")
    w.write(stage(c, w, "base"), "base", "a", 300_000)
    c.unstage(w.ids["base"], w.staging("base"))
    snapshot(c, w, "snap-base", "base")
    w.write(stage(c, w, "base"), "base", "after", 200_000)
    c.unstage(w.ids["base"], w.staging("base"))
    new_volume(c, w, "busy")
    stage(c, w, "busy")
    w.write(publish(c, w, "busy"), "busy", "b", 500_000)
    if op.startswith("block"):
        new_volume(c, w, "blk", 16 * MiB, cap=BLOCK_CAP)
        stage(c, w, "blk", cap=BLOCK_CAP)
        w.target("blk").parent.mkdir(parents=True, exist_ok=True)
        c.publish(w.ids["blk"], w.staging("blk"), w.target("blk"), cap=BLOCK_CAP)
        write_block(w, "blk", w.target("blk"))
        # copies of an in-use block volume need reflink, which an ext4 state dir lacks: copy detached
        c.unpublish(w.ids["blk"], w.target("blk"))
        c.unstage(w.ids["blk"], w.staging("blk"))
        snapshot(c, w, "snap-blk", "blk")
        stage(c, w, "blk", cap=BLOCK_CAP)
        c.publish(w.ids["blk"], w.staging("blk"), w.target("blk"), cap=BLOCK_CAP)
        write_block(w, "blk", w.target("blk"))  # the snapshot holds the first data, the volume the second
        new_volume(c, w, "blk2", 16 * MiB, cap=BLOCK_CAP)
        if op == "block_publish":
            stage(c, w, "blk2", cap=BLOCK_CAP)
        elif op in ("block_unstage", "block_clone", "block_snapshot"):
            c.unpublish(w.ids["blk"], w.target("blk"))
            if op != "block_unstage":
                c.unstage(w.ids["blk"], w.staging("blk"))
    elif op == "ephemeral_unpublish":
        w.write(publish_ephemeral(c, w), "ephemeral/csi-inline", "e", 4096)
    if op == "delete_snapshot":
        snapshot(c, w, "snap-busy", "busy")  # a copied layer only this snapshot holds
        w.write(w.target("busy"), "busy", "b2", 10_000)
    elif op == "publish":
        stage(c, w, "base")
    elif op == "unstage":
        c.unpublish(w.ids["busy"], w.target("busy"))
    elif op == "node_expand":
        new_volume(c, w, "xfsvol", 320 * MiB, cap=mount_capability(fs_type="xfs"))
        w.write(stage(c, w, "xfsvol", cap=mount_capability(fs_type="xfs")), "xfsvol", "x", 100_000)


# ---- the calls that crash, and what must be true once they succeeded ---------


def _create(name: str, **src: str) -> Callable[[Client, World], None]:
    def call(c: Client, w: World) -> None:
        kw = {k: w.ids[v] for k, v in src.items()}
        w.ids[name] = c.create_volume(name, 64 * MiB, **kw).volume_id

    return call


def _created(name: str, like: str | None, from_snapshot: bool = False) -> Callable[[World], None]:
    def after(w: World) -> None:
        w.volumes[name] = dict((w.snapshots if from_snapshot else w.volumes)[like]) if like else {}

    return after


def _snap(name: str, volume: str) -> Callable[[Client, World], None]:
    def call(c: Client, w: World) -> None:
        w.ids[name] = c.create_snapshot(name, w.ids[volume]).snapshot_id

    return call


def _expand_controller(c: Client, w: World) -> None:
    c.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(
            volume_id=w.ids["base"], capacity_range=csi.CapacityRange(required_bytes=128 * MiB)
        ),
        timeout=60,
    )


def _expand_node(c: Client, w: World) -> None:
    c.node.NodeExpandVolume(
        csi.NodeExpandVolumeRequest(
            volume_id=w.ids["xfsvol"],
            volume_path=str(w.staging("xfsvol")),
            capacity_range=csi.CapacityRange(required_bytes=400 * MiB),
        ),
        timeout=60,
    )


def _forget(kind: str, name: str) -> Callable[[World], None]:
    def after(w: World) -> None:
        getattr(w, kind).pop(name)

    return after


def _capacity(name: str, size: int) -> Callable[[World], None]:
    def after(w: World) -> None:
        vol = {v["id"]: v for v in store_dump(w.root / "state")["volumes"]}[w.ids[name]]
        assert vol["capacity_bytes"] == size

    return after


@dataclass(frozen=True)
class Op:
    call: Callable[[Client, World], None]
    after: Callable[[World], None] = lambda w: None
    args: tuple[str, ...] = ()  # driver flags for every incarnation


def _create_block(name: str, **src: str) -> Callable[[Client, World], None]:
    def call(c: Client, w: World) -> None:
        kw = {k: w.ids[v] for k, v in src.items()}
        w.ids[name] = c.create_volume(name, 16 * MiB, cap=BLOCK_CAP, **kw).volume_id

    return call


def _snapped(volume: str) -> Callable[[World], None]:
    def after(w: World) -> None:
        w.snapshots["snap-new"] = dict(w.volumes[volume])

    return after


def _publish_block(c: Client, w: World) -> None:
    w.target("blk2").parent.mkdir(parents=True, exist_ok=True)
    c.publish(w.ids["blk2"], w.staging("blk2"), w.target("blk2"), cap=BLOCK_CAP)


def _ephemeral_gone(w: World) -> None:
    w.volumes.pop("ephemeral/csi-inline")


OPS: dict[str, Op] = {
    "create": Op(_create("new"), _created("new", None)),
    "restore": Op(_create("restored", snapshot="snap-base"), _created("restored", "snap-base", True)),
    "restore_flatten": Op(
        _create("restored", snapshot="snap-base"),
        _created("restored", "snap-base", True),
        ("--max-layer-depth", "1"),
    ),
    "clone": Op(_create("cloned", volume="base"), _created("cloned", "base")),
    "clone_staged": Op(_create("cloned", volume="busy"), _created("cloned", "busy")),
    "delete": Op(lambda c, w: c.delete_volume(w.ids["base"]), _forget("volumes", "base")),
    "snapshot": Op(_snap("snap-new", "base"), _snapped("base")),
    "snapshot_staged": Op(
        _snap("snap-new", "busy"), _snapped("busy")
    ),
    "delete_snapshot": Op(
        lambda c, w: c.delete_snapshot(w.ids["snap-busy"]), _forget("snapshots", "snap-busy")
    ),
    "stage": Op(lambda c, w: stage(c, w, "base")),
    "publish": Op(lambda c, w: publish(c, w, "base")),
    "unpublish": Op(lambda c, w: c.unpublish(w.ids["busy"], w.target("busy"))),
    "unstage": Op(lambda c, w: c.unstage(w.ids["busy"], w.staging("busy"))),
    "controller_expand": Op(_expand_controller, _capacity("base", 128 * MiB)),
    "node_expand": Op(_expand_node, _capacity("xfsvol", 400 * MiB)),
    "block_create": Op(_create_block("blk-new"), _created("blk-new", "blk2")),
    "block_restore": Op(
        _create_block("blk-restored", snapshot="snap-blk"), _created("blk-restored", "snap-blk", True)
    ),
    "block_clone": Op(_create_block("blk-clone", volume="blk"), _created("blk-clone", "blk")),
    "block_snapshot": Op(_snap("snap-new", "blk"), _snapped("blk")),
    "block_stage": Op(lambda c, w: stage(c, w, "blk2", cap=BLOCK_CAP)),
    "block_publish": Op(_publish_block),
    "block_unpublish": Op(lambda c, w: c.unpublish(w.ids["blk"], w.target("blk"))),
    "block_unstage": Op(lambda c, w: c.unstage(w.ids["blk"], w.staging("blk"))),
    "ephemeral_publish": Op(lambda c, w: publish_ephemeral(c, w) and None),
    "ephemeral_unpublish": Op(lambda c, w: c.unpublish("csi-inline", w.target("inline")), _ephemeral_gone),
}

CREATE = ["create.flattened", "create.built", "create.renamed", "create.done"]
CASES: list[tuple[str, str]] = (
    [("create", s) for s in CREATE]
    + [("restore", s) for s in CREATE]
    + [("restore_flatten", s) for s in ("create.flattened", "create.renamed")]
    + [("clone", s) for s in ["snapshot.committed", *CREATE]]
    + [("clone_staged", s) for s in ("snapshot.frozen", "snapshot.copied", "create.renamed")]
    + [("delete", s) for s in ("delete.uncommitted", "delete.committed")]
    + [("snapshot", s) for s in ("snapshot.committed", "snapshot.recorded")]
    + [("snapshot_staged", s) for s in ("snapshot.frozen", "snapshot.copied", "snapshot.recorded")]
    + [("delete_snapshot", "delete_snapshot.committed")]
    + [("stage", s) for s in ("stage.recorded", "stage.mounted")]
    + [("publish", s) for s in ("publish.recorded", "publish.mounted")]
    + [("unpublish", "unpublish.unmounted")]
    + [("unstage", s) for s in ("unstage.unmounted", "unstage.done")]
    + [("controller_expand", "expand.truncated"), ("node_expand", "expand.truncated")]
    + [("block_create", s) for s in ("create.built", "create.renamed", "create.done")]
    + [("block_restore", "create.renamed"), ("block_clone", "create.built")]
    + [("block_snapshot", s) for s in ("snapshot.copied", "snapshot.recorded")]
    + [("block_stage", s) for s in ("stage.recorded", "stage.mounted")]
    + [("block_publish", s) for s in ("publish.recorded", "publish.mounted")]
    + [("block_unpublish", "unpublish.unmounted")]
    + [("block_unstage", s) for s in ("unstage.unmounted", "unstage.done")]
    + [("ephemeral_publish", s) for s in ("create.done", "stage.mounted", "publish.mounted")]
    + [("ephemeral_unpublish", s) for s in ("unpublish.unmounted", "unstage.done", "delete.committed")]
)


def test_every_step_in_the_engine_has_a_crash_case():
    """A crash point in block.py needs a block case; one elsewhere needs a case of a
    file-system (or snapshot) call: a step that moves or appears fails this test."""
    in_source = steps_in_source()
    assert in_source, "no step() calls found: did the crash hook move?"
    block = {step for op, step in CASES if op.startswith("block")}
    other = {step for op, step in CASES if not op.startswith("block")}
    missing = sorted(
        (module, step) for module, step in in_source if step not in (block if module == "block.py" else other)
    )
    assert not missing, f"crash points without a crash test: {missing}"
    stale = sorted({step for _, step in CASES} - {step for _, step in in_source})
    assert not stale, f"crash tests for steps that no longer exist: {stale}"


def check_world(c: Client, w: World) -> None:
    """Every volume and snapshot exists and holds exactly the bytes written to it."""
    state = w.root / "state"
    scratch = w.root / "check"
    dump = store_dump(state)
    assert {v["name"] for v in dump["volumes"]} == set(w.volumes)
    assert {s["name"] for s in dump["snapshots"]} == set(w.snapshots)
    ids = {v["name"]: v["id"] for v in dump["volumes"]}
    for name, files in w.volumes.items():
        got = read_files(c, state, ids[name], scratch)
        assert got.keys() == files.keys() and got == files, f"volume {name} lost data"
    for name, files in w.snapshots.items():
        cap = BLOCK_CAP if "block" in files else None
        vid = c.create_volume(f"check-{name}", 64 * MiB, snapshot=w.ids[name], cap=cap).volume_id
        got = read_files(c, state, vid, scratch)
        c.delete_volume(vid)
        assert got == files, f"snapshot {name} lost data"
    problems = unfrozen_problems(state)
    assert not problems, problems


@pytest.mark.parametrize("op,step", CASES, ids=[f"{op}@{step}" for op, step in CASES])
def test_crash_at_step(tmp_path: Path, op: str, step: str):
    spec = OPS[op]
    opts = {"max_layer_depth": int(spec.args[1])} if spec.args else {}
    w = World(tmp_path)
    state = tmp_path / "state"
    proc = DriverProcess(tmp_path, {"OVERLAY_CSI_CRASH_AT": step}, *spec.args)
    d: Driver | None = None
    try:
        d = Driver(tmp_path, **opts)
        build_world(d.client, w, op)
        d.stop()
        d = None

        proc.start()
        with Client(proc.sock, timeout=60) as c:
            try:
                spec.call(c, w)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
            else:
                pytest.fail(f"{op} succeeded: step {step!r} was never reached")
        assert proc.proc is not None
        assert proc.proc.wait(timeout=30) == -signal.SIGKILL, f"{op} failed without reaching {step!r}"

        d = Driver(tmp_path, **opts)
        assert_invariants(state, d.client, root=tmp_path)
        spec.call(d.client, w)  # the retry succeeds
        spec.call(d.client, w)  # and is idempotent
        spec.after(w)
        assert_invariants(state, d.client, root=tmp_path)
        check_world(d.client, w)
        assert_invariants(state, d.client, root=tmp_path)
        if op == "publish":
            assert host.is_mounted(w.target("base"))
        teardown_all(d.client, state)
    finally:
        proc.kill()
        if d is not None:
            d.stop()
        cleanup(tmp_path)
