"""32 clients at once against one driver; the per-volume guard; long operations
that must not hold up unrelated volumes."""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from csi_driver.client import Client
from csi_driver.proto import csi_pb2 as csi
from driver_harness import SPEC_ERROR_CODES, Driver, assert_invariants, cleanup, teardown_all

MiB = 1 << 20
CLIENTS = 32
SECONDS = 20.0

ENGINE_GUARDED = {
    # engine method -> the keys (volumes, names) it must own while it runs
    "create_volume": lambda spec, *a, **k: ["name:" + spec.name]
    + ([spec.source_id] if spec.source_kind == "volume" else []),
    "delete_volume": lambda vid, *a, **k: [vid],
    "create_snapshot": lambda name, vid, *a, **k: ["snapname:" + name, vid],
    "delete_snapshot": lambda sid, *a, **k: [sid],
    "stage": lambda vid, *a, **k: [vid],
    "unstage": lambda vid, *a, **k: [vid],
    "publish": lambda vid, *a, **k: [vid],
    "unpublish": lambda vid, *a, **k: [vid],
    "expand": lambda vid, *a, **k: [vid],
    "expand_node": lambda vid, *a, **k: [vid],
}


class OverlapDetector:
    """Wraps engine methods: records any two calls that own the same key at once."""

    def __init__(self, engine) -> None:
        self.active: dict[str, str] = {}
        self.lock = threading.Lock()
        self.overlaps: list[str] = []
        self.calls = 0
        for name, keys in ENGINE_GUARDED.items():
            setattr(engine, name, self._wrap(name, getattr(engine, name), keys))

    def _wrap(self, name, fn, keys_of):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            keys = [k for k in keys_of(*args, **kwargs) if k]
            with self.lock:
                self.calls += 1
                for k in keys:
                    if k in self.active:
                        self.overlaps.append(f"{name} on {k} while {self.active[k]} runs")
                for k in keys:
                    self.active[k] = name
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    for k in keys:
                        self.active.pop(k, None)

        return wrapped


class Workload:
    def __init__(self, d: Driver, seed: int) -> None:
        self.d = d
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.volumes: set[str] = set()
        self.snapshots: set[str] = set()
        self.codes: Counter[str] = Counter()
        self.per_op: Counter[str] = Counter()
        self.bad: list[str] = []

    def pick(self, pool: set[str]) -> str:
        with self.lock:
            return self.rng.choice(sorted(pool)) if pool else "vol-" + "0" * 32

    def paths(self, vid: str, k: int) -> tuple[Path, Path]:
        staging = self.d.kubelet / "staging" / vid
        target = self.d.kubelet / "pods" / f"{vid}-{k}" / "mount"
        staging.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        return staging, target

    def one(self, c: Client, rng: random.Random) -> None:
        op = rng.choices(
            ["create", "restore", "clone", "delete", "snapshot", "delete_snapshot", "stage", "publish",
             "unpublish", "unstage", "expand", "read"],
            weights=[6, 3, 3, 4, 4, 3, 6, 6, 5, 5, 1, 4],
        )[0]
        vid = self.pick(self.volumes)
        k = rng.randrange(2)
        try:
            if op in ("create", "restore", "clone"):
                name = f"pv-{rng.randrange(24)}"
                src = {"restore": {"snapshot": self.pick(self.snapshots)}, "clone": {"volume": vid}}
                src = src.get(op, {})
                vol = c.create_volume(name, 16 * MiB, **src)
                with self.lock:
                    self.volumes.add(vol.volume_id)
            elif op == "delete":
                c.delete_volume(vid)
                with self.lock:
                    self.volumes.discard(vid)
            elif op == "snapshot":
                snap = c.create_snapshot(f"snap-{rng.randrange(16)}", vid)
                with self.lock:
                    self.snapshots.add(snap.snapshot_id)
            elif op == "delete_snapshot":
                sid = self.pick(self.snapshots)
                c.delete_snapshot(sid)
                with self.lock:
                    self.snapshots.discard(sid)
            elif op == "stage":
                c.stage(vid, self.paths(vid, k)[0])
            elif op == "publish":
                staging, target = self.paths(vid, k)
                c.publish(vid, staging, target, readonly=bool(rng.randrange(2)))
            elif op == "unpublish":
                c.unpublish(vid, self.paths(vid, k)[1])
            elif op == "unstage":
                c.unstage(vid, self.paths(vid, k)[0])
            elif op == "expand":
                c.controller.ControllerExpandVolume(
                    csi.ControllerExpandVolumeRequest(
                        volume_id=vid, capacity_range=csi.CapacityRange(required_bytes=32 * MiB)
                    ),
                    timeout=60,
                )
            else:
                c.controller.ListVolumes(csi.ListVolumesRequest(max_entries=5), timeout=60)
                c.controller.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=vid), timeout=60)
                c.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vid), timeout=60)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            if code not in SPEC_ERROR_CODES:
                with self.lock:
                    self.bad.append(f"{op}: {code}: {e.details()}")
        with self.lock:
            self.codes[code] += 1
            self.per_op[op] += 1


