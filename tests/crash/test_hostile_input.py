"""Hostile and malformed input (hypothesis) over every field of every RPC.

Requests are generated from the proto descriptors, so a field or RPC added later
is covered without touching this file. Each answer must be OK or one of the
spec's error codes (never UNKNOWN or INTERNAL); a refused call changes nothing
(store, state dir, mount table); nothing outside the test's temp dir is ever
written or mounted; and the state dir's invariants hold after every call.

Examples are random per run, from one seed that is printed at the start of the module
(``hypothesis: profile ci, seed N``) and in any failure. Replay a run with
``HYPOTHESIS_SEED=N`` (or pytest's ``--hypothesis-seed=N``) over the same selection of
tests: the arena is shared, so earlier RPCs shape the state later ones see.
``HYPOTHESIS_PROFILE=dev`` gives the fixed (derandomized) examples instead. About 40% of
the requests are valid ones built from what exists, so the success paths run too, and each
RPC must answer OK to some of them.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from csi_driver import host
from csi_driver.client import mount_capability
from csi_driver.proto import csi_pb2 as csi
from csi_driver.proto import csi_pb2_grpc
from driver_harness import (
    MOUNT_SKIP,
    SPEC_ERROR_CODES,
    Driver,
    cleanup,
    disk_dump,
    invariant_problems,
    store_dump,
    teardown_all,
)

pytestmark = pytest.mark.skipif(bool(MOUNT_SKIP), reason=MOUNT_SKIP or "ok")

MiB = 1 << 20
EXAMPLES_PER_RPC = 60
ALLOWED = SPEC_ERROR_CODES | {"OK"}
FD = FieldDescriptor
MIN_OK = EXAMPLES_PER_RPC // 10  # answers OK per RPC that has valid requests: success paths ran

settings.register_profile(
    "ci", max_examples=EXAMPLES_PER_RPC, derandomize=False, database=None, deadline=None,
    suppress_health_check=list(HealthCheck), print_blob=True,
)
settings.register_profile("dev", settings.get_profile("ci"), derandomize=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


@pytest.fixture(scope="module")
def run_seed(request) -> int:
    """This run's seed: --hypothesis-seed, else HYPOTHESIS_SEED, else a fresh one; printed
    past pytest's capture so that a failing run can be replayed."""
    given_seed = request.config.getoption("hypothesis_seed", None) or os.environ.get("HYPOTHESIS_SEED")
    value = int(given_seed) if given_seed else random.SystemRandom().randrange(1 << 32)
    line = (f"hypothesis: profile {PROFILE}, seed {value} "
            f"(replay: HYPOTHESIS_SEED={value} or --hypothesis-seed={value})")
    if settings.get_profile(PROFILE).derandomize:
        line = f"hypothesis: profile {PROFILE}, derandomized (the same examples every run)"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")
    return value


def _unary_methods() -> list[tuple[str, str, Descriptor]]:
    out = []
    for svc in csi.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if not m.client_streaming and not m.server_streaming:
                out.append((svc.name, m.name, m.input_type))
    return out


METHODS = _unary_methods()


