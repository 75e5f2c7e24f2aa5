"""proto/csi.proto is CSI v1.12.0 on the wire, and the committed stubs match it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from csi_driver.proto import csi_pb2
from csi_driver.proto.generate import STUB_NAMES, generate
from driver_harness import REPO, SHARED

WIRE = SHARED / "csi-v1.12-wire.json"
TYPES = {v: k[len("TYPE_"):].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _label(f) -> str:
    return "repeated" if f.is_repeated else "required" if f.is_required else "optional"


@pytest.fixture(scope="module")
def wire() -> dict:
    if not WIRE.exists():
        pytest.skip(f"{WIRE} is not present (../shared from the repo root)")
    return json.loads(WIRE.read_text())


def _messages(fd) -> dict:
    out = {}

    def walk(desc):
        out[desc.full_name] = desc
        for nested in desc.nested_types:
            walk(nested)

    for desc in fd.message_types_by_name.values():
        walk(desc)
    return out


def _enums(fd) -> dict:
    out = {e.full_name: e for e in fd.enum_types_by_name.values()}
    for m in _messages(fd).values():
        for e in m.enum_types:
            out[e.full_name] = e
    return out


def _field(f) -> dict:
    d = {"name": f.name, "number": f.number, "type": TYPES[f.type], "label": _label(f)}
    if f.message_type is not None:
        d["type_name"] = f.message_type.full_name
    if f.enum_type is not None:
        d["type_name"] = f.enum_type.full_name
    if f.containing_oneof is not None:
        d["oneof"] = f.containing_oneof.name
    if f.GetOptions().Extensions[csi_pb2.csi_secret]:
        d["csi_secret"] = True
    if f.GetOptions().Extensions[csi_pb2.alpha_field]:
        d["alpha"] = True
    return d


def test_package(wire):
    assert csi_pb2.DESCRIPTOR.package == wire["package"]


def test_services_and_methods(wire):
    ours = {}
    for svc in csi_pb2.DESCRIPTOR.services_by_name.values():
        ours[svc.full_name] = [
            {"name": m.name, "input": m.input_type.full_name, "output": m.output_type.full_name,
             "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
            for m in svc.methods
        ]
    assert set(ours) == set(wire["services"])
    for name, methods in wire["services"].items():
        key = lambda m: m["name"]  # noqa: E731
        assert sorted(ours[name], key=key) == sorted(methods, key=key), name


def test_messages_and_fields(wire):
    ours = _messages(csi_pb2.DESCRIPTOR)
    assert set(ours) == set(wire["messages"])
    for name, spec in wire["messages"].items():
        desc = ours[name]
        assert desc.GetOptions().map_entry == spec["map_entry"], name
        got = sorted((_field(f) for f in desc.fields), key=lambda f: f["number"])
        want = sorted(spec["fields"], key=lambda f: f["number"])
        assert got == want, name


def test_enums(wire):
    ours = _enums(csi_pb2.DESCRIPTOR)
    assert set(ours) == set(wire["enums"])
    for name, values in wire["enums"].items():
        assert {v.name: v.number for v in ours[name].values} == values, name


def test_extensions(wire):
    got = sorted((e.containing_type.full_name, e.name, e.number, TYPES[e.type])
                 for e in csi_pb2.DESCRIPTOR.extensions_by_name.values())
    want = sorted((e["extendee"], e["name"], e["number"], e["type"]) for e in wire["extensions"])
    assert got == want


def test_secret_fields_are_marked(wire):
    secrets = {
        (m, f["name"]) for m, s in wire["messages"].items() for f in s["fields"] if f.get("csi_secret")
    }
    assert len(secrets) >= 10  # the spec marks every secrets map
    ours = {(m, f.name) for m, d in _messages(csi_pb2.DESCRIPTOR).items() for f in d.fields
            if f.GetOptions().Extensions[csi_pb2.csi_secret]}
    assert ours == secrets


def test_stubs_match_proto(tmp_path: Path):
    """Regenerating from proto/csi.proto gives the committed stubs byte for byte."""
    for fresh in generate(tmp_path):
        committed = REPO / "csi_driver" / "proto" / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{fresh.name} drifted from proto/csi.proto: run python -m csi_driver.proto.generate")
    assert {p.name for p in generate(tmp_path)} == set(STUB_NAMES)