def test_mixed_workload_of_32_clients(driver: Driver):
    detector = OverlapDetector(driver.engine)
    work = Workload(driver, seed=5)
    deadline = time.monotonic() + SECONDS

    def client_loop(i: int) -> None:
        rng = random.Random(i)
        with Client(driver.sock, timeout=60) as c:
            while time.monotonic() < deadline:
                work.one(c, rng)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    total = sum(work.codes.values())
    print(f"\n{total} concurrent calls by {CLIENTS} clients in {SECONDS:.0f} s: {dict(work.codes)}; "
          f"per op {dict(work.per_op)}; {detector.calls} guarded engine calls")
    assert not work.bad, f"calls ended with non-spec codes: {work.bad[:10]}"
    assert not detector.overlaps, f"two operations ran on one volume at once: {detector.overlaps[:10]}"
    assert work.codes["OK"] > total // 4, "the workload did mostly nothing"
    assert work.codes["ABORTED"] > 0, "32 clients on 24 names never collided: the guard is not exercised"
    assert_invariants(driver.state, driver.client, root=driver.root)
    teardown_all(driver.client, driver.state)


class Gate:
    """An engine crash hook that parks the calling thread at one step until opened."""

    def __init__(self, step: str, hold: float = 0.0, volume_name: str = "") -> None:
        self.step, self.hold, self.volume_name = step, hold, volume_name
        self.reached = threading.Event()
        self.open = threading.Event()

    def _mine(self) -> bool:
        """With ``volume_name``: only the CreateVolume of that name (the step is shared)."""
        if not self.volume_name:
            return True
        frame = sys._getframe(2)
        while frame is not None:
            spec = frame.f_locals.get("spec")
            if spec is not None and getattr(spec, "name", None) == self.volume_name:
                return True
            frame = frame.f_back
        return False

    def __call__(self, step: str) -> None:
        if step == self.step and not self.reached.is_set() and self._mine():
            self.window = (time.monotonic(), time.monotonic() + self.hold)
            self.reached.set()
            if self.hold:
                time.sleep(self.hold)
            else:
                assert self.open.wait(60)


def _in_thread(fn, *args):
    out: dict[str, object] = {}

    def run():
        start = time.monotonic()
        try:
            out["result"] = fn(*args)
        except Exception as e:  # reported by the caller
            out["error"] = e
        out["seconds"] = time.monotonic() - start

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _code(call, *args, **kw) -> str:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e.code().name
    return "OK"