@dataclass
class Arena:
    d: Driver
    root: Path
    kubelet: Path
    outside: Path
    etc_before: list[str]
    foreign_mounts: set[str]

    a_image: int = 0  # the size of volume a's image when it was made

    @property
    def state(self) -> Path:
        return self.d.state

    def _image_size(self, vol: dict) -> int:
        return self.d.engine.backend.layout.image(vol["upper"]).stat().st_size

    def ids(self) -> dict[str, list[str]]:
        dump = store_dump(self.state)
        return {
            "volume": [v["id"] for v in dump["volumes"]],
            "snapshot": [s["id"] for s in dump["snapshots"]],
            "group": [g["id"] for g in dump.get("groups", [])],
            "layer": [x["id"] for x in dump["layers"]],
        }

    def replenish(self) -> None:
        """Keep a published volume, a detached one and a snapshot around."""
        c = self.d.client
        dump = store_dump(self.state)
        names = {v["name"]: v for v in dump["volumes"]}
        a = names.get("a")
        if a is not None and (a["capacity_bytes"] != 16 * MiB or self._image_size(a) != self.a_image):
            # grown by an earlier example (a refused online growth leaves the image grown):
            # start afresh, so that kubelet's no-op NodeExpandVolume stays a valid request
            for p in dump["publications"]:
                if p["volume_id"] == a["id"]:
                    c.unpublish(a["id"], p["target_path"])
            if a["staging_path"]:
                c.unstage(a["id"], a["staging_path"])
            c.delete_volume(a["id"])
            del names["a"]
        if "a" not in names:
            vid = c.create_volume("a", 16 * MiB).volume_id
            made = {v["id"]: v for v in store_dump(self.state)["volumes"]}[vid]
            self.a_image = self._image_size(made)
        if "b" not in names:
            c.create_volume("b", 16 * MiB)
        dump = store_dump(self.state)
        vols = {v["name"]: v for v in dump["volumes"]}
        a = vols["a"]
        staging, target = self.d.paths("a")
        if a["staging_path"] in (None, str(staging)) and not host.is_mounted(staging):
            c.stage(a["id"], staging)
        if not host.is_mounted(target):
            c.publish(a["id"], staging, target)
        if not any(s["name"] == "s" for s in dump["snapshots"]):
            c.create_snapshot("s", vols["b"]["id"])
        if not dump.get("groups"):
            csi_pb2_grpc.GroupControllerStub(c.channel).CreateVolumeGroupSnapshot(
                csi.CreateVolumeGroupSnapshotRequest(name="kept", source_volume_ids=[vols["b"]["id"]]))


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Iterator[Arena]:
    root = tmp_path_factory.mktemp("hostile")
    d = Driver(root)
    try:
        outside = root / "outside"
        outside.mkdir()
        (outside / "canary").write_text("canary")
        k = d.kubelet
        (k / "link-etc").symlink_to("/etc")
        (k / "link-out").symlink_to(outside)
        (k / "dirlink").symlink_to(outside)
        (k / "file").write_text("a regular file")
        foreign = {m.target for m in host.mounts() if not m.target.startswith(str(root) + "/")}
        ar = Arena(d, root, k, outside, sorted(os.listdir("/etc")), foreign)
        ar.replenish()
        yield ar
        teardown_all(d.client, d.state)
    finally:
        d.stop()
        cleanup(root)


# ---- strategies ---------------------------------------------------------------

NASTY = st.sampled_from(
    ["", " ", ".", "..", "../..", "../../etc/passwd", "/etc/passwd", "a/../../b", "\u2603", "\u202e\u0000x",
     "x" * 5000, "vol-" + "0" * 32, "snap-" + "0" * 32, "group-" + "0" * 32, "vol-" + "A" * 32, "%s", "\n",
     "*"]
)
SEGMENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=30
)


def path_strategy(ar: Arena) -> st.SearchStrategy[str]:
    k, s = str(ar.kubelet), ar.state
    staging, target = ar.d.paths("a")
    fixed = [
        "", ".", "..", "relative/path", "a/../b", "/", f"{k}/../../..", f"{k}/x/../y", f"{k}//double//x",
        f"{k}/trailing/", f"{k}/./dot", f"{k}/link-etc", f"{k}/link-out", f"{k}/dirlink", f"{k}/file",
        f"{k}/file/under-a-file", f"{k}/dirlink/sub", f"{k}/{'n' * 300}", f"{k}/nul\x00byte",
        "/" + "x" * 5000,
        f"{k}/\u00e9\u2603\u202e", str(s), str(s / "empty"), str(s / "tmp"), str(s / "layers"), str(s / "l"),
        str(s / "state.db"), str(ar.root), str(staging), str(target), str(staging.parent),
    ]
    return st.one_of(
        st.sampled_from(fixed),
        st.builds(lambda seg: f"{k}/gen/{seg}", SEGMENT),
        st.builds(lambda seg: f"{k}/gen/{seg}/mount", SEGMENT),
        st.builds(lambda lid: str(s / "layers" / lid / "mnt"), _current(ar, "layer")),
    )


def _current(ar: Arena, *kinds: str) -> st.SearchStrategy[str]:
    """An id of an object that exists when drawn (the choice is an index, so the
    generated data does not depend on what earlier examples created or deleted)."""

    def pick(i: int) -> str:
        ids = ar.ids()
        known = [x for kind in kinds for x in ids[kind]]
        return known[i % len(known)] if known else "x"

    return st.integers(0, 15).map(pick)


