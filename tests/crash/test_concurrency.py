"""32 clients at once against one driver; the per-volume guard; long operations
that must not hold up unrelated volumes."""

from __future__ import annotations

import functools
import inspect
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from csi_driver.client import Client, mount_capability
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from csi_driver.service.controller import ControllerServicer
from csi_driver.service.group import GroupControllerServicer
from csi_driver.service.node import NodeServicer
from driver_harness import (
    SPEC_ERROR_CODES,
    Driver,
    assert_invariants,
    cleanup,
    disk_dump,
    store_dump,
    teardown_all,
)

MiB = 1 << 20
CLIENTS = 32
SECONDS = 20.0

# ---- which calls must own which objects, derived from the code ------------------

ID_FIELDS = {"volume_id", "source_volume_id", "source_volume_ids", "snapshot_id", "snapshot_ids",
             "group_snapshot_id", "base_snapshot_id", "target_snapshot_id"}
# RPCs that only read: they never wait for, or abort on, a busy object.
READ_ONLY_RPCS = {"ValidateVolumeCapabilities", "ControllerGetVolume", "ListSnapshots", "GetSnapshot",
                  "GetVolumeGroupSnapshot", "NodeGetVolumeStats"}
# (RPC, field path) naming an object the call uses but need not own, and why.
NOT_OWNED = {
    ("CreateVolume", "volume_content_source.snapshot.snapshot_id"):
        "a restore pins the snapshot's layers; many restores of one snapshot run at once",
    ("DeleteVolumeGroupSnapshot", "snapshot_ids"): "the members are covered by the group id it owns",
}
SERVICERS = (ControllerServicer, NodeServicer, GroupControllerServicer)