def test_second_operation_on_a_busy_volume_is_aborted(driver: Driver):
    c = driver.client
    vol = c.create_volume("busy", 32 * MiB).volume_id
    staging, target = driver.paths("busy")
    c.stage(vol, staging)
    c.publish(vol, staging, target)
    (target / "f").write_bytes(b"x" * MiB)
    gate = Gate("snapshot.frozen")
    driver.engine._crash = gate
    t, out = _in_thread(c.create_snapshot, "snap-1", vol)
    assert gate.reached.wait(30)
    other_staging, other_target = driver.paths("other")
    expand = csi.ControllerExpandVolumeRequest(volume_id=vol, capacity_range=csi.CapacityRange(
        required_bytes=64 * MiB))
    codes = {
        "CreateSnapshot same name": _code(c.create_snapshot, "snap-1", vol),
        "CreateSnapshot other name": _code(c.create_snapshot, "snap-2", vol),
        "clone": _code(c.create_volume, "clone", 32 * MiB, volume=vol),
        "DeleteVolume": _code(c.delete_volume, vol),
        "ControllerExpandVolume": _code(c.controller.ControllerExpandVolume, expand),
        "NodeStageVolume": _code(c.stage, vol, staging),
        "NodePublishVolume": _code(c.publish, vol, staging, other_target),
        "NodeUnpublishVolume": _code(c.unpublish, vol, target),
        "NodeUnstageVolume": _code(c.unstage, vol, staging),
    }
    assert set(codes.values()) == {"ABORTED"}, codes
    # an unrelated volume's whole life goes on meanwhile
    start = time.monotonic()
    other = c.create_volume("other", 32 * MiB).volume_id
    c.stage(other, other_staging)
    c.publish(other, other_staging, other_target)
    c.unpublish(other, other_target)
    c.unstage(other, other_staging)
    c.delete_volume(other)
    assert time.monotonic() - start < 5
    assert t.is_alive(), "the snapshot did not wait at the gate"
    gate.open.set()
    t.join(60)
    assert "error" not in out, out
    driver.engine._crash = lambda step: None
    assert _code(c.create_snapshot, "snap-1", vol) == "OK", "the same call is fine once the first is done"
    assert_invariants(driver.state, c, root=driver.root)
    teardown_all(c, driver.state)


def _fill(path: Path, size: int) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB that does not compress to holes
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        __import__("os").fsync(f.fileno())


HOLD = 2.0  # seconds the long operation is parked inside, on top of its real work


@pytest.mark.parametrize("long_op", ["snapshot-of-staged", "flatten"])
def test_long_operation_does_not_block_unrelated_volumes(tmp_path: Path, long_op: str):
    d = Driver(tmp_path, max_layer_depth=1) if long_op == "flatten" else Driver(tmp_path)
    try:
        c = d.client
        vol = c.create_volume("big", 512 * MiB).volume_id
        staging, target = d.paths("big")
        c.stage(vol, staging)
        _fill(staging / "data", 384 * MiB)
        if long_op == "flatten":
            c.unstage(vol, staging)
            snap = c.create_snapshot("s", vol).snapshot_id  # depth 1: a restore must flatten
            long_call = (c.create_volume, "restored", 512 * MiB)
            kwargs = {"snapshot": snap}
            gate = Gate("create.flattened", hold=HOLD, volume_name="restored")  # after the real flatten
        else:
            long_call = (c.create_snapshot, "s", vol)
            kwargs = {}
            gate = Gate("snapshot.frozen", hold=HOLD)  # frozen, before the real copy
        d.engine._crash = gate
        t, out = _in_thread(lambda: long_call[0](*long_call[1:], **kwargs))
        calls = []  # (start, end) of each unrelated create + stage + publish
        i = 0
        while t.is_alive() or i < 3:
            start = time.monotonic()
            other = c.create_volume(f"small-{i}", 16 * MiB).volume_id
            ost, otg = d.paths(f"small-{i}")
            c.stage(other, ost)
            c.publish(other, ost, otg)
            calls.append((start, time.monotonic()))
            i += 1
        t.join()
        assert "error" not in out, out
        slowest = max(end - start for start, end in calls)
        inside = [c for c in calls if gate.window[0] <= c[0] and c[1] <= gate.window[1]]
        print(f"\n{long_op} took {out['seconds']:.2f} s; {len(calls)} unrelated create+stage+publish "
              f"meanwhile ({len(inside)} while it was parked), slowest {slowest * 1000:.0f} ms")
        assert len(inside) >= 3, "unrelated calls waited for the long operation"
        assert slowest < HOLD, "an unrelated call waited for the long operation"
        d.engine._crash = lambda step: None
        assert_invariants(d.state, c, root=tmp_path)
        teardown_all(c, d.state)
    finally:
        d.stop()
        cleanup(tmp_path)