def id_strategy(ar: Arena) -> st.SearchStrategy[str]:
    return st.one_of(_current(ar, "volume", "snapshot", "group", "layer"), NASTY, st.text(max_size=40))


SIZES = st.sampled_from([0, 1, 4096, MiB, 16 * MiB, 32 * MiB + 1, 1 << 40, 1 << 62, (1 << 63) - 1, -1, -MiB])
MAPS = st.one_of(
    st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
    st.sampled_from([
        {f"k{i}": "v" for i in range(100)},
        {"x" * 300: "v"},
        {"k": "v" * 5000},
        {"baseLayer": "../../etc"},
        {"baseLayer": "missing-layer"},
        {"csi.storage.k8s.io/ephemeral": "true", "size": "1Pi"},
        {"csi.storage.k8s.io/ephemeral": "true", "size": "16Mi"},
        {"csi.storage.k8s.io/ephemeral": "true", "size": "-1"},
    ]),
)
FLAGS = st.lists(
    st.sampled_from(["ro", "rw", "noatime", "bind", "remount", "X-mount.mkdir", "nosuid,dev", "context=x", "",
                     "\u2603", "loop", "upperdir=/etc"]),
    max_size=3,
)


def capability_strategy() -> st.SearchStrategy[csi.VolumeCapability]:
    mode = st.builds(csi.VolumeCapability.AccessMode, mode=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99]))
    mount = st.builds(
        csi.VolumeCapability.MountVolume,
        fs_type=st.sampled_from(["", "ext4", "xfs", "btrfs", "../ext4", "ext4 ", "\u2603", "x" * 500]),
        mount_flags=FLAGS,
        volume_mount_group=st.sampled_from(["", "1000", "root", "-1", "99999999999", "0"]),
    )
    return st.one_of(
        st.builds(csi.VolumeCapability, mount=mount, access_mode=mode),
        st.builds(csi.VolumeCapability, block=st.just(csi.VolumeCapability.BlockVolume()), access_mode=mode),
        st.builds(csi.VolumeCapability, access_mode=mode),
        st.just(mount_capability()),
    )


def string_for(field: str, ar: Arena) -> st.SearchStrategy[str]:
    if "path" in field:
        return path_strategy(ar)
    if field.endswith("_id") or field == "node_id":
        if field == "node_id":
            return st.one_of(st.just("node-1"), NASTY)
        return id_strategy(ar)
    if field == "starting_token":
        tokens = st.sampled_from(["1", "0", "-1", "9" * 30, "1e5", " 1"])
        return st.one_of(NASTY, tokens, st.text(max_size=10))
    return st.one_of(NASTY, st.text(max_size=40), st.sampled_from(["a", "b", "s", "new"]))


def message_strategy(desc: Descriptor, ar: Arena, depth: int = 0) -> st.SearchStrategy:
    if desc.full_name == "csi.v1.VolumeCapability":
        return capability_strategy()
    if desc.full_name == "csi.v1.CapacityRange":
        return st.builds(csi.CapacityRange, required_bytes=SIZES, limit_bytes=SIZES)
    optional = {}
    for f in desc.fields:
        s = field_strategy(f, ar, depth)
        if s is not None:
            optional[f.name] = s
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: _build(desc, kw))