def _id_paths(desc, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths to every field of a request that names a volume, snapshot or group."""
    out = []
    for f in desc.fields:
        path = prefix + f.name
        if f.name in ID_FIELDS:
            out.append(path)
        elif f.message_type is not None and not f.is_repeated and depth < 3 \
                and not f.message_type.GetOptions().map_entry:
            out += _id_paths(f.message_type, path + ".", depth + 1)
    return out


def owning_rpcs() -> list[tuple[str, str, str]]:
    """(service, RPC, field path) for every RPC our servicers implement whose request names an
    object it changes: while another call owns that object, it must answer ABORTED."""
    out = []
    for cls in SERVICERS:
        base = next(b for b in cls.__mro__ if b.__module__ == csi_pb2_grpc.__name__)
        service = base.__name__.removesuffix("Servicer")
        for m in csi.DESCRIPTOR.services_by_name[service].methods:
            if m.name not in vars(cls) or m.name in READ_ONLY_RPCS:
                continue  # not implemented (UNIMPLEMENTED) or a read
            out += [(service, m.name, p) for p in _id_paths(m.input_type) if (m.name, p) not in NOT_OWNED]
    return out


OWNING_RPCS = owning_rpcs()

# Engine parameters that name the objects a call works on.
ENGINE_ID_PARAMS = {"volume_id", "source_volume_id", "snapshot_id", "group_id", "handle", "volume_ids",
                    "v", "spec", "name"}
# Engine methods that only read, though they take an id.
READ_ONLY_ENGINE = {"condition", "get_volume", "get_snapshot", "get_group_snapshot", "stats",
                    "ephemeral_volume", "volume_paths", "list_snapshots", "attached", "pending_delete",
                    "describe_exported", "block_expand_path_ok"}


def _engine_keys(method: str, fn):
    """The objects (ids, names) an engine call works on, from its parameters."""
    sig = inspect.signature(fn)
    noun = method.removeprefix("create_")

    def keys(*args, **kwargs) -> list[str]:
        out: list[str] = []
        for name, value in sig.bind(*args, **kwargs).arguments.items():
            if name in ("volume_id", "source_volume_id", "snapshot_id", "group_id", "handle"):
                out.append(value)
            elif name == "volume_ids":
                out += list(value)
            elif name == "v":
                out.append(value.id)
            elif name == "spec":
                out += ["volume-name:" + value.name] if value.name else []
                out += [value.source_id] if value.source_kind == "volume" else []
            elif name == "name":
                out.append(f"{noun}-name:{value}")
        return [k for k in out if k]

    return keys


def engine_guarded(engine) -> dict:
    """Every public engine method that works on a volume, snapshot or group (derived from the
    engine's own signatures, so a new one is watched without touching this file)."""
    out = {}
    for name in dir(type(engine)):
        fn = getattr(engine, name)
        if name.startswith("_") or not callable(fn) or name in READ_ONLY_ENGINE:
            continue
        if set(inspect.signature(fn).parameters) & ENGINE_ID_PARAMS:
            out[name] = _engine_keys(name, fn)
    return out


class OverlapDetector:
    """Wraps engine methods: records any two calls in different threads that own the same key
    at once (an engine method calling another on the same thread is one operation)."""

    def __init__(self, engine) -> None:
        self.active: dict[str, tuple[str, int, int]] = {}  # key -> (method, thread, depth)
        self.lock = threading.Lock()
        self.overlaps: list[str] = []
        self.calls = 0
        self.guarded = engine_guarded(engine)
        for name, keys in self.guarded.items():
            setattr(engine, name, self._wrap(name, getattr(engine, name), keys))

    def _wrap(self, name, fn, keys_of):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            keys = keys_of(*args, **kwargs)
            me = threading.get_ident()
            with self.lock:
                self.calls += 1
                for k in keys:
                    owner = self.active.get(k)
                    if owner is not None and owner[1] != me:
                        self.overlaps.append(f"{name} on {k} while {owner[0]} runs")
                for k in keys:
                    owner = self.active.get(k)
                    self.active[k] = (name, me, owner[2] + 1 if owner and owner[1] == me else 1)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    for k in keys:
                        owner = self.active.get(k)
                        if owner is not None and owner[1] == me:
                            if owner[2] > 1:
                                self.active[k] = (owner[0], me, owner[2] - 1)
                            else:
                                del self.active[k]

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
             "unpublish", "unstage", "expand", "node_expand", "modify", "read"],
            weights=[6, 3, 3, 4, 4, 3, 6, 6, 5, 5, 1, 1, 2, 4],
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
            elif op == "node_expand":  # kubelet after a resize (the staging path is a volume path)
                c.node.NodeExpandVolume(
                    csi.NodeExpandVolumeRequest(volume_id=vid, volume_path=str(self.paths(vid, 0)[0])),
                    timeout=60,
                )
            elif op == "modify":
                c.controller.ControllerModifyVolume(
                    csi.ControllerModifyVolumeRequest(
                        volume_id=vid, mutable_parameters={"discard": rng.choice(["true", "false"])}
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
          f"per op {dict(work.per_op)}; {detector.calls} calls of {len(detector.guarded)} watched engine "
          "methods")
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


def _kind(path: str) -> str:
    field = path.rsplit(".", 1)[-1]
    return "group" if field.startswith("group") else "snapshot" if "snapshot" in field else "volume"


def _stub(c: Client, service: str, method: str):
    return getattr(getattr(csi_pb2_grpc, f"{service}Stub")(c.channel), method)


# What a request needs besides the id for the call to reach its guard (CreateVolume owns a
# source volume only once its own name and capabilities are valid). NodeExpandVolume gets a
# complete request, the one kubelet sends (a real path of the staged and published volume,
# its size, its capability): a request the driver would refuse anyway could pass for a
# guard. ``where`` holds what the test knows of the volume: volume_path and capacity.
REQUEST_BASE = {
    "CreateVolume": lambda where: csi.CreateVolumeRequest(
        name="guard-probe", capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()]),
    "NodeExpandVolume": lambda where: csi.NodeExpandVolumeRequest(
        volume_path=str(where["volume_path"]),
        capacity_range=csi.CapacityRange(required_bytes=where["capacity"]),
        volume_capability=mount_capability()),
}
NODE_EXPAND = ("Node", "NodeExpandVolume", "volume_id")


def _request(method: str, path: str, value: str, where: dict | None = None):
    desc = next(m for s in csi.DESCRIPTOR.services_by_name.values() for m in s.methods if m.name == method)
    base = REQUEST_BASE.get(method)
    top = base(where or {}) if base else getattr(csi, desc.input_type.name)()
    *parents, field = path.split(".")
    msg = top
    for p in parents:
        msg = getattr(msg, p)
    if msg.DESCRIPTOR.fields_by_name[field].is_repeated:
        getattr(msg, field).append(value)
    else:
        setattr(msg, field, value)
    return top


def test_the_owning_rpcs_are_derived_from_code_that_exists():
    """The exemptions name RPCs and fields that exist, and the derivation finds the calls
    that change objects (a sanity check of the walk, not a list to keep up to date)."""
    rpcs = {m.name: m for s in csi.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert READ_ONLY_RPCS <= set(rpcs)
    for method, path in NOT_OWNED:
        assert path in _id_paths(rpcs[method].input_type), (method, path)
    kinds = {_kind(p) for _, _, p in OWNING_RPCS}
    assert kinds == {"volume", "snapshot", "group"}, kinds
    assert len({m for _, m, _ in OWNING_RPCS}) >= 14, OWNING_RPCS


def test_every_rpc_that_names_an_object_owns_it(driver: Driver):
    """Each RPC (as derived above) answers ABORTED, changing nothing, while another call owns
    the volume, snapshot or group it names; the key is held in the servicers' own guard table,
    as an in-flight call holds it. A new RPC, or a guard dropped from one, fails here."""
    c = driver.client
    groups = csi_pb2_grpc.GroupControllerStub(c.channel)
    created = c.create_volume("owned", 16 * MiB)
    vol = created.volume_id
    snap = c.create_snapshot("owned-snap", vol).snapshot_id
    group = groups.CreateVolumeGroupSnapshot(
        csi.CreateVolumeGroupSnapshotRequest(name="owned-group", source_volume_ids=[vol])
    ).group_snapshot.group_snapshot_id
    staging, target = driver.paths("owned")
    c.stage(vol, staging)
    c.publish(vol, staging, target)
    where = {"volume_path": target, "capacity": created.capacity_bytes}
    ids = {"volume": vol, "snapshot": snap, "group": group}
    assert NODE_EXPAND in OWNING_RPCS, OWNING_RPCS
    before = store_dump(driver.state), disk_dump(driver.state)
    codes = {}
    for service, method, path in OWNING_RPCS:
        with driver.server.ctx.locks.try_hold(ids[_kind(path)]) as owned:
            assert owned
            request = _request(method, path, ids[_kind(path)], where)
            codes[f"{method} {path}"] = _code(_stub(c, service, method), request)
    assert {k: v for k, v in codes.items() if v != "ABORTED"} == {}, "calls that did not own what they name"
    assert (store_dump(driver.state), disk_dump(driver.state)) == before, "an aborted call changed something"
    # nobody owns them now: the same calls go ahead (the NodeExpandVolume request is complete
    # and valid, so only the guard could have refused it above)
    assert _code(_stub(c, *NODE_EXPAND[:2]), _request(*NODE_EXPAND[1:], vol, where)) == "OK"
    assert _code(groups.DeleteVolumeGroupSnapshot,
                 csi.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group)) == "OK"
    assert _code(c.delete_snapshot, snap) == "OK"
    assert_invariants(driver.state, c, root=driver.root)
    teardown_all(c, driver.state)


def test_second_operation_on_a_busy_volume_is_aborted(driver: Driver):
    c = driver.client
    created = c.create_volume("busy", 32 * MiB)
    vol = created.volume_id
    staging, target = driver.paths("busy")
    c.stage(vol, staging)
    c.publish(vol, staging, target)
    (target / "f").write_bytes(b"x" * MiB)
    gate = Gate("snapshot.frozen")
    driver.engine.steps.hook = gate
    t, out = _in_thread(c.create_snapshot, "snap-1", vol)
    assert gate.reached.wait(30)
    other_staging, other_target = driver.paths("other")
    expand = csi.ControllerExpandVolumeRequest(volume_id=vol, capacity_range=csi.CapacityRange(
        required_bytes=64 * MiB))
    where = {"volume_path": target, "capacity": created.capacity_bytes}  # a complete NodeExpandVolume
    assert NODE_EXPAND in OWNING_RPCS, OWNING_RPCS
    codes = {  # every RPC that names the busy volume, as the servicers and the proto have them
        f"{method} {path}": _code(_stub(c, service, method), _request(method, path, vol, where))
        for service, method, path in OWNING_RPCS
        if _kind(path) == "volume"
    }
    codes |= {
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
    assert {k: v for k, v in codes.items() if v != "ABORTED"} == {}, "calls that went ahead on a busy volume"
    assert "error" not in out, out
    driver.engine.steps.hook = lambda step: None
    assert _code(c.create_snapshot, "snap-1", vol) == "OK", "the same call is fine once the first is done"
    assert _code(_stub(c, *NODE_EXPAND[:2]), _request(*NODE_EXPAND[1:], vol, where)) == "OK", (
        "the NodeExpandVolume request is complete and valid: only the busy guard may refuse it")
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
        d.engine.steps.hook = gate
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
        d.engine.steps.hook = lambda step: None
        assert_invariants(d.state, c, root=tmp_path)
        teardown_all(c, d.state)
    finally:
        d.stop()
        cleanup(tmp_path)