def _build(desc: Descriptor, kw: dict):
    cls = {m.DESCRIPTOR.full_name: m for m in _all_messages()}[desc.full_name]
    msg = cls()
    for name, value in kw.items():
        f = desc.fields_by_name[name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif f.is_repeated:
            getattr(msg, name).extend(value)
        elif f.message_type is not None:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def _all_messages():
    out = []

    def walk(cls):
        out.append(cls)
        for nested in cls.DESCRIPTOR.nested_types:
            walk(getattr(cls, nested.name))

    for name in csi.DESCRIPTOR.message_types_by_name:
        walk(getattr(csi, name))
    return out


def field_strategy(f: FieldDescriptor, ar: Arena, depth: int) -> st.SearchStrategy | None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return MAPS
    if f.message_type is not None:
        if f.message_type.full_name.startswith("google.protobuf.") or depth > 3:
            return None
        inner = message_strategy(f.message_type, ar, depth + 1)
        return st.lists(inner, max_size=3) if f.is_repeated else inner
    if f.type == FD.TYPE_STRING:
        inner = string_for(f.name, ar)
    elif f.type == FD.TYPE_BOOL:
        inner = st.booleans()
    elif f.type == FD.TYPE_ENUM:
        inner = st.sampled_from([v.number for v in f.enum_type.values] + [99])
    elif f.type in (FD.TYPE_INT64, FD.TYPE_INT32):
        inner = SIZES.filter(lambda n: f.type == FD.TYPE_INT64 or -(1 << 31) <= n < 1 << 31)
    else:
        return None
    return st.lists(inner, max_size=4) if f.is_repeated else inner


def templates(ar: Arena) -> dict[str, object]:
    """A request that would succeed (or nearly) for each RPC, built from what exists now;
    the property mutates one to three of its fields, so hostile values reach deep code."""
    dump = store_dump(ar.state)
    vols = {v["name"]: v["id"] for v in dump["volumes"]}
    a, b = vols.get("a", ""), vols.get("b", "")
    snap = next((x["id"] for x in dump["snapshots"] if x["name"] == "s"), "")
    group = next((g["id"] for g in dump.get("groups", [])), "")
    a_staging, a_target = ar.d.paths("a")
    b_staging = ar.kubelet / "staging" / "b"
    cap = mount_capability()
    cr = csi.CapacityRange(required_bytes=32 * MiB)
    return {
        "CreateVolume": csi.CreateVolumeRequest(name="new", capacity_range=csi.CapacityRange(
            required_bytes=16 * MiB), volume_capabilities=[cap]),
        "DeleteVolume": csi.DeleteVolumeRequest(volume_id=b),
        "ControllerPublishVolume": csi.ControllerPublishVolumeRequest(
            volume_id=a, node_id="node-1", volume_capability=cap),
        "ControllerUnpublishVolume": csi.ControllerUnpublishVolumeRequest(volume_id=a, node_id="node-1"),
        "ValidateVolumeCapabilities": csi.ValidateVolumeCapabilitiesRequest(
            volume_id=a, volume_capabilities=[cap]),
        "GetCapacity": csi.GetCapacityRequest(volume_capabilities=[cap]),
        "CreateSnapshot": csi.CreateSnapshotRequest(name="snap-new", source_volume_id=b),
        "DeleteSnapshot": csi.DeleteSnapshotRequest(snapshot_id=snap),
        "GetSnapshot": csi.GetSnapshotRequest(snapshot_id=snap),
        "ListSnapshots": csi.ListSnapshotsRequest(source_volume_id=b),
        "ControllerExpandVolume": csi.ControllerExpandVolumeRequest(volume_id=b, capacity_range=cr),
        "ControllerGetVolume": csi.ControllerGetVolumeRequest(volume_id=a),
        "ControllerModifyVolume": csi.ControllerModifyVolumeRequest(
            volume_id=b, mutable_parameters={"discard": "true"}),
        "CreateVolumeGroupSnapshot": csi.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[b]),
        "DeleteVolumeGroupSnapshot": csi.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group),
        "GetVolumeGroupSnapshot": csi.GetVolumeGroupSnapshotRequest(group_snapshot_id=group),
        "NodeStageVolume": csi.NodeStageVolumeRequest(
            volume_id=b, staging_target_path=str(b_staging), volume_capability=cap),
        "NodeUnstageVolume": csi.NodeUnstageVolumeRequest(volume_id=b, staging_target_path=str(b_staging)),
        "NodePublishVolume": csi.NodePublishVolumeRequest(
            volume_id=a, staging_target_path=str(a_staging), target_path=str(ar.kubelet / "pods" / "new"),
            volume_capability=cap),
        "NodeUnpublishVolume": csi.NodeUnpublishVolumeRequest(volume_id=a, target_path=str(a_target)),
        "NodeGetVolumeStats": csi.NodeGetVolumeStatsRequest(volume_id=a, volume_path=str(a_target)),
        "NodeExpandVolume": csi.NodeExpandVolumeRequest(
            volume_id=a, volume_path=str(a_staging), capacity_range=cr),
    }


def valid_requests(ar: Arena) -> dict[str, list]:
    """Requests that should be answered OK from what exists now: each RPC's template and
    variations of it that stay valid (other sizes, file systems, sources, paths, flags)."""
    out = {k: [v] for k, v in templates(ar).items()}
    dump = store_dump(ar.state)
    vols = {v["name"]: v for v in dump["volumes"]}
    snap = next((x["id"] for x in dump["snapshots"] if x["name"] == "s"), "")
    a, b = vols.get("a"), vols.get("b")
    Mode = csi.VolumeCapability.AccessMode
    block = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                 access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    created = []
    for mib in (16, 32):
        for fs in ("", "ext4", "xfs"):
            cap = mount_capability(fs_type=fs) if fs else mount_capability()
            created.append(csi.CreateVolumeRequest(
                name=f"new-{fs or 'default'}-{mib}", volume_capabilities=[cap],
                capacity_range=csi.CapacityRange(required_bytes=mib * MiB)))
    created.append(csi.CreateVolumeRequest(name="new-block", volume_capabilities=[block],
                                           capacity_range=csi.CapacityRange(required_bytes=16 * MiB)))
    if snap:
        created.append(csi.CreateVolumeRequest(name="new-restore", volume_capabilities=[mount_capability()],
                                               volume_content_source={"snapshot": {"snapshot_id": snap}}))
    if b:
        created.append(csi.CreateVolumeRequest(name="new-clone", volume_capabilities=[mount_capability()],
                                               volume_content_source={"volume": {"volume_id": b["id"]}}))
        out["ControllerExpandVolume"] += [
            csi.ControllerExpandVolumeRequest(
                volume_id=b["id"], capacity_range=csi.CapacityRange(required_bytes=mib * MiB))
            for mib in (16, 48)
        ]
        out["CreateSnapshot"].append(csi.CreateSnapshotRequest(name="snap-other", source_volume_id=b["id"]))
        out["ControllerModifyVolume"] += [
            csi.ControllerModifyVolumeRequest(volume_id=b["id"], mutable_parameters=p)
            for p in ({"discard": "false"}, {"reservedPercent": "5"})
        ]
    out["CreateVolume"] += created
    if a and b:
        out["CreateVolumeGroupSnapshot"].append(csi.CreateVolumeGroupSnapshotRequest(
            name="g-ab", source_volume_ids=[a["id"], b["id"]]))
    others = [v for n, v in vols.items() if n.startswith("new-") and v["access_type"] != "block"]
    for v in others:
        staging = ar.kubelet / "staging" / v["name"]
        out["NodeStageVolume"].append(csi.NodeStageVolumeRequest(
            volume_id=v["id"], staging_target_path=str(staging), volume_capability=mount_capability()))
        out["NodeUnstageVolume"].append(csi.NodeUnstageVolumeRequest(
            volume_id=v["id"], staging_target_path=str(staging)))
        out["DeleteVolume"].append(csi.DeleteVolumeRequest(volume_id=v["id"]))
        out["ControllerGetVolume"].append(csi.ControllerGetVolumeRequest(volume_id=v["id"]))
    if a:
        a_staging, a_target = ar.d.paths("a")
        for ro in (False, True):
            out["NodePublishVolume"].append(csi.NodePublishVolumeRequest(
                volume_id=a["id"], staging_target_path=str(a_staging), readonly=ro,
                target_path=str(ar.kubelet / "pods" / f"new-{'ro' if ro else 'rw'}"),
                volume_capability=mount_capability()))
            out["NodeUnpublishVolume"].append(csi.NodeUnpublishVolumeRequest(
                volume_id=a["id"], target_path=str(ar.kubelet / "pods" / f"new-{'ro' if ro else 'rw'}")))
        # kubelet's NodeExpandVolume at the size the volume has: a no-op that must succeed
        out["NodeExpandVolume"] = [csi.NodeExpandVolumeRequest(
            volume_id=a["id"], volume_path=str(path), capacity_range=csi.CapacityRange(
                required_bytes=a["capacity_bytes"])) for path in (a_staging, a_target)]
        out["NodeGetVolumeStats"].append(csi.NodeGetVolumeStatsRequest(
            volume_id=a["id"], volume_path=str(a_staging)))
    out["ListVolumes"] = [csi.ListVolumesRequest(max_entries=n) for n in (0, 1, 3)]
    out["ListSnapshots"].append(csi.ListSnapshotsRequest(snapshot_id=snap))
    return out


def request_strategy(desc: Descriptor, method: str, ar: Arena) -> st.SearchStrategy:
    """A valid request (about 40%), a valid one with some fields made hostile (40%), or one
    generated from scratch (20%)."""
    fields = [f for f in desc.fields if field_strategy(f, ar, 0) is not None]
    if not fields:
        return message_strategy(desc, ar)

    @st.composite
    def valid(draw):
        choices = valid_requests(ar).get(method) or [_build(desc, {})]
        return choices[draw(st.integers(0, 63)) % len(choices)]

    @st.composite
    def mutated(draw):
        base = templates(ar).get(method)
        msg = _build(desc, {}) if base is None else base
        for f in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name)):
            if draw(st.integers(0, 4)) == 0:  # missing
                msg.ClearField(f.name)
                continue
            value = draw(field_strategy(f, ar, 0))
            msg.ClearField(f.name)
            msg.MergeFrom(_build(desc, {f.name: value}))
        return msg

    if method not in templates(ar):
        return st.one_of(message_strategy(desc, ar), mutated())
    kind = st.sampled_from(["valid", "valid", "mutated", "mutated", "scratch"])
    by_kind = {"valid": valid(), "mutated": mutated(), "scratch": message_strategy(desc, ar)}
    return kind.flatmap(lambda k: by_kind[k])


# ---- the property --------------------------------------------------------------


def _mount_targets(ar: Arena) -> tuple[set[str], set[str]]:
    inside, elsewhere = set(), set()
    for m in host.mounts():
        (inside if m.target.startswith(str(ar.root) + "/") else elsewhere).add(m.target)
    return inside, elsewhere


def _tree(ar: Arena) -> set[str]:
    """Every path below the temp dir, outside the state dir (which disk_dump covers)."""
    out = set()
    for top, dirs, files in os.walk(ar.root):
        if top == str(ar.state):
            dirs[:] = []
            continue
        out |= {os.path.join(top, n) for n in dirs + files}
    return out


def _call(ar: Arena, service: str, method: str, request) -> tuple[str, str]:
    call = ar.d.client.channel.unary_unary(
        f"/csi.v1.{service}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    try:
        call(request, timeout=60)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


@pytest.mark.parametrize("service,method,desc", METHODS, ids=[f"{s}.{m}" for s, m, _ in METHODS])
def test_hostile_requests(arena: Arena, run_seed: int, service: str, method: str, desc: Descriptor):
    empty = _build(desc, {})
    if _call(arena, service, method, empty)[0] == "UNIMPLEMENTED":
        pytest.skip(f"{method} is not implemented")
    seen: dict[str, int] = {}

    @seed(run_seed ^ zlib.crc32(method.encode()))
    @settings(settings.get_profile(PROFILE))
    @given(data=st.data())
    def run(data):
        arena.replenish()
        request = data.draw(request_strategy(desc, method, arena), label="request")
        before = (store_dump(arena.state), disk_dump(arena.state), _mount_targets(arena)[0], _tree(arena))
        code, details = _call(arena, service, method, request)
        seen[code] = seen.get(code, 0) + 1
        assert code in ALLOWED, f"{method} answered {code}: {details}"
        if code != "OK":
            after = (store_dump(arena.state), disk_dump(arena.state), _mount_targets(arena)[0], _tree(arena))
            assert after == before, f"{method} refused ({code}: {details}) but changed state"
        assert sorted(os.listdir("/etc")) == arena.etc_before, "something was written to /etc"
        assert _mount_targets(arena)[1] <= arena.foreign_mounts, "a mount appeared outside the temp dir"
        assert (arena.outside / "canary").read_text() == "canary"
        assert not host.is_mounted(arena.outside), f"{method} mounted over a symlink's destination"
        problems = invariant_problems(arena.state, root=arena.root)
        assert not problems, f"after {method} ({code}): {problems}"

    try:
        run()
    except BaseException as e:
        e.add_note(f"hypothesis profile {PROFILE}, seed {run_seed}: replay with HYPOTHESIS_SEED={run_seed}")
        raise
    print(f"\n{method}: {sum(seen.values())} examples, codes {seen}")
    if method in templates(arena):
        assert seen.get("OK", 0) >= MIN_OK, (
            f"{method}: only {seen.get('OK', 0)} of {sum(seen.values())} requests succeeded, so the "
            f"success paths hardly ran (seed {run_seed}): {seen}")
